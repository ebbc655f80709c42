//! Property-based fuzzing of every parser of the plugin's input (issue 14): the network config
//! of each accepted `cniVersion` (arbitrary bytes and structured mutations of a valid config),
//! `prevResult`, `CNI_ARGS` and the CNI environment.
//!
//! Each property: no panic, bounded inputs (no hang), and on rejection an error whose text
//! names the field or variable. Where a parse succeeds, what can be re-validated is: a
//! re-serialised input parses to the same value, a rendered result parses back to the same
//! attachments. Inputs that found bugs are kept in `fuzz_regressions.rs`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Map, Value};
use vpc_cni_plugin::config::NetConf;
use vpc_cni_plugin::env::{CniArgs, EnvOutcome, Invocation};
use vpc_cni_plugin::error::CniError;
use vpc_cni_plugin::result::{AddResult, DummyInfo, PodAttachment, PrevResult};
use vpc_cni_plugin::version::CniVersion;

/// The versions the conflist can name for the plugin's full ADD/DEL/CHECK layouts.
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The fields the plugin reads, with a valid value of each.
fn fields() -> Vec<(&'static str, Value)> {
    vec![
        ("cniVersion", json!("1.0.0")),
        ("name", json!("aws-cni")),
        ("type", json!("aws-cni")),
        ("vethPrefix", json!("eni")),
        ("mtu", json!("9001")),
        ("podSGEnforcingMode", json!("strict")),
        ("pluginLogFile", json!("/var/log/aws-routed-eni/plugin.log")),
        ("pluginLogLevel", json!("DEBUG")),
        (
            "runtimeConfig",
            json!({"io.kubernetes.cri.pod-annotations": {"a": "b"}}),
        ),
        ("ipamdSocket", json!("/var/run/aws-node/ipamd.sock")),
        ("npAgentSocket", json!("/var/run/aws-node/npa.sock")),
        ("ipamdConnectTimeoutMs", json!(2000)),
        ("poolWaitSeconds", json!(10)),
        ("poolRetryMs", json!(250)),
        (
            "cni.dev/valid-attachments",
            json!([{"containerID": "c1", "ifname": "eth0"}]),
        ),
    ]
}

fn valid_conf(version: &str) -> Map<String, Value> {
    let mut m: Map<String, Value> = fields().into_iter().map(|(k, v)| (k.into(), v)).collect();
    m.insert("cniVersion".into(), json!(version));
    m.insert(
        "capabilities".into(),
        json!({"io.kubernetes.cri.pod-annotations": true}),
    );
    m
}

/// `cases` cases, failures kept next to this file (`fuzz.proptest-regressions`).
fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// The whole text of an error: message and cause chain.
fn text(e: &CniError) -> String {
    format!("{e}: {}", e.details())
}

/// At most 300 characters of `s`, for assertion messages.
fn short(s: &str) -> String {
    s.chars().take(300).collect()
}

/// Arbitrary JSON values, bounded in size.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
        prop_oneof![
            Just("0"),
            Just("-1"),
            Just("strict"),
            Just("standard"),
            Just("stdout"),
            Just("stderr"),
            Just(""),
            Just("eth"),
            Just("1.0.0"),
            Just("4294967295"),
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A structured mutation of one field of a valid config.
#[derive(Clone, Debug)]
enum Mutation {
    /// The field is absent.
    Remove,
    /// The field has another value (often of the wrong JSON type).
    Replace(Value),
    /// The field is a string of `n` bytes.
    Huge(usize),
    /// The field is nested `depth` arrays deep.
    Deep(usize),
    /// The field appears a second time, with this value, after the first.
    Duplicate(Value),
    /// The field's string value carries these bytes (at least one invalid UTF-8 sequence).
    NonUtf8(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::Remove),
        any_json().prop_map(Mutation::Replace),
        (1usize..200_000).prop_map(Mutation::Huge),
        (1usize..400).prop_map(Mutation::Deep),
        any_json().prop_map(Mutation::Duplicate),
        prop::collection::vec(0x80u8..=0xff, 1..8).prop_map(Mutation::NonUtf8),
    ]
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// The config bytes with `field` mutated.
fn mutate(conf: &Map<String, Value>, field: &str, m: &Mutation) -> Vec<u8> {
    let mut c = conf.clone();
    match m {
        Mutation::Remove => {
            c.remove(field);
            serde_json::to_vec(&c).expect("json")
        }
        Mutation::Replace(v) => {
            c.insert(field.into(), v.clone());
            serde_json::to_vec(&c).expect("json")
        }
        Mutation::Huge(n) => {
            c.insert(field.into(), json!("x".repeat(*n)));
            serde_json::to_vec(&c).expect("json")
        }
        Mutation::Deep(d) => splice(&c, field, nested(*d).as_bytes()),
        Mutation::Duplicate(v) => {
            let mut text = serde_json::to_vec(&c).expect("json");
            text.pop();
            let sep: &[u8] = if c.is_empty() { b"" } else { b"," };
            text.extend_from_slice(sep);
            text.extend_from_slice(&serde_json::to_vec(&json!(field)).expect("json"));
            text.push(b':');
            text.extend_from_slice(&serde_json::to_vec(v).expect("json"));
            text.push(b'}');
            text
        }
        Mutation::NonUtf8(bytes) => {
            let mut s = b"\"a".to_vec();
            s.extend_from_slice(bytes);
            s.push(b'"');
            splice(&c, field, &s)
        }
    }
}

/// The config with `field`'s value replaced by the raw JSON text `raw`.
fn splice(conf: &Map<String, Value>, field: &str, raw: &[u8]) -> Vec<u8> {
    const MARK: &str = "\u{1}SPLICE\u{1}";
    let mut c = conf.clone();
    c.insert(field.into(), json!(MARK));
    let text = serde_json::to_vec(&c).expect("json");
    let mark = serde_json::to_vec(&json!(MARK)).expect("json");
    let at = text
        .windows(mark.len())
        .position(|w| w == mark.as_slice())
        .expect("marker");
    let mut out = text[..at].to_vec();
    out.extend_from_slice(raw);
    out.extend_from_slice(&text[at + mark.len()..]);
    out
}

/// Checks what a successful parse must satisfy whatever the input.
fn revalidate(c: &NetConf) {
    assert!(!c.name.is_empty() && vpc_cni_plugin::env::valid_id(&c.name));
    assert!(c.veth_prefix.len() <= 4 && !["eth", "lo", "vlan"].contains(&c.veth_prefix.as_str()));
    assert!((576..=9001).contains(&c.mtu), "mtu {}", c.mtu);
    assert!(c.pool_wait.as_secs_f64() <= 600.0);
    assert!(!c.pool_retry.is_zero() && !c.connect_timeout.is_zero());
    for s in [&c.ipamd_socket, &c.np_agent_socket] {
        // A unix socket path fits sun_path (108 bytes with its NUL) and has no NUL.
        assert!(
            !s.is_empty() && s.len() < 108 && !s.contains('\0'),
            "socket of {} bytes accepted",
            s.len()
        );
    }
}

proptest! {
    #![proptest_config(cfg(2000))]

    /// Arbitrary bytes: never a panic; an error is code 1, 6 or 7.
    #[test]
    fn config_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        match NetConf::parse(&bytes) {
            Ok(c) => revalidate(&c),
            Err(e) => prop_assert!(matches!(e.code(), 1 | 6 | 7), "{}", short(&text(&e))),
        }
    }

    /// Arbitrary JSON objects built from the plugin's own keys with arbitrary values.
    #[test]
    fn config_arbitrary_objects(
        obj in prop::collection::btree_map(
            prop::sample::select(fields().into_iter().map(|(k, _)| k).collect::<Vec<_>>()),
            any_json(),
            0..10,
        )
    ) {
        let bytes = serde_json::to_vec(&obj).expect("json");
        match NetConf::parse(&bytes) {
            Ok(c) => revalidate(&c),
            Err(e) => {
                let t = text(&e);
                // A missing required field is named too ("missing network name").
                prop_assert!(
                    obj.keys().any(|k| t.contains(k)) || t.contains("network name"),
                    "the error names none of the fields {:?}: {}",
                    obj.keys().collect::<Vec<_>>(),
                    short(&t)
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(cfg(1500))]

    /// A valid config of each version with one field mutated: either it parses (and then
    /// re-validates, and its canonical re-serialisation parses to the same value) or the error
    /// names that field.
    #[test]
    fn config_structured_mutations(
        version in prop::sample::select(VERSIONS.to_vec()),
        field in prop::sample::select(
            fields().into_iter().map(|(k, _)| k).chain(["unknownField"]).collect::<Vec<_>>()
        ),
        m in mutation(),
    ) {
        let base = valid_conf(version);
        let bytes = mutate(&base, field, &m);
        match NetConf::parse(&bytes) {
            Ok(c) => {
                revalidate(&c);
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                    let again = NetConf::parse(&serde_json::to_vec(&v).expect("json"))
                        .expect("the canonical form of an accepted config parses");
                    prop_assert_eq!(again, c);
                }
            }
            Err(e) => {
                let t = text(&e);
                prop_assert!(field != "unknownField" || matches!(m, Mutation::Deep(_) | Mutation::NonUtf8(_)),
                    "an unknown field is ignored: {}", short(&t));
                prop_assert!(t.contains(field), "the error does not name {field}: {}", short(&t));
            }
        }
    }
}

fn attachment() -> impl Strategy<Value = PodAttachment> {
    (
        "[a-z]{1,3}[0-9a-f]{11}",
        prop_oneof![Just("eth0".to_string()), "mNicIf[1-9]"],
        "/[a-z0-9/_.-]{1,40}",
        prop_oneof![
            any::<u32>().prop_map(|n| std::net::IpAddr::V4(n.into())),
            any::<u128>().prop_map(|n| std::net::IpAddr::V6(n.into())),
        ],
        any::<u32>(),
    )
        .prop_map(
            |(host, container_ifname, sandbox, ip, route_table)| PodAttachment {
                host_veth: Some(host),
                container_ifname,
                sandbox,
                ip,
                route_table,
            },
        )
}

fn dummy() -> impl Strategy<Value = DummyInfo> {
    prop_oneof![
        (0i32..=i32::MAX).prop_map(|device_number| DummyInfo::Normal { device_number }),
        (1u32..=4094).prop_map(|vlan_id| DummyInfo::Branch { vlan_id }),
    ]
}

/// Renders `v` for `version` after replacing the value at the JSON pointer `at`.
fn set_at(v: &mut Value, at: &str, new: Value) -> bool {
    match v.pointer_mut(at) {
        Some(slot) => {
            *slot = new;
            true
        }
        None => false,
    }
}

proptest! {
    #![proptest_config(cfg(1000))]

    /// A result rendered in each version's JSON, as it comes back as `prevResult`, parses to
    /// the same attachments and dummy (alone and inside a whole config).
    #[test]
    fn prev_result_round_trips(
        atts in prop::collection::vec(attachment(), 1..4),
        d in dummy(),
        version in prop::sample::select(VERSIONS.to_vec()),
    ) {
        let v: CniVersion = version.parse().expect("version");
        let r = AddResult::build(&atts, "dummy0123456789a", d);
        let rendered = r.render(v);
        let p = PrevResult::parse(&rendered).expect("parse");
        prop_assert_eq!(p.attachments(), atts.clone());
        prop_assert_eq!(p.dummy(), Some(d));
        let mut conf = valid_conf(version);
        conf.insert("prevResult".into(), rendered);
        let c = NetConf::parse(&serde_json::to_vec(&conf).expect("json")).expect("config");
        let p = PrevResult::parse(c.prev_result.as_ref().expect("prev")).expect("parse");
        prop_assert_eq!(p.attachments(), atts);
    }

    /// A prevResult with one value replaced anywhere: parsing never panics, reading its
    /// attachments and dummy never panics, and a rejection names the field's path.
    #[test]
    fn prev_result_mutations(
        atts in prop::collection::vec(attachment(), 1..3),
        d in dummy(),
        version in prop::sample::select(VERSIONS.to_vec()),
        at in prop::sample::select(vec![
            "/interfaces", "/interfaces/0", "/interfaces/1/name", "/interfaces/1/mac",
            "/interfaces/1/sandbox", "/interfaces/2/mac", "/interfaces/2/sandbox",
            "/ips", "/ips/0", "/ips/0/interface", "/ips/0/address", "/ips/0/version",
            "/cniVersion", "/dns",
        ]),
        new in prop_oneof![
            any_json(),
            Just(json!("4294967295")),
            Just(json!("4294967200")),
            Just(json!(u64::MAX)),
            Just(json!(-1)),
            Just(json!(99)),
        ],
    ) {
        let v: CniVersion = version.parse().expect("version");
        let mut rendered = AddResult::build(&atts, "dummy0123456789a", d).render(v);
        prop_assume!(set_at(&mut rendered, at, new));
        match PrevResult::parse(&rendered) {
            Ok(p) => {
                let _ = p.dummy();
                for a in p.attachments() {
                    prop_assert!(p.interfaces.iter().any(|i| i.name == a.container_ifname));
                }
            }
            Err(e) => {
                let t = text(&e);
                prop_assert!(t.contains("prevResult"), "{}", short(&t));
                let top = at.trim_start_matches('/').split('/').next().expect("key");
                prop_assert!(t.contains(top), "the error does not name {at}: {}", short(&t));
            }
        }
    }
}

/// A lookup over a map of variables.
fn lookup(m: &BTreeMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    move |k| m.get(k).cloned()
}

const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

fn valid_env() -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0123abcd"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=0123abcd",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// CNI_ARGS-like text: segments of keys and values drawn from characters that matter.
fn cni_args_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        prop::collection::vec(
            prop_oneof![
                "[A-Z_]{0,12}=[a-z0-9=. -]{0,16}",
                Just(String::new()),
                Just("=".to_string()),
                Just("==".to_string()),
                Just(" ".to_string()),
                "[a-z]{1,8}",
                (1usize..70_000).prop_map(|n| format!("K8S_POD_NAME={}", "p".repeat(n))),
            ],
            0..8
        )
        .prop_map(|segs| segs.join(";")),
    ]
}

proptest! {
    #![proptest_config(cfg(3000))]

    /// CNI_ARGS: no panic; a rejection names CNI_ARGS; an accepted value re-rendered as
    /// `K=V;...` parses to the same pairs.
    #[test]
    fn cni_args(s in cni_args_text()) {
        match CniArgs::parse(&s) {
            Ok(a) => {
                let again: Vec<String> = a.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let b = CniArgs::parse(&again.join(";")).expect("re-rendered args parse");
                prop_assert_eq!(&a, &b);
                for (k, v) in &a.pairs {
                    prop_assert!(!k.contains('=') && !k.contains(';') && !v.contains(';'));
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code(), 4);
                prop_assert!(text(&e).contains("CNI_ARGS"), "{}", short(&text(&e)));
            }
        }
    }

    /// The CNI environment with one variable replaced, removed, or made huge: no panic; a
    /// rejection is code 4 and names that variable.
    #[test]
    fn cni_environment(
        var in prop::sample::select(CNI_VARS.to_vec()),
        value in prop_oneof![
            Just(None),
            ".{0,40}".prop_map(Some),
            prop_oneof![
                Just("ADD"), Just("DEL"), Just("CHECK"), Just("VERSION"), Just("GC"),
                Just("STATUS"), Just("add"), Just(""), Just("."), Just(".."), Just("eth0:1"),
                Just("a/b"), Just("0123456789abcdef"), Just("-abc"), Just("x;y"),
            ].prop_map(|s| Some(s.to_string())),
            (1usize..100_000).prop_map(|n| Some("a".repeat(n))),
        ],
        command in prop::sample::select(vec!["ADD", "DEL", "CHECK"]),
    ) {
        let mut env = valid_env();
        env.insert("CNI_COMMAND".into(), command.into());
        match &value {
            None => { env.remove(var); }
            Some(v) => { env.insert(var.into(), v.clone()); }
        }
        let get = lookup(&env);
        let outcome = Invocation::from_env(&get);
        match outcome {
            Ok(EnvOutcome::About) => {
                prop_assert_eq!(var, "CNI_COMMAND");
                prop_assert!(value.as_deref().is_none_or(str::is_empty));
            }
            Ok(EnvOutcome::Run(inv)) => {
                prop_assert!(vpc_cni_plugin::env::valid_id(&inv.container_id)
                    || !matches!(command, "ADD" | "DEL" | "CHECK") || var == "CNI_COMMAND");
                prop_assert_eq!(inv.netns, env.get("CNI_NETNS").cloned().unwrap_or_default());
            }
            Err(e) => {
                prop_assert_eq!(e.code(), 4);
                prop_assert!(text(&e).contains(var), "{var}: {}", short(&text(&e)));
            }
        };
    }
}

proptest! {
    #![proptest_config(cfg(2000))]

    /// Raw bytes in any CNI variable: accepted exactly when they are UTF-8 (and then unchanged),
    /// otherwise refused with code 4 naming the variable.
    #[test]
    fn cni_environment_raw_bytes(
        var in prop::sample::select(CNI_VARS.to_vec()),
        bytes in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        use std::os::unix::ffi::OsStrExt;
        let raw = std::ffi::OsStr::from_bytes(&bytes).to_owned();
        let get = |k: &str| (k == var).then(|| raw.clone());
        match vpc_cni_plugin::env::utf8_vars(&get, &vpc_cni_plugin::env::CNI_VARS) {
            Ok(vars) => {
                let s = std::str::from_utf8(&bytes);
                prop_assert!(s.is_ok());
                prop_assert_eq!(vars.get(var).map(String::as_str), s.ok());
            }
            Err(e) => {
                prop_assert!(std::str::from_utf8(&bytes).is_err());
                prop_assert_eq!(e.code(), 4);
                prop_assert!(text(&e).contains(var), "{}", short(&text(&e)));
            }
        }
    }
}

proptest! {
    #![proptest_config(cfg(2000))]

    /// VPC_CNI_FAILPOINTS: no panic; a rejection is code 4 naming the variable; an accepted
    /// value re-rendered as `name=N,...` parses to the same points.
    #[test]
    fn failpoints_variable(
        s in prop_oneof![
            ".{0,40}",
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(vpc_cni_plugin::failpoint::ALL.to_vec())
                            .prop_map(str::to_string),
                        "[a-z-]{0,12}",
                    ],
                    prop_oneof![
                        any::<u64>().prop_map(|n| n.to_string()),
                        "[0-9x -]{0,22}",
                    ],
                    prop::sample::select(vec!["=", " = ", "", "=="]),
                )
                    .prop_map(|(n, c, eq)| format!("{n}{eq}{c}")),
                0..5
            )
            .prop_map(|items| items.join(",")),
        ],
    ) {
        match vpc_cni_plugin::failpoint::parse(&s) {
            Ok(points) => {
                let again: Vec<String> = points.iter().map(|(n, c)| format!("{n}={c}")).collect();
                let back = vpc_cni_plugin::failpoint::parse(&again.join(",")).expect("re-rendered");
                prop_assert_eq!(back, points.clone());
                prop_assert!(points.iter().all(|(_, c)| *c >= 1));
            }
            Err(e) => {
                prop_assert_eq!(e.code(), 4);
                prop_assert!(text(&e).contains("VPC_CNI_FAILPOINTS"), "{}", short(&text(&e)));
            }
        }
    }
}

/// The CNI invocation of one pod, as the driver gets it.
fn invocation(command: vpc_cni_plugin::env::Command, netns: &str) -> Invocation {
    Invocation {
        command,
        container_id: "c1".into(),
        netns: netns.into(),
        ifname: "eth0".into(),
        args: CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0").expect("args"),
        path: "/opt/cni/bin".into(),
    }
}

proptest! {
    #![proptest_config(cfg(600))]

    /// DEL and CHECK of a wired pod (in memory) with a mutated prevResult: DEL with ipamd down
    /// never fails and never panics, whatever prevResult says; CHECK answers one of its codes;
    /// with ipamd up DEL releases the address and leaves no host rule or route.
    #[test]
    fn del_and_check_with_a_mutated_prev_result(
        version in prop::sample::select(vec!["0.4.0", "1.0.0", "1.1.0"]),
        at in prop::sample::select(vec![
            "", "/interfaces", "/interfaces/0", "/interfaces/1/mac", "/interfaces/1/sandbox",
            "/interfaces/2/mac", "/interfaces/2/sandbox", "/interfaces/2/name", "/ips",
            "/ips/0", "/ips/0/interface", "/ips/0/address",
        ]),
        new in prop_oneof![
            any_json(),
            Just(json!("4294967295")), Just(json!("4094")), Just(json!("0")),
            Just(json!(u64::MAX)), Just(json!(0)), Just(json!(2)), Just(json!(7)),
            Just(json!("10.0.1.10/32")), Just(json!("2001:db8::1/128")), Just(json!("dummyx")),
        ],
    ) {
        use vpc_cni_plugin::driver::Driver;
        use vpc_cni_plugin::env::Command;
        use vpc_cni_plugin::memory::{MemoryIpam, MemoryPolicyAgent};
        const NETNS: &str = "/var/run/netns/pod-1";
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let net = vpc_cni_net::MemoryPodNetwork::new();
        net.add_netns(NETNS);
        let ipam = MemoryIpam::new(
            vpc_cni_plugin::CLIENT_VERSION,
            MemoryIpam::pool(std::net::Ipv4Addr::new(10, 0, 1, 10), 1, 2, 3),
        );
        let d = Driver::new(ipam, net, MemoryPolicyAgent::default(), vpc_cni_plugin::CLIENT_VERSION);
        let mut conf = NetConf::parse(
            &serde_json::to_vec(&json!({"cniVersion": version, "name": "aws-cni", "pluginLogFile": "stderr"}))
                .expect("json"),
        )
        .expect("conf");
        conf.pool_wait = std::time::Duration::ZERO;
        let r = rt.block_on(d.add(&invocation(Command::Add, NETNS), &conf)).expect("add");
        let mut prev = r.render(conf.cni_version);
        if at.is_empty() {
            prev = new;
        } else if let Some(slot) = prev.pointer_mut(at) {
            *slot = new;
        }
        conf.prev_result = Some(prev);
        if let Err(e) = rt.block_on(d.check(&invocation(Command::Check, NETNS), &conf)) {
            prop_assert!(matches!(e.code(), 3 | 6 | 7 | 104 | 999), "{}", short(&text(&e)));
        }
        d.ipam().set_unreachable(true);
        let del = rt.block_on(d.del(&invocation(Command::Del, NETNS), &conf));
        prop_assert!(del.is_ok(), "DEL with ipamd down: {:?}", del.err().map(|e| short(&text(&e))));
        d.ipam().set_unreachable(false);
        let del = rt.block_on(d.del(&invocation(Command::Del, NETNS), &conf));
        prop_assert!(del.is_ok(), "DEL: {:?}", del.err().map(|e| short(&text(&e))));
        prop_assert_eq!(d.ipam().assigned(), 0);
        let host = d.net().state().host;
        prop_assert!(host.rules.is_empty(), "rules left: {:?}", host.rules);
        prop_assert!(host.routes.is_empty(), "routes left: {:?}", host.routes);
    }
}

proptest! {
    #![proptest_config(cfg(3000))]

    /// The address parser prevResult entries go through (`ips[].address`): no panic; an
    /// accepted prefix has a valid length and prints as text that parses back to it.
    #[test]
    fn prev_result_address_parse(
        s in prop_oneof![
            ".{0,48}",
            (any::<u32>(), any::<u16>()).prop_map(|(a, l)| format!("{}/{l}", std::net::Ipv4Addr::from(a))),
            (any::<u128>(), any::<u16>()).prop_map(|(a, l)| format!("{}/{l}", std::net::Ipv6Addr::from(a))),
            "[0-9a-f:.]{0,40}(/[0-9]{0,4})?",
        ],
    ) {
        if let Ok(c) = s.parse::<vpc_cni_net::IpCidr>() {
            let max = if c.addr.is_ipv4() { 32 } else { 128 };
            prop_assert!(c.prefix_len <= max, "{} from {:?}", c.prefix_len, s);
            let again: vpc_cni_net::IpCidr = c.to_string().parse().expect("printed prefix parses");
            prop_assert_eq!(again, c);
        }
    }
}

proptest! {
    #![proptest_config(cfg(150))]

    /// AWS_CNI_TIMING (read by the binary; its state is process-wide, so each case is a run of
    /// the binary): any value, UTF-8 or not, is harmless; only exactly `1` prints the timing
    /// line, and VERSION answers as always.
    #[test]
    fn timing_variable(
        value in prop_oneof![
            Just(b"1".to_vec()),
            prop::sample::select(vec![&b" 1"[..], b"1 ", b"01", b"true", b"", b"\xff", b"1\xff"])
                .prop_map(<[u8]>::to_vec),
            prop::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 0..16),
        ],
    ) {
        use std::os::unix::ffi::OsStrExt;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aws-cni"))
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .env("AWS_CNI_TIMING", std::ffi::OsStr::from_bytes(&value))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the plugin");
        prop_assert_eq!(out.status.code(), Some(0));
        let v: Value = serde_json::from_slice(&out.stdout).expect("VERSION json");
        prop_assert_eq!(&v["cniVersion"], "1.1.0");
        let timed = String::from_utf8_lossy(&out.stderr).contains("timing: total=");
        prop_assert_eq!(timed, value == b"1", "value {:?}", value);
    }
}

/// An ipamd that answers every AddNetwork with one fixed (fuzzed) reply and records the
/// releases.
struct FuzzIpam {
    reply: vpc_cni_rpc::AddNetworkReply,
    dels: std::sync::Mutex<Vec<vpc_cni_rpc::DelNetworkRequest>>,
}

impl vpc_cni_plugin::backend::Ipam for FuzzIpam {
    async fn add_network(
        &self,
        _: vpc_cni_rpc::AddNetworkRequest,
    ) -> Result<vpc_cni_rpc::AddNetworkReply, vpc_cni_plugin::backend::BackendError> {
        Ok(self.reply.clone())
    }
    async fn del_network(
        &self,
        req: vpc_cni_rpc::DelNetworkRequest,
    ) -> Result<vpc_cni_rpc::DelNetworkReply, vpc_cni_plugin::backend::BackendError> {
        self.dels.lock().expect("lock").push(req);
        Ok(vpc_cni_rpc::DelNetworkReply {
            success: true,
            ..Default::default()
        })
    }
    async fn ready(&self) -> Result<(), vpc_cni_plugin::backend::BackendError> {
        Ok(())
    }
}

fn allocation() -> impl Strategy<Value = vpc_cni_rpc::IpAllocationMetadata> {
    (
        prop_oneof![
            Just(String::new()),
            any::<u32>().prop_map(|a| std::net::Ipv4Addr::from(a).to_string()),
            Just("10.0.1.10".to_string()),
            ".{0,16}",
        ],
        prop_oneof![
            Just(String::new()),
            any::<u128>().prop_map(|a| std::net::Ipv6Addr::from(a).to_string()),
            ".{0,16}",
        ],
        any::<i32>(),
        prop_oneof![any::<i32>(), -1i32..300],
    )
        .prop_map(|(v4, v6, device_number, route_table_id)| {
            vpc_cni_rpc::IpAllocationMetadata {
                i_pv4_addr: v4,
                i_pv6_addr: v6,
                device_number,
                route_table_id,
            }
        })
}

proptest! {
    #![proptest_config(cfg(1500))]

    /// ADD against an ipamd answering anything (in memory): no panic; a failed ADD leaves the
    /// host as it was and releases what ipamd assigned (SetupNSFailed); a successful one wired
    /// only addresses ipamd gave, each with its rules and no table 0.
    #[test]
    fn add_with_an_arbitrary_ipamd_reply(
        success in any::<bool>(),
        allocations in prop::collection::vec(allocation(), 0..4),
        vlan in prop_oneof![Just(0i32), any::<i32>()],
    ) {
        use vpc_cni_plugin::driver::Driver;
        use vpc_cni_plugin::env::Command;
        use vpc_cni_plugin::memory::MemoryPolicyAgent;
        const NETNS: &str = "/var/run/netns/pod-1";
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let net = vpc_cni_net::MemoryPodNetwork::new();
        net.add_netns(NETNS);
        let reply = vpc_cni_rpc::AddNetworkReply {
            success,
            ip_allocation_metadata: allocations.clone(),
            pod_vlan_id: vlan,
            ..Default::default()
        };
        let ipam = FuzzIpam { reply, dels: std::sync::Mutex::new(Vec::new()) };
        let d = Driver::new(ipam, net, MemoryPolicyAgent::default(), vpc_cni_plugin::CLIENT_VERSION);
        let mut conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"aws-cni","pluginLogFile":"stderr"}"#)
            .expect("conf");
        conf.pool_wait = std::time::Duration::ZERO;
        conf.requires_multi_nic = allocations.len() > 1;
        let before = d.net().state().host;
        let dels = || d.ipam().dels.lock().expect("lock").clone();
        match rt.block_on(d.add(&invocation(Command::Add, NETNS), &conf)) {
            Ok(r) => {
                prop_assert!(success);
                let given: Vec<String> = allocations
                    .iter()
                    .map(|m| if m.i_pv4_addr.is_empty() { m.i_pv6_addr.clone() } else { m.i_pv4_addr.clone() })
                    .collect();
                for ip in &r.ips {
                    let addr = ip.address.split('/').next().unwrap_or_default();
                    let addr: std::net::IpAddr = addr.parse().expect("an address");
                    prop_assert!(
                        given.iter().any(|g| g.parse::<std::net::IpAddr>().ok() == Some(addr)),
                        "{} was not given", ip.address
                    );
                }
                let host = d.net().state().host;
                prop_assert!(host.rules.iter().all(|r| r.table != 0), "{:?}", host.rules);
                prop_assert!(dels().is_empty(), "released after a successful ADD");
            }
            Err(e) => {
                let host = d.net().state().host;
                prop_assert_eq!(&host.rules, &before.rules, "{}", short(&text(&e)));
                prop_assert_eq!(&host.routes, &before.routes);
                prop_assert_eq!(&host.links, &before.links);
                if success && !allocations.is_empty() {
                    let dels = dels();
                    prop_assert!(
                        dels.iter().any(|r| r.reason == "SetupNSFailed"),
                        "{}: nothing released: {dels:?}", short(&text(&e))
                    );
                }
            }
        }
    }
}
