//! The datastore shared between the gRPC handlers and the pool manager, with its checkpoint
//! written by group commit.
//!
//! A change to assignments is made in memory under the datastore lock and joins the *open
//! batch*; one committer thread takes the open batch, snapshots the datastore (under the lock,
//! in memory), then writes, syncs and renames the checkpoint with no lock held, while later
//! changes gather in the next batch. The directory sync that makes the rename durable runs on
//! a second thread, overlapping the next batch's write (each snapshot holds everything before
//! it, so a later rename never loses an earlier batch). Every change of a batch is
//! acknowledged together once its directory sync returned, or undone (newest first) and
//! refused if its write failed. The traps, each with a test below:
//! 1. A change is acknowledged only by a write whose snapshot was taken after it: a write
//!    already in flight when the change arrives does not carry it.
//! 2. An idempotent repeat of an assignment that is not on disk yet waits for the batch that
//!    carries the original and fails with it (it would otherwise hand out an address that a
//!    failed write then takes back).
//! 3. A released address stays unusable (for pods and for the pool's release to EC2) until the
//!    release is on disk: a failed write gives it back to its pod, which must find it free.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, Notify};

use crate::store::checkpoint::{CheckpointError, CheckpointStore, FinishWrite, IpamMetadata};
use crate::store::datastore::{Assignment, DataStore, DsError, IpamKey, Unassignment};
use crate::store::family::{Family, V4};

/// Time since the Unix epoch, as the datastore and the policy see it.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Duration;
}

/// Wall-clock time at start, advanced by tokio's clock (so tests can pause and advance it).
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: Duration,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Starts now.
    pub fn new() -> Self {
        Self {
            base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.base + self.start.elapsed()
    }
}

/// A change to assignments that could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The datastore refused.
    #[error(transparent)]
    Datastore(#[from] DsError),
    /// The checkpoint write failed; every change of its batch was undone.
    #[error("assignment not recorded")]
    Checkpoint(#[source] Arc<CheckpointError>),
    /// The committer stopped before the change was written (the daemon is shutting down).
    #[error("assignment not recorded: the checkpoint writer has stopped")]
    CommitterStopped,
}

type Ack = oneshot::Sender<Result<(), Arc<CheckpointError>>>;

/// An in-memory change waiting for the write that records it, and how to undo it.
#[derive(Debug)]
enum Change<F: Family> {
    Assigned(IpamKey, Assignment<F>),
    Released(Unassignment<F>),
}

#[derive(Debug)]
struct Batch<F: Family> {
    changes: Vec<Change<F>>,
    acks: Vec<Ack>,
}

impl<F: Family> Default for Batch<F> {
    fn default() -> Self {
        Self {
            changes: Vec::new(),
            acks: Vec::new(),
        }
    }
}

impl<F: Family> Batch<F> {
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.acks.is_empty()
    }
}

/// Everything behind the datastore lock.
struct Inner<F: Family> {
    ds: DataStore<F>,
    /// Id of the batch accepting changes; lower ids are in flight or settled.
    open_id: u64,
    open: Batch<F>,
    /// Batches taken by the committer and not settled yet: at most one being written and one
    /// waiting for its directory sync.
    in_flight: BTreeMap<u64, Batch<F>>,
    /// Keys whose assignment is not on disk yet, with the batch that carries it (trap 2).
    undurable: HashMap<IpamKey, u64>,
    closed: bool,
}

impl<F: Family> Inner<F> {
    /// Registers an acknowledgement in batch `id` (open or in flight).
    fn ack_in(&mut self, id: u64) -> AckRx {
        let (tx, rx) = oneshot::channel();
        if id == self.open_id {
            self.open.acks.push(tx);
        } else if let Some(b) = self.in_flight.get_mut(&id) {
            b.acks.push(tx);
        } else {
            // Already settled (cannot happen: settled batches leave `undurable`); a write of
            // the open batch covers it all the same.
            self.open.acks.push(tx);
        }
        rx
    }
}

struct Shared<F: Family> {
    inner: Mutex<Inner<F>>,
    /// Wakes the committer (a change joined the open batch, or the state is dropped).
    wake: Condvar,
    store: Box<dyn CheckpointStore>,
    writes: AtomicU64,
    grouped: AtomicU64,
}

impl<F: Family> Shared<F> {
    fn lock(&self) -> MutexGuard<'_, Inner<F>> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The committer thread: one batch at a time is snapshotted, written and renamed into
    /// place, with the disk IO outside the lock; the directory sync that makes it durable is
    /// handed to the syncer thread (`synced`), so that the next batch's write overlaps it.
    fn commit_loop(&self, synced: std::sync::mpsc::SyncSender<(u64, FinishWrite)>) {
        loop {
            let (id, snapshot) = {
                let mut g = self.lock();
                while g.open.is_empty() && !g.closed {
                    g = match self.wake.wait(g) {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                }
                if g.open.is_empty() {
                    return;
                }
                let id = g.open_id;
                let batch = std::mem::take(&mut g.open);
                g.in_flight.insert(id, batch);
                g.open_id += 1;
                (id, g.ds.checkpoint_bytes())
            };
            crate::failpoint::hit(crate::failpoint::CHECKPOINT_BEFORE_WRITE);
            let res = self.store.write_bytes_staged(&snapshot);
            drop(snapshot);
            match res {
                Ok(finish) => {
                    if let Err(std::sync::mpsc::SendError((id, finish))) = synced.send((id, finish))
                    {
                        // The syncer is gone: finish here.
                        self.settle(id, finish());
                    }
                }
                Err(e) => self.settle(id, Err(e)),
            }
        }
    }

    /// The syncer thread: finishes staged writes in order and settles their batches.
    fn sync_loop(&self, staged: std::sync::mpsc::Receiver<(u64, FinishWrite)>) {
        for (id, finish) in staged {
            self.settle(id, finish());
        }
    }

    /// Acknowledges batch `id` (its write is durable) or undoes its changes, newest first, and
    /// refuses them (the write failed).
    fn settle(&self, id: u64, res: Result<(), CheckpointError>) {
        let mut g = self.lock();
        let batch = g.in_flight.remove(&id).unwrap_or_default();
        g.undurable.retain(|_, b| *b != id);
        let res = match res {
            Ok(()) => {
                for c in &batch.changes {
                    if let Change::Released(u) = c {
                        g.ds.confirm_unassign(u);
                    }
                }
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.grouped
                    .fetch_add(batch.acks.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, changes = batch.changes.len(), "checkpoint write failed: the batch's changes are undone");
                for c in batch.changes.iter().rev() {
                    match c {
                        Change::Assigned(k, a) => g.ds.undo_assign(k, a),
                        Change::Released(u) => {
                            if !g.ds.undo_unassign(u) {
                                tracing::warn!(ip = %u.ip, container = %u.key.short_container(), "release stands: the address is no longer free to give back");
                            }
                        }
                    }
                }
                Err(Arc::new(e))
            }
        };
        drop(g);
        for ack in batch.acks {
            let _ = ack.send(res.clone());
        }
    }
}

type AckRx = oneshot::Receiver<Result<(), Arc<CheckpointError>>>;

/// A change made in memory, durable once [`Commit::durable`] returns.
#[derive(Debug)]
#[must_use = "a change is acknowledged only once it is durable"]
pub struct Commit<T> {
    value: T,
    ack: Option<AckRx>,
    early: Option<Result<(), StateError>>,
}

fn outcome(
    r: Result<Result<(), Arc<CheckpointError>>, oneshot::error::RecvError>,
) -> Result<(), StateError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StateError::Checkpoint(e)),
        Err(_) => Err(StateError::CommitterStopped),
    }
}

impl<T> Commit<T> {
    fn done(value: T) -> Self {
        Self {
            value,
            ack: None,
            early: None,
        }
    }

    fn pending(value: T, ack: AckRx) -> Self {
        Self {
            value,
            ack: Some(ack),
            early: None,
        }
    }

    /// The change as made in memory (not yet known to be durable).
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Waits until the change is on disk (or its write failed and it was undone).
    pub async fn durable(self) -> Result<T, StateError> {
        let r = match (self.early, self.ack) {
            (Some(r), _) => r,
            (None, None) => Ok(()),
            (None, Some(rx)) => outcome(rx.await),
        };
        r.map(|()| self.value)
    }

    /// [`durable`](Self::durable) for threads outside the async runtime.
    pub fn wait(self) -> Result<T, StateError> {
        let r = match (self.early, self.ack) {
            (Some(r), _) => r,
            (None, None) => Ok(()),
            (None, Some(rx)) => outcome(rx.blocking_recv()),
        };
        r.map(|()| self.value)
    }

    /// Whether the outcome is known without waiting.
    pub fn is_settled(&mut self) -> bool {
        if self.early.is_some() {
            return true;
        }
        let Some(rx) = self.ack.as_mut() else {
            return true;
        };
        match rx.try_recv() {
            Ok(r) => self.early = Some(outcome(Ok(r))),
            Err(oneshot::error::TryRecvError::Empty) => return false,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.early = Some(Err(StateError::CommitterStopped))
            }
        }
        true
    }
}

/// The shared pool state.
pub struct PoolState<F: Family = V4> {
    shared: Arc<Shared<F>>,
    committer: Option<std::thread::JoinHandle<()>>,
    syncer: Option<std::thread::JoinHandle<()>>,
    clock: Arc<dyn Clock>,
    /// Woken when an assignment takes the pool low (immediate top-up).
    pub low: Notify,
    terminating: AtomicBool,
}

impl<F: Family> std::fmt::Debug for PoolState<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState").finish_non_exhaustive()
    }
}

/// The datastore, locked (see [`PoolState::lock`]).
pub struct DsGuard<'a, F: Family = V4>(MutexGuard<'a, Inner<F>>);

impl<F: Family> std::ops::Deref for DsGuard<'_, F> {
    type Target = DataStore<F>;
    fn deref(&self) -> &DataStore<F> {
        &self.0.ds
    }
}

impl<F: Family> std::ops::DerefMut for DsGuard<'_, F> {
    fn deref_mut(&mut self) -> &mut DataStore<F> {
        &mut self.0.ds
    }
}

/// Checkpoint write counters (for metrics and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Successful checkpoint writes.
    pub writes: u64,
    /// Changes and waits acknowledged by those writes.
    pub acknowledged: u64,
}

impl<F: Family> PoolState<F> {
    /// Wraps a datastore (already restored) and its checkpoint store, and starts the
    /// committer thread (stopped when the state is dropped, after its last batch).
    pub fn new(ds: DataStore<F>, store: Box<dyn CheckpointStore>, clock: Arc<dyn Clock>) -> Self {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                ds,
                open_id: 1,
                open: Batch::default(),
                in_flight: BTreeMap::new(),
                undurable: HashMap::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            store,
            writes: AtomicU64::new(0),
            grouped: AtomicU64::new(0),
        });
        // One batch may wait for the syncer while another is written: a bounded pipeline.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let s = shared.clone();
        let syncer = std::thread::Builder::new()
            .name("checkpoint-sync".into())
            .spawn(move || s.sync_loop(rx))
            .ok();
        let s = shared.clone();
        let committer = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || s.commit_loop(tx))
            .ok();
        if committer.is_none() {
            tracing::error!("could not start the checkpoint thread: assignments will be refused");
        }
        Self {
            shared,
            committer,
            syncer,
            clock,
            low: Notify::new(),
            terminating: AtomicBool::new(false),
        }
    }

    /// Now, per the state's clock.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Locks the datastore for reading or for pool changes that do not touch assignments
    /// (never held across disk IO: the committer writes outside it).
    pub fn lock(&self) -> DsGuard<'_, F> {
        DsGuard(self.shared.lock())
    }

    /// Checkpoint writes so far, and how many acknowledgements they carried.
    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            writes: self.shared.writes.load(Ordering::Relaxed),
            acknowledged: self.shared.grouped.load(Ordering::Relaxed),
        }
    }

    /// SIGTERM seen: no more growth or freeing.
    pub fn set_terminating(&self) {
        self.terminating.store(true, Ordering::SeqCst);
    }

    /// Whether SIGTERM was seen.
    pub fn terminating(&self) -> bool {
        self.terminating.load(Ordering::SeqCst)
    }

    fn enqueue(
        &self,
        mut g: MutexGuard<'_, Inner<F>>,
        change: Option<Change<F>>,
        batch: u64,
    ) -> AckRx {
        if let Some(c) = change {
            g.open.changes.push(c);
        }
        let rx = g.ack_in(batch);
        drop(g);
        self.shared.wake.notify_one();
        rx
    }

    /// Assigns an address in memory; the [`Commit`] is durable once the checkpoint holding it
    /// is on disk. An idempotent repeat is durable with the original assignment (trap 2).
    pub fn assign(
        &self,
        key: &IpamKey,
        md: &IpamMetadata,
    ) -> Result<Commit<Assignment<F>>, StateError> {
        if self.committer.is_none() {
            return Err(StateError::CommitterStopped);
        }
        let mut g = self.shared.lock();
        let a = g.ds.assign(key, md, self.clock.now())?;
        if !a.fresh {
            let Some(batch) = g.undurable.get(key).copied() else {
                return Ok(Commit::done(a));
            };
            let ack = self.enqueue(g, None, batch);
            return Ok(Commit::pending(a, ack));
        }
        let id = g.open_id;
        g.undurable.insert(key.clone(), id);
        let ack = self.enqueue(g, Some(Change::Assigned(key.clone(), a.clone())), id);
        Ok(Commit::pending(a, ack))
    }

    /// Releases the address `key` holds in memory; durable with the [`Commit`]. The address
    /// is handed out again only after that (trap 3).
    pub fn unassign(&self, key: &IpamKey) -> Result<Commit<Unassignment<F>>, StateError> {
        if self.committer.is_none() {
            return Err(StateError::CommitterStopped);
        }
        let mut g = self.shared.lock();
        let u = g.ds.unassign(key, self.clock.now())?;
        let id = g.open_id;
        let ack = self.enqueue(g, Some(Change::Released(u.clone())), id);
        Ok(Commit::pending(u, ack))
    }

    /// [`unassign`](Self::unassign), only while `key` still holds the address it got at
    /// `assigned_at` (`Ok(None)` otherwise: a DEL released it, or a new ADD for the same key
    /// was served since the caller looked). Same durability as a DEL's release.
    pub fn unassign_if_assigned_at(
        &self,
        key: &IpamKey,
        assigned_at: Duration,
    ) -> Result<Option<Commit<Unassignment<F>>>, StateError> {
        if self.committer.is_none() {
            return Err(StateError::CommitterStopped);
        }
        let mut g = self.shared.lock();
        if g.ds.assigned_at(key) != Some(assigned_at) {
            return Ok(None);
        }
        let u = g.ds.unassign(key, self.clock.now())?;
        let id = g.open_id;
        let ack = self.enqueue(g, Some(Change::Released(u.clone())), id);
        Ok(Some(Commit::pending(u, ack)))
    }

    /// Runs `f` on the datastore (forced removals, restore), then waits for a checkpoint
    /// written after it. Such changes are not undone when the write fails.
    pub async fn mutate_and_save<R>(
        &self,
        f: impl FnOnce(&mut DataStore<F>) -> R,
    ) -> Result<R, StateError> {
        let rx = {
            let mut g = self.shared.lock();
            let r = f(&mut g.ds);
            let id = g.open_id;
            (r, self.enqueue(g, None, id))
        };
        Commit::pending(rx.0, rx.1).durable().await
    }
}

impl<F: Family> Drop for PoolState<F> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        // The committer ends after its last batch and drops the syncer's channel; the
        // syncer ends once it has settled what was left.
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checkpoint::{CheckpointFile, MemoryStore};
    use crate::store::datastore::EniSpec;
    use std::sync::mpsc;

    fn datastore(addresses: u8, cooldown: Duration) -> DataStore {
        let mut ds = DataStore::new(false, false, false, cooldown);
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
        for n in 0..addresses {
            ds.add_cidr(
                "eni-0",
                format!("10.0.0.{}/32", 10 + n).parse().unwrap(),
                false,
            )
            .unwrap();
        }
        ds
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

    fn key(c: &str) -> IpamKey {
        IpamKey::new("aws-cni", c, "eth0")
    }

    fn md() -> IpamMetadata {
        IpamMetadata::default()
    }

    /// A store whose writes the test lets through one at a time: each write announces its
    /// snapshot on `started`, then waits for a verdict (true: written, false: failed).
    struct Gated {
        started: Mutex<mpsc::Sender<CheckpointFile>>,
        verdict: Mutex<mpsc::Receiver<bool>>,
        on_disk: Arc<Mutex<Option<CheckpointFile>>>,
    }

    impl CheckpointStore for Gated {
        fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError> {
            Ok(self.on_disk.lock().unwrap().clone())
        }
        fn write(&self, f: &CheckpointFile) -> Result<(), CheckpointError> {
            let _ = self.started.lock().unwrap().send(f.clone());
            if self.verdict.lock().unwrap().recv().unwrap_or(true) {
                *self.on_disk.lock().unwrap() = Some(f.clone());
                Ok(())
            } else {
                Err(CheckpointError::Write {
                    path: "<gated>".into(),
                    source: std::io::Error::other("injected"),
                })
            }
        }
    }

    struct Gate {
        started: mpsc::Receiver<CheckpointFile>,
        verdict: mpsc::Sender<bool>,
        on_disk: Arc<Mutex<Option<CheckpointFile>>>,
    }

    impl Gate {
        /// Waits for the next write to begin; returns the snapshot it writes.
        fn next_write(&self) -> CheckpointFile {
            self.started.recv().expect("a write begins")
        }
        fn let_through(&self, ok: bool) {
            self.verdict.send(ok).expect("committer alive");
        }
        fn on_disk_ips(&self) -> Vec<String> {
            ips(self.on_disk.lock().unwrap().as_ref())
        }
    }

    fn ips(f: Option<&CheckpointFile>) -> Vec<String> {
        f.map(|f| f.allocations.iter().map(|a| a.ipv4.clone()).collect())
            .unwrap_or_default()
    }

    fn gated(addresses: u8, cooldown: Duration) -> (PoolState, Gate) {
        let (stx, srx) = mpsc::channel();
        let (vtx, vrx) = mpsc::channel();
        let on_disk = Arc::new(Mutex::new(None));
        let store = Gated {
            started: Mutex::new(stx),
            verdict: Mutex::new(vrx),
            on_disk: on_disk.clone(),
        };
        let st = PoolState::new(
            datastore(addresses, cooldown),
            Box::new(store),
            Arc::new(TokioClock::new()),
        );
        (
            st,
            Gate {
                started: srx,
                verdict: vtx,
                on_disk,
            },
        )
    }

    #[test]
    fn an_assignment_is_on_disk_before_it_is_returned_and_undone_when_it_cannot_be() {
        let store = Arc::new(MemoryStore::default());
        let st = PoolState::new(
            datastore(1, Duration::from_secs(30)),
            Box::new(Shared(store.clone())),
            Arc::new(TokioClock::new()),
        );
        let k = key("c1");
        store.set_failing(true);
        assert!(matches!(
            st.assign(&k, &md()).unwrap().wait(),
            Err(StateError::Checkpoint(_))
        ));
        assert_eq!(st.lock().lookup(&k), None, "undone");
        store.set_failing(false);
        let a = st.assign(&k, &md()).unwrap().wait().unwrap();
        assert_eq!(
            store.current().unwrap().allocations[0].ipv4,
            a.ip.to_string()
        );
        let writes = store.writes();
        st.assign(&k, &md()).unwrap().wait().unwrap();
        assert_eq!(store.writes(), writes, "idempotent repeat writes nothing");
        store.set_failing(true);
        assert!(st.unassign(&k).unwrap().wait().is_err());
        assert_eq!(st.lock().lookup(&k), Some(a.ip), "unassign undone");
        store.set_failing(false);
        st.unassign(&k).unwrap().wait().unwrap();
        assert!(store.current().unwrap().allocations.is_empty());
    }

    #[test]
    fn a_change_made_while_a_write_is_in_flight_waits_for_the_next_write() {
        // Trap 1: the write in flight was snapshotted before the change.
        let (st, gate) = gated(4, Duration::from_secs(30));
        let a = st.assign(&key("a"), &md()).unwrap();
        let first = gate.next_write();
        assert_eq!(ips(Some(&first)).len(), 1);
        let mut b = st.assign(&key("b"), &md()).unwrap();
        gate.let_through(true);
        let a = a.wait().unwrap();
        assert!(
            !b.is_settled(),
            "acknowledged by a write that does not hold it"
        );
        let second = gate.next_write();
        assert!(ips(Some(&second)).contains(&b.value().ip.to_string()));
        gate.let_through(true);
        let b = b.wait().unwrap();
        assert_eq!(gate.on_disk_ips(), vec![a.ip.to_string(), b.ip.to_string()]);
    }

    #[test]
    fn a_repeat_of_an_assignment_not_yet_on_disk_waits_for_it_and_fails_with_it() {
        // Trap 2: the runtime retries an ADD while the first one's write is in flight.
        let (st, gate) = gated(4, Duration::from_secs(30));
        let first = st.assign(&key("a"), &md()).unwrap();
        gate.next_write();
        let mut repeat = st.assign(&key("a"), &md()).unwrap();
        assert!(!repeat.value().fresh);
        assert!(
            !repeat.is_settled(),
            "a repeat must not hand out an address not on disk"
        );
        gate.let_through(false);
        assert!(first.wait().is_err());
        assert!(
            matches!(repeat.wait(), Err(StateError::Checkpoint(_))),
            "the repeat fails with the write that carried the original"
        );
        assert_eq!(st.lock().lookup(&key("a")), None);
        // Once on disk, a repeat is answered at once.
        let again = st.assign(&key("a"), &md()).unwrap();
        gate.next_write();
        gate.let_through(true);
        let ip = again.wait().unwrap().ip;
        let mut settled = st.assign(&key("a"), &md()).unwrap();
        assert!(settled.is_settled());
        assert_eq!(settled.wait().unwrap().ip, ip);
    }

    #[test]
    fn a_release_not_yet_on_disk_is_not_handed_to_another_pod_and_returns_to_its_pod_if_the_write_fails(
    ) {
        // Trap 3, with no cooldown: only the pending release keeps the address from pod b.
        let (st, gate) = gated(1, Duration::ZERO);
        let a = st.assign(&key("a"), &md()).unwrap();
        gate.next_write();
        gate.let_through(true);
        let a = a.wait().unwrap();
        let del = st.unassign(&key("a")).unwrap();
        gate.next_write();
        assert!(
            matches!(
                st.assign(&key("b"), &md()),
                Err(StateError::Datastore(DsError::NoAvailableIp))
            ),
            "the address of a release not on disk went to another pod"
        );
        assert!(
            st.lock()
                .releasable("eni-0", false, 5, st.now(), false)
                .is_empty(),
            "the pool could give it back to EC2"
        );
        gate.let_through(false);
        assert!(del.wait().is_err());
        assert_eq!(
            st.lock().lookup(&key("a")),
            Some(a.ip),
            "pod a keeps its address"
        );
        assert_eq!(st.lock().assignments().len(), 1, "and nobody else holds it");
        // The retried DEL frees it for good.
        let del = st.unassign(&key("a")).unwrap();
        gate.next_write();
        gate.let_through(true);
        del.wait().unwrap();
        let b = st.assign(&key("b"), &md()).unwrap();
        gate.next_write();
        gate.let_through(true);
        assert_eq!(b.wait().unwrap().ip, a.ip);
    }

    #[test]
    fn a_failed_write_undoes_its_whole_batch_and_the_next_write_carries_only_what_stands() {
        let (st, gate) = gated(4, Duration::from_secs(30));
        let x = st.assign(&key("x"), &md()).unwrap();
        gate.next_write();
        // These two gather in one batch behind the write in flight.
        let a = st.assign(&key("a"), &md()).unwrap();
        let b = st.assign(&key("b"), &md()).unwrap();
        gate.let_through(true);
        x.wait().unwrap();
        let batch = gate.next_write();
        assert_eq!(ips(Some(&batch)).len(), 3, "one write for both");
        gate.let_through(false);
        assert!(a.wait().is_err() && b.wait().is_err());
        assert_eq!(st.lock().assignments().len(), 1);
        let c = st.assign(&key("c"), &md()).unwrap();
        let next = gate.next_write();
        gate.let_through(true);
        let c = c.wait().unwrap();
        assert_eq!(ips(Some(&next)).len(), 2);
        assert!(gate.on_disk_ips().contains(&c.ip.to_string()));
        assert_eq!(st.commit_stats().writes, 2);
    }

    #[test]
    fn the_datastore_lock_is_free_while_the_checkpoint_is_written() {
        let (st, gate) = gated(4, Duration::from_secs(30));
        let a = st.assign(&key("a"), &md()).unwrap();
        gate.next_write();
        assert!(
            st.shared.inner.try_lock().is_ok(),
            "lock held across disk IO"
        );
        let b = st.assign(&key("b"), &md()).unwrap();
        gate.let_through(true);
        a.wait().unwrap();
        gate.next_write();
        gate.let_through(true);
        b.wait().unwrap();
    }

    #[test]
    fn concurrent_requests_share_one_write() {
        let (st, gate) = gated(20, Duration::from_secs(30));
        let st = Arc::new(st);
        let first = st.assign(&key("first"), &md()).unwrap();
        gate.next_write();
        let pending: Vec<_> = (0..8)
            .map(|i| {
                let st = st.clone();
                std::thread::spawn(move || st.assign(&key(&format!("c{i}")), &md()).unwrap())
            })
            .map(|t| t.join().unwrap())
            .collect();
        gate.let_through(true);
        first.wait().unwrap();
        gate.next_write();
        gate.let_through(true);
        for p in pending {
            p.wait().unwrap();
        }
        assert_eq!(gate.on_disk_ips().len(), 9);
        assert_eq!(
            st.commit_stats(),
            CommitStats {
                writes: 2,
                acknowledged: 9
            }
        );
    }

    /// A store whose two steps (write + rename, then directory sync) the test lets through
    /// separately.
    struct TwoStep {
        events: Mutex<mpsc::Sender<&'static str>>,
        write_ok: Mutex<mpsc::Receiver<bool>>,
        sync_ok: Arc<Mutex<mpsc::Receiver<bool>>>,
        sync_events: Arc<Mutex<mpsc::Sender<&'static str>>>,
        on_disk: Arc<Mutex<Option<CheckpointFile>>>,
    }

    impl CheckpointStore for TwoStep {
        fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError> {
            Ok(self.on_disk.lock().unwrap().clone())
        }
        fn write(&self, _: &CheckpointFile) -> Result<(), CheckpointError> {
            unreachable!("the committer stages its writes")
        }
        fn write_staged(
            &self,
            f: &CheckpointFile,
        ) -> Result<crate::store::checkpoint::FinishWrite, CheckpointError> {
            let fail = || CheckpointError::Write {
                path: "<two-step>".into(),
                source: std::io::Error::other("injected"),
            };
            let _ = self.events.lock().unwrap().send("write");
            if !self.write_ok.lock().unwrap().recv().unwrap_or(true) {
                return Err(fail());
            }
            *self.on_disk.lock().unwrap() = Some(f.clone());
            let (ok, ev) = (self.sync_ok.clone(), self.sync_events.clone());
            Ok(Box::new(move || {
                let _ = ev.lock().unwrap().send("sync");
                if ok.lock().unwrap().recv().unwrap_or(true) {
                    Ok(())
                } else {
                    Err(fail())
                }
            }))
        }
    }

    #[test]
    fn a_batch_is_acknowledged_after_its_directory_sync_which_overlaps_the_next_write() {
        let (ev_tx, ev) = mpsc::channel();
        let (sev_tx, sev) = mpsc::channel();
        let (write_ok, wrx) = mpsc::channel();
        let (sync_ok, srx) = mpsc::channel();
        let on_disk = Arc::new(Mutex::new(None));
        let st = PoolState::new(
            datastore(4, Duration::from_secs(30)),
            Box::new(TwoStep {
                events: Mutex::new(ev_tx),
                write_ok: Mutex::new(wrx),
                sync_ok: Arc::new(Mutex::new(srx)),
                sync_events: Arc::new(Mutex::new(sev_tx)),
                on_disk: on_disk.clone(),
            }),
            Arc::new(TokioClock::new()),
        );
        let mut a = st.assign(&key("a"), &md()).unwrap();
        assert_eq!(ev.recv().unwrap(), "write");
        write_ok.send(true).unwrap();
        assert_eq!(sev.recv().unwrap(), "sync");
        assert!(!a.is_settled(), "acknowledged before its directory sync");
        // The next batch is written while the first one's directory sync is pending.
        let b = st.assign(&key("b"), &md()).unwrap();
        assert_eq!(ev.recv().unwrap(), "write");
        write_ok.send(true).unwrap();
        assert!(!a.is_settled());
        // The first sync fails: its batch is undone and refused; the second still stands.
        sync_ok.send(false).unwrap();
        assert!(a.wait().is_err());
        assert_eq!(sev.recv().unwrap(), "sync");
        sync_ok.send(true).unwrap();
        let b = b.wait().unwrap();
        assert_eq!(st.lock().lookup(&key("a")), None);
        assert_eq!(st.lock().lookup(&key("b")), Some(b.ip));
        // The refused assignment rode along in the second file (snapshotted before the undo);
        // the next write drops it.
        let c = st.assign(&key("c"), &md()).unwrap();
        assert_eq!(ev.recv().unwrap(), "write");
        write_ok.send(true).unwrap();
        assert_eq!(sev.recv().unwrap(), "sync");
        sync_ok.send(true).unwrap();
        let c = c.wait().unwrap();
        let file = on_disk.lock().unwrap().clone().unwrap();
        let mut holders: Vec<_> = file
            .allocations
            .iter()
            .map(|a| (a.container_id.as_str(), a.ipv4.clone()))
            .collect();
        holders.sort();
        assert_eq!(
            holders,
            vec![("b", b.ip.to_string()), ("c", c.ip.to_string())]
        );
    }

    #[tokio::test]
    async fn forced_changes_wait_for_a_write_after_them() {
        let store = Arc::new(MemoryStore::default());
        let st = PoolState::new(
            datastore(2, Duration::from_secs(30)),
            Box::new(Shared(store.clone())),
            Arc::new(TokioClock::new()),
        );
        st.assign(&key("a"), &md())
            .unwrap()
            .durable()
            .await
            .unwrap();
        let lost = st
            .mutate_and_save(|ds| ds.remove_cidr("eni-0", "10.0.0.10/32".parse().unwrap(), true))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lost, vec![key("a")]);
        assert!(store.current().unwrap().allocations.is_empty());
    }
}
