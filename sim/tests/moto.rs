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
        // 6. Trunk ENIs: the type is kept and AssociateTrunkInterface is served (moto: every
        //    ENI is `interface`, and the trunk calls are not implemented).
        let trunk = c
            .create_network_interface()
            .subnet_id(&f.subnet)
            .interface_type(aws_sdk_ec2::types::NetworkInterfaceCreationType::Trunk)
            .send()
            .await
            .unwrap();
        let trunk = trunk.network_interface().unwrap();
        assert_eq!(
            trunk.interface_type().map(|t| t.as_str()),
            Some(if ours { "trunk" } else { "interface" }),
            "{name}: trunk type"
        );
        let r = c
            .associate_trunk_interface()
            .branch_interface_id(&eni4)
            .trunk_interface_id(trunk.network_interface_id().unwrap())
            .vlan_id(1)
            .send()
            .await;
        if ours {
            // Served; refused here because the trunk is not attached.
            assert_eq!(code(&r.unwrap_err()), "IncorrectState");
        } else {
            assert!(
                r.is_err(),
                "moto serves AssociateTrunkInterface now: update this test"
            );
        }
    }
    srv.shutdown();
}

/// The `n`th /64 of the /56 `b` (`"2600:…::/56"`), as text.
fn nth64_of(b: &str, n: u128) -> String {
    let base: std::net::Ipv6Addr = b.split('/').next().unwrap().parse().unwrap();
    format!(
        "{}/64",
        std::net::Ipv6Addr::from(u128::from(base) | (n << 64))
    )
}

fn in_block(addr: &str, block: &str) -> bool {
    let (net, len) = block.split_once('/').unwrap();
    let net = u128::from(net.parse::<std::net::Ipv6Addr>().unwrap());
    let len: u32 = len.parse().unwrap();
    let a = u128::from(addr.parse::<std::net::Ipv6Addr>().unwrap());
    (a ^ net) >> (128 - len) == 0
}

/// The IPv6 calls moto implements (AssociateVpcCidrBlock, DescribeVpcs, CreateSubnet with a
/// /64, AssociateSubnetCidrBlock, CreateNetworkInterface and AssignIpv6Addresses with an address
/// count, UnassignIpv6Addresses of addresses), observed where moto and EC2 agree.
async fn observe_ipv6(c: &aws_sdk_ec2::Client) -> Vec<String> {
    let mut o = Vec::new();
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
    let a = c
        .associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .amazon_provided_ipv6_cidr_block(true)
        .send()
        .await
        .unwrap();
    let assoc = a.ipv6_cidr_block_association().unwrap();
    let v56 = assoc.ipv6_cidr_block().unwrap().to_owned();
    o.push(format!(
        "vpc association: /56 {} state {:?} pool {:?} id prefix {} vpc ok {}",
        v56.ends_with("/56"),
        assoc
            .ipv6_cidr_block_state()
            .and_then(|s| s.state())
            .map(|s| s.as_str().to_owned()),
        assoc.ipv6_pool(),
        assoc
            .association_id()
            .is_some_and(|i| i.starts_with("vpc-cidr-assoc-")),
        a.vpc_id() == Some(vpc.as_str())
    ));
    let e = c
        .associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .amazon_provided_ipv6_cidr_block(true)
        .send()
        .await
        .unwrap_err();
    o.push(format!("second /56: {}", code(&e)));
    let d = c.describe_vpcs().vpc_ids(&vpc).send().await.unwrap();
    let set = d.vpcs()[0].ipv6_cidr_block_association_set();
    o.push(format!(
        "describe vpc: {} block same {}",
        set.len(),
        set.first().and_then(|s| s.ipv6_cidr_block()) == Some(v56.as_str())
    ));
    let d = c
        .describe_vpcs()
        .filters(filter("ipv6-cidr-block-association.ipv6-cidr-block", &v56))
        .send()
        .await
        .unwrap();
    o.push(format!("vpc filter by /56: {}", d.vpcs().len()));
    let s64 = nth64_of(&v56, 1);
    let subnet = c
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.1.0/24")
        .ipv6_cidr_block(&s64)
        .availability_zone("us-west-2a")
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_owned();
    let d = c
        .describe_subnets()
        .subnet_ids(&subnet)
        .send()
        .await
        .unwrap();
    o.push(format!(
        "subnet /64 listed: {}",
        d.subnets()[0]
            .ipv6_cidr_block_association_set()
            .iter()
            .any(|a| a.ipv6_cidr_block() == Some(s64.as_str()))
    ));
    let s2 = c
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.2.0/24")
        .availability_zone("us-west-2a")
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_owned();
    let s2_64 = nth64_of(&v56, 2);
    let a = c
        .associate_subnet_cidr_block()
        .subnet_id(&s2)
        .ipv6_cidr_block(&s2_64)
        .send()
        .await
        .unwrap();
    o.push(format!(
        "subnet association: subnet ok {} block same {} id prefix {}",
        a.subnet_id() == Some(s2.as_str()),
        a.ipv6_cidr_block_association()
            .and_then(|x| x.ipv6_cidr_block())
            == Some(s2_64.as_str()),
        a.ipv6_cidr_block_association()
            .and_then(|x| x.association_id())
            .is_some_and(|i| i.starts_with("subnet-cidr-assoc-"))
    ));
    let e = c
        .create_network_interface()
        .subnet_id(&subnet)
        .ipv6_address_count(2)
        .send()
        .await
        .unwrap();
    let e = e.network_interface().unwrap();
    let eni = e.network_interface_id().unwrap().to_owned();
    let v6: Vec<String> = e
        .ipv6_addresses()
        .iter()
        .filter_map(|a| a.ipv6_address().map(str::to_owned))
        .collect();
    o.push(format!(
        "eni with 2 IPv6: {} in /64 {} distinct {}",
        v6.len(),
        v6.iter().all(|a| in_block(a, &s64)),
        v6.first() != v6.get(1)
    ));
    let fresh = c
        .create_network_interface()
        .subnet_id(&s2)
        .send()
        .await
        .unwrap()
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    let r = c
        .assign_ipv6_addresses()
        .network_interface_id(&fresh)
        .ipv6_address_count(1)
        .send()
        .await
        .unwrap();
    let got: Vec<String> = r.assigned_ipv6_addresses().to_vec();
    o.push(format!(
        "assign 1 to a fresh ENI: {} in its /64 {} eni ok {}",
        got.len(),
        got.iter().all(|a| in_block(a, &s2_64)),
        r.network_interface_id() == Some(fresh.as_str())
    ));
    let r = c
        .unassign_ipv6_addresses()
        .network_interface_id(&eni)
        .ipv6_addresses(&v6[0])
        .send()
        .await
        .unwrap();
    o.push(format!(
        "unassign one: {:?}",
        r.unassigned_ipv6_addresses() == [v6[0].clone()]
    ));
    let d = c
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap();
    let left: Vec<&str> = d.network_interfaces()[0]
        .ipv6_addresses()
        .iter()
        .filter_map(|a| a.ipv6_address())
        .collect();
    o.push(format!("left on the ENI: {:?}", left == [v6[1].as_str()]));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_calls_give_the_same_shapes_and_error_codes_as_moto() {
    let Some(moto) = MotoServer::for_test("moto IPv6 cross-check") else {
        return;
    };
    let (_shared, srv) = serve(SimConfig::default()).await;
    let ours = observe_ipv6(&client(&srv.ec2_url())).await;
    let theirs = observe_ipv6(&client(moto.url())).await;
    eprintln!("IPv6 observations (simulator):\n{}", ours.join("\n"));
    assert_eq!(ours, theirs, "simulator vs moto");
    srv.shutdown();
}

/// Where EC2 (and so the simulator) differs from moto in IPv6. Each branch pins moto's
/// behaviour, so a moto upgrade that fixes one shows up here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliberate_ipv6_differences_from_moto() {
    let Some(moto) = MotoServer::for_test("moto IPv6 cross-check") else {
        return;
    };
    let (_shared, srv) = serve(SimConfig::default()).await;
    for (name, c) in [
        ("sim", client(&srv.ec2_url())),
        ("moto", client(moto.url())),
    ] {
        let ours = name == "sim";
        let f = common::fixture(&c, "10.0.3.0/24", "t3.small").await;
        let mk = |subnet: String| {
            let c = c.clone();
            async move {
                c.create_network_interface()
                    .subnet_id(subnet)
                    .send()
                    .await
                    .unwrap()
                    .network_interface()
                    .unwrap()
                    .network_interface_id()
                    .unwrap()
                    .to_owned()
            }
        };
        // 1. Ipv6PrefixCount assigns an aligned /80 (moto: accepted and ignored).
        let eni = mk(f.subnet.clone()).await;
        let r = c
            .assign_ipv6_addresses()
            .network_interface_id(&eni)
            .ipv6_prefix_count(1)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.assigned_ipv6_prefixes().len(),
            usize::from(ours),
            "{name}: /80 prefixes"
        );
        // 2. AssignIpv6Addresses answers only what it assigned (moto: every address).
        c.assign_ipv6_addresses()
            .network_interface_id(&eni)
            .ipv6_address_count(1)
            .send()
            .await
            .unwrap();
        let r = c
            .assign_ipv6_addresses()
            .network_interface_id(&eni)
            .ipv6_address_count(1)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.assigned_ipv6_addresses().len(),
            if ours { 1 } else { 2 },
            "{name}: assign answer"
        );
        // 3. The per-ENI IPv6 limit holds (t3.small: 4 once attached; unattached: 50; moto:
        //    none). 1 /80 + 2 addresses, 2 more is over once attached.
        c.attach_network_interface()
            .network_interface_id(&eni)
            .instance_id(&f.instance)
            .device_index(1)
            .send()
            .await
            .unwrap();
        let r = c
            .assign_ipv6_addresses()
            .network_interface_id(&eni)
            .ipv6_address_count(2)
            .send()
            .await;
        if ours {
            assert_eq!(code(&r.unwrap_err()), "PrivateIpAddressLimitExceeded");
        } else {
            assert!(r.is_ok(), "moto enforces IPv6 limits now: update this test");
        }
        // 4. The ipv6-addresses.ipv6-address filter of DescribeNetworkInterfaces and the
        //    ipv6-cidr-block-association.ipv6-cidr-block filter of DescribeSubnets work
        //    (moto: HTTP 500).
        let d = c
            .describe_network_interfaces()
            .network_interface_ids(&eni)
            .send()
            .await
            .unwrap();
        let a = d.network_interfaces()[0].ipv6_addresses()[0]
            .ipv6_address()
            .unwrap()
            .to_owned();
        let r = c
            .describe_network_interfaces()
            .filters(filter("ipv6-addresses.ipv6-address", &a))
            .send()
            .await;
        if ours {
            assert_eq!(r.unwrap().network_interfaces().len(), 1);
        } else {
            assert!(
                r.is_err(),
                "moto filters ENIs by IPv6 address now: update this test"
            );
        }
        let d = c
            .describe_subnets()
            .subnet_ids(&f.subnet)
            .send()
            .await
            .unwrap();
        let b64 = d.subnets()[0].ipv6_cidr_block_association_set()[0]
            .ipv6_cidr_block()
            .unwrap()
            .to_owned();
        let r = c
            .describe_subnets()
            .filters(filter("ipv6-cidr-block-association.ipv6-cidr-block", &b64))
            .send()
            .await;
        if ours {
            assert_eq!(r.unwrap().subnets().len(), 1);
        } else {
            assert!(
                r.is_err(),
                "moto filters subnets by IPv6 block now: update this test"
            );
        }
        // 5. A /64 that overlaps another subnet's, or lies outside the VPC's /56, is refused
        //    (moto: accepted).
        let r = c
            .create_subnet()
            .vpc_id(&f.vpc)
            .cidr_block("10.0.4.0/24")
            .ipv6_cidr_block(&b64)
            .send()
            .await;
        if ours {
            assert_eq!(code(&r.unwrap_err()), "InvalidSubnet.Conflict");
        } else {
            assert!(r.is_ok(), "moto checks /64 overlaps now: update this test");
        }
        let r = c
            .create_subnet()
            .vpc_id(&f.vpc)
            .cidr_block("10.0.5.0/24")
            .ipv6_cidr_block("2001:db8:0:1::/64")
            .send()
            .await;
        if ours {
            assert_eq!(code(&r.unwrap_err()), "InvalidSubnet.Range");
        } else {
            assert!(r.is_ok(), "moto checks the /56 now: update this test");
        }
        // 6. An address from a subnet without IPv6 is an EC2 error (moto: HTTP 500).
        let v4only = c
            .create_subnet()
            .vpc_id(&f.vpc)
            .cidr_block("10.0.6.0/24")
            .availability_zone("us-west-2a")
            .send()
            .await
            .unwrap()
            .subnet()
            .unwrap()
            .subnet_id()
            .unwrap()
            .to_owned();
        let e4 = mk(v4only).await;
        let r = c
            .assign_ipv6_addresses()
            .network_interface_id(&e4)
            .ipv6_address_count(1)
            .send()
            .await;
        let e = r.unwrap_err();
        if ours {
            assert_eq!(code(&e), "InvalidParameterValue");
        } else {
            assert_eq!(
                common::status(&e),
                500,
                "moto answers IPv6 in an IPv4-only subnet properly now: update this test"
            );
        }
    }
    srv.shutdown();
}
