//! The pool manager: asks its [`PoolPlanner`] what the pool should do next, carries the
//! change out through EC2 (every call through the [`Pacer`]), wires the ENIs it creates on the
//! host and unwires those it frees, then frees an ENI when the planner says so. Growth pauses
//! after EC2 says the subnet is full (the planner remembers when).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subnet_calc::policy::{AddressKind, Decision, NodeLimits, PoolChange, PoolConfig, Reason};
use tokio::time::Instant;

use crate::io::ec2::pacer::Pacer;
use crate::io::ec2::{Addresses, CreateEni, Ec2Api, Ec2Error, Ec2Result, DESCRIPTION_PREFIX};
use crate::plan::pool::{PoolDecision, PoolPlanner, PoolView};
use crate::plan::reconcile::RECONCILE_COOLDOWN;
use crate::plan::subnets::subnets_for_new_eni;
use crate::store::commit::PoolState;
use crate::store::datastore::EniSpec;
use crate::types::{rfc3339, Ipv4Net};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Pool manager failures.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// An EC2 call failed for good.
    #[error("pool change {op} failed")]
    Ec2 {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Ec2Error,
    },
    /// A new ENI could not be wired on the host (it was detached and deleted again).
    #[error("pool change: host wiring of a new ENI")]
    Host(#[source] crate::io::host::HostError),
    /// The checkpoint could not be written after a forced change.
    #[error("pool change {op}: checkpoint")]
    Checkpoint {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: crate::store::checkpoint::CheckpointError,
    },
}

/// Where new ENIs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// This instance.
    pub instance_id: String,
    /// Subnet for new ENIs: the node's primary subnet, or the ENIConfig's with custom
    /// networking.
    pub subnet_id: String,
    /// Its CIDR.
    pub subnet_cidr: Ipv4Net,
    /// Security groups for new ENIs.
    pub security_groups: Vec<String>,
    /// Subnet discovery (`ENABLE_SUBNET_DISCOVERY`, not with custom networking): new ENIs go
    /// to the eligible subnet of the node's VPC and zone with the most free addresses.
    pub discovery: Option<SubnetDiscovery>,
    /// Tags for new ENIs (createdAt is added).
    pub tags: BTreeMap<String, String>,
    /// Attached ENIs the daemon does not manage.
    pub unmanaged_enis: u32,
}

/// Where subnet discovery looks (`DescribeSubnets` filters) and for which cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetDiscovery {
    /// The node's VPC.
    pub vpc_id: String,
    /// The node's availability zone.
    pub availability_zone: String,
    /// `CLUSTER_NAME` (cluster-scoped subnet tags).
    pub cluster: String,
}

/// What the pool manager reports while it works (metrics, Kubernetes events). Every method
/// has a no-op default.
pub trait PoolObserver: Send + Sync {
    /// A decision was carried out.
    fn decision(&self, _kind: PoolDecision) {}
    /// A decision failed; `function` is the reference's name for the failure
    /// (`increaseIPPoolAllocENI`, `decreaseIPPoolFreeENIFailed`...).
    fn failed(&self, _function: &'static str) {}
    /// An action (`increaseDatastorePool`, `decreaseDatastorePool`) started.
    fn action_started(&self, _action: &'static str) {}
    /// That action ended.
    fn action_finished(&self, _action: &'static str) {}
    /// The pool was seen below its target.
    fn below_target(&self, _at: Instant) {}
    /// The pool was seen on target again.
    fn on_target(&self, _at: Instant) {}
    /// A subnet has no free address (`prefixes`: no free aligned /28).
    fn subnet_exhausted(&self, _subnet: &str, _prefixes: bool) {}
    /// EC2 refused a call for lack of IAM permissions.
    fn unauthorized(&self, _action: &'static str, _message: &str) {}
}

/// Host wiring of the ENIs the pool manager creates and frees.
#[derive(Clone)]
pub struct PoolHost {
    /// The host.
    pub host: Arc<dyn crate::io::host::NodeHost>,
    /// `AWS_VPC_ENI_MTU`.
    pub mtu: u32,
    /// How long to wait for a new ENI's link to appear after the attach.
    pub link_wait: Duration,
}

/// Woken by a request that left the pool low, the manager waits until requests pause this
/// long before deciding (see [`PoolManager::run`]).
pub const GATHER_QUIET: Duration = Duration::from_millis(20);
/// ... but never longer than this after the first request: a pod waiting for an address asks
/// again every 250 ms, which would otherwise keep postponing the growth it waits for.
pub const GATHER_MAX: Duration = Duration::from_millis(100);

/// What one tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickOutcome {
    /// The policy's decision.
    pub decision: Decision,
    /// The ENI freed, if any.
    pub freed_eni: Option<String>,
}

/// The pool manager.
pub struct PoolManager {
    state: Arc<PoolState>,
    ec2: Arc<dyn Ec2Api>,
    cfg: PoolConfig,
    limits: NodeLimits,
    node: NodeInfo,
    pacer: Arc<Pacer>,
    planner: Mutex<PoolPlanner>,
    released: Mutex<BTreeMap<Ipv4Net, Duration>>,
    /// ENIs [`free_eni`](Self::free_eni) took out of the datastore: `None` while it runs,
    /// then when its detach was sent (kept for [`RECONCILE_COOLDOWN`]).
    freeing: Mutex<BTreeMap<String, Option<Duration>>>,
    tick_period: Duration,
    host: Option<PoolHost>,
    demand_file: Option<std::path::PathBuf>,
    observer: Option<Arc<dyn PoolObserver>>,
    cordon_paused: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PoolManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolManager")
            .field("cfg", &self.cfg)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl PoolManager {
    /// A manager.
    pub fn new(
        state: Arc<PoolState>,
        ec2: Arc<dyn Ec2Api>,
        cfg: PoolConfig,
        limits: NodeLimits,
        node: NodeInfo,
        pacer: Arc<Pacer>,
        tick_period: Duration,
    ) -> Self {
        let unmanaged_enis = node.unmanaged_enis;
        Self {
            state,
            ec2,
            cfg,
            limits,
            node,
            pacer,
            planner: Mutex::new(PoolPlanner::new(cfg, limits, unmanaged_enis)),
            released: Mutex::new(BTreeMap::new()),
            freeing: Mutex::new(BTreeMap::new()),
            tick_period,
            host: None,
            demand_file: None,
            observer: None,
            cordon_paused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Pauses growth while the node is cordoned (tainted unschedulable) and
    /// `AWS_MANAGE_ENIS_NON_SCHEDULABLE` is off, as the reference; assignments from the pool
    /// go on.
    pub fn set_cordon_paused(&self, paused: bool) {
        let was = self
            .cordon_paused
            .swap(paused, std::sync::atomic::Ordering::SeqCst);
        if was != paused {
            tracing::info!(
                paused,
                "node cordon: pool growth {}",
                if paused { "paused" } else { "resumed" }
            );
        }
    }

    /// Whether growth is paused for a cordoned node.
    pub fn is_cordon_paused(&self) -> bool {
        self.cordon_paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wires the ENIs it creates (and unwires those it frees) on this host.
    pub fn with_host(mut self, host: PoolHost) -> Self {
        self.host = Some(host);
        self
    }

    /// Reports decisions, top-up latency, subnet exhaustion and IAM refusals to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn PoolObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn observe(&self, f: impl FnOnce(&dyn PoolObserver)) {
        if let Some(o) = &self.observer {
            f(o.as_ref());
        }
    }

    fn note_unauthorized(&self, action: &'static str, e: &Ec2Error) {
        if e.is_unauthorized() {
            self.observe(|o| o.unauthorized(action, &e.message));
        }
    }

    /// The pacer (for counters).
    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }

    fn view(&self, now: Duration) -> PoolView {
        PoolView::of(&self.state.lock(), now)
    }

    fn decide(&self, now: Duration) -> (Vec<String>, Decision) {
        let view = self.view(now);
        let paused = self.state.terminating() || self.is_cordon_paused();
        let d = lock(&self.planner).decide(&view, now, paused);
        (view.eni_ids, d)
    }

    /// Whether the pool is below target now.
    pub fn is_low(&self) -> bool {
        let now = self.state.now();
        let view = self.view(now);
        lock(&self.planner).is_low(&view, now)
    }

    /// A pod asked for an address (the demand flavour's request history): `served` with a
    /// fresh assignment, or refused for lack of one. `key` names the pod (container id and
    /// interface).
    pub fn note_request(&self, key: &str, served: bool) {
        let now = self.state.now();
        lock(&self.planner).requested(key, served, now);
    }

    /// Keeps an ENI slot free for the trunk ENI of security groups for pods until one is
    /// attached ([`PoolPlanner::with_trunk_slot`]).
    pub fn with_trunk_slot(self, reserve: bool) -> Self {
        {
            let mut g = lock(&self.planner);
            *g = g.clone().with_trunk_slot(reserve);
        }
        self
    }

    /// Runs the demand flavour (`VPC_CNI_POLICY=demand`) from `state`.
    pub fn with_demand(
        self,
        settings: subnet_calc::policy::DemandSettings,
        state: subnet_calc::policy::DemandState,
    ) -> Self {
        {
            let mut g = lock(&self.planner);
            *g = g.clone().with_demand(settings, state);
        }
        self
    }

    /// Saves the demand flavour's history to `path` after each tick (a restart restores it;
    /// without the file the history is rebuilt from the checkpoint).
    pub fn with_demand_file(mut self, path: std::path::PathBuf) -> Self {
        self.demand_file = Some(path);
        self
    }

    /// Writes the demand history (temporary file and rename: a crash leaves the old one or
    /// the new one; losing it costs a rebuild, not an address).
    fn save_demand(&self) {
        let Some(path) = &self.demand_file else {
            return;
        };
        let Some(json) = lock(&self.planner)
            .demand_state()
            .and_then(|s| serde_json::to_vec(s).ok())
        else {
            return;
        };
        let tmp = path.with_extension("json.tmp");
        let res = std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "demand history not saved");
        }
    }

    /// One tick: decide, execute, then the free-ENI phase.
    pub async fn tick(&self) -> Result<TickOutcome, PoolError> {
        let now = self.state.now();
        let (ids, decision) = self.decide(now);
        self.save_demand();
        let low = matches!(
            decision.reason,
            Reason::Low | Reason::AtCapacity | Reason::Backoff
        );
        if low {
            self.observe(|o| o.below_target(Instant::now()));
        }
        if let Some(change) = &decision.change {
            tracing::info!(?change, reason = ?decision.reason, "pool change");
            use PoolDecision as K;
            let (action, kind, failure) = match change {
                PoolChange::Assign { .. } => (
                    "increaseDatastorePool",
                    K::Assign,
                    "increaseIPPoolAllocIPAddressesFailed",
                ),
                PoolChange::CreateEni { .. } => (
                    "increaseDatastorePool",
                    K::CreateEni,
                    "increaseIPPoolAllocENI",
                ),
                PoolChange::Release(_) => ("decreaseDatastorePool", K::Release, "decreaseIPPool"),
            };
            self.observe(|o| o.action_started(action));
            let res = self.execute(&ids, change).await;
            self.observe(|o| o.action_finished(action));
            match &res {
                Ok(()) => self.observe(|o| o.decision(kind)),
                Err(_) => self.observe(|o| o.failed(failure)),
            }
            res?;
        }
        // Closes a low period (the observer ignores it when none is open).
        if self.observer.is_some() && !self.is_low() {
            self.observe(|o| o.on_target(Instant::now()));
        }
        let mut freed_eni = None;
        if decision.free_eni_phase && !self.state.terminating() {
            let now = self.state.now();
            let view = self.view(now);
            let pick = lock(&self.planner)
                .eni_to_free(&view, now)
                .map(str::to_owned);
            if let Some(id) = pick {
                self.observe(|o| o.action_started("decreaseDatastorePool"));
                let res = self.free_eni(&id).await;
                self.observe(|o| o.action_finished("decreaseDatastorePool"));
                match &res {
                    Ok(()) => self.observe(|o| o.decision(PoolDecision::FreeEni)),
                    Err(_) => self.observe(|o| o.failed("decreaseIPPoolFreeENIFailed")),
                }
                res?;
                freed_eni = Some(id);
            }
        }
        Ok(TickOutcome {
            decision,
            freed_eni,
        })
    }

    /// Ticks until the pool is not low or a tick changes nothing (immediate top-up repeats).
    pub async fn settle(&self) -> Result<TickOutcome, PoolError> {
        let mut n = 0;
        loop {
            let out = self.tick().await?;
            n += 1;
            let grew = out.decision.reason == Reason::Low && out.decision.change.is_some();
            if !(self.cfg.rules.immediate_top_up && grew && self.is_low()) || n >= 32 {
                return Ok(out);
            }
        }
    }

    /// Runs until `shutdown`: a tick every period, and soon after an assignment takes the
    /// pool low (with `immediate_top_up`): once requests have paused for [`GATHER_QUIET`]
    /// (at most [`GATHER_MAX`] after the first), so that the pods of one burst are decided on
    /// together, as the planner decides on a tick's arrivals, instead of one small growth per
    /// pod.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let woken = tokio::select! {
                _ = tokio::time::sleep(self.tick_period) => false,
                _ = self.state.low.notified(), if self.cfg.rules.immediate_top_up => true,
                _ = shutdown.changed() => return,
            };
            if woken {
                let until = tokio::time::Instant::now() + GATHER_MAX;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(GATHER_QUIET) => break,
                        _ = tokio::time::sleep_until(until) => break,
                        _ = self.state.low.notified() => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
            let res = if woken || self.cfg.rules.immediate_top_up {
                self.settle().await
            } else {
                self.tick().await
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "pool tick failed");
            }
        }
    }

    fn note_capacity_error(&self, e: &Ec2Error, subnet: &str) {
        let now = self.state.now();
        let prefixes = if e.is_insufficient_addresses() {
            tracing::warn!(subnet, "subnet has no free addresses: growth paused");
            false
        } else if e.is_insufficient_cidr() {
            tracing::warn!(subnet, "subnet has no free /28 block: prefix growth paused");
            true
        } else {
            return;
        };
        lock(&self.planner).subnet_full(now, prefixes);
        self.observe(|o| o.subnet_exhausted(subnet, prefixes));
    }

    async fn execute(&self, ids: &[String], change: &PoolChange) -> Result<(), PoolError> {
        match change {
            PoolChange::Assign { eni, kind, count } => {
                let id = ids[*eni].clone();
                let what = |n: u32| match kind {
                    AddressKind::Ip => Addresses::Ips(n),
                    AddressKind::Prefix => Addresses::Prefixes(n),
                };
                let mut res = self.assign_call(&id, what(*count)).await;
                // Reference: on an error other than the ENI being full, ask for exactly 1.
                if let Err(e) = &res {
                    if *count > 1
                        && !e.is_limit_exceeded()
                        && !e.is_insufficient_addresses()
                        && !e.is_insufficient_cidr()
                    {
                        tracing::info!(eni = %id, code = %e.code, "assign failed: asking for 1");
                        res = self.assign_call(&id, what(1)).await;
                    }
                }
                match res {
                    Ok(got) => {
                        crate::failpoint::hit(crate::failpoint::ADDRESSES_ASSIGNED);
                        let mut ds = self.state.lock();
                        // Never the ENI's own primary address, whatever an EC2 endpoint
                        // answers (moto lists it among the assigned ones).
                        let primary = ds.eni(&id).map(|e| e.primary_ip);
                        for ip in got.ips.into_iter().filter(|ip| Some(*ip) != primary) {
                            let _ = ds.add_cidr(&id, Ipv4Net::host(ip), false);
                        }
                        for p in got.prefixes {
                            let _ = ds.add_cidr(&id, p, true);
                        }
                        Ok(())
                    }
                    Err(e) if e.is_limit_exceeded() => self.resync_eni(&id).await,
                    Err(e) if e.is_insufficient_addresses() || e.is_insufficient_cidr() => {
                        let subnet = self
                            .state
                            .lock()
                            .eni(&id)
                            .map(|e| e.subnet_id.clone())
                            .unwrap_or_default();
                        self.note_capacity_error(&e, &subnet);
                        Ok(())
                    }
                    Err(source) => {
                        self.note_unauthorized("AssignPrivateIpAddresses", &source);
                        Err(PoolError::Ec2 {
                            op: "assign",
                            source,
                        })
                    }
                }
            }
            PoolChange::CreateEni { kind, count } => self.create_eni(*kind, *count).await,
            PoolChange::Release(rels) => {
                for r in rels {
                    let id = ids[r.eni].clone();
                    for (prefixes, n) in [(false, r.ips), (true, r.prefixes)] {
                        if n > 0 {
                            self.release(&id, prefixes, n as usize).await?;
                        }
                    }
                }
                lock(&self.planner).released(self.state.now());
                Ok(())
            }
        }
    }

    async fn assign_call(&self, id: &str, what: Addresses) -> Ec2Result<crate::io::ec2::Assigned> {
        let ec2 = self.ec2.clone();
        self.pacer
            .call("AssignPrivateIpAddresses", || {
                let (ec2, id) = (ec2.clone(), id.to_owned());
                async move { ec2.assign(&id, what).await }
            })
            .await
    }

    /// `PrivateIpAddressLimitExceeded`: the datastore is out of sync with the ENI. Describe it
    /// and add whatever EC2 says is there (except CIDRs this manager released moments ago).
    async fn resync_eni(&self, id: &str) -> Result<(), PoolError> {
        tracing::warn!(
            eni = id,
            "ENI full in EC2 but not in the datastore: resyncing"
        );
        let ec2 = self.ec2.clone();
        let described = self
            .pacer
            .call("DescribeNetworkInterfaces", || {
                let (ec2, ids) = (ec2.clone(), vec![id.to_owned()]);
                async move { ec2.describe_enis(&ids).await }
            })
            .await
            .map_err(|source| PoolError::Ec2 {
                op: "resync ENI",
                source,
            })?;
        let released = self.recently_released();
        let now = self.state.now();
        let fresh = |c: &Ipv4Net| {
            released
                .get(c)
                .is_some_and(|t| now.saturating_sub(*t) < RECONCILE_COOLDOWN)
        };
        let mut ds = self.state.lock();
        for e in described.iter().filter(|e| e.id == id) {
            for ip in e
                .secondary_ips
                .iter()
                .filter(|ip| Some(**ip) != e.primary_ip)
            {
                let c = Ipv4Net::host(*ip);
                if !fresh(&c) {
                    let _ = ds.add_cidr(id, c, false);
                }
            }
            for p in e.prefixes.iter().filter(|p| !fresh(p)) {
                let _ = ds.add_cidr(id, *p, true);
            }
        }
        Ok(())
    }

    /// ENIs being freed, or whose detach was sent less than [`RECONCILE_COOLDOWN`] ago:
    /// reconcile must not adopt them (IMDS and EC2 list them as attached here until the
    /// detach completes; adopted, their addresses would be given to pods on an ENI about to
    /// go).
    pub fn freeing_enis(&self) -> BTreeSet<String> {
        let now = self.state.now();
        let mut f = lock(&self.freeing);
        f.retain(|_, t| t.is_none_or(|t| now.saturating_sub(t) < RECONCILE_COOLDOWN));
        f.keys().cloned().collect()
    }

    /// CIDRs released to EC2 in the last [`RECONCILE_COOLDOWN`], with when
    /// (reconcile must not re-add them while EC2 or IMDS may still list them).
    pub fn recently_released(&self) -> BTreeMap<Ipv4Net, Duration> {
        let now = self.state.now();
        let mut r = lock(&self.released);
        r.retain(|_, t| now.saturating_sub(*t) < RECONCILE_COOLDOWN);
        r.clone()
    }

    /// Records `cidrs` as released now (`true`) or forgets them (`false`, the release failed
    /// and they go back to the pool).
    fn mark_released(&self, cidrs: &[Ipv4Net], released: bool) {
        let now = self.state.now();
        let mut r = lock(&self.released);
        for c in cidrs {
            if released {
                r.insert(*c, now);
            } else {
                r.remove(c);
            }
        }
    }

    async fn release(&self, eni: &str, prefixes: bool, n: usize) -> Result<(), PoolError> {
        let now = self.state.now();
        let cidrs = {
            let mut ds = self.state.lock();
            let pick = ds.releasable(eni, prefixes, n, now, self.cfg.rules.exclude_cooling);
            pick.into_iter()
                .filter(|c| ds.remove_cidr(eni, *c, false).is_ok())
                .collect::<Vec<_>>()
        };
        if cidrs.is_empty() {
            return Ok(());
        }
        // Counted as released from now on: while the call is in flight EC2 and IMDS still list
        // these CIDRs, and a reconcile that saw them missing from the datastore would put them
        // back in the pool, where a pod could be given one that EC2 is about to take away.
        self.mark_released(&cidrs, true);
        let ec2 = self.ec2.clone();
        let res = self
            .pacer
            .call("UnassignPrivateIpAddresses", || {
                let (ec2, eni, cidrs) = (ec2.clone(), eni.to_owned(), cidrs.clone());
                async move {
                    if prefixes {
                        ec2.unassign_prefixes(&eni, &cidrs).await
                    } else {
                        let ips: Vec<_> = cidrs.iter().map(|c| c.addr()).collect();
                        ec2.unassign_ips(&eni, &ips).await
                    }
                }
            })
            .await;
        if let Err(source) = res {
            // Still on the ENI: keep them in the pool.
            self.mark_released(&cidrs, false);
            let mut ds = self.state.lock();
            for c in &cidrs {
                let _ = ds.add_cidr(eni, *c, prefixes);
            }
            return Err(PoolError::Ec2 {
                op: "release",
                source,
            });
        }
        // The cooldown runs from EC2's change.
        self.mark_released(&cidrs, true);
        tracing::info!(eni, count = cidrs.len(), prefixes, "released to EC2");
        Ok(())
    }

    /// The subnets to try for a new ENI, in order, with their CIDRs: the configured subnet, or
    /// with discovery the eligible subnets (most free addresses first). A `DescribeSubnets`
    /// failure falls back to the configured subnet.
    async fn subnets_for_new_eni(&self) -> Vec<(String, Ipv4Net)> {
        let primary = (self.node.subnet_id.clone(), self.node.subnet_cidr);
        let Some(d) = &self.node.discovery else {
            return vec![primary];
        };
        let ec2 = self.ec2.clone();
        let described = self
            .pacer
            .call("DescribeSubnets", || {
                let (ec2, vpc, az) = (ec2.clone(), d.vpc_id.clone(), d.availability_zone.clone());
                async move { ec2.describe_subnets(&vpc, &az).await }
            })
            .await;
        let subnets = match described {
            Ok(v) => Some(v),
            Err(e) => {
                self.note_unauthorized("DescribeSubnets", &e);
                tracing::warn!(error = %e, "subnet discovery: DescribeSubnets failed, using the node's subnet");
                None
            }
        };
        let ids = subnets_for_new_eni(true, subnets.as_deref(), &self.node.subnet_id, &d.cluster);
        ids.into_iter()
            .filter_map(|id| {
                if id == self.node.subnet_id {
                    return Some(primary.clone());
                }
                let cidr = subnets.as_ref()?.iter().find(|s| s.id == id)?.cidr;
                Some((id, cidr))
            })
            .collect()
    }

    async fn create_eni(&self, kind: AddressKind, count: u32) -> Result<(), PoolError> {
        let ec2 = self.ec2.clone();
        let inst = self.node.instance_id.clone();
        let used = self
            .pacer
            .call("DescribeInstances", || {
                let (ec2, inst) = (ec2.clone(), inst.clone());
                async move { ec2.used_device_indexes(&inst).await }
            })
            .await
            .map_err(|source| {
                self.note_unauthorized("DescribeInstances", &source);
                PoolError::Ec2 {
                    op: "create ENI",
                    source,
                }
            })?;
        let device = (1..100u32)
            .find(|d| !used.iter().any(|(card, dev)| *card == 0 && dev == d))
            .unwrap_or(1);
        let mut tags = self.node.tags.clone();
        tags.insert(
            crate::io::ec2::TAG_CREATED_AT.into(),
            rfc3339(self.state.now()),
        );
        let subnets = self.subnets_for_new_eni().await;
        if subnets.is_empty() {
            tracing::warn!("no eligible subnet for a new ENI (subnets tagged kubernetes.io/role/cni=0 or for another cluster)");
            return Ok(());
        }
        let mut created = None;
        let mut exhausted = None;
        for (subnet_id, subnet_cidr) in &subnets {
            let req = CreateEni {
                subnet_id: subnet_id.clone(),
                security_groups: self.node.security_groups.clone(),
                description: format!("{DESCRIPTION_PREFIX}{}", self.node.instance_id),
                tags: tags.clone(),
                addresses: match kind {
                    AddressKind::Ip => Addresses::Ips(count),
                    AddressKind::Prefix => Addresses::Prefixes(count),
                },
            };
            let res = self
                .pacer
                .call("CreateNetworkInterface", || {
                    let (ec2, req) = (ec2.clone(), req.clone());
                    async move { ec2.create_eni(&req).await }
                })
                .await;
            match res {
                Ok(e) => {
                    crate::failpoint::hit(crate::failpoint::ENI_CREATED);
                    created = Some((e, *subnet_cidr));
                    break;
                }
                Err(e) if e.is_insufficient_addresses() || e.is_insufficient_cidr() => {
                    tracing::info!(subnet = %subnet_id, code = %e.code, "subnet full: trying the next eligible subnet");
                    exhausted = Some((e, subnet_id.clone()));
                }
                Err(source) => {
                    self.note_unauthorized("CreateNetworkInterface", &source);
                    return Err(PoolError::Ec2 {
                        op: "create ENI",
                        source,
                    });
                }
            }
        }
        let Some((eni, subnet_cidr)) = created else {
            if let Some((e, subnet)) = exhausted {
                self.note_capacity_error(&e, &subnet);
            }
            return Ok(());
        };
        let attach = self
            .pacer
            .call("AttachNetworkInterface", || {
                let (ec2, id, inst) = (ec2.clone(), eni.id.clone(), inst.clone());
                async move { ec2.attach_eni(&id, &inst, device, 0).await }
            })
            .await;
        let attachment = match attach {
            Ok(a) => a,
            Err(source) => {
                // Do not leak it.
                self.note_unauthorized("AttachNetworkInterface", &source);
                self.delete_quietly(&eni.id).await;
                return Err(PoolError::Ec2 {
                    op: "attach ENI",
                    source,
                });
            }
        };
        if let Err(e) = self
            .pacer
            .call("ModifyNetworkInterfaceAttribute", || {
                let (ec2, id, att) = (ec2.clone(), eni.id.clone(), attachment.clone());
                async move { ec2.set_delete_on_termination(&id, &att).await }
            })
            .await
        {
            tracing::warn!(eni = %eni.id, error = %e, "DeleteOnTermination not set");
        }
        let primary_ip = eni.primary_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        // The host side before any pod can get an address from it.
        if let Some(h) = &self.host {
            let he = crate::io::host::HostEni {
                id: eni.id.clone(),
                mac: eni.mac.clone(),
                primary_ip,
                subnet_cidr,
                network_card: 0,
                device_number: device,
                is_trunk: false,
            };
            if let Err(e) =
                crate::io::host::wire_when_present(h.host.as_ref(), &he, h.mtu, h.link_wait).await
            {
                tracing::warn!(eni = %eni.id, error = %e, "new ENI cannot be wired: detaching and deleting it");
                let _ = h.host.unwire(&eni.id, primary_ip).await;
                self.detach_and_delete_quietly(&eni.id, &attachment).await;
                return Err(PoolError::Host(e));
            }
        }
        let now = self.state.now();
        let mut ds = self.state.lock();
        ds.add_eni(
            EniSpec {
                id: eni.id.clone(),
                mac: eni.mac.clone(),
                is_primary: false,
                is_trunk: false,
                is_efa: false,
                device_number: device,
                primary_ip,
                subnet_id: eni.subnet_id.clone(),
                subnet_cidr,
                excluded: false,
            },
            now,
        );
        for ip in &eni.secondary_ips {
            let _ = ds.add_cidr(&eni.id, Ipv4Net::host(*ip), false);
        }
        for p in &eni.prefixes {
            let _ = ds.add_cidr(&eni.id, *p, true);
        }
        tracing::info!(eni = %eni.id, device, subnet = %eni.subnet_id, "ENI created and attached");
        Ok(())
    }

    /// Best-effort delete of an ENI this manager just created (not found is fine).
    async fn delete_quietly(&self, id: &str) {
        let ec2 = self.ec2.clone();
        if let Err(e) = self
            .pacer
            .call("DeleteNetworkInterface", || {
                let (ec2, id) = (ec2.clone(), id.to_owned());
                async move { not_found_ok(ec2.delete_eni(&id).await) }
            })
            .await
        {
            tracing::warn!(eni = id, error = %e, "ENI not deleted: leaked-ENI cleanup will find it");
        }
    }

    /// Best-effort detach then delete (an ENI that could not be wired).
    async fn detach_and_delete_quietly(&self, id: &str, attachment: &str) {
        let ec2 = self.ec2.clone();
        if let Err(e) = self
            .pacer
            .call("DetachNetworkInterface", || {
                let (ec2, att) = (ec2.clone(), attachment.to_owned());
                async move { not_found_ok(ec2.detach_eni(&att).await) }
            })
            .await
        {
            tracing::warn!(eni = id, error = %e, "ENI not detached: leaked-ENI cleanup will find it");
            return;
        }
        self.delete_quietly(id).await;
    }

    async fn free_eni(&self, id: &str) -> Result<(), PoolError> {
        // Reconcile leaves the ENI alone from before it leaves the datastore.
        lock(&self.freeing).insert(id.to_owned(), None);
        let mut detach_sent = false;
        let res = self.free_eni_inner(id, &mut detach_sent).await;
        let mut f = lock(&self.freeing);
        if detach_sent {
            // Still listed as attached until the detach completes (or the answer was lost and
            // it did): not adopted for the cooldown.
            f.insert(id.to_owned(), Some(self.state.now()));
        } else {
            // Never detached (still in the datastore, or EC2 failed before the detach): a
            // reconcile may adopt it again, which is how its addresses come back.
            f.remove(id);
        }
        res
    }

    async fn free_eni_inner(&self, id: &str, detach_sent: &mut bool) -> Result<(), PoolError> {
        // Out of the datastore first, so that nothing is assigned from it meanwhile.
        let primary_ip = self.state.lock().eni(id).map(|e| e.primary_ip);
        if self.state.lock().remove_eni(id, false).is_err() {
            return Ok(());
        }
        if let (Some(h), Some(ip)) = (&self.host, primary_ip) {
            if let Err(e) = h.host.unwire(id, ip).await {
                tracing::warn!(eni = id, error = %e, "host rules of a freed ENI not removed");
            }
        }
        let ec2 = self.ec2.clone();
        let described = self
            .pacer
            .call("DescribeNetworkInterfaces", || {
                let (ec2, id) = (ec2.clone(), vec![id.to_owned()]);
                async move { ec2.describe_enis(&id).await }
            })
            .await;
        let attachment = match described {
            Ok(v) => v.into_iter().next().and_then(|e| e.attachment),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(source) => {
                return Err(PoolError::Ec2 {
                    op: "free ENI",
                    source,
                })
            }
        };
        if let Some(a) = attachment {
            *detach_sent = true;
            self.pacer
                .call("DetachNetworkInterface", || {
                    let (ec2, att) = (ec2.clone(), a.id.clone());
                    async move { not_found_ok(ec2.detach_eni(&att).await) }
                })
                .await
                .map_err(|source| PoolError::Ec2 {
                    op: "detach ENI",
                    source,
                })?;
        }
        self.pacer
            .call("DeleteNetworkInterface", || {
                let (ec2, id) = (ec2.clone(), id.to_owned());
                async move { not_found_ok(ec2.delete_eni(&id).await) }
            })
            .await
            .map_err(|source| PoolError::Ec2 {
                op: "delete ENI",
                source,
            })?;
        tracing::info!(eni = id, "ENI freed");
        Ok(())
    }
}

fn not_found_ok(r: Ec2Result<()>) -> Ec2Result<()> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::Ec2Pacing;
    use crate::io::ec2::fake::FakeEc2;
    use crate::io::ec2::InstanceTypeInfo;
    use crate::store::checkpoint::{IpamMetadata, MemoryStore};
    use crate::store::commit::{Clock, TokioClock};
    use crate::store::datastore::{DataStore, IpamKey};

    struct Node {
        ec2: FakeEc2,
        state: Arc<PoolState>,
        pool: PoolManager,
    }

    fn node(vars: &[(&str, &str)], subnet: &str) -> Node {
        let cfg = Config::for_test(vars).unwrap();
        let limits = InstanceTypeInfo {
            max_enis: 3,
            ipv4_per_eni: 10,
            hypervisor: "nitro".into(),
            bare_metal: false,
        };
        let subnet: Ipv4Net = subnet.parse().unwrap();
        let ec2 = FakeEc2::new(subnet, limits);
        let primary = ec2.primary_eni();
        let (instance_id, primary_ip) = {
            let st = ec2.state();
            (
                st.instance_id.clone(),
                st.enis[&primary].primary_ip.unwrap(),
            )
        };
        let clock = Arc::new(TokioClock::new());
        let mut ds = DataStore::new(
            cfg.prefix_delegation,
            cfg.rules.prefix_fallback,
            false,
            cfg.ip_cooldown,
        );
        ds.add_eni(
            EniSpec {
                id: primary,
                mac: String::new(),
                is_primary: true,
                is_trunk: false,
                is_efa: false,
                device_number: 0,
                primary_ip,
                subnet_id: "subnet-1".into(),
                subnet_cidr: subnet,
                excluded: false,
            },
            clock.now(),
        );
        let state = Arc::new(PoolState::new(ds, Box::new(MemoryStore::default()), clock));
        let pool = PoolManager::new(
            state.clone(),
            Arc::new(ec2.clone()),
            cfg.pool_config(cfg.prefix_delegation),
            NodeLimits {
                max_enis: 3,
                slots_per_eni: 9,
                max_pods: None,
            },
            NodeInfo {
                instance_id: instance_id.clone(),
                subnet_id: "subnet-1".into(),
                subnet_cidr: subnet,
                security_groups: vec!["sg-1".into()],
                discovery: None,
                tags: cfg.eni_tags(&instance_id),
                unmanaged_enis: 0,
            },
            Arc::new(Pacer::new(cfg.ec2)),
            cfg.pool_tick,
        );
        Node { ec2, state, pool }
    }

    // The checkpoint is written by the committer thread; waiting for it on a blocking thread
    // keeps paused tokio time from jumping to the next pool tick meanwhile.
    async fn pods(st: &Arc<PoolState>, from: usize, n: usize) {
        let st = st.clone();
        tokio::task::spawn_blocking(move || {
            for i in from..from + n {
                st.assign(
                    &IpamKey::new("aws-cni", &format!("c{i}"), "eth0"),
                    &IpamMetadata::default(),
                )
                .unwrap()
                .wait()
                .unwrap();
            }
        })
        .await
        .unwrap();
    }

    async fn unpods(st: &Arc<PoolState>, from: usize, n: usize) {
        let st = st.clone();
        tokio::task::spawn_blocking(move || {
            for i in from..from + n {
                st.unassign(&IpamKey::new("aws-cni", &format!("c{i}"), "eth0"))
                    .unwrap()
                    .wait()
                    .unwrap();
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn warm_eni_target_boot_grow_and_free_after_the_timers() {
        let n = node(&[], "10.0.0.0/20");
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 9, "primary filled");
        // One pod: available 8 < 9 → a whole new ENI.
        pods(&n.state, 0, 1).await;
        assert!(n.pool.is_low());
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().enis().len(), 2);
        assert_eq!(n.state.lock().usable_total(), 18);
        // Fill to 10 pods → third ENI.
        pods(&n.state, 1, 9).await;
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().enis().len(), 3);
        // Scale down to 0 pods: an ENI is freed only after cooldown and the minimum ENI age.
        unpods(&n.state, 0, 10).await;
        let out = n.pool.tick().await.unwrap();
        assert_eq!(out.freed_eni, None, "cooldown and ENI age hold it");
        tokio::time::advance(Duration::from_secs(61)).await;
        // Our stable-shrink rule also keeps room for the churn seen in the last 10 minutes.
        assert_eq!(n.pool.tick().await.unwrap().freed_eni, None);
        tokio::time::advance(Duration::from_secs(600)).await;
        let out = n.pool.tick().await.unwrap();
        assert!(out.freed_eni.is_some(), "{out:?}");
        assert_eq!(n.state.lock().enis().len(), 2);
        assert_eq!(n.ec2.state().enis.len(), 2, "deleted in EC2 too");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cordoned_node_serves_its_pool_but_does_not_grow_it() {
        let n = node(&[("WARM_IP_TARGET", "3")], "10.0.0.0/20");
        n.pool.settle().await.unwrap();
        pods(&n.state, 0, 2).await;
        assert!(n.pool.is_low());
        n.pool.set_cordon_paused(true);
        let out = n.pool.tick().await.unwrap();
        assert_eq!(out.decision.reason, Reason::Paused);
        assert!(out.decision.change.is_none());
        n.pool.set_cordon_paused(false);
        let out = n.pool.tick().await.unwrap();
        assert_eq!(out.decision.reason, Reason::Low);
        assert!(!n.pool.is_low(), "grown once the cordon is lifted");
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_and_5xx_are_retried() {
        let n = node(&[("WARM_IP_TARGET", "3")], "10.0.0.0/20");
        n.ec2
            .fail("AssignPrivateIpAddresses", "RequestLimitExceeded", 3);
        n.ec2.fail("AssignPrivateIpAddresses", "InternalError", 2);
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 3);
        assert_eq!(n.ec2.count("AssignPrivateIpAddresses"), 6);
        let c = n.pool.pacer().stats()["AssignPrivateIpAddresses"];
        assert_eq!((c.calls, c.retries, c.failures), (6, 5, 0));
        assert_eq!((c.throttles, c.errors), (3, 5));
        // A client error is not retried.
        n.ec2
            .fail("AssignPrivateIpAddresses", "UnauthorizedOperation", 1);
        pods(&n.state, 0, 1).await;
        assert!(n.pool.tick().await.is_err());
        assert_eq!(n.ec2.count("AssignPrivateIpAddresses"), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn subnet_exhaustion_pauses_growth_for_the_backoff() {
        // A /27 has 27 usable addresses; the primary ENI holds one.
        let n = node(&[("WARM_IP_TARGET", "5")], "10.0.0.0/27");
        n.ec2.fail(
            "AssignPrivateIpAddresses",
            "InsufficientFreeAddressesInSubnet",
            1,
        );
        let out = n.pool.tick().await.unwrap();
        assert_eq!(out.decision.reason, Reason::Low);
        let out = n.pool.tick().await.unwrap();
        assert_eq!(out.decision.reason, Reason::Backoff);
        let calls = n.ec2.count("AssignPrivateIpAddresses");
        tokio::time::advance(Duration::from_secs(119)).await;
        assert_eq!(
            n.pool.tick().await.unwrap().decision.reason,
            Reason::Backoff
        );
        assert_eq!(
            n.ec2.count("AssignPrivateIpAddresses"),
            calls,
            "no EC2 call while paused"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn prefix_mode_falls_back_to_ips_on_insufficient_cidr_blocks() {
        let n = node(
            &[
                ("ENABLE_PREFIX_DELEGATION", "true"),
                ("WARM_PREFIX_TARGET", "1"),
            ],
            "10.0.0.0/20",
        );
        n.ec2
            .fail("AssignPrivateIpAddresses", "InsufficientCidrBlocks", 1);
        n.pool.tick().await.unwrap();
        n.pool.settle().await.unwrap();
        let ds = n.state.lock();
        let (_, v) = ds.views(n.state.now());
        assert!(v[0].ips > 0, "fell back to /32s: {:?}", v[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_top_up_wakes_the_manager_before_the_tick() {
        let n = node(
            &[("WARM_IP_TARGET", "2"), ("VPC_CNI_POOL_TICK", "1h")],
            "10.0.0.0/20",
        );
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 2);
        let low = crate::serve::grpc::pool_is_low(
            Config::for_test(&[("WARM_IP_TARGET", "2")])
                .unwrap()
                .pool_config(false),
            NodeLimits {
                max_enis: 3,
                slots_per_eni: 9,
                max_pods: None,
            },
        );
        let pool = Arc::new(n.pool);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(pool.clone().run(rx));
        pods(&n.state, 0, 1).await;
        assert!(low(&n.state));
        n.state.low.notify_one();
        // Well before the 1 h tick the pool is back at target.
        for _ in 0..100 {
            if n.state.lock().usable_total() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(n.state.lock().usable_total(), 3);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_requests_is_topped_up_by_one_growth() {
        let n = node(
            &[("WARM_IP_TARGET", "8"), ("VPC_CNI_POOL_TICK", "1h")],
            "10.0.0.0/20",
        );
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 8);
        let assigns = n.ec2.count("AssignPrivateIpAddresses");
        let pool = Arc::new(n.pool);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(pool.clone().run(rx));
        // Five pods 5 ms apart, each waking the manager as the gRPC handler does.
        for i in 0..5 {
            pods(&n.state, i, 1).await;
            n.state.low.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..100 {
            if n.state.lock().usable_total() >= 13 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(n.state.lock().usable_total(), 13);
        assert_eq!(
            n.ec2.count("AssignPrivateIpAddresses") - assigns,
            1,
            "one growth for the burst"
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_eni_is_resynced_from_ec2_instead_of_failing() {
        let n = node(&[("WARM_IP_TARGET", "3")], "10.0.0.0/20");
        let primary = n.ec2.primary_eni();
        // Behind the datastore's back the ENI was filled (9 slots).
        let got = n.ec2.assign(&primary, Addresses::Ips(9)).await.unwrap();
        n.pool.tick().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 9, "adopted what EC2 lists");
        let ds = n.state.lock();
        for ip in got.ips {
            assert!(ds
                .eni(&primary)
                .unwrap()
                .cidrs
                .contains_key(&Ipv4Net::host(ip)));
        }
        drop(ds);
        assert_eq!(n.ec2.count("DescribeNetworkInterfaces"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn another_assign_error_is_retried_asking_for_exactly_one() {
        let n = node(&[("WARM_IP_TARGET", "3")], "10.0.0.0/20");
        n.ec2
            .fail("AssignPrivateIpAddresses", "InvalidParameterValue", 1);
        n.pool.tick().await.unwrap();
        assert_eq!(n.ec2.count("AssignPrivateIpAddresses"), 2);
        assert_eq!(n.state.lock().usable_total(), 1);
        // Both failing: the error is returned.
        n.ec2
            .fail("AssignPrivateIpAddresses", "InvalidParameterValue", 2);
        assert!(n.pool.tick().await.is_err());
        assert_eq!(n.ec2.count("AssignPrivateIpAddresses"), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn released_cidrs_are_remembered_for_the_reconcile_cooldown() {
        let n = node(
            &[("WARM_IP_TARGET", "3"), ("IP_COOLDOWN_PERIOD", "0")],
            "10.0.0.0/20",
        );
        n.pool.settle().await.unwrap();
        pods(&n.state, 0, 3).await;
        n.pool.settle().await.unwrap();
        unpods(&n.state, 0, 3).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        n.pool.tick().await.unwrap();
        let rel = n.pool.recently_released();
        assert!(!rel.is_empty(), "surplus released");
        let primary = n.ec2.primary_eni();
        let ec2_ips: Vec<_> = n.ec2.state().enis[&primary].secondary_ips.clone();
        for c in rel.keys() {
            assert!(!ec2_ips.contains(&c.addr()), "{c} released in EC2");
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(n.pool.recently_released().is_empty());
    }

    // free_eni takes the ENI out of the datastore before its describe, detach and delete
    // finish; IMDS and EC2 list it as attached here meanwhile (in real EC2 until the detach
    // completes, seconds after the call). A reconcile in that window must not adopt it back:
    // pods would get addresses on an ENI about to be deleted, and the datastore would keep
    // an ENI EC2 no longer has.
    #[tokio::test(start_paused = true)]
    async fn an_eni_being_freed_is_not_adopted_back_by_a_reconcile_meanwhile() {
        use crate::plan::reconcile::{ImdsEni, ReconcileSettings};
        let n = node(&[], "10.0.0.0/20");
        n.pool.settle().await.unwrap();
        pods(&n.state, 0, 1).await;
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().enis().len(), 2);
        unpods(&n.state, 0, 1).await;
        // Past the cooldown and the minimum ENI age: the next tick frees the second ENI.
        tokio::time::advance(Duration::from_secs(661)).await;
        let imds: Vec<ImdsEni> = {
            let st = n.ec2.state();
            st.enis
                .values()
                .filter_map(|e| {
                    let a = e.attachment.as_ref()?;
                    Some(ImdsEni {
                        id: e.id.clone(),
                        mac: e.mac.clone(),
                        device_number: a.device_index,
                        network_card: a.network_card,
                        subnet_id: e.subnet_id.clone(),
                        subnet_cidr: Some(st.subnet.cidr),
                        primary_ip: e.primary_ip,
                        secondary_ips: e.secondary_ips.clone(),
                        prefixes: e.prefixes.clone(),
                    })
                })
                .collect()
        };
        let instance_id = n.ec2.state().instance_id.clone();
        let settings =
            ReconcileSettings::from_config(&Config::for_test(&[]).unwrap(), &instance_id);
        // The free's DescribeNetworkInterfaces is throttled once: its retry waits at least
        // 200 ms, the ENI out of the datastore and still attached.
        n.ec2
            .fail("DescribeNetworkInterfaces", "RequestLimitExceeded", 1);
        let during = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let freeing = n.pool.freeing_enis();
            let r = crate::run::reconcile::reconcile_once(
                &n.state,
                &n.ec2,
                n.pool.pacer(),
                &imds,
                &n.pool.recently_released(),
                &freeing,
                &settings,
            )
            .await;
            (freeing, r)
        };
        let (ticked, (freeing, reconciled)) = tokio::join!(n.pool.tick(), during);
        let freed = ticked.unwrap().freed_eni.expect("an ENI freed");
        reconciled.unwrap();
        assert_eq!(n.ec2.count("DescribeNetworkInterfaces"), 2, "retried once");
        assert!(freeing.contains(&freed), "{freeing:?}");
        assert!(
            n.state.lock().eni(&freed).is_none(),
            "the ENI being freed was adopted back"
        );
        assert!(!n.ec2.state().enis.contains_key(&freed), "deleted in EC2");
        // Skipped for the cooldown after its detach, then forgotten.
        assert!(n.pool.freeing_enis().contains(&freed));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(n.pool.freeing_enis().is_empty());
    }

    // An ENI whose free failed before its detach is still attached and usable: a reconcile
    // may adopt it again (that is how its addresses come back), so it is not skipped.
    #[tokio::test(start_paused = true)]
    async fn an_eni_whose_free_failed_before_the_detach_is_not_skipped() {
        let n = node(&[], "10.0.0.0/20");
        n.pool.settle().await.unwrap();
        pods(&n.state, 0, 1).await;
        n.pool.settle().await.unwrap();
        unpods(&n.state, 0, 1).await;
        // Past the cooldown and the minimum ENI age: the next tick frees the second ENI.
        tokio::time::advance(Duration::from_secs(661)).await;
        n.ec2
            .fail("DescribeNetworkInterfaces", "UnauthorizedOperation", 1);
        assert!(n.pool.tick().await.is_err());
        assert_eq!(n.state.lock().enis().len(), 1, "out of the datastore");
        assert_eq!(n.ec2.state().enis.len(), 2, "still in EC2");
        assert!(n.pool.freeing_enis().is_empty());
    }

    // Found by the e2e soak: while an UnassignPrivateIpAddresses is in flight (here waiting
    // for its retry after a throttle), EC2 and IMDS still list the addresses the pool took
    // out of the datastore. A reconcile then must see them as released, or it puts them back
    // in the pool, a pod is given one, and EC2 takes it away when the call completes.
    #[tokio::test(start_paused = true)]
    async fn cidrs_being_released_count_as_released_while_the_call_is_in_flight() {
        let n = node(
            &[("WARM_IP_TARGET", "3"), ("IP_COOLDOWN_PERIOD", "0")],
            "10.0.0.0/20",
        );
        n.pool.settle().await.unwrap();
        pods(&n.state, 0, 3).await;
        n.pool.settle().await.unwrap();
        unpods(&n.state, 0, 3).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        n.ec2
            .fail("UnassignPrivateIpAddresses", "RequestLimitExceeded", 1);
        let primary = n.ec2.primary_eni();
        let during = async {
            // The first attempt was throttled; the retry waits at least 200 ms.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let in_ec2: Vec<_> = n.ec2.state().enis[&primary].secondary_ips.clone();
            (n.pool.recently_released(), in_ec2)
        };
        let (ticked, (released, in_ec2)) = tokio::join!(n.pool.tick(), during);
        ticked.unwrap();
        assert_eq!(n.ec2.count("UnassignPrivateIpAddresses"), 2, "retried once");
        assert!(
            !released.is_empty(),
            "nothing counted as released while the unassign was in flight"
        );
        for c in released.keys() {
            assert!(
                in_ec2.contains(&c.addr()),
                "{c} was already gone from EC2 during the call"
            );
        }
        let after = n.pool.recently_released();
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            released.keys().collect::<Vec<_>>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_governor_limiter_paces_calls_on_the_paused_clock_and_the_observer_sees_each() {
        let cfg = Config::for_test(&[]).unwrap();
        let pacer = Pacer::new(Ec2Pacing {
            describe_per_sec: 2,
            describe_burst: 2,
            ..cfg.ec2
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        pacer.set_observer(Arc::new(move |a, _d, o| {
            let kind = match o {
                crate::io::ec2::pacer::Ec2Outcome::Ok => "ok".to_owned(),
                crate::io::ec2::pacer::Ec2Outcome::Throttled { code } => {
                    format!("throttled {code}")
                }
                crate::io::ec2::pacer::Ec2Outcome::Failed { code } => format!("failed {code}"),
            };
            s2.lock().unwrap().push((a, kind));
        }));
        let t0 = Instant::now();
        for _ in 0..6 {
            pacer
                .call("DescribeSubnets", || async { Ok::<_, Ec2Error>(()) })
                .await
                .unwrap();
        }
        // Burst of 2, then 2 per second: the 6th call waits for 4 refills (virtual time).
        assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        let fails = Mutex::new(vec![
            Ec2Error::coded("DescribeSubnets", "InternalError", "x"),
            Ec2Error::coded("DescribeSubnets", "RequestLimitExceeded", "x"),
        ]);
        pacer
            .call("DescribeSubnets", || {
                let r = fails.lock().unwrap().pop();
                async move { r.map_or(Ok(()), Err) }
            })
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 9);
        assert_eq!(seen[6].1, "throttled RequestLimitExceeded");
        assert_eq!(seen[7].1, "failed InternalError");
        assert_eq!(seen[8].1, "ok");
        let st = pacer.stats()["DescribeSubnets"];
        assert_eq!(
            (st.calls, st.retries, st.throttles, st.errors, st.failures),
            (9, 2, 1, 2, 0)
        );
    }
}
