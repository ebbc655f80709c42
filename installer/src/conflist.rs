//! The CNI network configuration list `10-aws.conflist` (spec/cni.md 1.1).
//!
//! The template (`manifests/10-aws.conflist`, embedded in the binary and replaceable with
//! `--conflist-template`, like the reference chart's `cniConfig.fileContents`) carries
//! `__PLACEHOLDER__` strings that are replaced with the settings, JSON-escaped. The result must
//! be a conflist (`cniVersion` 0.4.0 or later so that `prevResult` reaches DEL, a `name`, a
//! non-empty `plugins` list of objects with a `type`); the `egress-cni` entry is inserted
//! after `aws-cni` when the template has none (spec 1.1 item 2, see [`egress_entry`]), and
//! `bandwidth` and `tuning` are appended per `ENABLE_BANDWIDTH_PLUGIN` and `DISABLE_POD_V6`.

use serde_json::{json, Value};

use crate::error::InstallerError;
use crate::settings::Settings;

/// File name of the installed conflist.
pub const CONFLIST_NAME: &str = "10-aws.conflist";

/// The template shipped in `manifests/10-aws.conflist`.
pub const TEMPLATE: &str = include_str!("../../manifests/10-aws.conflist");

/// The placeholders this installer fills in.
pub const PLACEHOLDERS: [&str; 5] = [
    "__VETHPREFIX__",
    "__MTU__",
    "__PODSGENFORCINGMODE__",
    "__PLUGINLOGFILE__",
    "__PLUGINLOGLEVEL__",
];

/// The placeholders of the template and the values they take.
pub fn placeholders(settings: &Settings) -> [(&'static str, String); 5] {
    [
        ("__VETHPREFIX__", settings.veth_prefix.clone()),
        ("__MTU__", settings.pod_mtu.to_string()),
        (
            "__PODSGENFORCINGMODE__",
            settings.pod_sg_enforcing_mode.clone(),
        ),
        ("__PLUGINLOGFILE__", settings.plugin_log_file.clone()),
        ("__PLUGINLOGLEVEL__", settings.plugin_log_level.clone()),
    ]
}

/// A string's JSON escaping without the surrounding quotes (placeholders sit inside quotes).
fn json_escaped(s: &str) -> String {
    let quoted = Value::String(s.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

fn version_at_least_0_4(v: &str) -> bool {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(Some(major)), Some(Some(minor))) => major >= 1 || (major == 0 && minor >= 4),
        _ => false,
    }
}

/// A string value that is still a whole `__PLACEHOLDER__`.
fn unreplaced_placeholder(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => {
            let inner = s.strip_prefix("__")?.strip_suffix("__")?;
            (!inner.is_empty() && inner.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then_some(s.as_str())
        }
        Value::Array(items) => items.iter().find_map(unreplaced_placeholder),
        Value::Object(map) => map.values().find_map(unreplaced_placeholder),
        _ => None,
    }
}

/// Checks that `value` is a conflist the runtime will use with `prevResult` on DEL.
pub fn validate(value: &Value) -> Result<(), InstallerError> {
    let bad = |why: &str| Err(InstallerError::Conflist(why.to_owned()));
    let Some(obj) = value.as_object() else {
        return bad("not a JSON object");
    };
    match obj.get("cniVersion").and_then(Value::as_str) {
        Some(v) if version_at_least_0_4(v) => {}
        Some(v) => {
            return bad(&format!(
                "cniVersion {v:?} is below 0.4.0 (DEL would get no prevResult)"
            ))
        }
        None => return bad("no cniVersion string"),
    }
    if obj
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return bad("no name");
    }
    let Some(plugins) = obj.get("plugins").and_then(Value::as_array) else {
        return bad("no plugins list");
    };
    if plugins.is_empty() {
        return bad("empty plugins list");
    }
    for (i, p) in plugins.iter().enumerate() {
        if p.get("type")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return bad(&format!("plugin {i} has no type"));
        }
    }
    Ok(())
}

/// Refuses a template with a `__PLACEHOLDER__` this installer does not fill in. Checked on
/// the template, not on the rendered conflist: a setting's value may look like a placeholder.
fn check_placeholders(template: &str) -> Result<(), InstallerError> {
    let Ok(value) = serde_json::from_str::<Value>(template) else {
        // Placeholders sit inside strings, so the template is JSON; render reports the error.
        return Ok(());
    };
    let known: Vec<&str> = PLACEHOLDERS.to_vec();
    let mut left = None;
    find_unknown_placeholder(&value, &known, &mut left);
    match left {
        Some(p) => Err(InstallerError::Conflist(format!(
            "placeholder {p} left unreplaced"
        ))),
        None => Ok(()),
    }
}

fn find_unknown_placeholder(value: &Value, known: &[&str], left: &mut Option<String>) {
    if left.is_some() {
        return;
    }
    match value {
        Value::Array(items) => items
            .iter()
            .for_each(|v| find_unknown_placeholder(v, known, left)),
        Value::Object(map) => map
            .values()
            .for_each(|v| find_unknown_placeholder(v, known, left)),
        v => {
            if let Some(p) = unreplaced_placeholder(v).filter(|p| !known.contains(p)) {
                *left = Some(p.to_owned());
            }
        }
    }
}

/// The `egress-cni` entry of the conflist (spec 1.1 item 2): in an IPv6 cluster
/// (`ENABLE_IPv6`) IPv4 egress, enabled by `ENABLE_V4_EGRESS` (default true), `nodeIP` the
/// node's `local-ipv4`, host-local from `169.254.172.0/22`; in an IPv4 cluster IPv6 egress,
/// enabled by `ENABLE_V6_EGRESS`, `nodeIP` the node's `ipv6`, host-local from
/// `fd00::ac:00/118`. Without a node address of that family (instance metadata had none) the
/// entry is written disabled, as the reference forces it.
pub fn egress_entry(settings: &Settings) -> Value {
    let v6_cluster = settings.enable_ipv6;
    let node_ip = settings
        .egress_node_ip
        .filter(|ip| ip.is_ipv4() == v6_cluster);
    let wanted = if v6_cluster {
        settings.enable_v4_egress
    } else {
        settings.enable_v6_egress
    };
    let enabled = wanted && node_ip.is_some();
    let (subnet, dst, data_dir, log_file) = if v6_cluster {
        (
            "169.254.172.0/22",
            "0.0.0.0/0",
            "/run/cni/v6pd/egress-v4-ipam",
            &settings.egress_v4_log_file,
        )
    } else {
        (
            "fd00::ac:00/118",
            "::/0",
            "/run/cni/v4pd/egress-v6-ipam",
            &settings.egress_v6_log_file,
        )
    };
    json!({
        "name": "egress-cni",
        "type": "egress-cni",
        "mtu": settings.pod_mtu.to_string(),
        "enabled": enabled.to_string(),
        "randomizeSNAT": settings.randomize_snat,
        "nodeIP": node_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": dst}],
            "dataDir": data_dir,
        },
        "pluginLogFile": log_file,
        "pluginLogLevel": settings.plugin_log_level,
    })
}

/// `template` with each placeholder replaced by its JSON-escaped value, in one pass over the
/// template: a value that itself contains a placeholder (a log file named
/// `/x/__PLUGINLOGLEVEL__`) is written as it is, not expanded again.
fn replace_placeholders(template: &str, values: &[(&'static str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("__") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match values.iter().find(|(p, _)| rest.starts_with(p)) {
            Some((p, v)) => {
                out.push_str(&json_escaped(v));
                rest = &rest[p.len()..];
            }
            None => {
                out.push_str("__");
                rest = &rest[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Renders `template` with `settings`: placeholders replaced, validated, optional plugins
/// appended. Returns the JSON text to install (indented, with a final newline).
pub fn render(template: &str, settings: &Settings) -> Result<String, InstallerError> {
    check_placeholders(template)?;
    let text = replace_placeholders(template, &placeholders(settings));
    let mut value: Value = serde_json::from_str(&text)
        .map_err(|e| InstallerError::Conflist(format!("not JSON: {e}")))?;
    validate(&value)?;
    if let Some(plugins) = value.get_mut("plugins").and_then(Value::as_array_mut) {
        let has_egress = plugins
            .iter()
            .any(|p| p.get("type").and_then(Value::as_str) == Some("egress-cni"));
        if !has_egress {
            let at = plugins
                .iter()
                .position(|p| p.get("type").and_then(Value::as_str) == Some("aws-cni"))
                .map_or(0, |i| i + 1);
            plugins.insert(at, egress_entry(settings));
        }
        if settings.enable_bandwidth_plugin {
            plugins.push(json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}));
        }
        if settings.disable_pod_v6 {
            plugins.push(json!({
                "type": "tuning",
                "sysctl": {
                    "net.ipv6.conf.all.disable_ipv6": "1",
                    "net.ipv6.conf.default.disable_ipv6": "1",
                    "net.ipv6.conf.lo.disable_ipv6": "1"
                }
            }));
        }
    }
    let mut out = serde_json::to_string_pretty(&value)
        .map_err(|e| InstallerError::Conflist(format!("cannot encode: {e}")))?;
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(vars: &[(&str, &str)]) -> Value {
        let s = Settings::for_test(vars).unwrap();
        serde_json::from_str(&render(TEMPLATE, &s).unwrap()).unwrap()
    }

    fn types(v: &Value) -> Vec<&str> {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn default_conflist_is_the_reference_one() {
        let v = rendered(&[]);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "aws-cni");
        assert_eq!(v["disableCheck"], true);
        assert_eq!(types(&v), vec!["aws-cni", "egress-cni", "portmap"]);
        let aws = &v["plugins"][0];
        assert_eq!(aws["name"], "aws-cni");
        assert_eq!(aws["vethPrefix"], "eni");
        assert_eq!(aws["mtu"], "9001");
        assert_eq!(aws["podSGEnforcingMode"], "strict");
        assert_eq!(aws["pluginLogFile"], "/var/log/aws-routed-eni/plugin.log");
        assert_eq!(aws["pluginLogLevel"], "Debug");
        assert_eq!(
            aws["capabilities"],
            json!({"io.kubernetes.cri.pod-annotations": true})
        );
        assert_eq!(v["plugins"][2]["snat"], true);
        assert_eq!(
            v["plugins"][2]["capabilities"],
            json!({"portMappings": true})
        );
    }

    #[test]
    fn a_value_holding_a_placeholder_is_written_as_it_is() {
        // Found by fuzzing: the log file became "/x/Debug" when the level was replaced after it.
        let v = rendered(&[
            ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/x/__PLUGINLOGLEVEL__"),
            ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "__MTU__"),
        ]);
        let aws = &v["plugins"][0];
        assert_eq!(aws["pluginLogFile"], "/x/__PLUGINLOGLEVEL__");
        assert_eq!(aws["pluginLogLevel"], "__MTU__");
        assert_eq!(aws["mtu"], "9001");
    }

    #[test]
    fn settings_flow_into_the_aws_cni_entry() {
        let v = rendered(&[
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "cali"),
            ("POD_MTU", "1500"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "standard"),
            ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/var/log/x \"quoted\".log"),
            ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "DEBUG"),
        ]);
        let aws = &v["plugins"][0];
        assert_eq!(aws["vethPrefix"], "cali");
        assert_eq!(aws["mtu"], "1500");
        assert_eq!(aws["podSGEnforcingMode"], "standard");
        assert_eq!(aws["pluginLogFile"], "/var/log/x \"quoted\".log");
        assert_eq!(aws["pluginLogLevel"], "DEBUG");
    }

    #[test]
    fn bandwidth_and_tuning_are_chained_after_portmap_when_enabled() {
        let v = rendered(&[("ENABLE_BANDWIDTH_PLUGIN", "true")]);
        assert_eq!(
            types(&v),
            vec!["aws-cni", "egress-cni", "portmap", "bandwidth"]
        );
        assert_eq!(v["plugins"][3]["capabilities"], json!({"bandwidth": true}));
        let v = rendered(&[("DISABLE_POD_V6", "true")]);
        assert_eq!(
            types(&v),
            vec!["aws-cni", "egress-cni", "portmap", "tuning"]
        );
        assert_eq!(
            v["plugins"][3]["sysctl"]["net.ipv6.conf.lo.disable_ipv6"],
            "1"
        );
        let v = rendered(&[("DISABLE_POD_V6", "true"), ("ENABLE_BANDWIDTH_PLUGIN", "1")]);
        assert_eq!(
            types(&v),
            vec!["aws-cni", "egress-cni", "portmap", "bandwidth", "tuning"]
        );
    }

    fn with_node_ip(vars: &[(&str, &str)], ip: Option<&str>) -> Value {
        let mut s = Settings::for_test(vars).unwrap();
        s.egress_node_ip = ip.map(|i| i.parse().unwrap());
        serde_json::from_str(&render(TEMPLATE, &s).unwrap()).unwrap()
    }

    #[test]
    fn an_ipv6_cluster_gets_ipv4_egress_to_the_node_ipv4_by_default() {
        let v = with_node_ip(&[("ENABLE_IPv6", "true")], Some("10.0.0.10"));
        assert_eq!(
            v["plugins"][1],
            json!({
                "name": "egress-cni",
                "type": "egress-cni",
                "mtu": "9001",
                "enabled": "true",
                "randomizeSNAT": "prng",
                "nodeIP": "10.0.0.10",
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "169.254.172.0/22"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": "/run/cni/v6pd/egress-v4-ipam"
                },
                "pluginLogFile": "/var/log/aws-routed-eni/egress-v4-plugin.log",
                "pluginLogLevel": "Debug"
            })
        );
        let v = with_node_ip(
            &[("ENABLE_IPv6", "true"), ("ENABLE_V4_EGRESS", "false")],
            Some("10.0.0.10"),
        );
        assert_eq!(v["plugins"][1]["enabled"], "false");
        // A node address of the wrong family is not used.
        let v = with_node_ip(&[("ENABLE_IPv6", "true")], Some("2001:db8::1"));
        assert_eq!(v["plugins"][1]["enabled"], "false");
        assert_eq!(v["plugins"][1]["nodeIP"], "");
    }

    #[test]
    fn an_ipv4_cluster_gets_ipv6_egress_only_when_asked_and_the_node_has_ipv6() {
        let v = with_node_ip(&[], Some("2001:db8::10"));
        assert_eq!(
            v["plugins"][1]["enabled"], "false",
            "ENABLE_V6_EGRESS is off by default"
        );
        let on = [
            ("ENABLE_V6_EGRESS", "true"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none"),
        ];
        let v = with_node_ip(&on, Some("2001:db8::10"));
        let e = &v["plugins"][1];
        assert_eq!(e["enabled"], "true");
        assert_eq!(e["nodeIP"], "2001:db8::10");
        assert_eq!(e["randomizeSNAT"], "none");
        assert_eq!(e["ipam"]["ranges"][0][0]["subnet"], "fd00::ac:00/118");
        assert_eq!(e["ipam"]["routes"][0]["dst"], "::/0");
        assert_eq!(e["ipam"]["dataDir"], "/run/cni/v4pd/egress-v6-ipam");
        assert_eq!(
            e["pluginLogFile"],
            "/var/log/aws-routed-eni/egress-v6-plugin.log"
        );
        // Forced off when instance metadata has no IPv6 for the node.
        let v = with_node_ip(&on, None);
        assert_eq!(v["plugins"][1]["enabled"], "false");
    }

    #[test]
    fn a_template_with_its_own_egress_entry_keeps_it() {
        let s = Settings::for_test(&[]).unwrap();
        let t = r#"{"cniVersion":"0.4.0","name":"aws-cni","plugins":[{"type":"aws-cni"},{"type":"egress-cni","enabled":"false"}]}"#;
        let v: Value = serde_json::from_str(&render(t, &s).unwrap()).unwrap();
        assert_eq!(types(&v), vec!["aws-cni", "egress-cni"]);
        assert_eq!(
            v["plugins"][1],
            json!({"type": "egress-cni", "enabled": "false"})
        );
    }

    #[test]
    fn invalid_templates_are_refused() {
        let s = Settings::for_test(&[]).unwrap();
        let cases = [
            ("{", "not JSON"),
            (
                r#"{"cniVersion":"0.3.1","name":"aws-cni","plugins":[{"type":"aws-cni"}]}"#,
                "below 0.4.0",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"aws-cni","plugins":[]}"#,
                "empty",
            ),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
                "no name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"__OTHER__"}]}"#,
                "__OTHER__",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#,
                "no type",
            ),
        ];
        for (template, why) in cases {
            let err = render(template, &s).unwrap_err().to_string();
            assert!(err.contains(why), "{template}: {err}");
        }
        let ok =
            r#"{"cniVersion":"1.1.0","name":"n","plugins":[{"type":"aws-cni","mtu":"__MTU__"}]}"#;
        assert!(render(ok, &s).unwrap().contains("\"9001\""));
    }
}
