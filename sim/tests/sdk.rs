//! Every call through the real `aws-sdk-ec2` client (and aws-config's IMDS client) against the
//! served simulator.
#![allow(clippy::unwrap_used)]

mod common;

use aws_sdk_ec2::types::{
    Filter, NetworkInterfaceAttachmentChanges, ResourceType, Tag, TagSpecification,
};
use common::{client, code, fixture, post, serve, status};
use vpc_sim::control::{BucketSpec, ThrottleConfig};
use vpc_sim::sim::SimConfig;

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

#[tokio::test]
async fn full_eni_lifecycle_through_the_sdk() {
    let (shared, srv) = serve(SimConfig {
        seed: 7,
        ..Default::default()
    })
    .await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/20", "m5.large").await;

    // DescribeInstanceTypes with NetworkInfo from the calculator's table.
    let t = c
        .describe_instance_types()
        .instance_types("m5.large".into())
        .send()
        .await
        .unwrap();
    let ni = t.instance_types()[0].network_info().unwrap();
    assert_eq!(ni.maximum_network_interfaces(), Some(3));
    assert_eq!(ni.ipv4_addresses_per_interface(), Some(10));
    assert_eq!(ni.network_cards()[0].maximum_network_interfaces(), Some(3));
    assert_eq!(
        t.instance_types()[0].hypervisor().map(|h| h.as_str()),
        Some("nitro")
    );

    // DescribeSubnets with ipamd's filters and the free count.
    let s = c
        .describe_subnets()
        .filters(filter("vpc-id", &f.vpc))
        .filters(filter("availability-zone", "us-west-2a"))
        .send()
        .await
        .unwrap();
    assert_eq!(s.subnets().len(), 1);
    assert_eq!(
        s.subnets()[0].available_ip_address_count(),
        Some(4096 - 5 - 1)
    );

    // CreateNetworkInterface as ipamd does it.
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::NetworkInterface)
        .tags(
            Tag::builder()
                .key("node.k8s.amazonaws.com/instance_id")
                .value(&f.instance)
                .build(),
        )
        .tags(
            Tag::builder()
                .key("cluster.k8s.amazonaws.com/name")
                .value("c1")
                .build(),
        )
        .build();
    let eni = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .description(format!("aws-K8S-{}", f.instance))
        .groups(&f.sg)
        .secondary_private_ip_address_count(3)
        .tag_specifications(tags)
        .send()
        .await
        .unwrap();
    let eni = eni.network_interface().unwrap();
    let eni_id = eni.network_interface_id().unwrap().to_owned();
    assert_eq!(eni.private_ip_addresses().len(), 4);
    assert_eq!(eni.status().map(|s| s.as_str()), Some("available"));
    assert_eq!(eni.groups()[0].group_id(), Some(f.sg.as_str()));
    assert!(eni.mac_address().unwrap().starts_with("02:"));

    // DescribeInstances: the lowest unused device index.
    let d = c
        .describe_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    let inst = &d.reservations()[0].instances()[0];
    assert_eq!(inst.network_interfaces().len(), 1);
    assert_eq!(
        inst.network_interfaces()[0]
            .attachment()
            .unwrap()
            .device_index(),
        Some(0)
    );

    // Attach, then DeleteOnTermination.
    let a = c
        .attach_network_interface()
        .network_interface_id(&eni_id)
        .instance_id(&f.instance)
        .device_index(1)
        .network_card_index(0)
        .send()
        .await
        .unwrap();
    let att = a.attachment_id().unwrap().to_owned();
    c.modify_network_interface_attribute()
        .network_interface_id(&eni_id)
        .attachment(
            NetworkInterfaceAttachmentChanges::builder()
                .attachment_id(&att)
                .delete_on_termination(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    c.modify_network_interface_attribute()
        .network_interface_id(&eni_id)
        .groups(&f.sg)
        .send()
        .await
        .unwrap();

    // DescribeNetworkInterfaces with ipamd's filters.
    let d = c
        .describe_network_interfaces()
        .filters(filter("attachment.instance-id", &f.instance))
        .filters(filter("tag-key", "node.k8s.amazonaws.com/instance_id"))
        .filters(filter("tag:cluster.k8s.amazonaws.com/name", "c1"))
        .filters(filter("attachment.status", "attached"))
        .send()
        .await
        .unwrap();
    assert_eq!(d.network_interfaces().len(), 1);
    let got = &d.network_interfaces()[0];
    assert_eq!(
        got.attachment().unwrap().delete_on_termination(),
        Some(true)
    );
    assert_eq!(got.attachment().unwrap().device_index(), Some(1));

    // Assign: only what was assigned comes back.
    let r = c
        .assign_private_ip_addresses()
        .network_interface_id(&eni_id)
        .secondary_private_ip_address_count(2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.assigned_private_ip_addresses().len(), 2);
    let freed: Vec<String> = r
        .assigned_private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address().map(str::to_owned))
        .collect();
    let r = c
        .assign_private_ip_addresses()
        .network_interface_id(&eni_id)
        .ipv4_prefix_count(2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.assigned_ipv4_prefixes().len(), 2);
    let prefix = r.assigned_ipv4_prefixes()[0]
        .ipv4_prefix()
        .unwrap()
        .to_owned();
    assert!(prefix.ends_with("/28"));
    // 1 + 3 + 2 + 2 = 8 of 10 slots; 3 more is over the limit.
    let e = c
        .assign_private_ip_addresses()
        .network_interface_id(&eni_id)
        .secondary_private_ip_address_count(3)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "PrivateIpAddressLimitExceeded");
    assert_eq!(status(&e), 400);
    c.unassign_private_ip_addresses()
        .network_interface_id(&eni_id)
        .set_private_ip_addresses(Some(freed))
        .send()
        .await
        .unwrap();
    c.unassign_private_ip_addresses()
        .network_interface_id(&eni_id)
        .ipv4_prefixes(&prefix)
        .send()
        .await
        .unwrap();

    // IPv6 /80 prefix, assign and unassign.
    let r = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni_id)
        .ipv6_prefix_count(1)
        .send()
        .await
        .unwrap();
    let p6 = r.assigned_ipv6_prefixes()[0].clone();
    assert!(p6.ends_with("/80"), "{p6}");
    let r = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni_id)
        .ipv6_address_count(2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.assigned_ipv6_addresses().len(), 2);
    let r = c
        .unassign_ipv6_addresses()
        .network_interface_id(&eni_id)
        .ipv6_prefixes(&p6)
        .send()
        .await
        .unwrap();
    assert_eq!(r.unassigned_ipv6_prefixes(), [p6]);

    // Tags.
    c.create_tags()
        .resources(&eni_id)
        .tags(
            Tag::builder()
                .key("node.k8s.amazonaws.com/createdAt")
                .value("2024-01-01T00:00:00Z")
                .build(),
        )
        .send()
        .await
        .unwrap();
    c.delete_tags()
        .resources(&eni_id)
        .tags(Tag::builder().key("cluster.k8s.amazonaws.com/name").build())
        .send()
        .await
        .unwrap();
    let d = c
        .describe_network_interfaces()
        .network_interface_ids(&eni_id)
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = d.network_interfaces()[0]
        .tag_set()
        .iter()
        .filter_map(|t| t.key())
        .collect();
    assert_eq!(
        keys,
        [
            "node.k8s.amazonaws.com/createdAt",
            "node.k8s.amazonaws.com/instance_id"
        ]
    );

    // Detach, then delete; a second delete is NotFound with the id quoted.
    c.detach_network_interface()
        .attachment_id(&att)
        .send()
        .await
        .unwrap();
    c.delete_network_interface()
        .network_interface_id(&eni_id)
        .send()
        .await
        .unwrap();
    let e = c
        .delete_network_interface()
        .network_interface_id(&eni_id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidNetworkInterfaceID.NotFound");
    assert!(e
        .as_service_error()
        .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::message(s))
        .unwrap()
        .contains(&format!("'{eni_id}'")));

    // Terminate leaves a non-DeleteOnTermination ENI behind, available.
    let leak = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .send()
        .await
        .unwrap();
    let leak_id = leak
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    c.attach_network_interface()
        .network_interface_id(&leak_id)
        .instance_id(&f.instance)
        .device_index(1)
        .send()
        .await
        .unwrap();
    let t = c
        .terminate_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    assert_eq!(
        t.terminating_instances()[0]
            .current_state()
            .unwrap()
            .name()
            .map(|n| n.as_str()),
        Some("shutting-down")
    );
    let d = c
        .describe_network_interfaces()
        .filters(filter("status", "available"))
        .filters(filter("vpc-id", &f.vpc))
        .send()
        .await
        .unwrap();
    let ids: Vec<&str> = d
        .network_interfaces()
        .iter()
        .filter_map(|e| e.network_interface_id())
        .collect();
    assert_eq!(ids, [leak_id.as_str()]);
    let state = shared.with(|s| s.state_json());
    assert_eq!(state["summary"]["invariants"], "ok");
    srv.shutdown();
}

#[tokio::test]
async fn limits_and_not_found_errors_carry_ec2_codes() {
    let (_shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "t3.small").await;
    // t3.small: 3 ENIs.
    for dev in 1..=3 {
        let e = c
            .create_network_interface()
            .subnet_id(&f.subnet)
            .send()
            .await
            .unwrap();
        let id = e
            .network_interface()
            .unwrap()
            .network_interface_id()
            .unwrap()
            .to_owned();
        let r = c
            .attach_network_interface()
            .network_interface_id(&id)
            .instance_id(&f.instance)
            .device_index(dev)
            .send()
            .await;
        if dev < 3 {
            r.unwrap();
        } else {
            assert_eq!(code(&r.unwrap_err()), "AttachmentLimitExceeded");
        }
    }
    let e = c
        .describe_network_interfaces()
        .network_interface_ids("eni-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidNetworkInterfaceID.NotFound");
    let e = c
        .describe_network_interfaces()
        .network_interface_ids("bogus")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidNetworkInterfaceID.Malformed");
    let e = c
        .describe_instances()
        .instance_ids("i-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidInstanceID.NotFound");
    let e = c
        .describe_subnets()
        .subnet_ids("subnet-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidSubnetID.NotFound");
    let e = c
        .detach_network_interface()
        .attachment_id("eni-attach-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidAttachmentID.NotFound");
    let e = c
        .describe_instance_types()
        .instance_types("m5.lage".into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidInstanceType");
    let e = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .dry_run(true)
        .send()
        .await
        .unwrap_err();
    assert_eq!((code(&e).as_str(), status(&e)), ("DryRunOperation", 412));
    srv.shutdown();
}

#[tokio::test]
async fn paginators_walk_every_page() {
    let (_shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    for _ in 0..11 {
        c.create_network_interface()
            .subnet_id(&f.subnet)
            .send()
            .await
            .unwrap();
    }
    let pages: Vec<_> = c
        .describe_network_interfaces()
        .max_results(5)
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await;
    let sizes: Vec<usize> = pages
        .into_iter()
        .map(|p| p.unwrap().network_interfaces().len())
        .collect();
    assert_eq!(sizes, [5, 5, 2]);
    let n: usize = c
        .describe_instance_types()
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|p| p.unwrap().instance_types().len())
        .sum();
    assert_eq!(n, subnet_calc::limits::Catalog::embedded().len());
    srv.shutdown();
}

#[tokio::test]
async fn throttled_calls_get_request_limit_exceeded_with_503() {
    let (shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let mut buckets = std::collections::BTreeMap::new();
    buckets.insert(
        "DescribeSubnets".to_owned(),
        BucketSpec {
            capacity: 3.0,
            refill_per_sec: 0.001,
        },
    );
    shared.with(|s| {
        s.set_throttle(ThrottleConfig {
            enabled: true,
            buckets,
        })
    });
    for _ in 0..3 {
        c.describe_subnets().send().await.unwrap();
    }
    let e = c.describe_subnets().send().await.unwrap_err();
    assert_eq!(
        (code(&e).as_str(), status(&e)),
        ("RequestLimitExceeded", 503)
    );
    // Other actions have their own buckets.
    c.describe_network_interfaces().send().await.unwrap();
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_ec2_errors_and_change_nothing() {
    let (shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    let before = shared.with(|s| serde_json::to_string(s.model()).unwrap());
    let cases = [
        ("Action=NoSuchThing", "InvalidAction"),
        ("Version=2016-11-15", "MissingAction"),
        (
            "Action=AssignPrivateIpAddresses&SecondaryPrivateIpAddressCount=2",
            "MissingParameter",
        ),
        (
            "Action=CreateNetworkInterface&SubnetId=SUB&SecondaryPrivateIpAddressCount=two",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateNetworkInterface&SubnetId=SUB&PrivateIpAddress=10.0.0.999",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateNetworkInterface&SubnetId=SUB&SecondaryPrivateIpAddressCount=-1",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateNetworkInterface&SubnetId=SUB&Bogus=1",
            "UnknownParameter",
        ),
        (
            "Action=CreateNetworkInterface&SubnetId=SUB&SecondaryPrivateIpAddressCount=5000",
            "PrivateIpAddressLimitExceeded",
        ),
        (
            "Action=AttachNetworkInterface&NetworkInterfaceId=eni-1&InstanceId=INST",
            "MissingParameter",
        ),
        (
            "Action=DescribeNetworkInterfaces&MaxResults=1",
            "InvalidParameterValue",
        ),
        (
            "Action=DescribeNetworkInterfaces&NextToken=zz",
            "InvalidPaginationToken",
        ),
        (
            "Action=DescribeNetworkInterfaces&Filter.1.Name=nope&Filter.1.Value.1=x",
            "InvalidParameterValue",
        ),
        (
            "Action=DescribeNetworkInterfaces&Filter.x.Name=status",
            "UnknownParameter",
        ),
        (
            "Action=CreateTags&ResourceId.1=INST&Tag.1.Key=aws:x&Tag.1.Value=y",
            "InvalidParameterValue",
        ),
        (
            "Action=ModifyNetworkInterfaceAttribute&NetworkInterfaceId=eni-1",
            "MissingParameter",
        ),
        (
            "Action=RunInstances&ImageId=ami-1&MinCount=1",
            "MissingParameter",
        ),
        (
            "Action=CreateSubnet&VpcId=VPC&CidrBlock=192.168.0.0/24",
            "InvalidSubnet.Range",
        ),
        (
            "Action=CreateSubnet&VpcId=VPC&CidrBlock=10.0.0.0/25",
            "InvalidSubnet.Conflict",
        ),
    ];
    for (body, want) in cases {
        let body = body
            .replace("SUB", &f.subnet)
            .replace("INST", &f.instance)
            .replace("VPC", &f.vpc);
        let addr = srv.ec2;
        let sent = body.clone();
        let (st, xml) = tokio::task::spawn_blocking(move || post(addr, &sent))
            .await
            .unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let got = doc
            .descendants()
            .find(|n| n.has_tag_name("Code"))
            .and_then(|n| n.text())
            .unwrap_or("");
        assert_eq!((st, got), (400, want), "{body}");
        assert!(
            doc.descendants().any(|n| n.has_tag_name("RequestID")),
            "{xml}"
        );
    }
    let after = shared.with(|s| serde_json::to_string(s.model()).unwrap());
    assert_eq!(before, after);
    srv.shutdown();
}

#[tokio::test]
async fn imds_serves_each_instance_to_the_aws_config_client() {
    let (shared, srv) = serve(SimConfig {
        imds_delay_ms: 0,
        ..Default::default()
    })
    .await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    let second = c
        .run_instances()
        .image_id("ami-1")
        .instance_type("t3.small".into())
        .min_count(1)
        .max_count(1)
        .subnet_id(&f.subnet)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    for (id, itype) in [(&f.instance, "m5.large"), (&second, "t3.small")] {
        let imds = aws_config::imds::Client::builder()
            .endpoint(srv.imds_url(id))
            .unwrap()
            .build();
        assert_eq!(
            String::from(imds.get("/latest/meta-data/instance-id").await.unwrap()),
            *id
        );
        assert_eq!(
            String::from(imds.get("/latest/meta-data/instance-type").await.unwrap()),
            itype
        );
        let mac = String::from(imds.get("/latest/meta-data/mac").await.unwrap());
        let ips = String::from(
            imds.get(format!(
                "/latest/meta-data/network/interfaces/macs/{mac}/local-ipv4s"
            ))
            .await
            .unwrap(),
        );
        let local = String::from(imds.get("/latest/meta-data/local-ipv4").await.unwrap());
        assert_eq!(ips.lines().next(), Some(local.as_str()));
        let doc = String::from(
            imds.get("/latest/dynamic/instance-identity/document")
                .await
                .unwrap(),
        );
        assert!(doc.contains("\"region\": \"us-west-2\""), "{doc}");
    }
    // Region discovery through the standard environment-free provider.
    let region = aws_config::imds::region::ImdsRegionProvider::builder()
        .imds_client(
            aws_config::imds::Client::builder()
                .endpoint(srv.imds_url(&f.instance))
                .unwrap()
                .build(),
        )
        .build()
        .region()
        .await;
    assert_eq!(region.map(|r| r.to_string()).as_deref(), Some("us-west-2"));
    // The bare endpoint serves the first instance; an absent path is a 404.
    let imds = aws_config::imds::Client::builder()
        .endpoint(format!("http://{}/", srv.imds))
        .unwrap()
        .build();
    assert_eq!(
        String::from(imds.get("/latest/meta-data/instance-id").await.unwrap()),
        f.instance
    );
    assert!(imds.get("/latest/meta-data/ipv6").await.is_err());
    // The call log saw every EC2 call.
    assert!(shared.with(|s| s.calls().iter().any(|c| c.action == "RunInstances")));
    srv.shutdown();
}
