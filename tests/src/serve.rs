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

type Started = std::result::Result<(SocketAddr, SocketAddr, SocketAddr), String>;

/// Serves `shared` on [`SERVICE_ADDR`] (ports picked by the kernel) inside the fabric's VPC
/// namespace, on a dedicated thread with its own runtime.
pub fn serve(fabric: &Fabric, shared: Shared) -> Result<SimServer> {
    let vpc = fabric.vpc_ns()?;
    let (tx, rx) = mpsc::channel::<Started>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sim-server".into())
        .spawn(move || {
            // This thread stays in the VPC namespace until it exits; the listeners it binds
            // belong to that namespace.
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
            rt.block_on(async move {
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
            });
        })
        .map_err(|source| FabricError::Process {
            what: "spawn simulator server thread".into(),
            source,
        })?;
    let started = rx.recv().map_err(|_| FabricError::Sim {
        action: "serve",
        message: "server thread exited before starting".into(),
    })?;
    match started {
        Ok((ec2, imds, admin)) => Ok(SimServer {
            ec2,
            imds,
            admin,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Err(message) => {
            let _ = thread.join();
            Err(FabricError::Sim {
                action: "serve",
                message,
            })
        }
    }
}
