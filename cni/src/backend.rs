//! The plugin's two remote peers behind narrow traits: ipamd ([`Ipam`]) and the network
//! policy agent ([`PolicyAgent`]), with their gRPC implementations over unix sockets.
//! In-memory implementations live in [`crate::memory`].

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tonic::transport::Channel;
use vpc_cni_rpc::{
    AddNetworkReply, AddNetworkRequest, CniBackendClient, DelNetworkReply, DelNetworkRequest,
    DeleteNpRequest, EnforceNpRequest, ServingStatus, UnixConnection,
};

use crate::error::BoxError;

/// Why a call to ipamd or the policy agent failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socket could not be dialled (no socket, nobody listening, timeout).
    #[error("cannot connect to {socket}")]
    Unreachable {
        /// The socket path.
        socket: String,
        /// The connection error.
        #[source]
        source: BoxError,
    },
    /// The server answered with a gRPC error.
    #[error("{op} failed")]
    Rpc {
        /// The RPC.
        op: &'static str,
        /// The status.
        #[source]
        source: tonic::Status,
    },
}

/// ipamd, as the plugin sees it.
pub trait Ipam: Send + Sync {
    /// `AddNetwork`.
    fn add_network(
        &self,
        req: AddNetworkRequest,
    ) -> impl Future<Output = Result<AddNetworkReply, BackendError>> + Send;

    /// `DelNetwork`.
    fn del_network(
        &self,
        req: DelNetworkRequest,
    ) -> impl Future<Output = Result<DelNetworkReply, BackendError>> + Send;

    /// STATUS: whether ipamd reports itself serving.
    fn ready(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// The network policy agent, called only when ipamd's reply names a policy mode.
pub trait PolicyAgent: Send + Sync {
    /// `EnforceNpToPod` (ADD).
    fn enforce(
        &self,
        req: EnforceNpRequest,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// `DeletePodNp` (DEL).
    fn delete(&self, req: DeleteNpRequest)
        -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// ipamd over its unix socket. Connects on first use and keeps the connection for the rest of
/// the invocation (an ADD waiting for the pool reuses it; a broken connection is redialled on
/// the next attempt). One plain HTTP/2 connection ([`vpc_cni_rpc::connect_unix_direct`]), not a
/// tonic `Channel`: the plugin makes one or two calls and exits.
#[derive(Debug)]
pub struct GrpcIpam {
    socket: String,
    timeout: Duration,
    client: Mutex<Option<CniBackendClient<UnixConnection>>>,
}

impl GrpcIpam {
    /// A client for the socket at `socket`, dialling within `timeout`.
    pub fn new(socket: impl Into<String>, timeout: Duration) -> GrpcIpam {
        GrpcIpam {
            socket: socket.into(),
            timeout,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<CniBackendClient<UnixConnection>, BackendError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        crate::timing::mark("ipamd_connect");
        let c = vpc_cni_rpc::connect_unix_direct(&self.socket, self.timeout)
            .await
            .map_err(|e| BackendError::Unreachable {
                socket: self.socket.clone(),
                source: Box::new(e),
            })?;
        *guard = Some(c.clone());
        crate::timing::mark("ipamd_rpc");
        Ok(c)
    }

    async fn forget_on_unavailable(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::Unavailable {
            *self.client.lock().await = None;
        }
    }
}

impl Ipam for GrpcIpam {
    async fn add_network(&self, req: AddNetworkRequest) -> Result<AddNetworkReply, BackendError> {
        let mut c = self.client().await?;
        match c.add_network(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(source) => {
                self.forget_on_unavailable(&source).await;
                Err(BackendError::Rpc {
                    op: "AddNetwork",
                    source,
                })
            }
        }
    }

    async fn del_network(&self, req: DelNetworkRequest) -> Result<DelNetworkReply, BackendError> {
        let mut c = self.client().await?;
        match c.del_network(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(source) => {
                self.forget_on_unavailable(&source).await;
                Err(BackendError::Rpc {
                    op: "DelNetwork",
                    source,
                })
            }
        }
    }

    async fn ready(&self) -> Result<(), BackendError> {
        let unreachable = |e: BoxError| BackendError::Unreachable {
            socket: self.socket.clone(),
            source: e,
        };
        match vpc_cni_rpc::check_health(&self.socket, "", self.timeout).await {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => Err(unreachable(
                format!("health status is {}", other.as_str_name()).into(),
            )),
            Err(e) => Err(unreachable(Box::new(e))),
        }
    }
}

/// The network policy agent over its unix socket (dialled per call, 2 s bound, as the
/// reference does).
#[derive(Debug, Clone)]
pub struct GrpcPolicyAgent {
    socket: String,
}

impl GrpcPolicyAgent {
    /// A client for the agent's socket.
    pub fn new(socket: impl Into<String>) -> GrpcPolicyAgent {
        GrpcPolicyAgent {
            socket: socket.into(),
        }
    }

    async fn client(&self) -> Result<vpc_cni_rpc::NpBackendClient<Channel>, BackendError> {
        vpc_cni_rpc::connect_np_agent(&self.socket, vpc_cni_rpc::NP_AGENT_CONNECT_TIMEOUT)
            .await
            .map_err(|e| BackendError::Unreachable {
                socket: self.socket.clone(),
                source: Box::new(e),
            })
    }
}

impl PolicyAgent for GrpcPolicyAgent {
    async fn enforce(&self, req: EnforceNpRequest) -> Result<(), BackendError> {
        let r = self
            .client()
            .await?
            .enforce_np_to_pod(req)
            .await
            .map_err(|source| BackendError::Rpc {
                op: "EnforceNpToPod",
                source,
            })?;
        if r.into_inner().success {
            Ok(())
        } else {
            Err(BackendError::Rpc {
                op: "EnforceNpToPod",
                source: tonic::Status::unknown("the agent answered Success=false"),
            })
        }
    }

    async fn delete(&self, req: DeleteNpRequest) -> Result<(), BackendError> {
        self.client()
            .await?
            .delete_pod_np(req)
            .await
            .map(drop)
            .map_err(|source| BackendError::Rpc {
                op: "DeletePodNp",
                source,
            })
    }
}
