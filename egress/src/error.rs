//! egress-cni's errors, each with its CNI error code (spec codes where they apply, the
//! plugin's own from 120 up).

use vpc_cni_net::NetError;
use vpc_cni_plugin::error::CniError;

/// An error of egress-cni.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// An error of the shared CNI layer (environment, version).
    #[error(transparent)]
    Cni(CniError),
    /// The config (or `prevResult`) is not JSON of the right shape.
    #[error("failed to decode {what}")]
    Decode {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A field of the config breaks off, is nested too deep or is not UTF-8.
    #[error("failed to decode network config field {field}")]
    DecodeField {
        /// The field's path.
        field: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A config field is missing or malformed.
    #[error("invalid network config field {field}: {reason}")]
    Config {
        /// The field (dotted path).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The IPAM plugin could not be run or failed.
    #[error("IPAM plugin {plugin} {command} failed: {msg}")]
    Ipam {
        /// The plugin (`host-local`).
        plugin: String,
        /// `ADD` or `DEL`.
        command: &'static str,
        /// Its error message (or why it could not run).
        msg: String,
    },
    /// The IPAM answer carries no usable address of the egress family.
    #[error("IPAM plugin {plugin} returned no {family} address")]
    NoAddress {
        /// The plugin.
        plugin: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// Wiring the egress interface (links, addresses, routes, SNAT) failed.
    #[error("egress-cni: failed to set up {what}")]
    Setup {
        /// Which part.
        what: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// Undoing the egress wiring failed.
    #[error("egress-cni: failed to tear down {what}")]
    Teardown {
        /// Which part.
        what: String,
        /// Why.
        #[source]
        source: NetError,
    },
}

/// egress-cni's error codes beyond the spec's.
pub mod code {
    /// The IPAM plugin failed or could not be run.
    pub const IPAM_FAILED: u32 = 120;
    /// The IPAM plugin returned no address of the egress family.
    pub const NO_ADDRESS: u32 = 121;
    /// Setting up the egress interface or SNAT failed (IPAM released again).
    pub const SETUP_FAILED: u32 = 122;
    /// Tearing down failed.
    pub const TEARDOWN_FAILED: u32 = 123;
}

impl EgressError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        use vpc_cni_plugin::error::code as spec;
        match self {
            EgressError::Cni(e) => e.code(),
            EgressError::Decode { .. } | EgressError::DecodeField { .. } => spec::DECODING_FAILURE,
            EgressError::Config { .. } => spec::INVALID_NETWORK_CONFIG,
            EgressError::Ipam { .. } => code::IPAM_FAILED,
            EgressError::NoAddress { .. } => code::NO_ADDRESS,
            EgressError::Setup { .. } => code::SETUP_FAILED,
            EgressError::Teardown { .. } => code::TEARDOWN_FAILED,
        }
    }

    /// The cause chain below the message, `; `-joined (the error JSON's `details`).
    pub fn details(&self) -> String {
        if let EgressError::Cni(e) = self {
            return e.details();
        }
        let mut parts = Vec::new();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            parts.push(e.to_string());
            cur = e.source();
        }
        parts.join("; ")
    }

    /// The error JSON of `version`.
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": version,
            "code": self.code(),
            "msg": self.to_string(),
        });
        let d = self.details();
        if !d.is_empty() {
            v["details"] = d.into();
        }
        v
    }
}
