//! The simulator's HTTP server (EC2 Query API, IMDS, admin view) listening inside the VPC
//! namespace on [`SERVICE_ADDR`], so that a process in any node namespace reaches it through
//! the node's default route, as ipamd reaches EC2 and IMDS on a real instance.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::mpsc;
use std::thread::JoinHandle;

use vpc_sim::server::{self, Shared};

use crate::error::{FabricError, Result};
use crate::fabric::{Fabric, SERVICE_ADDR};

/// A running simulator server; stops when dropped.
#[derive(Debug)]
pub struct SimServer {
    /// EC2 Query API address.
    pub ec2: SocketAddr,
    /// IMDS address.
    pub imds: SocketAddr,
    /// Admin JSON view address.
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SimServer {
    /// `AWS_ENDPOINT_URL_EC2` for a process in a node namespace.
    pub fn ec2_url(&self) -> String {
        format!("http://{}", self.ec2)
    }

    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT` of one instance.
    pub fn imds_url(&self, instance_id: &str) -> String {
        format!("http://{}/{instance_id}/", self.imds)
    }

    /// The admin view's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server thread started by [`spawn_in_vpc`]: what it reported when it started, the sender
/// that stops it, and its handle.
pub(crate) type InVpc<T> = (T, tokio::sync::oneshot::Sender<()>, JoinHandle<()>);

/// Runs `body` on a new thread named `name` that stays inside the fabric's VPC namespace (the
/// listeners it binds belong to that namespace), on its own current-thread runtime. `body`
/// reports its start on the first channel (what it listens on, or why it could not) and
/// returns when the second fires (the server was dropped). Returns once it has reported.
pub(crate) fn spawn_in_vpc<T, F, Fut>(fabric: &Fabric, name: &str, body: F) -> Result<InVpc<T>>
where
    T: Send + 'static,
    F: FnOnce(
            mpsc::Sender<std::result::Result<T, String>>,
            tokio::sync::oneshot::Receiver<()>,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let vpc = fabric.vpc_ns()?;
    let (tx, rx) = mpsc::channel::<std::result::Result<T, String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let what = name.to_owned();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _guard = match vpc.enter() {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(format!("enter VPC namespace: {e}")));
                    return;
                }
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(body(tx, stop_rx));
        })
        .map_err(|source| FabricError::Process {
            what: format!("spawn {what} thread"),
            source,
        })?;
    let started = rx.recv().map_err(|_| FabricError::Sim {
        action: "serve",
        message: format!("{name} thread exited before starting"),
    })?;
    match started {
        Ok(v) => Ok((v, stop_tx, thread)),
        Err(message) => {
            let _ = thread.join();
            Err(FabricError::Sim {
                action: "serve",
                message: format!("{name}: {message}"),
            })
        }
    }
}

/// Serves `shared` on [`SERVICE_ADDR`] (ports picked by the kernel) inside the fabric's VPC
/// namespace, on a dedicated thread with its own runtime.
pub fn serve(fabric: &Fabric, shared: Shared) -> Result<SimServer> {
    let ((ec2, imds, admin), stop, thread) =
        spawn_in_vpc(fabric, "sim-server", move |tx, stop_rx| async move {
            let any = SocketAddr::V4(SocketAddrV4::new(SERVICE_ADDR, 0));
            match server::start(shared, any, any, any).await {
                Ok(running) => {
                    let _ = tx.send(Ok((running.ec2, running.imds, running.admin)));
                    let _ = stop_rx.await;
                    running.shutdown();
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("start: {e}")));
                }
            }
        })?;
    Ok(SimServer {
        ec2,
        imds,
        admin,
        stop: Some(stop),
        thread: Some(thread),
    })
}
