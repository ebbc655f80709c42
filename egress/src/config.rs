//! egress-cni's network config (spec cni.md 1.1 item 2 and 2.7): `cniVersion`, `name`,
//! `type`, `enabled`, `mtu`, `randomizeSNAT`, `nodeIP`, `ipam`, `pluginLogFile`,
//! `pluginLogLevel`, `prevResult`. A malformed field is an error that names it.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::value::RawValue;
use serde_json::Value;
use vpc_cni_net::RandomizeSnat;
use vpc_cni_plugin::config::{pod_mtu, LogLevel, LogTarget};
use vpc_cni_plugin::version::CniVersion;

use crate::error::EgressError;

/// The reference's default log file of the IPv4-egress plugin (an IPv6 cluster).
pub const DEFAULT_V4_LOG_FILE: &str = "/var/log/aws-routed-eni/egress-v4-plugin.log";

/// A parsed config.
#[derive(Debug)]
pub struct EgressConf {
    /// `cniVersion`.
    pub cni_version: CniVersion,
    /// `name` (the network name; part of the SNAT chain name and comment).
    pub name: String,
    /// `enabled`: false makes the plugin a pass-through.
    pub enabled: bool,
    /// `mtu` (a string, as aws-cni's; unparsable or out of range → 9001).
    pub mtu: u32,
    /// `randomizeSNAT`: `prng` (`--random-fully`, default), `hashrandom` (`--random`), `none`.
    pub randomize: RandomizeSnat,
    /// `nodeIP`: the node's primary address of the other family; its family chooses the
    /// direction (IPv4: IPv4 egress for an IPv6 cluster; IPv6: IPv6 egress for an IPv4 one).
    /// `None` only when disabled.
    pub node_ip: Option<IpAddr>,
    /// `ipam.type` (the reference uses `host-local`). Empty only when disabled.
    pub ipam_type: String,
    /// Where to log.
    pub log_target: LogTarget,
    /// `pluginLogLevel`.
    pub log_level: LogLevel,
    /// `prevResult` exactly as it arrived (byte-equal pass-through when disabled).
    pub prev_result: Option<Box<RawValue>>,
    /// The whole config as it arrived (what IPAM gets on stdin).
    pub raw: Vec<u8>,
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> EgressError {
    EgressError::Config {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

fn string_field<'a>(
    obj: &'a serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, EgressError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, format!("must be a string, not {other}"))),
    }
}

impl EgressConf {
    /// Parses the config bytes from stdin.
    pub fn parse(bytes: &[u8]) -> Result<EgressConf, EgressError> {
        #[derive(serde::Deserialize)]
        struct Raw<'a> {
            #[serde(rename = "prevResult", borrow, default)]
            prev_result: Option<&'a RawValue>,
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let v: Value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = vpc_cni_plugin::error::field_path(e.path());
            let source = e.into_inner();
            match field {
                None => EgressError::Decode {
                    what: "network config",
                    source,
                },
                Some(field) => EgressError::DecodeField { field, source },
            }
        })?;
        de.end().map_err(|e| EgressError::Decode {
            what: "network config",
            source: e,
        })?;
        let Value::Object(obj) = &v else {
            return Err(invalid("(config)", "must be a JSON object"));
        };
        let cni_version: CniVersion = string_field(obj, "cniVersion")?
            .unwrap_or("")
            .parse()
            .map_err(EgressError::Cni)?;
        let name = string_field(obj, "name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("name", "is required"))?
            .to_string();
        if !vpc_cni_plugin::env::valid_id(&name) {
            return Err(invalid("name", format!("{name:?} has invalid characters")));
        }
        let enabled = match obj.get("enabled") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" | "" => false,
                _ => {
                    return Err(invalid(
                        "enabled",
                        format!("{s:?} is not \"true\" or \"false\""),
                    ))
                }
            },
            Some(other) => {
                return Err(invalid(
                    "enabled",
                    format!("must be \"true\" or \"false\", not {other}"),
                ))
            }
        };
        let mtu = pod_mtu(obj.get("mtu"));
        let randomize = match string_field(obj, "randomizeSNAT")? {
            None | Some("") | Some("prng") => RandomizeSnat::Prng,
            Some("hashrandom") => RandomizeSnat::HashRandom,
            Some("none") => RandomizeSnat::None,
            Some(other) => {
                return Err(invalid(
                    "randomizeSNAT",
                    format!("{other:?} is not one of prng, hashrandom, none"),
                ))
            }
        };
        let node_ip = match string_field(obj, "nodeIP")? {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| invalid("nodeIP", format!("{s:?} is not an IP address")))?,
            ),
        };
        let ipam_type = match obj.get("ipam") {
            None | Some(Value::Null) => String::new(),
            Some(Value::Object(ipam)) => string_field(ipam, "type")
                .map_err(|_| invalid("ipam.type", "must be a string"))?
                .unwrap_or("")
                .to_string(),
            Some(other) => return Err(invalid("ipam", format!("must be an object, not {other}"))),
        };
        if enabled {
            if node_ip.is_none() {
                return Err(invalid("nodeIP", "is required when enabled"));
            }
            if ipam_type.is_empty() {
                return Err(invalid("ipam.type", "is required when enabled"));
            }
            if ipam_type.contains('/') || ipam_type.contains("..") {
                return Err(invalid(
                    "ipam.type",
                    format!("{ipam_type:?} is not a plugin name"),
                ));
            }
        }
        let log_target = match string_field(obj, "pluginLogFile")? {
            None => LogTarget::File(PathBuf::from(DEFAULT_V4_LOG_FILE)),
            Some("") | Some("stderr") => LogTarget::Stderr,
            Some("stdout") => {
                return Err(invalid("pluginLogFile", "stdout carries the CNI result"))
            }
            Some(p) => LogTarget::File(p.into()),
        };
        let log_level = LogLevel::parse(string_field(obj, "pluginLogLevel")?.unwrap_or("Debug"));
        let raw: Raw<'_> = serde_json::from_slice(bytes).map_err(|e| EgressError::Decode {
            what: "prevResult",
            source: e,
        })?;
        let prev_result = raw.prev_result.map(|r| r.to_owned());
        Ok(EgressConf {
            cni_version,
            name,
            enabled,
            mtu,
            randomize,
            node_ip,
            ipam_type,
            log_target,
            log_level,
            prev_result,
            raw: bytes.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "aws-cni",
            "type": "egress-cni",
            "enabled": "true",
            "mtu": "9001",
            "randomizeSNAT": "prng",
            "nodeIP": "10.0.0.10",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "169.254.172.0/22"}]]},
            "pluginLogFile": "stderr",
            "pluginLogLevel": "Debug"
        })
    }

    fn parse(v: &Value) -> Result<EgressConf, EgressError> {
        EgressConf::parse(v.to_string().as_bytes())
    }

    fn field_of(e: EgressError) -> String {
        match e {
            EgressError::Config { field, .. } => field,
            other => panic!("not a config error: {other:?}"),
        }
    }

    #[test]
    fn the_reference_conflist_entry_parses() {
        let c = parse(&base()).expect("parse");
        assert!(c.enabled);
        assert_eq!(c.node_ip, Some("10.0.0.10".parse().expect("ip")));
        assert_eq!(c.ipam_type, "host-local");
        assert_eq!(c.randomize, RandomizeSnat::Prng);
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.cni_version, CniVersion::V0_4_0);
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn each_malformed_field_is_named() {
        let cases: [(&str, Value, &str); 9] = [
            ("enabled", serde_json::json!("yes"), "enabled"),
            ("enabled", serde_json::json!(3), "enabled"),
            ("nodeIP", serde_json::json!("10.0.0"), "nodeIP"),
            ("nodeIP", serde_json::json!(7), "nodeIP"),
            ("randomizeSNAT", serde_json::json!("fully"), "randomizeSNAT"),
            ("ipam", serde_json::json!("host-local"), "ipam"),
            (
                "ipam",
                serde_json::json!({"type": "../bin/sh"}),
                "ipam.type",
            ),
            (
                "pluginLogFile",
                serde_json::json!("stdout"),
                "pluginLogFile",
            ),
            ("name", serde_json::json!(""), "name"),
        ];
        for (key, value, field) in cases {
            let mut v = base();
            v[key] = value.clone();
            let e = parse(&v).expect_err(&format!("{key}={value}"));
            assert_eq!(field_of(e), field, "{key}={value}");
        }
        let mut v = base();
        v.as_object_mut().expect("obj").remove("nodeIP");
        assert_eq!(field_of(parse(&v).expect_err("no nodeIP")), "nodeIP");
        let mut v = base();
        v.as_object_mut().expect("obj").remove("ipam");
        assert_eq!(field_of(parse(&v).expect_err("no ipam")), "ipam.type");
        assert!(matches!(
            parse(&serde_json::json!({"cniVersion": "9.9.9", "name": "x"})),
            Err(EgressError::Cni(_))
        ));
    }

    #[test]
    fn disabled_needs_neither_node_ip_nor_ipam_and_keeps_prev_result_bytes() {
        let text = r#"{"cniVersion":"0.4.0","name":"aws-cni","enabled":"false","prevResult":{"z":1,  "a":[ 2 ]}}"#;
        let c = EgressConf::parse(text.as_bytes()).expect("parse");
        assert!(!c.enabled);
        assert_eq!(c.prev_result.expect("prev").get(), r#"{"z":1,  "a":[ 2 ]}"#);
        let c = EgressConf::parse(br#"{"cniVersion":"0.4.0","name":"n","enabled":false}"#)
            .expect("bool false");
        assert!(!c.enabled);
    }

    #[test]
    fn randomize_values_map_to_the_port_flags() {
        for (s, want) in [
            ("hashrandom", RandomizeSnat::HashRandom),
            ("none", RandomizeSnat::None),
            ("prng", RandomizeSnat::Prng),
        ] {
            let mut v = base();
            v["randomizeSNAT"] = s.into();
            assert_eq!(parse(&v).expect("parse").randomize, want);
        }
    }
}
