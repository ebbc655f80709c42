//! The daemon: start-up in the reference order (spec/ipamd.md section 9, as far as the pieces
//! exist), then the gRPC server, metrics, introspection and the pool manager loop.
//!
//! Order: limits (the calculator's catalog, else `DescribeInstanceTypes`) → ENIs from instance
//! metadata and EC2, managed or unmanaged by tags → datastore → ENI tags → checkpoint restore
//! with normalisation (pods whose host veth is gone are dropped) → pre-scaling (one pool
//! decision round) → gRPC with health SERVING, metrics, introspection, pool loop.

mod v6;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use subnet_calc::limits::{Catalog, Hypervisor, InstanceLimits};
use subnet_calc::policy::NodeLimits;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::io::ec2::pacer::{Ec2Outcome, Pacer};
use crate::io::ec2::{
    Addresses, Assigned, CreateEni, Ec2Api, Ec2Error, Ec2Result, EniInfo, ErrorKind,
    InstanceTypeInfo, SubnetInfo, TAG_INSTANCE_ID, TAG_NO_MANAGE,
};
use crate::io::host::{HostEni, NodeHost, PodEniHost};
use crate::io::imds::{Imds, ImdsError};
use crate::io::k8s::K8s;
use crate::plan::reconcile::AdoptedEni;
use crate::run::pool::{NodeInfo, PoolHost, PoolManager, PoolObserver, SubnetDiscovery};
use crate::serve::grpc::{Backend, BackendEvents, ReplySettings};
use crate::serve::introspect::{self, EniInfos, IntrospectSource};
use crate::serve::metrics::{Metrics, PoolSnapshot};
use crate::store::checkpoint::{CheckpointError, CheckpointStore, FileStore};
use crate::store::commit::{PoolState, TokioClock};
use crate::store::datastore::{DataStore, EniSpec};
use crate::store::family::{Family, V4};
use crate::types::Ipv4Net;
pub use v6::{start_v6, DaemonV6};

pub use crate::run::orphans::{
    veth_check_from_names, AllVethsPresent, FixedVeths, HostVeths, VethCheck, VethProbe,
};

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Instance metadata could not be read.
    #[error("instance metadata")]
    Imds(#[from] ImdsError),
    /// An EC2 call failed for good during start-up.
    #[error("start-up: {step}")]
    Ec2 {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: Ec2Error,
    },
    /// The checkpoint is corrupt, foreign or unwritable (it is kept as it is).
    #[error("checkpoint")]
    Checkpoint(#[from] CheckpointError),
    /// The first checkpoint write after the restore failed.
    #[error("checkpoint")]
    CheckpointWrite(#[from] crate::store::commit::StateError),
    /// The checkpoint does not fit the ENIs (duplicate address).
    #[error("checkpoint restore")]
    Restore(#[source] crate::store::datastore::DsError),
    /// Pre-scaling failed (not returned by [`start`]: the pool loop retries; kept for callers
    /// that run [`PoolManager::settle`] themselves).
    #[error("pre-scaling")]
    Prescale(#[source] crate::run::pool::PoolError),
    /// A listener could not be set up.
    #[error("serving {what}: {message}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// A setting this daemon does not implement yet.
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// Host networking failed at start-up.
    #[error("host networking")]
    Host(#[source] crate::io::host::HostError),
    /// Custom networking cannot be set up (no API server, no ENIConfig, unknown subnet).
    #[error("custom networking: {0}")]
    CustomNetworking(String),
    /// The host veths could not be read for checkpoint normalisation.
    #[error("host veths: {0}")]
    Veths(String),
}

/// The optional parts of a node daemon.
#[derive(Clone, Default)]
pub struct NodeParts {
    /// Host networking (ENI routes and rules, SNAT): `None` leaves the host alone (the
    /// embedded simulator's ENIs do not exist on this host).
    pub host: Option<Arc<dyn NodeHost>>,
    /// The Kubernetes API (own Node, ENIConfig, pod annotation, events), when reachable.
    pub k8s: Option<K8s>,
    /// The host verbs of security groups for pods (trunk link lookup, strict mode's local
    /// rule); required with `ENABLE_POD_ENI=true`.
    pub pod_eni_host: Option<Arc<dyn PodEniHost>>,
    /// When the process started (`awscni_ipamd_startup_duration_seconds`); `None`: when
    /// [`start_node`] is called.
    pub process_start: Option<Instant>,
}

impl std::fmt::Debug for NodeParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeParts")
            .field("host", &self.host.is_some())
            .field("k8s", &self.k8s)
            .field("pod_eni_host", &self.pod_eni_host.is_some())
            .finish()
    }
}

/// Reports pool and request events to the metrics and, when connected, to Kubernetes.
struct Reporter {
    metrics: Arc<Metrics>,
    k8s: Option<K8s>,
    annotate_pod_ip: bool,
    /// The pool manager, told of every request when the demand flavour runs (set once it
    /// exists; weak: the manager holds this reporter as its observer).
    pool: std::sync::OnceLock<std::sync::Weak<PoolManager>>,
}

impl Reporter {
    fn warn_event(&self, reason: &'static str, message: String) {
        if let Some(k) = self.k8s.clone() {
            tokio::spawn(async move {
                if let Err(e) = k.warn(reason, &message).await {
                    tracing::warn!(reason, error = %e, "Kubernetes event not recorded");
                }
            });
        }
    }
}

impl PoolObserver for Reporter {
    fn decision(&self, kind: crate::plan::pool::PoolDecision) {
        self.metrics.record_pool_decision(kind);
    }
    fn failed(&self, function: &'static str) {
        self.metrics
            .ipamd_error_count
            .with_label_values(&[function])
            .inc();
    }
    fn action_started(&self, action: &'static str) {
        self.metrics
            .ipamd_action_inprogress
            .with_label_values(&[action])
            .inc();
    }
    fn action_finished(&self, action: &'static str) {
        self.metrics
            .ipamd_action_inprogress
            .with_label_values(&[action])
            .dec();
    }
    fn below_target(&self, at: tokio::time::Instant) {
        self.metrics.pool_below_target(0, at.into_std());
    }
    fn on_target(&self, at: tokio::time::Instant) {
        self.metrics.pool_on_target(0, at.into_std());
    }
    fn subnet_exhausted(&self, subnet: &str, prefixes: bool) {
        let what = if prefixes {
            "no free aligned /28 prefix"
        } else {
            "no free address"
        };
        self.warn_event(
            crate::io::k8s::REASON_SUBNET_EXHAUSTED,
            format!("subnet {subnet} has {what}: the warm pool stops growing for a while"),
        );
    }
    fn unauthorized(&self, action: &'static str, message: &str) {
        self.metrics
            .ipamd_error_count
            .with_label_values(&["missingIAMPermissions"])
            .inc();
        self.warn_event(
            crate::io::k8s::REASON_MISSING_IAM_PERMISSIONS,
            format!("ec2:{action} refused: {message}"),
        );
    }
}

impl BackendEvents for Reporter {
    fn requested(&self, key: &crate::store::datastore::IpamKey, served: bool) {
        if let Some(p) = self.pool.get().and_then(std::sync::Weak::upgrade) {
            p.note_request(&format!("{}/{}", key.container_id, key.if_name), served);
        }
    }
    fn add_request(&self) {
        self.metrics.add_ip_req_count.inc();
    }
    fn del_request(&self, reason: &str) {
        self.metrics
            .del_ip_req_count
            .with_label_values(&[reason])
            .inc();
    }
    fn no_available_ip(&self) {
        self.metrics.no_available_ip_addresses.inc();
    }
    fn assigned(&self, namespace: &str, name: &str, ip: std::net::IpAddr) {
        let Some(k) = self.k8s.clone().filter(|_| self.annotate_pod_ip) else {
            return;
        };
        if namespace.is_empty() || name.is_empty() {
            return;
        }
        let (ns, name) = (namespace.to_owned(), name.to_owned());
        tokio::spawn(async move {
            if let Err(e) = k.set_pod_ip_annotation(&ns, &name, &ip.to_string()).await {
                tracing::warn!(pod = %name, namespace = %ns, error = %e, "pod IP annotation not set");
            }
        });
    }
}

/// What the daemon runs against.
#[derive(Clone)]
pub struct Deps {
    /// EC2.
    pub ec2: Arc<dyn Ec2Api>,
    /// Instance metadata.
    pub imds: Arc<dyn Imds>,
    /// The host veths: read once for checkpoint normalisation, then on each orphan sweep
    /// ([`AllVethsPresent`] for harnesses that create none).
    pub veths: Arc<dyn VethProbe>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// Records every EC2 call's latency and outcome in the metrics.
struct MeteredEc2 {
    inner: Arc<dyn Ec2Api>,
    metrics: Arc<Metrics>,
}

impl MeteredEc2 {
    async fn rec<T>(
        &self,
        action: &'static str,
        f: impl Future<Output = Ec2Result<T>>,
    ) -> Ec2Result<T> {
        let start = Instant::now();
        let r = f.await;
        let outcome = match &r {
            Ok(_) => Ec2Outcome::Ok,
            Err(e) if e.kind == ErrorKind::Throttled => Ec2Outcome::Throttled { code: &e.code },
            Err(e) => Ec2Outcome::Failed { code: &e.code },
        };
        self.metrics
            .record_ec2_call(action, start.elapsed(), outcome);
        r
    }
}

#[async_trait::async_trait]
impl Ec2Api for MeteredEc2 {
    async fn describe_enis(&self, ids: &[String]) -> Ec2Result<Vec<EniInfo>> {
        self.rec("DescribeNetworkInterfaces", self.inner.describe_enis(ids))
            .await
    }
    async fn describe_leaked_candidates(
        &self,
        vpc_id: &str,
        cluster: Option<&str>,
    ) -> Ec2Result<Vec<EniInfo>> {
        self.rec(
            "DescribeNetworkInterfaces",
            self.inner.describe_leaked_candidates(vpc_id, cluster),
        )
        .await
    }
    async fn used_device_indexes(&self, instance_id: &str) -> Ec2Result<Vec<(u32, u32)>> {
        self.rec(
            "DescribeInstances",
            self.inner.used_device_indexes(instance_id),
        )
        .await
    }
    async fn describe_instance_type(&self, t: &str) -> Ec2Result<InstanceTypeInfo> {
        self.rec(
            "DescribeInstanceTypes",
            self.inner.describe_instance_type(t),
        )
        .await
    }
    async fn describe_subnets(&self, vpc_id: &str, az: &str) -> Ec2Result<Vec<SubnetInfo>> {
        self.rec("DescribeSubnets", self.inner.describe_subnets(vpc_id, az))
            .await
    }
    async fn create_eni(&self, req: &CreateEni) -> Ec2Result<EniInfo> {
        self.rec("CreateNetworkInterface", self.inner.create_eni(req))
            .await
    }
    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> Ec2Result<String> {
        self.rec(
            "AttachNetworkInterface",
            self.inner
                .attach_eni(eni_id, instance_id, device_index, network_card),
        )
        .await
    }
    async fn set_delete_on_termination(&self, eni_id: &str, att: &str) -> Ec2Result<()> {
        self.rec(
            "ModifyNetworkInterfaceAttribute",
            self.inner.set_delete_on_termination(eni_id, att),
        )
        .await
    }
    async fn detach_eni(&self, attachment_id: &str) -> Ec2Result<()> {
        self.rec(
            "DetachNetworkInterface",
            self.inner.detach_eni(attachment_id),
        )
        .await
    }
    async fn delete_eni(&self, eni_id: &str) -> Ec2Result<()> {
        self.rec("DeleteNetworkInterface", self.inner.delete_eni(eni_id))
            .await
    }
    async fn assign(&self, eni_id: &str, what: Addresses) -> Ec2Result<Assigned> {
        self.rec("AssignPrivateIpAddresses", self.inner.assign(eni_id, what))
            .await
    }
    async fn unassign_ips(&self, eni_id: &str, ips: &[std::net::Ipv4Addr]) -> Ec2Result<()> {
        self.rec(
            "UnassignPrivateIpAddresses",
            self.inner.unassign_ips(eni_id, ips),
        )
        .await
    }
    async fn unassign_prefixes(&self, eni_id: &str, p: &[Ipv4Net]) -> Ec2Result<()> {
        self.rec(
            "UnassignPrivateIpAddresses",
            self.inner.unassign_prefixes(eni_id, p),
        )
        .await
    }
    async fn assign_ipv6_prefixes(
        &self,
        eni_id: &str,
        n: u32,
    ) -> Ec2Result<Vec<crate::types::Ipv6Net>> {
        self.rec(
            "AssignIpv6Addresses",
            self.inner.assign_ipv6_prefixes(eni_id, n),
        )
        .await
    }
    async fn unassign_ipv6_prefixes(
        &self,
        eni_id: &str,
        p: &[crate::types::Ipv6Net],
    ) -> Ec2Result<()> {
        self.rec(
            "UnassignIpv6Addresses",
            self.inner.unassign_ipv6_prefixes(eni_id, p),
        )
        .await
    }
    async fn create_tags(&self, resource: &str, tags: &BTreeMap<String, String>) -> Ec2Result<()> {
        self.rec("CreateTags", self.inner.create_tags(resource, tags))
            .await
    }
}

/// Instance limits: the calculator's table, else `DescribeInstanceTypes`.
async fn limits(
    instance_type: &str,
    ec2: &Arc<dyn Ec2Api>,
    pacer: &Pacer,
) -> Result<InstanceLimits, DaemonError> {
    if let Some(l) = Catalog::embedded().get(instance_type) {
        return Ok(l.clone());
    }
    let t = instance_type.to_owned();
    let info = pacer
        .call("DescribeInstanceTypes", || {
            let (ec2, t) = (ec2.clone(), t.clone());
            async move { ec2.describe_instance_type(&t).await }
        })
        .await
        .map_err(|source| DaemonError::Ec2 {
            step: "instance type limits",
            source,
        })?;
    tracing::info!(
        instance_type,
        "limits from DescribeInstanceTypes (not in the table)"
    );
    Ok(InstanceLimits {
        instance_type: instance_type.to_owned(),
        vcpus: 0,
        hypervisor: match info.hypervisor.as_str() {
            "nitro" => Hypervisor::Nitro,
            "xen" => Hypervisor::Xen,
            _ => Hypervisor::None,
        },
        bare_metal: info.bare_metal,
        network_cards: 1,
        default_card: 0,
        max_enis: info.max_enis,
        max_enis_total: info.max_enis,
        ipv4_per_eni: info.ipv4_per_eni,
        ipv6_per_eni: 0,
    })
}

/// Spec 5.5: unmanaged iff `no_manage=true`; else managed when tagged with this instance, or
/// untagged and `MANAGE_UNTAGGED_ENI`. The primary ENI is always managed.
pub fn is_managed(eni: &EniInfo, primary: bool, instance_id: &str, manage_untagged: bool) -> bool {
    if primary {
        return true;
    }
    if let Some(v) = eni.tags.get(TAG_NO_MANAGE) {
        return v != "true";
    }
    match eni.tags.get(TAG_INSTANCE_ID) {
        Some(owner) => owner == instance_id,
        None => manage_untagged,
    }
}

/// The datastore as the introspection endpoints show it.
struct View<F: Family = V4> {
    state: Arc<PoolState<F>>,
    cfg: Config,
}

fn go_time(d: Duration) -> Option<SystemTime> {
    (!d.is_zero()).then(|| SystemTime::UNIX_EPOCH + d)
}

impl<F: Family> IntrospectSource for View<F> {
    async fn enis(&self) -> BTreeMap<u32, EniInfos> {
        let ds = self.state.lock();
        let totals = ds.totals();
        let mut infos = EniInfos {
            total_ips: totals.total as i64,
            assigned_ips: totals.assigned as i64,
            enis: BTreeMap::new(),
        };
        for (id, e) in ds.enis() {
            let cidrs = e
                .cidrs
                .values()
                .map(|c| {
                    let addresses = c
                        .addresses
                        .iter()
                        .map(|(ip, a)| {
                            (
                                ip.to_string(),
                                introspect::AddressInfo {
                                    address: ip.to_string(),
                                    ipam_key: introspect::IpamKey {
                                        network_name: a
                                            .key
                                            .as_ref()
                                            .map(|k| k.network_name.clone())
                                            .unwrap_or_default(),
                                    },
                                    ipam_metadata: introspect::IpamMetadata {
                                        k8s_pod_namespace: a.metadata.pod_namespace.clone(),
                                        k8s_pod_name: a.metadata.pod_name.clone(),
                                        interfaces_count: i64::from(a.metadata.interfaces_count),
                                    },
                                    assigned_time: go_time(a.assigned_at),
                                    unassigned_time: a.unassigned_at.and_then(go_time),
                                },
                            )
                        })
                        .collect();
                    (
                        c.cidr.to_string(),
                        introspect::CidrInfo {
                            cidr: {
                                let (addr, prefix_len) = F::net_parts(&c.cidr);
                                introspect::IpNet { addr, prefix_len }
                            },
                            ip_addresses: addresses,
                            is_prefix: c.is_prefix,
                            address_family: String::new(),
                        },
                    )
                })
                .collect();
            // The reference keeps IPv6 /80s apart from the IPv4 CIDRs.
            let (available_ipv4_cidrs, ipv6_cidrs) = if F::IS_V6 {
                (BTreeMap::new(), cidrs)
            } else {
                (cidrs, BTreeMap::new())
            };
            infos.enis.insert(
                id.clone(),
                introspect::EniInfo {
                    id: id.clone(),
                    is_primary: e.is_primary,
                    is_trunk: e.is_trunk,
                    is_efa: e.is_efa,
                    device_number: i64::from(e.device_number),
                    available_ipv4_cidrs,
                    ipv6_cidrs,
                    is_excluded_for_pod_ips: e.excluded,
                    route_table_id: i64::from(e.route_table_id),
                    subnet_id: e.subnet_id.clone(),
                },
            );
        }
        BTreeMap::from([(0, infos)])
    }

    async fn eni_config_name(&self) -> Option<String> {
        // Without the Kubernetes API the node cannot be read: answered with 404.
        None
    }

    fn ipamd_env_settings(&self) -> introspect::IpamdEnvSettings {
        introspect::IpamdEnvSettings {
            warm_ip_target: i64::from(self.cfg.warm_ip_target),
            warm_eni_target: i64::from(self.cfg.warm_eni_target),
            custom_network_cfg: self.cfg.custom_networking,
            manage_enis_non_schedulable: self.cfg.manage_enis_non_schedulable,
            enable_subnet_discovery: self.cfg.subnet_discovery,
        }
    }

    fn networkutils_env_settings(&self) -> introspect::NetworkUtilsEnvSettings {
        let s = |v: &[Ipv4Net]| v.iter().map(ToString::to_string).collect();
        introspect::NetworkUtilsEnvSettings {
            connmark: self.cfg.connmark,
            exclude_snat_cidrs: s(&self.cfg.exclude_snat_cidrs),
            external_snat: self.cfg.external_snat,
            external_service_cidrs: s(&self.cfg.external_service_cidrs),
            eni_mtu: i64::from(self.cfg.eni_mtu),
            ..Default::default()
        }
    }
}

/// A started daemon.
pub struct Daemon {
    state: Arc<PoolState>,
    pool: Arc<PoolManager>,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    introspection_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    with_api_server: bool,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("metrics_addr", &self.metrics_addr)
            .field("introspection_addr", &self.introspection_addr)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// The shared pool state.
    pub fn state(&self) -> &Arc<PoolState> {
        &self.state
    }

    /// The pool manager.
    pub fn pool(&self) -> &Arc<PoolManager> {
        &self.pool
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `/metrics` is served (when enabled).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the introspection endpoints are served (TCP, when enabled).
    pub fn introspection_addr(&self) -> Option<SocketAddr> {
        self.introspection_addr
    }

    /// SIGTERM: no more allocation or freeing; gRPC keeps serving.
    pub fn terminate(&self) {
        tracing::info!("terminating: no new IP or ENI allocation, no ENI freeing; still serving");
        self.state.set_terminating();
    }

    /// Stops every server and the pool loop, and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("stopped");
    }
}

fn serve_err(what: &'static str) -> impl Fn(String) -> DaemonError {
    move |message| DaemonError::Serve { what, message }
}

/// Starts the daemon without host networking or Kubernetes (see [`start_node`]).
pub async fn start(cfg: &Config, deps: Deps) -> Result<Daemon, DaemonError> {
    start_node(cfg, deps, NodeParts::default()).await
}

/// Starts the daemon: the start-up sequence, then every server, the pool loop, reconcile and
/// leaked-ENI cleanup.
pub async fn start_node(cfg: &Config, deps: Deps, parts: NodeParts) -> Result<Daemon, DaemonError> {
    if cfg.enable_ipv6 {
        return Err(DaemonError::Unsupported(
            "ENABLE_IPv6=true: IPv6 mode starts with daemon::start_v6".into(),
        ));
    }
    let process_start = parts.process_start.unwrap_or_else(Instant::now);
    let metrics = Arc::new(Metrics::new().map_err(|e| serve_err("metrics")(e.to_string()))?);
    timed_start(&metrics.clone(), process_start, async move {
        let d = start_inner(cfg, deps, parts, metrics).await?;
        let api = d.with_api_server;
        Ok((d, api))
    })
    .await
}

async fn start_inner(
    cfg: &Config,
    deps: Deps,
    parts: NodeParts,
    metrics: Arc<Metrics>,
) -> Result<Daemon, DaemonError> {
    let _init = metrics.in_progress("nodeInit");
    let ec2: Arc<dyn Ec2Api> = Arc::new(MeteredEc2 {
        inner: deps.ec2.clone(),
        metrics: metrics.clone(),
    });
    let pacer = Arc::new(Pacer::new(cfg.ec2));
    let k8s = parts.k8s.clone();
    if k8s.is_none() {
        let needs = crate::io::k8s::api_server_needed_by(
            cfg.custom_networking,
            cfg.annotate_pod_ip,
            cfg.enable_pod_eni,
        );
        if !needs.is_empty() {
            return Err(DaemonError::CustomNetworking(format!(
                "{} need the Kubernetes API server, which is not connected",
                needs.join(", ")
            )));
        }
        tracing::info!("running without the Kubernetes API: no enabled feature needs it (max pods from the instance limits, no events)");
    }
    let pod_eni_host = match (&parts.pod_eni_host, cfg.enable_pod_eni) {
        (Some(h), true) => Some(h.clone()),
        (None, true) => {
            return Err(DaemonError::Unsupported(
                "ENABLE_POD_ENI=true needs the host link lookup (NodeParts::pod_eni_host)".into(),
            ))
        }
        (_, false) => None,
    };
    let node_k8s = match &k8s {
        Some(k) => match k.node_info().await {
            Ok(n) => Some(n),
            Err(e) if cfg.custom_networking => {
                return Err(DaemonError::CustomNetworking(format!(
                    "cannot read the own Node: {e}"
                )))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the own Node: max pods from the instance limits");
                None
            }
        },
        None => None,
    };

    // 1. Identity and limits.
    let id = deps.imds.identity().await?;
    tracing::info!(instance = %id.instance_id, instance_type = %id.instance_type, region = %id.region, az = %id.availability_zone, "instance");
    let lim = limits(&id.instance_type, &ec2, &pacer).await?;
    let prefix_mode = cfg.prefix_delegation && lim.supports_prefix_delegation();
    if cfg.prefix_delegation && !prefix_mode {
        tracing::warn!(instance_type = %id.instance_type, "prefix delegation needs a Nitro instance: using secondary IPs");
    }

    // 2. ENIs from metadata and EC2; managed or not by tags.
    let imds_enis = deps.imds.enis(&id.primary_mac).await?;
    let ids: Vec<String> = imds_enis.iter().map(|e| e.interface_id.clone()).collect();
    let described = pacer
        .call("DescribeNetworkInterfaces", || {
            let (ec2, ids) = (ec2.clone(), ids.clone());
            async move { ec2.describe_enis(&ids).await }
        })
        .await
        .map_err(|source| DaemonError::Ec2 {
            step: "describe attached ENIs",
            source,
        })?;
    let by_id: BTreeMap<&str, &EniInfo> = described.iter().map(|e| (e.id.as_str(), e)).collect();
    let primary = imds_enis
        .iter()
        .find(|e| e.mac == id.primary_mac)
        .ok_or_else(|| ImdsError::Missing {
            path: format!("meta-data/network/interfaces/macs/{}/", id.primary_mac),
        })?
        .clone();
    let mut ds = DataStore::new(
        prefix_mode,
        cfg.rules.prefix_fallback,
        cfg.custom_networking,
        cfg.ip_cooldown,
    );
    let clock = Arc::new(TokioClock::new());
    let now = crate::store::commit::Clock::now(clock.as_ref());
    let tags = cfg.eni_tags(&id.instance_id);
    let mut unmanaged = 0u32;
    let mut host_enis: Vec<HostEni> = Vec::new();
    for m in &imds_enis {
        let is_primary = m.mac == id.primary_mac;
        let Some(info) = by_id.get(m.interface_id.as_str()) else {
            tracing::warn!(eni = %m.interface_id, "in instance metadata but not in EC2: skipped");
            continue;
        };
        if info.interface_type == "efa-only" || (m.network_card > 0 && !cfg.enable_multi_nic) {
            continue;
        }
        if !is_managed(info, is_primary, &id.instance_id, cfg.manage_untagged_eni) {
            tracing::info!(eni = %m.interface_id, "unmanaged ENI");
            unmanaged += 1;
            continue;
        }
        let is_trunk = info.interface_type == "trunk";
        // Tag managed ENIs with what is missing (not trunk, not without provisioning).
        let missing: BTreeMap<String, String> = tags
            .iter()
            .filter(|(k, v)| info.tags.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !missing.is_empty() && !is_trunk && !cfg.disable_provisioning {
            let eni = m.interface_id.clone();
            pacer
                .call("CreateTags", || {
                    let (ec2, eni, t) = (ec2.clone(), eni.clone(), missing.clone());
                    async move { ec2.create_tags(&eni, &t).await }
                })
                .await
                .map_err(|source| DaemonError::Ec2 {
                    step: "tag ENI",
                    source,
                })?;
        }
        ds.add_eni(
            EniSpec {
                id: m.interface_id.clone(),
                mac: m.mac.clone(),
                is_primary,
                is_trunk,
                is_efa: info.interface_type == "efa",
                device_number: m.device_number,
                primary_ip: info
                    .primary_ip
                    .or(m.primary_ip())
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                subnet_id: m.subnet_id.clone(),
                subnet_cidr: m.subnet_cidr,
                // Custom networking: pods never get addresses from the primary ENI.
                excluded: is_primary && cfg.custom_networking,
            },
            now,
        );
        host_enis.push(HostEni {
            id: m.interface_id.clone(),
            mac: m.mac.clone(),
            primary_ip: info
                .primary_ip
                .or(m.primary_ip())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            subnet_cidr: m.subnet_cidr,
            network_card: m.network_card,
            device_number: m.device_number,
            is_trunk,
        });
        // EC2 is the judge when metadata lags.
        for ip in &info.secondary_ips {
            let _ = ds.add_cidr(&m.interface_id, Ipv4Net::host(*ip), false);
        }
        for p in &info.prefixes {
            let _ = ds.add_cidr(&m.interface_id, *p, true);
        }
    }

    // 3. Checkpoint restore with normalisation.
    let veths_now = deps.veths.snapshot().await.map_err(DaemonError::Veths)?;
    let store = restore_checkpoint(cfg, &mut ds, &veths_now)?;
    let restored_ips: Vec<std::net::Ipv4Addr> = ds
        .enis()
        .values()
        .flat_map(|e| e.cidrs.values())
        .flat_map(|c| c.addresses.iter())
        .filter(|(_, a)| a.key.is_some())
        .map(|(ip, _)| *ip)
        .collect();
    let state = Arc::new(PoolState::new(ds, Box::new(store), clock));
    state.mutate_and_save(|_| ()).await?;

    // Host networking: primary MTU, SNAT rules, every secondary ENI; then the restored pods'
    // rules normalised.
    if let Some(h) = &parts.host {
        let primary_host = host_enis
            .iter()
            .find(|e| e.is_primary())
            .cloned()
            .ok_or_else(|| ImdsError::Missing {
                path: format!("meta-data/network/interfaces/macs/{}/", id.primary_mac),
            })?;
        let wiring = h
            .setup_node(cfg, &primary_host, &primary.vpc_cidrs, &host_enis)
            .await
            .map_err(DaemonError::Host)?;
        tracing::info!(primary = %wiring.primary_if, secondary = wiring.wired.len(), "host networking set up");
        let n = h
            .normalize_pod_rules(&restored_ips)
            .await
            .map_err(DaemonError::Host)?;
        if n > 0 {
            tracing::info!(pods = n, "restored pods' rules normalised");
        }
        // Strict security groups for pods: node-bound traffic of branch pods must leave
        // through their branch ENI, so the local table is looked up after the plugin's
        // `iif vlan...` rules at 10.
        if let (Some(p), crate::config::PodSgMode::Strict) = (&pod_eni_host, cfg.pod_sg_mode) {
            p.move_local_rule().await.map_err(DaemonError::Host)?;
        }
    }

    // Custom networking: new ENIs go to the node's ENIConfig subnet and security groups.
    let mut eni_subnet = (primary.subnet_id.clone(), primary.subnet_cidr);
    let mut eni_groups = {
        let mut g = primary.security_groups.clone();
        g.sort();
        g
    };
    if cfg.custom_networking {
        let k = k8s.as_ref().ok_or_else(|| {
            DaemonError::CustomNetworking("the Kubernetes API is not connected".into())
        })?;
        let (name, spec) = k
            .node_eni_config()
            .await
            .map_err(|e| DaemonError::CustomNetworking(e.to_string()))?;
        let subnets = pacer
            .call("DescribeSubnets", || {
                let (ec2, vpc, az) = (
                    ec2.clone(),
                    primary.vpc_id.clone(),
                    id.availability_zone.clone(),
                );
                async move { ec2.describe_subnets(&vpc, &az).await }
            })
            .await
            .map_err(|source| DaemonError::Ec2 {
                step: "ENIConfig subnet",
                source,
            })?;
        let subnet = subnets
            .iter()
            .find(|s| s.id == spec.subnet)
            .ok_or_else(|| {
                DaemonError::CustomNetworking(format!(
                    "ENIConfig {name}: subnet {} is not in VPC {} and zone {}",
                    spec.subnet, primary.vpc_id, id.availability_zone
                ))
            })?;
        eni_subnet = (subnet.id.clone(), subnet.cidr);
        if let Some(g) = spec.security_groups.filter(|g| !g.is_empty()) {
            eni_groups = g;
            eni_groups.sort();
        }
        tracing::info!(eni_config = %name, subnet = %subnet.id, "custom networking");
    }

    // 4. Pool manager and pre-scaling.
    let max_pods = node_k8s.as_ref().and_then(|n| n.max_pods);
    if let Some(m) = max_pods {
        tracing::info!(max_pods = m, "kubelet max pods caps the pool");
    }
    let node_limits = NodeLimits::new(&lim, cfg.max_eni, max_pods);
    // Unknown types count as trunking compatible (the VPC resource controller's default).
    let trunking_compatible =
        subnet_calc::limits::trunk_limits(&id.instance_type).is_none_or(|t| t.trunking_compatible);
    let pool_cfg = cfg.pool_config(prefix_mode);
    let reporter = Arc::new(Reporter {
        metrics: metrics.clone(),
        k8s: k8s.clone(),
        annotate_pod_ip: cfg.annotate_pod_ip,
        pool: std::sync::OnceLock::new(),
    });
    let mut pool = PoolManager::new(
        state.clone(),
        ec2.clone(),
        pool_cfg,
        node_limits,
        NodeInfo {
            instance_id: id.instance_id.clone(),
            subnet_id: eni_subnet.0,
            subnet_cidr: eni_subnet.1,
            security_groups: eni_groups,
            discovery: (cfg.subnet_discovery && !cfg.custom_networking).then(|| SubnetDiscovery {
                vpc_id: primary.vpc_id.clone(),
                availability_zone: id.availability_zone.clone(),
                cluster: cfg.cluster_name.clone(),
            }),
            tags,
            unmanaged_enis: unmanaged,
        },
        pacer.clone(),
        cfg.pool_tick,
    )
    .with_observer(reporter.clone())
    .with_trunk_slot(cfg.enable_pod_eni && trunking_compatible);
    if let Some(h) = &parts.host {
        pool = pool.with_host(PoolHost {
            host: h.clone(),
            mtu: cfg.eni_mtu,
            link_wait: cfg.eni_link_wait,
        });
    }
    if let Some(settings) = cfg.demand {
        let path = demand_path(cfg);
        let state_now = crate::store::commit::Clock::now(state.clock().as_ref());
        let (used, times) = {
            let ds = state.lock();
            let used = crate::plan::pool::in_use(&crate::plan::pool::PoolView::of(&ds, state_now));
            let times: Vec<Duration> = ds
                .enis()
                .values()
                .flat_map(|e| e.cidrs.values())
                .flat_map(|c| c.addresses.values())
                .filter(|a| a.key.is_some())
                .map(|a| a.assigned_at)
                .collect();
            (used, times)
        };
        let saved = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<subnet_calc::policy::DemandState>(&b).ok());
        let history = match saved {
            Some(s) => {
                tracing::info!(path = %path.display(), "demand history restored");
                s.restore(&settings, state_now, used)
            }
            None => {
                tracing::info!(
                    pods = times.len(),
                    "demand history rebuilt from the checkpoint"
                );
                subnet_calc::policy::DemandState::rebuild(&settings, state_now, times, used)
            }
        };
        pool = pool.with_demand(settings, history).with_demand_file(path);
    }
    let pool = Arc::new(pool);
    if cfg.demand.is_some() {
        // Only the demand flavour keeps a request history: without it an ADD costs no lock
        // or allocation here.
        let _ = reporter.pool.set(Arc::downgrade(&pool));
    }
    if let Some(n) = &node_k8s {
        pool.set_cordon_paused(n.unschedulable && !cfg.manage_enis_non_schedulable);
    }
    metrics
        .eni_max
        .set(i64::from(node_limits.max_enis.saturating_sub(unmanaged)));
    metrics.ip_max.set(i64::from(
        node_limits.ips_per_eni(prefix_mode) * node_limits.max_enis.saturating_sub(unmanaged),
    ));
    // Security groups for pods: ask the VPC resource controller for a trunk ENI (nodeInit's
    // last step; reconcile repeats it until the trunk is there).
    let trunk_request = match (&k8s, cfg.enable_pod_eni) {
        (Some(k), true) => {
            let t = TrunkRequest {
                k8s: k.clone(),
                max_enis: node_limits.max_enis,
                unmanaged,
                metrics: metrics.clone(),
            };
            t.try_enable(&state).await;
            Some(t)
        }
        _ => None,
    };
    if !cfg.disable_provisioning {
        // An ENI created by an earlier run that was killed before attaching it (or after
        // detaching it, before the delete) is ours alone: delete it before growing.
        match crate::run::reconcile::cleanup_own_leftovers(
            ec2.as_ref(),
            &pacer,
            &primary.vpc_id,
            Some(cfg.cluster_name.as_str()),
            &id.instance_id,
        )
        .await
        {
            Ok(r) if !r.errors.is_empty() => {
                tracing::warn!(deleted = ?r.deleted, errors = r.errors.len(), "own leftover ENIs: some not deleted (the hourly cleanup retries)")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "own leftover ENIs: EC2 unavailable (the hourly cleanup retries)")
            }
        }
        // A failure here is not fatal: the pool loop tries again every tick, and the
        // addresses already on the ENIs can be served meanwhile.
        match pool.settle().await {
            Ok(out) => tracing::info!(reason = ?out.decision.reason, "pre-scaling done"),
            Err(e) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "pre-scaling incomplete; the pool loop keeps trying")
            }
        }
    }

    // 5. Serving.
    let backend = Backend::new(
        state.clone(),
        ReplySettings {
            vpc_cidrs: primary.vpc_cidrs.iter().map(ToString::to_string).collect(),
            vpc_v6_cidrs: Vec::new(),
            external_snat: cfg.external_snat,
            network_policy_mode: cfg.network_policy_mode.clone(),
            node_ip: id.local_ipv4.to_string(),
            node_ipv6: String::new(),
            instance_id: id.instance_id.clone(),
            region: id.region.clone(),
        },
    )
    .with_low_check(if cfg.demand.is_some() {
        // The demand flavour's target lives in the pool manager's planner.
        let pool = pool.clone();
        Arc::new(move |_: &PoolState| pool.is_low())
    } else {
        crate::serve::grpc::pool_is_low(pool_cfg, node_limits)
    })
    .with_events(reporter.clone());
    let backend = match (&k8s, &pod_eni_host) {
        (Some(k), Some(h)) => backend.with_pod_eni(crate::serve::grpc::PodEniSupport {
            k8s: k.clone(),
            host: h.clone(),
        }),
        _ => backend,
    };
    let Serving {
        metrics_addr,
        introspection_addr,
        shutdown,
        rx,
        mut tasks,
    } = serve(cfg, &state, backend, &metrics).await?;
    // Reconcile with instance metadata and EC2.
    {
        let r = Reconciler {
            state: state.clone(),
            pool: pool.clone(),
            ec2: ec2.clone(),
            pacer: pacer.clone(),
            imds: deps.imds.clone(),
            primary_mac: id.primary_mac.clone(),
            settings: crate::plan::reconcile::ReconcileSettings::from_config(cfg, &id.instance_id),
            host: parts.host.clone(),
            mtu: cfg.eni_mtu,
            metrics: metrics.clone(),
            k8s: k8s.clone(),
            manage_non_schedulable: cfg.manage_enis_non_schedulable,
            trunk_request,
            pool_tick: cfg.pool_tick,
        };
        let (period, rx) = (cfg.reconcile_interval, rx.clone());
        tasks.push(tokio::spawn(async move { r.run(period, rx).await }));
    }
    if let Some(t) = orphan_sweep(cfg, &state, &deps, &metrics, &rx) {
        tasks.push(t);
    }
    if !cfg.disable_leaked_eni_cleanup && !cfg.disable_provisioning {
        let (ec2, pacer, rx) = (ec2.clone(), pacer.clone(), rx.clone());
        let (vpc, cluster) = (primary.vpc_id.clone(), cfg.cluster_name.clone());
        let first = cfg.leaked_eni_first_delay.unwrap_or_else(|| {
            // The reference's random 0–300 s, so that a fleet does not describe at once.
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            Duration::from_millis(u64::from(nanos) % 300_000)
        });
        let every = cfg.leaked_eni_interval;
        tasks.push(tokio::spawn(async move {
            leaked_eni_loop(ec2, pacer, vpc, cluster, first, every, rx).await;
        }));
    }
    if !cfg.disable_provisioning {
        tasks.push(tokio::spawn(pool.clone().run(rx)));
    } else {
        tracing::info!("DISABLE_NETWORK_RESOURCE_PROVISIONING: no pool manager");
    }
    Ok(Daemon {
        state,
        pool,
        metrics,
        metrics_addr,
        introspection_addr,
        shutdown,
        tasks,
        with_api_server: k8s.is_some(),
    })
}

/// The orphan sweep's task (`None` when `VPC_CNI_ORPHAN_SWEEP` is off), at the reconcile
/// period.
fn orphan_sweep<F: Family>(
    cfg: &Config,
    state: &Arc<PoolState<F>>,
    deps: &Deps,
    metrics: &Metrics,
    rx: &watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    if !cfg.orphan_sweep {
        tracing::info!("orphan sweep off (VPC_CNI_ORPHAN_SWEEP=false)");
        return None;
    }
    let sweep =
        crate::run::orphans::OrphanSweep::new(state.clone(), deps.veths.clone(), cfg.orphan_grace)
            .with_counter(metrics.orphaned_ips_released.clone());
    let (period, rx) = (cfg.reconcile_interval, rx.clone());
    Some(tokio::spawn(sweep.run(period, rx)))
}

/// Where the demand flavour keeps its request history: beside the checkpoint.
pub fn demand_path(cfg: &Config) -> std::path::PathBuf {
    cfg.checkpoint_path(0).with_file_name("ipamd-demand.json")
}

/// Opens the checkpoint (removing a crashed write's temporary files) and restores it over
/// the ENIs and CIDRs already in `ds`, dropping pods whose host veth is gone.
fn restore_checkpoint<F: Family>(
    cfg: &Config,
    ds: &mut DataStore<F>,
    veth_exists: &VethCheck,
) -> Result<FileStore, DaemonError> {
    let store = FileStore::new(cfg.checkpoint_path(0));
    let stale = store.remove_stale_temps();
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed temporary checkpoint files of a write that was interrupted"
        );
    }
    if let Some(file) = store.read()? {
        let report = ds
            .restore(&file, veth_exists.as_ref())
            .map_err(DaemonError::Restore)?;
        tracing::info!(
            restored = report.restored,
            dropped_stale = report.dropped_stale.len(),
            dropped_unknown = report.dropped_unknown.len(),
            "checkpoint restored"
        );
    }
    Ok(store)
}

/// Runs `start` (a mode's start-up) and records its initialisation and start-up durations;
/// `start` answers the daemon and whether the Kubernetes API is connected.
async fn timed_start<D, Fut>(
    metrics: &Metrics,
    process_start: Instant,
    start: Fut,
) -> Result<D, DaemonError>
where
    Fut: std::future::Future<Output = Result<(D, bool), DaemonError>>,
{
    let init_start = Instant::now();
    let res = start.await;
    let ok = if res.is_ok() { "true" } else { "false" };
    metrics
        .ipamd_node_initialization_duration_seconds
        .with_label_values(&[ok])
        .observe(init_start.elapsed().as_secs_f64());
    let (with_api, reason) = match &res {
        Ok((_, api)) => (*api, ""),
        Err(_) => (false, "node_initialization"),
    };
    metrics
        .ipamd_startup_duration_seconds
        .with_label_values(&[ok, if with_api { "true" } else { "false" }, reason])
        .observe(process_start.elapsed().as_secs_f64());
    res.map(|(d, _)| d)
}

/// The servers of every mode, started in the reference's order: gRPC (health SERVING once
/// it listens), metrics, introspection, and the pool gauges refreshed every second.
struct Serving {
    metrics_addr: Option<SocketAddr>,
    introspection_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    rx: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

async fn serve<F: Family>(
    cfg: &Config,
    state: &Arc<PoolState<F>>,
    backend: Backend<F>,
    metrics: &Arc<Metrics>,
) -> Result<Serving, DaemonError> {
    let (shutdown, rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut tasks = Vec::new();
    let limits = cfg.grpc_limits;
    let (health, health_srv) =
        vpc_cni_rpc::health_service_with_limit(limits.max_message_bytes).await;
    let listener = vpc_cni_rpc::bind_unix(&cfg.grpc_socket)
        .map_err(|e| serve_err("gRPC")(format!("{}: {e}", cfg.grpc_socket.display())))?;
    let routes =
        crate::serve::grpc::routes_with_limit(backend, health_srv, limits.max_message_bytes);
    let sd = stopped(rx.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = vpc_cni_rpc::serve_listener_with(listener, routes, limits, sd).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));
    health.set_serving().await;
    tracing::info!(socket = %cfg.grpc_socket.display(), "gRPC serving (health SERVING)");

    let mut metrics_addr = None;
    if !cfg.disable_metrics {
        let addr = crate::serve::metrics::parse_bind_address(&cfg.metrics_bind)
            .map_err(|e| serve_err("metrics")(e.to_string()))?;
        let srv = crate::serve::metrics::MetricsServer::bind(addr)
            .await
            .map_err(|e| serve_err("metrics")(e.to_string()))?;
        metrics_addr = srv.local_addr();
        tracing::info!(addr = ?metrics_addr, "serving Prometheus metrics");
        let (reg, sd) = (metrics.registry().clone(), stopped(rx.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = srv.run(reg, sd).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        }));
    }
    let mut introspection_addr = None;
    if !cfg.disable_introspection {
        let srv = introspect::IntrospectServer::bind(&cfg.introspection_bind)
            .await
            .map_err(|e| serve_err("introspection")(e.to_string()))?;
        introspection_addr = srv.local_addr();
        tracing::info!(bind = %cfg.introspection_bind, addr = ?introspection_addr, "serving introspection");
        let view = Arc::new(View {
            state: state.clone(),
            cfg: cfg.clone(),
        });
        let sd = stopped(rx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = srv.run(view, sd).await {
                tracing::error!(error = %e, "introspection server failed");
            }
        }));
    }

    // Pool gauges, refreshed every second.
    {
        let (state, metrics, mut rx) = (state.clone(), metrics.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut published = Published::default();
            loop {
                publish_pool(&state, &metrics, &mut published);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = rx.changed() => return,
                }
            }
        }));
    }
    Ok(Serving {
        metrics_addr,
        introspection_addr,
        shutdown,
        rx,
        tasks,
    })
}

/// The periodic reconcile (spec 5.3): instance metadata against the datastore, EC2 as the
/// judge; adopted ENIs are wired on the host and evicted ones unwired.
struct Reconciler {
    state: Arc<PoolState>,
    pool: Arc<PoolManager>,
    ec2: Arc<dyn Ec2Api>,
    pacer: Arc<Pacer>,
    imds: Arc<dyn Imds>,
    primary_mac: String,
    settings: crate::plan::reconcile::ReconcileSettings,
    host: Option<Arc<dyn NodeHost>>,
    mtu: u32,
    metrics: Arc<Metrics>,
    k8s: Option<K8s>,
    manage_non_schedulable: bool,
    /// Security groups for pods on: the CNINode request for a trunk ENI.
    trunk_request: Option<TrunkRequest>,
    /// The pool loop's period: reconcile runs this often while a trunk ENI is awaited.
    pool_tick: Duration,
}

/// Asks the VPC resource controller for a trunk ENI (the reference's
/// `tryEnableSecurityGroupsForPods`): the `SecurityGroupsForPods` feature in the node's
/// CNINode, when the node has an ENI slot for it.
struct TrunkRequest {
    k8s: K8s,
    max_enis: u32,
    unmanaged: u32,
    metrics: Arc<Metrics>,
}

impl TrunkRequest {
    /// One attempt, unless the card-0 datastore already holds a trunk ENI. A failure (the
    /// CNINode not created yet, the API server away) is counted in
    /// `awscni_pod_eni_error_count{fn="tryEnableSecurityGroupsForPods"}` and retried by the
    /// next reconcile tick.
    async fn try_enable(&self, state: &PoolState) {
        let (enis, has_trunk) = {
            let ds = state.lock();
            (ds.enis().len(), ds.enis().values().any(|e| e.is_trunk))
        };
        if has_trunk {
            return;
        }
        if !crate::plan::pool::trunk_slot_free(enis, self.max_enis, self.unmanaged) {
            tracing::warn!(
                enis,
                max_enis = self.max_enis,
                unmanaged = self.unmanaged,
                "security groups for pods: no ENI slot left for a trunk ENI"
            );
            return;
        }
        match self
            .k8s
            .add_cni_node_feature(crate::io::k8s::FEATURE_SGP, "")
            .await
        {
            Ok(true) => tracing::info!(
                "CNINode: feature SecurityGroupsForPods added (the VPC resource controller attaches the trunk ENI)"
            ),
            Ok(false) => tracing::debug!("CNINode already lists SecurityGroupsForPods"),
            Err(e) => {
                self.metrics
                    .pod_eni_error_count
                    .with_label_values(&["tryEnableSecurityGroupsForPods"])
                    .inc();
                tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "CNINode: SecurityGroupsForPods not added yet; retried next tick");
            }
        }
    }
}

impl Reconciler {
    /// Whether a trunk ENI is awaited: security groups for pods on and none in the datastore.
    fn awaiting_trunk(&self) -> bool {
        self.trunk_request.is_some() && !self.state.lock().enis().values().any(|e| e.is_trunk)
    }

    async fn run(self, period: Duration, mut rx: watch::Receiver<bool>) {
        loop {
            // Spec 2.2: while a trunk ENI is awaited reconcile runs every pool tick, so the
            // trunk is found soon after the controller attaches it.
            let wait = if self.awaiting_trunk() {
                period.min(self.pool_tick)
            } else {
                period
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = rx.changed() => return,
            }
            if self.state.terminating() {
                continue;
            }
            if let Some(t) = &self.trunk_request {
                t.try_enable(&self.state).await;
            }
            // The Node's cordon taint, re-read each period (the reference re-reads it too).
            if let Some(k) = &self.k8s {
                match k.node_info().await {
                    Ok(n) => self
                        .pool
                        .set_cordon_paused(n.unschedulable && !self.manage_non_schedulable),
                    Err(e) => tracing::debug!(error = %e, "own Node not read; cordon state kept"),
                }
            }
            if let Err(e) = self.once().await {
                tracing::warn!(error = %e, "reconcile failed; next run in {period:?}");
            }
        }
    }

    /// One reconcile run.
    async fn once(&self) -> Result<crate::run::reconcile::ApplyReport, String> {
        let _busy = self.metrics.in_progress("nodeIPPoolReconcile");
        let enis = self
            .imds
            .enis(&self.primary_mac)
            .await
            .map_err(|e| format!("instance metadata: {e}"))?;
        let imds: Vec<crate::plan::reconcile::ImdsEni> = enis
            .iter()
            .map(|m| crate::plan::reconcile::ImdsEni {
                id: m.interface_id.clone(),
                mac: m.mac.clone(),
                device_number: m.device_number,
                network_card: m.network_card,
                subnet_id: m.subnet_id.clone(),
                subnet_cidr: Some(m.subnet_cidr),
                primary_ip: m.primary_ip(),
                secondary_ips: m.secondary_ips().to_vec(),
                prefixes: m.ipv4_prefixes.clone(),
            })
            .collect();
        let released = self.pool.recently_released();
        let freeing = self.pool.freeing_enis();
        let report = crate::run::reconcile::reconcile_once(
            &self.state,
            self.ec2.as_ref(),
            &self.pacer,
            &imds,
            &released,
            &freeing,
            &self.settings,
        )
        .await
        .map_err(|e| {
            self.metrics
                .ipamd_error_count
                .with_label_values(&["reconcileFailedGetENIs"])
                .inc();
            format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )
        })?;
        let m = &self.metrics;
        if !report.adopted.is_empty() {
            m.reconcile_count
                .with_label_values(&["eniReconcileAdd"])
                .inc_by(report.adopted.len() as u64);
        }
        if !report.evicted_enis.is_empty() {
            m.reconcile_count
                .with_label_values(&["eniReconcileDel"])
                .inc_by(report.evicted_enis.len() as u64);
            m.force_removed_enis
                .inc_by(report.evicted_enis.len() as u64);
        }
        if report.added_cidrs > 0 {
            m.reconcile_count
                .with_label_values(&["eniDataStorePoolReconcileAdd"])
                .inc_by(report.added_cidrs as u64);
        }
        if report.evicted_cidrs > 0 {
            m.reconcile_count
                .with_label_values(&["eniIPPoolReconcileDel"])
                .inc_by(report.evicted_cidrs as u64);
        }
        m.force_removed_ips.inc_by(report.lost_pods.len() as u64);
        if let Some(h) = &self.host {
            for e in &report.adopted {
                let he = adopted_host_eni(e);
                if he.is_primary() {
                    continue;
                }
                if let Err(err) = h.wire(&he, self.mtu).await {
                    tracing::warn!(eni = %e.id, error = %err, "adopted ENI not wired");
                }
            }
            for (eni, ip) in &report.evicted_enis {
                if let Err(err) = h.unwire(eni, *ip).await {
                    tracing::warn!(eni, error = %err, "rules of an evicted ENI not removed");
                }
            }
        }
        for e in &report.evicted_enis {
            m.remove_eni(&e.0);
        }
        Ok(report)
    }
}

/// Leaked-ENI cleanup: after `first` (the reference: a random 0–300 s), then every `every`
/// (an hour).
async fn leaked_eni_loop(
    ec2: Arc<dyn Ec2Api>,
    pacer: Arc<Pacer>,
    vpc: String,
    cluster: String,
    first: Duration,
    every: Duration,
    mut rx: watch::Receiver<bool>,
) {
    let mut wait = first;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = rx.changed() => return,
        }
        wait = every;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        match crate::run::reconcile::cleanup_leaked(
            ec2.as_ref(),
            &pacer,
            &vpc,
            Some(cluster.as_str()),
            now,
        )
        .await
        {
            Ok(r) => {
                if !r.deleted.is_empty() || !r.tagged.is_empty() || !r.errors.is_empty() {
                    tracing::info!(deleted = ?r.deleted, tagged = ?r.tagged, errors = r.errors.len(), "leaked-ENI cleanup");
                }
            }
            Err(e) => tracing::warn!(error = %e, "leaked-ENI cleanup: EC2 unavailable"),
        }
    }
}

/// The per-ENI and per-CIDR series published last (to delete those that went).
#[derive(Default)]
struct Published {
    enis: std::collections::BTreeSet<String>,
    cidrs: std::collections::BTreeSet<String>,
}

fn publish_pool<F: Family>(state: &PoolState<F>, metrics: &Metrics, published: &mut Published) {
    let now = state.now();
    let ds = state.lock();
    let t = ds.totals();
    let (_, views) = ds.views(now);
    let cooling: u64 = views.iter().map(|v| u64::from(v.cooling())).sum();
    metrics.set_pool(&PoolSnapshot {
        enis: t.enis as i64,
        total_ips: t.total as i64,
        assigned_ips: t.assigned as i64,
        cooldown_ips: cooling as i64,
        warm_ips: t.total.saturating_sub(t.assigned).saturating_sub(cooling) as i64,
        ipv4_prefixes: if F::IS_V6 { 0 } else { t.prefixes as i64 },
    });
    let mut now_published = Published::default();
    for (id, e) in ds.enis() {
        let mut on_eni = 0i64;
        for c in e.cidrs.values() {
            let n = c.addresses.values().filter(|a| a.key.is_some()).count() as i64;
            on_eni += n;
            let cidr = c.cidr.to_string();
            metrics.set_assigned_ip_per_cidr(&cidr, n);
            now_published.cidrs.insert(cidr);
        }
        metrics.set_assigned_ip_per_eni(id, on_eni);
        now_published.enis.insert(id.clone());
    }
    for gone in published.enis.difference(&now_published.enis) {
        metrics.remove_eni(gone);
    }
    for gone in published.cidrs.difference(&now_published.cidrs) {
        metrics.remove_cidr(gone);
    }
    *published = now_published;
}

/// What host wiring needs to know of an ENI that reconcile adopted.
fn adopted_host_eni(e: &AdoptedEni) -> HostEni {
    HostEni {
        id: e.id.clone(),
        mac: e.mac.clone(),
        primary_ip: e.primary_ip,
        subnet_cidr: e.subnet_cidr,
        network_card: e.network_card,
        device_number: e.device_number,
        is_trunk: e.is_trunk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eni(tags: &[(&str, &str)]) -> EniInfo {
        EniInfo {
            id: "eni-1".into(),
            mac: String::new(),
            subnet_id: String::new(),
            vpc_id: String::new(),
            status: "in-use".into(),
            description: String::new(),
            interface_type: "interface".into(),
            primary_ip: None,
            secondary_ips: vec![],
            prefixes: vec![],
            ipv6_prefixes: vec![],
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            security_groups: vec![],
            attachment: None,
        }
    }

    #[test]
    fn managed_follows_no_manage_then_owner_then_manage_untagged() {
        let me = "i-1";
        assert!(!is_managed(
            &eni(&[(TAG_NO_MANAGE, "true")]),
            false,
            me,
            true
        ));
        assert!(is_managed(&eni(&[(TAG_NO_MANAGE, "true")]), true, me, true));
        assert!(is_managed(
            &eni(&[(TAG_NO_MANAGE, "false")]),
            false,
            me,
            false
        ));
        assert!(is_managed(
            &eni(&[(TAG_INSTANCE_ID, "i-1")]),
            false,
            me,
            false
        ));
        assert!(!is_managed(
            &eni(&[(TAG_INSTANCE_ID, "i-2")]),
            false,
            me,
            true
        ));
        assert!(is_managed(&eni(&[]), false, me, true));
        assert!(!is_managed(&eni(&[]), false, me, false));
    }

    #[test]
    fn veth_check_matches_the_hash_suffix_whatever_the_prefix() {
        let hash = vpc_cni_net::names::pod_hash("default", "web-0", 0);
        let check = veth_check_from_names(vec!["lo".into(), format!("abcd{hash}")]);
        assert!(check("default", "web-0"));
        assert!(!check("default", "web-1"));
    }

    fn sgp_state(enis: &[(&str, bool)]) -> (PoolState, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = DataStore::new(false, false, false, Duration::from_secs(30));
        for (i, (id, trunk)) in enis.iter().enumerate() {
            ds.add_eni(
                EniSpec {
                    id: (*id).into(),
                    mac: format!("02:00:00:00:00:{i:02x}"),
                    is_primary: i == 0,
                    is_trunk: *trunk,
                    is_efa: false,
                    device_number: i as u32,
                    primary_ip: std::net::Ipv4Addr::new(10, 0, 0, 5 + i as u8),
                    subnet_id: "subnet-1".into(),
                    subnet_cidr: "10.0.0.0/24".parse().unwrap(),
                    excluded: false,
                },
                Duration::ZERO,
            );
        }
        let st = PoolState::new(
            ds,
            Box::new(FileStore::new(dir.path().join("ipam.json"))),
            Arc::new(TokioClock::new()),
        );
        (st, dir)
    }

    /// The CNINode request: made only while no trunk is known and an ENI slot is free; a
    /// missing CNINode is counted in `awscni_pod_eni_error_count` and retried next time.
    #[tokio::test]
    async fn the_trunk_request_waits_for_a_slot_and_counts_failures() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let k8s = K8s::new(
            kube::Client::new(service, "default"),
            "node-1",
            "aws-node",
            "kube-system",
        );
        let metrics = Arc::new(Metrics::new().unwrap());
        let t = TrunkRequest {
            k8s,
            max_enis: 3,
            unmanaged: 0,
            metrics: metrics.clone(),
        };
        let errors = || {
            metrics
                .pod_eni_error_count
                .with_label_values(&["tryEnableSecurityGroupsForPods"])
                .get()
        };
        // A slot is free: the CNINode is read; it does not exist yet.
        let (room, _d1) = sgp_state(&[("eni-0", false), ("eni-1", false)]);
        let server = async {
            let (req, send) = api.next_request().await.expect("CNINode GET");
            assert_eq!(req.method(), "GET");
            assert_eq!(
                req.uri().path(),
                "/apis/vpcresources.k8s.aws/v1alpha1/cninodes/node-1"
            );
            let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
            send.send_response(
                Response::builder()
                    .status(404)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        };
        tokio::join!(t.try_enable(&room), server);
        assert_eq!(errors(), 1);
        // No slot left, or a trunk already there: no request at all.
        let (full, _d2) = sgp_state(&[("eni-0", false), ("eni-1", false), ("eni-2", false)]);
        let quick = Duration::from_secs(5);
        tokio::time::timeout(quick, t.try_enable(&full))
            .await
            .expect("no request is made without a slot");
        let (trunked, _d3) = sgp_state(&[("eni-0", false), ("eni-t", true)]);
        tokio::time::timeout(quick, t.try_enable(&trunked))
            .await
            .expect("no request is made once the trunk is there");
        drop(t);
        assert!(api.next_request().await.is_none(), "no further request");
        assert_eq!(errors(), 1);
    }
}
