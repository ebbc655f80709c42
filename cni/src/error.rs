//! The plugin's error type and its mapping to CNI error codes.
//!
//! Codes 1..=51 are the CNI specification's; 100 and up are ours (documented in the README).
//! The reference plugin answers 999 for nearly everything; we keep its messages where a user
//! might grep for them (`failed to assign an IP address to container`) but give each failure
//! its own code.

use std::time::Duration;

use vpc_cni_net::NetError;

/// CNI error codes used by this plugin.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The plugin is not available (STATUS).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// ipamd could not be reached over its socket.
    pub const IPAMD_UNREACHABLE: u32 = 100;
    /// ipamd answered an RPC with an error (including a version mismatch).
    pub const IPAMD_ERROR: u32 = 101;
    /// ipamd could not assign an address (`Success = false`) and waiting did not help.
    pub const ASSIGN_FAILED: u32 = 102;
    /// Wiring the pod failed (everything was undone and the address released).
    pub const SETUP_FAILED: u32 = 103;
    /// CHECK found the pod's wiring different from what ADD built.
    pub const DRIFT: u32 = 104;
    /// ipamd asked for something this plugin does not implement (IPv6, branch ENI).
    pub const UNSUPPORTED: u32 = 105;
    /// The network policy agent failed.
    pub const NETWORK_POLICY: u32 = 106;
    /// DEL could not remove the pod's host wiring.
    pub const TEARDOWN_FAILED: u32 = 107;
    /// Anything else.
    pub const INTERNAL: u32 = 999;
}

/// A boxed lower-layer error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that makes a plugin invocation fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CniError {
    /// The configuration's `cniVersion` is not one we speak, or does not allow the command.
    #[error("incompatible CNI version {version:?}: {reason}")]
    IncompatibleVersion {
        /// The version asked for.
        version: String,
        /// Why it is refused.
        reason: String,
    },
    /// A required environment variable is missing or malformed.
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnvironment {
        /// The variable.
        var: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The network configuration on stdin is not valid JSON of the right shape.
    #[error("failed to decode {what}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A field of the network configuration (or of `prevResult`) has the wrong JSON type, or
    /// the text breaks off or is not UTF-8 inside it.
    #[error("failed to decode {what}: field {field}")]
    DecodeField {
        /// What was being decoded.
        what: &'static str,
        /// The field's path (`mtu`, `prevResult.ips[0].interface`).
        field: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The network configuration is valid JSON but has a bad value.
    #[error("invalid network config: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// Reading stdin or a similar I/O step failed.
    #[error("I/O failure: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The pod's namespace or interface does not exist (CHECK).
    #[error("container unknown or does not exist: {what}")]
    UnknownContainer {
        /// What was missing.
        what: String,
        /// The lower-layer cause, if any.
        #[source]
        source: Option<NetError>,
    },
    /// ipamd had no free address for the whole wait.
    #[error("no free IP address in ipamd's pool after waiting {waited:?}; try again later")]
    TryAgainLater {
        /// How long ADD waited.
        waited: Duration,
        /// The last answer from ipamd.
        last: String,
    },
    /// ipamd's socket could not be reached.
    #[error("cannot reach ipamd on {socket}")]
    IpamdUnreachable {
        /// The socket path.
        socket: String,
        /// The connection error.
        #[source]
        source: BoxError,
    },
    /// ipamd answered an RPC with an error.
    #[error("ipamd {op} failed")]
    Ipamd {
        /// `AddNetwork` or `DelNetwork`.
        op: &'static str,
        /// The gRPC status.
        #[source]
        source: tonic::Status,
    },
    /// ipamd answered `Success = false`.
    #[error("{op}: failed to assign an IP address to container")]
    AssignFailed {
        /// `add cmd`.
        op: &'static str,
    },
    /// ipamd answered `Success = false` to DelNetwork.
    #[error("del cmd: failed to release the pod's IP address")]
    ReleaseFailed,
    /// Wiring the pod failed; what was done has been undone.
    #[error("add cmd: failed to setup network for interface {interface}")]
    Setup {
        /// The container interface being wired.
        interface: String,
        /// The netlink error.
        #[source]
        source: NetError,
    },
    /// CHECK found differences.
    #[error("pod network drift: {}", drift.join("; "))]
    Drift {
        /// One line per difference.
        drift: Vec<String>,
    },
    /// ipamd asked for a mode this plugin does not implement.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What.
        what: String,
    },
    /// The network policy agent failed.
    #[error("failed to {op} network policy")]
    NetworkPolicy {
        /// `setup` or `delete`.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Removing the pod's host wiring failed.
    #[error("del cmd: failed to tear down the pod's host network")]
    Teardown {
        /// The netlink error.
        #[source]
        source: NetError,
    },
    /// STATUS: the plugin cannot serve ADDs now.
    #[error("plugin not available: {reason}")]
    NotAvailable {
        /// Why.
        reason: String,
    },
    /// Any other failure of the network layer.
    #[error("{what}")]
    Net {
        /// What was being done.
        what: String,
        /// The netlink error.
        #[source]
        source: NetError,
    },
}

/// A decode error's position as a field path (`ipam.type`, `ips[0].interface`), up to the
/// first segment that has no name (a key that itself failed to decode); `None` at the root.
pub fn field_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

impl CniError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            CniError::InvalidEnvironment { .. } => code::INVALID_ENVIRONMENT,
            CniError::Decode { .. } | CniError::DecodeField { .. } => code::DECODING_FAILURE,
            CniError::InvalidConfig { .. } => code::INVALID_NETWORK_CONFIG,
            CniError::Io { .. } => code::IO_FAILURE,
            CniError::UnknownContainer { .. } => code::UNKNOWN_CONTAINER,
            CniError::TryAgainLater { .. } => code::TRY_AGAIN_LATER,
            CniError::IpamdUnreachable { .. } => code::IPAMD_UNREACHABLE,
            CniError::Ipamd { .. } => code::IPAMD_ERROR,
            CniError::AssignFailed { .. } | CniError::ReleaseFailed => code::ASSIGN_FAILED,
            CniError::Setup { .. } => code::SETUP_FAILED,
            CniError::Drift { .. } => code::DRIFT,
            CniError::Unsupported { .. } => code::UNSUPPORTED,
            CniError::NetworkPolicy { .. } => code::NETWORK_POLICY,
            CniError::Teardown { .. } => code::TEARDOWN_FAILED,
            CniError::NotAvailable { .. } => code::PLUGIN_NOT_AVAILABLE,
            CniError::Net { .. } => code::INTERNAL,
        }
    }

    /// The `details` of the error JSON: the chain of causes, outermost first.
    pub fn details(&self) -> String {
        let mut parts = Vec::new();
        if let CniError::TryAgainLater { last, .. } = self {
            parts.push(format!("last answer: {last}"));
        }
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            parts.push(c.to_string());
            cause = c.source();
        }
        parts.join(": ")
    }

    /// A decode error of `what`, naming the field where it happened (from its path); one
    /// at the document's root is a plain [`CniError::Decode`].
    pub fn decode_at(
        what: &'static str,
        prefix: &str,
        e: serde_path_to_error::Error<serde_json::Error>,
    ) -> CniError {
        let path = field_path(e.path()).unwrap_or_default();
        let source = e.into_inner();
        if path.is_empty() {
            if prefix.is_empty() {
                return CniError::Decode { what, source };
            }
            return CniError::DecodeField {
                what,
                field: prefix.to_string(),
                source,
            };
        }
        let field = if prefix.is_empty() {
            path
        } else {
            format!("{prefix}.{path}")
        };
        CniError::DecodeField {
            what,
            field,
            source,
        }
    }

    pub(crate) fn config(reason: impl Into<String>) -> CniError {
        CniError::InvalidConfig {
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_codes_are_the_specs_and_ours_start_at_100() {
        let e = CniError::TryAgainLater {
            waited: Duration::from_secs(3),
            last: "Success=false".into(),
        };
        assert_eq!(e.code(), 11);
        assert!(e.details().contains("Success=false"));
        assert_eq!(CniError::config("x").code(), 7);
        let v = CniError::IncompatibleVersion {
            version: "9.9.9".into(),
            reason: "unknown".into(),
        };
        assert_eq!(v.code(), 1);
        let a = CniError::AssignFailed { op: "add cmd" };
        assert_eq!(
            a.to_string(),
            "add cmd: failed to assign an IP address to container"
        );
        assert!(a.code() >= 100);
    }

    #[test]
    fn details_carry_the_cause_chain() {
        let e = CniError::Ipamd {
            op: "AddNetwork",
            source: tonic::Status::failed_precondition("wrong client version"),
        };
        assert_eq!(e.code(), code::IPAMD_ERROR);
        assert!(
            e.details().contains("wrong client version"),
            "{}",
            e.details()
        );
    }
}
