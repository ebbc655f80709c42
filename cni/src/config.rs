//! The network configuration on stdin (spec cni.md 1.1 and 1.3), parsed and validated before
//! anything is touched.
//!
//! Reference fields: `cniVersion`, `name`, `type`, `vethPrefix`, `mtu` (a string),
//! `podSGEnforcingMode`, `pluginLogFile`, `pluginLogLevel`, `runtimeConfig`, `prevResult`.
//! Our own fields (all optional, defaults keep the reference behaviour except the pool wait):
//! `ipamdSocket`, `npAgentSocket`, `ipamdConnectTimeoutMs`, `poolWaitSeconds`,
//! `poolRetryMs`, `branchLink`.
//!
//! `branchLink` (`"vlan"`, the default, or `"hotplug"`) is a test/simulator setting: how a
//! branch-ENI (security groups for pods) pod's `vlan.eth.<id>` link is made. `vlan` creates a
//! real 802.1Q link on the trunk ENI's interface, as the reference does (the kernel needs
//! 8021q); `hotplug` takes the link the simulated fabric has already plugged into the node
//! with the branch ENI's MAC and renames it. Any other value is refused.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use vpc_cni_net::BranchLinkKind;

use crate::env::valid_id;
use crate::error::CniError;
use crate::version::CniVersion;

/// Default `vethPrefix`.
pub const DEFAULT_VETH_PREFIX: &str = "eni";
/// Default (and fallback) pod MTU.
pub const DEFAULT_MTU: u32 = 9001;
/// Smallest IPv4 pod MTU the reference accepts.
pub const MIN_MTU_V4: u32 = 576;
/// Default `pluginLogFile`.
pub const DEFAULT_LOG_FILE: &str = "/var/log/aws-routed-eni/plugin.log";
/// Default time ADD waits for ipamd's pool to refill (`poolWaitSeconds`).
pub const DEFAULT_POOL_WAIT: Duration = Duration::from_secs(10);
/// Default pause between two AddNetwork attempts while waiting (`poolRetryMs`).
pub const DEFAULT_POOL_RETRY: Duration = Duration::from_millis(250);
/// Default bound on dialling ipamd's socket (`ipamdConnectTimeoutMs`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The pod annotation key asking for one address per network card.
pub const MULTI_NIC_ANNOTATION: &str = "k8s.amazonaws.com/nicConfig";
/// The value of [`MULTI_NIC_ANNOTATION`] that enables multi-NIC.
pub const MULTI_NIC_VALUE: &str = "multi-nic-attachment";
/// The runtimeConfig key carrying pod annotations.
pub const POD_ANNOTATIONS_KEY: &str = "io.kubernetes.cri.pod-annotations";

/// `podSGEnforcingMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SgEnforcingMode {
    /// Branch-ENI pods get `vlan`-prefixed veths and iif rules (default).
    #[default]
    Strict,
    /// Branch-ENI pods are wired like normal pods.
    Standard,
}

/// Where the plugin logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error (`pluginLogFile` empty or `stderr`).
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

/// `pluginLogLevel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug (the reference default).
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

impl LogLevel {
    /// Parses a level case-insensitively; anything unknown is Debug (logging never fails a
    /// pod).
    pub fn parse(s: &str) -> LogLevel {
        match s.to_ascii_lowercase().as_str() {
            "trace" => LogLevel::Trace,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warn,
            "error" | "fatal" | "panic" => LogLevel::Error,
            _ => LogLevel::Debug,
        }
    }
}

/// One `cni.dev/valid-attachments` entry of a GC request.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    /// The container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name.
    pub ifname: String,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: CniVersion,
    /// `name` (the network name; part of ipamd's allocation key).
    pub name: String,
    /// `type`.
    pub plugin_type: String,
    /// `vethPrefix`.
    pub veth_prefix: String,
    /// The pod MTU after the reference's fallback rules.
    pub mtu: u32,
    /// `podSGEnforcingMode`.
    pub sg_mode: SgEnforcingMode,
    /// `pluginLogFile`.
    pub log_target: LogTarget,
    /// `pluginLogLevel`.
    pub log_level: LogLevel,
    /// The multi-NIC pod annotation was present with [`MULTI_NIC_VALUE`].
    pub requires_multi_nic: bool,
    /// `prevResult`, raw (parsed by [`crate::result::PrevResult`] when needed).
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC only).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `ipamdSocket` (ours): ipamd's unix socket.
    pub ipamd_socket: String,
    /// `npAgentSocket` (ours): the network policy agent's unix socket.
    pub np_agent_socket: String,
    /// `ipamdConnectTimeoutMs` (ours).
    pub connect_timeout: Duration,
    /// `poolWaitSeconds` (ours): how long ADD keeps asking ipamd while it has no free
    /// address; 0 fails at once as the reference does.
    pub pool_wait: Duration,
    /// `poolRetryMs` (ours): pause between attempts while waiting.
    pub pool_retry: Duration,
    /// `branchLink` (ours; test/simulator setting): how branch-ENI pods' VLAN link is made.
    pub branch_link: BranchLinkKind,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    plugin_type: String,
    #[serde(default)]
    veth_prefix: Option<String>,
    #[serde(default)]
    mtu: Option<Value>,
    #[serde(default, rename = "podSGEnforcingMode")]
    pod_sg_enforcing_mode: Option<String>,
    #[serde(default)]
    plugin_log_file: Option<String>,
    #[serde(default)]
    plugin_log_level: Option<String>,
    #[serde(default)]
    runtime_config: Option<Value>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(default)]
    ipamd_socket: Option<String>,
    #[serde(default)]
    np_agent_socket: Option<String>,
    #[serde(default)]
    ipamd_connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pool_wait_seconds: Option<f64>,
    #[serde(default)]
    pool_retry_ms: Option<u64>,
    #[serde(default)]
    branch_link: Option<String>,
}

/// The reference's `GetPodMTU`: a value that does not parse, or lies outside 576..=9001,
/// falls back to 9001. Accepts a JSON string (the reference's type) or a number.
pub fn pod_mtu(v: Option<&Value>) -> u32 {
    let parsed = match v {
        Some(Value::String(s)) => s.trim().parse::<u32>().ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    match parsed {
        Some(m) if (MIN_MTU_V4..=DEFAULT_MTU).contains(&m) => m,
        _ => DEFAULT_MTU,
    }
}

/// Validates a `vethPrefix`: at most 4 characters, not `eth`, `lo` or `vlan`, and only
/// characters valid in an interface name. Empty means the default.
pub fn veth_prefix(p: Option<&str>) -> Result<String, CniError> {
    let p = match p {
        None | Some("") => return Ok(DEFAULT_VETH_PREFIX.to_string()),
        Some(p) => p,
    };
    if p.len() > 4 {
        return Err(CniError::config(format!(
            "vethPrefix {p:?} is longer than 4 characters"
        )));
    }
    if matches!(p, "eth" | "lo" | "vlan") {
        return Err(CniError::config(format!("vethPrefix {p:?} is reserved")));
    }
    if !p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(CniError::config(format!(
            "vethPrefix {p:?} has characters not allowed in an interface name"
        )));
    }
    Ok(p.to_string())
}

/// The longest unix socket path `connect` takes: `sun_path` is 108 bytes with its NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// A unix socket path field (empty or absent means `default`): refused when it cannot be
/// connected to at all (too long for `sun_path`, or with a NUL), so that ADD does not spend
/// its whole pool wait dialling it.
fn socket_path(field: &str, v: Option<String>, default: &str) -> Result<String, CniError> {
    let p = v
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string());
    if p.len() > MAX_SOCKET_PATH {
        return Err(CniError::config(format!(
            "{field} is {} bytes long; a unix socket path has at most {MAX_SOCKET_PATH}",
            p.len()
        )));
    }
    if p.contains('\0') {
        return Err(CniError::config(format!("{field} contains a NUL byte")));
    }
    Ok(p)
}

fn requires_multi_nic(runtime_config: Option<&Value>) -> bool {
    let v = runtime_config
        .and_then(|rc| rc.get(POD_ANNOTATIONS_KEY))
        .and_then(|a| a.get(MULTI_NIC_ANNOTATION))
        .and_then(Value::as_str);
    match v {
        Some(MULTI_NIC_VALUE) => true,
        Some(other) => {
            tracing::info!(
                value = other,
                "ignoring unknown {MULTI_NIC_ANNOTATION} value"
            );
            false
        }
        None => false,
    }
}

impl NetConf {
    /// Parses and validates the configuration bytes from stdin.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let raw: RawConf = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| CniError::decode_at("network config", "", e))?;
        de.end().map_err(|source| CniError::Decode {
            what: "network config",
            source,
        })?;
        let cni_version: CniVersion = raw.cni_version.parse()?;
        if raw.name.is_empty() {
            return Err(CniError::config("missing network name"));
        }
        if !valid_id(&raw.name) {
            return Err(CniError::config(format!(
                "network name {:?} has invalid characters",
                raw.name
            )));
        }
        let veth_prefix = veth_prefix(raw.veth_prefix.as_deref())?;
        // As the reference: only "strict" (or nothing) is strict, anything else is treated as
        // standard. The mode matters only for branch-ENI pods; refusing an unknown value here
        // failed every pod of a node whose entrypoint wrote it (it checks the value only with
        // ENABLE_POD_ENI, as the reference's does).
        let sg_mode = match raw.pod_sg_enforcing_mode.as_deref() {
            None | Some("") | Some("strict") => SgEnforcingMode::Strict,
            Some("standard") => SgEnforcingMode::Standard,
            Some(o) => {
                tracing::warn!(
                    value = o,
                    "podSGEnforcingMode is neither strict nor standard; branch-ENI pods would be wired as standard"
                );
                SgEnforcingMode::Standard
            }
        };
        let log_target = match raw.plugin_log_file.as_deref() {
            None => LogTarget::File(DEFAULT_LOG_FILE.into()),
            Some("") | Some("stderr") => LogTarget::Stderr,
            Some("stdout") => {
                return Err(CniError::config(
                    "pluginLogFile must not be stdout: stdout carries the CNI result",
                ))
            }
            Some(p) => LogTarget::File(p.into()),
        };
        let pool_wait = match raw.pool_wait_seconds {
            None => DEFAULT_POOL_WAIT,
            Some(s) if s.is_finite() && (0.0..=600.0).contains(&s) => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(CniError::config(format!(
                    "poolWaitSeconds {s} is outside 0..=600"
                )))
            }
        };
        let pool_retry = match raw.pool_retry_ms {
            None => DEFAULT_POOL_RETRY,
            Some(ms) if (1..=60_000).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(CniError::config(format!(
                    "poolRetryMs {ms} is outside 1..=60000"
                )))
            }
        };
        let connect_timeout = match raw.ipamd_connect_timeout_ms {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(ms) if (1..=60_000).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(CniError::config(format!(
                    "ipamdConnectTimeoutMs {ms} is outside 1..=60000"
                )))
            }
        };
        let ipamd_socket =
            socket_path("ipamdSocket", raw.ipamd_socket, vpc_cni_rpc::DEFAULT_SOCKET)?;
        let np_agent_socket = socket_path(
            "npAgentSocket",
            raw.np_agent_socket,
            vpc_cni_rpc::NP_AGENT_SOCKET,
        )?;
        let branch_link = match raw.branch_link.as_deref() {
            None => BranchLinkKind::default(),
            Some(v) => BranchLinkKind::parse(v).ok_or_else(|| {
                CniError::config(format!(
                    "branchLink {v:?} is neither \"vlan\" nor \"hotplug\""
                ))
            })?,
        };
        Ok(NetConf {
            cni_version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            veth_prefix,
            mtu: pod_mtu(raw.mtu.as_ref()),
            sg_mode,
            log_target,
            log_level: LogLevel::parse(raw.plugin_log_level.as_deref().unwrap_or("Debug")),
            requires_multi_nic: requires_multi_nic(raw.runtime_config.as_ref()),
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
            valid_attachments: raw.valid_attachments,
            ipamd_socket,
            np_agent_socket,
            connect_timeout,
            pool_wait,
            pool_retry,
            branch_link,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    /// The plugin entry of the reference's installed conflist, as rendered by the entrypoint.
    fn reference() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "name": "aws-cni",
            "type": "aws-cni",
            "vethPrefix": "eni",
            "mtu": "9001",
            "podSGEnforcingMode": "strict",
            "pluginLogFile": "/var/log/aws-routed-eni/plugin.log",
            "pluginLogLevel": "DEBUG",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"a": "b"}}
        })
    }

    #[test]
    fn the_reference_conflist_entry_parses_with_its_values() {
        let c = parse(reference()).expect("valid");
        assert_eq!(c.cni_version, CniVersion::V0_4_0);
        assert_eq!(c.name, "aws-cni");
        assert_eq!(c.plugin_type, "aws-cni");
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.sg_mode, SgEnforcingMode::Strict);
        assert_eq!(
            c.log_target,
            LogTarget::File("/var/log/aws-routed-eni/plugin.log".into())
        );
        assert_eq!(c.log_level, LogLevel::Debug);
        assert!(!c.requires_multi_nic);
        assert_eq!(c.prev_result, None);
        assert_eq!(c.ipamd_socket, "/var/run/aws-node/ipamd.sock");
        assert_eq!(c.np_agent_socket, "/var/run/aws-node/npa.sock");
        assert_eq!(c.pool_wait, DEFAULT_POOL_WAIT);
    }

    #[test]
    fn defaults_apply_when_fields_are_absent() {
        let c =
            parse(json!({"cniVersion": "1.0.0", "name": "n", "type": "aws-cni"})).expect("valid");
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.sg_mode, SgEnforcingMode::Strict);
        assert_eq!(c.log_target, LogTarget::File(DEFAULT_LOG_FILE.into()));
        assert_eq!(c.pool_retry, DEFAULT_POOL_RETRY);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn mtu_falls_back_to_9001_when_unparsable_or_out_of_range() {
        assert_eq!(pod_mtu(Some(&json!("1500"))), 1500);
        assert_eq!(pod_mtu(Some(&json!(" 576 "))), 576);
        assert_eq!(pod_mtu(Some(&json!("9001"))), 9001);
        assert_eq!(pod_mtu(Some(&json!("575"))), 9001);
        assert_eq!(pod_mtu(Some(&json!("9002"))), 9001);
        assert_eq!(pod_mtu(Some(&json!("jumbo"))), 9001);
        assert_eq!(pod_mtu(Some(&json!(""))), 9001);
        assert_eq!(pod_mtu(Some(&json!(1500))), 1500);
        assert_eq!(pod_mtu(Some(&json!(-1))), 9001);
        assert_eq!(pod_mtu(None), 9001);
    }

    #[test]
    fn veth_prefix_is_at_most_4_chars_and_not_reserved() {
        assert_eq!(veth_prefix(Some("cali")).expect("ok"), "cali");
        assert_eq!(veth_prefix(Some("")).expect("default"), "eni");
        for bad in ["abcde", "eth", "lo", "vlan", "a/b", "e n"] {
            let e = veth_prefix(Some(bad)).expect_err(bad);
            assert_eq!(e.code(), 7, "{bad}");
        }
        let mut r = reference();
        r["vethPrefix"] = json!("toolong");
        assert_eq!(parse(r).expect_err("long").code(), 7);
    }

    #[test]
    fn plugin_log_file_is_never_stdout() {
        let mut r = reference();
        r["pluginLogFile"] = json!("stdout");
        assert_eq!(parse(r.clone()).expect_err("stdout").code(), 7);
        r["pluginLogFile"] = json!("stderr");
        assert_eq!(
            parse(r.clone()).expect("stderr").log_target,
            LogTarget::Stderr
        );
        r["pluginLogFile"] = json!("");
        assert_eq!(parse(r).expect("empty").log_target, LogTarget::Stderr);
    }

    #[test]
    fn log_levels_parse_case_insensitively_with_debug_fallback() {
        assert_eq!(LogLevel::parse("DEBUG"), LogLevel::Debug);
        assert_eq!(LogLevel::parse("Info"), LogLevel::Info);
        assert_eq!(LogLevel::parse("warning"), LogLevel::Warn);
        assert_eq!(LogLevel::parse("error"), LogLevel::Error);
        assert_eq!(LogLevel::parse("loud"), LogLevel::Debug);
    }

    #[test]
    fn sg_mode_is_strict_only_when_strict_or_absent() {
        let mut r = reference();
        r["podSGEnforcingMode"] = json!("standard");
        assert_eq!(
            parse(r.clone()).expect("std").sg_mode,
            SgEnforcingMode::Standard
        );
        // Anything but strict is standard, as the reference reads it (found by fuzzing the
        // installer: it writes any value when ENABLE_POD_ENI is off, and every pod failed).
        r["podSGEnforcingMode"] = json!("lax");
        assert_eq!(parse(r).expect("lax").sg_mode, SgEnforcingMode::Standard);
    }

    #[test]
    fn multi_nic_comes_from_the_pod_annotation() {
        let mut r = reference();
        r["runtimeConfig"][POD_ANNOTATIONS_KEY][MULTI_NIC_ANNOTATION] = json!(MULTI_NIC_VALUE);
        assert!(parse(r.clone()).expect("valid").requires_multi_nic);
        r["runtimeConfig"][POD_ANNOTATIONS_KEY][MULTI_NIC_ANNOTATION] = json!("other");
        assert!(!parse(r).expect("valid").requires_multi_nic);
    }

    #[test]
    fn bad_json_is_code_6_and_bad_values_code_7_or_1() {
        assert_eq!(NetConf::parse(b"{not json").expect_err("json").code(), 6);
        assert_eq!(NetConf::parse(b"\"aws\"").expect_err("shape").code(), 6);
        assert_eq!(
            NetConf::parse(br#"{"name": 3}"#).expect_err("type").code(),
            6
        );
        let mut r = reference();
        r["cniVersion"] = json!("2.0.0");
        assert_eq!(parse(r).expect_err("version").code(), 1);
        let mut r = reference();
        r["name"] = json!("");
        assert_eq!(parse(r).expect_err("name").code(), 7);
        let mut r = reference();
        r["name"] = json!("bad name");
        assert_eq!(parse(r).expect_err("name").code(), 7);
    }

    #[test]
    fn our_fields_are_read_and_bounded() {
        let mut r = reference();
        r["ipamdSocket"] = json!("/tmp/x/ipamd.sock");
        r["npAgentSocket"] = json!("/tmp/x/npa.sock");
        r["poolWaitSeconds"] = json!(2.5);
        r["poolRetryMs"] = json!(100);
        r["ipamdConnectTimeoutMs"] = json!(300);
        let c = parse(r.clone()).expect("valid");
        assert_eq!(c.ipamd_socket, "/tmp/x/ipamd.sock");
        assert_eq!(c.np_agent_socket, "/tmp/x/npa.sock");
        assert_eq!(c.pool_wait, Duration::from_millis(2500));
        assert_eq!(c.pool_retry, Duration::from_millis(100));
        assert_eq!(c.connect_timeout, Duration::from_millis(300));
        r["poolWaitSeconds"] = json!(-1);
        assert_eq!(parse(r.clone()).expect_err("neg").code(), 7);
        r["poolWaitSeconds"] = json!(0);
        r["poolRetryMs"] = json!(0);
        assert_eq!(parse(r).expect_err("zero retry").code(), 7);
    }

    #[test]
    fn branch_link_is_vlan_by_default_hotplug_on_request_and_nothing_else() {
        let mut r = reference();
        assert_eq!(
            parse(r.clone()).expect("default").branch_link,
            BranchLinkKind::Vlan
        );
        r["branchLink"] = json!("hotplug");
        assert_eq!(
            parse(r.clone()).expect("hotplug").branch_link,
            BranchLinkKind::Hotplug
        );
        r["branchLink"] = json!("vlan");
        assert_eq!(
            parse(r.clone()).expect("vlan").branch_link,
            BranchLinkKind::Vlan
        );
        r["branchLink"] = json!("macvlan");
        let e = parse(r.clone()).expect_err("unknown");
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("branchLink"), "{e}");
        r["branchLink"] = json!(1);
        assert!(parse(r).is_err());
    }

    #[test]
    fn prev_result_and_gc_attachments_are_kept() {
        let mut r = reference();
        r["prevResult"] = json!({"cniVersion": "0.4.0", "interfaces": []});
        r["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
        let c = parse(r).expect("valid");
        assert_eq!(c.prev_result.expect("prev")["cniVersion"], "0.4.0");
        assert_eq!(
            c.valid_attachments.expect("gc"),
            vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
    }
}
