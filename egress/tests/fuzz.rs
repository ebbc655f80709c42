//! Property-based fuzzing of egress-cni's network config (issue 14): arbitrary bytes and
//! structured mutations of a valid config of each `cniVersion`, with `prevResult` as the
//! chained ADD receives it. Each property: no panic, bounded inputs, a rejection names the
//! field, and an accepted `prevResult` is kept byte for byte (the disabled plugin's
//! pass-through).

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Map, Value};
use vpc_cni_egress::config::EgressConf;
use vpc_cni_egress::error::EgressError;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

const FIELDS: [&str; 12] = [
    "cniVersion",
    "name",
    "type",
    "enabled",
    "mtu",
    "randomizeSNAT",
    "nodeIP",
    "ipam",
    "pluginLogFile",
    "pluginLogLevel",
    "prevResult",
    "unknownField",
];

fn prev_result(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "eni0123456789a"},
            {"name": "eth0", "mac": "3", "sandbox": "/var/run/netns/p"},
            {"name": "dummy0123456789a", "mac": "0", "sandbox": "2"}
        ],
        "ips": [{"interface": 1, "address": "10.0.1.10/32"}],
        "dns": {}
    })
}

fn valid_conf(version: &str, enabled: bool) -> Map<String, Value> {
    let v = json!({
        "cniVersion": version,
        "name": "aws-cni",
        "type": "egress-cni",
        "enabled": if enabled { "true" } else { "false" },
        "mtu": "9001",
        "randomizeSNAT": "prng",
        "nodeIP": "10.0.0.10",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "fd00::ac:00/118"}]],
                 "routes": [{"dst": "::/0"}], "dataDir": "/run/cni/v4pd/egress-v6-ipam"},
        "pluginLogFile": "/var/log/aws-routed-eni/egress-v6-plugin.log",
        "pluginLogLevel": "DEBUG",
        "prevResult": prev_result(version),
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    }
}

fn short(s: &str) -> String {
    s.chars().take(300).collect()
}

fn text(e: &EgressError) -> String {
    format!("{e}: {}", e.details())
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,24}".prop_map(Value::String),
        prop_oneof![
            Just("true"),
            Just("false"),
            Just("TRUE"),
            Just(""),
            Just("stdout"),
            Just("none"),
            Just("hashrandom"),
            Just("::1"),
            Just("10.0.0.1"),
            Just("../x"),
            Just("host-local"),
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![Just("type".to_string()), ".{0,6}"],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Remove,
    Replace(Value),
    Huge(usize),
    Deep(usize),
    Duplicate(Value),
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
        Mutation::Deep(d) => splice(
            &c,
            field,
            format!("{}1{}", "[".repeat(*d), "]".repeat(*d)).as_bytes(),
        ),
        Mutation::Duplicate(v) => {
            let mut text = serde_json::to_vec(&c).expect("json");
            text.pop();
            text.push(b',');
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

proptest! {
    #![proptest_config(cfg(2000))]

    /// Arbitrary bytes: no panic; a rejection is a decode, config or version error.
    #[test]
    fn egress_config_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = EgressConf::parse(&bytes) {
            prop_assert!(matches!(e.code(), 1 | 6 | 7), "{}", short(&text(&e)));
        }
    }
}

proptest! {
    #![proptest_config(cfg(1500))]

    /// A valid config (enabled or not) of each version with one field mutated: it parses, with
    /// a valid result, or the error names that field.
    #[test]
    fn egress_config_structured_mutations(
        version in prop::sample::select(VERSIONS.to_vec()),
        enabled in any::<bool>(),
        field in prop::sample::select(FIELDS.to_vec()),
        m in mutation(),
    ) {
        let base = valid_conf(version, enabled);
        let bytes = mutate(&base, field, &m);
        match EgressConf::parse(&bytes) {
            Ok(c) => {
                prop_assert!(vpc_cni_plugin::env::valid_id(&c.name));
                prop_assert!((576..=9001).contains(&c.mtu));
                if c.enabled {
                    prop_assert!(c.node_ip.is_some());
                    prop_assert!(!c.ipam_type.is_empty() && !c.ipam_type.contains('/'));
                }
                prop_assert_eq!(c.raw.as_slice(), bytes.as_slice());
            }
            Err(e) => {
                let t = text(&e);
                prop_assert!(field != "unknownField" || matches!(m, Mutation::Deep(_) | Mutation::NonUtf8(_)),
                    "an unknown field is ignored: {}", short(&t));
                // A removed nodeIP or ipam is named as nodeIP / ipam.type.
                prop_assert!(t.contains(field), "the error does not name {field}: {}", short(&t));
            }
        }
    }

    /// The chained ADD's prevResult, in any spacing and key order, is kept byte for byte.
    #[test]
    fn egress_prev_result_is_kept_byte_for_byte(
        version in prop::sample::select(VERSIONS.to_vec()),
        enabled in any::<bool>(),
        pad in prop::collection::vec(prop::sample::select(vec![" ", "\n", "\t", "\r\n", ""]), 8),
        extra in any_json(),
    ) {
        let mut prev = prev_result(version);
        prev["chainedField"] = extra;
        let compact = serde_json::to_string(&prev).expect("json");
        // Spaces after every separator, varied.
        let mut spaced = String::new();
        for (i, ch) in compact.chars().enumerate() {
            spaced.push(ch);
            if matches!(ch, ',' | ':' | '{' | '[') {
                spaced.push_str(pad[i % pad.len()]);
            }
        }
        // Only a spacing that keeps strings intact (no separator inside a string) is used.
        prop_assume!(serde_json::from_str::<Value>(&spaced).ok() == Some(prev.clone()));
        let bytes = splice(&valid_conf(version, enabled), "prevResult", spaced.as_bytes());
        let c = EgressConf::parse(&bytes).expect("valid");
        let kept = c.prev_result.expect("prevResult");
        prop_assert_eq!(kept.get(), spaced.as_str());
    }
}

/// An IPAM result in the shape host-local prints, with arbitrary values in its fields.
fn ipam_result() -> impl Strategy<Value = String> {
    let addr = prop_oneof![
        Just("169.254.172.7/22".to_string()),
        Just("fd00::ac:5/118".to_string()),
        Just("10.0.0.1/33".to_string()),
        Just("::1/129".to_string()),
        Just("garbage".to_string()),
        ".{0,12}",
    ];
    let ip = prop_oneof![
        Just("169.254.172.1".to_string()),
        Just("fd00::ac:1".to_string()),
        Just("0.0.0.0/0".to_string()),
        Just("::/0".to_string()),
        ".{0,8}",
    ];
    (
        prop::collection::vec((addr, prop::option::of(ip.clone())), 0..3),
        prop::collection::vec((ip.clone(), prop::option::of(ip)), 0..3),
        any_json(),
    )
        .prop_map(|(ips, routes, extra)| {
            let ips: Vec<Value> = ips
                .into_iter()
                .map(|(a, g)| match g {
                    Some(g) => json!({"address": a, "gateway": g}),
                    None => json!({"address": a}),
                })
                .collect();
            let routes: Vec<Value> = routes
                .into_iter()
                .map(|(d, g)| match g {
                    Some(g) => json!({"dst": d, "gw": g}),
                    None => json!({"dst": d}),
                })
                .collect();
            json!({"cniVersion": "1.0.0", "ips": ips, "routes": routes, "dns": extra}).to_string()
        })
}

proptest! {
    #![proptest_config(cfg(3000))]

    /// The IPAM plugin's stdout, arbitrary or host-local-shaped: no panic; an accepted result
    /// is all of the egress family (address, gateway, every route and its gateway).
    #[test]
    fn ipam_result_parse(
        stdout in prop_oneof![".{0,200}", ipam_result()],
        v6 in any::<bool>(),
    ) {
        use vpc_cni_net::Family;
        let family = if v6 { Family::V6 } else { Family::V4 };
        match vpc_cni_egress::ipam::parse_result("host-local", &stdout, family) {
            Ok(r) => {
                prop_assert_eq!(r.ip.family(), family);
                let max_len = if v6 { 128 } else { 32 };
                prop_assert!(r.ip.prefix_len <= max_len, "prefix {}", r.ip.prefix_len);
                if let Some(g) = r.gateway {
                    prop_assert_eq!(Family::of(&g), family, "gateway {}", g);
                }
                for (dst, gw) in &r.routes {
                    prop_assert_eq!(dst.family(), family);
                    if let Some(g) = gw {
                        prop_assert_eq!(Family::of(g), family, "route gw {}", g);
                    }
                }
            }
            Err(e) => prop_assert!(matches!(e.code(), 120 | 121), "{}", short(&text(&e))),
        }
    }
}

proptest! {
    #![proptest_config(cfg(500))]

    /// The chained ADD with a mutated prevResult, IPAM plugin absent (an empty CNI_PATH, so
    /// nothing on the node changes): a prevResult the result cannot be built on is refused
    /// naming it before IPAM is run; any other reaches IPAM (code 120, not found).
    #[test]
    fn egress_chained_add_checks_prev_result_before_ipam(
        version in prop::sample::select(VERSIONS.to_vec()),
        at in prop::sample::select(vec!["", "/interfaces", "/interfaces/0", "/ips", "/cniVersion"]),
        new in any_json(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut prev = prev_result(version);
        if at.is_empty() {
            prev = new;
        } else if let Some(slot) = prev.pointer_mut(at) {
            *slot = new;
        }
        let mut conf = valid_conf(version, true);
        conf.insert("prevResult".into(), prev.clone());
        conf.insert("pluginLogFile".into(), json!("stderr"));
        conf.insert("pluginLogLevel".into(), json!("error"));
        let bytes = serde_json::to_vec(&conf).expect("json");
        let path = dir.path().display().to_string();
        let get = |k: &str| -> Option<String> {
            Some(match k {
                "CNI_COMMAND" => "ADD".into(),
                "CNI_CONTAINERID" => "c1".into(),
                "CNI_NETNS" => "/var/run/netns/none".into(),
                "CNI_IFNAME" => "eth0".into(),
                "CNI_PATH" => path.clone(),
                _ => return None,
            })
        };
        let out = vpc_cni_egress::run(&get, &mut bytes.as_slice());
        prop_assert_eq!(out.exit_code, 1);
        let v: Value = serde_json::from_str(out.stdout.as_deref().expect("stdout")).expect("json");
        let msg = v["msg"].as_str().unwrap_or_default().to_string();
        let buildable = prev.as_object().is_some_and(|o| {
            o.get("interfaces").is_none_or(|i| i.is_array() || i.is_null())
        });
        if buildable {
            prop_assert_eq!(v["code"].as_u64(), Some(120), "{}", short(&msg));
        } else {
            prop_assert!(matches!(v["code"].as_u64(), Some(6 | 7)), "{}", short(&v.to_string()));
            prop_assert!(msg.contains("prevResult"), "{}", short(&msg));
        }
    }
}
