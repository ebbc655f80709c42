//! Property-based fuzzing of ipamd's in-process parsers: every environment variable, the
//! checkpoint file and its restore (IPv4 and IPv6), the gRPC requests of the CNI plugin, and
//! the ENIConfig and Node objects. Each target checks: no panic, an error that names the
//! field (variable, JSON path, request field), and nothing dropped (an accepted input is
//! taken whole, a refused one changes nothing).
//!
//! Case budgets are kept small (`FUZZ_CASES`, default 64 per target) so that the debug test
//! run stays short; `FUZZ_CASES=5000 cargo test -p ipamd --test fuzz_inputs` runs longer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use ipamd::config::{Config, ConfigError, MAX_DURATION};
use ipamd::store::checkpoint::{
    parse, Allocation, CheckpointError, CheckpointFile, CheckpointStore, FileStore, IpamMetadata,
};
use ipamd::store::datastore::{DataStore, DsError, EniSpec, IpamKey, V6};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence};

fn cases(default: u32) -> PropConfig {
    let n = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    PropConfig {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..PropConfig::default()
    }
}

// --- environment variables ----------------------------------------------------------------

/// Every variable `Config::parse` reads.
const VARS: &[&str] = &[
    "ADDITIONAL_ENI_TAGS",
    "ANNOTATE_POD_IP",
    "AWS_EC2_ENDPOINT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EXTERNAL_SERVICE_CIDRS",
    "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
    "AWS_VPC_CNI_NODE_PORT_SUPPORT",
    "AWS_VPC_ENI_MTU",
    "AWS_VPC_K8S_CNI_BACKING_STORE",
    "AWS_VPC_K8S_CNI_CONNMARK",
    "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
    "AWS_VPC_K8S_CNI_EXTERNALSNAT",
    "AWS_VPC_K8S_CNI_LOGLEVEL",
    "AWS_VPC_K8S_CNI_LOG_FILE",
    "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
    "CLUSTER_ENDPOINT",
    "CLUSTER_NAME",
    "DISABLE_INTROSPECTION",
    "DISABLE_LEAKED_ENI_CLEANUP",
    "DISABLE_METRICS",
    "DISABLE_NETWORK_RESOURCE_PROVISIONING",
    "ENABLE_IMDS_ONLY_MODE",
    "ENABLE_IPv4",
    "ENABLE_IPv6",
    "ENABLE_MULTI_NIC",
    "ENABLE_POD_ENI",
    "ENABLE_PREFIX_DELEGATION",
    "ENABLE_SUBNET_DISCOVERY",
    "ENABLE_V6_EGRESS",
    "ENI_CONFIG_ANNOTATION_DEF",
    "ENI_CONFIG_LABEL_DEF",
    "HTTP_TIMEOUT",
    "INTROSPECTION_BIND_ADDRESS",
    "IPAMD_BACKEND",
    "IPAMD_GRPC_SOCKET",
    "IP_COOLDOWN_PERIOD",
    "MANAGE_UNTAGGED_ENI",
    "MAX_ENI",
    "METRICS_BIND_ADDRESS",
    "MINIMUM_IP_TARGET",
    "MY_NODE_NAME",
    "MY_POD_NAME",
    "NETWORK_POLICY_ENFORCING_MODE",
    "POD_SECURITY_GROUP_ENFORCING_MODE",
    "VPC_CNI_DECREASE_INTERVAL",
    "VPC_CNI_DEMAND_GROW_BATCH",
    "VPC_CNI_DEMAND_HOLD",
    "VPC_CNI_DEMAND_LEAD_TIME",
    "VPC_CNI_DEMAND_MIN_GROW",
    "VPC_CNI_DEMAND_MIN_RELEASE",
    "VPC_CNI_DEMAND_MIN_WARM",
    "VPC_CNI_DEMAND_WINDOW",
    "VPC_CNI_EC2_DESCRIBE_BURST",
    "VPC_CNI_EC2_DESCRIBE_RATE",
    "VPC_CNI_EC2_MAX_ATTEMPTS",
    "VPC_CNI_EC2_MUTATING_BURST",
    "VPC_CNI_EC2_MUTATING_RATE",
    "VPC_CNI_EC2_RETRY_BASE",
    "VPC_CNI_ENI_LINK_WAIT",
    "VPC_CNI_EXCLUDE_COOLDOWN_IPS",
    "VPC_CNI_GROW_PAST_MINIMUM",
    "VPC_CNI_HOST_NETWORKING",
    "VPC_CNI_IMMEDIATE_TOP_UP",
    "VPC_CNI_INSUFFICIENT_CAPACITY_BACKOFF",
    "VPC_CNI_LEAKED_ENI_DELAY",
    "VPC_CNI_LEAKED_ENI_INTERVAL",
    "VPC_CNI_MIN_ENI_AGE",
    "VPC_CNI_ORPHAN_GRACE",
    "VPC_CNI_ORPHAN_SWEEP",
    "VPC_CNI_POLICY",
    "VPC_CNI_POOL_TICK",
    "VPC_CNI_PREFIX_FALLBACK",
    "VPC_CNI_RECONCILE_INTERVAL",
    "VPC_CNI_SIM_INSTANCE_TYPE",
    "VPC_CNI_SIM_SUBNET_CIDR",
    "VPC_CNI_SIM_VPC_CIDR",
    "VPC_CNI_STABLE_SHRINK",
    "VPC_CNI_VERSION",
    "WARM_ENI_TARGET",
    "WARM_IP_TARGET",
    "WARM_PREFIX_TARGET",
];

/// Values at and just past the bounds the variables have, and the shapes they take.
fn edge_value() -> impl Strategy<Value = String> {
    let max_s = MAX_DURATION.as_secs();
    prop_oneof![
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("1".to_owned()),
        Just("575".to_owned()),
        Just("576".to_owned()),
        Just("1279".to_owned()),
        Just("1280".to_owned()),
        Just("9001".to_owned()),
        Just("9002".to_owned()),
        Just(u32::MAX.to_string()),
        Just((u64::from(u32::MAX) + 1).to_string()),
        Just(i64::MAX.to_string()),
        Just(i64::MIN.to_string()),
        Just(u64::MAX.to_string()),
        Just("99999999999999999999999".to_owned()),
        Just(max_s.to_string()),
        Just((max_s + 1).to_string()),
        Just(format!("{}m", max_s / 60 + 1)),
        Just(format!("{}h", u64::MAX / 3600)),
        Just(format!("{}ms", u64::MAX)),
        Just("0x0".to_owned()),
        Just("0xffffffff".to_owned()),
        Just("0x100000000".to_owned()),
        Just("0x".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("yes".to_owned()),
        Just("2h".to_owned()),
        Just("59s".to_owned()),
        Just("demand".to_owned()),
        Just("{}".to_owned()),
        Just(r#"{"a":1}"#.to_owned()),
        Just("10.0.0.0/8,".to_owned()),
        Just("http://".to_owned()),
        Just("unix:".to_owned()),
        Just("\u{0}".to_owned()),
        "[0-9]{1,25}(ms|s|m|h|d)?",
        "-?[0-9]{1,20}",
        any::<String>(),
    ]
}

/// `Config::parse` over `vars`, with every variable of a refused value named in the error.
fn check_config(vars: &[(&str, String)]) -> Result<(), TestCaseError> {
    let map: BTreeMap<&str, String> = vars.iter().map(|(k, v)| (*k, v.clone())).collect();
    let res = Config::parse(&|k| map.get(k).cloned(), &ipamd::config::Flags::default());
    match res {
        Ok(cfg) => {
            // Every duration accepted can be added to the clock (no deadline overflows).
            let now = tokio::time::Instant::now();
            for (name, d) in [
                ("ip_cooldown", cfg.ip_cooldown),
                ("http_timeout", cfg.http_timeout),
                ("pool_tick", cfg.pool_tick),
                ("decrease_interval", cfg.decrease_interval),
                ("min_eni_age", cfg.min_eni_age),
                ("insufficient_backoff", cfg.insufficient_backoff),
                ("reconcile_interval", cfg.reconcile_interval),
                ("orphan_grace", cfg.orphan_grace),
                ("eni_link_wait", cfg.eni_link_wait),
                ("leaked_eni_interval", cfg.leaked_eni_interval),
                ("retry_base", cfg.ec2.retry_base),
                (
                    "leaked_eni_first_delay",
                    cfg.leaked_eni_first_delay.unwrap_or_default(),
                ),
            ] {
                prop_assert!(
                    now.checked_add(d).is_some() && d <= MAX_DURATION,
                    "{name} = {d:?} accepted from {vars:?}"
                );
            }
        }
        Err(ConfigError::Invalid { var, .. }) => {
            prop_assert!(
                map.contains_key(var.as_str()),
                "error names {var}, which was not set, for {vars:?}"
            );
        }
        Err(e @ ConfigError::Combination(_)) => {
            let text = e.to_string();
            prop_assert!(
                map.keys().any(|k| text.contains(k)),
                "combination error {text:?} names none of {vars:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn every_variable_alone_is_parsed_or_named(
        i in 0..VARS.len(),
        v in edge_value(),
    ) {
        check_config(&[(VARS[i], v)])?;
    }

    #[test]
    fn every_pair_of_variables_is_parsed_or_one_is_named(
        i in 0..VARS.len(),
        j in 0..VARS.len(),
        a in edge_value(),
        b in edge_value(),
    ) {
        prop_assume!(i != j);
        check_config(&[(VARS[i], a), (VARS[j], b)])?;
    }
}

/// Every variable with each edge value, exhaustively (not random): about 3,000 parses.
#[test]
fn every_variable_with_every_edge_value() {
    let max_s = MAX_DURATION.as_secs();
    let edges = [
        "-1".to_owned(),
        "0".to_owned(),
        u32::MAX.to_string(),
        (u64::from(u32::MAX) + 1).to_string(),
        i64::MAX.to_string(),
        u64::MAX.to_string(),
        max_s.to_string(),
        (max_s + 1).to_string(),
        format!("{}h", u64::MAX / 3600),
        format!("{}ms", u64::MAX),
        "2h".to_owned(),
        "0x100000000".to_owned(),
        "x".to_owned(),
        " ".to_owned(),
        "true".to_owned(),
    ];
    for var in VARS {
        for v in &edges {
            check_config(&[(var, v.clone())]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

// --- checkpoint ---------------------------------------------------------------------------

/// A node with one ENI holding `10.0.0.0/24` as /32s and one holding a /28 (built once).
fn v4_store() -> DataStore {
    static STORE: std::sync::OnceLock<DataStore> = std::sync::OnceLock::new();
    STORE.get_or_init(build_v4_store).clone()
}

fn build_v4_store() -> DataStore {
    let mut ds = DataStore::new(false, true, false, Duration::from_secs(30));
    for (id, dev) in [("eni-0", 0u32), ("eni-1", 1)] {
        ds.add_eni(
            EniSpec {
                id: id.into(),
                mac: format!("02:00:00:00:00:0{dev}"),
                is_primary: dev == 0,
                is_trunk: false,
                is_efa: false,
                device_number: dev,
                primary_ip: format!("10.0.{dev}.5").parse().unwrap(),
                subnet_id: "subnet-1".into(),
                subnet_cidr: "10.0.0.0/16".parse().unwrap(),
                excluded: false,
            },
            Duration::ZERO,
        );
    }
    for i in 0..=255u32 {
        ds.add_cidr("eni-0", format!("10.0.0.{i}/32").parse().unwrap(), false)
            .unwrap();
    }
    ds.add_cidr("eni-1", "10.0.1.16/28".parse().unwrap(), true)
        .unwrap();
    ds
}

const V6_PREFIX: &str = "2600:1f14:abc:de01:5c3a::/80";

fn v6_store() -> DataStore<V6> {
    let mut ds = DataStore::new_v6(Duration::from_secs(30));
    ds.add_eni(
        EniSpec {
            id: "eni-0".into(),
            mac: "02:00:00:00:00:00".into(),
            is_primary: true,
            is_trunk: false,
            is_efa: false,
            device_number: 0,
            primary_ip: "10.0.0.5".parse().unwrap(),
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/16".parse().unwrap(),
            excluded: false,
        },
        Duration::ZERO,
    );
    ds.add_cidr("eni-0", V6_PREFIX.parse().unwrap(), true)
        .unwrap();
    ds
}

/// Addresses the stores above hold: v4 from `10.0.0.0/24` and `10.0.1.16/28`, v6 from the /80.
fn v4_addr(i: u16) -> String {
    let i = i % 272;
    if i < 256 {
        format!("10.0.0.{i}")
    } else {
        format!("10.0.1.{}", 16 + (i - 256))
    }
}

fn v6_addr(i: u16) -> String {
    format!("2600:1f14:abc:de01:5c3a::{i:x}")
}

/// Strings as pods, runtimes and old daemons put them in keys and metadata.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-f0-9]{64}",
        "[a-z0-9-]{1,20}",
        Just(String::new()),
        any::<String>(),
    ]
}

fn allocation(v6: bool) -> impl Strategy<Value = (u16, Allocation)> {
    (
        any::<u16>(),
        name(),
        name(),
        prop_oneof![Just("eth0".to_owned()), "[a-z0-9]{1,15}"],
        any::<i64>(),
        name(),
        name(),
        0u32..3,
    )
        .prop_map(move |(i, net, c, ifn, ts, ns, pod, n)| {
            let (ipv4, ipv6) = if v6 {
                (String::new(), v6_addr(i))
            } else {
                (v4_addr(i), String::new())
            };
            (
                i,
                Allocation {
                    network_name: if net.is_empty() {
                        "aws-cni".into()
                    } else {
                        net
                    },
                    container_id: c,
                    if_name: ifn,
                    ipv4,
                    ipv6,
                    allocation_timestamp: ts,
                    metadata: IpamMetadata {
                        pod_namespace: ns,
                        pod_name: pod,
                        interfaces_count: n,
                    },
                },
            )
        })
}

/// A valid checkpoint of distinct addresses and distinct keys, as bytes.
fn valid_file(v6: bool) -> impl Strategy<Value = (CheckpointFile, Vec<u8>)> {
    proptest::collection::vec(allocation(v6), 0..24).prop_map(|allocs| {
        let mut ips = BTreeSet::new();
        let mut keys = BTreeSet::new();
        let allocs: Vec<Allocation> = allocs
            .into_iter()
            .filter(|(_, a)| {
                let ip = if a.ipv4.is_empty() { &a.ipv6 } else { &a.ipv4 };
                ips.insert(ip.clone())
                    && keys.insert((
                        a.network_name.clone(),
                        a.container_id.clone(),
                        a.if_name.clone(),
                    ))
            })
            .map(|(_, a)| a)
            .collect();
        let file = CheckpointFile::new(allocs);
        let mut bytes = serde_json::to_vec(&file).unwrap();
        bytes.push(b'\n');
        (file, bytes)
    })
}

/// The (address, key) pairs of a file that name an address of the family.
fn entries(file: &CheckpointFile, v6: bool) -> BTreeSet<(String, IpamKey)> {
    file.allocations
        .iter()
        .filter_map(|a| {
            let ip = if v6 { &a.ipv6 } else { &a.ipv4 };
            let ip = if v6 {
                ip.parse::<std::net::Ipv6Addr>().ok()?.to_string()
            } else {
                ip.parse::<std::net::Ipv4Addr>().ok()?.to_string()
            };
            Some((
                ip,
                IpamKey::new(&a.network_name, &a.container_id, &a.if_name),
            ))
        })
        .collect()
}

/// Whether the test stores hold `ip` (v4: `10.0.0.0/24` and `10.0.1.16/28`; v6: the /80).
fn held_by_store(ip: &str, v6: bool) -> bool {
    if v6 {
        let net: ipamd::types::Ipv6Net = V6_PREFIX.parse().unwrap();
        ip.parse().is_ok_and(|a| net.contains(a))
    } else {
        ["10.0.0.0/24", "10.0.1.16/28"].iter().any(|n| {
            let net: ipamd::types::Ipv4Net = n.parse().unwrap();
            ip.parse().is_ok_and(|a| net.contains(a))
        })
    }
}

fn restored_v4(ds: &DataStore) -> BTreeSet<(String, IpamKey)> {
    ds.assignments()
        .into_iter()
        .map(|(ip, k)| (ip.to_string(), k))
        .collect()
}

fn restored_v6(ds: &DataStore<V6>) -> BTreeSet<(String, IpamKey)> {
    ds.assignments()
        .into_iter()
        .map(|(ip, k)| (ip.to_string(), k))
        .collect()
}

/// The error of a refused file names where: a JSON path, the version, or the size.
fn names_a_place(e: &CheckpointError) -> bool {
    match e {
        CheckpointError::Corrupt { field, .. } => {
            !field.is_empty() && e.to_string().contains(field.as_str())
        }
        CheckpointError::Foreign { .. } => e.to_string().contains("version"),
        CheckpointError::TooLarge { .. } => true,
        _ => false,
    }
}

/// Restores `bytes` in the family's store; checks "nothing dropped" for an accepted file
/// and "nothing changed" for a refused one. Returns whether it was accepted.
fn restore_checked(bytes: &[u8], v6: bool) -> Result<bool, TestCaseError> {
    let file = match parse(Path::new("/x/ipam.json"), bytes) {
        Ok(f) => f,
        Err(e) => {
            prop_assert!(names_a_place(&e), "error names no field: {e}");
            return Ok(false);
        }
    };
    // Everything of the family is restored but addresses outside every known CIDR (spec
    // 3.4: dropped as stale, and reported).
    let want: BTreeSet<_> = entries(&file, v6)
        .into_iter()
        .filter(|(ip, _)| held_by_store(ip, v6))
        .collect();
    if v6 {
        let mut ds = v6_store();
        match ds.restore(&file, &|_, _| true) {
            Ok(r) => {
                prop_assert_eq!(r.restored, want.len());
                prop_assert!(r.dropped_stale.is_empty());
                for (ip, _) in &r.dropped_unknown {
                    prop_assert!(!held_by_store(&ip.to_string(), true));
                }
                prop_assert_eq!(restored_v6(&ds), want);
            }
            Err(e) => {
                prop_assert!(e.to_string().contains("field"), "{e}");
                prop_assert!(ds.assignments().is_empty(), "refused but changed");
                return Ok(false);
            }
        }
    } else {
        let mut ds = v4_store();
        match ds.restore(&file, &|_, _| true) {
            Ok(r) => {
                prop_assert_eq!(r.restored, want.len());
                prop_assert!(r.dropped_stale.is_empty());
                for (ip, _) in &r.dropped_unknown {
                    prop_assert!(!held_by_store(&ip.to_string(), false));
                }
                prop_assert_eq!(restored_v4(&ds), want);
            }
            Err(e) => {
                prop_assert!(e.to_string().contains("field"), "{e}");
                prop_assert!(ds.assignments().is_empty(), "refused but changed");
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// JSON values of every type.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
        Just(serde_json::json!([1, "a"])),
        Just(serde_json::json!({"x": 1})),
    ]
}

const FIELDS: &[&str] = &[
    "networkName",
    "containerID",
    "ifName",
    "ipv4",
    "ipv6",
    "allocationTimestamp",
    "metadata",
    "metadata.k8sPodNamespace",
    "metadata.k8sPodName",
    "metadata.interfacesCount",
];

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn checkpoint_round_trips_and_restores_every_entry(v6 in any::<bool>(), (file, bytes) in valid_file(false)) {
        // The generated file is v4; rewrite to v6 when asked.
        let (file, bytes) = if v6 {
            let mut f = file;
            for (n, a) in f.allocations.iter_mut().enumerate() {
                a.ipv6 = v6_addr(n as u16);
                a.ipv4.clear();
            }
            let mut b = serde_json::to_vec(&f).unwrap();
            b.push(b'\n');
            (f, b)
        } else {
            (file, bytes)
        };
        prop_assert_eq!(parse(Path::new("x"), &bytes).unwrap(), file);
        prop_assert!(restore_checked(&bytes, v6)?, "a valid file was refused");
    }

    #[test]
    fn checkpoint_wrong_types_name_the_field(
        v6 in any::<bool>(),
        (file, _bytes) in valid_file(false),
        which in 0..FIELDS.len(),
        value in json_value(),
        at in any::<prop::sample::Index>(),
    ) {
        prop_assume!(!file.allocations.is_empty());
        let mut doc = serde_json::to_value(&file).unwrap();
        let n = at.index(file.allocations.len());
        let entry = &mut doc["allocations"][n];
        if v6 {
            entry["ipv6"] = serde_json::Value::String(v6_addr(n as u16));
            if let Some(o) = entry.as_object_mut() {
                o.remove("ipv4");
            }
        }
        let path = FIELDS[which];
        match path.split_once('.') {
            Some((outer, inner)) => {
                if !entry[outer].is_object() {
                    entry[outer] = serde_json::json!({});
                }
                entry[outer][inner] = value.clone();
            }
            None => entry[path] = value.clone(),
        }
        let bytes = serde_json::to_vec(&doc).unwrap();
        match parse(Path::new("x"), &bytes) {
            Ok(_) => {
                restore_checked(&bytes, v6)?;
            }
            Err(e) => {
                let text = e.to_string();
                let leaf = path.rsplit('.').next().unwrap_or(path);
                prop_assert!(
                    text.contains(&format!("allocations[{n}]")) && text.contains(leaf),
                    "{} = {} refused without naming it: {}", path, value, text
                );
            }
        }
    }

    #[test]
    fn checkpoint_unknown_fields_are_ignored_and_nothing_dropped(
        (file, _bytes) in valid_file(false),
        extra in "[a-zA-Z_]{1,12}",
        value in json_value(),
    ) {
        prop_assume!(!FIELDS.contains(&extra.as_str()) && extra != "version" && extra != "allocations");
        let mut doc = serde_json::to_value(&file).unwrap();
        doc[&extra] = value.clone();
        for a in doc["allocations"].as_array_mut().unwrap() {
            a[&extra] = value.clone();
            a["metadata"][&extra] = value.clone();
        }
        let bytes = serde_json::to_vec(&doc).unwrap();
        prop_assert_eq!(parse(Path::new("x"), &bytes).unwrap(), file);
        prop_assert!(restore_checked(&bytes, false)?);
    }

    #[test]
    fn checkpoint_duplicates_are_refused_whole_and_change_nothing(
        v6 in any::<bool>(),
        (file, _bytes) in valid_file(false),
        same_ip in any::<bool>(),
        at in any::<prop::sample::Index>(),
    ) {
        prop_assume!(!file.allocations.is_empty());
        let mut f = file;
        if v6 {
            for (n, a) in f.allocations.iter_mut().enumerate() {
                a.ipv6 = v6_addr(n as u16);
                a.ipv4.clear();
            }
        }
        let n = at.index(f.allocations.len());
        let mut dup = f.allocations[n].clone();
        if same_ip {
            dup.container_id.push_str("-other");
        } else if v6 {
            dup.ipv6 = v6_addr(0xffff);
        } else {
            dup.ipv4 = "10.0.0.255".into();
            prop_assume!(f.allocations.iter().all(|a| a.ipv4 != dup.ipv4));
        }
        f.allocations.push(dup);
        let mut bytes = serde_json::to_vec(&f).unwrap();
        bytes.push(b'\n');
        prop_assert!(!restore_checked(&bytes, v6)?, "a duplicate was accepted");
    }

    #[test]
    fn checkpoint_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), v6 in any::<bool>()) {
        restore_checked(&bytes, v6)?;
    }

    #[test]
    fn checkpoint_mangled_bytes_never_panic(
        (_file, bytes) in valid_file(false),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        v6 in any::<bool>(),
    ) {
        let mut b = bytes;
        for (i, x) in edits {
            let i = i.index(b.len());
            b[i] = x;
        }
        restore_checked(&b, v6)?;
    }
}

proptest! {
    // Every cut of a file is a case of its own: 16 files of up to 8 entries, ~15,000 cuts.
    #![proptest_config(cases(16))]

    #[test]
    fn checkpoint_truncated_at_every_byte_is_refused_or_whole(
        v6 in any::<bool>(),
        allocs in proptest::collection::vec(allocation(false), 0..8),
    ) {
        let mut f = CheckpointFile::new(Vec::new());
        for (n, (_, mut a)) in allocs.into_iter().enumerate() {
            if v6 {
                a.ipv4.clear();
                a.ipv6 = v6_addr(n as u16);
            } else {
                a.ipv4 = v4_addr(n as u16);
            }
            a.container_id = format!("{}-{n}", a.container_id);
            f.allocations.push(a);
        }
        let mut bytes = serde_json::to_vec(&f).unwrap();
        bytes.push(b'\n');
        prop_assert!(restore_checked(&bytes, v6)?);
        for cut in 0..bytes.len() {
            let part = &bytes[..cut];
            match parse(Path::new("x"), part) {
                // Only the file without its trailing newline is still the whole file.
                Ok(got) => {
                    prop_assert_eq!(&got, &f, "prefix of {} bytes accepted", cut);
                    prop_assert!(restore_checked(part, v6)?);
                }
                Err(e) => prop_assert!(names_a_place(&e), "{}", e),
            }
        }
    }
}

/// Huge inputs: 64 MiB of whitespace and a million entries are refused by size without
/// being parsed; a file just under the limit of valid entries is parsed whole.
#[test]
fn checkpoint_huge_files_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ipam.json");
    let limit = ipamd::store::checkpoint::MAX_FILE_BYTES as usize;

    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..64 {
            w.write_all(&spaces).unwrap();
        }
        w.write_all(br#"{"version":"vpc-cni-ipam/1","allocations":[]}"#)
            .unwrap();
    }
    let size = std::fs::metadata(&p).unwrap().len();
    let e = FileStore::new(&p).read().unwrap_err();
    assert!(matches!(e, CheckpointError::TooLarge { .. }), "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), size, "left as it was");

    let entry = |i: u32| {
        format!(
            r#"{{"networkName":"aws-cni","containerID":"{i:064x}","ifName":"eth0","ipv4":"10.{}.{}.{}","allocationTimestamp":1700000000000000000,"metadata":{{"k8sPodNamespace":"default","k8sPodName":"pod-{i}"}}}}"#,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )
    };
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        w.write_all(br#"{"version":"vpc-cni-ipam/1","allocations":["#)
            .unwrap();
        for i in 0..1_000_000u32 {
            if i > 0 {
                w.write_all(b",").unwrap();
            }
            w.write_all(entry(i).as_bytes()).unwrap();
        }
        w.write_all(b"]}\n").unwrap();
    }
    assert!(std::fs::metadata(&p).unwrap().len() > limit as u64);
    let e = FileStore::new(&p).read().unwrap_err();
    assert!(matches!(e, CheckpointError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("larger than"), "{e}");

    // Just under the limit: every entry parsed.
    let mut under = br#"{"version":"vpc-cni-ipam/1","allocations":["#.to_vec();
    let mut n = 0u32;
    while under.len() + 400 < limit {
        if n > 0 {
            under.push(b',');
        }
        under.extend_from_slice(entry(n).as_bytes());
        n += 1;
    }
    under.extend_from_slice(b"]}\n");
    std::fs::write(&p, &under).unwrap();
    let f = FileStore::new(&p).read().unwrap().unwrap();
    assert_eq!(f.allocations.len(), n as usize);
}

/// Non-UTF-8 bytes inside a string are refused, naming the field.
#[test]
fn checkpoint_non_utf8_is_refused_naming_the_field() {
    let mut b =
        br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":""#
            .to_vec();
    b.extend_from_slice(&[0xff, 0xfe, b'x']);
    b.extend_from_slice(br#"","ifName":"eth0","ipv4":"10.0.0.1"}]}"#);
    let e = parse(Path::new("x"), &b).unwrap_err();
    assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("allocations[0]"), "{e}");
    assert!(matches!(restore_checked(&b, false), Ok(false)));
}

/// A refused file stays on disk as it was.
#[test]
fn a_refused_checkpoint_file_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ipam.json");
    for bytes in [
        &br#"{"version":"vpc-cni-ipam/1","allocations":[{"#[..],
        br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":7}]}"#,
        br#"{"version":"vpc-cni-ipam/2","allocations":[]}"#,
        b"\xff\xfe",
    ] {
        std::fs::write(&p, bytes).unwrap();
        let s = FileStore::new(&p);
        assert!(s.read().is_err());
        assert_eq!(s.remove_stale_temps(), 0);
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }
}

#[test]
fn refusals_name_the_duplicate() {
    let f = CheckpointFile::new(vec![]);
    assert!(v4_store().restore(&f, &|_, _| true).is_ok());
    let e = DsError::DuplicateIp("10.0.0.1".into()).to_string();
    assert!(e.contains("field"), "{e}");
}

// --- gRPC requests ------------------------------------------------------------------------

mod grpc {
    use super::*;
    use std::sync::{Arc, Mutex};

    use ipamd::serve::grpc::{Backend, BackendEvents, ReplySettings, VERSION};
    use ipamd::store::checkpoint::MemoryStore;
    use ipamd::store::commit::{PoolState, TokioClock};
    use tonic::{Code, Request};
    use vpc_cni_rpc::{AddNetworkRequest, CniBackend, DelNetworkRequest};

    /// The proto names of the request fields: a refusal starts with one of them.
    const FIELD_NAMES: &[&str] = &[
        "ClientVersion",
        "ContainerID",
        "IfName",
        "NetworkName",
        "K8S_POD_NAME",
        "K8S_POD_NAMESPACE",
        "K8S_POD_INFRA_CONTAINER_ID",
        "Netns",
        "K8S_POD_UID",
        "Reason",
    ];

    /// The checkpoint store as the test sees it (shared with the state).
    struct Shared(Arc<MemoryStore>);

    impl CheckpointStore for Shared {
        fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError> {
            self.0.read()
        }
        fn write(&self, f: &CheckpointFile) -> Result<(), CheckpointError> {
            self.0.write(f)
        }
    }

    /// Every DelNetwork reason label the backend reported.
    #[derive(Default)]
    struct Reasons(Mutex<BTreeSet<String>>);

    impl BackendEvents for Reasons {
        fn del_request(&self, reason: &str) {
            self.0.lock().unwrap().insert(reason.to_owned());
        }
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        })
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-f0-9]{64}",
            4 => "[a-z0-9][a-z0-9_.-]{0,20}",
            2 => Just(String::new()),
            2 => any::<String>(),
            1 => Just("eth0".to_owned()),
            1 => Just("aws-cni".to_owned()),
            1 => Just("a/b".to_owned()),
            1 => Just("a\nb".to_owned()),
            1 => Just("\u{0}".to_owned()),
            1 => Just(".".to_owned()),
            1 => Just("é".to_owned()),
            1 => prop::sample::select(vec![14usize, 15, 16, 63, 64, 65, 252, 253, 254, 255, 256, 257, 4096, 4097, 1 << 16, 1 << 20])
                .prop_map(|n| "a".repeat(n)),
        ]
    }

    fn version() -> impl Strategy<Value = String> {
        prop_oneof![8 => Just(VERSION.to_owned()), 1 => Just(String::new()), 1 => any::<String>()]
    }

    fn add_req() -> impl Strategy<Value = AddNetworkRequest> {
        (
            version(),
            text(),
            text(),
            text(),
            text(),
            text(),
            text(),
            text(),
            any::<bool>(),
        )
            .prop_map(
                |(v, pod, ns, infra, c, ifn, net, netns, multi)| AddNetworkRequest {
                    client_version: v,
                    k8s_pod_name: pod,
                    k8s_pod_namespace: ns,
                    k8s_pod_infra_container_id: infra,
                    container_id: c,
                    if_name: ifn,
                    network_name: net,
                    netns,
                    requires_multi_nic_attachment: multi,
                },
            )
    }

    fn del_req() -> impl Strategy<Value = DelNetworkRequest> {
        (
            version(),
            text(),
            text(),
            text(),
            text(),
            text(),
            text(),
            text(),
            text(),
        )
            .prop_map(
                |(v, pod, ns, infra, c, ifn, net, reason, uid)| DelNetworkRequest {
                    client_version: v,
                    k8s_pod_name: pod,
                    k8s_pod_namespace: ns,
                    k8s_pod_infra_container_id: infra,
                    reason,
                    container_id: c,
                    if_name: ifn,
                    network_name: net,
                    k8s_pod_uid: uid,
                },
            )
    }

    fn good_add(i: u8) -> AddNetworkRequest {
        AddNetworkRequest {
            client_version: VERSION.into(),
            k8s_pod_name: format!("pod-{i}"),
            k8s_pod_namespace: "default".into(),
            container_id: format!("c{i}"),
            if_name: "eth0".into(),
            network_name: "aws-cni".into(),
            netns: "/var/run/netns/x".into(),
            ..Default::default()
        }
    }

    fn good_del(i: u8) -> DelNetworkRequest {
        DelNetworkRequest {
            client_version: VERSION.into(),
            container_id: format!("c{i}"),
            if_name: "eth0".into(),
            network_name: "aws-cni".into(),
            reason: "PodDeleted".into(),
            ..Default::default()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(AddNetworkRequest),
        Del(DelNetworkRequest),
        /// A request as the plugin sends it for pod `i` (so that DELs find something).
        GoodAdd(u8),
        GoodDel(u8),
        /// A hostile DEL naming a held pod with one field mangled.
        MangledDel(u8, DelNetworkRequest),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => add_req().prop_map(Op::Add),
            3 => del_req().prop_map(Op::Del),
            2 => (0u8..12).prop_map(Op::GoodAdd),
            1 => (0u8..12).prop_map(Op::GoodDel),
            2 => ((0u8..12), del_req()).prop_map(|(i, d)| Op::MangledDel(i, d)),
        ]
    }

    /// `good` with one of its fields taken from `m` (which one: by `i`).
    fn mangle_del(mut good: DelNetworkRequest, m: DelNetworkRequest, i: u8) -> DelNetworkRequest {
        match i % 9 {
            0 => good.client_version = m.client_version,
            1 => good.container_id = m.container_id,
            2 => good.if_name = m.if_name,
            3 => good.network_name = m.network_name,
            4 => good.reason = m.reason,
            5 => good.k8s_pod_name = m.k8s_pod_name,
            6 => good.k8s_pod_namespace = m.k8s_pod_namespace,
            7 => good.k8s_pod_uid = m.k8s_pod_uid,
            _ => good.k8s_pod_infra_container_id = m.k8s_pod_infra_container_id,
        }
        good
    }

    type Held = BTreeSet<(String, IpamKey)>;

    fn held(st: &PoolState) -> Held {
        st.lock()
            .assignments()
            .into_iter()
            .map(|(ip, k)| (ip.to_string(), k))
            .collect()
    }

    fn refusal_names_a_field(s: &tonic::Status) -> bool {
        FIELD_NAMES.iter().any(|f| s.message().starts_with(f))
    }

    /// An accepted key is one a well-behaved plugin could send.
    fn bounded_key(k: &IpamKey) -> bool {
        let ok = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
        };
        ok(&k.container_id, 256) && ok(&k.if_name, 15) && ok(&k.network_name, 253)
    }

    async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mem = Arc::new(MemoryStore::default());
        let st = Arc::new(PoolState::new(
            build_v4_store(),
            Box::new(Shared(mem.clone())),
            Arc::new(TokioClock::new()),
        ));
        let reasons = Arc::new(Reasons::default());
        let b = Backend::new(st.clone(), ReplySettings::default()).with_events(reasons.clone());
        for op in ops {
            let before = held(&st);
            match op.clone() {
                Op::Add(r) => {
                    let key = IpamKey::new(&r.network_name, &r.container_id, &r.if_name);
                    match b.add_network(Request::new(r.clone())).await {
                        Err(s) => {
                            prop_assert!(
                                matches!(
                                    s.code(),
                                    Code::InvalidArgument | Code::FailedPrecondition
                                ),
                                "{:?}",
                                s
                            );
                            prop_assert!(refusal_names_a_field(&s), "{:?}", s.message());
                            prop_assert_eq!(held(&st), before, "refused ADD changed the store");
                        }
                        Ok(reply) => {
                            let reply = reply.into_inner();
                            let now = held(&st);
                            if reply.success {
                                prop_assert!(bounded_key(&key), "accepted key {:?}", key);
                                prop_assert!(
                                    r.k8s_pod_name.len() <= 253 && r.k8s_pod_namespace.len() <= 253
                                );
                                let ip = reply.ip_allocation_metadata[0].i_pv4_addr.clone();
                                let mut want = before.clone();
                                want.insert((ip, key));
                                prop_assert_eq!(now, want);
                            } else {
                                prop_assert_eq!(now, before);
                            }
                        }
                    }
                }
                Op::GoodAdd(i) => {
                    let r = b.add_network(Request::new(good_add(i))).await;
                    prop_assert!(r.is_ok_and(|r| r.into_inner().success));
                }
                Op::Del(_) | Op::MangledDel(..) => {
                    let r = match op {
                        Op::MangledDel(i, m) => mangle_del(good_del(i), m, i),
                        Op::Del(r) => r,
                        _ => unreachable!(),
                    };
                    let key = IpamKey::new(&r.network_name, &r.container_id, &r.if_name);
                    let held_key = before.iter().any(|(_, k)| *k == key);
                    match b.del_network(Request::new(r)).await {
                        Ok(reply) => {
                            prop_assert!(reply.into_inner().success);
                            prop_assert!(held_key);
                            let want: Held =
                                before.iter().filter(|(_, k)| *k != key).cloned().collect();
                            prop_assert_eq!(held(&st), want);
                        }
                        Err(s) => {
                            prop_assert!(
                                vpc_cni_rpc::is_unknown_pod(&s) || refusal_names_a_field(&s),
                                "{:?}",
                                s
                            );
                            prop_assert_eq!(held(&st), before, "refused DEL changed the store");
                        }
                    }
                }
                Op::GoodDel(i) => {
                    let _ = b.del_network(Request::new(good_del(i))).await;
                }
            }
        }
        // Nothing dropped: what the datastore holds is what the checkpoint says.
        let disk = mem
            .current()
            .unwrap_or_else(|| CheckpointFile::new(Vec::new()));
        prop_assert_eq!(entries(&disk, false), held(&st));
        for r in reasons.0.lock().unwrap().iter() {
            prop_assert!(
                ["PodDeleted", "SetupNSFailed", "", "other"].contains(&r.as_str()),
                "metric label {:?} taken from a request",
                r
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(48))]

        #[test]
        fn grpc_requests_are_served_or_refused_naming_the_field(ops in proptest::collection::vec(op(), 1..24)) {
            runtime().block_on(run(ops))?;
        }
    }
}

// --- ENIConfig and Node objects -----------------------------------------------------------

mod k8s {
    use super::*;
    use http::{Request, Response};
    use ipamd::io::k8s::{check_eni_config, is_object_name, K8s, K8sError};
    use kube::client::Body;
    use serde_json::{json, Value};

    /// Serves every GET: the Node as `node`, any ENIConfig as `eni_config`.
    async fn api_server(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        node: Vec<u8>,
        eni_config: Vec<u8>,
    ) {
        while let Some((req, send)) = handle.next_request().await {
            let body = if req.uri().path().starts_with("/api/v1/nodes/") {
                node.clone()
            } else {
                eni_config.clone()
            };
            send.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
    }

    fn node_json(labels: Value, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": labels, "annotations": annotations},
            "status": {"capacity": {"pods": "110"}}
        })
    }

    /// Values for one label or annotation: names an ENIConfig could have, and not.
    fn label_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?".prop_map(Value::String),
            1 => any::<String>().prop_map(Value::String),
            1 => Just(Value::String("../../api/v1/secrets/x".into())),
            1 => Just(Value::String("UPPER".into())),
            1 => Just(Value::String("a".repeat(254))),
            1 => Just(Value::String("a".repeat(1 << 20))),
            1 => Just(Value::String(String::new())),
            1 => json_value(),
        ]
    }

    fn labels() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("k8s.amazonaws.com/eniConfig".to_owned()),
            Just("vpc.amazonaws.com/externalEniConfig".to_owned()),
            "[a-z./]{1,20}",
        ];
        prop_oneof![
            6 => proptest::collection::btree_map(key, label_value(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            1 => json_value(),
        ]
    }

    fn id_like(prefix: &'static str) -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => "[0-9a-f]{17}".prop_map(move |h| Value::String(format!("{prefix}{h}"))),
            1 => any::<String>().prop_map(Value::String),
            1 => Just(Value::String(String::new())),
            1 => Just(Value::String(format!("{prefix}{}", "f".repeat(1 << 16)))),
            1 => json_value(),
        ]
    }

    fn eni_config_json() -> impl Strategy<Value = Value> {
        let groups = prop_oneof![
            3 => proptest::collection::vec(id_like("sg-"), 0..4).prop_map(Value::Array),
            1 => json_value(),
        ];
        (id_like("subnet-"), groups, 0u8..4).prop_map(|(subnet, groups, shape)| {
            let spec = match shape {
                0 => json!({"subnet": subnet, "securityGroups": groups}),
                1 => json!({"subnet": subnet}),
                2 => json!({"securityGroups": groups}),
                _ => subnet,
            };
            json!({"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
                   "metadata": {"name": "x"}, "spec": spec})
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn node_eni_config(
        node: Vec<u8>,
        eni: Vec<u8>,
    ) -> Result<(String, ipamd::io::k8s::EniConfigSpec), K8sError> {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(api_server(handle, node, eni));
        let k = K8s::new(client, "n1", "aws-node-1", "kube-system");
        let r = tokio::time::timeout(Duration::from_secs(10), k.node_eni_config())
            .await
            .expect("no answer within 10 s");
        drop(k);
        server.abort();
        r
    }

    fn check(
        r: &Result<(String, ipamd::io::k8s::EniConfigSpec), K8sError>,
    ) -> Result<(), TestCaseError> {
        match r {
            Ok((name, spec)) => {
                prop_assert!(is_object_name(name), "ENIConfig name {:?} used", name);
                prop_assert!(check_eni_config(spec).is_ok(), "spec {:?} used", spec);
            }
            Err(e @ K8sError::BadObject { field, .. }) => {
                prop_assert!(
                    !field.is_empty() && e.to_string().contains(field.as_str()),
                    "{}",
                    e
                );
                prop_assert!(
                    e.to_string().len() < 2048,
                    "message of {} bytes",
                    e.to_string().len()
                );
            }
            Err(e) => prop_assert!(false, "unexpected error {e}: {e:?}"),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(96))]

        #[test]
        fn node_and_eni_config_objects_are_used_or_refused_naming_the_field(
            labels in labels(),
            annotations in labels(),
            eni in eni_config_json(),
        ) {
            let node = serde_json::to_vec(&node_json(labels, annotations)).unwrap();
            let eni = serde_json::to_vec(&eni).unwrap();
            let r = runtime().block_on(node_eni_config(node, eni));
            check(&r)?;
        }

        #[test]
        fn mangled_object_bytes_are_refused_naming_the_field(
            eni in eni_config_json(),
            cut in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let node = serde_json::to_vec(&node_json(json!({"k8s.amazonaws.com/eniConfig": "a"}), json!({}))).unwrap();
            let mut eni = serde_json::to_vec(&eni).unwrap();
            let at = cut.index(eni.len());
            eni.truncate(at);
            eni.extend_from_slice(&junk);
            let r = runtime().block_on(node_eni_config(node, eni));
            match &r {
                Err(K8sError::Request { .. }) => {}
                other => check(other)?,
            }
        }
    }
}

// --- raw gRPC bodies over the unix socket -------------------------------------------------

mod grpc_raw {
    use super::*;
    use std::sync::Arc;

    use bytes::{Buf, BufMut};
    use ipamd::serve::grpc::{routes, Backend, ReplySettings, VERSION};
    use ipamd::store::checkpoint::MemoryStore;
    use ipamd::store::commit::{PoolState, TokioClock};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::{Request, Status};

    /// Sends and receives message bodies as bytes, whatever they hold.
    #[derive(Default, Clone, Copy)]
    struct Raw;
    struct RawEnc;
    struct RawDec;

    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let mut out = Vec::new();
            while buf.has_remaining() {
                let c = buf.chunk();
                out.extend_from_slice(c);
                let n = c.len();
                buf.advance(n);
            }
            Ok(Some(out))
        }
    }

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }

    struct Server {
        sock: std::path::PathBuf,
        state: Arc<PoolState>,
        _dir: tempfile::TempDir,
    }

    /// The real gRPC server on a unix socket in a temporary directory, started once.
    fn server() -> &'static Server {
        static S: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("ipamd.sock");
            let state = Arc::new(PoolState::new(
                build_v4_store(),
                Box::new(MemoryStore::default()),
                Arc::new(TokioClock::new()),
            ));
            let backend = Backend::new(state.clone(), ReplySettings::default());
            let s = sock.clone();
            grpc_runtime().spawn(async move {
                let (_health, health_srv) = vpc_cni_rpc::health_service().await;
                let _ =
                    vpc_cni_rpc::serve_unix(s, routes(backend, health_srv), std::future::pending())
                        .await;
            });
            Server {
                sock,
                state,
                _dir: dir,
            }
        })
    }

    fn grpc_runtime() -> &'static tokio::runtime::Runtime {
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        })
    }

    const METHODS: &[&str] = &[
        "/rpc.CNIBackend/AddNetwork",
        "/rpc.CNIBackend/DelNetwork",
        "/rpc.ConfigServerBackend/GetNetworkPolicyConfigs",
        "/grpc.health.v1.Health/Check",
    ];

    /// A protobuf-ish body: random bytes, or a real request with bytes changed.
    /// The protobuf encoding of string fields `(number, value)`.
    fn encode(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in fields {
            b.push((n << 3) | 2);
            let mut len = v.len();
            loop {
                let byte = (len & 0x7f) as u8;
                len >>= 7;
                if len == 0 {
                    b.push(byte);
                    break;
                }
                b.push(byte | 0x80);
            }
            b.extend_from_slice(v.as_bytes());
        }
        b
    }

    fn good_add(c: &str) -> Vec<u8> {
        encode(&[(8, VERSION), (7, c), (5, "eth0"), (6, "aws-cni")])
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        let real = good_add("c1");
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6).prop_map(
                move |edits| {
                    let mut b = real.clone();
                    for (i, x) in edits {
                        let i = i.index(b.len());
                        b[i] = x;
                    }
                    b
                }
            ),
            // A field of a wire type the message does not have, and one of 1 MiB.
            Just(vec![0x3a, 0x80, 0x80, 0x40]),
            Just({
                let mut b = vec![0x3a, 0x80, 0x80, 0x40];
                b.resize(4 + (1 << 20), b'a');
                b
            }),
        ]
    }

    proptest! {
        #![proptest_config(cases(64))]

        #[test]
        fn raw_grpc_bodies_over_the_socket_are_answered(which in 0..METHODS.len(), bytes in body()) {
            let s = server();
            grpc_runtime().block_on(async {
                let before = s.state.lock().assignments();
                let ch = loop {
                    match vpc_cni_rpc::connect_channel(&s.sock, Duration::from_secs(5)).await {
                        Ok(c) => break c,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                };
                let mut g = tonic::client::Grpc::new(ch.clone());
                g.ready().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let path = http::uri::PathAndQuery::from_static(METHODS[which]);
                let r = tokio::time::timeout(Duration::from_secs(10), g.unary(Request::new(bytes.clone()), path, Raw)).await;
                prop_assert!(r.is_ok(), "no answer within 10 s");
                let after = s.state.lock().assignments();
                if let Ok(Err(status)) = &r {
                    prop_assert_eq!(&after, &before, "refused ({:?}) but changed the store", status);
                }
                // The server still serves a good request (the same pod each time: idempotent).
                let mut c = vpc_cni_rpc::CniBackendClient::new(ch);
                let good = vpc_cni_rpc::AddNetworkRequest {
                    client_version: VERSION.into(),
                    container_id: "probe".into(),
                    if_name: "eth0".into(),
                    network_name: "aws-cni".into(),
                    ..Default::default()
                };
                let r = c.add_network(good).await;
                prop_assert!(r.is_ok_and(|r| r.into_inner().success), "a good AddNetwork failed after {:?}", bytes.len());

                Ok(())
            })?;
        }
    }
}
