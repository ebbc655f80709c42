//! The environment the daemon container's entrypoint reads and validates before anything is
//! installed (spec/cni.md 4.4 step 1, spec/ipamd.md 1.3).
//!
//! Validation follows the reference entrypoint: veth prefix (at most 4 characters, not `eth`,
//! `lo` or `vlan`), pod MTU range by family (576..=9001 for IPv4, 1280..=9001 for IPv6),
//! `IP_COOLDOWN_PERIOD` a whole number of seconds 0 or above, prefix delegation not enabled
//! with `WARM_IP_TARGET`, `WARM_PREFIX_TARGET` and `MINIMUM_IP_TARGET` all at 0 or below, the
//! plugin log file not `stdout`, and `POD_SECURITY_GROUP_ENFORCING_MODE` `strict` or `standard`
//! when `ENABLE_POD_ENI` is on. Where the reference silently takes a default for an unparsable
//! boolean or integer, this entrypoint refuses to start and names the variable (as ipamd does).

use std::path::PathBuf;

use crate::error::InstallerError;

/// Default `HOST_CNI_BIN_PATH`: the host's `/opt/cni/bin` as mounted in the container.
pub const DEFAULT_HOST_CNI_BIN_PATH: &str = "/host/opt/cni/bin";
/// Default `HOST_CNI_CONFDIR_PATH`: the host's `/etc/cni/net.d` as mounted in the container.
pub const DEFAULT_HOST_CNI_CONFDIR_PATH: &str = "/host/etc/cni/net.d";
/// Default `AWS_VPC_K8S_PLUGIN_LOG_FILE`.
pub const DEFAULT_PLUGIN_LOG_FILE: &str = "/var/log/aws-routed-eni/plugin.log";
/// Default `AWS_VPC_K8S_PLUGIN_LOG_LEVEL` (the reference code's; its manifest sets `DEBUG`).
pub const DEFAULT_PLUGIN_LOG_LEVEL: &str = "Debug";
/// Default ENI and pod MTU.
pub const DEFAULT_MTU: u32 = 9001;
/// Default log file of the IPv4-egress plugin (IPv6 clusters).
pub const DEFAULT_EGRESS_V4_LOG_FILE: &str = "/var/log/aws-routed-eni/egress-v4-plugin.log";
/// Default log file of the IPv6-egress plugin (IPv4 clusters).
pub const DEFAULT_EGRESS_V6_LOG_FILE: &str = "/var/log/aws-routed-eni/egress-v6-plugin.log";

/// The validated settings of the daemon container's entrypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `AWS_VPC_K8S_CNI_VETHPREFIX` (default `eni`).
    pub veth_prefix: String,
    /// `POD_MTU`, defaulting to `AWS_VPC_ENI_MTU` (default 9001).
    pub pod_mtu: u32,
    /// `POD_SECURITY_GROUP_ENFORCING_MODE` (default `strict`).
    pub pod_sg_enforcing_mode: String,
    /// `AWS_VPC_K8S_PLUGIN_LOG_FILE`.
    pub plugin_log_file: String,
    /// `AWS_VPC_K8S_PLUGIN_LOG_LEVEL`.
    pub plugin_log_level: String,
    /// `ENABLE_BANDWIDTH_PLUGIN`: chain `bandwidth`.
    pub enable_bandwidth_plugin: bool,
    /// `DISABLE_POD_V6`: chain `tuning` turning IPv6 off in each pod.
    pub disable_pod_v6: bool,
    /// `ENABLE_IPv6`.
    pub enable_ipv6: bool,
    /// `ENABLE_V4_EGRESS` (IPv6 clusters; default true): egress-cni gives pods IPv4 egress.
    pub enable_v4_egress: bool,
    /// `ENABLE_V6_EGRESS` (IPv4 clusters; default false): egress-cni gives pods IPv6 egress.
    pub enable_v6_egress: bool,
    /// `AWS_VPC_K8S_CNI_RANDOMIZESNAT` (`prng`, `hashrandom`, `none`): egress-cni's
    /// `randomizeSNAT`.
    pub randomize_snat: String,
    /// `AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE`.
    pub egress_v4_log_file: String,
    /// `AWS_VPC_K8S_EGRESS_V6_PLUGIN_LOG_FILE`.
    pub egress_v6_log_file: String,
    /// The node's primary address of the egress family (`local-ipv4` in an IPv6 cluster,
    /// `ipv6` in an IPv4 one), from instance metadata; not an environment variable: the
    /// entrypoint fills it in. Without it egress-cni is written disabled.
    pub egress_node_ip: Option<std::net::IpAddr>,
    /// `IP_COOLDOWN_PERIOD` in seconds (default 30).
    pub ip_cooldown_period: u64,
    /// `HOST_CNI_BIN_PATH`.
    pub host_cni_bin_path: PathBuf,
    /// `HOST_CNI_CONFDIR_PATH`.
    pub host_cni_confdir_path: PathBuf,
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

fn bad(var: &'static str, value: &str, why: impl Into<String>) -> InstallerError {
    InstallerError::Setting {
        var,
        value: value.to_owned(),
        why: why.into(),
    }
}

impl Env<'_> {
    /// The value, with empty meaning unset.
    fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, InstallerError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => parse_bool(&v).ok_or_else(|| bad(var, &v, "expected a boolean")),
        }
    }

    fn int(&self, var: &'static str) -> Result<Option<i64>, InstallerError> {
        match self.get(var) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| bad(var, &v, "expected an integer")),
        }
    }
}

/// Go's `strconv.ParseBool`, which the reference uses for every boolean variable.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Checks a veth prefix: at most 4 characters, not `eth`, `lo` or `vlan`, and only the
/// characters the plugin accepts in it (ASCII letters, digits, `_`, `-`): the plugin refuses any
/// other with code 7, so a prefix the entrypoint let through failed every pod on the node.
pub fn validate_veth_prefix(prefix: &str) -> Result<(), InstallerError> {
    if prefix.len() > 4 || ["eth", "lo", "vlan"].contains(&prefix) {
        return Err(bad(
            "AWS_VPC_K8S_CNI_VETHPREFIX",
            prefix,
            "at most 4 characters, and not eth, lo or vlan",
        ));
    }
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad(
            "AWS_VPC_K8S_CNI_VETHPREFIX",
            prefix,
            "only ASCII letters, digits, _ and - (it starts every host veth name)",
        ));
    }
    Ok(())
}

impl Settings {
    /// Reads and validates the settings from the process environment.
    pub fn from_env() -> Result<Settings, InstallerError> {
        Self::parse(&|k| std::env::var(k).ok())
    }

    /// Reads and validates the settings; `lookup` answers environment variables.
    pub fn parse(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Settings, InstallerError> {
        let env = Env { lookup };
        let veth_prefix = env.string("AWS_VPC_K8S_CNI_VETHPREFIX", "eni");
        validate_veth_prefix(&veth_prefix)?;

        let enable_ipv6 = env.bool("ENABLE_IPv6", false)?;
        let (mtu_var, mtu) = match (env.int("POD_MTU")?, env.int("AWS_VPC_ENI_MTU")?) {
            (Some(pod), _) => ("POD_MTU", pod),
            (None, Some(eni)) => ("AWS_VPC_ENI_MTU", eni),
            (None, None) => ("AWS_VPC_ENI_MTU", i64::from(DEFAULT_MTU)),
        };
        let min_mtu = if enable_ipv6 { 1280 } else { 576 };
        if !(min_mtu..=i64::from(DEFAULT_MTU)).contains(&mtu) {
            return Err(bad(
                mtu_var,
                &mtu.to_string(),
                format!(
                    "must be in {min_mtu}..=9001 for {}",
                    if enable_ipv6 { "IPv6" } else { "IPv4" }
                ),
            ));
        }
        let pod_mtu = u32::try_from(mtu).map_err(|_| bad(mtu_var, &mtu.to_string(), "range"))?;
        // The ENI MTU is validated too when POD_MTU overrides it.
        if let Some(eni) = env.int("AWS_VPC_ENI_MTU")? {
            if !(min_mtu..=i64::from(DEFAULT_MTU)).contains(&eni) {
                return Err(bad(
                    "AWS_VPC_ENI_MTU",
                    &eni.to_string(),
                    format!("must be in {min_mtu}..=9001"),
                ));
            }
        }

        let ip_cooldown_period = match env.int("IP_COOLDOWN_PERIOD")? {
            None => 30,
            Some(n) => u64::try_from(n).map_err(|_| {
                bad(
                    "IP_COOLDOWN_PERIOD",
                    &n.to_string(),
                    "must be a whole number of seconds, 0 or above",
                )
            })?,
        };

        if env.bool("ENABLE_PREFIX_DELEGATION", false)? {
            let mut all_off = true;
            for var in ["WARM_IP_TARGET", "WARM_PREFIX_TARGET", "MINIMUM_IP_TARGET"] {
                if env.int(var)?.unwrap_or(0) > 0 {
                    all_off = false;
                }
            }
            if all_off {
                return Err(InstallerError::Combination(
                    "ENABLE_PREFIX_DELEGATION=true needs WARM_PREFIX_TARGET, WARM_IP_TARGET or \
                     MINIMUM_IP_TARGET above 0"
                        .into(),
                ));
            }
        }

        let pod_sg_enforcing_mode = env.string("POD_SECURITY_GROUP_ENFORCING_MODE", "strict");
        if env.bool("ENABLE_POD_ENI", false)?
            && !["strict", "standard"].contains(&pod_sg_enforcing_mode.as_str())
        {
            return Err(bad(
                "POD_SECURITY_GROUP_ENFORCING_MODE",
                &pod_sg_enforcing_mode,
                "must be strict or standard",
            ));
        }

        let plugin_log_file = env.string("AWS_VPC_K8S_PLUGIN_LOG_FILE", DEFAULT_PLUGIN_LOG_FILE);
        if plugin_log_file.eq_ignore_ascii_case("stdout") {
            return Err(bad(
                "AWS_VPC_K8S_PLUGIN_LOG_FILE",
                &plugin_log_file,
                "stdout carries the CNI protocol; use stderr or a file",
            ));
        }

        // Anything but hashrandom or none means prng, as ipamd reads the same variable.
        let randomize_snat = match env.string("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "prng").as_str() {
            "hashrandom" => "hashrandom".to_owned(),
            "none" => "none".to_owned(),
            _ => "prng".to_owned(),
        };
        let mut egress_logs = Vec::new();
        for (var, default) in [
            (
                "AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE",
                DEFAULT_EGRESS_V4_LOG_FILE,
            ),
            (
                "AWS_VPC_K8S_EGRESS_V6_PLUGIN_LOG_FILE",
                DEFAULT_EGRESS_V6_LOG_FILE,
            ),
        ] {
            let file = env.string(var, default);
            if file.eq_ignore_ascii_case("stdout") {
                return Err(bad(
                    var,
                    &file,
                    "stdout carries the CNI protocol; use stderr or a file",
                ));
            }
            egress_logs.push(file);
        }
        let egress_v6_log_file = egress_logs.pop().unwrap_or_default();
        let egress_v4_log_file = egress_logs.pop().unwrap_or_default();

        Ok(Settings {
            veth_prefix,
            pod_mtu,
            pod_sg_enforcing_mode,
            plugin_log_file,
            plugin_log_level: env.string("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", DEFAULT_PLUGIN_LOG_LEVEL),
            enable_bandwidth_plugin: env.bool("ENABLE_BANDWIDTH_PLUGIN", false)?,
            disable_pod_v6: env.bool("DISABLE_POD_V6", false)?,
            enable_ipv6,
            enable_v4_egress: env.bool("ENABLE_V4_EGRESS", true)?,
            enable_v6_egress: env.bool("ENABLE_V6_EGRESS", false)?,
            randomize_snat,
            egress_v4_log_file,
            egress_v6_log_file,
            egress_node_ip: None,
            ip_cooldown_period,
            host_cni_bin_path: env
                .string("HOST_CNI_BIN_PATH", DEFAULT_HOST_CNI_BIN_PATH)
                .into(),
            host_cni_confdir_path: env
                .string("HOST_CNI_CONFDIR_PATH", DEFAULT_HOST_CNI_CONFDIR_PATH)
                .into(),
        })
    }

    /// Settings for tests: defaults plus `vars`.
    pub fn for_test(vars: &[(&str, &str)]) -> Result<Settings, InstallerError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Self::parse(&|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_var(vars: &[(&str, &str)]) -> String {
        match Settings::for_test(vars).unwrap_err() {
            InstallerError::Setting { var, .. } => var.to_owned(),
            InstallerError::Combination(msg) => msg,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn defaults_are_the_reference_ones() {
        let s = Settings::for_test(&[]).unwrap();
        assert_eq!(s.veth_prefix, "eni");
        assert_eq!(s.pod_mtu, 9001);
        assert_eq!(s.pod_sg_enforcing_mode, "strict");
        assert_eq!(s.plugin_log_file, "/var/log/aws-routed-eni/plugin.log");
        assert_eq!(s.plugin_log_level, "Debug");
        assert_eq!(s.ip_cooldown_period, 30);
        assert!(!s.enable_bandwidth_plugin && !s.disable_pod_v6 && !s.enable_ipv6);
        assert_eq!(s.host_cni_bin_path, PathBuf::from("/host/opt/cni/bin"));
        assert_eq!(
            s.host_cni_confdir_path,
            PathBuf::from("/host/etc/cni/net.d")
        );
        assert!(s.enable_v4_egress && !s.enable_v6_egress);
        assert_eq!(s.randomize_snat, "prng");
        assert_eq!(
            s.egress_v4_log_file,
            "/var/log/aws-routed-eni/egress-v4-plugin.log"
        );
        assert_eq!(
            s.egress_v6_log_file,
            "/var/log/aws-routed-eni/egress-v6-plugin.log"
        );
        assert_eq!(s.egress_node_ip, None);
    }

    #[test]
    fn egress_settings_are_read_and_checked() {
        let s = Settings::for_test(&[
            ("ENABLE_V4_EGRESS", "false"),
            ("ENABLE_V6_EGRESS", "true"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "hashrandom"),
            ("AWS_VPC_K8S_EGRESS_V6_PLUGIN_LOG_FILE", "stderr"),
        ])
        .unwrap();
        assert!(!s.enable_v4_egress && s.enable_v6_egress);
        assert_eq!(s.randomize_snat, "hashrandom");
        assert_eq!(s.egress_v6_log_file, "stderr");
        let s = Settings::for_test(&[("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "bogus")]).unwrap();
        assert_eq!(s.randomize_snat, "prng");
        assert_eq!(
            refused_var(&[("AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE", "stdout")]),
            "AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE"
        );
        assert_eq!(
            refused_var(&[("ENABLE_V4_EGRESS", "maybe")]),
            "ENABLE_V4_EGRESS"
        );
    }

    #[test]
    fn pod_mtu_defaults_to_the_eni_mtu_and_overrides_it() {
        let s = Settings::for_test(&[("AWS_VPC_ENI_MTU", "1500")]).unwrap();
        assert_eq!(s.pod_mtu, 1500);
        let s = Settings::for_test(&[("AWS_VPC_ENI_MTU", "9001"), ("POD_MTU", "8000")]).unwrap();
        assert_eq!(s.pod_mtu, 8000);
    }

    #[test]
    fn mtu_range_depends_on_the_family() {
        assert_eq!(refused_var(&[("POD_MTU", "575")]), "POD_MTU");
        assert_eq!(
            refused_var(&[("AWS_VPC_ENI_MTU", "9002")]),
            "AWS_VPC_ENI_MTU"
        );
        assert!(Settings::for_test(&[("POD_MTU", "576")]).is_ok());
        assert_eq!(
            refused_var(&[("ENABLE_IPv6", "true"), ("POD_MTU", "1279")]),
            "POD_MTU"
        );
        assert!(Settings::for_test(&[("ENABLE_IPv6", "true"), ("POD_MTU", "1280")]).is_ok());
        assert_eq!(refused_var(&[("POD_MTU", "big")]), "POD_MTU");
    }

    #[test]
    fn veth_prefix_rules() {
        for ok in ["eni", "cali", "a", "veth"] {
            assert!(
                Settings::for_test(&[("AWS_VPC_K8S_CNI_VETHPREFIX", ok)]).is_ok(),
                "{ok}"
            );
        }
        // Characters the plugin refuses in an interface name (found by fuzzing against it).
        for bad in [
            "eth", "lo", "vlan", "enis0", "a b", "a/b", "é", "e.n", "a:b", "¡",
        ] {
            assert_eq!(
                refused_var(&[("AWS_VPC_K8S_CNI_VETHPREFIX", bad)]),
                "AWS_VPC_K8S_CNI_VETHPREFIX"
            );
        }
    }

    #[test]
    fn ip_cooldown_period_is_whole_seconds_zero_or_above() {
        assert_eq!(
            Settings::for_test(&[("IP_COOLDOWN_PERIOD", "0")])
                .unwrap()
                .ip_cooldown_period,
            0
        );
        for bad in ["-1", "30s", "x"] {
            assert_eq!(
                refused_var(&[("IP_COOLDOWN_PERIOD", bad)]),
                "IP_COOLDOWN_PERIOD"
            );
        }
    }

    #[test]
    fn prefix_delegation_needs_a_positive_target() {
        let msg = refused_var(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0"),
        ]);
        assert!(msg.contains("ENABLE_PREFIX_DELEGATION"), "{msg}");
        for var in ["WARM_PREFIX_TARGET", "WARM_IP_TARGET", "MINIMUM_IP_TARGET"] {
            assert!(
                Settings::for_test(&[("ENABLE_PREFIX_DELEGATION", "true"), (var, "1")]).is_ok(),
                "{var}"
            );
        }
        assert!(Settings::for_test(&[("WARM_PREFIX_TARGET", "0")]).is_ok());
    }

    #[test]
    fn other_refusals_name_the_variable() {
        assert_eq!(
            refused_var(&[("AWS_VPC_K8S_PLUGIN_LOG_FILE", "stdout")]),
            "AWS_VPC_K8S_PLUGIN_LOG_FILE"
        );
        assert_eq!(
            refused_var(&[
                ("ENABLE_POD_ENI", "true"),
                ("POD_SECURITY_GROUP_ENFORCING_MODE", "loose")
            ]),
            "POD_SECURITY_GROUP_ENFORCING_MODE"
        );
        assert!(Settings::for_test(&[("POD_SECURITY_GROUP_ENFORCING_MODE", "loose")]).is_ok());
        assert_eq!(
            refused_var(&[("ENABLE_BANDWIDTH_PLUGIN", "yes")]),
            "ENABLE_BANDWIDTH_PLUGIN"
        );
    }
}
