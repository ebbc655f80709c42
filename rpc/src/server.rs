//! Server side: preparing the unix socket the way the reference daemon does, serving tonic over
//! it, and the gRPC health service.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tonic::transport::Server;
use tonic_health::server::{HealthReporter, HealthService};

use tonic_health::ServingStatus;

use crate::HEALTH_SERVICE;

/// Mode of the socket's parent directory when [`bind_unix`] has to create it.
pub const DIR_MODE: u32 = 0o755;

/// Mode of the socket file: owner and group may connect, others may not.
pub const SOCKET_MODE: u32 = 0o660;

/// Why the server could not prepare its socket or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The socket path has no parent directory or file name.
    #[error("{} is not a usable socket path", path.display())]
    BadPath {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket's parent directory could not be created or given its mode.
    #[error("cannot create the socket directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file left at the socket path by an earlier run could not be removed.
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot bind the unix socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Setting the socket's mode failed.
    #[error("cannot set mode {SOCKET_MODE:o} on the socket {}", path.display())]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed while serving.
    #[error("gRPC server on {} failed", path.display())]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Prepares and binds the unix socket at `path` as the reference daemon does: creates the parent
/// directory (mode [`DIR_MODE`]) if it is missing, removes whatever file an earlier run left at
/// `path` (a directory there is an error, not something to delete), binds, and sets the
/// socket's mode to [`SOCKET_MODE`].
///
/// Must be called within a Tokio runtime. Use it with [`serve_listener`] when the caller needs to
/// know the socket exists before it starts serving; otherwise [`serve_unix`] does both.
pub fn bind_unix(path: impl AsRef<Path>) -> Result<UnixListener, ServeError> {
    let path = path.as_ref();
    let bad_path = || ServeError::BadPath {
        path: path.to_path_buf(),
    };
    path.file_name().ok_or_else(bad_path)?;
    let dir = match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
        Some(dir) => dir,
        None => return Err(bad_path()),
    };
    create_dir(dir).map_err(|source| ServeError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(ServeError::RemoveStale {
                path: path.to_path_buf(),
                source: e,
            })
        }
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
        |source| ServeError::Chmod {
            path: path.to_path_buf(),
            source,
        },
    )?;
    Ok(listener)
}

/// Creates `dir` and its missing ancestors; the directories it creates get [`DIR_MODE`]
/// exactly, whatever the umask. An existing directory is left as it is.
fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    for d in missing {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// What one client may make the gRPC server hold. Past each limit the client gets a clear
/// error and every other client is still served.
///
/// The defaults leave room for many times what the CNI plugin (one short connection and one
/// call per ADD or DEL) and the network policy agent (one long-lived connection) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections open at once on the socket. One more is answered with an HTTP/2 `GOAWAY`
    /// (`ENHANCE_YOUR_CALM`, debug data [`TOO_MANY_CONNECTIONS`]) and closed.
    pub max_connections: usize,
    /// Streams (calls in flight) at once on one connection, advertised as
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; a stream past it is reset with `REFUSED_STREAM`.
    pub max_concurrent_streams: u32,
    /// Largest request header block (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`, bytes).
    pub max_header_list_size: u32,
    /// Largest decoded request message; a bigger one fails its call with `OUT_OF_RANGE`.
    /// Tonic applies this per service, so [`serve_listener_with`] cannot: the caller builds
    /// its services with it (see [`serve_listener_with`] and [`health_service_with_limit`]).
    pub max_message_bytes: usize,
    /// How long a new connection may stay silent before it sends its first bytes (the
    /// HTTP/2 preface); a silent connection is closed after it, freeing its slot.
    pub first_byte_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings on an established connection; a peer that does not
    /// answer one within the same interval is disconnected.
    pub keepalive: Duration,
}

/// Default of [`ServeLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Default of [`ServeLimits::max_concurrent_streams`].
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 64;
/// Default of [`ServeLimits::max_header_list_size`] (16 KiB).
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Default of [`ServeLimits::max_message_bytes`] (256 KiB; an AddNetworkRequest is a few
/// hundred bytes).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Default of [`ServeLimits::first_byte_timeout`].
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServeLimits::keepalive`].
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);

/// The `GOAWAY` debug data sent to a connection refused by [`ServeLimits::max_connections`].
pub const TOO_MANY_CONNECTIONS: &str = "too many concurrent connections on the gRPC socket";

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            keepalive: DEFAULT_KEEPALIVE,
        }
    }
}

/// Serves `routes` as plaintext gRPC on an already bound `listener` with the default
/// [`ServeLimits`] until `shutdown` completes, then stops accepting, lets in-flight calls
/// finish, and returns.
pub async fn serve_listener<F>(
    listener: UnixListener,
    routes: Routes,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    serve_listener_with(listener, routes, ServeLimits::default(), shutdown).await
}

/// [`serve_listener`] with explicit `limits`. The message size limit is a property of each
/// service, not of the server: build the services with it (for example
/// `CniBackendServer::new(b).max_decoding_message_size(limits.max_message_bytes)` and
/// [`health_service_with_limit`]).
pub async fn serve_listener_with<F>(
    listener: UnixListener,
    routes: Routes,
    limits: ServeLimits,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let path = listener
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel(16);
    let accept = tokio::spawn(accept_loop(listener, limits, tx));
    let served = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list_size)
        .http2_keepalive_interval(Some(limits.keepalive))
        .http2_keepalive_timeout(Some(limits.keepalive))
        .add_routes(routes)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accept.abort();
    served.map_err(|source| ServeError::Serve { path, source })
}

/// Accepts connections while the server takes them: each gets a slot of
/// [`ServeLimits::max_connections`] for its lifetime, or is refused at once when none is left.
async fn accept_loop(
    listener: UnixListener,
    limits: ServeLimits,
    tx: mpsc::Sender<io::Result<LimitedConn>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(error = %e, "gRPC socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = LimitedConn {
                    io: stream,
                    _slot: permit,
                    first_byte: Some(Box::pin(tokio::time::sleep(limits.first_byte_timeout))),
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            Err(_) => {
                if let Some(refused) = refusals.note() {
                    tracing::warn!(
                        limit = limits.max_connections,
                        refused,
                        "gRPC socket: {TOO_MANY_CONNECTIONS}; connections refused"
                    );
                }
                tokio::spawn(refuse(stream));
            }
        }
    }
}

/// Counts refused connections so a flood logs one line a second, not one per connection.
#[derive(Default)]
struct RefusalLog {
    since: Option<tokio::time::Instant>,
    count: u64,
}

impl RefusalLog {
    /// Notes one refusal; returns how many to report when a line is due.
    fn note(&mut self) -> Option<u64> {
        self.count += 1;
        let now = tokio::time::Instant::now();
        match self.since {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => None,
            _ => {
                self.since = Some(now);
                Some(std::mem::take(&mut self.count))
            }
        }
    }
}

/// Tells a connection over the limit why it is closed, in HTTP/2 terms a client reports: the
/// server preface (an empty SETTINGS frame) and a GOAWAY with `ENHANCE_YOUR_CALM` and
/// [`TOO_MANY_CONNECTIONS`] as debug data. Bounded: at most 1 s and 64 KiB of what the client
/// sent are read (so the close does not reset the data we wrote) before the socket is closed.
async fn refuse(mut stream: UnixStream) {
    let mut frames = Vec::with_capacity(64);
    // SETTINGS: length 0, type 4, no flags, stream 0.
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let debug = TOO_MANY_CONNECTIONS.as_bytes();
    let len = u32::try_from(8 + debug.len()).unwrap_or(8).to_be_bytes();
    // GOAWAY: type 7, stream 0, last stream id 0, error ENHANCE_YOUR_CALM (0xb).
    frames.extend_from_slice(&[len[1], len[2], len[3], 7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x0b]);
    frames.extend_from_slice(debug);
    let drain = async {
        stream.write_all(&frames).await?;
        stream.flush().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0usize;
        while read < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    let _ = stream.shutdown().await;
}

/// A served connection: the stream, its connection slot (freed when the server drops the
/// connection), and the deadline for its first bytes.
struct LimitedConn {
    io: UnixStream,
    _slot: OwnedSemaphorePermit,
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for LimitedConn {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Some(deadline) = self.first_byte.as_mut() {
            if polled.is_ready() {
                if buf.filled().len() > before {
                    self.first_byte = None;
                }
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "gRPC socket: no HTTP/2 preface within the first-byte timeout",
                )));
            }
        }
        polled
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Binds the unix socket at `path` with [`bind_unix`] and serves `routes` on it with
/// [`serve_listener`] until `shutdown` completes.
///
/// After a clean shutdown the socket file is removed, unless another process has replaced it
/// in the meantime. Typical use in ipamd:
///
/// ```no_run
/// # async fn run(backend: impl vpc_cni_rpc::CniBackend) -> Result<(), vpc_cni_rpc::ServeError> {
/// use vpc_cni_rpc::{health_service, serve_unix, CniBackendServer, DEFAULT_SOCKET};
///
/// let (health, health_server) = health_service().await;
/// let routes = tonic::service::Routes::new(CniBackendServer::new(backend)).add_service(health_server);
/// health.set_serving().await; // once start-up is done
/// serve_unix(DEFAULT_SOCKET, routes, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub async fn serve_unix<F>(
    path: impl AsRef<Path>,
    routes: Routes,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let path = path.as_ref();
    let listener = bind_unix(path)?;
    let bound = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    serve_listener(listener, routes, shutdown).await?;
    let current = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    if bound.is_some() && bound == current {
        // Best effort: a socket file nobody listens on is removed by the next bind anyway.
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The `grpc.health.v1.Health` tonic service returned by [`health_service`], to add to the
/// server's routes.
pub type HealthServer = tonic_health::pb::health_server::HealthServer<HealthService>;

/// Switches the health status reported by a [`HealthServer`]. Cheap to clone.
///
/// Every change applies to both names the reference daemon registers: the server-wide `""`
/// (what the kubelet probes check) and [`HEALTH_SERVICE`].
#[derive(Clone, Debug)]
pub struct HealthHandle {
    reporter: HealthReporter,
}

impl HealthHandle {
    /// Reports SERVING: the daemon has finished starting and can hand out addresses.
    pub async fn set_serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Reports NOT_SERVING again (for example while shutting down).
    pub async fn set_not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        for service in ["", HEALTH_SERVICE] {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// Creates the gRPC health service and its handle. Both `""` and [`HEALTH_SERVICE`] start as
/// NOT_SERVING, so a probe fails until [`HealthHandle::set_serving`] is called; any other
/// service name is answered with `NotFound`.
pub async fn health_service() -> (HealthHandle, HealthServer) {
    health_service_with_limit(DEFAULT_MAX_MESSAGE_BYTES).await
}

/// [`health_service`] whose requests may be at most `max_message_bytes` long (decoded).
pub async fn health_service_with_limit(max_message_bytes: usize) -> (HealthHandle, HealthServer) {
    let handle = HealthHandle {
        reporter: HealthReporter::new(),
    };
    handle.set_not_serving().await;
    let server = HealthServer::new(HealthService::from_health_reporter(handle.reporter.clone()))
        .max_decoding_message_size(max_message_bytes);
    (handle, server)
}
