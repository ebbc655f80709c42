//! The gRPC services on the unix socket: `CNIBackend` (AddNetwork, DelNetwork with the
//! reference semantics, spec/ipamd.md 4.4-4.5, including the branch-ENI pods of security
//! groups for pods), `ConfigServerBackend` and gRPC health.

use std::sync::Arc;

use subnet_calc::policy;
use tonic::{Request, Response, Status};
use vpc_cni_rpc::{
    AddNetworkReply, AddNetworkRequest, CniBackend, ConfigServerBackend, DelNetworkReply,
    DelNetworkRequest, IpAllocationMetadata, NetworkPolicyAgentConfigReply,
};

use crate::io::host::PodEniHost;
use crate::io::k8s::K8s;
use crate::store::checkpoint::IpamMetadata;
use crate::store::commit::{PoolState, StateError};
use crate::store::datastore::{DsError, IpamKey};
use crate::store::family::{Family, V4};

/// The build version the plugin must send (`ClientVersion`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What replies carry besides addresses.
#[derive(Debug, Clone, Default)]
pub struct ReplySettings {
    /// VPC IPv4 CIDRs (from instance metadata), plus SNAT exclusions when SNAT is ours.
    pub vpc_cidrs: Vec<String>,
    /// VPC IPv6 CIDRs (from instance metadata; IPv6 mode).
    pub vpc_v6_cidrs: Vec<String>,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`.
    pub external_snat: bool,
    /// `NETWORK_POLICY_ENFORCING_MODE`.
    pub network_policy_mode: String,
    /// Node primary IPv4 address.
    pub node_ip: String,
    /// Node primary IPv6 address (IPv6 mode).
    pub node_ipv6: String,
    /// Instance id.
    pub instance_id: String,
    /// Region.
    pub region: String,
}

/// Called after each successful assignment to say whether the pool is now below target.
pub type LowCheck<F = V4> = Arc<dyn Fn(&PoolState<F>) -> bool + Send + Sync>;

/// What the backend reports per request (metrics, the pod IP annotation). Every method has a
/// no-op default; none may block.
pub trait BackendEvents: Send + Sync {
    /// An AddNetwork request arrived.
    fn add_request(&self) {}
    /// A DelNetwork request arrived, with its reason (`PodDeleted`, `SetupNSFailed`...).
    fn del_request(&self, _reason: &str) {}
    /// An AddNetwork found no free address.
    fn no_available_ip(&self) {}
    /// The pod `key` asked for an address: `served` with a fresh assignment (an idempotent
    /// repeat is not reported), or refused for lack of one.
    fn requested(&self, _key: &IpamKey, _served: bool) {}
    /// An address was assigned to pod `namespace/name`.
    fn assigned(&self, _namespace: &str, _name: &str, _ip: std::net::IpAddr) {}
}

/// What the backend needs for security groups for pods (`ENABLE_POD_ENI`): the API server
/// (the pod's limits, `vpc.amazonaws.com/pod-eni` annotation and uid) and the host's links
/// (the trunk ENI's link index).
#[derive(Clone)]
pub struct PodEniSupport {
    /// The Kubernetes client.
    pub k8s: K8s,
    /// Host link lookup.
    pub host: Arc<dyn PodEniHost>,
}

impl std::fmt::Debug for PodEniSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEniSupport")
            .field("k8s", &self.k8s)
            .finish_non_exhaustive()
    }
}

/// The gRPC backend over the datastore of one address family.
pub struct Backend<F: Family = V4> {
    state: Arc<PoolState<F>>,
    reply: ReplySettings,
    version: String,
    low_check: Option<LowCheck<F>>,
    events: Option<Arc<dyn BackendEvents>>,
    pod_eni: Option<PodEniSupport>,
}

impl<F: Family> Clone for Backend<F> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
            reply: self.reply.clone(),
            version: self.version.clone(),
            low_check: self.low_check.clone(),
            events: self.events.clone(),
            pod_eni: self.pod_eni.clone(),
        }
    }
}

/// What the security-groups-for-pods step of AddNetwork decided.
enum BranchStep {
    /// Not a branch-ENI pod: the ordinary way.
    Ordinary,
    /// A branch-ENI pod, answered.
    Reply(AddNetworkReply),
    /// A branch-ENI pod (or a pod that could not be read) that cannot be served now.
    Fail,
}

impl<F: Family> std::fmt::Debug for Backend<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("reply", &self.reply)
            .finish_non_exhaustive()
    }
}

impl<F: Family> Backend<F> {
    /// A backend over `state`.
    pub fn new(state: Arc<PoolState<F>>, reply: ReplySettings) -> Self {
        Self {
            state,
            reply,
            version: VERSION.into(),
            low_check: None,
            events: None,
            pod_eni: None,
        }
    }

    /// Serves branch-ENI pods (security groups for pods, IPv4): AddNetwork reads the pod,
    /// DelNetwork of a pod unknown to the datastore too.
    pub fn with_pod_eni(mut self, support: PodEniSupport) -> Self {
        self.pod_eni = Some(support);
        self
    }

    /// Reports requests to `events`.
    pub fn with_events(mut self, events: Arc<dyn BackendEvents>) -> Self {
        self.events = Some(events);
        self
    }

    fn event(&self, f: impl FnOnce(&dyn BackendEvents)) {
        if let Some(e) = &self.events {
            f(e.as_ref());
        }
    }

    /// Wakes the pool manager when an assignment takes the pool below target.
    pub fn with_low_check(mut self, f: LowCheck<F>) -> Self {
        self.low_check = Some(f);
        self
    }

    /// Overrides the version handshake string (tests).
    pub fn with_version(mut self, v: &str) -> Self {
        self.version = v.into();
        self
    }
}

/// Whether the pool is low per the policy (for [`Backend::with_low_check`]).
pub fn pool_is_low(cfg: policy::PoolConfig, limits: policy::NodeLimits) -> LowCheck {
    Arc::new(move |st: &PoolState| {
        let view = crate::plan::pool::PoolView::of(&st.lock(), st.now());
        crate::plan::pool::is_low(&cfg, &limits, &view)
    })
}

impl<F: Family> Backend<F> {
    /// Spec/ipamd.md 4.4 step 2: GET the pod; when its first container's limits ask for a
    /// `vpc.amazonaws.com/pod-eni` resource, answer from its annotation and the trunk ENI,
    /// without the datastore.
    async fn branch_step(&self, sgp: &PodEniSupport, r: &AddNetworkRequest) -> BranchStep {
        let (ns, name) = (&r.k8s_pod_namespace, &r.k8s_pod_name);
        if ns.is_empty() || name.is_empty() {
            tracing::warn!(namespace = %ns, pod = %name, "AddNetwork: K8S_POD_NAMESPACE and K8S_POD_NAME are needed to read the pod (ENABLE_POD_ENI)");
            return BranchStep::Fail;
        }
        let pod = match sgp.k8s.pod(ns, name).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(namespace = %ns, pod = %name, error = %e, cause = ?std::error::Error::source(&e), "AddNetwork: cannot read the pod");
                return BranchStep::Fail;
            }
        };
        if !crate::io::k8s::pod_wants_branch(&pod) {
            return BranchStep::Ordinary;
        }
        let trunk = {
            let ds = self.state.lock();
            ds.enis()
                .values()
                .find(|e| e.is_trunk)
                .map(|e| (e.id.clone(), e.mac.clone()))
        };
        let Some((trunk_id, trunk_mac)) = trunk else {
            tracing::warn!(namespace = %ns, pod = %name, "AddNetwork: branch-ENI pod but no trunk ENI on the node yet");
            return BranchStep::Fail;
        };
        let parent = match sgp.host.link_index_by_mac(&trunk_mac).await {
            Ok(Some(i)) => i,
            Ok(None) => {
                tracing::warn!(trunk = %trunk_id, mac = %trunk_mac, "AddNetwork: no host link has the trunk ENI's MAC");
                return BranchStep::Fail;
            }
            Err(e) => {
                tracing::warn!(trunk = %trunk_id, error = %e, "AddNetwork: trunk link lookup failed");
                return BranchStep::Fail;
            }
        };
        let Some(value) = crate::io::k8s::pod_eni_annotation(&pod) else {
            tracing::info!(namespace = %ns, pod = %name, "AddNetwork: branch-ENI pod without its {} annotation yet", crate::io::k8s::POD_ENI_ANNOTATION);
            return BranchStep::Fail;
        };
        let branch = match crate::io::k8s::pod_branch(value) {
            Ok(b) => b,
            Err(why) => {
                tracing::warn!(namespace = %ns, pod = %name, error = %why, "AddNetwork: unusable branch-ENI annotation");
                return BranchStep::Fail;
            }
        };
        tracing::info!(ip = %branch.ip, vlan = branch.vlan_id, trunk = %trunk_id, pod = %name, namespace = %ns, "branch ENI pod");
        self.event(|e| e.assigned(ns, name, std::net::IpAddr::V4(branch.ip)));
        BranchStep::Reply(AddNetworkReply {
            success: true,
            ip_allocation_metadata: vec![IpAllocationMetadata {
                i_pv4_addr: branch.ip.to_string(),
                i_pv6_addr: String::new(),
                device_number: -1,
                route_table_id: 0,
            }],
            use_external_snat: self.reply.external_snat,
            vp_cv4_cid_rs: self.reply.vpc_cidrs.clone(),
            vp_cv6_cid_rs: self.reply.vpc_v6_cidrs.clone(),
            pod_vlan_id: i32::from(branch.vlan_id),
            pod_enimac: branch.mac,
            pod_eni_subnet_gw: crate::config::subnet_gateway(branch.subnet).to_string(),
            parent_if_index: i32::try_from(parent).unwrap_or(i32::MAX),
            network_policy_mode: self.reply.network_policy_mode.clone(),
        })
    }

    /// Spec/ipamd.md 4.5 step 4: DelNetwork of a pod the datastore does not know, with
    /// security groups for pods on. `None`: not a branch-ENI pod, the unknown-pod error
    /// stands.
    async fn branch_del(
        &self,
        sgp: &PodEniSupport,
        r: &DelNetworkRequest,
    ) -> Option<Result<DelNetworkReply, Status>> {
        let (ns, name) = (&r.k8s_pod_namespace, &r.k8s_pod_name);
        if ns.is_empty() || name.is_empty() {
            return None;
        }
        let pod = match sgp.k8s.pod(ns, name).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => {
                tracing::info!(namespace = %ns, pod = %name, "DelNetwork: pod unknown to the datastore and gone from the API server");
                return Some(Ok(DelNetworkReply {
                    success: true,
                    network_policy_mode: self.reply.network_policy_mode.clone(),
                    ..Default::default()
                }));
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, pod = %name, error = %e, "DelNetwork: cannot read the pod");
                return Some(Err(Status::unavailable(format!(
                    "DelNetwork {ns}/{name}: cannot read the pod: {e}"
                ))));
            }
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if uid != r.k8s_pod_uid {
            tracing::warn!(namespace = %ns, pod = %name, K8S_POD_UID = %r.k8s_pod_uid, pod_uid = %uid, "DelNetwork: pod UID mismatch");
            return Some(Err(Status::failed_precondition(format!(
                "DelNetwork {ns}/{name}: pod UID mismatch: K8S_POD_UID {:?}, the pod's is {uid:?}",
                r.k8s_pod_uid
            ))));
        }
        let value = crate::io::k8s::pod_eni_annotation(&pod)?;
        let list = match crate::io::k8s::parse_pod_eni(value) {
            Ok(l) => l,
            Err(why) => {
                return Some(Err(Status::internal(format!(
                    "DelNetwork {ns}/{name}: {why}"
                ))))
            }
        };
        let Some(first) = list.first() else {
            return Some(Err(Status::internal(format!(
                "DelNetwork {ns}/{name}: {}: an empty list",
                crate::io::k8s::POD_ENI_ANNOTATION
            ))));
        };
        tracing::info!(ip = %first.private_ip, vlan = first.vlan_id, pod = %name, namespace = %ns, "branch ENI pod released");
        Some(Ok(DelNetworkReply {
            success: true,
            ip_allocation_metadata: vec![IpAllocationMetadata {
                i_pv4_addr: first.private_ip.clone(),
                ..Default::default()
            }],
            pod_vlan_id: i32::try_from(first.vlan_id).unwrap_or(0),
            network_policy_mode: self.reply.network_policy_mode.clone(),
        }))
    }
}

#[tonic::async_trait]
impl<F: Family> CniBackend for Backend<F> {
    async fn add_network(
        &self,
        request: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let r = request.into_inner();
        crate::serve::request::check_version(&r.client_version, &self.version)?;
        self.event(|e| e.add_request());
        let fail = || AddNetworkReply {
            success: false,
            network_policy_mode: self.reply.network_policy_mode.clone(),
            ..Default::default()
        };
        if let Err(e) = crate::serve::request::check_add(&r) {
            tracing::warn!(error = %e.message(), "AddNetwork refused");
            return Err(e);
        }
        if let Some(sgp) = &self.pod_eni {
            match self.branch_step(sgp, &r).await {
                BranchStep::Ordinary => {}
                BranchStep::Reply(reply) => return Ok(Response::new(reply)),
                BranchStep::Fail => return Ok(Response::new(fail())),
            }
        }
        if r.requires_multi_nic_attachment {
            tracing::warn!(pod = %r.k8s_pod_name, "multi-NIC attachment requested but ENABLE_MULTI_NIC is off");
            return Ok(Response::new(fail()));
        }
        let key = IpamKey::new(&r.network_name, &r.container_id, &r.if_name);
        let md = IpamMetadata {
            pod_namespace: r.k8s_pod_namespace.clone(),
            pod_name: r.k8s_pod_name.clone(),
            interfaces_count: 1,
        };
        let res = match self.state.assign(&key, &md) {
            Ok(c) => c.durable().await,
            Err(e) => Err(e),
        };
        let a = match res {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(pod = %r.k8s_pod_name, namespace = %r.k8s_pod_namespace, error = %e, "AddNetwork failed");
                if matches!(e, StateError::Datastore(DsError::NoAvailableIp)) {
                    self.event(|e| e.no_available_ip());
                    self.event(|e| e.requested(&key, false));
                    self.state.low.notify_one();
                }
                return Ok(Response::new(fail()));
            }
        };
        if a.fresh {
            self.event(|e| e.requested(&key, true));
            if let Some(check) = &self.low_check {
                if check(&self.state) {
                    self.state.low.notify_one();
                }
            }
        }
        tracing::info!(ip = %a.ip, eni = %a.eni_id, pod = %r.k8s_pod_name, namespace = %r.k8s_pod_namespace, "assigned");
        self.event(|e| e.assigned(&r.k8s_pod_namespace, &r.k8s_pod_name, F::ip(a.ip)));
        Ok(Response::new(AddNetworkReply {
            success: true,
            ip_allocation_metadata: vec![allocation_metadata::<F>(
                a.ip,
                a.device_number,
                a.route_table_id,
            )],
            use_external_snat: self.reply.external_snat,
            vp_cv4_cid_rs: self.reply.vpc_cidrs.clone(),
            vp_cv6_cid_rs: self.reply.vpc_v6_cidrs.clone(),
            network_policy_mode: self.reply.network_policy_mode.clone(),
            ..Default::default()
        }))
    }

    async fn del_network(
        &self,
        request: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let r = request.into_inner();
        crate::serve::request::check_version(&r.client_version, &self.version)?;
        if let Err(e) = crate::serve::request::check_del(&r) {
            tracing::warn!(error = %e.message(), "DelNetwork refused");
            return Err(e);
        }
        self.event(|e| e.del_request(crate::serve::request::reason_label(&r.reason)));
        let key = IpamKey::new(&r.network_name, &r.container_id, &r.if_name);
        let res = match self.state.unassign(&key) {
            Ok(c) => c.durable().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(u) => {
                tracing::info!(ip = %u.ip, pod = %r.k8s_pod_name, reason = %r.reason, "released");
                Ok(Response::new(DelNetworkReply {
                    success: true,
                    ip_allocation_metadata: vec![allocation_metadata::<F>(
                        u.ip,
                        u.device_number,
                        u.route_table_id,
                    )],
                    network_policy_mode: self.reply.network_policy_mode.clone(),
                    ..Default::default()
                }))
            }
            Err(e @ StateError::Datastore(DsError::UnknownPod)) => {
                if let Some(sgp) = &self.pod_eni {
                    if let Some(res) = self.branch_del(sgp, &r).await {
                        return res.map(Response::new);
                    }
                }
                Err(Status::internal(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

#[tonic::async_trait]
impl<F: Family> ConfigServerBackend for Backend<F> {
    async fn get_network_policy_configs(
        &self,
        _request: Request<()>,
    ) -> Result<Response<NetworkPolicyAgentConfigReply>, Status> {
        Ok(Response::new(NetworkPolicyAgentConfigReply {
            network_policy_mode: self.reply.network_policy_mode.clone(),
            multi_nic_enabled: false,
            node_i_pv4: self.reply.node_ip.clone(),
            node_i_pv6: self.reply.node_ipv6.clone(),
            instance_id: self.reply.instance_id.clone(),
            region: self.reply.region.clone(),
        }))
    }
}

/// The reply's entry for `ip`: the address in the field of its family (the reference's
/// `IPv4Addr` or `IPv6Addr`), the other one empty.
fn allocation_metadata<F: Family>(
    ip: F::Addr,
    device_number: u32,
    route_table_id: u32,
) -> IpAllocationMetadata {
    let (v4, v6) = match F::ip(ip) {
        std::net::IpAddr::V4(a) => (a.to_string(), String::new()),
        std::net::IpAddr::V6(a) => (String::new(), a.to_string()),
    };
    IpAllocationMetadata {
        i_pv4_addr: v4,
        i_pv6_addr: v6,
        device_number: device_number as i32,
        route_table_id: route_table_id as i32,
    }
}

/// The routes to serve: CNIBackend, ConfigServerBackend and health.
pub fn routes<F: Family>(
    backend: Backend<F>,
    health: vpc_cni_rpc::HealthServer,
) -> tonic::service::Routes {
    routes_with_limit(backend, health, vpc_cni_rpc::DEFAULT_MAX_MESSAGE_BYTES)
}

/// [`routes`] whose services refuse a request message longer than `max_message_bytes`
/// (decoded) with `OUT_OF_RANGE`; build `health` with the same limit
/// (`vpc_cni_rpc::health_service_with_limit`).
pub fn routes_with_limit<F: Family>(
    backend: Backend<F>,
    health: vpc_cni_rpc::HealthServer,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    tonic::service::Routes::new(
        vpc_cni_rpc::CniBackendServer::new(backend.clone())
            .max_decoding_message_size(max_message_bytes),
    )
    .add_service(
        vpc_cni_rpc::ConfigServerBackendServer::new(backend)
            .max_decoding_message_size(max_message_bytes),
    )
    .add_service(health)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checkpoint::{CheckpointStore, FileStore};
    use crate::store::commit::TokioClock;
    use crate::store::datastore::{DataStore, EniSpec};
    use std::collections::HashSet;
    use std::time::Duration;

    fn datastore(n: u8) -> DataStore {
        let mut ds = DataStore::new(false, false, false, Duration::from_secs(30));
        ds.add_eni(
            EniSpec {
                id: "eni-0".into(),
                mac: String::new(),
                is_primary: true,
                is_trunk: false,
                is_efa: false,
                device_number: 0,
                primary_ip: "10.0.0.5".parse().unwrap(),
                subnet_id: "s".into(),
                subnet_cidr: "10.0.0.0/24".parse().unwrap(),
                excluded: false,
            },
            Duration::ZERO,
        );
        for i in 0..n {
            ds.add_cidr(
                "eni-0",
                format!("10.0.0.{}/32", 10 + i).parse().unwrap(),
                false,
            )
            .unwrap();
        }
        ds
    }

    fn add(c: &str) -> AddNetworkRequest {
        AddNetworkRequest {
            client_version: VERSION.into(),
            k8s_pod_name: format!("pod-{c}"),
            k8s_pod_namespace: "default".into(),
            container_id: c.into(),
            if_name: "eth0".into(),
            network_name: "aws-cni".into(),
            ..Default::default()
        }
    }

    fn del(c: &str) -> DelNetworkRequest {
        DelNetworkRequest {
            client_version: VERSION.into(),
            container_id: c.into(),
            if_name: "eth0".into(),
            network_name: "aws-cni".into(),
            reason: vpc_cni_rpc::REASON_POD_DELETED.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn over_the_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ipamd.sock");
        let ckpt = dir.path().join("ipam.json");
        let st = Arc::new(PoolState::new(
            datastore(40),
            Box::new(FileStore::new(&ckpt)),
            Arc::new(TokioClock::new()),
        ));
        let backend = Backend::new(
            st.clone(),
            ReplySettings {
                vpc_cidrs: vec!["10.0.0.0/16".into()],
                network_policy_mode: "standard".into(),
                ..Default::default()
            },
        );
        let (health, health_srv) = vpc_cni_rpc::health_service().await;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(vpc_cni_rpc::serve_unix(
            sock.clone(),
            routes(backend, health_srv),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let mut c = loop {
            match vpc_cni_rpc::connect_unix(&sock, Duration::from_secs(5)).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let status = vpc_cni_rpc::check_health(&sock, "", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, vpc_cni_rpc::ServingStatus::NotServing);
        health.set_serving().await;
        assert_eq!(
            vpc_cni_rpc::check_health(&sock, "", Duration::from_secs(5))
                .await
                .unwrap(),
            vpc_cni_rpc::ServingStatus::Serving
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o660
        );

        // Version handshake.
        let mut bad = add("x");
        bad.client_version = "0.0.0-other".into();
        let e = c.add_network(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);

        // 200 ADD/DEL, no address held twice, idempotent ADD.
        let mut held = std::collections::HashMap::new();
        for round in 0..5 {
            for i in 0..40 {
                let id = format!("c{round}-{i}");
                let r = c.add_network(add(&id)).await.unwrap().into_inner();
                assert!(r.success, "add {id}");
                assert_eq!(r.vp_cv4_cid_rs, vec!["10.0.0.0/16".to_string()]);
                assert_eq!(r.network_policy_mode, "standard");
                let ip = r.ip_allocation_metadata[0].i_pv4_addr.clone();
                assert_eq!(r.ip_allocation_metadata[0].route_table_id, 254);
                let again = c.add_network(add(&id)).await.unwrap().into_inner();
                assert_eq!(again.ip_allocation_metadata[0].i_pv4_addr, ip, "idempotent");
                held.insert(id, ip);
                let distinct: HashSet<_> = held.values().collect();
                assert_eq!(distinct.len(), held.len(), "an address handed out twice");
            }
            // Full: a 41st pod gets Success=false, no gRPC error.
            let full = c.add_network(add("overflow")).await.unwrap().into_inner();
            assert!(!full.success);
            // The checkpoint on disk lists every assignment.
            let disk = FileStore::new(&ckpt).read().unwrap().unwrap();
            assert_eq!(disk.allocations.len(), 40);
            for i in 0..40 {
                let id = format!("c{round}-{i}");
                let r = c.del_network(del(&id)).await.unwrap().into_inner();
                assert!(r.success);
                assert_eq!(r.ip_allocation_metadata[0].i_pv4_addr, held[&id]);
                held.remove(&id);
            }
            // Cooldown (30 s) keeps released addresses out: let the next round run on a
            // datastore whose addresses have cooled.
            let mut ds = st.lock();
            *ds = {
                let cp = ds.checkpoint();
                let mut fresh = datastore(40);
                fresh.restore(&cp, &|_, _| true).unwrap();
                fresh
            };
        }
        // DEL of an unknown pod: a gRPC error carrying the marker.
        let e = c.del_network(del("never")).await.unwrap_err();
        assert!(vpc_cni_rpc::is_unknown_pod(&e), "{e:?}");

        let cfgs = vpc_cni_rpc::ConfigServerBackendClient::new(
            vpc_cni_rpc::connect_channel(&sock, Duration::from_secs(5))
                .await
                .unwrap(),
        )
        .get_network_policy_configs(())
        .await
        .unwrap()
        .into_inner();
        assert_eq!(cfgs.network_policy_mode, "standard");
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}
