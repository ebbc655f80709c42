//! The wire protocol between ipamd and the CNI plugin.
//!
//! This crate is the one place where the protobuf contract of the reference AWS VPC CNI lives
//! (`proto/rpc.proto`: package `rpc`, services `CNIBackend`, `NPBackend` and
//! `ConfigServerBackend`, with the reference's message names and field numbers), plus the small
//! pieces both sides need to speak it the way the reference does:
//!
//! - client side (always built): [`connect_unix`], [`connect_np_agent`], [`connect_channel`]
//!   dial a unix socket with a bounded connect timeout and no DNS or retries, and
//!   [`check_health`] is a `grpc-health-probe` replacement;
//! - server side (feature `server`, on by default): `serve_unix` / `bind_unix` /
//!   `serve_listener` prepare the socket exactly as the reference does (parent directory
//!   0755, stale socket removed, socket 0660) and serve tonic over it within `ServeLimits`
//!   (`serve_listener_with`: connections, streams per connection, header and message sizes,
//!   first-byte timeout, keepalive), and `health_service` is a `grpc.health.v1.Health`
//!   service that says NOT_SERVING until told otherwise;
//! - protocol rules shared by both ends: the version handshake ([`check_client_version`]), the
//!   `datastore: unknown pod` marker ([`UNKNOWN_POD`], [`is_unknown_pod`]) and the DEL reasons
//!   ([`REASON_POD_DELETED`], [`REASON_SETUP_NS_FAILED`]).
//!
//! The protobuf code is generated at build time by `protox` and `tonic-prost-build`; no `protoc`
//! binary is needed. Proto field names are kept as the reference spells them, so prost's
//! snake-case versions are occasionally odd (`IPv4Addr` is `i_pv4_addr`, `VPCv4CIDRs` is
//! `vp_cv4_cid_rs`); the crate README has the full list.
//!
//! The crate deliberately depends on neither an AWS SDK nor a Kubernetes client: it is linked
//! into the CNI plugin, which the runtime executes once per pod.

use tonic::{Code, Status};

mod client;
#[cfg(feature = "server")]
mod server;

pub use client::{
    check_health, connect_channel, connect_np_agent, connect_unix, connect_unix_direct,
    ClientError, ServingStatus, UnixConnection,
};
#[cfg(feature = "server")]
pub use server::{
    bind_unix, health_service, health_service_with_limit, serve_listener, serve_listener_with,
    serve_unix, HealthHandle, HealthServer, ServeError, ServeLimits, DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_KEEPALIVE, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_LIST_SIZE, DEFAULT_MAX_MESSAGE_BYTES, DIR_MODE, SOCKET_MODE,
    TOO_MANY_CONNECTIONS,
};

/// Code generated from `proto/rpc.proto` (package `rpc`).
///
/// Messages are prost structs; each service has a `*_client` module (for example
/// [`proto::cni_backend_client::CniBackendClient`]) and a `*_server` module with the trait to
/// implement and its tonic service wrapper (for example [`proto::cni_backend_server::CniBackend`]
/// and [`proto::cni_backend_server::CniBackendServer`]). The common names are re-exported at the
/// crate root. `google.protobuf.Empty` maps to `()`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/rpc.rs"));
}

pub use proto::cni_backend_client::CniBackendClient;
pub use proto::cni_backend_server::{CniBackend, CniBackendServer};
pub use proto::config_server_backend_client::ConfigServerBackendClient;
pub use proto::config_server_backend_server::{ConfigServerBackend, ConfigServerBackendServer};
pub use proto::np_backend_client::NpBackendClient;
pub use proto::np_backend_server::{NpBackend, NpBackendServer};
pub use proto::{
    AddNetworkReply, AddNetworkRequest, DelNetworkReply, DelNetworkRequest, DeleteNpReply,
    DeleteNpRequest, EnforceNpReply, EnforceNpRequest, IpAllocationMetadata,
    NetworkPolicyAgentConfigReply,
};

/// The socket ipamd serves `CNIBackend`, `ConfigServerBackend` and gRPC health on, and the
/// plugin dials (`ipamdSocketPath` in the reference plugin).
pub const DEFAULT_SOCKET: &str = "/var/run/aws-node/ipamd.sock";

/// The socket the network policy agent serves `NPBackend` on; the plugin dials it only when
/// ipamd's reply carries a non-empty `NetworkPolicyMode`.
pub const NP_AGENT_SOCKET: &str = "/var/run/aws-node/npa.sock";

/// The connect timeout the reference plugin uses for the network policy agent socket.
pub const NP_AGENT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The service name ipamd registers with the gRPC health service, besides the server-wide `""`.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.aws-node";

/// The text ipamd puts in a DelNetwork error when it holds no address for the pod.
///
/// The reference plugin treats any DelNetwork error whose text contains this marker as
/// success, which is what makes DEL of an unknown sandbox idempotent. A server must keep it
/// verbatim in the status message; a client should test with [`is_unknown_pod`].
pub const UNKNOWN_POD: &str = "datastore: unknown pod";

/// `DelNetworkRequest.Reason` for a normal CNI DEL.
pub const REASON_POD_DELETED: &str = "PodDeleted";

/// `DelNetworkRequest.Reason` when the plugin rolls back an ADD that failed after ipamd had
/// assigned the address.
pub const REASON_SETUP_NS_FAILED: &str = "SetupNSFailed";

/// The encoded `FileDescriptorSet` of `rpc.proto` and its import `google/protobuf/empty.proto`
/// (without source info), for a server that wants to offer gRPC reflection as the reference
/// daemon does (for example with `tonic-reflection`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rpc_descriptor.bin"));

/// The version handshake of `AddNetwork` and `DelNetwork`.
///
/// `got` is the request's `ClientVersion`, `ours` the server's build version. They must be equal
/// byte for byte; otherwise the RPC fails with `FailedPrecondition` and the reference's message,
/// `wrong client version "<got>" (!= "<ours>")`.
///
/// ```
/// use vpc_cni_rpc::check_client_version;
///
/// assert!(check_client_version("v1.2.3", "v1.2.3").is_ok());
/// let status = check_client_version("v1.2.2", "v1.2.3").unwrap_err();
/// assert_eq!(status.code(), tonic::Code::FailedPrecondition);
/// assert_eq!(status.message(), r#"wrong client version "v1.2.2" (!= "v1.2.3")"#);
/// ```
pub fn check_client_version(got: &str, ours: &str) -> Result<(), Status> {
    if got == ours {
        Ok(())
    } else {
        Err(Status::new(
            Code::FailedPrecondition,
            format!("wrong client version {got:?} (!= {ours:?})"),
        ))
    }
}

/// Whether a DelNetwork error means "ipamd holds no address for this pod" (so the DEL has
/// nothing left to do), whatever the status code and whatever else the message says.
///
/// ```
/// use vpc_cni_rpc::{is_unknown_pod, UNKNOWN_POD};
///
/// let status = tonic::Status::internal(format!("1 error occurred:\n\t* {UNKNOWN_POD}\n\n"));
/// assert!(is_unknown_pod(&status));
/// assert!(!is_unknown_pod(&tonic::Status::unavailable("connection refused")));
/// ```
pub fn is_unknown_pod(status: &Status) -> bool {
    status.message().contains(UNKNOWN_POD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_versions_pass_the_handshake() {
        assert!(check_client_version("", "").is_ok());
        assert!(check_client_version("v1.19.2-rs", "v1.19.2-rs").is_ok());
    }

    #[test]
    fn different_versions_fail_with_failed_precondition_and_the_reference_message() {
        let status = check_client_version("v1", "v2").expect_err("must reject");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), r#"wrong client version "v1" (!= "v2")"#);
        assert!(status.message().starts_with("wrong client version"));
    }

    #[test]
    fn version_comparison_is_exact() {
        assert!(check_client_version("v1.2.3 ", "v1.2.3").is_err());
        assert!(check_client_version("V1.2.3", "v1.2.3").is_err());
        assert!(check_client_version("", "v1.2.3").is_err());
    }

    #[test]
    fn unknown_pod_is_recognised_inside_a_longer_message_whatever_the_code() {
        let wrapped = format!("1 error occurred:\n\t* {UNKNOWN_POD}\n\n");
        assert!(is_unknown_pod(&Status::unknown(wrapped.clone())));
        assert!(is_unknown_pod(&Status::internal(wrapped)));
        assert!(is_unknown_pod(&Status::not_found(UNKNOWN_POD)));
    }

    #[test]
    fn other_errors_are_not_unknown_pod() {
        assert!(!is_unknown_pod(&Status::unknown(
            "datastore: no available IP"
        )));
        assert!(!is_unknown_pod(&Status::unknown("unknown pod")));
        assert!(!is_unknown_pod(&Status::unavailable("")));
    }

    #[test]
    fn reference_paths_and_names_are_kept() {
        assert_eq!(DEFAULT_SOCKET, "/var/run/aws-node/ipamd.sock");
        assert_eq!(NP_AGENT_SOCKET, "/var/run/aws-node/npa.sock");
        assert_eq!(HEALTH_SERVICE, "grpc.health.v1.aws-node");
        assert_eq!(proto::cni_backend_server::SERVICE_NAME, "rpc.CNIBackend");
        assert_eq!(proto::np_backend_server::SERVICE_NAME, "rpc.NPBackend");
        assert_eq!(
            proto::config_server_backend_server::SERVICE_NAME,
            "rpc.ConfigServerBackend"
        );
    }
}
