//! The pool planner: what the warm pool should do next, decided by the calculator's policy
//! (`subnet_calc::policy`, the same code the capacity planner simulates) over a view of the
//! datastore and the planner's memory of its own recent past (the last release, the last
//! time EC2 said the subnet was full, the recent cooling peak). Pure: time is a parameter,
//! and nothing here calls EC2 or takes a lock; [`crate::run::pool`] holds a planner and
//! carries its decisions out.

use std::collections::VecDeque;
use std::time::Duration;

use subnet_calc::policy::{self, Decision, EniView, NodeLimits, PoolConfig, PoolInput};

use crate::store::datastore::DataStore;

/// Kinds of pool decision the pool manager executes, the `kind` label of
/// `awscni_pool_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolDecision {
    /// Assign secondary IPs or prefixes to an attached ENI.
    Assign,
    /// Create and attach a new ENI.
    CreateEni,
    /// Release (unassign) surplus IPs or prefixes from an ENI.
    Release,
    /// Detach and delete a surplus ENI.
    FreeEni,
}

impl PoolDecision {
    /// Every kind, in label order.
    pub const ALL: [PoolDecision; 4] = [
        PoolDecision::Assign,
        PoolDecision::CreateEni,
        PoolDecision::Release,
        PoolDecision::FreeEni,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolDecision::Assign => "assign",
            PoolDecision::CreateEni => "create_eni",
            PoolDecision::Release => "release",
            PoolDecision::FreeEni => "free_eni",
        }
    }
}

/// The pool as the policy sees it: each ENI's counts, in the datastore's order, with its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    /// ENI ids, index for index with `enis`.
    pub eni_ids: Vec<String>,
    /// Per-ENI counts.
    pub enis: Vec<EniView>,
}

impl PoolView {
    /// The view of `ds` at `now` (cooling counts depend on the time).
    pub fn of(ds: &DataStore, now: Duration) -> Self {
        let (eni_ids, enis) = ds.views(now);
        Self { eni_ids, enis }
    }
}

/// What the planner remembers between decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Memory {
    /// The last release (the policy spaces releases by its decrease interval).
    last_decrease: Option<Duration>,
    /// The last time EC2 answered that the subnet has no free address.
    last_insufficient_addresses: Option<Duration>,
    /// The last time EC2 answered that the subnet has no free aligned /28.
    last_insufficient_cidr: Option<Duration>,
    /// Cooling addresses seen at each decision in the churn window.
    cooling: VecDeque<(Duration, u32)>,
}

/// The pool planner of one datastore.
#[derive(Debug, Clone)]
pub struct PoolPlanner {
    cfg: PoolConfig,
    limits: NodeLimits,
    unmanaged_enis: u32,
    memory: Memory,
}

impl PoolPlanner {
    /// A planner for a node with these settings and limits; `unmanaged_enis` attached ENIs
    /// take ENI slots but are never used.
    pub fn new(cfg: PoolConfig, limits: NodeLimits, unmanaged_enis: u32) -> Self {
        Self {
            cfg,
            limits,
            unmanaged_enis,
            memory: Memory::default(),
        }
    }

    /// The policy settings.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The node's limits.
    pub fn limits(&self) -> &NodeLimits {
        &self.limits
    }

    fn recent_cooling_peak(&self) -> u32 {
        self.memory
            .cooling
            .iter()
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(0)
    }

    /// The next pool change at `now`. `paused`: the node is terminating or cordoned, so the
    /// pool must not grow. Records the cooling sample the churn window looks back on.
    pub fn decide(&mut self, view: &PoolView, now: Duration, paused: bool) -> Decision {
        let cooling: u32 = view.enis.iter().map(|v| v.cooling()).sum();
        let window = self.cfg.timers.churn_window;
        let m = &mut self.memory;
        m.cooling.push_back((now, cooling));
        while m
            .cooling
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
        {
            m.cooling.pop_front();
        }
        let mut input = PoolInput::new(&view.enis);
        input.unmanaged_enis = self.unmanaged_enis;
        input.last_decrease = m.last_decrease;
        input.last_insufficient_addresses = m.last_insufficient_addresses;
        input.last_insufficient_cidr = m.last_insufficient_cidr;
        input.paused = paused;
        input.recent_cooling_peak = self.recent_cooling_peak();
        policy::decide(&self.cfg, &self.limits, &input, now)
    }

    /// The ENI to free now, if any (after a decision with `free_eni_phase`).
    pub fn eni_to_free<'v>(&self, view: &'v PoolView, now: Duration) -> Option<&'v str> {
        let mut input = PoolInput::new(&view.enis);
        input.unmanaged_enis = self.unmanaged_enis;
        input.last_decrease = self.memory.last_decrease;
        input.recent_cooling_peak = self.recent_cooling_peak();
        policy::choose_eni_to_free(&self.cfg, &self.limits, &input, now)
            .and_then(|i| view.eni_ids.get(i))
            .map(String::as_str)
    }

    /// Whether the pool is below its target.
    pub fn is_low(&self, view: &PoolView) -> bool {
        is_low(&self.cfg, &self.limits, view)
    }

    /// Addresses or prefixes were released at `now`.
    pub fn released(&mut self, now: Duration) {
        self.memory.last_decrease = Some(now);
    }

    /// EC2 said at `now` that the subnet has no free address (`prefixes`: no free aligned
    /// /28): growth of that kind backs off.
    pub fn subnet_full(&mut self, now: Duration, prefixes: bool) {
        if prefixes {
            self.memory.last_insufficient_cidr = Some(now);
        } else {
            self.memory.last_insufficient_addresses = Some(now);
        }
    }
}

/// Whether a pool with these settings and limits is below its target.
pub fn is_low(cfg: &PoolConfig, limits: &NodeLimits, view: &PoolView) -> bool {
    policy::is_low(cfg, limits, &policy::stats(cfg, &view.enis))
}
