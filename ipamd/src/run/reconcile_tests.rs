use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::io::ec2::fake::FakeEc2;
use crate::io::ec2::SubnetInfo;
use crate::io::ec2::{Addresses, Attachment, InstanceTypeInfo};
use crate::io::ec2::{
    DESCRIPTION_PREFIX, TAG_CLUSTER_NAME, TAG_CREATED_AT, TAG_INSTANCE_ID, TAG_NO_MANAGE,
    TAG_SUBNET_ROLE,
};
use crate::plan::reconcile::*;
use crate::plan::subnets::*;
use crate::store::checkpoint::{IpamMetadata, MemoryStore};
use crate::store::commit::{Clock, TokioClock};
use crate::types::{parse_rfc3339, rfc3339};
use std::collections::BTreeSet;

const INSTANCE: &str = "i-1";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn settings() -> ReconcileSettings {
    ReconcileSettings {
        instance_id: INSTANCE.into(),
        manage_untagged: true,
        multi_nic: false,
        tags: BTreeMap::from([
            (TAG_INSTANCE_ID.to_owned(), INSTANCE.to_owned()),
            (TAG_CLUSTER_NAME.to_owned(), "c1".to_owned()),
        ]),
        provisioning: true,
        cooldown: RECONCILE_COOLDOWN,
    }
}

fn known(id: &str, device: u32, primary: &str, cidrs: &[(&str, Option<&str>)]) -> KnownEni {
    KnownEni {
        id: id.into(),
        device_number: device,
        primary_ip: ip(primary),
        is_primary: device == 0,
        cidrs: cidrs
            .iter()
            .map(|(c, pod)| {
                let c = net(c);
                (
                    c,
                    KnownCidr {
                        is_prefix: c.prefix_len() != 32,
                        pods: pod
                            .map(|p| vec![IpamKey::new("aws-cni", p, "eth0")])
                            .unwrap_or_default(),
                    },
                )
            })
            .collect(),
    }
}

fn imds(id: &str, device: u32, primary: &str, ips: &[&str], prefixes: &[&str]) -> ImdsEni {
    ImdsEni {
        id: id.into(),
        mac: format!("02:00:00:00:00:{device:02x}"),
        device_number: device,
        network_card: 0,
        subnet_id: "subnet-1".into(),
        subnet_cidr: Some(net("10.0.0.0/16")),
        primary_ip: Some(ip(primary)),
        secondary_ips: ips.iter().map(|s| ip(s)).collect(),
        prefixes: prefixes.iter().map(|s| net(s)).collect(),
    }
}

fn ec2eni(id: &str, device: u32, primary: &str, ips: &[&str], prefixes: &[&str]) -> EniInfo {
    EniInfo {
        id: id.into(),
        mac: format!("02:00:00:00:00:{device:02x}"),
        subnet_id: "subnet-1".into(),
        vpc_id: "vpc-1".into(),
        status: "in-use".into(),
        description: format!("{DESCRIPTION_PREFIX}{INSTANCE}"),
        interface_type: "interface".into(),
        primary_ip: Some(ip(primary)),
        secondary_ips: ips.iter().map(|s| ip(s)).collect(),
        prefixes: prefixes.iter().map(|s| net(s)).collect(),
        ipv6_prefixes: Vec::new(),
        tags: BTreeMap::from([(TAG_INSTANCE_ID.to_owned(), INSTANCE.to_owned())]),
        security_groups: vec![],
        attachment: Some(Attachment {
            id: format!("attach-{id}"),
            instance_id: INSTANCE.into(),
            device_index: device,
            network_card: 0,
        }),
    }
}

fn run(
    k: &[KnownEni],
    i: &[ImdsEni],
    e: Option<&[EniInfo]>,
    released: &BTreeMap<Ipv4Net, Duration>,
    now: u64,
) -> Plan {
    plan(
        &ReconcileInput {
            known: k,
            imds: i,
            ec2: e,
            released,
            now: Duration::from_secs(now),
        },
        &settings(),
    )
}

#[test]
fn when_imds_agrees_with_the_datastore_ec2_is_not_asked_and_nothing_changes() {
    let k = [known(
        "eni-a",
        1,
        "10.0.1.1",
        &[("10.0.1.2/32", Some("p1")), ("10.0.1.3/32", None)],
    )];
    let i = [imds("eni-a", 1, "10.0.1.1", &["10.0.1.2", "10.0.1.3"], &[])];
    assert!(needs_ec2(&k, &i).is_empty());
    let p = run(&k, &i, None, &BTreeMap::new(), 100);
    assert!(p.actions.is_empty(), "{p:?}");
}

#[test]
fn stale_imds_missing_an_ip_that_ec2_still_lists_evicts_nothing() {
    let k = [known(
        "eni-a",
        1,
        "10.0.1.1",
        &[("10.0.1.2/32", Some("p1")), ("10.0.1.3/32", None)],
    )];
    let i = [imds("eni-a", 1, "10.0.1.1", &["10.0.1.3"], &[])];
    assert_eq!(needs_ec2(&k, &i), vec!["eni-a".to_owned()]);
    let e = [ec2eni(
        "eni-a",
        1,
        "10.0.1.1",
        &["10.0.1.2", "10.0.1.3"],
        &[],
    )];
    let p = run(&k, &i, Some(&e), &BTreeMap::new(), 100);
    assert!(p.actions.is_empty(), "{p:?}");
    // Without an EC2 answer nothing changes either.
    assert!(run(&k, &i, None, &BTreeMap::new(), 100).actions.is_empty());
}

#[test]
fn an_ip_removed_behind_our_back_is_evicted_and_its_pod_reported() {
    let k = [known(
        "eni-a",
        1,
        "10.0.1.1",
        &[("10.0.1.2/32", Some("p1")), ("10.0.1.3/32", None)],
    )];
    let i = [imds("eni-a", 1, "10.0.1.1", &["10.0.1.3"], &[])];
    let e = [ec2eni("eni-a", 1, "10.0.1.1", &["10.0.1.3"], &[])];
    let p = run(&k, &i, Some(&e), &BTreeMap::new(), 100);
    assert_eq!(
        p.actions,
        vec![Action::EvictAddresses {
            eni: "eni-a".into(),
            cidrs: vec![net("10.0.1.2/32")],
            pods: vec![IpamKey::new("aws-cni", "p1", "eth0")],
        }]
    );
}

#[test]
fn externally_added_ips_and_prefixes_are_adopted_but_ec2_wins_over_imds() {
    let k = [known("eni-a", 1, "10.0.1.1", &[("10.0.1.2/32", None)])];
    // IMDS lists .9 too, which EC2 does not have (IMDS wrong): not added. EC2 has .7 and a
    // prefix that IMDS has not caught up with: added.
    let i = [imds("eni-a", 1, "10.0.1.1", &["10.0.1.2", "10.0.1.9"], &[])];
    let e = [ec2eni(
        "eni-a",
        1,
        "10.0.1.1",
        &["10.0.1.2", "10.0.1.7"],
        &["10.0.2.16/28"],
    )];
    let p = run(&k, &i, Some(&e), &BTreeMap::new(), 100);
    assert_eq!(
        p.actions,
        vec![Action::AddAddresses {
            eni: "eni-a".into(),
            ips: vec![ip("10.0.1.7")],
            prefixes: vec![net("10.0.2.16/28")],
        }]
    );
}

#[test]
fn a_freshly_released_ip_is_not_re_added_within_the_cooldown() {
    let k = [known("eni-a", 1, "10.0.1.1", &[])];
    let i = [imds("eni-a", 1, "10.0.1.1", &["10.0.1.2"], &[])];
    let e = [ec2eni("eni-a", 1, "10.0.1.1", &["10.0.1.2"], &[])];
    let released = BTreeMap::from([(net("10.0.1.2/32"), Duration::from_secs(100))]);
    assert!(run(&k, &i, Some(&e), &released, 159).actions.is_empty());
    let p = run(&k, &i, Some(&e), &released, 160);
    assert_eq!(p.actions.len(), 1, "after 60 s EC2's word stands: {p:?}");
}

#[test]
fn an_attached_eni_is_adopted_with_ec2_addresses_and_tagged_with_missing_tags_only() {
    let k = [known("eni-p", 0, "10.0.0.10", &[])];
    let i = [
        imds("eni-p", 0, "10.0.0.10", &[], &[]),
        imds("eni-b", 2, "10.0.1.20", &["10.0.1.21"], &[]),
    ];
    let e = [ec2eni(
        "eni-b",
        2,
        "10.0.1.20",
        &["10.0.1.21", "10.0.1.22"],
        &[],
    )];
    assert_eq!(needs_ec2(&k, &i), vec!["eni-b".to_owned()]);
    let p = run(&k, &i, Some(&e), &BTreeMap::new(), 100);
    assert_eq!(p.actions.len(), 2, "{p:?}");
    match &p.actions[0] {
        Action::AdoptEni { eni, ips, prefixes } => {
            assert_eq!(eni.id, "eni-b");
            assert_eq!(eni.device_number, 2);
            assert_eq!(eni.primary_ip, ip("10.0.1.20"));
            assert_eq!(*ips, vec![ip("10.0.1.21"), ip("10.0.1.22")]);
            assert!(prefixes.is_empty());
            assert!(!eni.is_trunk);
        }
        a => panic!("{a:?}"),
    }
    assert_eq!(
        p.actions[1],
        Action::TagEni {
            eni: "eni-b".into(),
            tags: BTreeMap::from([(TAG_CLUSTER_NAME.to_owned(), "c1".to_owned())]),
        }
    );
}

#[test]
fn an_eni_imds_lists_but_ec2_does_not_attach_here_is_not_adopted() {
    let i = [imds("eni-b", 2, "10.0.1.20", &[], &[])];
    let mut e = ec2eni("eni-b", 2, "10.0.1.20", &[], &[]);
    e.attachment = None;
    let p = run(&[], &i, Some(&[e]), &BTreeMap::new(), 100);
    assert!(p.actions.is_empty());
    assert_eq!(p.disputed, vec!["eni-b".to_owned()]);
    // Not found in EC2 at all: the same.
    let p = run(&[], &i, Some(&[]), &BTreeMap::new(), 100);
    assert!(p.actions.is_empty());
}

#[test]
fn settings_follow_the_configuration() {
    let cfg = crate::config::Config::for_test(&[
        ("MANAGE_UNTAGGED_ENI", "false"),
        ("ENABLE_IMDS_ONLY_MODE", "true"),
        ("CLUSTER_NAME", "c9"),
    ])
    .unwrap();
    let s = ReconcileSettings::from_config(&cfg, "i-9");
    assert!(!s.manage_untagged);
    assert!(!s.provisioning, "IMDS-only mode implies no EC2 changes");
    assert_eq!(s.tags.get(TAG_INSTANCE_ID).map(String::as_str), Some("i-9"));
    assert_eq!(s.tags.get(TAG_CLUSTER_NAME).map(String::as_str), Some("c9"));
    assert_eq!(s.cooldown, RECONCILE_COOLDOWN);
}

#[test]
fn unmanaged_trunk_and_efa_only_enis_are_classified_per_spec() {
    let s = settings();
    let mut e = ec2eni("eni-b", 2, "10.0.1.20", &[], &[]);
    assert_eq!(classify(&e, false, &s), EniClass::Managed);
    e.tags.insert(TAG_NO_MANAGE.into(), "true".into());
    assert_eq!(classify(&e, false, &s), EniClass::Unmanaged);
    assert_eq!(classify(&e, true, &s), EniClass::Managed, "primary always");
    e.tags.insert(TAG_NO_MANAGE.into(), "false".into());
    assert_eq!(classify(&e, false, &s), EniClass::Managed);
    e.tags.clear();
    assert_eq!(
        classify(&e, false, &s),
        EniClass::Managed,
        "untagged, manage"
    );
    let strict = ReconcileSettings {
        manage_untagged: false,
        ..settings()
    };
    assert_eq!(classify(&e, false, &strict), EniClass::Unmanaged);
    e.tags.insert(TAG_INSTANCE_ID.into(), "i-other".into());
    assert_eq!(classify(&e, false, &s), EniClass::Unmanaged);
    e.tags.insert(TAG_INSTANCE_ID.into(), INSTANCE.into());
    e.interface_type = "trunk".into();
    assert_eq!(classify(&e, false, &strict), EniClass::Trunk);
    e.interface_type = "efa".into();
    assert_eq!(classify(&e, false, &s), EniClass::Efa);
    e.interface_type = "efa-only".into();
    assert_eq!(classify(&e, false, &s), EniClass::EfaOnly);
    e.interface_type = "interface".into();
    e.attachment.as_mut().unwrap().network_card = 1;
    assert_eq!(classify(&e, false, &s), EniClass::OtherCard);
}

#[test]
fn unmanaged_enis_are_not_adopted_and_trunks_are_adopted_untagged() {
    let i = [
        imds("eni-u", 2, "10.0.1.20", &["10.0.1.21"], &[]),
        imds("eni-t", 3, "10.0.1.30", &[], &[]),
    ];
    let mut u = ec2eni("eni-u", 2, "10.0.1.20", &["10.0.1.21"], &[]);
    u.tags.insert(TAG_NO_MANAGE.into(), "true".into());
    let mut t = ec2eni("eni-t", 3, "10.0.1.30", &[], &[]);
    t.interface_type = "trunk".into();
    t.tags.clear();
    let p = run(&[], &i, Some(&[u, t]), &BTreeMap::new(), 100);
    assert_eq!(p.unmanaged, vec!["eni-u".to_owned()]);
    assert_eq!(p.actions.len(), 1, "{p:?}");
    assert!(matches!(&p.actions[0], Action::AdoptEni { eni, .. } if eni.is_trunk));
}

#[test]
fn an_eni_is_evicted_only_when_imds_and_ec2_both_say_it_is_gone() {
    let k = [
        known("eni-p", 0, "10.0.0.10", &[]),
        known("eni-a", 1, "10.0.1.1", &[("10.0.1.2/32", Some("p1"))]),
    ];
    let i = [imds("eni-p", 0, "10.0.0.10", &[], &[])];
    // EC2 still has it attached: IMDS is stale, keep.
    let e = [ec2eni("eni-a", 1, "10.0.1.1", &["10.0.1.2"], &[])];
    let p = run(&k, &i, Some(&e), &BTreeMap::new(), 100);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.disputed, vec!["eni-a".to_owned()]);
    // No EC2 answer: keep.
    assert!(run(&k, &i, None, &BTreeMap::new(), 100).actions.is_empty());
    // EC2 agrees (not found, or detached).
    let p = run(&k, &i, Some(&[]), &BTreeMap::new(), 100);
    assert_eq!(
        p.actions,
        vec![Action::EvictEni {
            eni: "eni-a".into(),
            primary_ip: ip("10.0.1.1"),
            pods: vec![IpamKey::new("aws-cni", "p1", "eth0")],
        }]
    );
    // The primary ENI is never evicted.
    let p = run(&k, &[], Some(&[]), &BTreeMap::new(), 100);
    assert!(p
        .actions
        .iter()
        .all(|a| !matches!(a, Action::EvictEni { eni, .. } if eni == "eni-p")));
}

fn apply_to_sets(k: &[KnownEni], p: &Plan) -> BTreeMap<String, BTreeSet<Ipv4Net>> {
    let mut m: BTreeMap<String, BTreeSet<Ipv4Net>> = k
        .iter()
        .map(|k| (k.id.clone(), k.cidrs.keys().copied().collect()))
        .collect();
    for a in &p.actions {
        match a {
            Action::AddAddresses { eni, ips, prefixes } => {
                let s = m.get_mut(eni).unwrap();
                s.extend(ips.iter().map(|i| Ipv4Net::host(*i)));
                s.extend(prefixes.iter().copied());
            }
            Action::EvictAddresses { eni, cidrs, .. } => {
                let s = m.get_mut(eni).unwrap();
                for c in cidrs {
                    assert!(s.remove(c), "evicted a CIDR the datastore lacks");
                }
            }
            Action::EvictEni { eni, .. } => {
                m.remove(eni);
            }
            _ => {}
        }
    }
    m
}

proptest! {
    /// Random datastore / IMDS / EC2 contents for one secondary ENI: whatever IMDS says, an
    /// address EC2 lists is never evicted; when IMDS disagrees with the datastore, the result
    /// is exactly EC2's set (less fresh releases that were not held); otherwise nothing moves.
    #[test]
    fn random_imds_staleness_never_evicts_what_ec2_lists(
        ds_mask in 0u16..1024,
        imds_mask in 0u16..1024,
        ec2_mask in 0u16..1024,
        rel_mask in 0u16..1024,
        attached_in_imds in any::<bool>(),
        ec2_answers in any::<bool>(),
    ) {
        let pool: Vec<Ipv4Addr> = (2..12).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
        let pick = |m: u16| -> Vec<Ipv4Addr> {
            pool.iter().enumerate().filter(|(i, _)| m & (1 << i) != 0).map(|(_, a)| *a).collect()
        };
        let ds_ips = pick(ds_mask);
        let cidrs: Vec<(String, Option<String>)> = ds_ips
            .iter()
            .map(|a| (format!("{a}/32"), (a.octets()[3] % 2 == 0).then(|| format!("p{a}"))))
            .collect();
        let cidr_refs: Vec<(&str, Option<&str>)> =
            cidrs.iter().map(|(c, p)| (c.as_str(), p.as_deref())).collect();
        let k = [known("eni-p", 0, "10.0.0.10", &[]), known("eni-a", 1, "10.0.1.1", &cidr_refs)];
        let imds_ips: Vec<String> = pick(imds_mask).iter().map(ToString::to_string).collect();
        let imds_refs: Vec<&str> = imds_ips.iter().map(String::as_str).collect();
        let mut i = vec![imds("eni-p", 0, "10.0.0.10", &[], &[])];
        if attached_in_imds {
            i.push(imds("eni-a", 1, "10.0.1.1", &imds_refs, &[]));
        }
        let ec2_set: BTreeSet<Ipv4Net> = pick(ec2_mask).into_iter().map(Ipv4Net::host).collect();
        let ec2_ips: Vec<String> = ec2_set.iter().map(|c| c.addr().to_string()).collect();
        let ec2_refs: Vec<&str> = ec2_ips.iter().map(String::as_str).collect();
        let e = [ec2eni("eni-a", 1, "10.0.1.1", &ec2_refs, &[])];
        let released: BTreeMap<Ipv4Net, Duration> = pick(rel_mask)
            .into_iter()
            .map(|a| (Ipv4Net::host(a), Duration::from_secs(90)))
            .collect();
        let p = run(&k, &i, ec2_answers.then_some(&e[..]), &released, 100);
        let after = apply_to_sets(&k, &p);
        let ds_set: BTreeSet<Ipv4Net> = k[1].cidrs.keys().copied().collect();
        prop_assert!(after.contains_key("eni-a"), "EC2 has it attached: never evicted");
        let got = &after["eni-a"];
        for c in ds_set.intersection(&ec2_set) {
            prop_assert!(got.contains(c), "evicted {c} that EC2 lists");
        }
        let imds_set: BTreeSet<Ipv4Net> = pick(imds_mask).into_iter().map(Ipv4Net::host).collect();
        let disagree = !attached_in_imds || imds_set != ds_set;
        if ec2_answers && disagree {
            let want: BTreeSet<Ipv4Net> = ec2_set
                .iter()
                .filter(|c| ds_set.contains(c) || !released.contains_key(c))
                .copied()
                .collect();
            prop_assert_eq!(got, &want);
        } else {
            prop_assert_eq!(got, &ds_set);
        }
        // Every evicted address is reported with the pods that held it.
        for a in &p.actions {
            if let Action::EvictAddresses { cidrs, pods, .. } = a {
                let held = cidrs.iter().filter(|c| c.addr().octets()[3] % 2 == 0).count();
                prop_assert_eq!(pods.len(), held);
            }
        }
    }

    #[test]
    fn rfc3339_round_trips(secs in 0u64..8_000_000_000) {
        let s = rfc3339(Duration::from_secs(secs));
        prop_assert_eq!(parse_rfc3339(&s), Some(Duration::from_secs(secs)));
    }
}

#[test]
fn rfc3339_parses_offsets_and_fractions_and_rejects_garbage() {
    assert_eq!(
        parse_rfc3339("2023-11-14T23:13:20.5+01:00"),
        Some(Duration::new(1_700_000_000, 500_000_000))
    );
    assert_eq!(
        parse_rfc3339("2023-11-14T22:13:20z"),
        Some(Duration::from_secs(1_700_000_000))
    );
    for bad in [
        "",
        "yesterday",
        "2023-13-14T22:13:20Z",
        "2023-11-14T22:13:20",
        "2023-11-14T22:13:20+0100",
        "1969-12-31T23:59:59Z",
        "2023-11-14T22:13:2xZ",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad}");
    }
}

/// Assigns an address to `pod` and waits until it is on disk.
async fn assign_durably(state: &PoolState, pod: &IpamKey) -> crate::store::datastore::Assignment {
    state
        .assign(pod, &IpamMetadata::default())
        .unwrap()
        .durable()
        .await
        .unwrap()
}

fn leaked(id: &str, created: Option<&str>) -> EniInfo {
    let mut e = ec2eni(id, 1, "10.0.1.1", &[], &[]);
    e.attachment = None;
    e.status = "available".into();
    e.tags.insert(TAG_CLUSTER_NAME.into(), "c1".into());
    if let Some(c) = created {
        e.tags.insert(TAG_CREATED_AT.into(), c.into());
    }
    e
}

#[test]
fn leaked_enis_are_tagged_first_deleted_when_old_and_an_unparsable_date_is_not_deleted() {
    let now = Duration::from_secs(1_700_000_000);
    let mut foreign = leaked("eni-f", Some("2000-01-01T00:00:00Z"));
    foreign.description = "someone else".into();
    let mut other_cluster = leaked("eni-o", Some("2000-01-01T00:00:00Z"));
    other_cluster
        .tags
        .insert(TAG_CLUSTER_NAME.into(), "c2".into());
    let mut attached = leaked("eni-x", Some("2000-01-01T00:00:00Z"));
    attached.attachment = ec2eni("eni-x", 1, "10.0.1.1", &[], &[]).attachment;
    let c = [
        leaked("eni-old", Some("2023-11-14T22:08:20Z")), // exactly 5 min
        leaked("eni-young", Some("2023-11-14T22:08:21Z")), // 4:59
        leaked("eni-none", None),
        leaked("eni-bad", Some("not a date")),
        foreign,
        other_cluster,
        attached,
    ];
    let got = select_leaked(&c, Some("c1"), now, LEAKED_ENI_MIN_AGE);
    assert_eq!(
        got,
        vec![
            LeakedAction::Delete {
                eni: "eni-old".into()
            },
            LeakedAction::Tag {
                eni: "eni-none".into(),
                created_at: "2023-11-14T22:13:20Z".into()
            },
            LeakedAction::Tag {
                eni: "eni-bad".into(),
                created_at: "2023-11-14T22:13:20Z".into()
            },
        ]
    );
    // Without a cluster name the other cluster's ENI is a candidate too.
    assert_eq!(select_leaked(&c, None, now, LEAKED_ENI_MIN_AGE).len(), 4);
}

#[test]
fn own_leftovers_are_this_instances_unattached_enis_whatever_their_age() {
    let mine = |id: &str, created: Option<&str>| {
        let mut e = leaked(id, created);
        e.tags.insert(TAG_INSTANCE_ID.into(), "i-me".into());
        e
    };
    let mut other_node = leaked("eni-other", None);
    other_node
        .tags
        .insert(TAG_INSTANCE_ID.into(), "i-other".into());
    let mut attached = mine("eni-att", None);
    attached.attachment = ec2eni("eni-att", 1, "10.0.1.1", &[], &[]).attachment;
    let mut foreign = mine("eni-user", None);
    foreign.description = "made by a user".into();
    let c = [
        mine("eni-new", None),
        mine("eni-young", Some("2023-11-14T22:13:19Z")),
        other_node,
        attached,
        foreign,
    ];
    assert_eq!(
        crate::run::reconcile::select_own_leftovers(&c, "i-me"),
        vec!["eni-new".to_owned(), "eni-young".to_owned()]
    );
    assert!(crate::run::reconcile::select_own_leftovers(&c, "").is_empty());
}

fn subnet(id: &str, available: u64, tags: &[(&str, &str)]) -> SubnetInfo {
    SubnetInfo {
        id: id.into(),
        cidr: net("10.0.0.0/24"),
        available,
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

#[test]
fn subnet_discovery_orders_by_free_addresses_and_honours_role_and_cluster_tags() {
    let scoped_mine = format!("{TAG_SUBNET_CLUSTER_PREFIX}c1");
    let scoped_other = format!("{TAG_SUBNET_CLUSTER_PREFIX}c2");
    let all = [
        subnet("primary", 10, &[]),
        subnet("untagged", 500, &[]),
        subnet("off", 900, &[(TAG_SUBNET_ROLE, "0")]),
        subnet("on", 100, &[(TAG_SUBNET_ROLE, "1")]),
        subnet("on-empty", 300, &[(TAG_SUBNET_ROLE, "")]),
        subnet(
            "mine",
            200,
            &[(TAG_SUBNET_ROLE, "1"), (scoped_mine.as_str(), "1")],
        ),
        subnet(
            "theirs",
            400,
            &[(TAG_SUBNET_ROLE, "1"), (scoped_other.as_str(), "1")],
        ),
    ];
    let ids = |v: Vec<SubnetInfo>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(eligible_subnets(&all, "primary", "c1")),
        ["on-empty", "mine", "on", "primary"]
    );
    assert_eq!(
        ids(eligible_subnets(&all, "primary", "")),
        ["theirs", "on-empty", "mine", "on", "primary"],
        "no cluster name: cluster scoping ignored"
    );
    assert!(subnet_excluded(Some(&all[2]), "c1"));
    assert!(subnet_excluded(Some(&all[6]), "c1"));
    assert!(!subnet_excluded(Some(&all[5]), "c1"));
    assert!(!subnet_excluded(Some(&all[1]), "c1"));
    assert!(!subnet_excluded(None, "c1"));

    assert_eq!(
        subnets_for_new_eni(true, Some(&all), "primary", "c1")[0],
        "on-empty"
    );
    assert_eq!(
        subnets_for_new_eni(true, None, "primary", "c1"),
        ["primary"]
    );
    let off = [subnet("primary", 10, &[(TAG_SUBNET_ROLE, "0")])];
    assert!(subnets_for_new_eni(true, Some(&off), "primary", "").is_empty());
    assert!(subnets_for_new_eni(false, Some(&off), "primary", "").is_empty());
    assert_eq!(
        subnets_for_new_eni(false, Some(&all), "primary", ""),
        ["primary"]
    );
}

// ---- apply / reconcile_once against the fake EC2 and a real PoolState ----

struct Node {
    ec2: FakeEc2,
    state: Arc<PoolState>,
    store: Arc<MemoryStore>,
    pacer: Pacer,
    s: ReconcileSettings,
}

struct SharedStore(Arc<MemoryStore>);
impl crate::store::checkpoint::CheckpointStore for SharedStore {
    fn read(
        &self,
    ) -> Result<
        Option<crate::store::checkpoint::CheckpointFile>,
        crate::store::checkpoint::CheckpointError,
    > {
        self.0.read()
    }
    fn write(
        &self,
        f: &crate::store::checkpoint::CheckpointFile,
    ) -> Result<(), crate::store::checkpoint::CheckpointError> {
        self.0.write(f)
    }
}

fn node() -> Node {
    let ec2 = FakeEc2::new(
        net("10.0.0.0/20"),
        InstanceTypeInfo {
            max_enis: 3,
            ipv4_per_eni: 10,
            hypervisor: "nitro".into(),
            bare_metal: false,
        },
    );
    let primary = ec2.primary_eni();
    let (instance_id, primary_ip) = {
        let st = ec2.state();
        (
            st.instance_id.clone(),
            st.enis[&primary].primary_ip.unwrap(),
        )
    };
    let clock = Arc::new(TokioClock::new());
    let mut ds = DataStore::new(false, false, false, Duration::from_secs(30));
    ds.add_eni(
        EniSpec {
            id: primary,
            mac: String::new(),
            is_primary: true,
            is_trunk: false,
            is_efa: false,
            device_number: 0,
            primary_ip,
            subnet_id: "subnet-1".into(),
            subnet_cidr: net("10.0.0.0/20"),
            excluded: false,
        },
        clock.now(),
    );
    let store = Arc::new(MemoryStore::default());
    let state = Arc::new(PoolState::new(
        ds,
        Box::new(SharedStore(store.clone())),
        clock,
    ));
    let cfg = crate::config::Config::for_test(&[]).unwrap();
    Node {
        ec2,
        state,
        store,
        pacer: Pacer::new(cfg.ec2),
        s: ReconcileSettings::from_config(&cfg, &instance_id),
    }
}

/// What IMDS would say right now (possibly made stale by the test afterwards).
fn imds_of(ec2: &FakeEc2) -> Vec<ImdsEni> {
    let st = ec2.state();
    st.enis
        .values()
        .filter_map(|e| {
            let a = e.attachment.as_ref()?;
            Some(ImdsEni {
                id: e.id.clone(),
                mac: e.mac.clone(),
                device_number: a.device_index,
                network_card: a.network_card,
                subnet_id: e.subnet_id.clone(),
                subnet_cidr: Some(st.subnet.cidr),
                primary_ip: e.primary_ip,
                secondary_ips: e.secondary_ips.clone(),
                prefixes: e.prefixes.clone(),
            })
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn reconcile_adopts_an_external_ip_and_evicts_a_removed_one_with_the_checkpoint_written() {
    let n = node();
    let primary = n.ec2.primary_eni();
    let got = n.ec2.assign(&primary, Addresses::Ips(2)).await.unwrap();
    // The datastore learns both (as the pool would), and a pod takes one of them.
    n.state
        .mutate_and_save(|ds| {
            for ip in &got.ips {
                ds.add_cidr(&primary, Ipv4Net::host(*ip), false).unwrap();
            }
        })
        .await
        .unwrap();
    let pod = IpamKey::new("aws-cni", "c1", "eth0");
    let a = assign_durably(&n.state, &pod).await;
    // Behind our back: the pod's IP is unassigned in EC2 and another one is assigned.
    let extra = n.ec2.assign(&primary, Addresses::Ips(1)).await.unwrap().ips[0];
    n.ec2.unassign_ips(&primary, &[a.ip]).await.unwrap();
    let imds = imds_of(&n.ec2);
    let r = reconcile_once(
        &n.state,
        &n.ec2,
        &n.pacer,
        &imds,
        &BTreeMap::new(),
        &BTreeSet::new(),
        &n.s,
    )
    .await
    .unwrap();
    assert_eq!(r.lost_pods, vec![pod.clone()], "{r:?}");
    assert_eq!((r.added_cidrs, r.evicted_cidrs), (1, 1));
    {
        let ds = n.state.lock();
        let cidrs: Vec<Ipv4Net> = ds.eni(&primary).unwrap().cidrs.keys().copied().collect();
        assert!(cidrs.contains(&Ipv4Net::host(extra)));
        assert!(!cidrs.contains(&Ipv4Net::host(a.ip)));
        assert_eq!(ds.lookup(&pod), None);
    }
    assert!(
        n.store.current().unwrap().allocations.is_empty(),
        "checkpoint rewritten"
    );
    // Converged: the next run asks EC2 nothing.
    let calls = n.ec2.count("DescribeNetworkInterfaces");
    let r = reconcile_once(
        &n.state,
        &n.ec2,
        &n.pacer,
        &imds_of(&n.ec2),
        &BTreeMap::new(),
        &BTreeSet::new(),
        &n.s,
    )
    .await
    .unwrap();
    assert_eq!(r, ApplyReport::default());
    assert_eq!(n.ec2.count("DescribeNetworkInterfaces"), calls);
}

#[tokio::test(start_paused = true)]
async fn stale_imds_after_an_assign_keeps_every_in_use_ip() {
    let n = node();
    let primary = n.ec2.primary_eni();
    let stale = imds_of(&n.ec2); // taken before the assign: lists no secondary IPs
    let got = n.ec2.assign(&primary, Addresses::Ips(3)).await.unwrap();
    n.state
        .mutate_and_save(|ds| {
            for ip in &got.ips {
                ds.add_cidr(&primary, Ipv4Net::host(*ip), false).unwrap();
            }
        })
        .await
        .unwrap();
    let pod = IpamKey::new("aws-cni", "c1", "eth0");
    let a = assign_durably(&n.state, &pod).await;
    let r = reconcile_once(
        &n.state,
        &n.ec2,
        &n.pacer,
        &stale,
        &BTreeMap::new(),
        &BTreeSet::new(),
        &n.s,
    )
    .await
    .unwrap();
    assert_eq!(r.evicted_cidrs, 0, "{r:?}");
    assert_eq!(n.state.lock().lookup(&pod), Some(a.ip));
    assert_eq!(n.state.lock().eni(&primary).unwrap().cidrs.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_eni_attached_behind_our_back_is_adopted_and_tagged_and_ec2_failure_changes_nothing() {
    let n = node();
    let id = {
        let mut st = n.ec2.state();
        let inst = st.instance_id.clone();
        let mut e = st.enis.values().next().unwrap().clone();
        e.id = "eni-ext".into();
        e.mac = "02:00:00:00:00:99".into();
        e.primary_ip = Some(ip("10.0.5.1"));
        e.secondary_ips = vec![ip("10.0.5.2")];
        e.tags.clear();
        e.attachment = Some(Attachment {
            id: "attach-ext".into(),
            instance_id: inst,
            device_index: 1,
            network_card: 0,
        });
        st.enis.insert(e.id.clone(), e);
        "eni-ext".to_owned()
    };
    let imds = imds_of(&n.ec2);
    n.ec2
        .fail("DescribeNetworkInterfaces", "UnauthorizedOperation", 1);
    assert!(reconcile_once(
        &n.state,
        &n.ec2,
        &n.pacer,
        &imds,
        &BTreeMap::new(),
        &BTreeSet::new(),
        &n.s
    )
    .await
    .is_err());
    assert!(n.state.lock().eni(&id).is_none());
    let r = reconcile_once(
        &n.state,
        &n.ec2,
        &n.pacer,
        &imds,
        &BTreeMap::new(),
        &BTreeSet::new(),
        &n.s,
    )
    .await
    .unwrap();
    assert_eq!(r.adopted.len(), 1);
    assert_eq!(r.tagged, vec![id.clone()]);
    assert_eq!(
        n.ec2.state().enis[&id].tags.get(TAG_INSTANCE_ID),
        Some(&n.s.instance_id)
    );
    let ds = n.state.lock();
    let e = ds.eni(&id).unwrap();
    assert_eq!((e.device_number, e.route_table_id), (1, 2));
    assert_eq!(
        e.cidrs.keys().copied().collect::<Vec<_>>(),
        vec![net("10.0.5.2/32")]
    );
}

#[tokio::test(start_paused = true)]
async fn describe_drops_ids_ec2_does_not_know_and_cleanup_deletes_only_old_leaked_enis() {
    let n = node();
    let primary = n.ec2.primary_eni();
    let got = describe_dropping_missing(&n.ec2, &n.pacer, vec!["eni-gone".into(), primary.clone()])
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, primary);

    let now = Duration::from_secs(1_700_000_000);
    {
        let mut st = n.ec2.state();
        let base = st.enis[&primary].clone();
        for (id, created) in [("eni-old", Some("2023-11-14T22:00:00Z")), ("eni-new", None)] {
            let mut e = base.clone();
            e.id = id.into();
            e.attachment = None;
            e.status = "available".into();
            e.description = format!("{DESCRIPTION_PREFIX}i-dead");
            e.tags = BTreeMap::from([(TAG_INSTANCE_ID.to_owned(), "i-dead".to_owned())]);
            if let Some(c) = created {
                e.tags.insert(TAG_CREATED_AT.into(), c.into());
            }
            st.enis.insert(id.into(), e);
        }
    }
    let r = cleanup_leaked(&n.ec2, &n.pacer, "vpc-1", None, now)
        .await
        .unwrap();
    assert_eq!(r.deleted, vec!["eni-old".to_owned()]);
    assert_eq!(r.tagged, vec!["eni-new".to_owned()]);
    let st = n.ec2.state();
    assert!(!st.enis.contains_key("eni-old"));
    assert_eq!(
        st.enis["eni-new"]
            .tags
            .get(TAG_CREATED_AT)
            .map(String::as_str),
        Some("2023-11-14T22:13:20Z")
    );
}
