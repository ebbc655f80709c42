//! Client side: dialling a unix socket, and the health probe.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::{CniBackendClient, NpBackendClient};

/// A `grpc.health.v1` serving status, as answered by [`check_health`].
pub use tonic_health::pb::health_check_response::ServingStatus;

/// The authority sent in requests over the socket. Servers ignore it; it is what the reference
/// Go client sends when it dials a unix socket.
const DUMMY_URI: &str = "http://localhost";

/// Why a client could not talk to a server over its unix socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be dialled or the HTTP/2 handshake failed (no such socket, nobody
    /// listening, permission denied, ...). [`ClientError::io_kind`] tells which.
    #[error("cannot connect to the gRPC socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The transport error; its source chain holds the `io::Error`, if any.
        #[source]
        source: tonic::transport::Error,
    },
    /// Dialling and the HTTP/2 handshake together took longer than the timeout.
    #[error("connecting to the gRPC socket {} timed out after {timeout:?}", path.display())]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// The health service answered the check with an error (for example `NotFound` for a
    /// service name it does not know).
    #[error("health check of service {service:?} on {} failed", path.display())]
    Health {
        /// The socket path.
        path: PathBuf,
        /// The service name that was checked.
        service: String,
        /// The status the server answered with.
        #[source]
        source: tonic::Status,
    },
    /// The health check got no answer within the timeout.
    #[error("health check of service {service:?} on {} timed out after {timeout:?}", path.display())]
    HealthTimeout {
        /// The socket path.
        path: PathBuf,
        /// The service name that was checked.
        service: String,
        /// The timeout that ran out.
        timeout: Duration,
    },
}

impl ClientError {
    /// The kind of the underlying I/O error, if the failure came from the socket itself:
    /// `NotFound` when there is no socket file, `ConnectionRefused` when the file is a stale
    /// socket nobody listens on, `PermissionDenied` when the caller may not open it.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match self {
            ClientError::Connect { source, .. } => Some(source),
            _ => None,
        };
        while let Some(err) = cause {
            if let Some(io_err) = err.downcast_ref::<io::Error>() {
                return Some(io_err.kind());
            }
            cause = err.source();
        }
        None
    }
}

/// Opens a gRPC channel over the unix socket at `path`.
///
/// The URI the channel uses is a dummy: the connector dials `path` with
/// `tokio::net::UnixStream`, so there is no DNS, no TCP and no proxy. The connection is made
/// eagerly, once, and must complete (dial plus HTTP/2 handshake) within `timeout`; a missing
/// socket or one nobody listens on fails at once with [`ClientError::Connect`]. There are no
/// retries: the CNI plugin runs once per pod and the runtime retries the whole operation.
/// Calls on the channel carry no deadline unless the caller sets one
/// (`tonic::Request::set_timeout`), as in the reference plugin.
///
/// Must be called within a Tokio runtime (a current-thread runtime is enough).
pub async fn connect_channel(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<Channel, ClientError> {
    let path = path.as_ref().to_path_buf();
    let dial_path = path.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let dial_path = dial_path.clone();
        async move { UnixStream::connect(dial_path).await.map(TokioIo::new) }
    });
    let endpoint = Endpoint::from_static(DUMMY_URI).connect_timeout(timeout);
    match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(ClientError::Connect { path, source }),
        Err(_elapsed) => Err(ClientError::ConnectTimeout { path, timeout }),
    }
}

/// Connects a `CNIBackend` client (the plugin's side of ipamd) over the unix socket at `path`,
/// normally [`crate::DEFAULT_SOCKET`]. See [`connect_channel`] for the connection behaviour.
pub async fn connect_unix(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<CniBackendClient<Channel>, ClientError> {
    Ok(CniBackendClient::new(connect_channel(path, timeout).await?))
}

/// Connects an `NPBackend` client (the network policy agent) over the unix socket at `path`,
/// normally [`crate::NP_AGENT_SOCKET`] with [`crate::NP_AGENT_CONNECT_TIMEOUT`]. See
/// [`connect_channel`] for the connection behaviour.
pub async fn connect_np_agent(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<NpBackendClient<Channel>, ClientError> {
    Ok(NpBackendClient::new(connect_channel(path, timeout).await?))
}

/// Asks the `grpc.health.v1.Health` service on the unix socket at `path` for the status of
/// `service` (`""` for the whole server, or [`crate::HEALTH_SERVICE`]): what
/// `grpc-health-probe -addr=unix://<path> -service=<service>` does.
///
/// `timeout` bounds the connection (as in [`connect_channel`]) and, separately, the check
/// call, like the probe's `-connect-timeout` and `-rpc-timeout`. A server that does not know
/// `service` answers `NotFound`, which comes back as [`ClientError::Health`]. Only
/// [`ServingStatus::Serving`] means healthy.
pub async fn check_health(
    path: impl AsRef<Path>,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, ClientError> {
    let path = path.as_ref();
    let mut client = HealthClient::new(connect_channel(path, timeout).await?);
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    match tokio::time::timeout(timeout, client.check(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner().status()),
        Ok(Err(source)) => Err(ClientError::Health {
            path: path.to_path_buf(),
            service: service.to_owned(),
            source,
        }),
        Err(_elapsed) => Err(ClientError::HealthTimeout {
            path: path.to_path_buf(),
            service: service.to_owned(),
            timeout,
        }),
    }
}
