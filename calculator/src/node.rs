//! A model node: ENIs, addresses and pods, driven tick by tick by the pool policy against a
//! modelled subnet, with EC2's answers (all-or-nothing assignment, `InsufficientCidrBlocks`,
//! `InsufficientFreeAddressesInSubnet`) and a count of the EC2 calls the daemon would make.
//!
//! Pods are placed packed: the first free address of the first ENI that has one (cooling
//! addresses are skipped). This is the planner's engine; ipamd runs the same policy against its
//! real datastore.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::demand::{Demand, DemandSettings, DemandState};
use crate::policy::{
    self, AddressKind, EniView, NodeLimits, PoolChange, PoolConfig, PoolInput, Release,
    IPS_PER_PREFIX,
};
use crate::subnet::{AllocError, Placement, SubnetAllocator};

/// EC2 actions the daemon issues, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Ec2Action {
    /// `AssignPrivateIpAddresses`.
    AssignPrivateIpAddresses,
    /// `UnassignPrivateIpAddresses`.
    UnassignPrivateIpAddresses,
    /// `DescribeInstances` (free device index before attaching).
    DescribeInstances,
    /// `CreateNetworkInterface`.
    CreateNetworkInterface,
    /// `AttachNetworkInterface`.
    AttachNetworkInterface,
    /// `ModifyNetworkInterfaceAttribute` (DeleteOnTermination).
    ModifyNetworkInterfaceAttribute,
    /// `DescribeNetworkInterfaces` (attachment id before detaching).
    DescribeNetworkInterfaces,
    /// `DetachNetworkInterface`.
    DetachNetworkInterface,
    /// `DeleteNetworkInterface`.
    DeleteNetworkInterface,
}

impl Ec2Action {
    /// Every action, in display order.
    pub const ALL: [Ec2Action; 9] = [
        Self::AssignPrivateIpAddresses,
        Self::UnassignPrivateIpAddresses,
        Self::DescribeInstances,
        Self::CreateNetworkInterface,
        Self::AttachNetworkInterface,
        Self::ModifyNetworkInterfaceAttribute,
        Self::DescribeNetworkInterfaces,
        Self::DetachNetworkInterface,
        Self::DeleteNetworkInterface,
    ];

    /// Whether the call changes EC2 state.
    pub fn is_mutating(self) -> bool {
        !matches!(
            self,
            Self::DescribeInstances | Self::DescribeNetworkInterfaces
        )
    }

    /// The EC2 API name.
    pub fn name(self) -> &'static str {
        match self {
            Self::AssignPrivateIpAddresses => "AssignPrivateIpAddresses",
            Self::UnassignPrivateIpAddresses => "UnassignPrivateIpAddresses",
            Self::DescribeInstances => "DescribeInstances",
            Self::CreateNetworkInterface => "CreateNetworkInterface",
            Self::AttachNetworkInterface => "AttachNetworkInterface",
            Self::ModifyNetworkInterfaceAttribute => "ModifyNetworkInterfaceAttribute",
            Self::DescribeNetworkInterfaces => "DescribeNetworkInterfaces",
            Self::DetachNetworkInterface => "DetachNetworkInterface",
            Self::DeleteNetworkInterface => "DeleteNetworkInterface",
        }
    }
}

/// EC2 calls made, by action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ec2Calls([u64; 9]);

impl Ec2Calls {
    fn add(&mut self, a: Ec2Action) {
        self.0[a as usize] += 1;
    }

    /// Calls of one action.
    pub fn get(&self, a: Ec2Action) -> u64 {
        self.0[a as usize]
    }

    /// All calls.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Calls that change EC2 state.
    pub fn mutating(&self) -> u64 {
        Ec2Action::ALL
            .iter()
            .filter(|a| a.is_mutating())
            .map(|a| self.get(*a))
            .sum()
    }

    /// Adds another count to this one.
    pub fn merge(&mut self, o: &Ec2Calls) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

impl Serialize for Ec2Calls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for a in Ec2Action::ALL {
            if self.get(a) > 0 {
                m.serialize_entry(a.name(), &self.get(a))?;
            }
        }
        m.end()
    }
}

#[derive(Debug, Clone)]
struct Cidr {
    base: u32,
    prefix: bool,
    gen: u32,
    assigned: u16,
    cooling: u16,
}

impl Cidr {
    fn full_mask(&self) -> u16 {
        if self.prefix {
            u16::MAX
        } else {
            1
        }
    }

    fn first_usable(&self) -> Option<u32> {
        let busy = self.assigned | self.cooling;
        let free = !busy & self.full_mask();
        (free != 0).then(|| free.trailing_zeros())
    }
}

#[derive(Debug, Clone)]
struct Eni {
    id: u32,
    primary_ip: Option<u32>,
    cidrs: Vec<Cidr>,
}

/// What went wrong talking to the modelled EC2 in one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityError {
    /// `InsufficientFreeAddressesInSubnet`.
    NoAddresses,
    /// `InsufficientCidrBlocks`.
    NoCidrBlocks,
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickOutcome {
    /// Pool changes carried out successfully.
    pub changes: u32,
    /// ENIs freed.
    pub enis_freed: u32,
    /// A capacity error seen, if any.
    pub error: Option<CapacityError>,
    /// Whether the last change grew the pool.
    pub grew: bool,
}

/// How a node lays out its address requests in the subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressPlacement {
    /// Lowest free addresses first (deterministic, packs the subnet).
    Packed,
    /// Pseudo-random addresses from a seed, like EC2 (spoils /28 blocks).
    Scattered(u64),
}

/// A modelled node.
#[derive(Debug, Clone)]
pub struct ModelNode {
    cfg: PoolConfig,
    limits: NodeLimits,
    enis: Vec<Eni>,
    views: Vec<EniView>,
    pods: Vec<(u32, u32, u32)>,
    pending: u32,
    cooldown: VecDeque<(Duration, u32, u32, u32, u8)>,
    last_decrease: Option<Duration>,
    last_no_addresses: Option<Duration>,
    last_no_blocks: Option<Duration>,
    next_id: u32,
    next_gen: u32,
    rng: Option<u64>,
    cooling_peaks: [u32; 10],
    peak_slot: u64,
    calls: Ec2Calls,
    primary_in_subnet: bool,
    demand: Option<(DemandSettings, DemandState)>,
    latency: Ec2Latency,
    waited_ms: u64,
    /// Security groups for pods: the trunk ENI's primary and the branch ENIs' addresses in the
    /// subnet (the trunk takes one ENI slot, kept free from the pool).
    trunk: Option<Vec<u32>>,
}

/// How long EC2 takes to grow the pool, charged to the pods that wait for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Latency {
    /// Milliseconds per `AssignPrivateIpAddresses` call.
    #[serde(default)]
    pub assign: u64,
    /// Milliseconds to create, attach and configure an ENI.
    #[serde(default)]
    pub create_eni: u64,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ModelNode {
    /// Boots a node at time `now`: its primary ENI with a primary address taken from `subnet`
    /// (unless `primary_in_subnet` is false, as with custom networking, where the primary ENI
    /// lives in the node subnet). Fails when the subnet has no address for the primary.
    pub fn boot(
        cfg: PoolConfig,
        limits: NodeLimits,
        subnet: &mut SubnetAllocator,
        primary_in_subnet: bool,
        placement: AddressPlacement,
        now: Duration,
    ) -> Result<Self, AllocError> {
        let mut n = Self {
            cfg,
            limits,
            enis: Vec::new(),
            views: Vec::new(),
            pods: Vec::new(),
            pending: 0,
            cooldown: VecDeque::new(),
            last_decrease: None,
            last_no_addresses: None,
            last_no_blocks: None,
            next_id: 0,
            next_gen: 0,
            rng: match placement {
                AddressPlacement::Packed => None,
                AddressPlacement::Scattered(seed) => Some(seed),
            },
            cooling_peaks: [0; 10],
            peak_slot: 0,
            calls: Ec2Calls::default(),
            primary_in_subnet,
            demand: None,
            latency: Ec2Latency::default(),
            waited_ms: 0,
            trunk: None,
        };
        let ip = if primary_in_subnet {
            Some(subnet.allocate_ip(n.placement())?)
        } else {
            None
        };
        n.push_eni(ip, now, true);
        Ok(n)
    }

    fn placement(&mut self) -> Placement {
        match self.rng.as_mut() {
            None => Placement::Lowest,
            Some(s) => Placement::From(splitmix(s) as u32),
        }
    }

    fn push_eni(&mut self, primary_ip: Option<u32>, now: Duration, primary: bool) {
        self.enis.push(Eni {
            id: self.next_id,
            primary_ip,
            cidrs: Vec::new(),
        });
        self.next_id += 1;
        self.views.push(EniView {
            primary,
            created_at: now,
            ..Default::default()
        });
    }

    /// Sizes the pool from the node's demand ([`policy::Flavour::Demand`]), with a history
    /// starting at `now`.
    pub fn with_demand(mut self, settings: DemandSettings, now: Duration) -> Self {
        self.demand = Some((settings, DemandState::new(now)));
        self
    }

    /// Charges EC2's time to grow the pool to the pods that wait for the growth: a pod that
    /// finds no address at a tick and gets one from that tick's growth waits for the calls made
    /// up to it.
    pub fn with_latency(mut self, latency: Ec2Latency) -> Self {
        self.latency = latency;
        self
    }

    /// Milliseconds pods spent waiting for EC2 within ticks (see [`ModelNode::with_latency`]).
    pub fn waited_ms(&self) -> u64 {
        self.waited_ms
    }

    /// The demand history, when the pool is sized from demand.
    pub fn demand_state(&self) -> Option<&DemandState> {
        self.demand.as_ref().map(|d| &d.1)
    }

    /// The pool configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Per-ENI pool state.
    pub fn views(&self) -> &[EniView] {
        &self.views
    }

    /// Pods holding an address.
    pub fn pods(&self) -> u32 {
        self.pods.len() as u32
    }

    /// Pods waiting for an address.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// EC2 calls made so far.
    pub fn calls(&self) -> &Ec2Calls {
        &self.calls
    }

    /// ENIs attached.
    pub fn enis(&self) -> u32 {
        self.enis.len() as u32
    }

    /// Security groups for pods: attaches a trunk ENI (one ENI slot, one subnet address) and
    /// `branches` branch ENIs (one subnet address each, no ENI slot). Returns how many branch
    /// ENIs found no address (all of them when the trunk found none). A second call does
    /// nothing and returns 0.
    pub fn attach_trunk(&mut self, subnet: &mut SubnetAllocator, branches: u32) -> u32 {
        if self.trunk.is_some() {
            return 0;
        }
        let p = self.placement();
        let Ok(trunk_ip) = subnet.allocate_ip(p) else {
            return branches;
        };
        let mut held = vec![trunk_ip];
        let mut short = 0;
        for _ in 0..branches {
            let p = self.placement();
            match subnet.allocate_ip(p) {
                Ok(ip) => held.push(ip),
                Err(_) => short += 1,
            }
        }
        self.trunk = Some(held);
        short
    }

    /// Subnet addresses the trunk and branch ENIs hold (0 without a trunk).
    pub fn trunk_addresses(&self) -> u32 {
        self.trunk.as_ref().map_or(0, |t| t.len() as u32)
    }

    /// Pool totals as the configured flavour counts them.
    pub fn stats(&self) -> policy::PoolStats {
        policy::stats(&self.cfg, &self.views)
    }

    /// Addresses on the node's ENIs: (pod addresses in /32s and /28s, ENI primaries in the
    /// pod subnet, /28 prefixes).
    pub fn address_usage(&self) -> (u32, u32, u32) {
        let mut pod = 0;
        let mut prefixes = 0;
        for v in &self.views {
            pod += v.ips + v.prefixes * IPS_PER_PREFIX;
            prefixes += v.prefixes;
        }
        let primaries = self.enis.iter().filter(|e| e.primary_ip.is_some()).count() as u32;
        (pod, primaries, prefixes)
    }

    /// Adds `n` pods; those that find no address wait (pending).
    pub fn add_pods(&mut self, n: u32, now: Duration) {
        if let Some((settings, state)) = &mut self.demand {
            state.note_requests(settings, now, n);
        }
        self.pending += n;
        self.place_pending(now);
    }

    /// Removes `n` pods, pending ones first, then pseudo-randomly chosen running ones. Their
    /// addresses enter cooldown.
    pub fn remove_pods(&mut self, mut n: u32, now: Duration) {
        let p = n.min(self.pending);
        self.pending -= p;
        n -= p;
        for _ in 0..n.min(self.pods.len() as u32) {
            let i = match self.rng.as_mut() {
                None => self.pods.len() - 1,
                Some(s) => (splitmix(s) % self.pods.len() as u64) as usize,
            };
            let (eni_id, base, bit) = self.pods.swap_remove(i);
            self.unassign(eni_id, base, bit, now);
        }
    }

    /// Sets the number of pods wanting an address to `target`.
    pub fn set_pods(&mut self, target: u32, now: Duration) {
        let have = self.pods.len() as u32 + self.pending;
        if target > have {
            self.add_pods(target - have, now);
        } else if target < have {
            self.remove_pods(have - target, now);
        }
    }

    fn eni_index(&self, id: u32) -> Option<usize> {
        self.enis.iter().position(|e| e.id == id)
    }

    fn counts_before(&self, ei: usize, ci: usize) -> (bool, bool) {
        let c = &self.enis[ei].cidrs[ci];
        (c.assigned == 0, c.assigned == 0 && c.cooling == 0)
    }

    fn update_prefix_counts(&mut self, ei: usize, ci: usize, before: (bool, bool)) {
        if !self.enis[ei].cidrs[ci].prefix {
            return;
        }
        let after = self.counts_before(ei, ci);
        let v = &mut self.views[ei];
        v.free_prefixes = v.free_prefixes + u32::from(after.0) - u32::from(before.0);
        v.cold_free_prefixes = v.cold_free_prefixes + u32::from(after.1) - u32::from(before.1);
    }

    fn unassign(&mut self, eni_id: u32, base: u32, bit: u32, now: Duration) {
        let Some(ei) = self.eni_index(eni_id) else {
            return;
        };
        let Some(ci) = self.enis[ei].cidrs.iter().position(|c| c.base == base) else {
            return;
        };
        let before = self.counts_before(ei, ci);
        let cooldown = self.cfg.timers.ip_cooldown;
        let c = &mut self.enis[ei].cidrs[ci];
        c.assigned &= !(1 << bit);
        let prefix = c.prefix;
        let gen = c.gen;
        if !cooldown.is_zero() {
            c.cooling |= 1 << bit;
            self.cooldown
                .push_back((now + cooldown, eni_id, base, gen, bit as u8));
        }
        let v = &mut self.views[ei];
        if prefix {
            v.prefix_ips_assigned -= 1;
            v.prefix_ips_cooling += u32::from(!cooldown.is_zero());
        } else {
            v.ips_assigned -= 1;
            v.ips_cooling += u32::from(!cooldown.is_zero());
        }
        self.update_prefix_counts(ei, ci, before);
    }

    fn expire_cooldowns(&mut self, now: Duration) {
        while let Some(&(t, eni_id, base, gen, bit)) = self.cooldown.front() {
            if t > now {
                break;
            }
            self.cooldown.pop_front();
            let Some(ei) = self.eni_index(eni_id) else {
                continue;
            };
            let Some(ci) = self.enis[ei]
                .cidrs
                .iter()
                .position(|c| c.base == base && c.gen == gen)
            else {
                continue;
            };
            let before = self.counts_before(ei, ci);
            let c = &mut self.enis[ei].cidrs[ci];
            if c.cooling & (1 << bit) == 0 {
                continue;
            }
            c.cooling &= !(1 << bit);
            let prefix = c.prefix;
            let v = &mut self.views[ei];
            if prefix {
                v.prefix_ips_cooling -= 1;
            } else {
                v.ips_cooling -= 1;
            }
            self.update_prefix_counts(ei, ci, before);
        }
    }

    fn usable_kind(&self, prefix: bool) -> bool {
        self.cfg.rules.prefix_fallback || prefix == self.cfg.prefix_delegation
    }

    fn place_pending(&mut self, now: Duration) {
        let _ = now;
        while self.pending > 0 {
            let mut found = None;
            'outer: for (ei, e) in self.enis.iter().enumerate() {
                let v = &self.views[ei];
                if v.excluded || (v.primary && self.cfg.custom_networking) {
                    continue;
                }
                if v.ips + v.prefixes * IPS_PER_PREFIX == v.assigned() + v.cooling() {
                    continue;
                }
                for (ci, c) in e.cidrs.iter().enumerate() {
                    if !self.usable_kind(c.prefix) {
                        continue;
                    }
                    if let Some(bit) = c.first_usable() {
                        found = Some((ei, ci, bit));
                        break 'outer;
                    }
                }
            }
            let Some((ei, ci, bit)) = found else { return };
            let before = self.counts_before(ei, ci);
            let c = &mut self.enis[ei].cidrs[ci];
            c.assigned |= 1 << bit;
            let (prefix, base) = (c.prefix, c.base);
            if prefix {
                self.views[ei].prefix_ips_assigned += 1;
            } else {
                self.views[ei].ips_assigned += 1;
            }
            self.update_prefix_counts(ei, ci, before);
            self.pods.push((self.enis[ei].id, base, bit));
            self.pending -= 1;
        }
    }

    fn add_cidr(&mut self, ei: usize, base: u32, prefix: bool) {
        self.next_gen += 1;
        self.enis[ei].cidrs.push(Cidr {
            base,
            prefix,
            gen: self.next_gen,
            assigned: 0,
            cooling: 0,
        });
        let v = &mut self.views[ei];
        if prefix {
            v.prefixes += 1;
            v.free_prefixes += 1;
            v.cold_free_prefixes += 1;
        } else {
            v.ips += 1;
        }
    }

    /// Takes `count` addresses of `kind` from the subnet, all or nothing, as EC2 does.
    fn take(
        &mut self,
        subnet: &mut SubnetAllocator,
        kind: AddressKind,
        count: u32,
    ) -> Result<Vec<u32>, CapacityError> {
        let mut got = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let p = self.placement();
            let r = match kind {
                AddressKind::Ip => subnet.allocate_ip(p),
                AddressKind::Prefix => subnet.allocate_prefix(p),
            };
            match r {
                Ok(a) => got.push(a),
                Err(e) => {
                    for a in got {
                        match kind {
                            AddressKind::Ip => subnet.release_ip(a),
                            AddressKind::Prefix => subnet.release_prefix(a),
                        }
                    }
                    return Err(match e {
                        AllocError::NoFreeBlock(_) => CapacityError::NoCidrBlocks,
                        _ => CapacityError::NoAddresses,
                    });
                }
            }
        }
        Ok(got)
    }

    fn note_error(&mut self, e: CapacityError, now: Duration) {
        match e {
            CapacityError::NoAddresses => self.last_no_addresses = Some(now),
            CapacityError::NoCidrBlocks => self.last_no_blocks = Some(now),
        }
    }

    fn assign(
        &mut self,
        subnet: &mut SubnetAllocator,
        ei: usize,
        kind: AddressKind,
        count: u32,
        now: Duration,
    ) -> Result<(), CapacityError> {
        self.calls.add(Ec2Action::AssignPrivateIpAddresses);
        let got = match self.take(subnet, kind, count) {
            Ok(g) => g,
            Err(_) if count > 1 => {
                // The reference retries once asking for a single address.
                self.calls.add(Ec2Action::AssignPrivateIpAddresses);
                self.take(subnet, kind, 1)?
            }
            Err(e) => return Err(e),
        };
        let _ = now;
        for a in got {
            self.add_cidr(ei, a, kind == AddressKind::Prefix);
        }
        Ok(())
    }

    fn create_eni(
        &mut self,
        subnet: &mut SubnetAllocator,
        kind: AddressKind,
        count: u32,
        now: Duration,
    ) -> Result<(), CapacityError> {
        self.calls.add(Ec2Action::DescribeInstances);
        self.calls.add(Ec2Action::CreateNetworkInterface);
        let p = self.placement();
        let primary = subnet
            .allocate_ip(p)
            .map_err(|_| CapacityError::NoAddresses)?;
        let got = match self.take(subnet, kind, count) {
            Ok(g) => g,
            Err(e) => {
                subnet.release_ip(primary);
                return Err(e);
            }
        };
        self.calls.add(Ec2Action::AttachNetworkInterface);
        self.calls.add(Ec2Action::ModifyNetworkInterfaceAttribute);
        self.push_eni(Some(primary), now, false);
        let ei = self.enis.len() - 1;
        for a in got {
            self.add_cidr(ei, a, kind == AddressKind::Prefix);
        }
        Ok(())
    }

    fn release(&mut self, subnet: &mut SubnetAllocator, releases: &[Release]) {
        let ours = self.cfg.rules.exclude_cooling;
        for r in releases {
            let mut want_ips = r.ips;
            let mut want_pfx = r.prefixes;
            let e = &mut self.enis[r.eni];
            let v = &mut self.views[r.eni];
            // Release from the end so the pods' packed addresses stay put.
            let mut i = e.cidrs.len();
            while i > 0 && (want_ips > 0 || want_pfx > 0) {
                i -= 1;
                let c = &e.cidrs[i];
                if c.assigned != 0 || (ours && c.cooling != 0) {
                    continue;
                }
                let cooling = c.cooling.count_ones();
                if c.prefix && want_pfx > 0 {
                    want_pfx -= 1;
                    v.prefixes -= 1;
                    v.free_prefixes -= 1;
                    v.prefix_ips_cooling -= cooling;
                    if cooling == 0 {
                        v.cold_free_prefixes -= 1;
                    }
                    subnet.release_prefix(c.base);
                } else if !c.prefix && want_ips > 0 {
                    want_ips -= 1;
                    v.ips -= 1;
                    v.ips_cooling -= cooling;
                    subnet.release_ip(c.base);
                } else {
                    continue;
                }
                e.cidrs.swap_remove(i);
            }
            let kinds = u64::from(r.ips > 0) + u64::from(r.prefixes > 0);
            for _ in 0..kinds {
                self.calls.add(Ec2Action::UnassignPrivateIpAddresses);
            }
        }
    }

    fn free_eni(&mut self, subnet: &mut SubnetAllocator, ei: usize) {
        self.calls.add(Ec2Action::DescribeNetworkInterfaces);
        self.calls.add(Ec2Action::DetachNetworkInterface);
        self.calls.add(Ec2Action::DeleteNetworkInterface);
        let e = self.enis.remove(ei);
        self.views.remove(ei);
        for c in e.cidrs {
            if c.prefix {
                subnet.release_prefix(c.base);
            } else {
                subnet.release_ip(c.base);
            }
        }
        if let Some(ip) = e.primary_ip {
            subnet.release_ip(ip);
        }
    }

    /// Records the addresses in cooldown now in a ring of ten buckets spanning the churn
    /// window, and returns the most seen at once over the window.
    fn note_cooling(&mut self, now: Duration) {
        let width = (self.cfg.timers.churn_window.as_secs() / 10).max(1);
        let slot = now.as_secs() / width;
        if slot > self.peak_slot {
            for k in 1..=(slot - self.peak_slot).min(10) {
                self.cooling_peaks[((self.peak_slot + k) % 10) as usize] = 0;
            }
            self.peak_slot = slot;
        }
        let cooling: u32 = self.views.iter().map(|v| v.cooling()).sum();
        let b = &mut self.cooling_peaks[(self.peak_slot % 10) as usize];
        *b = (*b).max(cooling);
    }

    fn input(&self) -> PoolInput<'_> {
        PoolInput {
            enis: &self.views,
            unmanaged_enis: 0,
            // The trunk is not a pool ENI: keeping its slot free is how its slot is counted.
            reserve_trunk_slot: self.trunk.is_some(),
            last_decrease: self.last_decrease,
            last_insufficient_addresses: self.last_no_addresses,
            last_insufficient_cidr: self.last_no_blocks,
            paused: false,
            recent_cooling_peak: self.cooling_peaks.iter().copied().max().unwrap_or(0),
            demand: self.demand.as_ref().map(|(settings, state)| Demand {
                settings,
                state,
                waiting: self.pending,
            }),
        }
    }

    /// One pool-manager tick at time `now`: expire cooldowns, decide and carry out at most one
    /// change (with [`policy::Rules::immediate_top_up`]: repeat while the pool is still low and
    /// growing succeeds, as the daemon tops up at once), free at most one ENI, then place
    /// waiting pods.
    pub fn tick(&mut self, subnet: &mut SubnetAllocator, now: Duration) -> TickOutcome {
        self.expire_cooldowns(now);
        self.note_cooling(now);
        if let Some((settings, state)) = &mut self.demand {
            let used: u32 = self.views.iter().map(|v| v.assigned() + v.cooling()).sum();
            state.observe(settings, now, used + self.pending);
        }
        let mut out = TickOutcome::default();
        let rounds = if self.cfg.rules.immediate_top_up {
            8
        } else {
            1
        };
        let mut free_phase = false;
        let mut spent_ms = 0u64;
        for round in 0..rounds {
            let d = policy::decide(&self.cfg, &self.limits, &self.input(), now);
            free_phase |= round == 0 && d.free_eni_phase;
            let Some(change) = d.change else { break };
            let result = match change {
                PoolChange::Assign { eni, kind, count } => {
                    out.grew = true;
                    let before = self.calls.get(Ec2Action::AssignPrivateIpAddresses);
                    let r = self.assign(subnet, eni, kind, count, now);
                    let calls = self.calls.get(Ec2Action::AssignPrivateIpAddresses) - before;
                    spent_ms += calls * self.latency.assign;
                    r
                }
                PoolChange::CreateEni { kind, count } => {
                    out.grew = true;
                    spent_ms += self.latency.create_eni;
                    self.create_eni(subnet, kind, count, now)
                }
                PoolChange::Release(r) => {
                    out.grew = false;
                    out.changes += 1;
                    self.release(subnet, &r);
                    self.last_decrease = Some(now);
                    break;
                }
            };
            if let Err(e) = result {
                out.grew = false;
                out.error = Some(e);
                self.note_error(e, now);
                break;
            }
            out.changes += 1;
            let waiting = self.pending;
            self.place_pending(now);
            self.waited_ms += u64::from(waiting - self.pending) * spent_ms;
        }
        if free_phase {
            if let Some(ei) =
                policy::choose_eni_to_free(&self.cfg, &self.limits, &self.input(), now)
            {
                self.free_eni(subnet, ei);
                out.enis_freed += 1;
            }
        }
        self.place_pending(now);
        out
    }

    /// Releases every address and ENI of the node back to the subnet (instance terminated).
    pub fn terminate(mut self, subnet: &mut SubnetAllocator) {
        while !self.enis.is_empty() {
            let e = self.enis.remove(0);
            for c in e.cidrs {
                if c.prefix {
                    subnet.release_prefix(c.base);
                } else {
                    subnet.release_ip(c.base);
                }
            }
            if let Some(ip) = e.primary_ip {
                subnet.release_ip(ip);
            }
        }
        for ip in self.trunk.take().unwrap_or_default() {
            subnet.release_ip(ip);
        }
        let _ = self.primary_in_subnet;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Catalog, LimitOverrides};

    fn node(t: &str, cfg: PoolConfig) -> (ModelNode, SubnetAllocator) {
        let l = Catalog::embedded()
            .lookup(t, &LimitOverrides::default())
            .expect("type");
        let mut s = SubnetAllocator::new("10.0.0.0/20".parse().expect("cidr"));
        let n = ModelNode::boot(
            cfg,
            NodeLimits::new(&l, None, None),
            &mut s,
            true,
            AddressPlacement::Packed,
            Duration::ZERO,
        )
        .expect("boot");
        (n, s)
    }

    fn run(n: &mut ModelNode, s: &mut SubnetAllocator, from: u64, ticks: u64) {
        for t in 0..ticks {
            n.tick(s, Duration::from_secs(from + 5 * t));
        }
    }

    #[test]
    fn subnet_accounting_matches_the_node() {
        let (mut n, mut s) = node("m5.large", PoolConfig::default());
        run(&mut n, &mut s, 0, 4);
        n.add_pods(12, Duration::from_secs(20));
        run(&mut n, &mut s, 20, 30);
        let (pod, primaries, _) = n.address_usage();
        assert_eq!((n.enis(), pod, primaries), (3, 27, 3));
        assert_eq!(s.free_addresses(), 4091 - 30);
        assert_eq!(n.pods(), 12);
        n.remove_pods(12, Duration::from_secs(200));
        run(&mut n, &mut s, 200, 40);
        // (W+1)*9 = 18 available is enough to free an ENI: the pool shrinks to the primary.
        assert_eq!(n.enis(), 1, "scale down frees ENIs only after the timers");
        assert_eq!(s.free_addresses(), 4091 - 10);
    }

    #[test]
    fn cooling_addresses_are_not_reused_until_the_cooldown_ends() {
        let cfg = PoolConfig {
            warm_ip_target: 1,
            ..Default::default()
        };
        let (mut n, mut s) = node("m5.large", cfg);
        run(&mut n, &mut s, 0, 2);
        n.add_pods(1, Duration::from_secs(10));
        n.remove_pods(1, Duration::from_secs(11));
        assert_eq!(n.views()[0].ips_cooling, 1);
        n.tick(&mut s, Duration::from_secs(42));
        assert_eq!(n.views()[0].ips_cooling, 0);
    }

    #[test]
    fn prefix_mode_all_or_nothing_when_blocks_run_out() {
        let cfg = PoolConfig {
            prefix_delegation: true,
            warm_prefix_target: 1,
            ..Default::default()
        };
        let l = Catalog::embedded()
            .lookup("m5.large", &LimitOverrides::default())
            .expect("t");
        let mut s = SubnetAllocator::new("10.0.0.0/26".parse().expect("cidr"));
        let mut n = ModelNode::boot(
            cfg,
            NodeLimits::new(&l, None, None),
            &mut s,
            true,
            AddressPlacement::Packed,
            Duration::ZERO,
        )
        .expect("boot");
        // /26: blocks 0 and 3 hold reserved addresses, the primary sits in block 0.
        n.add_pods(40, Duration::ZERO);
        run(&mut n, &mut s, 0, 10);
        assert_eq!(n.address_usage().2, 2);
        assert_eq!(n.pods(), 32);
        assert_eq!(n.pending(), 8);
        let out = n.tick(&mut s, Duration::from_secs(400));
        assert_eq!(out.error, Some(CapacityError::NoCidrBlocks));
    }
}
