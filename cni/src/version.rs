//! CNI specification versions, and the VERSION command's answer.

use std::fmt;
use std::str::FromStr;

use crate::error::CniError;

/// A CNI specification version this plugin speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.1.0 (result with `ip4`).
    V0_1_0,
    /// 0.2.0 (result with `ip4`).
    V0_2_0,
    /// 0.3.0 (interfaces and `ips` with `version`).
    V0_3_0,
    /// 0.3.1.
    V0_3_1,
    /// 0.4.0: CHECK and `prevResult` on DEL (the reference conflist's version).
    V0_4_0,
    /// 1.0.0: `ips` without `version`.
    V1_0_0,
    /// 1.1.0: GC and STATUS.
    V1_1_0,
}

impl CniVersion {
    /// Every version, oldest first.
    pub const ALL: [CniVersion; 7] = [
        CniVersion::V0_1_0,
        CniVersion::V0_2_0,
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest version, which VERSION reports as the plugin's own.
    pub const CURRENT: CniVersion = CniVersion::V1_1_0;

    /// The version as written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_1_0 => "0.1.0",
            CniVersion::V0_2_0 => "0.2.0",
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// True when results use the pre-0.3 `ip4`/`ip6` layout.
    pub fn is_legacy_result(self) -> bool {
        self < CniVersion::V0_3_0
    }

    /// True when result `ips` entries carry a `version` field (0.3.x and 0.4.0).
    pub fn ips_have_version(self) -> bool {
        (CniVersion::V0_3_0..=CniVersion::V0_4_0).contains(&self)
    }

    /// True when the version defines CHECK (and `prevResult` on DEL).
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// True when the version defines GC and STATUS.
    pub fn has_gc_and_status(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;

    /// Parses a version; an empty string means 0.1.0, as libcni assumes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(CniVersion::V0_1_0);
        }
        CniVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| CniError::IncompatibleVersion {
                version: s.to_string(),
                reason: format!(
                    "cniVersion must be one of {}",
                    CniVersion::ALL.map(CniVersion::as_str).join(", ")
                ),
            })
    }
}

/// The JSON the VERSION command prints.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": CniVersion::CURRENT.as_str(),
        "supportedVersions": CniVersion::ALL.map(CniVersion::as_str),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_round_trips_and_unknown_ones_are_code_1() {
        for v in CniVersion::ALL {
            assert_eq!(v.as_str().parse::<CniVersion>().expect("parse"), v);
        }
        let e = "0.5.0".parse::<CniVersion>().expect_err("unknown");
        assert_eq!(e.code(), 1);
        assert_eq!("".parse::<CniVersion>().expect("empty"), CniVersion::V0_1_0);
    }

    #[test]
    fn layout_rules_follow_the_spec() {
        assert!(CniVersion::V0_2_0.is_legacy_result());
        assert!(!CniVersion::V0_3_1.is_legacy_result());
        assert!(CniVersion::V0_4_0.ips_have_version());
        assert!(!CniVersion::V1_0_0.ips_have_version());
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_gc_and_status());
        assert!(CniVersion::V1_1_0.has_gc_and_status());
    }

    #[test]
    fn version_info_lists_all_supported_versions() {
        let v = version_info();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
