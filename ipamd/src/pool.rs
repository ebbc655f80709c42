//! The pool manager: gathers the datastore's view, asks the calculator's policy
//! (`subnet_calc::policy::decide`), carries the change out through EC2, then frees an ENI when
//! the policy says so. EC2 calls are paced per call class, retried with exponential backoff and
//! jitter on throttling, 5xx and transport errors, and growth pauses after subnet exhaustion.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subnet_calc::policy::{
    self, AddressKind, Decision, NodeLimits, PoolChange, PoolConfig, PoolInput, Reason,
};
use tokio::time::Instant;

use crate::config::Ec2Pacing;
use crate::datastore::EniSpec;
use crate::ec2::{Addresses, CreateEni, Ec2Api, Ec2Error, Ec2Result, DESCRIPTION_PREFIX};
use crate::state::PoolState;
use crate::types::Ipv4Net;

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
    /// The checkpoint could not be written after a forced change.
    #[error("pool change {op}: checkpoint")]
    Checkpoint {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: crate::checkpoint::CheckpointError,
    },
}

/// Where new ENIs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// This instance.
    pub instance_id: String,
    /// Subnet for new ENIs.
    pub subnet_id: String,
    /// Its CIDR.
    pub subnet_cidr: Ipv4Net,
    /// Security groups for new ENIs.
    pub security_groups: Vec<String>,
    /// Tags for new ENIs (createdAt is added).
    pub tags: BTreeMap<String, String>,
    /// Attached ENIs the daemon does not manage.
    pub unmanaged_enis: u32,
}

/// A token bucket on tokio's clock (so paused-clock tests see it too).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes a token; returns how long to wait first.
    fn take(&mut self) -> Duration {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// EC2 pacing and retries, counted.
#[derive(Debug)]
pub struct Pacer {
    cfg: Ec2Pacing,
    mutating: Mutex<Bucket>,
    describe: Mutex<Bucket>,
    seed: Mutex<u64>,
    /// Calls made, retries, and final failures, per action.
    pub counts: Mutex<BTreeMap<&'static str, (u64, u64, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Pacer {
    /// Pacing per `cfg`.
    pub fn new(cfg: Ec2Pacing) -> Self {
        Self {
            cfg,
            mutating: Mutex::new(Bucket::new(cfg.mutating_per_sec, cfg.mutating_burst)),
            describe: Mutex::new(Bucket::new(cfg.describe_per_sec, cfg.describe_burst)),
            seed: Mutex::new(0x9e37_79b9_7f4a_7c15),
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    fn jitter(&self) -> f64 {
        let mut s = lock(&self.seed);
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s % 1000) as f64 / 1000.0
    }

    /// The delay before retry `attempt` (1-based): base × 2^(attempt-1), capped at 20 s, plus
    /// up to 30 % jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.retry_base.as_secs_f64() * 2f64.powi(attempt.min(16) as i32 - 1);
        let d = base.min(20.0);
        Duration::from_secs_f64(d * (1.0 + 0.3 * self.jitter()))
    }

    /// Runs one EC2 call with pacing and retries.
    pub async fn call<T, F, Fut>(&self, action: &'static str, f: F) -> Ec2Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Ec2Result<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let wait = if crate::ec2::is_mutating(action) {
                lock(&self.mutating).take()
            } else {
                lock(&self.describe).take()
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            lock(&self.counts).entry(action).or_default().0 += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && attempt < self.cfg.max_attempts => {
                    lock(&self.counts).entry(action).or_default().1 += 1;
                    tracing::debug!(action, attempt, code = %e.code, "EC2 call retried");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(e) => {
                    lock(&self.counts).entry(action).or_default().2 += 1;
                    return Err(e);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct History {
    last_decrease: Option<Duration>,
    last_insufficient_addresses: Option<Duration>,
    last_insufficient_cidr: Option<Duration>,
    cooling: VecDeque<(Duration, u32)>,
}

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
    history: Mutex<History>,
    tick_period: Duration,
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
        Self {
            state,
            ec2,
            cfg,
            limits,
            node,
            pacer,
            history: Mutex::new(History::default()),
            tick_period,
        }
    }

    /// The pacer (for counters).
    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }

    fn decide(&self, now: Duration) -> (Vec<String>, Decision) {
        let (ids, views) = self.state.lock().views(now);
        let mut h = lock(&self.history);
        let cooling: u32 = views.iter().map(|v| v.cooling()).sum();
        h.cooling.push_back((now, cooling));
        let window = self.cfg.timers.churn_window;
        while h
            .cooling
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
        {
            h.cooling.pop_front();
        }
        let mut input = PoolInput::new(&views);
        input.unmanaged_enis = self.node.unmanaged_enis;
        input.last_decrease = h.last_decrease;
        input.last_insufficient_addresses = h.last_insufficient_addresses;
        input.last_insufficient_cidr = h.last_insufficient_cidr;
        input.paused = self.state.terminating();
        input.recent_cooling_peak = h.cooling.iter().map(|(_, c)| *c).max().unwrap_or(0);
        let d = policy::decide(&self.cfg, &self.limits, &input, now);
        (ids, d)
    }

    /// Whether the pool is below target now.
    pub fn is_low(&self) -> bool {
        let now = self.state.now();
        let (_, views) = self.state.lock().views(now);
        policy::is_low(&self.cfg, &self.limits, &policy::stats(&self.cfg, &views))
    }

    /// One tick: decide, execute, then the free-ENI phase.
    pub async fn tick(&self) -> Result<TickOutcome, PoolError> {
        let now = self.state.now();
        let (ids, decision) = self.decide(now);
        if let Some(change) = &decision.change {
            tracing::info!(?change, reason = ?decision.reason, "pool change");
            self.execute(&ids, change).await?;
        }
        let mut freed_eni = None;
        if decision.free_eni_phase && !self.state.terminating() {
            let now = self.state.now();
            let (ids, views) = self.state.lock().views(now);
            let pick = {
                let h = lock(&self.history);
                let mut input = PoolInput::new(&views);
                input.unmanaged_enis = self.node.unmanaged_enis;
                input.last_decrease = h.last_decrease;
                input.recent_cooling_peak = h.cooling.iter().map(|(_, c)| *c).max().unwrap_or(0);
                policy::choose_eni_to_free(&self.cfg, &self.limits, &input, now)
            };
            if let Some(i) = pick {
                let id = ids[i].clone();
                self.free_eni(&id).await?;
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

    /// Runs until `shutdown`: a tick every period, and at once when an assignment takes the
    /// pool low (with `immediate_top_up`).
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let woken = tokio::select! {
                _ = tokio::time::sleep(self.tick_period) => false,
                _ = self.state.low.notified(), if self.cfg.rules.immediate_top_up => true,
                _ = shutdown.changed() => return,
            };
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

    fn note_capacity_error(&self, e: &Ec2Error) {
        let now = self.state.now();
        let mut h = lock(&self.history);
        if e.is_insufficient_addresses() {
            tracing::warn!("subnet has no free addresses: growth paused");
            h.last_insufficient_addresses = Some(now);
        } else if e.is_insufficient_cidr() {
            tracing::warn!("subnet has no free /28 block: prefix growth paused");
            h.last_insufficient_cidr = Some(now);
        }
    }

    async fn execute(&self, ids: &[String], change: &PoolChange) -> Result<(), PoolError> {
        match change {
            PoolChange::Assign { eni, kind, count } => {
                let id = ids[*eni].clone();
                let what = match kind {
                    AddressKind::Ip => Addresses::Ips(*count),
                    AddressKind::Prefix => Addresses::Prefixes(*count),
                };
                let ec2 = self.ec2.clone();
                let res = self
                    .pacer
                    .call("AssignPrivateIpAddresses", || {
                        let (ec2, id) = (ec2.clone(), id.clone());
                        async move { ec2.assign(&id, what).await }
                    })
                    .await;
                match res {
                    Ok(got) => {
                        let mut ds = self.state.lock();
                        for ip in got.ips {
                            let _ = ds.add_cidr(&id, Ipv4Net::host(ip), false);
                        }
                        for p in got.prefixes {
                            let _ = ds.add_cidr(&id, p, true);
                        }
                        Ok(())
                    }
                    Err(e) if e.is_insufficient_addresses() || e.is_insufficient_cidr() => {
                        self.note_capacity_error(&e);
                        Ok(())
                    }
                    Err(source) => Err(PoolError::Ec2 {
                        op: "assign",
                        source,
                    }),
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
                lock(&self.history).last_decrease = Some(self.state.now());
                Ok(())
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
            let mut ds = self.state.lock();
            for c in &cidrs {
                let _ = ds.add_cidr(eni, *c, prefixes);
            }
            return Err(PoolError::Ec2 {
                op: "release",
                source,
            });
        }
        tracing::info!(eni, count = cidrs.len(), prefixes, "released to EC2");
        Ok(())
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
            .map_err(|source| PoolError::Ec2 {
                op: "create ENI",
                source,
            })?;
        let device = (1..100u32)
            .find(|d| !used.iter().any(|(card, dev)| *card == 0 && dev == d))
            .unwrap_or(1);
        let mut tags = self.node.tags.clone();
        tags.insert(crate::ec2::TAG_CREATED_AT.into(), rfc3339(self.state.now()));
        let req = CreateEni {
            subnet_id: self.node.subnet_id.clone(),
            security_groups: self.node.security_groups.clone(),
            description: format!("{DESCRIPTION_PREFIX}{}", self.node.instance_id),
            tags,
            addresses: match kind {
                AddressKind::Ip => Addresses::Ips(count),
                AddressKind::Prefix => Addresses::Prefixes(count),
            },
        };
        let created = self
            .pacer
            .call("CreateNetworkInterface", || {
                let (ec2, req) = (ec2.clone(), req.clone());
                async move { ec2.create_eni(&req).await }
            })
            .await;
        let eni = match created {
            Ok(e) => e,
            Err(e) if e.is_insufficient_addresses() || e.is_insufficient_cidr() => {
                self.note_capacity_error(&e);
                return Ok(());
            }
            Err(source) => {
                return Err(PoolError::Ec2 {
                    op: "create ENI",
                    source,
                })
            }
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
                let _ = self
                    .pacer
                    .call("DeleteNetworkInterface", || {
                        let (ec2, id) = (ec2.clone(), eni.id.clone());
                        async move { not_found_ok(ec2.delete_eni(&id).await) }
                    })
                    .await;
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
                primary_ip: eni.primary_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                subnet_id: eni.subnet_id.clone(),
                subnet_cidr: self.node.subnet_cidr,
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
        tracing::info!(eni = %eni.id, device, "ENI created and attached");
        Ok(())
    }

    async fn free_eni(&self, id: &str) -> Result<(), PoolError> {
        // Out of the datastore first, so that nothing is assigned from it meanwhile.
        if self.state.lock().remove_eni(id, false).is_err() {
            return Ok(());
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

/// RFC 3339 (UTC, seconds) of a time since the Unix epoch.
pub fn rfc3339(t: Duration) -> String {
    let secs = t.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{IpamMetadata, MemoryStore};
    use crate::config::Config;
    use crate::datastore::{DataStore, IpamKey};
    use crate::ec2::fake::FakeEc2;
    use crate::ec2::InstanceTypeInfo;
    use crate::state::{Clock, TokioClock};

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
                tags: cfg.eni_tags(&instance_id),
                unmanaged_enis: 0,
            },
            Arc::new(Pacer::new(cfg.ec2)),
            cfg.pool_tick,
        );
        Node { ec2, state, pool }
    }

    fn pods(st: &PoolState, from: usize, n: usize) {
        for i in from..from + n {
            st.assign(
                &IpamKey::new("aws-cni", &format!("c{i}"), "eth0"),
                &IpamMetadata::default(),
            )
            .unwrap();
        }
    }

    fn unpods(st: &PoolState, from: usize, n: usize) {
        for i in from..from + n {
            st.unassign(&IpamKey::new("aws-cni", &format!("c{i}"), "eth0"))
                .unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn warm_eni_target_boot_grow_and_free_after_the_timers() {
        let n = node(&[], "10.0.0.0/20");
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 9, "primary filled");
        // One pod: available 8 < 9 → a whole new ENI.
        pods(&n.state, 0, 1);
        assert!(n.pool.is_low());
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().enis().len(), 2);
        assert_eq!(n.state.lock().usable_total(), 18);
        // Fill to 10 pods → third ENI.
        pods(&n.state, 1, 9);
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().enis().len(), 3);
        // Scale down to 0 pods: an ENI is freed only after cooldown and the minimum ENI age.
        unpods(&n.state, 0, 10);
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
    async fn throttling_and_5xx_are_retried() {
        let n = node(&[("WARM_IP_TARGET", "3")], "10.0.0.0/20");
        n.ec2
            .fail("AssignPrivateIpAddresses", "RequestLimitExceeded", 3);
        n.ec2.fail("AssignPrivateIpAddresses", "InternalError", 2);
        n.pool.settle().await.unwrap();
        assert_eq!(n.state.lock().usable_total(), 3);
        assert_eq!(n.ec2.count("AssignPrivateIpAddresses"), 6);
        let c = n.pool.pacer().counts.lock().unwrap()["AssignPrivateIpAddresses"];
        assert_eq!(c, (6, 5, 0));
        // A client error is not retried.
        n.ec2
            .fail("AssignPrivateIpAddresses", "UnauthorizedOperation", 1);
        pods(&n.state, 0, 1);
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
        let low = crate::server::pool_is_low(
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
        pods(&n.state, 0, 1);
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

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(Duration::from_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
    }
}
