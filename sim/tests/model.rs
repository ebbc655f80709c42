//! Behaviour of the pure model through the in-process simulator: AWS's rules, one per test,
//! and property tests over random call sequences.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use proptest::prelude::*;
use vpc_sim::api::{CreateEni, EniAttribute, Filter, Page, Reply, Request, RunInstances};
use vpc_sim::hooks::{HookEvent, Recorder};
use vpc_sim::imds::InstanceMeta;
use vpc_sim::model::{check_invariants, EniStatus};
use vpc_sim::sim::{SimConfig, Simulator};

struct World {
    sim: Simulator,
    subnet: String,
    instance: String,
}

fn world(cidr: &str, subnet: &str, itype: &str) -> World {
    let mut sim = Simulator::new(SimConfig {
        seed: 42,
        ..Default::default()
    });
    let Reply::Vpc(v) = sim
        .call(
            0,
            Request::CreateVpc {
                cidr: cidr.parse().unwrap(),
                amazon_ipv6: true,
                tags: Default::default(),
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let v6 = v.ipv6_cidr.unwrap();
    let Reply::Subnet(s) = sim
        .call(
            0,
            Request::CreateSubnet {
                vpc_id: v.id.clone(),
                cidr: subnet.parse().unwrap(),
                availability_zone: Some("us-west-2a".into()),
                ipv6_cidr: Some(
                    vpc_sim::ipv6::Ipv6Block::new(v6.base | (1u128 << 64), 64).unwrap(),
                ),
                tags: Default::default(),
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let instance = launch(&mut sim, &s.id, itype);
    World {
        sim,
        subnet: s.id,
        instance,
    }
}

fn launch(sim: &mut Simulator, subnet: &str, itype: &str) -> String {
    let r = sim
        .call(
            0,
            Request::RunInstances(RunInstances {
                image_id: "ami-12345678".into(),
                instance_type: itype.into(),
                min_count: 1,
                max_count: 1,
                subnet_id: Some(subnet.into()),
                ..Default::default()
            }),
        )
        .unwrap();
    let Reply::Reservation(r) = r else { panic!() };
    r.instances[0].0.id.clone()
}

fn create(
    sim: &mut Simulator,
    subnet: &str,
    f: impl FnOnce(&mut CreateEni),
) -> Result<String, String> {
    let mut c = CreateEni {
        subnet_id: subnet.into(),
        ..Default::default()
    };
    f(&mut c);
    match sim.call(0, Request::CreateNetworkInterface(c)) {
        Ok(Reply::NetworkInterface { eni, .. }) => Ok(eni.id),
        Ok(_) => panic!(),
        Err(e) => Err(e.code),
    }
}

fn attach(sim: &mut Simulator, eni: &str, inst: &str, dev: i64) -> Result<String, String> {
    match sim.call(
        0,
        Request::AttachNetworkInterface {
            eni_id: eni.into(),
            instance_id: inst.into(),
            device_index: dev,
            network_card_index: None,
        },
    ) {
        Ok(Reply::Attached { attachment_id, .. }) => Ok(attachment_id),
        Ok(_) => panic!(),
        Err(e) => Err(e.code),
    }
}

fn assign(
    sim: &mut Simulator,
    eni: &str,
    count: Option<i64>,
    prefixes: Option<i64>,
) -> Result<Reply, String> {
    sim.call(
        0,
        Request::AssignPrivateIpAddresses {
            eni_id: eni.into(),
            count,
            addresses: vec![],
            prefix_count: prefixes,
            prefixes: vec![],
        },
    )
    .map_err(|e| e.code)
}

#[test]
fn eni_limit_of_the_instance_type_is_enforced_on_attach() {
    // m5.large: 3 ENIs.
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    for dev in 1..=2 {
        let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
        attach(&mut w.sim, &e, &w.instance, dev).unwrap();
    }
    let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    assert_eq!(
        attach(&mut w.sim, &e, &w.instance, 3),
        Err("AttachmentLimitExceeded".into())
    );
    // Nothing changed: the ENI is still available.
    assert_eq!(w.sim.model().enis[&e].status, EniStatus::Available);
}

#[test]
fn device_index_clash_and_in_use_eni_are_rejected() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    let a = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    let b = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &a, &w.instance, 1).unwrap();
    assert_eq!(
        attach(&mut w.sim, &b, &w.instance, 1),
        Err("InvalidParameterValue".into())
    );
    assert_eq!(
        attach(&mut w.sim, &a, &w.instance, 2),
        Err("InvalidNetworkInterface.InUse".into())
    );
    let err = w
        .sim
        .call(0, Request::DeleteNetworkInterface { eni_id: a.clone() })
        .unwrap_err();
    assert_eq!(err.code, "InvalidNetworkInterface.InUse");
}

#[test]
fn ip_limit_per_eni_counts_the_primary_and_prefixes() {
    // m5.large: 10 IPv4 per ENI including the primary.
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &e, &w.instance, 1).unwrap();
    assert_eq!(
        assign(&mut w.sim, &e, Some(10), None).unwrap_err(),
        "PrivateIpAddressLimitExceeded"
    );
    let Reply::AssignedPrivate { addresses, .. } = assign(&mut w.sim, &e, Some(9), None).unwrap()
    else {
        panic!()
    };
    // Only what was assigned is returned, never the primary.
    assert_eq!(addresses.len(), 9);
    assert!(!addresses.contains(&w.sim.model().enis[&e].primary_ip));
    assert_eq!(
        assign(&mut w.sim, &e, Some(1), None).unwrap_err(),
        "PrivateIpAddressLimitExceeded"
    );
    let p = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &p, &w.instance, 2).unwrap();
    assert!(assign(&mut w.sim, &p, None, Some(9)).is_ok());
    assert_eq!(
        assign(&mut w.sim, &p, None, Some(1)).unwrap_err(),
        "PrivateIpAddressLimitExceeded"
    );
    check_invariants(w.sim.model()).unwrap();
}

#[test]
fn small_subnet_runs_out_of_addresses_without_overallocating() {
    // A /28 has 11 usable addresses; the instance's primary takes one.
    let mut w = world("10.0.0.0/16", "10.0.0.0/28", "m5.4xlarge");
    let e = create(&mut w.sim, &w.subnet, |c| c.secondary_count = Some(9)).unwrap();
    assert_eq!(
        create(&mut w.sim, &w.subnet, |_| {}),
        Err("InsufficientFreeAddressesInSubnet".into())
    );
    attach(&mut w.sim, &e, &w.instance, 1).unwrap();
    assert_eq!(
        assign(&mut w.sim, &e, Some(1), None).unwrap_err(),
        "InsufficientFreeAddressesInSubnet"
    );
    assert_eq!(
        w.sim
            .model()
            .subnet_view(&w.subnet)
            .unwrap()
            .available_ip_address_count,
        0
    );
    check_invariants(w.sim.model()).unwrap();
}

#[test]
fn fragmented_subnet_gives_insufficient_cidr_blocks_while_addresses_remain() {
    // /24: 14 inner /28 blocks. Scatter single addresses until no block is wholly free.
    let mut w = world("10.0.0.0/16", "10.0.0.0/24", "m5.24xlarge");
    let mut enis = Vec::new();
    for b in 1..15u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + b * 16 + 5);
        if let Ok(e) = create(&mut w.sim, &w.subnet, |c| c.private_ip = Some(ip)) {
            enis.push(e);
        }
    }
    let free = w.sim.model().subnet_view(&w.subnet).unwrap();
    assert_eq!(free.free_prefix_blocks, 0);
    assert!(free.available_ip_address_count > 200);
    let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &e, &w.instance, 1).unwrap();
    assert_eq!(
        assign(&mut w.sim, &e, None, Some(1)).unwrap_err(),
        "InsufficientCidrBlocks"
    );
    assert!(assign(&mut w.sim, &e, Some(1), None).is_ok());
}

#[test]
fn prefixes_are_aligned_and_never_overlap_addresses() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/22", "m5.24xlarge");
    let e = create(&mut w.sim, &w.subnet, |c| c.ipv4_prefix_count = Some(5)).unwrap();
    attach(&mut w.sim, &e, &w.instance, 1).unwrap();
    let Reply::AssignedPrivate {
        prefixes,
        addresses,
        ..
    } = assign(&mut w.sim, &e, None, Some(10)).unwrap()
    else {
        panic!()
    };
    assert!(addresses.is_empty());
    assert_eq!(prefixes.len(), 10);
    for p in &prefixes {
        assert_eq!(p.prefix_len(), 28);
        assert_eq!(p.base() % 16, 0);
    }
    check_invariants(w.sim.model()).unwrap();
}

#[test]
fn prefix_delegation_is_refused_on_xen_instances() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/22", "t2.medium");
    let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &e, &w.instance, 1).unwrap();
    assert_eq!(
        assign(&mut w.sim, &e, None, Some(1)).unwrap_err(),
        "InvalidParameterValue"
    );
}

#[test]
fn terminate_deletes_delete_on_termination_enis_and_leaks_the_others() {
    let rec = Recorder::new();
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    w.sim.set_hooks(Box::new(rec.clone()));
    let keep = create(&mut w.sim, &w.subnet, |c| {
        c.description = "aws-K8S-i".into()
    })
    .unwrap();
    let gone = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &keep, &w.instance, 1).unwrap();
    let att = attach(&mut w.sim, &gone, &w.instance, 2).unwrap();
    w.sim
        .call(
            0,
            Request::ModifyNetworkInterfaceAttribute {
                eni_id: gone.clone(),
                change: EniAttribute::DeleteOnTermination {
                    attachment_id: att,
                    value: true,
                },
            },
        )
        .unwrap();
    let primary = w.sim.model().instances[&w.instance].primary_eni.clone();
    w.sim
        .call(
            0,
            Request::TerminateInstances {
                ids: vec![w.instance.clone()],
            },
        )
        .unwrap();
    let m = w.sim.model();
    assert!(!m.enis.contains_key(&gone) && !m.enis.contains_key(&primary));
    assert_eq!(m.enis[&keep].status, EniStatus::Available);
    assert!(m.enis[&keep].attachment.is_none());
    // The leaked ENI is found with the filters ipamd's cleanup uses.
    let r = w
        .sim
        .call(
            0,
            Request::DescribeNetworkInterfaces {
                ids: vec![],
                filters: vec![Filter {
                    name: "status".into(),
                    values: vec!["available".into()],
                }],
                page: Page::default(),
            },
        )
        .unwrap();
    let Reply::NetworkInterfaces { enis, .. } = r else {
        panic!()
    };
    assert_eq!(
        enis.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![keep.clone()]
    );
    let detaches = rec
        .events()
        .iter()
        .filter(|e| matches!(e, HookEvent::Detached(_)))
        .count();
    assert_eq!(detaches, 3);
    check_invariants(w.sim.model()).unwrap();
}

#[test]
fn primary_eni_cannot_be_detached_and_detach_then_delete_works() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    let primary = w.sim.model().instances[&w.instance].primary_eni.clone();
    let patt = w.sim.model().enis[&primary].attachment.clone().unwrap().id;
    let e = w
        .sim
        .call(
            0,
            Request::DetachNetworkInterface {
                attachment_id: patt,
                force: false,
            },
        )
        .unwrap_err();
    assert_eq!(e.code, "OperationNotPermitted");
    let eni = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    let att = attach(&mut w.sim, &eni, &w.instance, 1).unwrap();
    w.sim
        .call(
            0,
            Request::DetachNetworkInterface {
                attachment_id: att,
                force: false,
            },
        )
        .unwrap();
    w.sim
        .call(
            0,
            Request::DeleteNetworkInterface {
                eni_id: eni.clone(),
            },
        )
        .unwrap();
    let e = w
        .sim
        .call(0, Request::DeleteNetworkInterface { eni_id: eni })
        .unwrap_err();
    assert_eq!(e.code, "InvalidNetworkInterfaceID.NotFound");
}

#[test]
fn detach_delay_keeps_the_eni_in_use_until_it_completes() {
    let mut sim = Simulator::new(SimConfig {
        seed: 1,
        detach_delay_ms: 2000,
        ..Default::default()
    });
    let Reply::Vpc(v) = sim
        .call(
            0,
            Request::CreateVpc {
                cidr: "10.1.0.0/16".parse().unwrap(),
                amazon_ipv6: false,
                tags: Default::default(),
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let Reply::Subnet(s) = sim
        .call(
            0,
            Request::CreateSubnet {
                vpc_id: v.id,
                cidr: "10.1.0.0/24".parse().unwrap(),
                availability_zone: None,
                ipv6_cidr: None,
                tags: Default::default(),
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let i = launch(&mut sim, &s.id, "m5.large");
    let e = create(&mut sim, &s.id, |_| {}).unwrap();
    let att = attach(&mut sim, &e, &i, 1).unwrap();
    sim.call(
        100,
        Request::DetachNetworkInterface {
            attachment_id: att,
            force: false,
        },
    )
    .unwrap();
    let err = sim
        .call(1000, Request::DeleteNetworkInterface { eni_id: e.clone() })
        .unwrap_err();
    assert_eq!(err.code, "InvalidNetworkInterface.InUse");
    sim.call(2100, Request::DeleteNetworkInterface { eni_id: e })
        .unwrap();
}

#[test]
fn unassign_returns_addresses_and_refuses_the_primary_or_foreign_ones() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    let e = create(&mut w.sim, &w.subnet, |c| c.secondary_count = Some(3)).unwrap();
    let eni = w.sim.model().enis[&e].clone();
    let unassign = |sim: &mut Simulator, a: Vec<Ipv4Addr>| {
        sim.call(
            0,
            Request::UnassignPrivateIpAddresses {
                eni_id: e.clone(),
                addresses: a,
                prefixes: vec![],
            },
        )
    };
    assert_eq!(
        unassign(&mut w.sim, vec![eni.primary_ip]).unwrap_err().code,
        "InvalidParameterValue"
    );
    assert_eq!(
        unassign(&mut w.sim, vec![Ipv4Addr::new(10, 0, 9, 9)])
            .unwrap_err()
            .code,
        "InvalidParameterValue"
    );
    let before = w
        .sim
        .model()
        .subnet_view(&w.subnet)
        .unwrap()
        .available_ip_address_count;
    unassign(&mut w.sim, eni.secondary_ips[..2].to_vec()).unwrap();
    let after = w
        .sim
        .model()
        .subnet_view(&w.subnet)
        .unwrap()
        .available_ip_address_count;
    assert_eq!(after, before + 2);
    assert_eq!(
        w.sim.model().enis[&e].secondary_ips,
        eni.secondary_ips[2..].to_vec()
    );
}

#[test]
fn ipv6_addresses_and_prefixes_are_unique_and_limited() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    attach(&mut w.sim, &e, &w.instance, 1).unwrap();
    let r = w
        .sim
        .call(
            0,
            Request::AssignIpv6Addresses {
                eni_id: e.clone(),
                count: None,
                addresses: vec![],
                prefix_count: Some(1),
                prefixes: vec![],
            },
        )
        .unwrap();
    let Reply::AssignedIpv6 { prefixes, .. } = r else {
        panic!()
    };
    assert_eq!(prefixes[0].len, 80);
    // m5.large: 10 IPv6 per ENI.
    let err = w
        .sim
        .call(
            0,
            Request::AssignIpv6Addresses {
                eni_id: e.clone(),
                count: Some(10),
                addresses: vec![],
                prefix_count: None,
                prefixes: vec![],
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "PrivateIpAddressLimitExceeded");
    let r = w
        .sim
        .call(
            0,
            Request::UnassignIpv6Addresses {
                eni_id: e.clone(),
                addresses: vec![],
                prefixes: prefixes.clone(),
            },
        )
        .unwrap();
    assert_eq!(
        r,
        Reply::UnassignedIpv6 {
            eni_id: e,
            addresses: vec![],
            prefixes
        }
    );
}

#[test]
fn describe_paginates_with_tokens_and_validates_max_results() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    for _ in 0..12 {
        create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    }
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let r = w
            .sim
            .call(
                0,
                Request::DescribeNetworkInterfaces {
                    ids: vec![],
                    filters: vec![],
                    page: Page {
                        max_results: Some(5),
                        next_token: token.clone(),
                    },
                },
            )
            .unwrap();
        let Reply::NetworkInterfaces { enis, next_token } = r else {
            panic!()
        };
        assert!(enis.len() <= 5);
        seen.extend(enis.into_iter().map(|e| e.id));
        token = next_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 13);
    seen.dedup();
    assert_eq!(seen.len(), 13);
    let err = w
        .sim
        .call(
            0,
            Request::DescribeNetworkInterfaces {
                ids: vec![],
                filters: vec![],
                page: Page {
                    max_results: Some(2),
                    next_token: None,
                },
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterValue");
    let err = w
        .sim
        .call(
            0,
            Request::DescribeNetworkInterfaces {
                ids: vec![],
                filters: vec![Filter {
                    name: "bogus".into(),
                    values: vec![],
                }],
                page: Page::default(),
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterValue");
}

#[test]
fn client_token_makes_create_idempotent() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    let a = create(&mut w.sim, &w.subnet, |c| {
        c.client_token = Some("tok".into())
    })
    .unwrap();
    let b = create(&mut w.sim, &w.subnet, |c| {
        c.client_token = Some("tok".into())
    })
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(w.sim.model().enis.len(), 2);
}

#[test]
fn metadata_lags_ec2_by_the_propagation_delay() {
    let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
    w.sim.set_imds_delay(1000);
    let tok = w.sim.imds_token(0, Some("60")).body;
    let macs = |sim: &mut Simulator, t: u64| {
        sim.imds_get(t, None, Some(&tok), "meta-data/network/interfaces/macs/")
            .body
            .lines()
            .count()
    };
    assert_eq!(macs(&mut w.sim, 0), 1);
    let e = create(&mut w.sim, &w.subnet, |_| {}).unwrap();
    let mac = w.sim.model().enis[&e].mac.clone();
    w.sim
        .call(
            5000,
            Request::AttachNetworkInterface {
                eni_id: e,
                instance_id: w.instance.clone(),
                device_index: 1,
                network_card_index: None,
            },
        )
        .unwrap();
    assert_eq!(macs(&mut w.sim, 5500), 1);
    assert_eq!(macs(&mut w.sim, 6000), 2);
    let dev = w.sim.imds_get(
        6000,
        Some(&w.instance),
        Some(&tok),
        &format!("meta-data/network/interfaces/macs/{mac}/device-number"),
    );
    assert_eq!((dev.status, dev.body.as_str()), (200, "1"));
    assert_eq!(
        w.sim
            .imds_get(6000, None, None, "meta-data/instance-id")
            .status,
        401
    );
    let meta = InstanceMeta::of(w.sim.model(), &w.instance).unwrap();
    assert_eq!(
        meta.get("meta-data/instance-type").as_deref(),
        Some("m5.large")
    );
}

#[test]
fn same_seed_same_calls_same_state() {
    let run = || {
        let mut w = world("10.0.0.0/16", "10.0.0.0/20", "m5.large");
        let e = create(&mut w.sim, &w.subnet, |c| c.secondary_count = Some(4)).unwrap();
        serde_json::to_string(&w.sim.model().enis[&e]).unwrap()
    };
    assert_eq!(run(), run());
}

#[derive(Debug, Clone)]
enum Op {
    Create { secondaries: u8, prefixes: u8 },
    Attach { eni: usize, inst: usize, dev: u8 },
    Detach { eni: usize },
    Delete { eni: usize },
    Assign { eni: usize, n: u8, prefix: bool },
    Unassign { eni: usize, k: u8 },
    AssignV6 { eni: usize, n: u8, prefix: bool },
    UnassignV6 { eni: usize, k: u8 },
    Terminate { inst: usize },
    Launch { ipv6: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u8..3).prop_map(|(secondaries, prefixes)| Op::Create {
            secondaries: if prefixes > 0 { 0 } else { secondaries },
            prefixes
        }),
        (0usize..64, 0usize..4, 0u8..5).prop_map(|(eni, inst, dev)| Op::Attach { eni, inst, dev }),
        (0usize..64).prop_map(|eni| Op::Detach { eni }),
        (0usize..64).prop_map(|eni| Op::Delete { eni }),
        (0usize..64, 1u8..12, any::<bool>()).prop_map(|(eni, n, prefix)| Op::Assign {
            eni,
            n,
            prefix
        }),
        (0usize..64, 0u8..8).prop_map(|(eni, k)| Op::Unassign { eni, k }),
        (0usize..64, 1u8..8, any::<bool>()).prop_map(|(eni, n, prefix)| Op::AssignV6 {
            eni,
            n,
            prefix
        }),
        (0usize..64, 0u8..4).prop_map(|(eni, k)| Op::UnassignV6 { eni, k }),
        (0usize..4).prop_map(|inst| Op::Terminate { inst }),
        any::<bool>().prop_map(|ipv6| Op::Launch { ipv6 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_call_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..120)) {
        // A /24 so that exhaustion and fragmentation happen; t3.medium (3 ENIs, 6 IPs).
        let mut w = world("10.9.0.0/16", "10.9.0.0/24", "t3.medium");
        let mut instances = vec![w.instance.clone()];
        for (t, op) in ops.into_iter().enumerate() {
            let now = t as u64;
            let ids: Vec<String> = w.sim.model().enis.keys().cloned().collect();
            let pick = |i: usize| ids.get(i % ids.len().max(1)).cloned().unwrap_or_default();
            let before = serde_json::to_string(w.sim.model()).unwrap();
            let r = match op {
                Op::Create { secondaries, prefixes } => w.sim.call(now, Request::CreateNetworkInterface(CreateEni {
                    subnet_id: w.subnet.clone(),
                    secondary_count: (secondaries > 0).then_some(i64::from(secondaries)),
                    ipv4_prefix_count: (prefixes > 0).then_some(i64::from(prefixes)),
                    ..Default::default()
                })),
                Op::Attach { eni, inst, dev } => w.sim.call(now, Request::AttachNetworkInterface {
                    eni_id: pick(eni),
                    instance_id: instances[inst % instances.len()].clone(),
                    device_index: i64::from(dev),
                    network_card_index: None,
                }),
                Op::Detach { eni } => {
                    let att = w.sim.model().enis.get(&pick(eni)).and_then(|e| e.attachment.clone());
                    match att {
                        Some(a) => w.sim.call(now, Request::DetachNetworkInterface { attachment_id: a.id, force: false }),
                        None => continue,
                    }
                }
                Op::Delete { eni } => w.sim.call(now, Request::DeleteNetworkInterface { eni_id: pick(eni) }),
                Op::Assign { eni, n, prefix } => w.sim.call(now, Request::AssignPrivateIpAddresses {
                    eni_id: pick(eni),
                    count: (!prefix).then_some(i64::from(n)),
                    addresses: vec![],
                    prefix_count: prefix.then_some(i64::from(n % 4 + 1)),
                    prefixes: vec![],
                }),
                Op::Unassign { eni, k } => {
                    let Some(e) = w.sim.model().enis.get(&pick(eni)).cloned() else { continue };
                    let addrs: Vec<Ipv4Addr> = e.secondary_ips.iter().take(usize::from(k)).copied().collect();
                    let pfx = if addrs.is_empty() { e.ipv4_prefixes.iter().take(1).copied().collect() } else { vec![] };
                    if addrs.is_empty() && pfx.is_empty() { continue; }
                    w.sim.call(now, Request::UnassignPrivateIpAddresses { eni_id: e.id, addresses: addrs, prefixes: pfx })
                }
                Op::AssignV6 { eni, n, prefix } => w.sim.call(now, Request::AssignIpv6Addresses {
                    eni_id: pick(eni),
                    count: (!prefix).then_some(i64::from(n)),
                    addresses: vec![],
                    prefix_count: prefix.then_some(i64::from(n % 3 + 1)),
                    prefixes: vec![],
                }),
                Op::UnassignV6 { eni, k } => {
                    let Some(e) = w.sim.model().enis.get(&pick(eni)).cloned() else { continue };
                    let addrs: Vec<std::net::Ipv6Addr> = e.ipv6_addresses.iter().take(usize::from(k)).copied().collect();
                    let pfx: Vec<_> = e.ipv6_prefixes.iter().take(usize::from(k % 2 + 1)).copied().collect();
                    if addrs.is_empty() && pfx.is_empty() { continue; }
                    w.sim.call(now, Request::UnassignIpv6Addresses { eni_id: e.id, addresses: addrs, prefixes: pfx })
                }
                Op::Terminate { inst } => w.sim.call(now, Request::TerminateInstances { ids: vec![instances[inst % instances.len()].clone()] }),
                Op::Launch { ipv6 } => {
                    match w.sim.call(now, Request::RunInstances(RunInstances {
                        image_id: "ami-1".into(), instance_type: "t3.medium".into(), min_count: 1, max_count: 1,
                        subnet_id: Some(w.subnet.clone()), ipv6_count: ipv6.then_some(1), ..Default::default()
                    })) {
                        Ok(Reply::Reservation(r)) => { instances.push(r.instances[0].0.id.clone()); Ok(Reply::Done) }
                        other => other,
                    }
                }
            };
            if r.is_err() {
                // A failed call changes nothing.
                prop_assert_eq!(&before, &serde_json::to_string(w.sim.model()).unwrap());
            }
            if let Err(e) = check_invariants(w.sim.model()) {
                prop_assert!(false, "after {:?}: {}", r, e);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum TrunkOp {
    Create {
        trunk: bool,
    },
    Attach {
        eni: usize,
        inst: usize,
        dev: u8,
    },
    Detach {
        eni: usize,
    },
    Delete {
        eni: usize,
    },
    Associate {
        branch: usize,
        trunk: usize,
        vlan: i64,
    },
    Disassociate {
        k: usize,
    },
    Groups {
        eni: usize,
    },
    Terminate {
        inst: usize,
    },
    Launch {
        trunking: bool,
    },
}

fn trunk_op() -> impl Strategy<Value = TrunkOp> {
    prop_oneof![
        3 => any::<bool>().prop_map(|trunk| TrunkOp::Create { trunk }),
        1 => (0usize..64, 0usize..4, 1u8..4)
            .prop_map(|(eni, inst, dev)| TrunkOp::Attach { eni, inst, dev }),
        1 => (0usize..64).prop_map(|eni| TrunkOp::Detach { eni }),
        1 => (0usize..64).prop_map(|eni| TrunkOp::Delete { eni }),
        5 => (0usize..64, 0usize..64, 0i64..14)
            .prop_map(|(branch, trunk, vlan)| TrunkOp::Associate { branch, trunk, vlan }),
        1 => (0usize..16).prop_map(|k| TrunkOp::Disassociate { k }),
        1 => (0usize..64).prop_map(|eni| TrunkOp::Groups { eni }),
        1 => (0usize..4).prop_map(|inst| TrunkOp::Terminate { inst }),
        1 => any::<bool>().prop_map(|trunking| TrunkOp::Launch { trunking }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_trunk_sequences_keep_every_invariant(ops in proptest::collection::vec(trunk_op(), 1..150)) {
        // m5.large: 3 ENIs, trunking compatible with 9 branches; t3.medium: no trunking.
        let mut w = world("10.8.0.0/16", "10.8.0.0/24", "m5.large");
        let mut instances = vec![w.instance.clone()];
        for (t, op) in ops.into_iter().enumerate() {
            let now = t as u64;
            let ids: Vec<String> = w.sim.model().enis.keys().cloned().collect();
            let pick = |i: usize| ids.get(i % ids.len().max(1)).cloned().unwrap_or_default();
            let mut before = serde_json::to_string(w.sim.model()).unwrap();
            let r = match op {
                TrunkOp::Create { trunk } => {
                    let r = w.sim.call(now, Request::CreateNetworkInterface(CreateEni {
                        subnet_id: w.subnet.clone(),
                        interface_type: trunk.then(|| "trunk".to_owned()),
                        ..Default::default()
                    }));
                    match r {
                        // A trunk goes straight onto the newest instance, at device 1.
                        Ok(Reply::NetworkInterface { eni, .. }) if trunk => {
                            before = serde_json::to_string(w.sim.model()).unwrap();
                            w.sim.call(now, Request::AttachNetworkInterface {
                                eni_id: eni.id,
                                instance_id: instances[instances.len() - 1].clone(),
                                device_index: 1,
                                network_card_index: None,
                            })
                        }
                        other => other,
                    }
                }
                TrunkOp::Attach { eni, inst, dev } => w.sim.call(now, Request::AttachNetworkInterface {
                    eni_id: pick(eni),
                    instance_id: instances[inst % instances.len()].clone(),
                    device_index: i64::from(dev),
                    network_card_index: None,
                }),
                TrunkOp::Detach { eni } => {
                    let att = w.sim.model().enis.get(&pick(eni)).and_then(|e| e.attachment.clone());
                    match att {
                        Some(a) => w.sim.call(now, Request::DetachNetworkInterface { attachment_id: a.id, force: false }),
                        None => continue,
                    }
                }
                TrunkOp::Delete { eni } => w.sim.call(now, Request::DeleteNetworkInterface { eni_id: pick(eni) }),
                TrunkOp::Associate { branch, trunk, vlan } => {
                    // Mostly a trunk and a non-trunk, sometimes any two ENIs (error paths).
                    let of = |want_trunk: bool, i: usize| {
                        let v: Vec<&String> = w.sim.model().enis.values()
                            .filter(|e| (e.interface_type == "trunk") == want_trunk)
                            .map(|e| &e.id)
                            .collect();
                        v.get(i % v.len().max(1)).map(|s| (*s).clone()).unwrap_or_else(|| pick(i))
                    };
                    let (b, tr) = if vlan % 5 == 4 { (pick(branch), pick(trunk)) } else { (of(false, branch), of(true, trunk)) };
                    w.sim.call(now, Request::AssociateTrunkInterface {
                        branch_id: b,
                        trunk_id: tr,
                        vlan_id: Some(vlan),
                        gre_key: None,
                        client_token: None,
                    })
                }
                TrunkOp::Disassociate { k } => {
                    let ids: Vec<String> = w.sim.model().trunk_associations.keys().cloned().collect();
                    let Some(id) = ids.get(k % ids.len().max(1)).cloned() else { continue };
                    w.sim.call(now, Request::DisassociateTrunkInterface { association_id: id, client_token: None })
                }
                TrunkOp::Groups { eni } => {
                    let Some(e) = w.sim.model().enis.get(&pick(eni)).cloned() else { continue };
                    w.sim.call(now, Request::ModifyNetworkInterfaceAttribute {
                        eni_id: e.id,
                        change: EniAttribute::Groups(e.groups.clone()),
                    })
                }
                TrunkOp::Terminate { inst } => w.sim.call(now, Request::TerminateInstances { ids: vec![instances[inst % instances.len()].clone()] }),
                TrunkOp::Launch { trunking } => {
                    let itype = if trunking { "m5.large" } else { "t3.medium" };
                    match w.sim.call(now, Request::RunInstances(RunInstances {
                        image_id: "ami-1".into(), instance_type: itype.into(), min_count: 1, max_count: 1,
                        subnet_id: Some(w.subnet.clone()), ..Default::default()
                    })) {
                        Ok(Reply::Reservation(r)) => { instances.push(r.instances[0].0.id.clone()); Ok(Reply::Done) }
                        other => other,
                    }
                }
            };
            if r.is_err() {
                // A failed call changes nothing.
                prop_assert_eq!(&before, &serde_json::to_string(w.sim.model()).unwrap());
            }
            if let Err(e) = check_invariants(w.sim.model()) {
                prop_assert!(false, "after {:?}: {}", r, e);
            }
            // Every associated branch is in use and typed branch; every other ENI is not.
            for e in w.sim.model().enis.values() {
                let associated = w.sim.model().trunk_associations.values().any(|a| a.branch_id == e.id);
                prop_assert_eq!(associated, e.interface_type == "branch", "{}", e.id);
                if associated {
                    prop_assert_eq!(e.status, EniStatus::InUse);
                }
            }
        }
    }
}
