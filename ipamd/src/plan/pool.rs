//! The pool planner: what the warm pool should do next, decided by the calculator's policy
//! (`subnet_calc::policy`, the same code the capacity planner simulates) over a view of the
//! datastore and the planner's memory of its own recent past (the last release, the last
//! time EC2 said the subnet was full, the recent cooling peak). Pure: time is a parameter,
//! and nothing here calls EC2 or takes a lock; [`crate::run::pool`] holds a planner and
//! carries its decisions out.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use subnet_calc::policy::{
    self, Decision, Demand, DemandSettings, DemandState, EniView, NodeLimits, PoolConfig, PoolInput,
};

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

/// The demand flavour's memory (`VPC_CNI_POLICY=demand`): its settings, the node's request
/// history, and the pods whose request failed for lack of an address and was not served
/// since.
#[derive(Debug, Clone)]
struct DemandMemory {
    settings: DemandSettings,
    state: DemandState,
    waiting: HashSet<String>,
}

/// The pool planner of one datastore.
#[derive(Debug, Clone)]
pub struct PoolPlanner {
    cfg: PoolConfig,
    limits: NodeLimits,
    unmanaged_enis: u32,
    trunk_slot: bool,
    memory: Memory,
    demand: Option<DemandMemory>,
}

impl PoolPlanner {
    /// A planner for a node with these settings and limits; `unmanaged_enis` attached ENIs
    /// take ENI slots but are never used.
    pub fn new(cfg: PoolConfig, limits: NodeLimits, unmanaged_enis: u32) -> Self {
        Self {
            cfg,
            limits,
            unmanaged_enis,
            trunk_slot: false,
            memory: Memory::default(),
            demand: None,
        }
    }

    /// Keeps one ENI slot free for the trunk ENI of security groups for pods until one is
    /// attached (`hasRoomForEni`'s `trunkSlot`): call with `true` when `ENABLE_POD_ENI` is on
    /// and the instance type is trunking compatible.
    pub fn with_trunk_slot(mut self, reserve: bool) -> Self {
        self.trunk_slot = reserve;
        self
    }

    /// Whether a slot is kept for a trunk in `view`: reserved and no trunk attached yet.
    fn reserve_trunk_slot(&self, view: &PoolView) -> bool {
        self.trunk_slot && !view.enis.iter().any(|e| e.trunk)
    }

    /// Sizes the pool from the node's own demand (the calculator's demand flavour), starting
    /// from `state` (restored from disk or rebuilt from the checkpoint).
    pub fn with_demand(mut self, settings: DemandSettings, state: DemandState) -> Self {
        self.demand = Some(DemandMemory {
            settings,
            state,
            waiting: HashSet::new(),
        });
        self
    }

    /// The demand history to save, when the demand flavour runs.
    pub fn demand_state(&self) -> Option<&DemandState> {
        self.demand.as_ref().map(|d| &d.state)
    }

    /// A pod (`key`: its container id and interface) asked for an address at `now`: `served`
    /// with a fresh assignment, or refused for lack of one. Each pod counts once as a request,
    /// however often the plugin retries; a refused pod waits until it is served.
    pub fn requested(&mut self, key: &str, served: bool, now: Duration) {
        let Some(d) = &mut self.demand else { return };
        let counted = if served {
            d.waiting.remove(key)
        } else {
            !d.waiting.insert(key.to_owned())
        };
        if !counted {
            d.state.note_requests(&d.settings, now, 1);
        }
    }

    fn demand_input<'a>(&'a self, input: &mut PoolInput<'a>) {
        if let Some(d) = &self.demand {
            input.demand = Some(Demand {
                settings: &d.settings,
                state: &d.state,
                waiting: u32::try_from(d.waiting.len()).unwrap_or(u32::MAX),
            });
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
        let (last_decrease, last_addresses, last_cidr) = (
            m.last_decrease,
            m.last_insufficient_addresses,
            m.last_insufficient_cidr,
        );
        if let Some(d) = &mut self.demand {
            d.state.observe(&d.settings, now, in_use(view));
        }
        let mut input = PoolInput::new(&view.enis);
        input.unmanaged_enis = self.unmanaged_enis;
        input.reserve_trunk_slot = self.reserve_trunk_slot(view);
        input.last_decrease = last_decrease;
        input.last_insufficient_addresses = last_addresses;
        input.last_insufficient_cidr = last_cidr;
        input.paused = paused;
        input.recent_cooling_peak = self.recent_cooling_peak();
        self.demand_input(&mut input);
        policy::decide(&self.cfg, &self.limits, &input, now)
    }

    /// The ENI to free now, if any (after a decision with `free_eni_phase`).
    pub fn eni_to_free<'v>(&self, view: &'v PoolView, now: Duration) -> Option<&'v str> {
        let mut input = PoolInput::new(&view.enis);
        input.unmanaged_enis = self.unmanaged_enis;
        input.reserve_trunk_slot = self.reserve_trunk_slot(view);
        input.last_decrease = self.memory.last_decrease;
        input.recent_cooling_peak = self.recent_cooling_peak();
        self.demand_input(&mut input);
        policy::choose_eni_to_free(&self.cfg, &self.limits, &input, now)
            .and_then(|i| view.eni_ids.get(i))
            .map(String::as_str)
    }

    /// Whether the pool is below its target at `now` (the demand flavour's target when it
    /// runs).
    pub fn is_low(&self, view: &PoolView, now: Duration) -> bool {
        if self.demand.is_none() {
            return is_low(&self.cfg, &self.limits, view);
        }
        let mut input = PoolInput::new(&view.enis);
        input.unmanaged_enis = self.unmanaged_enis;
        input.reserve_trunk_slot = self.reserve_trunk_slot(view);
        self.demand_input(&mut input);
        policy::below_target(&self.cfg, &self.limits, &input, now)
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

/// Addresses in use in `view`: assigned or cooling (the demand flavour's measure).
pub fn in_use(view: &PoolView) -> u32 {
    view.enis.iter().map(|e| e.assigned() + e.cooling()).sum()
}

/// Whether the node still has a free ENI slot for a trunk ENI (the reference's check before
/// it advertises `SecurityGroupsForPods` in the CNINode): `enis` attached and managed on card
/// 0 (the datastore's), below `max_enis` (`min(MAX_ENI, the instance's limit)`) less the
/// `unmanaged` ones.
pub fn trunk_slot_free(enis: usize, max_enis: u32, unmanaged: u32) -> bool {
    (enis as u64) < u64::from(max_enis.saturating_sub(unmanaged))
}

/// Whether a pool with these settings and limits is below its target.
pub fn is_low(cfg: &PoolConfig, limits: &NodeLimits, view: &PoolView) -> bool {
    policy::is_low(cfg, limits, &policy::stats(cfg, &view.enis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use subnet_calc::limits::Catalog;

    fn planner(demand: bool) -> PoolPlanner {
        // m5.large: 3 ENIs of 10 addresses.
        let lim = Catalog::embedded().get("m5.large").expect("m5.large");
        let cfg = PoolConfig {
            warm_ip_target: 0,
            warm_eni_target: 1,
            ..PoolConfig::default()
        };
        let p = PoolPlanner::new(cfg, NodeLimits::new(lim, None, None), 0);
        if demand {
            p.with_demand(
                DemandSettings::default(),
                DemandState::new(Duration::from_secs(1_000_000)),
            )
        } else {
            p
        }
    }

    fn full_eni() -> PoolView {
        PoolView {
            eni_ids: vec!["eni-0".into()],
            enis: vec![EniView {
                primary: true,
                ips: 9,
                ips_assigned: 9,
                ..EniView::default()
            }],
        }
    }

    fn full(id: &str, primary: bool, trunk: bool) -> (String, EniView) {
        (
            id.to_owned(),
            EniView {
                primary,
                trunk,
                ips: if trunk { 0 } else { 9 },
                ips_assigned: if trunk { 0 } else { 9 },
                ..EniView::default()
            },
        )
    }

    fn view(enis: Vec<(String, EniView)>) -> PoolView {
        let (eni_ids, enis) = enis.into_iter().unzip();
        PoolView { eni_ids, enis }
    }

    #[test]
    fn with_security_groups_for_pods_the_last_eni_slot_waits_for_the_trunk() {
        let t = Duration::from_secs(1_000);
        // m5.large: 3 ENI slots; two full ENIs leave one.
        let two_full = view(vec![
            full("eni-0", true, false),
            full("eni-1", false, false),
        ]);
        let mut plain = planner(false);
        let d = plain.decide(&two_full, t, false);
        assert!(
            matches!(d.change, Some(policy::PoolChange::CreateEni { .. })),
            "without the reservation the third ENI is created: {d:?}"
        );
        let mut sgp = planner(false).with_trunk_slot(true);
        let d = sgp.decide(&two_full, t, false);
        assert!(
            !matches!(d.change, Some(policy::PoolChange::CreateEni { .. })),
            "the last slot is kept for the trunk: {d:?}"
        );
        // Once the trunk is attached it takes that slot: still no third pool ENI.
        let with_trunk = view(vec![
            full("eni-0", true, false),
            full("eni-1", false, false),
            full("eni-t", false, true),
        ]);
        let d = sgp.decide(&with_trunk, t, false);
        assert!(
            !matches!(d.change, Some(policy::PoolChange::CreateEni { .. })),
            "{d:?}"
        );
        // One full ENI and a trunk: the reservation is over, the pool may grow.
        let one_and_trunk = view(vec![full("eni-0", true, false), full("eni-t", false, true)]);
        let d = sgp.decide(&one_and_trunk, t, false);
        assert!(
            matches!(d.change, Some(policy::PoolChange::CreateEni { .. })),
            "{d:?}"
        );
    }

    #[test]
    fn a_trunk_eni_is_never_chosen_to_be_freed() {
        let t = Duration::from_secs(100_000);
        let idle = |trunk: bool| EniView {
            trunk,
            ..EniView::default()
        };
        let mk = |trunk: bool| {
            view(vec![
                full("eni-0", true, false),
                (
                    "eni-x".to_owned(),
                    EniView {
                        ips: 9,
                        ips_assigned: 9,
                        ..EniView::default()
                    },
                ),
                ("eni-idle".to_owned(), idle(trunk)),
            ])
        };
        let p = planner(false);
        assert_eq!(
            p.eni_to_free(&mk(false), t),
            Some("eni-idle"),
            "an idle ENI goes"
        );
        assert_eq!(p.eni_to_free(&mk(true), t), None, "an idle trunk stays");
    }

    #[test]
    fn a_trunk_slot_is_free_below_the_managed_limit() {
        assert!(trunk_slot_free(2, 3, 0));
        assert!(!trunk_slot_free(3, 3, 0));
        assert!(!trunk_slot_free(2, 3, 1), "an unmanaged ENI takes a slot");
        assert!(!trunk_slot_free(0, 1, 2));
    }

    #[test]
    fn a_pod_counts_once_however_often_it_retries_and_waits_until_served() {
        let mut p = planner(true);
        let t = Duration::from_secs(1_000_010);
        for _ in 0..5 {
            p.requested("c1/eth0", false, t);
        }
        assert_eq!(p.demand.as_ref().map(|d| d.waiting.len()), Some(1));
        p.requested("c1/eth0", true, t);
        p.requested("c2/eth0", true, t);
        let d = p.demand.as_ref().expect("demand");
        assert!(d.waiting.is_empty());
        let e = d.state.estimate(&d.settings, t);
        assert!(e.expected_over(Duration::from_secs(60)) >= 1, "{e:?}");
        // Without the demand flavour nothing is remembered.
        let mut q = planner(false);
        q.requested("c1/eth0", false, t);
        assert!(q.demand_state().is_none());
    }

    #[test]
    fn a_full_pool_is_low_for_both_flavours_and_a_decision_records_the_history() {
        let t = Duration::from_secs(1_000_020);
        for demand in [false, true] {
            let mut p = planner(demand);
            let view = full_eni();
            assert!(p.is_low(&view, t), "demand {demand}");
            let d = p.decide(&view, t, false);
            assert!(d.change.is_some(), "demand {demand}: {d:?}");
            assert_eq!(d.demand.is_some(), demand);
        }
    }
}
