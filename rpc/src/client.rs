//! Client side: dialling a unix socket, and the health probe.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
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
    /// The socket could not be dialled ([`connect_unix_direct`]).
    #[error("cannot connect to the gRPC socket {}", path.display())]
    Dial {
        /// The socket path.
        path: PathBuf,
        /// The dial error.
        #[source]
        source: io::Error,
    },
    /// The HTTP/2 handshake on a dialled socket failed ([`connect_unix_direct`]).
    #[error("HTTP/2 handshake on the gRPC socket {} failed", path.display())]
    Handshake {
        /// The socket path.
        path: PathBuf,
        /// The HTTP/2 error.
        #[source]
        source: hyper::Error,
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
            ClientError::Dial { source, .. } => return Some(source.kind()),
            ClientError::Handshake { source, .. } => Some(source),
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

/// One HTTP/2 connection over a unix socket, as a gRPC transport for the generated clients
/// (`CniBackendClient<UnixConnection>`): hyper's HTTP/2 client and nothing else. Unlike a tonic
/// [`Channel`] there is no request buffer task, no reconnect and no balancing layer, which is
/// what a short-lived process making one or two calls wants (the CNI plugin). Made by
/// [`connect_unix_direct`]; cheap to clone (clones share the connection). The connection task
/// runs on the Tokio runtime that made it and ends when the last clone is dropped or the peer
/// closes.
///
/// Any HTTP/2 transport failure (connection closed or reset, protocol error) surfaces as a
/// `tonic::Status` with code `UNAVAILABLE`, as gRPC specifies for transport errors; statuses
/// the server sends are passed through unchanged.
#[derive(Clone, Debug)]
pub struct UnixConnection {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
}

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, tonic::Status>> + Send>,
>;

fn transport_status(e: &hyper::Error) -> tonic::Status {
    tonic::Status::unavailable(format!("HTTP/2 transport: {e}"))
}

impl tower::Service<http::Request<tonic::body::Body>> for UnixConnection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx).map_err(|e| transport_status(&e))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let fut = self.send.send_request(req);
        Box::pin(async move { fut.await.map_err(|e| transport_status(&e)) })
    }
}

/// Dials the unix socket at `path` and makes the HTTP/2 handshake, both within `timeout`,
/// without tonic's [`Channel`] (see [`UnixConnection`]). Failures are
/// [`ClientError::Dial`], [`ClientError::Handshake`] or [`ClientError::ConnectTimeout`]; no
/// retries. Must be called within a Tokio runtime (a current-thread runtime is enough), which
/// then drives the connection.
pub async fn connect_unix_direct(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<CniBackendClient<UnixConnection>, ClientError> {
    let path = path.as_ref();
    let dial = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Dial {
                path: path.to_path_buf(),
                source,
            })?;
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ClientError::Handshake {
                    path: path.to_path_buf(),
                    source,
                })?;
        tokio::spawn(async move {
            // Ends when every UnixConnection is dropped or the peer closes; a failure shows up
            // in the pending and next calls as UNAVAILABLE.
            let _ = conn.await;
        });
        Ok(UnixConnection { send })
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(Ok(conn)) => Ok(CniBackendClient::with_origin(
            conn,
            Uri::from_static(DUMMY_URI),
        )),
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => Err(ClientError::ConnectTimeout {
            path: path.to_path_buf(),
            timeout,
        }),
    }
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
