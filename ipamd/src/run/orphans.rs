//! The orphan sweep: releases addresses held by pods that no longer exist on the node.
//!
//! How an orphan happens: the runtime gives up on an ADD (its timeout) and sends the DEL; when
//! ipamd serves that DEL before the late AddNetwork (two connections, either task may run
//! first), the DEL finds nothing and the ADD then assigns an address to a pod that is gone.
//! Nothing would ever release it before the next restart's checkpoint normalisation.
//!
//! The rule, each sweep: one fresh dump of the host's links ([`VethProbe::snapshot`]); an
//! assignment older than the grace (measured from before the dump) whose pod has no host veth
//! (a link whose name ends with the pod's [`vpc_cni_net::names::pod_hash`], whatever the
//! prefix) is a suspect; a suspect still absent on the next sweep, still held by the same
//! assignment (same key, same assignment time), is released through the DEL's durable path
//! (the address returns to the pool only once the checkpoint without it is on disk).
//! Assignments without a pod namespace or name are never touched (their veth cannot be
//! named), as the restore does. A failed dump forgets the suspects: absence must be seen on
//! two consecutive sweeps.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::commit::PoolState;
use crate::store::datastore::{short_id, IpamKey};
use crate::store::family::{Family, V4};

/// Whether the host veth of pod (namespace, name) exists.
pub type VethCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Where the host veths are read from: each call is one fresh look (one link dump).
#[async_trait::async_trait]
pub trait VethProbe: Send + Sync {
    /// The host veths as they are now.
    async fn snapshot(&self) -> Result<VethCheck, String>;
}

/// The links of the daemon's own network namespace (read-only; one netlink dump per call).
pub struct HostVeths {
    nl: vpc_cni_net::Netlink,
}

impl HostVeths {
    /// Opens a netlink socket in the current network namespace.
    pub fn current() -> Result<Self, vpc_cni_net::NetError> {
        Ok(Self {
            nl: vpc_cni_net::Netlink::current()?,
        })
    }
}

#[async_trait::async_trait]
impl VethProbe for HostVeths {
    async fn snapshot(&self) -> Result<VethCheck, String> {
        let links = self
            .nl
            .links()
            .await
            .map_err(|e| format!("listing host links: {e}"))?;
        Ok(veth_check_from_names(
            links.into_iter().map(|l| l.name).collect(),
        ))
    }
}

/// Every pod's veth is present: for harnesses that serve gRPC without creating veths (their
/// assignments are never dropped at restore nor released by the sweep).
pub struct AllVethsPresent;

#[async_trait::async_trait]
impl VethProbe for AllVethsPresent {
    async fn snapshot(&self) -> Result<VethCheck, String> {
        Ok(Arc::new(|_: &str, _: &str| true))
    }
}

/// The same check on every call (tests: a pod set fixed in advance).
pub struct FixedVeths(pub VethCheck);

#[async_trait::async_trait]
impl VethProbe for FixedVeths {
    async fn snapshot(&self) -> Result<VethCheck, String> {
        Ok(self.0.clone())
    }
}

/// Length of [`vpc_cni_net::names::pod_hash`].
const POD_HASH_LEN: usize = 11;

/// A veth check over a fixed list of link names: a pod's veth exists when a link name ends
/// with its hash (whatever the veth prefix).
pub fn veth_check_from_names(names: Vec<String>) -> VethCheck {
    let suffixes: HashSet<String> = names
        .iter()
        .filter_map(|n| n.get(n.len().checked_sub(POD_HASH_LEN)?..))
        .map(str::to_owned)
        .collect();
    Arc::new(move |ns: &str, name: &str| {
        suffixes.contains(&vpc_cni_net::names::pod_hash(ns, name, 0))
    })
}

/// One released orphan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The address (as text: either family).
    pub ip: String,
    /// The key that held it.
    pub key: IpamKey,
    /// `namespace/name` of the pod.
    pub pod: String,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Assignments past the grace whose veth is absent for the first time (released on the
    /// next sweep if still absent).
    pub suspects: usize,
    /// Released this sweep.
    pub released: Vec<Released>,
}

/// The sweep's state between runs.
pub struct OrphanSweep<F: Family = V4> {
    state: Arc<PoolState<F>>,
    probe: Arc<dyn VethProbe>,
    grace: Duration,
    /// Suspects of the last sweep: key → the assignment time seen then.
    suspects: HashMap<IpamKey, Duration>,
    counter: Option<prometheus::IntCounter>,
}

impl<F: Family> OrphanSweep<F> {
    /// A sweep over `state`'s assignments, releasing those older than `grace`.
    pub fn new(state: Arc<PoolState<F>>, probe: Arc<dyn VethProbe>, grace: Duration) -> Self {
        Self {
            state,
            probe,
            grace,
            suspects: HashMap::new(),
            counter: None,
        }
    }

    /// Counts every release in `c` (`awscni_orphaned_ips_released_total`).
    pub fn with_counter(mut self, c: prometheus::IntCounter) -> Self {
        self.counter = Some(c);
        self
    }

    /// One sweep (see the module docs).
    pub async fn sweep(&mut self) -> Result<SweepReport, String> {
        // The grace is measured from before the dump: a pod younger than the grace then may
        // be between its ADD and its veth.
        let before = self.state.now();
        let check = match self.probe.snapshot().await {
            Ok(c) => c,
            Err(e) => {
                self.suspects.clear();
                return Err(e);
            }
        };
        let held = self.state.lock().held();
        let mut next = HashMap::new();
        let mut report = SweepReport::default();
        for h in held {
            let md = &h.metadata;
            if md.pod_namespace.is_empty() || md.pod_name.is_empty() {
                continue;
            }
            if h.assigned_at.saturating_add(self.grace) > before {
                continue;
            }
            if check(&md.pod_namespace, &md.pod_name) {
                continue;
            }
            if self.suspects.get(&h.key) != Some(&h.assigned_at) {
                next.insert(h.key, h.assigned_at);
                continue;
            }
            let pod = format!("{}/{}", md.pod_namespace, md.pod_name);
            let commit = match self.state.unassign_if_assigned_at(&h.key, h.assigned_at) {
                Ok(Some(c)) => c,
                // Released or re-assigned since the datastore was read: not an orphan any more.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(pod = %pod, container = short_id(&h.key.container_id), error = %e, "orphaned address not released");
                    continue;
                }
            };
            match commit.durable().await {
                Ok(u) => {
                    tracing::info!(ip = %u.ip, pod = %pod, container = short_id(&h.key.container_id), "released an orphaned address: the pod's host veth is gone");
                    if let Some(c) = &self.counter {
                        c.inc();
                    }
                    report.released.push(Released {
                        ip: u.ip.to_string(),
                        key: h.key,
                        pod,
                    });
                }
                Err(e) => {
                    // The release was undone (the checkpoint write failed): the next sweeps
                    // start over with it.
                    tracing::warn!(pod = %pod, container = short_id(&h.key.container_id), error = %e, "orphaned address not released: checkpoint write failed");
                }
            }
        }
        report.suspects = next.len();
        self.suspects = next;
        Ok(report)
    }

    /// Sweeps every `period` until `rx` says stop; nothing while the daemon is terminating.
    pub async fn run(mut self, period: Duration, mut rx: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = rx.changed() => return,
            }
            if self.state.terminating() {
                self.suspects.clear();
                continue;
            }
            match self.sweep().await {
                Ok(r) if r.suspects > 0 => {
                    tracing::debug!(
                        suspects = r.suspects,
                        "orphan sweep: pods without a host veth (released next sweep if still absent)"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "orphan sweep skipped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checkpoint::{
        CheckpointError, CheckpointFile, CheckpointStore, IpamMetadata, MemoryStore,
    };
    use crate::store::commit::Clock;
    use crate::store::datastore::{DataStore, EniSpec};
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    const GRACE: Duration = Duration::from_secs(300);
    const T0: Duration = Duration::from_secs(1_000_000);

    struct ManualClock(Mutex<Duration>);
    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    struct Shared(Arc<MemoryStore>);
    impl CheckpointStore for Shared {
        fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError> {
            self.0.read()
        }
        fn write(&self, f: &CheckpointFile) -> Result<(), CheckpointError> {
            self.0.write(f)
        }
    }

    /// The pods whose veth the probe reports (namespace `default`), settable between sweeps;
    /// `fail` makes the next snapshots fail. Counts its snapshots (one dump per sweep).
    #[derive(Default)]
    struct Probe {
        present: Mutex<BTreeSet<String>>,
        fail: Mutex<bool>,
        dumps: Mutex<u32>,
    }

    #[async_trait::async_trait]
    impl VethProbe for Probe {
        async fn snapshot(&self) -> Result<VethCheck, String> {
            *self.dumps.lock().unwrap() += 1;
            if *self.fail.lock().unwrap() {
                return Err("injected: links not listed".into());
            }
            let names: Vec<String> = self
                .present
                .lock()
                .unwrap()
                .iter()
                .map(|p| vpc_cni_net::names::host_veth_name("eni", "default", p, 0))
                .collect();
            Ok(veth_check_from_names(names))
        }
    }

    impl Probe {
        fn set(&self, pods: &[&str]) {
            *self.present.lock().unwrap() = pods.iter().map(|p| (*p).to_owned()).collect();
        }
    }

    struct Rig {
        state: Arc<PoolState>,
        clock: Arc<ManualClock>,
        store: Arc<MemoryStore>,
        probe: Arc<Probe>,
        sweep: OrphanSweep,
        counter: prometheus::IntCounter,
    }

    fn rig() -> Rig {
        let mut ds = DataStore::new(false, false, false, Duration::ZERO);
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
        for n in 0..8 {
            ds.add_cidr(
                "eni-0",
                format!("10.0.0.{}/32", 10 + n).parse().unwrap(),
                false,
            )
            .unwrap();
        }
        let clock = Arc::new(ManualClock(Mutex::new(T0)));
        let store = Arc::new(MemoryStore::with(None));
        let state = Arc::new(PoolState::new(
            ds,
            Box::new(Shared(store.clone())),
            clock.clone(),
        ));
        let probe = Arc::new(Probe::default());
        let counter = prometheus::IntCounter::new("orphans", "test").unwrap();
        let sweep =
            OrphanSweep::new(state.clone(), probe.clone(), GRACE).with_counter(counter.clone());
        Rig {
            state,
            clock,
            store,
            probe,
            sweep,
            counter,
        }
    }

    fn key(pod: &str) -> IpamKey {
        IpamKey::new("aws-cni", &format!("{pod}-0123456789abcdef0123"), "eth0")
    }

    impl Rig {
        fn advance(&self, d: Duration) {
            *self.clock.0.lock().unwrap() += d;
        }
        async fn add(&self, pod: &str) {
            self.add_named(pod, "default", pod).await;
        }
        async fn add_named(&self, pod: &str, ns: &str, name: &str) {
            let md = IpamMetadata {
                pod_namespace: ns.into(),
                pod_name: name.into(),
                interfaces_count: 1,
            };
            self.state
                .assign(&key(pod), &md)
                .unwrap()
                .durable()
                .await
                .unwrap();
        }
        fn holds(&self, pod: &str) -> bool {
            self.state.lock().lookup(&key(pod)).is_some()
        }
        fn on_disk(&self, pod: &str) -> bool {
            self.store.current().is_some_and(|f| {
                f.allocations
                    .iter()
                    .any(|a| a.container_id == key(pod).container_id)
            })
        }
        async fn sweep(&mut self) -> SweepReport {
            self.sweep.sweep().await.expect("sweep")
        }
    }

    fn released(r: &SweepReport) -> Vec<&str> {
        r.released.iter().map(|x| x.pod.as_str()).collect()
    }

    #[tokio::test]
    async fn a_pod_without_veth_is_released_after_the_grace_on_the_second_sweep() {
        let mut r = rig();
        r.add("gone").await;
        r.add("live").await;
        r.probe.set(&["live"]);
        // Inside the grace: never a suspect, however many sweeps.
        r.advance(GRACE - Duration::from_secs(1));
        for _ in 0..3 {
            let rep = r.sweep().await;
            assert_eq!(rep, SweepReport::default());
        }
        assert!(r.holds("gone"));
        // Past the grace: a suspect on the first sweep, still held and on disk.
        r.advance(Duration::from_secs(1));
        let rep = r.sweep().await;
        assert_eq!((rep.suspects, rep.released.len()), (1, 0));
        assert!(r.holds("gone") && r.on_disk("gone"));
        assert_eq!(r.counter.get(), 0);
        // Second consecutive absence: released, durably, counted; the live pod is kept.
        let rep = r.sweep().await;
        assert_eq!(released(&rep), vec!["default/gone"]);
        assert_eq!(rep.suspects, 0);
        assert!(!r.holds("gone") && !r.on_disk("gone"));
        assert!(r.holds("live") && r.on_disk("live"));
        assert_eq!(r.counter.get(), 1);
        // One dump per sweep, not per pod.
        assert_eq!(*r.probe.dumps.lock().unwrap(), 5);
        // The address is free again (past its zero cooldown): the 8 addresses serve 7 more
        // pods besides the live one.
        r.advance(Duration::from_secs(1));
        for i in 0..7 {
            r.add(&format!("next{i}")).await;
        }
        assert_eq!(r.state.lock().assignments().len(), 8);
        assert_eq!(r.sweep().await, SweepReport::default());
    }

    #[tokio::test]
    async fn a_veth_that_appears_between_sweeps_keeps_the_pod() {
        let mut r = rig();
        r.add("slow").await;
        r.advance(GRACE * 2);
        assert_eq!(r.sweep().await.suspects, 1);
        r.probe.set(&["slow"]);
        assert_eq!(r.sweep().await, SweepReport::default());
        assert!(r.holds("slow"));
        // Gone again: the count starts over (two more sweeps).
        r.probe.set(&[]);
        assert_eq!(r.sweep().await.suspects, 1);
        assert!(r.holds("slow"));
        assert_eq!(released(&r.sweep().await), vec!["default/slow"]);
    }

    #[tokio::test]
    async fn a_new_assignment_for_the_same_key_is_not_the_suspect() {
        let mut r = rig();
        r.add("again").await;
        r.advance(GRACE);
        assert_eq!(r.sweep().await.suspects, 1);
        // DEL and a new ADD with the same key between the sweeps: a young assignment.
        r.state
            .unassign(&key("again"))
            .unwrap()
            .durable()
            .await
            .unwrap();
        r.advance(Duration::from_secs(1));
        r.add("again").await;
        assert_eq!(r.sweep().await, SweepReport::default());
        assert!(r.holds("again"));
        // Old enough and still without veth: released after two more sweeps.
        r.advance(GRACE);
        assert_eq!(r.sweep().await.suspects, 1);
        assert_eq!(released(&r.sweep().await), vec!["default/again"]);
    }

    #[tokio::test]
    async fn a_failed_dump_or_write_starts_the_count_over_and_keeps_the_address() {
        let mut r = rig();
        r.add("a").await;
        r.advance(GRACE);
        assert_eq!(r.sweep().await.suspects, 1);
        *r.probe.fail.lock().unwrap() = true;
        assert!(r.sweep.sweep().await.is_err());
        *r.probe.fail.lock().unwrap() = false;
        // Not consecutive: a suspect again, not released.
        assert_eq!(r.sweep().await.suspects, 1);
        assert!(r.holds("a"));
        // The release's checkpoint write fails: undone, the address still held.
        r.store.set_failing(true);
        let rep = r.sweep().await;
        assert!(rep.released.is_empty());
        assert!(r.holds("a") && r.on_disk("a"));
        assert_eq!(r.counter.get(), 0);
        r.store.set_failing(false);
        assert_eq!(r.sweep().await.suspects, 1);
        assert_eq!(released(&r.sweep().await), vec!["default/a"]);
        assert!(!r.on_disk("a"));
    }

    #[tokio::test]
    async fn pods_without_a_name_are_never_released() {
        let mut r = rig();
        r.add_named("anon", "", "").await;
        r.add_named("nons", "", "web").await;
        r.advance(GRACE * 10);
        for _ in 0..3 {
            assert_eq!(r.sweep().await, SweepReport::default());
        }
        assert!(r.holds("anon") && r.holds("nons"));
    }

    #[tokio::test]
    async fn all_present_never_releases() {
        let r = rig();
        r.add("p").await;
        r.advance(GRACE * 10);
        let mut s = OrphanSweep::new(r.state.clone(), Arc::new(AllVethsPresent), GRACE);
        for _ in 0..3 {
            assert_eq!(s.sweep().await.unwrap(), SweepReport::default());
        }
        assert!(r.holds("p"));
    }

    #[test]
    fn veth_check_matches_the_hash_suffix_whatever_the_prefix() {
        let hash = vpc_cni_net::names::pod_hash("default", "web-0", 0);
        let check = veth_check_from_names(vec![
            "lo".into(),
            "é".into(),
            "ünïcode-name-x".into(),
            format!("vlan{hash}"),
        ]);
        assert!(check("default", "web-0"));
        assert!(!check("default", "web-1"));
        assert!(!check("other", "web-0"));
    }
}
