//! Timeline simulation: pods over time through the pool policy, tick by tick, for one node or a
//! fleet sharing subnets.
//!
//! ```yaml
//! subnets: [{name: a, cidr: 10.0.0.0/22}]   # or subnet: {cidr: 10.0.0.0/22}
//! config: {warm_ip_target: 5, policy: ours}
//! duration: 24h          # seconds, or a number with s, m, h or d
//! tick: 5s               # the daemon's pool-manager interval
//! sample_every: 5m
//! seed: 7
//! ec2_latency_ms: {assign: 300, create_eni: 3000}   # optional: charge EC2's time to waiting pods
//! node_groups:
//!   - instance_type: m5.large
//!     count: 50
//!     subnet: a
//!     spread: 0.2        # each node's pods scaled by a factor in [0.8, 1.2]
//!     pods: {daily: {min: 5, max: 25, peak: 14h}}
//!   - instance_type: c5.xlarge
//!     count: 1
//!     pods: {trace: [[0, 0], [600, 40], [3600, 10]]}   # or a CSV file given to the CLI
//! ```
//!
//! Every tick each node's wanted pod count is brought to its load (new pods take the first free
//! address; leaving pods are chosen pseudo-randomly and their addresses cool down), then the
//! node's pool manager ticks against its subnet. Samples record the fleet's allocated, assigned,
//! warm and cooling addresses, ENIs, pending pods, EC2 calls and each subnet's free addresses;
//! the first time a subnet refuses a request is reported as its exhaustion.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::Catalog;
use crate::node::{AddressPlacement, CapacityError, Ec2Action, Ec2Calls, Ec2Latency, ModelNode};
use crate::plan::{parse_document, InputError, NodeGroupSpec, PlanConfig, SubnetSpec};
use crate::policy::Flavour;
use crate::subnet::{aws_usable_ips, Ipv4Cidr, SubnetAllocator};

/// A duration written as seconds (`300`) or with a unit (`30s`, `5m`, `1h`, `2d`, `1h30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Span(pub u64);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Span(n)),
            Raw::S(s) => parse_span(&s).map(Span).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `90`, `30s`, `5m`, `1h30m`, `2d` into seconds.
pub fn parse_span(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let mut total = 0u64;
    let mut num = String::new();
    for ch in t.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => {
                return Err(format!(
                    "`{s}` is not a duration (use e.g. 90, 30s, 5m, 1h30m, 2d)"
                ))
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration"))?;
        total += n * unit;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("`{s}`: a number without a unit must stand alone"));
    }
    Ok(total)
}

/// A named subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedSubnet {
    /// Name node groups refer to.
    pub name: String,
    /// CIDR.
    pub cidr: Ipv4Cidr,
}

/// Pods over time for one node. Written as a map with exactly one of `constant`, `ramp`,
/// `daily` or `trace`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "LoadSpec")]
pub enum Load {
    /// The same number all along.
    Constant(u32),
    /// From `from` to `to` linearly over `over`, starting at `start`.
    Ramp {
        /// Pods before the ramp.
        from: u32,
        /// Pods after the ramp.
        to: u32,
        /// Ramp length.
        over: Span,
        /// When the ramp starts.
        #[serde(default = "zero_span")]
        start: Span,
    },
    /// A 24-hour cycle between `min` and `max`, highest at `peak` (time of day).
    Daily {
        /// Pods at the trough.
        min: u32,
        /// Pods at the peak.
        max: u32,
        /// Time of day of the peak.
        peak: Span,
    },
    /// A step function of (seconds, pods) points, sorted by time.
    Trace(Vec<(u64, u32)>),
    /// A CSV file of `seconds,pods` rows, read by [`TimelineInput::load_trace_files`].
    TraceFile(String),
}

fn zero_span() -> Span {
    Span(0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RampSpec {
    from: u32,
    to: u32,
    over: Span,
    #[serde(default = "zero_span")]
    start: Span,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DailySpec {
    min: u32,
    max: u32,
    peak: Span,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadSpec {
    #[serde(default)]
    constant: Option<u32>,
    #[serde(default)]
    ramp: Option<RampSpec>,
    #[serde(default)]
    daily: Option<DailySpec>,
    #[serde(default)]
    trace: Option<Vec<(u64, u32)>>,
    #[serde(default)]
    trace_file: Option<String>,
}

impl TryFrom<LoadSpec> for Load {
    type Error = String;
    fn try_from(s: LoadSpec) -> Result<Self, String> {
        let mut v = Vec::new();
        if let Some(n) = s.constant {
            v.push(Load::Constant(n));
        }
        if let Some(r) = s.ramp {
            v.push(Load::Ramp {
                from: r.from,
                to: r.to,
                over: r.over,
                start: r.start,
            });
        }
        if let Some(d) = s.daily {
            v.push(Load::Daily {
                min: d.min,
                max: d.max,
                peak: d.peak,
            });
        }
        if let Some(t) = s.trace {
            if t.windows(2).any(|w| w[1].0 < w[0].0) {
                return Err("trace timestamps must not go backwards".into());
            }
            v.push(Load::Trace(t));
        }
        if let Some(f) = s.trace_file {
            v.push(Load::TraceFile(f));
        }
        match v.len() {
            1 => Ok(v.remove(0)),
            _ => Err("give exactly one of constant, ramp, daily, trace or trace_file".into()),
        }
    }
}

impl Load {
    /// Pods wanted at `t` seconds.
    pub fn at(&self, t: u64) -> u32 {
        match self {
            Load::Constant(n) => *n,
            Load::Ramp {
                from,
                to,
                over,
                start,
            } => {
                if t <= start.0 {
                    *from
                } else if over.0 == 0 || t >= start.0 + over.0 {
                    *to
                } else {
                    let f = (t - start.0) as f64 / over.0 as f64;
                    (f64::from(*from) + (f64::from(*to) - f64::from(*from)) * f).round() as u32
                }
            }
            Load::Daily { min, max, peak } => {
                let phase = ((t as f64 - peak.0 as f64) / 86_400.0) * std::f64::consts::TAU;
                let w = (1.0 + phase.cos()) / 2.0;
                (f64::from(*min) + (f64::from(*max) - f64::from(*min)) * w).round() as u32
            }
            Load::TraceFile(_) => 0,
            Load::Trace(points) => {
                let i = points.partition_point(|p| p.0 <= t);
                if i == 0 {
                    0
                } else {
                    points[i - 1].1
                }
            }
        }
    }

    fn peak(&self) -> u32 {
        match self {
            Load::Constant(n) => *n,
            Load::Ramp { from, to, .. } => (*from).max(*to),
            Load::Daily { min, max, .. } => (*min).max(*max),
            Load::Trace(p) => p.iter().map(|x| x.1).max().unwrap_or(0),
            Load::TraceFile(_) => 0,
        }
    }
}

/// Parses a CSV trace: `seconds,pods` rows, an optional header, `#` comments.
pub fn parse_trace_csv(text: &str) -> Result<Vec<(u64, u32)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut f = l.split(',').map(str::trim);
        let (a, b) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let t = parse_span(a);
        let p = b.parse::<u32>();
        match (t, p) {
            (Ok(t), Ok(p)) => out.push((t, p)),
            _ if n == 0 && out.is_empty() => continue, // header
            _ => {
                return Err(format!(
                    "line {}: expected `seconds,pods`, got `{l}`",
                    n + 1
                ))
            }
        }
    }
    if out.windows(2).any(|w| w[1].0 < w[0].0) {
        return Err("timestamps must not go backwards".into());
    }
    if out.is_empty() {
        return Err("the trace has no rows".into());
    }
    Ok(out)
}

/// One node group of a timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineGroup {
    /// EC2 instance type.
    pub instance_type: String,
    /// Nodes.
    pub count: u32,
    /// Subnet name (default: the first subnet).
    #[serde(default)]
    pub subnet: Option<String>,
    /// Pods per node over time.
    pub pods: Load,
    /// Per-node variation of the load: each node's pods are scaled by a factor drawn from
    /// `[1 - spread, 1 + spread]`.
    #[serde(default)]
    pub spread: f64,
    /// Pods replaced per hour, as a fraction of the node's pods (rollouts, jobs): each
    /// replacement deletes a pod (its address cools down) and creates a new one in the same tick.
    #[serde(default)]
    pub churn_per_hour: f64,
    /// Override: ENIs on the default network card.
    #[serde(default)]
    pub max_enis: Option<u32>,
    /// Override: IPv4 addresses per ENI.
    #[serde(default)]
    pub ipv4_per_eni: Option<u32>,
    /// Override: vCPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Kubelet `maxPods`.
    #[serde(default)]
    pub kubelet_max_pods: Option<u32>,
}

/// A whole timeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineInput {
    /// One subnet shared by every group.
    #[serde(default)]
    pub subnet: Option<SubnetSpec>,
    /// Named subnets.
    #[serde(default)]
    pub subnets: Vec<NamedSubnet>,
    /// Pool settings.
    #[serde(default)]
    pub config: PlanConfig,
    /// How long to simulate.
    pub duration: Span,
    /// Pool-manager tick (default 5 s).
    #[serde(default = "five_seconds")]
    pub tick: Span,
    /// Sampling interval (default: about 300 samples).
    #[serde(default)]
    pub sample_every: Option<Span>,
    /// Seed for address placement and pod removal.
    #[serde(default)]
    pub seed: u64,
    /// EC2's time to grow the pool, charged to the pods waiting for it (default 0: growth
    /// within the tick is free, as before).
    #[serde(default)]
    pub ec2_latency_ms: Ec2Latency,
    /// Node groups.
    pub node_groups: Vec<TimelineGroup>,
}

fn five_seconds() -> Span {
    Span(5)
}

impl TimelineInput {
    /// Parses YAML or JSON.
    pub fn parse(text: &str) -> Result<Self, InputError> {
        parse_document(text)
    }

    /// Replaces every `trace_file` load with the trace read through `read` (which maps the
    /// file name as written to its text; the caller resolves relative paths).
    pub fn load_trace_files(
        &mut self,
        mut read: impl FnMut(&str) -> Result<String, String>,
    ) -> Result<(), InputError> {
        for (i, g) in self.node_groups.iter_mut().enumerate() {
            if let Load::TraceFile(name) = &g.pods {
                let field = format!("node_groups[{i}].pods.trace_file");
                let text = read(name).map_err(|e| InputError::new(&field, e))?;
                let trace = parse_trace_csv(&text)
                    .map_err(|e| InputError::new(&field, format!("{name}: {e}")))?;
                g.pods = Load::Trace(trace);
            }
        }
        Ok(())
    }
}

/// Fleet totals at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t: u64,
    /// Pods wanted.
    pub pods_wanted: u64,
    /// Pods waiting for an address.
    pub pods_pending: u64,
    /// Pod addresses on the fleet's ENIs.
    pub allocated_ips: u64,
    /// Assigned to pods.
    pub assigned_ips: u64,
    /// Unassigned and usable (allocated - assigned - cooling).
    pub warm_ips: u64,
    /// In cooldown.
    pub cooling_ips: u64,
    /// ENIs attached.
    pub enis: u64,
    /// EC2 calls so far.
    pub ec2_calls: u64,
    /// Mutating EC2 calls so far.
    pub ec2_mutating_calls: u64,
    /// Free addresses per subnet, in the order of `subnets`.
    pub subnet_free: Vec<u32>,
}

/// The first refusal by a subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exhaustion {
    /// Subnet name.
    pub subnet: String,
    /// Seconds since the start.
    pub at: u64,
    /// The node group that hit it.
    pub node_group: usize,
    /// What EC2 answered.
    pub error: CapacityError,
}

/// Per-subnet summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubnetSummary {
    /// Name.
    pub name: String,
    /// CIDR.
    pub cidr: Ipv4Cidr,
    /// Usable addresses.
    pub usable_ips: u32,
    /// Fewest free addresses seen.
    pub min_free: u32,
}

/// The timeline's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineReport {
    /// Policy simulated.
    pub policy: Flavour,
    /// Simulated seconds.
    pub duration: u64,
    /// Tick in seconds.
    pub tick: u64,
    /// Nodes.
    pub nodes: u64,
    /// Subnets.
    pub subnets: Vec<SubnetSummary>,
    /// Samples over time.
    pub samples: Vec<Sample>,
    /// EC2 calls by action over the whole run.
    pub ec2_calls: Ec2Calls,
    /// Most pods waiting at once.
    pub max_pods_pending: u64,
    /// Pod-seconds spent waiting for an address: whole ticks without one, and EC2's time to
    /// grow the pool when `ec2_latency_ms` is set.
    pub pending_pod_seconds: u64,
    /// Idle pod addresses (allocated minus assigned, cooling included) over the fleet,
    /// averaged over every tick.
    pub idle_ips_avg: f64,
    /// Most idle pod addresses over the fleet at any tick.
    pub idle_ips_peak: u64,
    /// Most pod addresses allocated over the fleet at any tick.
    pub allocated_ips_peak: u64,
    /// First refusal of each subnet that ran out.
    pub exhaustion: Vec<Exhaustion>,
}

struct SimNode {
    group: usize,
    subnet: usize,
    factor: f64,
    churn_debt: f64,
    node: ModelNode,
}

/// A prepared simulation (validated input, booted nodes).
pub struct Timeline {
    input: TimelineInput,
    subnets: Vec<(String, SubnetAllocator)>,
    nodes: Vec<SimNode>,
    loads: Vec<Load>,
}

fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Timeline {
    /// Validates the input and boots every node at time 0.
    pub fn new(input: TimelineInput, catalog: &Catalog) -> Result<Self, InputError> {
        let mut subnets: Vec<(String, SubnetAllocator)> = Vec::new();
        if let Some(s) = &input.subnet {
            subnets.push(("subnet".into(), SubnetAllocator::new(s.cidr_or_default()?)));
        }
        for (i, s) in input.subnets.iter().enumerate() {
            if subnets.iter().any(|(n, _)| *n == s.name) {
                return Err(InputError::new(
                    format!("subnets[{i}].name"),
                    "duplicate name",
                ));
            }
            subnets.push((s.name.clone(), SubnetAllocator::new(s.cidr)));
        }
        if subnets.is_empty() {
            return Err(InputError::new("subnets", "give `subnet` or `subnets`"));
        }
        for (i, (_, a)) in subnets.iter().enumerate() {
            if aws_usable_ips(a.cidr().prefix_len()).is_none() {
                return Err(InputError::new(
                    format!("subnets[{i}].cidr"),
                    format!(
                        "{} is not a VPC subnet size (AWS allows /16 to /28)",
                        a.cidr()
                    ),
                ));
            }
        }
        if input.tick.0 == 0 {
            return Err(InputError::new("tick", "must be at least 1 second"));
        }
        if input.duration.0 == 0 {
            return Err(InputError::new("duration", "must be positive"));
        }
        if input.node_groups.is_empty() {
            return Err(InputError::new(
                "node_groups",
                "give at least one node group",
            ));
        }
        let mut nodes = Vec::new();
        let mut loads = Vec::new();
        for (gi, g) in input.node_groups.iter().enumerate() {
            let at = format!("node_groups[{gi}]");
            if !(0.0..1.0).contains(&g.spread) {
                return Err(InputError::new(format!("{at}.spread"), "must be in [0, 1)"));
            }
            if !(0.0..=3600.0).contains(&g.churn_per_hour) {
                return Err(InputError::new(
                    format!("{at}.churn_per_hour"),
                    "must be between 0 and 3600",
                ));
            }
            if let Load::TraceFile(f) = &g.pods {
                return Err(InputError::new(
                    format!("{at}.pods.trace_file"),
                    format!("`{f}` was not loaded (call load_trace_files first)"),
                ));
            }
            if let Load::Trace(p) = &g.pods {
                if p.windows(2).any(|w| w[1].0 < w[0].0) {
                    return Err(InputError::new(
                        format!("{at}.pods.trace"),
                        "timestamps must not go backwards",
                    ));
                }
            }
            let spec = NodeGroupSpec {
                instance_type: g.instance_type.clone(),
                count: g.count,
                pods_per_node: 0,
                max_enis: g.max_enis,
                ipv4_per_eni: g.ipv4_per_eni,
                vcpus: g.vcpus,
                kubelet_max_pods: g.kubelet_max_pods,
                security_groups_for_pods: false,
                branch_pods_per_node: 0,
            };
            let plan = crate::plan::PlanInput {
                subnet: SubnetSpec {
                    cidr: Some(subnets[0].1.cidr()),
                    prefix_length: None,
                },
                config: input.config.clone(),
                host_networking_ips: 0,
                daemonset_pods: None,
                node_groups: vec![spec],
            };
            let resolved = plan.resolve(catalog).map_err(|e| InputError {
                field: e.field.replace("node_groups[0]", &at),
                message: e.message,
            })?;
            let r = &resolved[0];
            let peak = g.pods.peak() as f64 * (1.0 + g.spread);
            if peak.ceil() as u32 + crate::maxpods::HOST_NETWORK_PODS > r.kubelet_max_pods {
                return Err(InputError::new(
                    format!("{at}.pods"),
                    format!(
                        "the load peaks at {} pods per node, above the node's max pods ({}) less 2 host-network pods",
                        peak.ceil(),
                        r.kubelet_max_pods
                    ),
                ));
            }
            let si = match &g.subnet {
                None => 0,
                Some(name) => subnets.iter().position(|(n, _)| n == name).ok_or_else(|| {
                    InputError::new(format!("{at}.subnet"), format!("no subnet named `{name}`"))
                })?,
            };
            for k in 0..g.count {
                let id = nodes.len() as u64;
                let r01 = (mix(input.seed, id) >> 11) as f64 / (1u64 << 53) as f64;
                let factor = 1.0 + g.spread * (2.0 * r01 - 1.0);
                let node = ModelNode::boot(
                    r.pool,
                    r.node,
                    &mut subnets[si].1,
                    !r.pool.custom_networking,
                    AddressPlacement::Scattered(mix(input.seed ^ 0x5eed, id)),
                    Duration::ZERO,
                )
                .map(|n| n.with_latency(input.ec2_latency_ms))
                .map(|n| {
                    if input.config.policy == Flavour::Demand {
                        n.with_demand(input.config.demand, Duration::ZERO)
                    } else {
                        n
                    }
                })
                .map_err(|_| {
                    InputError::new(
                        format!("{at}.count"),
                        format!(
                            "subnet `{}` has no address left for node {k}'s primary ENI",
                            subnets[si].0
                        ),
                    )
                })?;
                nodes.push(SimNode {
                    group: gi,
                    subnet: si,
                    factor,
                    churn_debt: 0.0,
                    node,
                });
            }
            loads.push(g.pods.clone());
        }
        Ok(Self {
            input,
            subnets,
            nodes,
            loads,
        })
    }

    /// Node-ticks the run will take.
    pub fn node_ticks(&self) -> u64 {
        self.nodes.len() as u64 * (self.input.duration.0 / self.input.tick.0 + 1)
    }

    /// Runs the simulation to the end.
    pub fn run(mut self) -> TimelineReport {
        let tick = self.input.tick.0;
        let duration = self.input.duration.0;
        let sample_every = self
            .input
            .sample_every
            .map(|s| s.0.max(tick))
            .unwrap_or_else(|| (duration / 300).max(tick).div_ceil(tick) * tick);
        let mut samples = Vec::new();
        let mut exhaustion: Vec<Exhaustion> = Vec::new();
        let mut min_free: Vec<u32> = self
            .subnets
            .iter()
            .map(|(_, a)| a.free_addresses())
            .collect();
        let mut max_pending = 0u64;
        let mut pending_seconds = 0u64;
        let (mut idle_sum, mut idle_peak, mut alloc_peak, mut ticks) = (0u64, 0u64, 0u64, 0u64);
        let mut next_sample = 0u64;
        let mut t = 0u64;
        while t <= duration {
            let now = Duration::from_secs(t);
            let mut pending = 0u64;
            let (mut idle, mut allocated) = (0u64, 0u64);
            for n in &mut self.nodes {
                let want = (f64::from(self.loads[n.group].at(t)) * n.factor).round() as u32;
                let churn = self.input.node_groups[n.group].churn_per_hour;
                if churn > 0.0 {
                    n.churn_debt += f64::from(n.node.pods()) * churn * tick as f64 / 3600.0;
                    let replace = n.churn_debt.floor();
                    n.churn_debt -= replace;
                    let replace = (replace as u32).min(n.node.pods());
                    n.node.remove_pods(replace, now);
                    n.node.add_pods(replace, now);
                }
                n.node.set_pods(want, now);
                let out = n.node.tick(&mut self.subnets[n.subnet].1, now);
                if let Some(e) = out.error {
                    let name = &self.subnets[n.subnet].0;
                    if !exhaustion.iter().any(|x| x.subnet == *name) {
                        exhaustion.push(Exhaustion {
                            subnet: name.clone(),
                            at: t,
                            node_group: n.group,
                            error: e,
                        });
                    }
                }
                pending += u64::from(n.node.pending());
                let pod_ips = u64::from(n.node.address_usage().0);
                allocated += pod_ips;
                idle += pod_ips.saturating_sub(u64::from(n.node.pods()));
            }
            idle_sum += idle;
            idle_peak = idle_peak.max(idle);
            alloc_peak = alloc_peak.max(allocated);
            ticks += 1;
            max_pending = max_pending.max(pending);
            pending_seconds += pending * tick;
            for (i, (_, a)) in self.subnets.iter().enumerate() {
                min_free[i] = min_free[i].min(a.free_addresses());
            }
            if t >= next_sample || t + tick > duration {
                samples.push(self.sample(t));
                next_sample = t + sample_every;
            }
            t += tick;
        }
        let mut calls = Ec2Calls::default();
        let mut waited_ms = 0u64;
        for n in &self.nodes {
            calls.merge(n.node.calls());
            waited_ms += n.node.waited_ms();
        }
        pending_seconds += waited_ms / 1000;
        TimelineReport {
            policy: self.input.config.policy,
            duration,
            tick,
            nodes: self.nodes.len() as u64,
            subnets: self
                .subnets
                .iter()
                .zip(&min_free)
                .map(|((name, a), m)| SubnetSummary {
                    name: name.clone(),
                    cidr: a.cidr(),
                    usable_ips: aws_usable_ips(a.cidr().prefix_len()).unwrap_or(0),
                    min_free: *m,
                })
                .collect(),
            samples,
            ec2_calls: calls,
            max_pods_pending: max_pending,
            pending_pod_seconds: pending_seconds,
            idle_ips_avg: idle_sum as f64 / ticks.max(1) as f64,
            idle_ips_peak: idle_peak,
            allocated_ips_peak: alloc_peak,
            exhaustion,
        }
    }

    fn sample(&self, t: u64) -> Sample {
        let mut s = Sample {
            t,
            ..Default::default()
        };
        for n in &self.nodes {
            let st = n.node.stats();
            let (pod_ips, _, _) = n.node.address_usage();
            s.pods_wanted += u64::from(n.node.pods() + n.node.pending());
            s.pods_pending += u64::from(n.node.pending());
            s.allocated_ips += u64::from(pod_ips);
            s.assigned_ips += u64::from(n.node.pods());
            s.cooling_ips += u64::from(st.cooling);
            s.enis += u64::from(n.node.enis());
            s.ec2_calls += n.node.calls().total();
            s.ec2_mutating_calls += n.node.calls().mutating();
        }
        s.warm_ips = s
            .allocated_ips
            .saturating_sub(s.assigned_ips + s.cooling_ips);
        s.subnet_free = self
            .subnets
            .iter()
            .map(|(_, a)| a.free_addresses())
            .collect();
        s
    }
}

/// Parses, validates and runs a timeline.
pub fn simulate(input: TimelineInput, catalog: &Catalog) -> Result<TimelineReport, InputError> {
    Ok(Timeline::new(input, catalog)?.run())
}

/// The mutating EC2 call count of a report.
pub fn mutating_calls(r: &TimelineReport) -> u64 {
    Ec2Action::ALL
        .iter()
        .filter(|a| a.is_mutating())
        .map(|a| r.ec2_calls.get(*a))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml: &str) -> TimelineReport {
        simulate(
            TimelineInput::parse(yaml).expect("parse"),
            Catalog::embedded(),
        )
        .expect("run")
    }

    #[test]
    fn spans_parse() {
        assert_eq!(parse_span("90"), Ok(90));
        assert_eq!(parse_span("1h30m"), Ok(5400));
        assert_eq!(parse_span("2d"), Ok(172_800));
        assert!(parse_span("5 minutes").is_err());
        assert!(parse_span("5m3").is_err());
    }

    #[test]
    fn loads_follow_their_shapes() {
        let ramp = Load::Ramp {
            from: 0,
            to: 100,
            over: Span(100),
            start: Span(10),
        };
        assert_eq!((ramp.at(0), ramp.at(60), ramp.at(500)), (0, 50, 100));
        let daily = Load::Daily {
            min: 10,
            max: 30,
            peak: Span(14 * 3600),
        };
        assert_eq!(daily.at(14 * 3600), 30);
        assert_eq!(daily.at(2 * 3600), 10);
        let trace = Load::Trace(vec![(0, 1), (60, 5)]);
        assert_eq!((trace.at(59), trace.at(60), trace.at(1000)), (1, 5, 5));
    }

    #[test]
    fn trace_csv_parses_with_header_and_rejects_garbage() {
        assert_eq!(
            parse_trace_csv("t,pods\n0,1\n60,3\n"),
            Ok(vec![(0, 1), (60, 3)])
        );
        assert!(parse_trace_csv("0,1\nx,y\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_trace_csv("60,1\n0,3\n").is_err());
    }

    #[test]
    fn a_ramp_fills_the_pool_and_reports_calls() {
        let r = run("subnet: {cidr: 10.0.0.0/22}
duration: 1h
node_groups: [{instance_type: m5.large, count: 4, pods: {ramp: {from: 0, to: 20, over: 30m}}}]");
        let last = r.samples.last().expect("samples");
        assert_eq!(last.assigned_ips, 80);
        assert_eq!(last.pods_pending, 0);
        assert_eq!(
            last.enis, 12,
            "20 pods on m5.large with WARM_ENI_TARGET=1: 3 ENIs"
        );
        assert!(r.ec2_calls.get(Ec2Action::CreateNetworkInterface) >= 8);
        assert_eq!(last.subnet_free[0], 1019 - 4 * 30);
        assert!(r.exhaustion.is_empty());
    }

    #[test]
    fn a_small_subnet_runs_out_and_says_when() {
        let r = run("subnets: [{name: tiny, cidr: 10.0.0.0/26}]
duration: 30m
node_groups: [{instance_type: m5.large, count: 3, pods: {ramp: {from: 0, to: 25, over: 10m}}}]");
        assert_eq!(r.exhaustion.len(), 1);
        assert_eq!(r.exhaustion[0].subnet, "tiny");
        assert!(r.exhaustion[0].at > 0);
        assert!(r.max_pods_pending > 0);
        // A new m5.large ENI needs 10 addresses at once (primary + 9): fewer than that stay
        // free but unusable.
        assert!(r.subnets[0].min_free < 10, "{}", r.subnets[0].min_free);
    }

    #[test]
    fn ours_leaves_pods_waiting_no_longer_than_the_reference_under_churn() {
        let base = "subnet: {cidr: 10.0.0.0/20}
config: {warm_ip_target: 3, minimum_ip_target: 5, policy: POLICY}
duration: 6h
seed: 3
node_groups: [{instance_type: m5.xlarge, count: 5, spread: 0.3, pods: {daily: {min: 4, max: 40, peak: 3h}}}]";
        let reference = run(&base.replace("POLICY", "reference"));
        let ours = run(&base.replace("POLICY", "ours"));
        let pending = |r: &TimelineReport| r.pending_pod_seconds;
        assert!(
            pending(&ours) <= pending(&reference),
            "{} vs {}",
            pending(&ours),
            pending(&reference)
        );
    }

    #[test]
    fn churn_makes_the_reference_wait_on_cooling_addresses_and_ours_not() {
        let base = "subnet: {cidr: 10.0.0.0/20}
config: {warm_ip_target: 3, minimum_ip_target: 8, policy: POLICY}
duration: 3h
seed: 5
node_groups: [{instance_type: m5.large, count: 4, churn_per_hour: 1.5, pods: {constant: 20}}]";
        let reference = run(&base.replace("POLICY", "reference"));
        let ours = run(&base.replace("POLICY", "ours"));
        assert!(
            reference.pending_pod_seconds > 0,
            "churn through a 2-address warm pool"
        );
        assert!(
            ours.pending_pod_seconds * 2 < reference.pending_pod_seconds,
            "ours {} vs reference {}",
            ours.pending_pod_seconds,
            reference.pending_pod_seconds
        );
        // Keeping room for the churn must not turn it into an assign/release cycle.
        let (o, r) = (mutating_calls(&ours), mutating_calls(&reference));
        assert!(
            o <= 2 * r + 20,
            "ours made {o} mutating EC2 calls, the reference {r}"
        );
    }

    #[test]
    fn bad_timelines_name_the_field() {
        let e =
            TimelineInput::parse("subnet: {cidr: 10.0.0.0/22}\nduration: 1 hour\nnode_groups: []")
                .expect_err("bad duration");
        assert_eq!(e.field, "duration");
        let t = TimelineInput::parse(
            "subnet: {cidr: 10.0.0.0/22}\nduration: 1h\nnode_groups: [{instance_type: m5.large, count: 1, subnet: b, pods: {constant: 3}}]",
        )
        .expect("parse");
        let e = Timeline::new(t, Catalog::embedded())
            .err()
            .expect("unknown subnet");
        assert_eq!(e.field, "node_groups[0].subnet");
        let t = TimelineInput::parse(
            "subnet: {cidr: 10.0.0.0/22}\nduration: 1h\nnode_groups: [{instance_type: m5.large, count: 1, pods: {constant: 300}}]",
        )
        .expect("parse");
        let e = Timeline::new(t, Catalog::embedded())
            .err()
            .expect("too many pods");
        assert_eq!(e.field, "node_groups[0].pods");
    }

    fn example(name: &str, policy: Flavour) -> TimelineReport {
        let text = match name {
            "flat" => include_str!("../examples/flat-day.yaml"),
            "burst" => include_str!("../examples/burst-day.yaml"),
            _ => include_str!("../examples/daily-cycle.yaml"),
        };
        let mut input = TimelineInput::parse(text).expect("example parses");
        input.config.policy = policy;
        simulate(input, Catalog::embedded()).expect("example runs")
    }

    /// The demand flavour against the reference on the example days (the sweep bench has the
    /// whole table): what it must keep winning, and where it is bound by the user's floors.
    #[test]
    fn the_demand_flavour_on_the_example_days() {
        let (r, d) = (
            example("flat", Flavour::Reference),
            example("flat", Flavour::Demand),
        );
        assert!(
            d.idle_ips_avg * 3.0 <= r.idle_ips_avg,
            "{} vs {}",
            d.idle_ips_avg,
            r.idle_ips_avg
        );
        assert!(mutating_calls(&d) <= mutating_calls(&r));
        assert_eq!(d.pending_pod_seconds, 0);
        let (r, d) = (
            example("burst", Flavour::Reference),
            example("burst", Flavour::Demand),
        );
        assert!(
            d.idle_ips_avg * 3.0 <= r.idle_ips_avg,
            "{} vs {}",
            d.idle_ips_avg,
            r.idle_ips_avg
        );
        assert_eq!(d.pending_pod_seconds, 0);
        // WARM_IP_TARGET=3 and MINIMUM_IP_TARGET=8 are floors: idle cannot drop much, but calls
        // and waiting do.
        let (r, d) = (
            example("daily", Flavour::Reference),
            example("daily", Flavour::Demand),
        );
        assert!(mutating_calls(&d) < mutating_calls(&r));
        assert!(r.pending_pod_seconds > 0);
        assert_eq!(d.pending_pod_seconds, 0);
        assert!(d.idle_ips_avg >= r.idle_ips_avg * 0.9, "the floors hold");
    }

    #[test]
    fn ec2_latency_is_charged_to_the_pods_that_wait_for_a_growth() {
        let base = "subnet: {cidr: 10.0.0.0/22}
LATENCY
duration: 10m
node_groups: [{instance_type: m5.large, count: 2, pods: {trace: [[0, 1], [300, 15]]}}]";
        let free = run(&base.replace("LATENCY", ""));
        assert_eq!(free.pending_pod_seconds, 0);
        let slow = run(&base.replace(
            "LATENCY",
            "ec2_latency_ms: {assign: 1000, create_eni: 4000}",
        ));
        // At 300 s each node's 14 new pods find the warm addresses of the reference's warm
        // ENI except for those beyond it, which wait for the next ENI to be created.
        assert!(slow.pending_pod_seconds > 0);
        assert_eq!(mutating_calls(&slow), mutating_calls(&free));
        let e =
            TimelineInput::parse(&base.replace("LATENCY", "ec2_latency_ms: {assign: 1, atach: 2}"))
                .expect_err("unknown field");
        assert!(e.field.starts_with("ec2_latency_ms"), "{}", e.field);
    }
}
