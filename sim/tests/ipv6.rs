//! IPv6 through the real `aws-sdk-ec2` client (and aws-config's IMDS client) against the served
//! simulator: the VPC's Amazon /56 and subnet /64s as EC2 hands them, /80 prefixes and addresses
//! on ENIs, the IPv6 fields and filters of the describe calls, EC2's errors, and the IPv6 keys
//! of instance metadata, as ipamd's IPv6 mode reads them.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv6Addr;

use aws_sdk_ec2::types::{Filter, InstanceType};
use common::{client, code, serve};
use vpc_sim::ipv6::Ipv6Block;
use vpc_sim::model::check_invariants;
use vpc_sim::sim::SimConfig;

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn block(s: &str) -> Ipv6Block {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an IPv6 block"))
}

/// The `n`th /64 of a /56.
fn nth64(vpc: Ipv6Block, n: u8) -> String {
    Ipv6Block::new(vpc.base | (u128::from(n) << 64), 64)
        .unwrap()
        .to_string()
}

async fn run(c: &aws_sdk_ec2::Client, subnet: &str, itype: &str, v6: Option<i32>) -> String {
    let mut r = c
        .run_instances()
        .image_id("ami-1")
        .instance_type(InstanceType::from(itype))
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet);
    if let Some(n) = v6 {
        r = r.ipv6_address_count(n);
    }
    r.send().await.unwrap().instances()[0]
        .instance_id()
        .unwrap()
        .to_owned()
}

async fn primary_eni(c: &aws_sdk_ec2::Client, instance: &str) -> (String, String) {
    let d = c
        .describe_network_interfaces()
        .filters(filter("attachment.instance-id", instance))
        .filters(filter("attachment.device-index", "0"))
        .send()
        .await
        .unwrap();
    let e = &d.network_interfaces()[0];
    (
        e.network_interface_id().unwrap().to_owned(),
        e.mac_address().unwrap().to_owned(),
    )
}

async fn imds_get(srv: &vpc_sim::server::Running, instance: &str, path: &str) -> Option<String> {
    let imds = aws_config::imds::Client::builder()
        .endpoint(srv.imds_url(instance))
        .unwrap()
        .build();
    imds.get(format!("/latest/meta-data/{path}"))
        .await
        .ok()
        .map(String::from)
}

#[tokio::test]
async fn ipv6_blocks_prefixes_addresses_filters_errors_and_metadata_through_the_sdk() {
    let (shared, srv) = serve(SimConfig {
        seed: 21,
        imds_delay_ms: 0,
        ..Default::default()
    })
    .await;
    let c = client(&srv.ec2_url());

    // An IPv4-only VPC and subnet, with a node in it: no IPv6 anywhere yet.
    let vpc = c
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc()
        .unwrap()
        .vpc_id()
        .unwrap()
        .to_owned();
    let subnet = c
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.1.0/24")
        .availability_zone("us-west-2a")
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_owned();
    let node = run(&c, &subnet, "m5.large", None).await;
    let (eni, mac) = primary_eni(&c, &node).await;
    let e = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_prefix_count(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue", "{e:?}");
    let e = c
        .run_instances()
        .image_id("ami-1")
        .instance_type(InstanceType::M5Large)
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .ipv6_address_count(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue", "{e:?}");
    let iface = format!("network/interfaces/macs/{mac}/");
    let keys = imds_get(&srv, &node, &iface).await.unwrap();
    assert!(!keys.contains("ipv6"), "{keys}");

    // AssociateVpcCidrBlock: an Amazon /56 (once), seen by DescribeVpcs and its filters.
    let a = c
        .associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .amazon_provided_ipv6_cidr_block(true)
        .send()
        .await
        .unwrap();
    let assoc = a.ipv6_cidr_block_association().unwrap();
    let v56 = block(assoc.ipv6_cidr_block().unwrap());
    assert_eq!(v56.len, 56);
    assert_eq!(
        assoc
            .ipv6_cidr_block_state()
            .and_then(|s| s.state())
            .map(|s| s.as_str()),
        Some("associating")
    );
    let vpc_assoc = assoc.association_id().unwrap().to_owned();
    let e = c
        .associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .amazon_provided_ipv6_cidr_block(true)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "CidrLimitExceeded");
    let d = c.describe_vpcs().vpc_ids(&vpc).send().await.unwrap();
    let set = d.vpcs()[0].ipv6_cidr_block_association_set();
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].ipv6_cidr_block(), Some(v56.to_string().as_str()));
    assert_eq!(set[0].association_id(), Some(vpc_assoc.as_str()));
    assert_eq!(
        set[0]
            .ipv6_cidr_block_state()
            .and_then(|s| s.state())
            .map(|s| s.as_str()),
        Some("associated")
    );
    for (f, v, n) in [
        (
            "ipv6-cidr-block-association.ipv6-cidr-block",
            v56.to_string(),
            1,
        ),
        ("ipv6-cidr-block-association.association-id", vpc_assoc, 1),
        (
            "ipv6-cidr-block-association.ipv6-cidr-block",
            "2001:db8::/56".into(),
            0,
        ),
    ] {
        let d = c
            .describe_vpcs()
            .filters(filter(f, &v))
            .send()
            .await
            .unwrap();
        assert_eq!(d.vpcs().len(), n, "DescribeVpcs {f}={v}");
    }

    // AssociateSubnetCidrBlock: a /64 of the /56, checked as EC2 checks it.
    for (bad, want) in [
        ("2001:db8:0:1::/64".to_owned(), "InvalidSubnet.Range"),
        (
            Ipv6Block::new(v56.base, 60).unwrap().to_string(),
            "InvalidSubnet.Range",
        ),
    ] {
        let e = c
            .associate_subnet_cidr_block()
            .subnet_id(&subnet)
            .ipv6_cidr_block(&bad)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&e), want, "{bad}");
    }
    let s64 = nth64(v56, 1);
    let a = c
        .associate_subnet_cidr_block()
        .subnet_id(&subnet)
        .ipv6_cidr_block(&s64)
        .send()
        .await
        .unwrap();
    assert_eq!(a.subnet_id(), Some(subnet.as_str()));
    let sub_assoc = a
        .ipv6_cidr_block_association()
        .and_then(|x| x.association_id())
        .unwrap()
        .to_owned();
    let e = c
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.2.0/24")
        .ipv6_cidr_block(&s64)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidSubnet.Conflict");
    let d = c
        .describe_subnets()
        .filters(filter("ipv6-cidr-block-association.ipv6-cidr-block", &s64))
        .send()
        .await
        .unwrap();
    assert_eq!(d.subnets().len(), 1);
    let sa = &d.subnets()[0].ipv6_cidr_block_association_set()[0];
    assert_eq!(sa.association_id(), Some(sub_assoc.as_str()));
    assert_eq!(sa.ipv6_cidr_block(), Some(s64.as_str()));
    let net = block(&s64);

    // Instance metadata now names both blocks, for the node launched before them.
    assert_eq!(
        imds_get(&srv, &node, &format!("{iface}subnet-ipv6-cidr-blocks")).await,
        Some(s64.clone())
    );
    assert_eq!(
        imds_get(&srv, &node, &format!("{iface}vpc-ipv6-cidr-blocks")).await,
        Some(v56.to_string())
    );
    assert_eq!(imds_get(&srv, &node, "ipv6").await, None);

    // Ipv6PrefixCount=1 on the primary ENI: an aligned /80 of the /64, neither its first nor its
    // last (they hold the reserved addresses).
    let r = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_prefix_count(1)
        .send()
        .await
        .unwrap();
    assert!(r.assigned_ipv6_addresses().is_empty());
    let p80 = block(&r.assigned_ipv6_prefixes()[0]);
    assert_eq!(p80.len, 80);
    assert!(net.contains_block(&p80), "{p80} in {net}");
    assert_ne!(p80.base, net.base);
    assert_ne!(p80.base, net.base | (0xffff << 48));
    assert_eq!(
        imds_get(&srv, &node, &format!("{iface}ipv6-prefix")).await,
        Some(p80.to_string())
    );

    // Ipv6AddressCount: addresses of the /64 outside every /80; ipv6AddressesSet, ipv6PrefixSet
    // and the ipv6-addresses.ipv6-address filter.
    let r = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_address_count(2)
        .send()
        .await
        .unwrap();
    let addrs: Vec<Ipv6Addr> = r
        .assigned_ipv6_addresses()
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), 2);
    for a in &addrs {
        let n = u128::from(*a);
        assert!(net.contains(n) && !p80.contains(n), "{a}");
        assert!(n & 0xffff_ffff_ffff_ffff > 3, "{a} is reserved");
    }
    let d = c
        .describe_network_interfaces()
        .filters(filter("ipv6-addresses.ipv6-address", &addrs[1].to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(d.network_interfaces().len(), 1);
    let got = &d.network_interfaces()[0];
    assert_eq!(got.network_interface_id(), Some(eni.as_str()));
    let listed: Vec<Ipv6Addr> = got
        .ipv6_addresses()
        .iter()
        .filter_map(|a| a.ipv6_address()?.parse().ok())
        .collect();
    assert_eq!(listed, addrs);
    let pfx: Vec<&str> = got
        .ipv6_prefixes()
        .iter()
        .filter_map(|p| p.ipv6_prefix())
        .collect();
    assert_eq!(pfx, [p80.to_string().as_str()]);
    assert_eq!(
        imds_get(&srv, &node, &format!("{iface}ipv6s")).await,
        Some(format!("{}\n{}", addrs[0], addrs[1]))
    );

    // m5.large: 10 IPv6 slots per ENI; 3 are used, 8 more are too many, 7 fit.
    let e = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_address_count(8)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "PrivateIpAddressLimitExceeded");
    let e = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_prefixes(p80.to_string())
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidIPAddress.InUse");
    let e = c
        .assign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_address_count(1)
        .ipv6_prefix_count(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterCombination");

    // UnassignIpv6Addresses with Ipv6Prefix.N, as ipamd releases it; twice is an error.
    let r = c
        .unassign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_prefixes(p80.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.unassigned_ipv6_prefixes(), [p80.to_string()]);
    let e = c
        .unassign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_prefixes(p80.to_string())
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    assert_eq!(
        imds_get(&srv, &node, &format!("{iface}ipv6-prefix")).await,
        None
    );

    // A node launched with Ipv6AddressCount=1: its primary IPv6 in DescribeInstances, the
    // instance filters and IMDS's top-level `ipv6`.
    let node6 = run(&c, &subnet, "m5.large", Some(1)).await;
    let d = c
        .describe_instances()
        .instance_ids(&node6)
        .send()
        .await
        .unwrap();
    let i = &d.reservations()[0].instances()[0];
    let v6: Ipv6Addr = i.ipv6_address().unwrap().parse().unwrap();
    assert!(net.contains(u128::from(v6)));
    assert_eq!(
        i.network_interfaces()[0].ipv6_addresses()[0].ipv6_address(),
        Some(v6.to_string().as_str())
    );
    let d = c
        .describe_instances()
        .filters(filter("ipv6-address", &v6.to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(d.reservations().len(), 1);
    assert_eq!(imds_get(&srv, &node6, "ipv6").await, Some(v6.to_string()));
    let top = imds_get(&srv, &node6, "").await.unwrap();
    assert!(top.lines().any(|l| l == "ipv6"), "{top}");

    // Prefix delegation is a Nitro feature: a Xen type refuses /80s as it refuses /28s.
    let xen = run(&c, &subnet, "t2.medium", None).await;
    let (xen_eni, _) = primary_eni(&c, &xen).await;
    let e = c
        .assign_ipv6_addresses()
        .network_interface_id(&xen_eni)
        .ipv6_prefix_count(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    c.assign_ipv6_addresses()
        .network_interface_id(&xen_eni)
        .ipv6_address_count(1)
        .send()
        .await
        .unwrap();

    shared.with(|s| check_invariants(s.model())).unwrap();
    srv.shutdown();
}

#[tokio::test]
async fn many_prefixes_are_aligned_distinct_and_come_back_on_release() {
    let (shared, srv) = serve(SimConfig {
        seed: 5,
        ..Default::default()
    })
    .await;
    let c = client(&srv.ec2_url());
    let f = common::fixture(&c, "10.0.0.0/20", "m5.4xlarge").await;
    let mut enis = Vec::new();
    let mut all = std::collections::BTreeSet::new();
    for dev in 1..4 {
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
        c.attach_network_interface()
            .network_interface_id(&id)
            .instance_id(&f.instance)
            .device_index(dev)
            .send()
            .await
            .unwrap();
        let r = c
            .assign_ipv6_addresses()
            .network_interface_id(&id)
            .ipv6_prefix_count(10)
            .send()
            .await
            .unwrap();
        for p in r.assigned_ipv6_prefixes() {
            let b = block(p);
            assert_eq!((b.len, b.base & ((1 << 48) - 1)), (80, 0), "{p}");
            assert!(all.insert(b), "{p} handed out twice");
        }
        enis.push((id, r.assigned_ipv6_prefixes().to_vec()));
    }
    assert_eq!(all.len(), 30);
    shared.with(|s| check_invariants(s.model())).unwrap();
    // A released /80 can be asked for by name again, on another ENI.
    let (from, prefixes) = &enis[0];
    c.unassign_ipv6_addresses()
        .network_interface_id(from)
        .set_ipv6_prefixes(Some(prefixes.clone()))
        .send()
        .await
        .unwrap();
    let r = c
        .assign_ipv6_addresses()
        .network_interface_id(&enis[1].0)
        .ipv6_prefixes(&prefixes[0])
        .send()
        .await;
    // m5.4xlarge allows 30 IPv6 slots per ENI: the 11th /80 on enis[1] fits.
    let r = r.unwrap();
    assert_eq!(r.assigned_ipv6_prefixes(), [prefixes[0].clone()]);
    shared.with(|s| check_invariants(s.model())).unwrap();
    srv.shutdown();
}
