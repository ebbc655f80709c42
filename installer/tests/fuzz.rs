//! Property-based fuzzing of the entrypoint's settings (issue 14): `Settings::parse` over
//! arbitrary values of every variable it reads. No panic; a refusal names the variable; and
//! settings that are accepted render a conflist whose `aws-cni` and `egress-cni` entries carry
//! exactly those values and are accepted by the plugins' own parsers (a conflist the plugins
//! refuse would fail every pod on the node).

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;
use vpc_cni_installer::conflist::{render, TEMPLATE};
use vpc_cni_installer::error::InstallerError;
use vpc_cni_installer::settings::Settings;

/// Every variable `Settings::parse` reads, with values that matter for it.
const VARS: [(&str, &[&str]); 22] = [
    (
        "AWS_VPC_K8S_CNI_VETHPREFIX",
        &[
            "eni", "cali", "eth", "lo", "vlan", "abcde", "a b", "a/b", "é", "e.n", "a:b", "-",
        ],
    ),
    ("ENABLE_IPv6", &["true", "false", "1", "yes"]),
    (
        "POD_MTU",
        &[
            "1500", "576", "575", "1280", "9001", "9002", "-1", " 1500 ", "1e3",
        ],
    ),
    (
        "AWS_VPC_ENI_MTU",
        &["9001", "576", "0", "x", "99999999999999999999"],
    ),
    (
        "IP_COOLDOWN_PERIOD",
        &["0", "30", "-1", "abc", "18446744073709551616"],
    ),
    ("ENABLE_PREFIX_DELEGATION", &["true", "false", "T", "on"]),
    ("WARM_IP_TARGET", &["0", "5", "-3", "x"]),
    ("WARM_PREFIX_TARGET", &["0", "1", "x"]),
    ("MINIMUM_IP_TARGET", &["0", "10", "x"]),
    (
        "POD_SECURITY_GROUP_ENFORCING_MODE",
        &["strict", "standard", "lax", "", "__PLUGINLOGFILE__"],
    ),
    ("ENABLE_POD_ENI", &["true", "false", "x"]),
    (
        "AWS_VPC_K8S_PLUGIN_LOG_FILE",
        &[
            "stderr",
            "stdout",
            "STDOUT",
            "/var/log/x.log",
            "/x/__PLUGINLOGLEVEL__",
            "__MTU__",
        ],
    ),
    (
        "AWS_VPC_K8S_PLUGIN_LOG_LEVEL",
        &["DEBUG", "info", "__VETHPREFIX__", "\"quoted\""],
    ),
    (
        "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
        &["prng", "hashrandom", "none", "x"],
    ),
    (
        "AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE",
        &["stderr", "stdout", "/var/log/e4.log"],
    ),
    (
        "AWS_VPC_K8S_EGRESS_V6_PLUGIN_LOG_FILE",
        &["stderr", "Stdout", "/var/log/e6.log"],
    ),
    ("ENABLE_BANDWIDTH_PLUGIN", &["true", "false", "x"]),
    ("DISABLE_POD_V6", &["true", "false", "x"]),
    ("ENABLE_V4_EGRESS", &["true", "false", "x"]),
    ("ENABLE_V6_EGRESS", &["true", "false", "x"]),
    ("HOST_CNI_BIN_PATH", &["/host/opt/cni/bin", "relative"]),
    ("HOST_CNI_CONFDIR_PATH", &["/host/etc/cni/net.d", ""]),
];

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

fn short(s: &str) -> String {
    s.chars().take(300).collect()
}

/// One variable's value: one of its interesting values, arbitrary text, or a long string.
fn value(interesting: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(interesting.to_vec()).prop_map(str::to_string),
        2 => ".{0,12}",
        1 => (1usize..20_000).prop_map(|n| "9".repeat(n)),
    ]
}

fn env() -> impl Strategy<Value = BTreeMap<&'static str, String>> {
    let per_var: Vec<_> = VARS
        .iter()
        .map(|(k, vals)| prop::option::weighted(0.35, value(vals)).prop_map(move |v| (*k, v)))
        .collect();
    per_var.prop_map(|pairs| {
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    })
}

/// The plugin config libcni hands to the entry `i` of `conflist`: the entry with the list's
/// `cniVersion` and `name`.
fn plugin_input(conflist: &Value, ty: &str) -> Option<Vec<u8>> {
    let mut entry = conflist["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == ty)?
        .clone();
    entry["cniVersion"] = conflist["cniVersion"].clone();
    entry["name"] = conflist["name"].clone();
    serde_json::to_vec(&entry).ok()
}

proptest! {
    #![proptest_config(cfg(3000))]

    #[test]
    fn settings_are_refused_by_name_or_render_a_conflist_the_plugins_accept(
        vars in env(),
        node_ip in prop::option::of(prop_oneof![
            any::<u32>().prop_map(|n| std::net::IpAddr::V4(n.into())),
            any::<u128>().prop_map(|n| std::net::IpAddr::V6(n.into())),
        ]),
    ) {
        let lookup = |k: &str| vars.get(k).cloned();
        let mut s = match Settings::parse(&lookup) {
            Ok(s) => s,
            Err(InstallerError::Setting { var, .. }) => {
                prop_assert!(vars.contains_key(var), "refused {var}, which is not set");
                return Ok(());
            }
            Err(InstallerError::Combination(msg)) => {
                prop_assert!(
                    vars.keys().any(|k| msg.contains(k)),
                    "the refusal names no variable that is set: {}",
                    short(&msg)
                );
                return Ok(());
            }
            Err(other) => {
                prop_assert!(false, "unexpected error kind: {}", short(&other.to_string()));
                return Ok(());
            }
        };
        s.egress_node_ip = node_ip;
        let text = render(TEMPLATE, &s);
        prop_assert!(text.is_ok(), "accepted settings do not render: {:?}", text.as_ref().err().map(|e| short(&e.to_string())));
        let conflist: Value = serde_json::from_str(&text.expect("rendered")).expect("JSON");
        let aws = conflist["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["type"] == "aws-cni"))
            .expect("aws-cni entry")
            .clone();
        // Each setting arrives as itself (no placeholder inside a value is expanded again).
        prop_assert_eq!(aws["vethPrefix"].as_str(), Some(s.veth_prefix.as_str()));
        let mtu = s.pod_mtu.to_string();
        prop_assert_eq!(aws["mtu"].as_str(), Some(mtu.as_str()));
        prop_assert_eq!(aws["podSGEnforcingMode"].as_str(), Some(s.pod_sg_enforcing_mode.as_str()));
        prop_assert_eq!(aws["pluginLogFile"].as_str(), Some(s.plugin_log_file.as_str()));
        prop_assert_eq!(aws["pluginLogLevel"].as_str(), Some(s.plugin_log_level.as_str()));
        // The plugins accept what the node's conflist gives them.
        let input = plugin_input(&conflist, "aws-cni").expect("aws-cni input");
        let c = vpc_cni_plugin::config::NetConf::parse(&input);
        prop_assert!(c.is_ok(), "aws-cni refuses the conflist: {}", c.as_ref().err().map(|e| short(&e.to_string())).unwrap_or_default());
        let c = c.expect("parsed");
        prop_assert_eq!(c.veth_prefix, s.veth_prefix.clone());
        prop_assert_eq!(c.mtu, s.pod_mtu);
        let input = plugin_input(&conflist, "egress-cni").expect("egress-cni input");
        let e = vpc_cni_egress::config::EgressConf::parse(&input);
        prop_assert!(e.is_ok(), "egress-cni refuses the conflist: {}", e.as_ref().err().map(|e| short(&e.to_string())).unwrap_or_default());
    }
}
