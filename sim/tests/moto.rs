//! Cross-check against moto: the same SDK calls against moto_server and the simulator must give
//! the same response shapes and error codes where moto is right; a second test pins each place
//! where we deliberately differ from moto because AWS does.
//!
//! Needs `moto_server` (`pip install 'moto[server]'`). Without it the tests skip with a message,
//! unless `CI` is set, where they fail.
#![allow(clippy::unwrap_used)]

mod common;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use common::{client, code, serve};
use vpc_sim::moto::MotoServer;
use vpc_sim::sim::SimConfig;

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// Runs the scenario and returns observations that must agree between moto and us.
async fn observe(c: &aws_sdk_ec2::Client) -> Vec<String> {
    let mut o = Vec::new();
    let f = common::fixture(c, "10.0.1.0/24", "t3.small").await;
    o.push(format!("vpc id prefix ok: {}", f.vpc.starts_with("vpc-")));
    let s = c
        .describe_subnets()
        .subnet_ids(&f.subnet)
        .send()
        .await
        .unwrap();
    let s = &s.subnets()[0];
    o.push(format!(
        "subnet: {:?} {:?} {:?}",
        s.cidr_block(),
        s.availability_zone(),
        s.vpc_id() == Some(f.vpc.as_str())
    ));
    let t = c
        .describe_instance_types()
        .instance_types("m5.large".into())
        .send()
        .await
        .unwrap();
    let ni = t.instance_types()[0].network_info().unwrap();
    o.push(format!(
        "m5.large: enis {:?} ipv4 {:?} ipv6 {:?} cards {:?}",
        ni.maximum_network_interfaces(),
        ni.ipv4_addresses_per_interface(),
        ni.ipv6_addresses_per_interface(),
        ni.maximum_network_cards()
    ));
    let d = c
        .describe_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    let i = &d.reservations()[0].instances()[0];
    let nis = i.network_interfaces();
    o.push(format!(
        "instance: type {:?} enis {} device0 {:?} primary in subnet {}",
        i.instance_type().map(|t| t.as_str().to_owned()),
        nis.len(),
        nis.first()
            .and_then(|n| n.attachment())
            .and_then(|a| a.device_index()),
        i.private_ip_address()
            .is_some_and(|a| a.starts_with("10.0.1."))
    ));
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::NetworkInterface)
        .tags(
            Tag::builder()
                .key("node.k8s.amazonaws.com/instance_id")
                .value(&f.instance)
                .build(),
        )
        .build();
    let e = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .description("aws-K8S-test")
        .groups(&f.sg)
        .secondary_private_ip_address_count(2)
        .tag_specifications(tags)
        .send()
        .await
        .unwrap();
    let e = e.network_interface().unwrap();
    let eni = e.network_interface_id().unwrap().to_owned();
    let ips: Vec<String> = e
        .private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address().map(str::to_owned))
        .collect();
    o.push(format!(
        "eni: prefix {} status {:?} ips {} primaries {} desc {:?} tags {} groups {:?} mac {}",
        eni.starts_with("eni-"),
        e.status().map(|s| s.as_str().to_owned()),
        ips.len(),
        e.private_ip_addresses()
            .iter()
            .filter(|a| a.primary() == Some(true))
            .count(),
        e.description(),
        e.tag_set().len(),
        e.groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect::<Vec<_>>()
            == [f.sg.as_str()],
        e.mac_address().is_some_and(|m| m.len() == 17)
    ));
    let a = c
        .attach_network_interface()
        .network_interface_id(&eni)
        .instance_id(&f.instance)
        .device_index(1)
        .send()
        .await
        .unwrap();
    let att = a.attachment_id().unwrap().to_owned();
    o.push(format!(
        "attach id prefix ok: {}",
        att.starts_with("eni-attach-")
    ));
    let d = c
        .describe_network_interfaces()
        .filters(filter("attachment.instance-id", &f.instance))
        .send()
        .await
        .unwrap();
    o.push(format!(
        "attached to instance: {}",
        d.network_interfaces().len()
    ));
    let d = c
        .describe_network_interfaces()
        .filters(filter("tag-key", "node.k8s.amazonaws.com/instance_id"))
        .send()
        .await
        .unwrap();
    o.push(format!("tag-key filter: {}", d.network_interfaces().len()));
    let d = c
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap();
    let got = &d.network_interfaces()[0];
    o.push(format!(
        "after attach: status {:?} device {:?} instance ok {}",
        got.status().map(|s| s.as_str().to_owned()),
        got.attachment().and_then(|a| a.device_index()),
        got.attachment().and_then(|a| a.instance_id()) == Some(f.instance.as_str())
    ));
    let secondary = ips
        .iter()
        .find(|a| Some(a.as_str()) != e.private_ip_address())
        .unwrap()
        .clone();
    c.unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(&secondary)
        .send()
        .await
        .unwrap();
    c.create_tags()
        .resources(&eni)
        .tags(Tag::builder().key("k").value("v").build())
        .send()
        .await
        .unwrap();
    c.delete_tags()
        .resources(&eni)
        .tags(
            Tag::builder()
                .key("node.k8s.amazonaws.com/instance_id")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let d = c
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap();
    let got = &d.network_interfaces()[0];
    o.push(format!(
        "after unassign+tags: ips {} tags {:?}",
        got.private_ip_addresses().len(),
        got.tag_set()
            .iter()
            .map(|t| (t.key().unwrap_or(""), t.value().unwrap_or("")))
            .collect::<Vec<_>>()
    ));
    c.detach_network_interface()
        .attachment_id(&att)
        .send()
        .await
        .unwrap();
    let d = c
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap();
    o.push(format!(
        "after detach: {:?}",
        d.network_interfaces()[0]
            .status()
            .map(|s| s.as_str().to_owned())
    ));
    c.delete_network_interface()
        .network_interface_id(&eni)
        .send()
        .await
        .unwrap();
    // Error codes.
    let e = c
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap_err();
    o.push(format!("describe deleted eni: {}", code(&e)));
    let e = c
        .delete_network_interface()
        .network_interface_id("eni-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    o.push(format!("delete unknown eni: {}", code(&e)));
    let e = c
        .describe_subnets()
        .subnet_ids("subnet-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    o.push(format!("unknown subnet: {}", code(&e)));
    let e = c
        .describe_instances()
        .instance_ids("i-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    o.push(format!("unknown instance: {}", code(&e)));
    let e = c
        .create_network_interface()
        .subnet_id("subnet-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    o.push(format!("create in unknown subnet: {}", code(&e)));
    let t = c
        .terminate_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    let st = &t.terminating_instances()[0];
    o.push(format!(
        "terminate: previous {:?}",
        st.previous_state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
    ));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_calls_give_the_same_shapes_and_error_codes_as_moto() {
    let Some(moto) = MotoServer::for_test("moto cross-check") else {
        return;
    };
    let (_shared, srv) = serve(SimConfig::default()).await;
    let ours = observe(&client(&srv.ec2_url())).await;
    let theirs = observe(&client(moto.url())).await;
    eprintln!("observations (simulator):\n{}", ours.join("\n"));
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "simulator vs moto");
    }
    assert_eq!(ours.len(), theirs.len());
    srv.shutdown();
}

/// Where AWS (and so the simulator) differs from moto. Each assertion pins moto's behaviour
/// too, so a moto upgrade that fixes one shows up here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliberate_differences_from_moto() {
    let Some(moto) = MotoServer::for_test("moto cross-check") else {
        return;
    };
    let (_shared, srv) = serve(SimConfig::default()).await;
    for (name, c) in [
        ("sim", client(&srv.ec2_url())),
        ("moto", client(moto.url())),
    ] {
        let ours = name == "sim";
        let f = common::fixture(&c, "10.0.2.0/24", "t3.small").await;
        let mk = || async {
            let e = c
                .create_network_interface()
                .subnet_id(&f.subnet)
                .send()
                .await
                .unwrap();
            e.network_interface()
                .unwrap()
                .network_interface_id()
                .unwrap()
                .to_owned()
        };
        // 1. AssignPrivateIpAddresses returns only what it assigned (moto: every IP, primary too).
        let eni = mk().await;
        let r = c
            .assign_private_ip_addresses()
            .network_interface_id(&eni)
            .secondary_private_ip_address_count(1)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.assigned_private_ip_addresses().len(),
            if ours { 1 } else { 2 },
            "{name}: assign answer"
        );
        // 2. Ipv4PrefixCount assigns /28 prefixes (moto: accepted and ignored).
        let eni2 = mk().await;
        let r = c
            .assign_private_ip_addresses()
            .network_interface_id(&eni2)
            .ipv4_prefix_count(1)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.assigned_ipv4_prefixes().len(),
            usize::from(ours),
            "{name}: prefixes"
        );
        // 3. The instance type's ENI limit holds (t3.small: 3; moto: no limit).
        let eni3 = mk().await;
        for (dev, id) in [(1, &eni), (2, &eni2)] {
            c.attach_network_interface()
                .network_interface_id(id)
                .instance_id(&f.instance)
                .device_index(dev)
                .send()
                .await
                .unwrap();
        }
        let r = c
            .attach_network_interface()
            .network_interface_id(&eni3)
            .instance_id(&f.instance)
            .device_index(3)
            .send()
            .await;
        if ours {
            assert_eq!(code(&r.unwrap_err()), "AttachmentLimitExceeded");
        } else {
            assert!(
                r.is_ok(),
                "moto enforces ENI limits now: update this test and TESTBED.md"
            );
        }
        // 4. MaxResults pages (moto: ignored, everything in one page).
        for _ in 0..4 {
            mk().await;
        }
        let d = c
            .describe_network_interfaces()
            .max_results(5)
            .send()
            .await
            .unwrap();
        if ours {
            assert_eq!(
                (d.network_interfaces().len(), d.next_token().is_some()),
                (5, true)
            );
        } else {
            assert!(
                d.network_interfaces().len() > 5,
                "moto honours MaxResults now: update this test"
            );
        }
        // 5. A device index already in use is refused (moto: accepted).
        let eni4 = mk().await;
        let r = c
            .attach_network_interface()
            .network_interface_id(&eni4)
            .instance_id(&f.instance)
            .device_index(1)
            .send()
            .await;
        if ours {
            assert_eq!(code(&r.unwrap_err()), "InvalidParameterValue");
        } else {
            assert!(
                r.is_ok(),
                "moto checks device indexes now: update this test"
            );
        }
    }
    srv.shutdown();
}
