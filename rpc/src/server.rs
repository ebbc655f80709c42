//! Server side: preparing the unix socket the way the reference daemon does, serving tonic over
//! it, and the gRPC health service.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
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

/// Serves `routes` as plaintext gRPC on an already bound `listener` until `shutdown`
/// completes, then stops accepting, lets in-flight calls finish, and returns.
pub async fn serve_listener<F>(
    listener: UnixListener,
    routes: Routes,
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
    Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ServeError::Serve { path, source })
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
    let handle = HealthHandle {
        reporter: HealthReporter::new(),
    };
    handle.set_not_serving().await;
    let server = HealthServer::new(HealthService::from_health_reporter(handle.reporter.clone()));
    (handle, server)
}
