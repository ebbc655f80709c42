//! The warm-pool policy: what ipamd asks EC2 for, and what it gives back.
//!
//! The policy is a set of pure functions from (configuration, node limits, pool state, time) to
//! a decision. ipamd runs it every tick against its datastore and executes the decision through
//! EC2; the planner and the timeline simulator run the very same functions against a model node.
//!
//! One tick has two phases, as in the reference daemon:
//! 1. [`decide`] looks at the pool and returns at most one [`PoolChange`] (grow one ENI, create
//!    an ENI, or release unused addresses) plus whether the ENI-release phase may run;
//! 2. after the change was carried out, [`choose_eni_to_free`] looks at the new state and names
//!    at most one ENI to detach and delete.
//!
//! Three flavours are provided:
//! - [`Flavour::Reference`] decides exactly as the AWS VPC CNI's ipamd (v1.23.1) does, quirks
//!   included: IPs in cooldown count as available, target 0 oscillates, MINIMUM_IP_TARGET alone
//!   caps the pool, an `InsufficientCidrBlocks` pauses all growth for two minutes.
//! - [`Flavour::Ours`] keeps the same targets and limits with these changes:
//!   IPs in cooldown are not counted as available when sizing the pool, and are never released
//!   to EC2 while cooling; a shrink (release of addresses or of an ENI) is only planned when the
//!   pool would not be low right after it, so no configuration oscillates; with IP targets and
//!   `WARM_IP_TARGET=0` the pool still grows when no address is free, so pods beyond
//!   MINIMUM_IP_TARGET get addresses; in prefix mode, `InsufficientCidrBlocks` makes the pool
//!   grow with /32 secondary IPs instead of pausing; and addresses of the other kind (left over
//!   after toggling prefix mode) count toward the pool.
//!
//! - [`Flavour::Demand`] is `Ours` with the warm pool sized from the node's own demand
//!   ([`crate::demand`]): the caller passes its [`DemandSettings`] and [`DemandState`] in
//!   [`PoolInput::demand`]; the user's explicit targets stay floors.
//!
//! Each of our changes is a separate switch in [`Rules`], so the daemon can expose each as its
//! own setting; [`Flavour`] names the presets.
//!
//! ENIs are referred to by their index in the slice of [`EniView`]s the caller passes in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::demand::{Demand, DemandSettings, DemandState, Estimate};
use crate::limits::InstanceLimits;

/// Addresses in one /28 prefix.
pub const IPS_PER_PREFIX: u32 = 16;

/// Which decision rules to follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// The AWS VPC CNI's ipamd, quirks included.
    #[default]
    Reference,
    /// Our policy: same targets, no oscillation, cooldown-aware, prefix fallback.
    Ours,
    /// Ours, with the warm pool sized from the node's own demand ([`crate::demand`]); the
    /// user's explicit targets stay floors. Needs [`PoolInput::demand`]; without it, decides as
    /// [`Flavour::Ours`].
    Demand,
}

impl std::str::FromStr for Flavour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reference" => Ok(Self::Reference),
            "ours" => Ok(Self::Ours),
            "demand" => Ok(Self::Demand),
            _ => Err(format!(
                "unknown policy flavour `{s}` (expected `reference`, `ours` or `demand`)"
            )),
        }
    }
}

impl Flavour {
    /// The rules this preset stands for.
    pub fn rules(self) -> Rules {
        match self {
            Self::Reference => Rules::REFERENCE,
            Self::Ours | Self::Demand => Rules::OURS,
        }
    }

    /// The flavour's name as written in settings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Ours => "ours",
            Self::Demand => "demand",
        }
    }
}

/// Where the policy departs from the reference daemon; every switch off is the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rules {
    /// Addresses in cooldown are not counted as available when sizing the pool, and are not
    /// released to EC2 while cooling. So that steady pod churn does not turn into an
    /// assign/release cycle, shrinking keeps room for as many cooling addresses as the recent
    /// peak ([`PoolInput::recent_cooling_peak`]).
    pub exclude_cooling: bool,
    /// Release addresses or an ENI only when the pool would not be low right after it, and not
    /// at all while the node is paused (no oscillation).
    pub stable_shrink: bool,
    /// With IP targets and `WARM_IP_TARGET=0`, grow when no address is free, so pods beyond
    /// `MINIMUM_IP_TARGET` get addresses.
    pub grow_past_minimum: bool,
    /// Prefix mode: after `InsufficientCidrBlocks`, grow with /32 secondary IPs instead of
    /// pausing; addresses of both kinds count toward the pool and serve pods.
    pub prefix_fallback: bool,
    /// The executor repeats the decision within the same tick while the pool is low.
    pub immediate_top_up: bool,
}

impl Rules {
    /// The AWS VPC CNI's ipamd.
    pub const REFERENCE: Rules = Rules {
        exclude_cooling: false,
        stable_shrink: false,
        grow_past_minimum: false,
        prefix_fallback: false,
        immediate_top_up: false,
    };
    /// Ours: every improvement on.
    pub const OURS: Rules = Rules {
        exclude_cooling: true,
        stable_shrink: true,
        grow_past_minimum: true,
        prefix_fallback: true,
        immediate_top_up: true,
    };

    /// The preset these rules match, if any.
    pub fn flavour(&self) -> Option<Flavour> {
        if *self == Self::REFERENCE {
            Some(Flavour::Reference)
        } else if *self == Self::OURS {
            Some(Flavour::Ours)
        } else {
            None
        }
    }
}

/// The policy's timers (reference defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timers {
    /// `IP_COOLDOWN_PERIOD`: an unassigned pod IP is not handed out again for this long.
    pub ip_cooldown: Duration,
    /// Releases of unused addresses happen at most this often.
    pub decrease_interval: Duration,
    /// An ENI younger than this is never freed.
    pub min_eni_age: Duration,
    /// Growth pauses this long after the subnet ran out of addresses (or, in the reference, of
    /// aligned /28 blocks).
    pub insufficient_capacity_backoff: Duration,
    /// Window over which the executor reports the most addresses in cooldown at once
    /// ([`PoolInput::recent_cooling_peak`]); used with [`Rules::exclude_cooling`].
    #[serde(default = "default_churn_window")]
    pub churn_window: Duration,
}

fn default_churn_window() -> Duration {
    Duration::from_secs(600)
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            ip_cooldown: Duration::from_secs(30),
            decrease_interval: Duration::from_secs(30),
            min_eni_age: Duration::from_secs(60),
            insufficient_capacity_backoff: Duration::from_secs(120),
            churn_window: default_churn_window(),
        }
    }
}

/// The pool settings (ipamd's environment variables, already validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Decision rules.
    pub rules: Rules,
    /// Effective prefix mode (requested and supported by the instance).
    pub prefix_delegation: bool,
    /// `WARM_ENI_TARGET`.
    pub warm_eni_target: u32,
    /// `WARM_IP_TARGET` (0 = unset).
    pub warm_ip_target: u32,
    /// `MINIMUM_IP_TARGET` (0 = unset).
    pub minimum_ip_target: u32,
    /// `WARM_PREFIX_TARGET`.
    pub warm_prefix_target: u32,
    /// `AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG`: the primary ENI carries no pod addresses.
    pub custom_networking: bool,
    /// Timers.
    pub timers: Timers,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            rules: Rules::REFERENCE,
            prefix_delegation: false,
            warm_eni_target: 1,
            warm_ip_target: 0,
            minimum_ip_target: 0,
            warm_prefix_target: 0,
            custom_networking: false,
            timers: Timers::default(),
        }
    }
}

impl PoolConfig {
    /// "IP target mode": `WARM_IP_TARGET` or `MINIMUM_IP_TARGET` is set, and overrides the ENI
    /// and prefix targets.
    pub fn ip_target_mode(&self) -> bool {
        self.warm_ip_target > 0 || self.minimum_ip_target > 0
    }

    /// Checks the combination the reference entrypoint refuses: prefix mode with every target 0.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefix_delegation
            && self.warm_ip_target == 0
            && self.minimum_ip_target == 0
            && self.warm_prefix_target == 0
        {
            return Err("prefix delegation needs WARM_PREFIX_TARGET, WARM_IP_TARGET or MINIMUM_IP_TARGET above 0".into());
        }
        Ok(())
    }
}

/// The node's limits as the policy sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLimits {
    /// ENIs the daemon may use: the default card's limit, lowered by `MAX_ENI`.
    pub max_enis: u32,
    /// Address slots per ENI (`IPv4 per ENI - 1`): /32s, or /28 prefixes in prefix mode.
    pub slots_per_eni: u32,
    /// Kubelet max pods: growth stops once the pool holds this many addresses.
    pub max_pods: Option<u32>,
}

impl NodeLimits {
    /// Limits for `instance`, with `MAX_ENI` (values below 1 mean "instance limit").
    pub fn new(instance: &InstanceLimits, max_eni: Option<u32>, max_pods: Option<u32>) -> Self {
        let max_enis = match max_eni {
            Some(m) if m >= 1 => m.min(instance.max_enis),
            _ => instance.max_enis,
        };
        Self {
            max_enis,
            slots_per_eni: instance.slots_per_eni(),
            max_pods,
        }
    }

    /// Pod addresses one ENI can hold in the given mode.
    pub fn ips_per_eni(&self, prefix_mode: bool) -> u32 {
        if prefix_mode {
            self.slots_per_eni * IPS_PER_PREFIX
        } else {
            self.slots_per_eni
        }
    }
}

/// One ENI's pool state at the moment of the decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniView {
    /// The instance's primary ENI (device 0).
    pub primary: bool,
    /// In a subnet excluded from pod addresses (`kubernetes.io/role/cni=0`).
    pub excluded: bool,
    /// A trunk ENI (security groups for pods): never allocated from or freed.
    pub trunk: bool,
    /// An EFA ENI: never freed.
    pub efa: bool,
    /// When the ENI was attached (same clock as `now`).
    pub created_at: Duration,
    /// Secondary /32 addresses on the ENI.
    pub ips: u32,
    /// Of those, assigned to pods.
    pub ips_assigned: u32,
    /// Of those, unassigned less than `IP_COOLDOWN_PERIOD` ago.
    pub ips_cooling: u32,
    /// /28 prefixes on the ENI.
    pub prefixes: u32,
    /// Addresses inside the prefixes assigned to pods.
    pub prefix_ips_assigned: u32,
    /// Addresses inside the prefixes in cooldown.
    pub prefix_ips_cooling: u32,
    /// Prefixes with no assigned address.
    pub free_prefixes: u32,
    /// Prefixes with no assigned address and none in cooldown.
    pub cold_free_prefixes: u32,
}

impl EniView {
    /// Address slots in use (/32s and /28s both take one).
    pub fn slots_used(&self) -> u32 {
        self.ips + self.prefixes
    }

    /// Assigned addresses of both kinds.
    pub fn assigned(&self) -> u32 {
        self.ips_assigned + self.prefix_ips_assigned
    }

    /// Addresses of both kinds in cooldown.
    pub fn cooling(&self) -> u32 {
        self.ips_cooling + self.prefix_ips_cooling
    }

    /// (total, assigned, cooling) addresses the rules count toward the pool: only the current
    /// mode's kind (reference), or both kinds.
    fn counted(&self, cfg: &PoolConfig) -> (u32, u32, u32) {
        let pfx = self.prefixes * IPS_PER_PREFIX;
        match (cfg.rules.prefix_fallback, cfg.prefix_delegation) {
            (true, _) => (self.ips + pfx, self.assigned(), self.cooling()),
            (false, true) => (pfx, self.prefix_ips_assigned, self.prefix_ips_cooling),
            (false, false) => (self.ips, self.ips_assigned, self.ips_cooling),
        }
    }

    /// Addresses the rules allow to release: (/32s, prefixes). In the reference, cooldown does
    /// not protect an address from being released.
    fn releasable(&self, cfg: &PoolConfig) -> (u32, u32) {
        if cfg.rules.exclude_cooling {
            (
                self.ips - self.ips_assigned - self.ips_cooling,
                self.cold_free_prefixes,
            )
        } else {
            (self.ips - self.ips_assigned, self.free_prefixes)
        }
    }

    fn free_prefixes_counted(&self, cfg: &PoolConfig) -> u32 {
        if cfg.rules.exclude_cooling {
            self.cold_free_prefixes
        } else {
            self.free_prefixes
        }
    }
}

/// Everything besides the ENIs the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolInput<'a> {
    /// The managed ENIs, in the order the executor prefers (primary first).
    pub enis: &'a [EniView],
    /// Attached ENIs the daemon must not manage (tagged `no_manage`, EFA-only, other cards).
    pub unmanaged_enis: u32,
    /// Keep one ENI slot free for a trunk ENI (security groups for pods, none attached yet).
    pub reserve_trunk_slot: bool,
    /// When addresses were last released.
    pub last_decrease: Option<Duration>,
    /// When EC2 last answered `InsufficientFreeAddressesInSubnet`.
    pub last_insufficient_addresses: Option<Duration>,
    /// When EC2 last answered `InsufficientCidrBlocks` (no aligned free /28).
    pub last_insufficient_cidr: Option<Duration>,
    /// No growth and no ENI release (terminating, or node unschedulable).
    pub paused: bool,
    /// Most addresses in cooldown at once over the last [`Timers::churn_window`] (0 without
    /// history).
    pub recent_cooling_peak: u32,
    /// Demand-driven sizing ([`Flavour::Demand`]): the settings and the node's history. `None`
    /// decides by the fixed targets alone.
    pub demand: Option<Demand<'a>>,
}

impl<'a> PoolInput<'a> {
    /// An input with only ENIs and no history.
    pub fn new(enis: &'a [EniView]) -> Self {
        Self {
            enis,
            unmanaged_enis: 0,
            reserve_trunk_slot: false,
            last_decrease: None,
            last_insufficient_addresses: None,
            last_insufficient_cidr: None,
            paused: false,
            recent_cooling_peak: 0,
            demand: None,
        }
    }
}

/// Pool totals as the rules count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Addresses in the pool.
    pub total: u32,
    /// Assigned to pods.
    pub assigned: u32,
    /// In cooldown.
    pub cooling: u32,
    /// Free for sizing: `total - assigned`, less `cooling` under [`Rules::exclude_cooling`].
    pub available: u32,
    /// Prefixes on all ENIs.
    pub total_prefixes: u32,
    /// Prefixes with no assigned address (ours: and none cooling).
    pub free_prefixes: u32,
    /// Managed ENIs.
    pub enis: u32,
    /// Of those, excluded from pod addresses.
    pub excluded_enis: u32,
    /// Addresses a shrink must leave for churn: the recent cooling peak less what is cooling
    /// now (only with [`Rules::exclude_cooling`]).
    pub headroom: u32,
}

impl PoolStats {
    /// The totals with the churn headroom taken out of `available`, for judging a shrink.
    fn less_headroom(&self) -> PoolStats {
        PoolStats {
            available: self.available.saturating_sub(self.headroom),
            ..*self
        }
    }
}

fn headroom(cfg: &PoolConfig, input: &PoolInput<'_>, s: &PoolStats) -> u32 {
    if cfg.rules.exclude_cooling {
        input.recent_cooling_peak.saturating_sub(s.cooling)
    } else {
        0
    }
}

/// Pool totals over `enis`.
pub fn stats(cfg: &PoolConfig, enis: &[EniView]) -> PoolStats {
    let mut s = PoolStats::default();
    for e in enis {
        s.enis += 1;
        s.total_prefixes += e.prefixes;
        s.free_prefixes += e.free_prefixes_counted(cfg);
        if e.excluded {
            s.excluded_enis += 1;
            continue;
        }
        let (t, a, c) = e.counted(cfg);
        s.total += t;
        s.assigned += a;
        s.cooling += c;
    }
    s.available = available(cfg, &s);
    s
}

fn available(cfg: &PoolConfig, s: &PoolStats) -> u32 {
    if cfg.rules.exclude_cooling {
        s.total.saturating_sub(s.assigned + s.cooling)
    } else {
        s.total.saturating_sub(s.assigned)
    }
}

/// The kind of address a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressKind {
    /// /32 secondary IPs.
    Ip,
    /// /28 prefixes.
    Prefix,
}

/// Addresses to release from one ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Release {
    /// ENI index.
    pub eni: usize,
    /// Unassigned /32s to release.
    pub ips: u32,
    /// Unassigned /28s to release.
    pub prefixes: u32,
}

/// One change to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PoolChange {
    /// `AssignPrivateIpAddresses` on an attached ENI.
    Assign {
        /// ENI index.
        eni: usize,
        /// What to assign.
        kind: AddressKind,
        /// How many.
        count: u32,
    },
    /// Create, attach and pre-load a new ENI.
    CreateEni {
        /// What to pre-load.
        kind: AddressKind,
        /// How many.
        count: u32,
    },
    /// `UnassignPrivateIpAddresses`: give unassigned addresses back to the subnet. The executor
    /// picks which ones (any unassigned address of the kind; ours: not in cooldown).
    Release(Vec<Release>),
}

/// Why the pool did or did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Within targets.
    Steady,
    /// Below target: growing.
    Low,
    /// Below target but every ENI is full and no ENI slot is left.
    AtCapacity,
    /// Below target but growth is paused after a subnet-capacity error.
    Backoff,
    /// Below target but the node is paused (terminating or unschedulable).
    Paused,
    /// Kubelet max pods reached: no growth.
    MaxPods,
    /// Above target: releasing.
    High,
    /// Above target, waiting for the release interval.
    HighWaiting,
}

/// The first phase's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The change to make, if any.
    pub change: Option<PoolChange>,
    /// Why.
    pub reason: Reason,
    /// The pool totals the decision was made on.
    pub stats: PoolStats,
    /// Whether [`choose_eni_to_free`] should run after the change.
    pub free_eni_phase: bool,
    /// The demand-driven levels the decision used ([`PoolInput::demand`] given).
    pub demand: Option<DemandLevels>,
}

/// The levels of one demand-driven decision, in addresses ([`Flavour::Demand`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DemandLevels {
    /// The history's estimate.
    pub estimate: Estimate,
    /// The user's explicit warm target in addresses (`WARM_IP_TARGET`, `WARM_PREFIX_TARGET`
    /// x 16, or `WARM_ENI_TARGET` x addresses per ENI when it is a floor).
    pub floor: u32,
    /// Grow when fewer addresses than this are available (not assigned, not cooling): the
    /// floor less the addresses cooling down, the burst, or `min_warm`, whichever is highest.
    pub low: u32,
    /// A growth brings the available addresses to this: `low` plus one step, the rise in use
    /// over the window scaled to [`DemandSettings::grow_batch`].
    pub grow_to: u32,
    /// Addresses the pool keeps: the most in use over the hold period plus `grow_to`, and at
    /// least `MINIMUM_IP_TARGET` (whole prefixes in prefix mode).
    pub keep: u32,
    /// The smallest release worth an EC2 call: [`DemandSettings::min_release`] or one step if
    /// larger; a prefix in prefix mode.
    pub min_release: u32,
}

/// The demand-driven levels for pool totals `s` at `now`.
pub fn demand_levels(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    demand: &Demand<'_>,
    s: &PoolStats,
    now: Duration,
) -> DemandLevels {
    let ds = demand.settings;
    let e = demand.state.estimate(ds, now);
    let pd = cfg.prefix_delegation;
    let floor = if cfg.ip_target_mode() {
        cfg.warm_ip_target
    } else if pd {
        cfg.warm_prefix_target * IPS_PER_PREFIX
    } else if ds.eni_target_is_floor {
        cfg.warm_eni_target * limits.slots_per_eni
    } else {
        0
    };
    // The floors keep their documented meaning: free addresses, those cooling down included
    // (as the reference counts them); the demand term counts only usable ones.
    let low = floor
        .saturating_sub(s.cooling)
        .max(e.burst)
        .max(ds.min_warm);
    let now_used = s.assigned + s.cooling;
    let step = e
        .growth_over(now_used, ds.grow_batch)
        .clamp(1, limits.ips_per_eni(pd).max(1));
    let grow_to = low.saturating_add(step);
    let used = e.peak_used.max(now_used);
    let mut keep = used.saturating_add(grow_to).max(cfg.minimum_ip_target);
    if pd {
        keep = round_up(keep, IPS_PER_PREFIX);
    }
    DemandLevels {
        estimate: e,
        floor,
        low,
        grow_to,
        keep,
        min_release: if pd {
            IPS_PER_PREFIX
        } else {
            step.max(ds.min_release)
        },
    }
}

fn target_state(cfg: &PoolConfig, s: &PoolStats) -> (i64, i64) {
    let w = i64::from(cfg.warm_ip_target);
    let m = i64::from(cfg.minimum_ip_target);
    let (total, avail, assigned) = (
        i64::from(s.total),
        i64::from(s.available),
        i64::from(s.assigned),
    );
    let mut short = (w - avail).max(0).max(m - total);
    if cfg.rules.grow_past_minimum && w == 0 && avail == 0 {
        // Pods beyond MINIMUM_IP_TARGET still need addresses.
        short = short.max(1);
    }
    let over = (avail - w).max(0).min(total - m).max(0);
    if !cfg.prefix_delegation {
        return (short, over);
    }
    let ipp = i64::from(IPS_PER_PREFIX);
    let short_p = (short + ipp - 1) / ipp;
    let need_w = (assigned + w + ipp - 1) / ipp;
    let need_m = (m + ipp - 1) / ipp;
    let tp = i64::from(s.total_prefixes);
    let over_p = i64::from(s.free_prefixes)
        .min(tp - need_w)
        .max(0)
        .min(tp - need_m)
        .max(0);
    (short_p, over_p)
}

/// Whether the pool is below its target (growth wanted).
pub fn is_low(cfg: &PoolConfig, limits: &NodeLimits, s: &PoolStats) -> bool {
    if limits.max_pods.is_some_and(|mp| s.total >= mp) {
        return false;
    }
    if cfg.ip_target_mode() {
        return target_state(cfg, s).0 > 0;
    }
    let (wt, unit) = if cfg.prefix_delegation {
        (cfg.warm_prefix_target, IPS_PER_PREFIX)
    } else {
        (cfg.warm_eni_target, limits.slots_per_eni)
    };
    s.available < unit * wt || (wt == 0 && s.available == 0)
}

fn is_high(cfg: &PoolConfig, s: &PoolStats) -> bool {
    if cfg.ip_target_mode() {
        target_state(cfg, s).1 > 0
    } else {
        cfg.prefix_delegation && s.free_prefixes > cfg.warm_prefix_target
    }
}

fn within(now: Duration, at: Option<Duration>, window: Duration) -> bool {
    at.is_some_and(|t| now.saturating_sub(t) < window)
}

/// Phase one of a tick: at most one change to the pool.
pub fn decide(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    now: Duration,
) -> Decision {
    if let Some(d) = &input.demand {
        return decide_demand(cfg, limits, input, d, now);
    }
    let mut s = stats(cfg, input.enis);
    s.headroom = headroom(cfg, input, &s);
    let free_eni_phase = !input.paused && should_free_enis(cfg, limits, input, &s);
    let done = |change, reason| Decision {
        change,
        reason,
        stats: s,
        free_eni_phase,
        demand: None,
    };
    if is_low(cfg, limits, &s) {
        if input.paused {
            return done(None, Reason::Paused);
        }
        let backoff = cfg.timers.insufficient_capacity_backoff;
        let no_addresses = within(now, input.last_insufficient_addresses, backoff);
        let no_blocks = within(now, input.last_insufficient_cidr, backoff);
        let fallback = cfg.rules.prefix_fallback && no_blocks && cfg.prefix_delegation;
        if no_addresses || (no_blocks && !fallback) {
            return done(None, Reason::Backoff);
        }
        return match grow(cfg, limits, input, &s, fallback) {
            Some(c) => done(Some(c), Reason::Low),
            None => done(None, Reason::AtCapacity),
        };
    }
    if limits.max_pods.is_some_and(|mp| s.total >= mp) && !is_high(cfg, &s) {
        return done(None, Reason::MaxPods);
    }
    if cfg.rules.stable_shrink && input.paused {
        return done(None, Reason::Steady);
    }
    if is_high(cfg, &s) {
        if within(now, input.last_decrease, cfg.timers.decrease_interval) {
            return done(None, Reason::HighWaiting);
        }
        return match shrink(cfg, limits, input, &s) {
            Some(c) => done(Some(c), Reason::High),
            None => done(None, Reason::Steady),
        };
    }
    done(None, Reason::Steady)
}

/// [`decide`] under [`Flavour::Demand`]: grow to `grow_to` when below `low`; release the
/// surplus above `keep` in one batch once the history covers the hold period, or leave it to
/// phase two when a whole empty ENI can go instead.
fn decide_demand(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    demand: &Demand<'_>,
    now: Duration,
) -> Decision {
    let mut s = stats(cfg, input.enis);
    s.headroom = headroom(cfg, input, &s);
    let lv = demand_levels(cfg, limits, demand, &s, now);
    let done = |change, reason, free_eni_phase| Decision {
        change,
        reason,
        stats: s,
        free_eni_phase,
        demand: Some(lv),
    };
    let capped = limits.max_pods.is_some_and(|mp| s.total >= mp);
    let short = s.available < lv.low || s.available < demand.waiting;
    if !capped && (short || s.total < cfg.minimum_ip_target) {
        if input.paused {
            return done(None, Reason::Paused, false);
        }
        let backoff = cfg.timers.insufficient_capacity_backoff;
        let no_addresses = within(now, input.last_insufficient_addresses, backoff);
        let no_blocks = within(now, input.last_insufficient_cidr, backoff);
        let fallback = cfg.rules.prefix_fallback && no_blocks && cfg.prefix_delegation;
        if no_addresses || (no_blocks && !fallback) {
            return done(None, Reason::Backoff, false);
        }
        let mut want = (lv.grow_to.saturating_sub(s.available) + demand.waiting)
            .max(cfg.minimum_ip_target.saturating_sub(s.total))
            .max(1);
        if let Some(mp) = limits.max_pods {
            want = want.min(mp.saturating_sub(s.total)).max(1);
        }
        let (kind, count) = if cfg.prefix_delegation && !fallback {
            (AddressKind::Prefix, want.div_ceil(IPS_PER_PREFIX))
        } else {
            (AddressKind::Ip, want.max(demand.settings.min_grow))
        };
        return match place_growth(cfg, limits, input, &s, kind, count) {
            Some(c) => done(Some(c), Reason::Low, false),
            None => done(None, Reason::AtCapacity, false),
        };
    }
    if input.paused {
        return done(None, Reason::Steady, false);
    }
    let surplus = s.total.saturating_sub(lv.keep);
    if !lv.estimate.settled || surplus < lv.min_release {
        let reason = if capped {
            Reason::MaxPods
        } else {
            Reason::Steady
        };
        return done(None, reason, false);
    }
    if within(now, input.last_decrease, cfg.timers.decrease_interval) {
        return done(None, Reason::HighWaiting, false);
    }
    if demand_eni_to_free(cfg, input, &s, &lv, now).is_some() {
        // Detaching the ENI returns its addresses (and its own) in two calls.
        return done(None, Reason::High, true);
    }
    match release_surplus(cfg, input, surplus, lv.min_release) {
        Some(c) => done(Some(c), Reason::High, true),
        None => done(None, Reason::Steady, true),
    }
}

/// An empty, old enough ENI whose addresses all fit in the surplus above `keep`.
fn demand_eni_to_free(
    cfg: &PoolConfig,
    input: &PoolInput<'_>,
    s: &PoolStats,
    lv: &DemandLevels,
    now: Duration,
) -> Option<usize> {
    if !lv.estimate.settled {
        return None;
    }
    let surplus = s.total.saturating_sub(lv.keep);
    input.enis.iter().position(|e| {
        let (t, _, _) = if e.excluded {
            (0, 0, 0)
        } else {
            e.counted(cfg)
        };
        !(e.primary
            || e.trunk
            || e.efa
            || e.assigned() > 0
            || e.cooling() > 0
            || now.saturating_sub(e.created_at) < cfg.timers.min_eni_age)
            && t <= surplus
    })
}

/// A release of at most `surplus` addresses from one ENI (one EC2 call): the ENI that can give
/// back the most, addresses of the other mode's kind before the current mode's; none when the
/// best ENI gives back fewer than `min_release`.
fn release_surplus(
    cfg: &PoolConfig,
    input: &PoolInput<'_>,
    surplus: u32,
    min_release: u32,
) -> Option<PoolChange> {
    let order = if cfg.prefix_delegation {
        [AddressKind::Ip, AddressKind::Prefix]
    } else {
        [AddressKind::Prefix, AddressKind::Ip]
    };
    let mut best: Option<(u32, Release)> = None;
    for (i, e) in input.enis.iter().enumerate() {
        let (free_ips, free_pfx) = e.releasable(cfg);
        let mut left = surplus;
        let mut r = Release {
            eni: i,
            ips: 0,
            prefixes: 0,
        };
        for kind in order {
            let counted =
                cfg.rules.prefix_fallback || (kind == AddressKind::Prefix) == cfg.prefix_delegation;
            let size = match (counted && !e.excluded, kind) {
                (false, _) => 0,
                (true, AddressKind::Ip) => 1,
                (true, AddressKind::Prefix) => IPS_PER_PREFIX,
            };
            let avail = if kind == AddressKind::Ip {
                free_ips
            } else {
                free_pfx
            };
            let n = left.checked_div(size).map_or(avail, |fit| avail.min(fit));
            left -= n * size;
            match kind {
                AddressKind::Ip => r.ips += n,
                AddressKind::Prefix => r.prefixes += n,
            }
        }
        let given = surplus - left;
        if given >= min_release && best.as_ref().is_none_or(|(g, _)| given > *g) {
            best = Some((given, r));
        }
    }
    best.map(|(_, r)| PoolChange::Release(vec![r]))
}

/// Whether the pool is below its target now, with demand-driven sizing when
/// [`PoolInput::demand`] is given (the daemon's wake-up check after an assignment).
pub fn below_target(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    now: Duration,
) -> bool {
    let s = stats(cfg, input.enis);
    match &input.demand {
        None => is_low(cfg, limits, &s),
        Some(d) => {
            let lv = demand_levels(cfg, limits, d, &s, now);
            limits.max_pods.is_none_or(|mp| s.total < mp)
                && (s.available < lv.low.max(d.waiting) || s.total < cfg.minimum_ip_target)
        }
    }
}

fn has_room_for_eni(limits: &NodeLimits, input: &PoolInput<'_>, s: &PoolStats) -> bool {
    let used = i64::from(s.enis) - i64::from(s.excluded_enis);
    let cap = i64::from(limits.max_enis)
        - i64::from(input.unmanaged_enis)
        - i64::from(input.reserve_trunk_slot)
        - i64::from(s.excluded_enis);
    used < cap
}

fn grow(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    s: &PoolStats,
    ip_fallback: bool,
) -> Option<PoolChange> {
    let slots = limits.slots_per_eni;
    let ip_mode = cfg.ip_target_mode();
    let (short, _) = target_state(cfg, s);
    let short = u32::try_from(short).unwrap_or(u32::MAX);
    let (kind, wanted) = if ip_fallback {
        // Prefix mode without aligned /28s left: /32s, as many as the shortfall in addresses.
        let need = if ip_mode {
            target_state(
                &PoolConfig {
                    prefix_delegation: false,
                    ..*cfg
                },
                s,
            )
            .0
        } else {
            i64::from(IPS_PER_PREFIX * cfg.warm_prefix_target) - i64::from(s.available)
        };
        (
            AddressKind::Ip,
            u32::try_from(need.max(1)).unwrap_or(u32::MAX),
        )
    } else if cfg.prefix_delegation {
        let n = if ip_mode {
            short.max(1)
        } else {
            cfg.warm_prefix_target
                .saturating_sub(s.free_prefixes)
                .max(1)
        };
        (AddressKind::Prefix, n)
    } else if ip_mode {
        (AddressKind::Ip, short)
    } else {
        (AddressKind::Ip, slots)
    };
    if wanted == 0 {
        return None;
    }
    place_growth(cfg, limits, input, s, kind, wanted)
}

/// Where `wanted` addresses (or prefixes) of `kind` go: the first attached ENI with a free
/// slot, else a new ENI when the node has room for one.
fn place_growth(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    s: &PoolStats,
    kind: AddressKind,
    wanted: u32,
) -> Option<PoolChange> {
    let slots = limits.slots_per_eni;
    let candidate = input.enis.iter().position(|e| {
        let reserved = e.trunk || e.excluded || (e.primary && cfg.custom_networking);
        !reserved && e.slots_used() < slots
    });
    if let Some(i) = candidate {
        let room = slots - input.enis[i].slots_used();
        return Some(PoolChange::Assign {
            eni: i,
            kind,
            count: room.min(wanted),
        });
    }
    if has_room_for_eni(limits, input, s) {
        return Some(PoolChange::CreateEni {
            kind,
            count: wanted.min(slots),
        });
    }
    None
}

fn shrink(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    s: &PoolStats,
) -> Option<PoolChange> {
    let mut over = if cfg.ip_target_mode() {
        u32::try_from(target_state(cfg, s).1).unwrap_or(0)
    } else {
        s.free_prefixes.saturating_sub(cfg.warm_prefix_target)
    };
    let mut after = *s;
    let mut out = Vec::new();
    // Mode-mismatched addresses go first: they serve no pod in the current mode.
    let order = if cfg.prefix_delegation {
        [AddressKind::Ip, AddressKind::Prefix]
    } else {
        [AddressKind::Prefix, AddressKind::Ip]
    };
    for (i, e) in input.enis.iter().enumerate() {
        if over == 0 {
            break;
        }
        let (free_ips, free_pfx) = e.releasable(cfg);
        let mut r = Release {
            eni: i,
            ips: 0,
            prefixes: 0,
        };
        for kind in order {
            let avail = if kind == AddressKind::Ip {
                free_ips
            } else {
                free_pfx
            };
            for _ in 0..avail {
                if over == 0 {
                    break;
                }
                let mut next = after;
                let counted = cfg.rules.prefix_fallback
                    || (kind == AddressKind::Prefix) == cfg.prefix_delegation;
                if !e.excluded && counted {
                    let size = if kind == AddressKind::Ip {
                        1
                    } else {
                        IPS_PER_PREFIX
                    };
                    next.total -= size;
                    next.available = next.available.saturating_sub(size);
                }
                if kind == AddressKind::Prefix {
                    next.total_prefixes -= 1;
                    next.free_prefixes = next.free_prefixes.saturating_sub(1);
                }
                if cfg.rules.stable_shrink && is_low(cfg, limits, &next.less_headroom()) {
                    over = 0;
                    break;
                }
                after = next;
                over -= 1;
                match kind {
                    AddressKind::Ip => r.ips += 1,
                    AddressKind::Prefix => r.prefixes += 1,
                }
            }
        }
        if r.ips + r.prefixes > 0 {
            out.push(r);
        }
    }
    (!out.is_empty()).then_some(PoolChange::Release(out))
}

fn should_free_enis(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    s: &PoolStats,
) -> bool {
    if cfg.ip_target_mode() {
        return true;
    }
    let wt = if cfg.prefix_delegation {
        cfg.warm_prefix_target
    } else {
        cfg.warm_eni_target
    };
    let per_eni = limits.ips_per_eni(cfg.prefix_delegation);
    if s.available >= (wt + 1) * per_eni {
        return true;
    }
    cfg.prefix_delegation
        && input
            .enis
            .iter()
            .any(|e| !e.primary && e.assigned() == 0 && !e.trunk && !e.efa)
}

fn round_up(n: u32, unit: u32) -> u32 {
    n.div_ceil(unit) * unit
}

/// Phase two of a tick: at most one ENI to detach and delete. Call it with the state after the
/// phase-one change was carried out, and only when [`Decision::free_eni_phase`] was set.
pub fn choose_eni_to_free(
    cfg: &PoolConfig,
    limits: &NodeLimits,
    input: &PoolInput<'_>,
    now: Duration,
) -> Option<usize> {
    if input.paused {
        return None;
    }
    if let Some(d) = &input.demand {
        let s = stats(cfg, input.enis);
        let lv = demand_levels(cfg, limits, d, &s, now);
        return demand_eni_to_free(cfg, input, &s, &lv, now);
    }
    let pd = cfg.prefix_delegation;
    let unit = if pd { IPS_PER_PREFIX } else { 1 };
    let mut all = stats(cfg, input.enis);
    all.headroom = headroom(cfg, input, &all);
    let (w, m, wpt) = (
        cfg.warm_ip_target,
        cfg.minimum_ip_target,
        cfg.warm_prefix_target,
    );
    input.enis.iter().enumerate().position(|(_, e)| {
        if e.primary
            || e.trunk
            || e.efa
            || e.assigned() > 0
            || e.cooling() > 0
            || now.saturating_sub(e.created_at) < cfg.timers.min_eni_age
        {
            return false;
        }
        let (t, a, c) = if e.excluded {
            (0, 0, 0)
        } else {
            e.counted(cfg)
        };
        let mut others = all;
        others.total -= t;
        others.assigned -= a;
        others.cooling -= c;
        others.available = available(cfg, &others);
        others.enis -= 1;
        others.total_prefixes -= e.prefixes;
        others.free_prefixes -= e.free_prefixes_counted(cfg);
        if w > 0 && others.available < round_up(w, unit) {
            return false;
        }
        if m > 0 && others.total < round_up(m, unit) {
            return false;
        }
        if pd && wpt > 0 && others.free_prefixes < wpt {
            return false;
        }
        // Ours: never free an ENI the next tick would have to replace.
        !(cfg.rules.stable_shrink && is_low(cfg, limits, &others.less_headroom()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::ZERO;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn eni(primary: bool, ips: u32, assigned: u32) -> EniView {
        EniView {
            primary,
            ips,
            ips_assigned: assigned,
            ..Default::default()
        }
    }

    fn pfx_eni(primary: bool, assigned_per_prefix: &[u32]) -> EniView {
        let prefixes = assigned_per_prefix.len() as u32;
        let free = assigned_per_prefix.iter().filter(|a| **a == 0).count() as u32;
        EniView {
            primary,
            prefixes,
            prefix_ips_assigned: assigned_per_prefix.iter().sum(),
            free_prefixes: free,
            cold_free_prefixes: free,
            ..Default::default()
        }
    }

    fn limits(max_enis: u32, ipv4: u32) -> NodeLimits {
        NodeLimits {
            max_enis,
            slots_per_eni: ipv4 - 1,
            max_pods: None,
        }
    }

    /// spec/ipamd.md 2.11 (a): m5.large, WARM_ENI_TARGET=1.
    #[test]
    fn warm_eni_boot_fills_primary_then_adds_a_full_eni() {
        let cfg = PoolConfig::default();
        let l = limits(3, 10);
        let enis = [eni(true, 0, 0)];
        let d = decide(&cfg, &l, &PoolInput::new(&enis), T0);
        assert_eq!(
            d.change,
            Some(PoolChange::Assign {
                eni: 0,
                kind: AddressKind::Ip,
                count: 9
            })
        );
        let enis = [eni(true, 9, 1)];
        let d = decide(&cfg, &l, &PoolInput::new(&enis), T0);
        assert_eq!(
            d.change,
            Some(PoolChange::CreateEni {
                kind: AddressKind::Ip,
                count: 9
            })
        );
    }

    #[test]
    fn warm_eni_scale_down_frees_one_old_empty_eni_then_stops() {
        let cfg = PoolConfig::default();
        let l = limits(3, 10);
        let enis = [eni(true, 9, 2), eni(false, 9, 0), eni(false, 9, 0)];
        let input = PoolInput::new(&enis);
        let d = decide(&cfg, &l, &input, secs(100));
        assert_eq!(d.change, None);
        assert!(d.free_eni_phase);
        assert_eq!(choose_eni_to_free(&cfg, &l, &input, secs(100)), Some(1));
        // Too young: kept.
        assert_eq!(choose_eni_to_free(&cfg, &l, &input, secs(59)), None);
        let enis = [eni(true, 9, 2), eni(false, 9, 0)];
        let d = decide(&cfg, &l, &PoolInput::new(&enis), secs(200));
        assert!(!d.free_eni_phase, "available 16 < 18");
    }

    /// spec/ipamd.md 2.11 (b): t3.small, WARM_IP_TARGET=2, MINIMUM_IP_TARGET=5.
    #[test]
    fn ip_targets_grow_by_the_shortfall_and_release_the_surplus() {
        let cfg = PoolConfig {
            warm_ip_target: 2,
            minimum_ip_target: 5,
            ..Default::default()
        };
        let l = limits(3, 4);
        let d = decide(&cfg, &l, &PoolInput::new(&[eni(true, 0, 0)]), T0);
        assert_eq!(
            d.change,
            Some(PoolChange::Assign {
                eni: 0,
                kind: AddressKind::Ip,
                count: 3
            })
        );
        let d = decide(&cfg, &l, &PoolInput::new(&[eni(true, 3, 0)]), T0);
        assert_eq!(
            d.change,
            Some(PoolChange::CreateEni {
                kind: AddressKind::Ip,
                count: 2
            })
        );
        let enis = [eni(true, 3, 2), eni(false, 3, 0), eni(false, 3, 0)];
        let mut input = PoolInput::new(&enis);
        input.last_decrease = Some(secs(10));
        let d = decide(&cfg, &l, &input, secs(20));
        assert_eq!(d.reason, Reason::HighWaiting);
        let d = decide(&cfg, &l, &input, secs(40));
        let Some(PoolChange::Release(r)) = d.change else {
            panic!("{d:?}")
        };
        assert_eq!(r.iter().map(|r| r.ips).sum::<u32>(), 4);
    }

    /// spec/ipamd.md 2.11 (c): t3.small prefix mode, WARM_PREFIX_TARGET=1.
    #[test]
    fn prefix_mode_keeps_one_free_prefix() {
        let cfg = PoolConfig {
            prefix_delegation: true,
            warm_prefix_target: 1,
            ..Default::default()
        };
        let l = limits(3, 4);
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[])]), T0);
        let one = PoolChange::Assign {
            eni: 0,
            kind: AddressKind::Prefix,
            count: 1,
        };
        assert_eq!(d.change, Some(one.clone()));
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[5])]), T0);
        assert_eq!(d.change, Some(one.clone()), "available 11 < 16");
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[16, 1])]), T0);
        assert_eq!(d.change, Some(one));
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[16, 1, 0])]), T0);
        assert_eq!(d.change, None);
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[1, 0, 0])]), T0);
        let Some(PoolChange::Release(r)) = d.change else {
            panic!("{d:?}")
        };
        assert_eq!(
            r,
            vec![Release {
                eni: 0,
                ips: 0,
                prefixes: 1
            }]
        );
    }

    /// spec/ipamd.md 2.11 (d): prefix mode, WARM_IP_TARGET=5, MINIMUM_IP_TARGET=10.
    #[test]
    fn prefix_mode_with_ip_targets_converts_to_prefixes() {
        let cfg = PoolConfig {
            prefix_delegation: true,
            warm_ip_target: 5,
            minimum_ip_target: 10,
            ..Default::default()
        };
        let l = limits(3, 4);
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[])]), T0);
        assert_eq!(
            d.change,
            Some(PoolChange::Assign {
                eni: 0,
                kind: AddressKind::Prefix,
                count: 1
            })
        );
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[7])]), T0);
        assert_eq!((d.change, d.reason), (None, Reason::Steady));
        let d = decide(&cfg, &l, &PoolInput::new(&[pfx_eni(true, &[15])]), T0);
        assert!(matches!(
            d.change,
            Some(PoolChange::Assign { count: 1, .. })
        ));
    }

    #[test]
    fn reference_counts_cooling_ips_as_available_ours_does_not() {
        let l = limits(3, 10);
        let mut e = eni(true, 9, 0);
        e.ips_cooling = 9;
        let enis = [e, eni(false, 9, 9)];
        let reference = PoolConfig::default();
        assert_eq!(
            decide(&reference, &l, &PoolInput::new(&enis), T0).change,
            None
        );
        let ours = PoolConfig {
            rules: Rules::OURS,
            ..reference
        };
        let d = decide(&ours, &l, &PoolInput::new(&enis), T0);
        assert!(
            matches!(d.change, Some(PoolChange::CreateEni { .. })),
            "{d:?}"
        );
    }

    #[test]
    fn insufficient_cidr_pauses_the_reference_and_falls_back_to_ips_in_ours() {
        let l = limits(3, 10);
        let base = PoolConfig {
            prefix_delegation: true,
            warm_prefix_target: 1,
            ..Default::default()
        };
        let enis = [pfx_eni(true, &[16])];
        let mut input = PoolInput::new(&enis);
        input.last_insufficient_cidr = Some(secs(100));
        let d = decide(&base, &l, &input, secs(150));
        assert_eq!((d.change, d.reason), (None, Reason::Backoff));
        let ours = PoolConfig {
            rules: Rules::OURS,
            ..base
        };
        let d = decide(&ours, &l, &input, secs(150));
        assert_eq!(
            d.change,
            Some(PoolChange::Assign {
                eni: 0,
                kind: AddressKind::Ip,
                count: 8
            })
        );
        // Out of addresses altogether: both wait.
        input.last_insufficient_addresses = Some(secs(100));
        assert_eq!(decide(&ours, &l, &input, secs(150)).reason, Reason::Backoff);
        assert_eq!(decide(&ours, &l, &input, secs(221)).reason, Reason::Low);
    }

    #[test]
    fn each_rule_alone_makes_its_own_difference() {
        let only = |f: fn(&mut Rules)| {
            let mut r = Rules::REFERENCE;
            f(&mut r);
            r
        };
        let l = limits(3, 10);
        // exclude_cooling: cooling IPs no longer hide a shortage.
        let mut cooling = eni(true, 9, 0);
        cooling.ips_cooling = 9;
        let enis = [cooling, eni(false, 9, 9)];
        let cfg = PoolConfig {
            rules: only(|r| r.exclude_cooling = true),
            ..Default::default()
        };
        assert!(decide(&cfg, &l, &PoolInput::new(&enis), T0)
            .change
            .is_some());
        // stable_shrink: no ENI freed into a low pool.
        let enis = [eni(true, 9, 9), eni(false, 9, 0)];
        let cfg = PoolConfig {
            warm_eni_target: 0,
            rules: only(|r| r.stable_shrink = true),
            ..Default::default()
        };
        assert_eq!(
            choose_eni_to_free(&cfg, &l, &PoolInput::new(&enis), secs(100)),
            None
        );
        // grow_past_minimum: MINIMUM_IP_TARGET alone no longer caps the pool.
        let enis = [eni(true, 5, 5)];
        let cfg = PoolConfig {
            minimum_ip_target: 5,
            rules: only(|r| r.grow_past_minimum = true),
            ..Default::default()
        };
        assert!(decide(&cfg, &l, &PoolInput::new(&enis), T0)
            .change
            .is_some());
        let reference = PoolConfig {
            minimum_ip_target: 5,
            ..Default::default()
        };
        assert!(decide(&reference, &l, &PoolInput::new(&enis), T0)
            .change
            .is_none());
        // prefix_fallback: /32s instead of a pause after InsufficientCidrBlocks.
        let enis = [pfx_eni(true, &[16])];
        let mut input = PoolInput::new(&enis);
        input.last_insufficient_cidr = Some(T0);
        let cfg = PoolConfig {
            prefix_delegation: true,
            warm_prefix_target: 1,
            rules: only(|r| r.prefix_fallback = true),
            ..Default::default()
        };
        let d = decide(&cfg, &l, &input, secs(10));
        assert!(matches!(
            d.change,
            Some(PoolChange::Assign {
                kind: AddressKind::Ip,
                ..
            })
        ));
        assert_eq!(Rules::OURS.flavour(), Some(Flavour::Ours));
        assert_eq!(only(|r| r.stable_shrink = true).flavour(), None);
    }

    #[test]
    fn ours_keeps_room_for_recent_churn_when_shrinking() {
        let cfg = PoolConfig {
            warm_ip_target: 2,
            rules: Rules::OURS,
            ..Default::default()
        };
        let l = limits(3, 10);
        // 6 free, target 2: 4 over. Four addresses were cooling a moment ago.
        let enis = [eni(true, 9, 3)];
        let mut input = PoolInput::new(&enis);
        let d = decide(&cfg, &l, &input, secs(100));
        assert!(matches!(d.change, Some(PoolChange::Release(_))), "{d:?}");
        input.recent_cooling_peak = 4;
        let d = decide(&cfg, &l, &input, secs(100));
        assert_eq!(d.change, None, "the churn headroom keeps the surplus");
        input.recent_cooling_peak = 2;
        let d = decide(&cfg, &l, &input, secs(100));
        let Some(PoolChange::Release(r)) = d.change else {
            panic!("{d:?}")
        };
        assert_eq!(r[0].ips, 2);
    }

    #[test]
    fn max_pods_stops_growth() {
        let mut l = limits(3, 10);
        l.max_pods = Some(9);
        let d = decide(
            &PoolConfig::default(),
            &l,
            &PoolInput::new(&[eni(true, 9, 9)]),
            T0,
        );
        assert_eq!((d.change, d.reason), (None, Reason::MaxPods));
    }

    #[test]
    fn at_the_eni_limit_nothing_more_is_asked_for() {
        let l = limits(2, 10);
        let enis = [eni(true, 9, 9), eni(false, 9, 9)];
        let d = decide(&PoolConfig::default(), &l, &PoolInput::new(&enis), T0);
        assert_eq!((d.change, d.reason), (None, Reason::AtCapacity));
        let mut input = PoolInput::new(&enis[..1]);
        input.unmanaged_enis = 1;
        let d = decide(&PoolConfig::default(), &l, &input, T0);
        assert_eq!(d.reason, Reason::AtCapacity);
    }

    #[test]
    fn custom_networking_never_assigns_to_the_primary_eni() {
        let cfg = PoolConfig {
            custom_networking: true,
            ..Default::default()
        };
        let d = decide(
            &cfg,
            &limits(3, 10),
            &PoolInput::new(&[eni(true, 0, 0)]),
            T0,
        );
        assert_eq!(
            d.change,
            Some(PoolChange::CreateEni {
                kind: AddressKind::Ip,
                count: 9
            })
        );
    }

    #[test]
    fn reference_target_zero_frees_the_eni_it_just_needed_ours_keeps_it() {
        // WARM_ENI_TARGET=0, 9 pods fill the primary exactly; a second ENI was added when
        // available hit 0 and is now old enough.
        let reference = PoolConfig {
            warm_eni_target: 0,
            ..Default::default()
        };
        let l = limits(3, 10);
        let enis = [eni(true, 9, 9), eni(false, 9, 0)];
        let input = PoolInput::new(&enis);
        let d = decide(&reference, &l, &input, secs(100));
        assert!(d.free_eni_phase);
        assert_eq!(
            choose_eni_to_free(&reference, &l, &input, secs(100)),
            Some(1)
        );
        let ours = PoolConfig {
            rules: Rules::OURS,
            ..reference
        };
        assert_eq!(choose_eni_to_free(&ours, &l, &input, secs(100)), None);
    }

    #[test]
    fn paused_nodes_do_not_grow_or_free() {
        let mut input = PoolInput::new(&[]);
        let enis = [eni(true, 0, 0), eni(false, 9, 0)];
        input.enis = &enis;
        input.paused = true;
        let d = decide(&PoolConfig::default(), &limits(3, 10), &input, secs(500));
        assert_eq!(
            (d.change, d.reason, d.free_eni_phase),
            (None, Reason::Steady, false)
        );
        let enis = [eni(true, 0, 0)];
        input.enis = &enis;
        let d = decide(&PoolConfig::default(), &limits(3, 10), &input, secs(500));
        assert_eq!(d.reason, Reason::Paused);
    }

    fn demand_input<'a>(
        enis: &'a [EniView],
        settings: &'a DemandSettings,
        state: &'a DemandState,
    ) -> PoolInput<'a> {
        let mut input = PoolInput::new(enis);
        input.demand = Some(Demand {
            settings,
            state,
            waiting: 0,
        });
        input
    }

    fn ours(cfg: PoolConfig) -> PoolConfig {
        PoolConfig {
            rules: Rules::OURS,
            ..cfg
        }
    }

    #[test]
    fn demand_grows_to_the_floor_plus_a_step_and_counts_cooling_toward_the_floor() {
        let cfg = ours(PoolConfig {
            warm_ip_target: 3,
            ..Default::default()
        });
        let l = limits(3, 10);
        let ds = DemandSettings::default();
        let st = DemandState::new(T0);
        let full = [eni(true, 9, 9)];
        let d = decide(&cfg, &l, &demand_input(&full, &ds, &st), secs(30));
        let lv = d.demand.expect("levels");
        assert_eq!((lv.floor, lv.low, lv.grow_to), (3, 3, 4));
        assert_eq!(
            d.change,
            Some(PoolChange::CreateEni {
                kind: AddressKind::Ip,
                count: 4
            })
        );
        // Two free addresses cooling down count toward WARM_IP_TARGET, as documented: one
        // usable address is enough.
        let mut e = eni(true, 9, 6);
        e.ips_cooling = 2;
        let d = decide(&cfg, &l, &demand_input(&[e], &ds, &st), secs(30));
        assert_eq!((d.change, d.reason), (None, Reason::Steady));
    }

    #[test]
    fn demand_keeps_a_burst_warm_and_serves_waiting_pods_in_one_call() {
        let cfg = ours(PoolConfig::default());
        let l = limits(3, 10);
        let ds = DemandSettings::default();
        let mut st = DemandState::new(T0);
        st.note_requests(&ds, secs(100), 6);
        let enis = [eni(true, 9, 6)];
        let mut input = demand_input(&enis, &ds, &st);
        let d = decide(&cfg, &l, &input, secs(110));
        assert_eq!(
            d.demand.expect("levels").low,
            6,
            "the burst sets the low level"
        );
        assert!(
            matches!(d.change, Some(PoolChange::CreateEni { .. })),
            "{d:?}"
        );
        // Without the burst, three usable addresses are plenty.
        let quiet = DemandState::new(T0);
        input.demand = Some(Demand {
            settings: &ds,
            state: &quiet,
            waiting: 0,
        });
        assert_eq!(decide(&cfg, &l, &input, secs(110)).change, None);
        // Five pods waiting: one growth for all of them and the step.
        let enis = [eni(true, 9, 9)];
        let mut input = demand_input(&enis, &ds, &quiet);
        input.demand = Some(Demand {
            settings: &ds,
            state: &quiet,
            waiting: 5,
        });
        let d = decide(&cfg, &l, &input, secs(110));
        assert_eq!(
            d.change,
            Some(PoolChange::CreateEni {
                kind: AddressKind::Ip,
                count: 7
            })
        );
    }

    #[test]
    fn demand_releases_only_a_sustained_surplus_in_one_batch() {
        let cfg = ours(PoolConfig::default());
        let l = limits(3, 10);
        let ds = DemandSettings::default();
        let mut st = DemandState::new(T0);
        // Nine pods an hour ago, three now: six addresses are surplus once the hold has passed.
        st.observe(&ds, secs(3000), 9);
        let enis = [eni(true, 9, 3)];
        let input = demand_input(&enis, &ds, &st);
        let d = decide(&cfg, &l, &input, secs(3100));
        assert_eq!(d.change, None, "the peak in use is less than a hold ago");
        st.observe(&ds, secs(3700), 3);
        let input = demand_input(&enis, &ds, &st);
        let d = decide(&cfg, &l, &input, secs(3700));
        let lv = d.demand.expect("levels");
        assert_eq!(lv.keep, 3 + lv.grow_to);
        assert_eq!(
            d.change,
            Some(PoolChange::Release(vec![Release {
                eni: 0,
                ips: 9 - lv.keep,
                prefixes: 0
            }]))
        );
        // A young history never releases (after a restart, the peak is unknown).
        let young = DemandState::new(secs(3500));
        let d = decide(&cfg, &l, &demand_input(&enis, &ds, &young), secs(3700));
        assert_eq!(d.change, None);
        // A surplus smaller than min_release stays.
        let enis = [eni(true, 9, 6)];
        let d = decide(&cfg, &l, &demand_input(&enis, &ds, &st), secs(3700));
        assert_eq!(d.change, None);
    }

    #[test]
    fn demand_frees_an_empty_eni_instead_of_releasing_its_addresses() {
        let cfg = ours(PoolConfig::default());
        let l = limits(3, 10);
        let ds = DemandSettings::default();
        let mut st = DemandState::new(T0);
        st.observe(&ds, secs(3700), 4);
        let enis = [eni(true, 9, 4), eni(false, 9, 0)];
        let input = demand_input(&enis, &ds, &st);
        let d = decide(&cfg, &l, &input, secs(3700));
        assert_eq!((d.change.clone(), d.reason), (None, Reason::High), "{d:?}");
        assert!(d.free_eni_phase);
        assert_eq!(choose_eni_to_free(&cfg, &l, &input, secs(3700)), Some(1));
        assert!(!below_target(&cfg, &l, &input, secs(3700)));
        // The user's WARM_ENI_TARGET, when set explicitly, is a floor: the ENI stays, and only
        // what exceeds a whole ENI of free addresses (plus a step) goes back.
        let floor = DemandSettings {
            eni_target_is_floor: true,
            ..ds
        };
        let input = demand_input(&enis, &floor, &st);
        assert_eq!(choose_eni_to_free(&cfg, &l, &input, secs(3700)), None);
        let d = decide(&cfg, &l, &input, secs(3700));
        let Some(PoolChange::Release(r)) = d.change else {
            panic!("{d:?}")
        };
        let released: u32 = r.iter().map(|r| r.ips).sum();
        assert!(
            18 - 4 - released >= 9,
            "{released} released below the floor"
        );
    }

    #[test]
    fn a_restored_demand_state_decides_as_if_the_daemon_never_stopped() {
        let cfg = ours(PoolConfig::default());
        let l = limits(3, 10);
        let ds = DemandSettings::default();
        let mut st = DemandState::new(secs(1_000_000));
        let mut t = 1_000_000;
        for k in 0..200u64 {
            t += 17;
            st.note_requests(&ds, secs(t), u32::from(k % 7 == 0));
            st.observe(&ds, secs(t), 5 + (k % 11) as u32);
        }
        let enis = [eni(true, 9, 7), eni(false, 9, 2)];
        let now = secs(t + 20);
        let text = serde_json::to_string(&st).expect("serialises");
        let saved: DemandState = serde_json::from_str(&text).expect("parses");
        let restored = saved.restore(&ds, now, 9);
        let mut live = st.clone();
        live.observe(&ds, now, 9);
        let a = decide(&cfg, &l, &demand_input(&enis, &ds, &live), now);
        let b = decide(&cfg, &l, &demand_input(&enis, &ds, &restored), now);
        assert_eq!(a, b);
        // Rebuilt from the running pods alone: it neither releases (waste avoided by not
        // shrinking into waiting) nor grows past what the pods' own arrivals say.
        let rebuilt = DemandState::rebuild(&ds, now, [now - secs(5), now - secs(3)], 9);
        let d = decide(&cfg, &l, &demand_input(&enis, &ds, &rebuilt), now);
        assert!(!matches!(d.change, Some(PoolChange::Release(_))), "{d:?}");
        assert_eq!(d.demand.expect("levels").low, 2);
    }
}
