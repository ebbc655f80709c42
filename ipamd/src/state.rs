//! The datastore shared between the gRPC handlers and the pool manager, with its checkpoint:
//! every change to assignments is written durably before it is acknowledged, and undone if
//! the write fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::checkpoint::{CheckpointError, CheckpointStore, IpamMetadata};
use crate::datastore::{Assignment, DataStore, DsError, IpamKey, Unassignment};

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
    /// The checkpoint write failed; the change was undone.
    #[error("assignment not recorded")]
    Checkpoint(#[from] CheckpointError),
}

/// The shared pool state.
pub struct PoolState {
    ds: Mutex<DataStore>,
    store: Box<dyn CheckpointStore>,
    clock: Arc<dyn Clock>,
    /// Woken when an assignment takes the pool low (immediate top-up).
    pub low: Notify,
    terminating: AtomicBool,
}

impl std::fmt::Debug for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState").finish_non_exhaustive()
    }
}

impl PoolState {
    /// Wraps a datastore (already restored) and its checkpoint store.
    pub fn new(ds: DataStore, store: Box<dyn CheckpointStore>, clock: Arc<dyn Clock>) -> Self {
        Self {
            ds: Mutex::new(ds),
            store,
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

    /// Locks the datastore for reading or for pool changes that do not touch assignments.
    pub fn lock(&self) -> MutexGuard<'_, DataStore> {
        match self.ds.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
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

    /// Assigns (blocking: writes the checkpoint). Idempotent repeats write nothing.
    pub fn assign(&self, key: &IpamKey, md: &IpamMetadata) -> Result<Assignment, StateError> {
        let mut ds = self.lock();
        let a = ds.assign(key, md, self.clock.now())?;
        if a.fresh {
            if let Err(e) = self.store.write(&ds.checkpoint()) {
                ds.undo_assign(key);
                return Err(e.into());
            }
        }
        Ok(a)
    }

    /// Unassigns (blocking: writes the checkpoint).
    pub fn unassign(&self, key: &IpamKey) -> Result<Unassignment, StateError> {
        let mut ds = self.lock();
        let u = ds.unassign(key, self.clock.now())?;
        if let Err(e) = self.store.write(&ds.checkpoint()) {
            ds.undo_unassign(&u);
            return Err(e.into());
        }
        Ok(u)
    }

    /// Runs `f` on the datastore, then writes the checkpoint (after forced removals).
    pub fn mutate_and_save<R>(
        &self,
        f: impl FnOnce(&mut DataStore) -> R,
    ) -> Result<R, CheckpointError> {
        let mut ds = self.lock();
        let r = f(&mut ds);
        self.store.write(&ds.checkpoint())?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::MemoryStore;
    use crate::datastore::EniSpec;

    fn state() -> (Arc<PoolState>, Arc<MemoryStore>) {
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
        ds.add_cidr("eni-0", "10.0.0.6/32".parse().unwrap(), false)
            .unwrap();
        let store = Arc::new(MemoryStore::default());
        struct Shared(Arc<MemoryStore>);
        impl CheckpointStore for Shared {
            fn read(&self) -> Result<Option<crate::checkpoint::CheckpointFile>, CheckpointError> {
                self.0.read()
            }
            fn write(&self, f: &crate::checkpoint::CheckpointFile) -> Result<(), CheckpointError> {
                self.0.write(f)
            }
        }
        let st = PoolState::new(
            ds,
            Box::new(Shared(store.clone())),
            Arc::new(TokioClock::new()),
        );
        (Arc::new(st), store)
    }

    #[tokio::test]
    async fn an_assignment_is_on_disk_before_it_is_returned_and_undone_when_it_cannot_be() {
        let (st, store) = state();
        let k = IpamKey::new("aws-cni", "c1", "eth0");
        store.set_failing(true);
        assert!(matches!(
            st.assign(&k, &IpamMetadata::default()),
            Err(StateError::Checkpoint(_))
        ));
        assert_eq!(st.lock().lookup(&k), None, "undone");
        store.set_failing(false);
        let a = st.assign(&k, &IpamMetadata::default()).unwrap();
        assert_eq!(
            store.current().unwrap().allocations[0].ipv4,
            a.ip.to_string()
        );
        let writes = store.writes();
        st.assign(&k, &IpamMetadata::default()).unwrap();
        assert_eq!(store.writes(), writes, "idempotent repeat writes nothing");
        store.set_failing(true);
        assert!(st.unassign(&k).is_err());
        assert_eq!(st.lock().lookup(&k), Some(a.ip), "unassign undone");
        store.set_failing(false);
        st.unassign(&k).unwrap();
        assert!(store.current().unwrap().allocations.is_empty());
    }
}
