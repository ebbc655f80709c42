//! Exact mode: the steady state real nodes reach.
//!
//! For every node group the model node boots, its pods arrive one at a time, and after each
//! arrival the pool manager ticks with every timer elapsed until nothing changes. The policy is
//! the one ipamd runs (reference or ours), so the answer is what the daemon really does,
//! including ENI and max-pods caps. A configuration whose pool never settles (the reference's
//! target-0 oscillation) is reported, with the upper state of the cycle.
//!
//! Nodes then share the subnet. When their steady states fit, the answer is exact. When they
//! do not, nodes are booted one after another against the shared subnet (group order), so the
//! later ones meet `InsufficientFreeAddressesInSubnet` or `InsufficientCidrBlocks`, and the pods
//! left without an address are counted.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::demand::DemandSettings;
use crate::node::{AddressPlacement, ModelNode};
use crate::plan::{InputError, PlanInput, ResolvedGroup};
use crate::policy::{Flavour, PoolConfig};
use crate::subnet::{self, Ipv4Cidr, PrefixCapacity, SubnetAllocator};

/// Time between ticks while settling: longer than every policy timer but the backoff.
const SETTLE_STEP: Duration = Duration::from_secs(61);
/// Ticks without a settled pool before the configuration is declared oscillating.
const OSCILLATION_TICKS: u32 = 40;

/// The steady state of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NodeSteadyState {
    /// ENIs attached.
    pub enis: u32,
    /// Pod addresses held (secondary IPs, or 16 per prefix).
    pub pod_ips: u32,
    /// /28 prefixes held.
    pub prefixes: u32,
    /// Pod addresses held but not assigned.
    pub unused_pod_ips: u32,
    /// Subnet addresses consumed: pod addresses plus each ENI's primary in this subnet, plus
    /// the trunk and branch ENIs (security groups for pods).
    pub subnet_ips: u32,
    /// Of `subnet_ips`: the trunk ENI's primary and one address per branch ENI.
    pub trunk_ips: u32,
    /// Branch-ENI pods that found no subnet address.
    pub branch_pods_without_ip: u32,
    /// Pods that found no address.
    pub pods_without_ip: u32,
    /// Whether the pool never settled (oscillates between two states).
    pub oscillates: bool,
    /// Mutating EC2 calls made from boot to the steady state.
    pub ec2_mutating_calls: u64,
}

/// Boots one node in `subnet` and brings `pods` pods to it one at a time, settling after each.
pub fn steady_state(
    cfg: &PoolConfig,
    group: &ResolvedGroup,
    pods: u32,
    subnet: &mut SubnetAllocator,
) -> NodeSteadyState {
    steady_state_with(cfg, None, group, pods, subnet)
}

/// [`steady_state`], with the pool sized from demand when `demand` is given
/// ([`Flavour::Demand`]): after the last pod, the window and the hold pass with no new
/// request, so the plan shows what the node keeps once its demand history is quiet.
pub fn steady_state_with(
    cfg: &PoolConfig,
    demand: Option<DemandSettings>,
    group: &ResolvedGroup,
    pods: u32,
    subnet: &mut SubnetAllocator,
) -> NodeSteadyState {
    let primary_in_subnet = !cfg.custom_networking;
    let mut t = Duration::ZERO;
    let Ok(mut node) = ModelNode::boot(
        *cfg,
        group.node,
        subnet,
        primary_in_subnet,
        AddressPlacement::Packed,
        t,
    ) else {
        return NodeSteadyState {
            pods_without_ip: pods,
            ..Default::default()
        };
    };
    if let Some(d) = demand {
        node = node.with_demand(d, t);
    }
    let branch_short = group
        .branch_pods
        .map_or(0, |b| node.attach_trunk(subnet, b));
    let mut oscillates = settle(&mut node, subnet, &mut t);
    for _ in 0..pods {
        node.add_pods(1, t);
        oscillates |= settle(&mut node, subnet, &mut t);
    }
    if let Some(d) = demand {
        // Let the history go quiet: every minute of window and hold without a request.
        let quiet_until = t + d.window.max(d.hold) + SETTLE_STEP;
        while t < quiet_until {
            node.tick(subnet, t);
            t += SETTLE_STEP;
        }
        oscillates |= settle(&mut node, subnet, &mut t);
    }
    let (pod_ips, primaries, prefixes) = node.address_usage();
    NodeSteadyState {
        enis: node.enis(),
        pod_ips,
        prefixes,
        unused_pod_ips: pod_ips - node.pods(),
        subnet_ips: pod_ips + primaries + node.trunk_addresses(),
        trunk_ips: node.trunk_addresses(),
        branch_pods_without_ip: branch_short,
        pods_without_ip: node.pending(),
        oscillates,
        ec2_mutating_calls: node.calls().mutating(),
    }
}

/// Ticks until two ticks in a row change nothing. Returns true when the pool oscillates, and
/// then leaves it in the upper state of the cycle.
fn settle(node: &mut ModelNode, subnet: &mut SubnetAllocator, t: &mut Duration) -> bool {
    let mut quiet = 0;
    for _ in 0..OSCILLATION_TICKS {
        let out = node.tick(subnet, *t);
        *t += SETTLE_STEP;
        if out.changes == 0 && out.enis_freed == 0 {
            quiet += 1;
            if quiet == 3 {
                return false;
            }
        } else {
            quiet = 0;
        }
    }
    for _ in 0..OSCILLATION_TICKS {
        let out = node.tick(subnet, *t);
        *t += SETTLE_STEP;
        if out.grew && out.enis_freed == 0 {
            break;
        }
    }
    true
}

/// Exact-mode result for one node group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupResult {
    /// Instance type.
    pub instance_type: String,
    /// Nodes.
    pub count: u32,
    /// Pods per node wanting an address.
    pub pods_per_node: u32,
    /// Branch-ENI pods per node (security groups for pods), besides `pods_per_node`.
    pub branch_pods_per_node: u32,
    /// Subnet addresses per node of the trunk and branch ENIs (in `subnet_ips_per_node`).
    pub trunk_ips_per_node: u32,
    /// Kubelet max pods used.
    pub max_pods: u32,
    /// ENIs per node.
    pub enis_per_node: u32,
    /// Pod addresses per node.
    pub pod_ips_per_node: u32,
    /// /28 prefixes per node (prefix mode).
    pub prefixes_per_node: u32,
    /// Warm (unassigned) pod addresses per node.
    pub unused_pod_ips_per_node: u32,
    /// Subnet addresses per node (pod addresses plus ENI primaries).
    pub subnet_ips_per_node: u32,
    /// Pods per node without an address because of the node's own limits.
    pub pods_without_ip_per_node: u32,
    /// Pods in the whole group without an address, subnet exhaustion included.
    pub pods_without_ip_total: u64,
    /// Subnet addresses the whole group consumes.
    pub subnet_ips_total: u64,
    /// Whether the pool oscillates under these settings.
    pub oscillates: bool,
    /// Mutating EC2 calls per node from boot to the steady state.
    pub ec2_mutating_calls_per_node: u64,
    /// Things to know.
    pub warnings: Vec<String>,
}

/// The subnet part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubnetResult {
    /// The subnet (a stand-in address when only the size was given).
    pub cidr: Ipv4Cidr,
    /// Usable addresses (`2^(32-n) - 5`).
    pub usable_ips: u32,
    /// Addresses consumed by the node groups.
    pub ips_used: u64,
    /// Addresses left (negative when the groups need more than the subnet has).
    pub ips_remaining: i64,
    /// /28 prefixes still obtainable afterwards, packed vs scattered (prefix mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_capacity: Option<PrefixCapacity>,
}

/// The exact-mode report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExactReport {
    /// Policy the nodes run.
    pub policy: Flavour,
    /// Subnet usage.
    pub subnet: SubnetResult,
    /// Pods that got an address.
    pub pods_hosted: u64,
    /// Per node group.
    pub node_groups: Vec<GroupResult>,
    /// Cluster-wide warnings.
    pub warnings: Vec<String>,
}

/// What makes two groups' nodes identical: type, ENIs, slots, max pods, pods, branch pods.
type GroupKey = (String, u32, u32, u32, u32, Option<u32>);

/// Runs exact mode over a plan.
pub fn plan(input: &PlanInput, groups: &[ResolvedGroup]) -> Result<ExactReport, InputError> {
    let cidr = input.subnet.cidr_or_default()?;
    let len = cidr.prefix_len();
    let demand = (input.config.policy == Flavour::Demand).then_some(input.config.demand);
    let usable = subnet::aws_usable_ips(len).unwrap_or(0);
    // Steady state of each distinct group in a private, ample subnet.
    let mut cache: HashMap<GroupKey, NodeSteadyState> = HashMap::new();
    let mut states = Vec::with_capacity(groups.len());
    for g in groups {
        let key = (
            g.limits.instance_type.clone(),
            g.node.max_enis,
            g.node.slots_per_eni,
            g.kubelet_max_pods,
            g.spec.pods_per_node,
            g.branch_pods,
        );
        let s = *cache.entry(key).or_insert_with(|| {
            let mut private = SubnetAllocator::new(Ipv4Cidr::containing(0x0a00_0000, 16));
            steady_state_with(&g.pool, demand, g, g.spec.pods_per_node, &mut private)
        });
        states.push(s);
    }
    let need: u64 = groups
        .iter()
        .zip(&states)
        .map(|(g, s)| u64::from(g.spec.count) * u64::from(s.subnet_ips))
        .sum();
    let prefix_mode = groups.iter().any(|g| g.pool.prefix_delegation);
    let mut totals: Vec<(u64, u64)> = groups
        .iter()
        .zip(&states)
        .map(|(g, s)| {
            let n = u64::from(g.spec.count);
            (
                n * u64::from(s.pods_without_ip + s.branch_pods_without_ip),
                n * u64::from(s.subnet_ips),
            )
        })
        .collect();
    let mut warnings = Vec::new();
    let mut fits = need <= u64::from(usable);
    let mut final_alloc = None;
    if prefix_mode || !fits {
        // Place every node in the real subnet, in order: prefixes need aligned free blocks,
        // and an exhausted subnet leaves later nodes short.
        let mut alloc = SubnetAllocator::new(cidr);
        let mut shortfall = false;
        for (i, g) in groups.iter().enumerate() {
            let mut without = 0u64;
            let mut used_before = u64::from(alloc.free_addresses());
            let mut prev: Option<NodeSteadyState> = None;
            let mut repeat = 0u64;
            for n in 0..g.spec.count {
                // Once the subnet is full, every further node of the group ends the same way.
                if alloc.free_addresses() == 0 {
                    if let Some(p) = prev {
                        repeat = u64::from(g.spec.count - n);
                        without += repeat * u64::from(p.pods_without_ip + p.branch_pods_without_ip);
                        break;
                    }
                }
                let s = steady_state_with(&g.pool, demand, g, g.spec.pods_per_node, &mut alloc);
                without += u64::from(s.pods_without_ip + s.branch_pods_without_ip);
                prev = Some(s);
            }
            let _ = repeat;
            used_before -= u64::from(alloc.free_addresses());
            if without > totals[i].0 {
                shortfall = true;
            }
            totals[i] = (without, used_before);
        }
        fits = !shortfall;
        final_alloc = Some(alloc);
    }
    if !fits {
        warnings.push(format!(
            "subnet {cidr} runs out: the node groups need {need} addresses at steady state, {usable} are usable; later nodes get InsufficientFreeAddressesInSubnet or InsufficientCidrBlocks"
        ));
    }
    let ips_used: u64 = totals.iter().map(|t| t.1).sum();
    let prefix_capacity = final_alloc.as_ref().filter(|_| prefix_mode).map(|a| {
        let cap =
            subnet::prefix_capacity(len, 0, 0).unwrap_or(PrefixCapacity { best: 0, worst: 0 });
        let singles: u64 = groups
            .iter()
            .zip(&states)
            .map(|(g, s)| u64::from(g.spec.count) * u64::from(s.subnet_ips - s.prefixes * 16))
            .sum();
        let prefixes: u64 = groups
            .iter()
            .zip(&states)
            .map(|(g, s)| u64::from(g.spec.count) * u64::from(s.prefixes))
            .sum();
        let range = subnet::prefix_capacity(
            len,
            u32::try_from(singles).unwrap_or(u32::MAX),
            u32::try_from(prefixes).unwrap_or(u32::MAX),
        )
        .unwrap_or(cap);
        PrefixCapacity {
            best: range.best,
            worst: range.worst.min(a.free_blocks()),
        }
    });
    let mut out = Vec::with_capacity(groups.len());
    let mut pods_hosted = 0u64;
    for ((g, s), (without, used)) in groups.iter().zip(&states).zip(&totals) {
        let mut w: Vec<String> = g.notes.clone();
        if s.oscillates {
            w.push(format!(
                "the {} policy never settles with these targets: it allocates and frees an ENI or prefix over and over (numbers show the upper state)",
                policy_name(g.pool.rules)
            ));
        }
        if s.pods_without_ip > 0 {
            w.push(format!(
                "{} of {} pods per node get no address: the node's ENI and address limits (or MINIMUM_IP_TARGET without WARM_IP_TARGET) stop the pool first",
                s.pods_without_ip, g.spec.pods_per_node
            ));
        }
        let trunk_slot = u32::from(g.branch_pods.is_some());
        if s.enis + trunk_slot >= g.node.max_enis && s.pods_without_ip == 0 {
            w.push(format!(
                "every ENI slot is used ({} of {}{})",
                s.enis + trunk_slot,
                g.node.max_enis,
                if trunk_slot == 1 {
                    ", one by the trunk ENI"
                } else {
                    ""
                }
            ));
        }
        if s.branch_pods_without_ip > 0 {
            w.push(format!(
                "{} of {} branch pods per node get no branch ENI: the subnet has no address left",
                s.branch_pods_without_ip,
                g.branch_pods.unwrap_or(0)
            ));
        }
        let branch = g.branch_pods.unwrap_or(0);
        pods_hosted += u64::from(g.spec.count) * u64::from(g.spec.pods_per_node + branch) - without;
        out.push(GroupResult {
            instance_type: g.limits.instance_type.clone(),
            count: g.spec.count,
            pods_per_node: g.spec.pods_per_node,
            branch_pods_per_node: branch,
            trunk_ips_per_node: s.trunk_ips,
            max_pods: g.kubelet_max_pods,
            enis_per_node: s.enis,
            pod_ips_per_node: s.pod_ips,
            prefixes_per_node: s.prefixes,
            unused_pod_ips_per_node: s.unused_pod_ips,
            subnet_ips_per_node: s.subnet_ips,
            pods_without_ip_per_node: s.pods_without_ip,
            pods_without_ip_total: *without,
            subnet_ips_total: *used,
            oscillates: s.oscillates,
            ec2_mutating_calls_per_node: s.ec2_mutating_calls,
            warnings: w,
        });
    }
    if input.config.custom_networking {
        warnings.push(format!(
            "custom networking: the node subnet also pays one address per node ({} nodes) for the primary ENIs",
            groups.iter().map(|g| u64::from(g.spec.count)).sum::<u64>()
        ));
    }
    let ips_used = if fits { need } else { ips_used };
    Ok(ExactReport {
        policy: input.config.policy,
        subnet: SubnetResult {
            cidr,
            usable_ips: usable,
            ips_used,
            ips_remaining: i64::from(usable) - ips_used as i64,
            prefix_capacity,
        },
        pods_hosted,
        node_groups: out,
        warnings,
    })
}

fn policy_name(r: crate::policy::Rules) -> &'static str {
    r.flavour().map_or("configured", Flavour::name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Catalog;

    fn run(yaml: &str) -> ExactReport {
        let p = PlanInput::parse(yaml).expect("parse");
        let g = p.resolve(Catalog::embedded()).expect("resolve");
        plan(&p, &g).expect("plan")
    }

    const CLUSTER: &str = "subnet: {prefix_length: 23}
node_groups:
  - {instance_type: m5.12xlarge, count: 2, pods_per_node: 100}
  - {instance_type: c5.2xlarge, count: 1, pods_per_node: 30}
";

    /// spec/calculator.md section 4: the workbook's example cluster through the real daemon.
    #[test]
    fn workbook_example_warm_eni() {
        let r = run(&format!("config: {{warm_eni_target: 1}}\n{CLUSTER}"));
        let g = &r.node_groups;
        assert_eq!((g[0].enis_per_node, g[0].subnet_ips_per_node), (5, 150));
        assert_eq!((g[1].enis_per_node, g[1].subnet_ips_per_node), (4, 60));
        assert_eq!(
            (
                r.subnet.usable_ips,
                r.subnet.ips_used,
                r.subnet.ips_remaining
            ),
            (507, 360, 147)
        );
        assert_eq!(r.pods_hosted, 230);
    }

    #[test]
    fn workbook_example_warm_ip() {
        let r = run(&format!("config: {{warm_ip_target: 1}}\n{CLUSTER}"));
        let g = &r.node_groups;
        assert_eq!((g[0].enis_per_node, g[0].subnet_ips_per_node), (4, 105));
        assert_eq!((g[1].enis_per_node, g[1].subnet_ips_per_node), (3, 34));
        assert_eq!((r.subnet.ips_used, r.subnet.ips_remaining), (244, 263));
    }

    #[test]
    fn workbook_example_prefix_mode() {
        let r = run(&format!(
            "config: {{prefix_delegation: true, warm_prefix_target: 1}}\n{CLUSTER}"
        ));
        let g = &r.node_groups;
        assert_eq!((g[0].prefixes_per_node, g[0].subnet_ips_per_node), (8, 129));
        assert_eq!((g[1].prefixes_per_node, g[1].subnet_ips_per_node), (3, 49));
        assert_eq!(r.subnet.ips_used, 307);
        assert!(r.subnet.prefix_capacity.is_some());
    }

    /// spec/calculator.md 3.3: above kubelet max pods the W_ip closed form no longer holds.
    #[test]
    fn security_groups_for_pods_add_the_trunk_and_branch_addresses() {
        // m5.large (3 ENIs, 9 pod IPs each), 10 pods, WARM_ENI_TARGET 1: without SGP
        // N = min(ceil(10/9) + 1, 3) = 3 ENIs, 27 pod IPs + 3 primaries = 30 addresses. With
        // SGP the trunk takes one of the 3 slots: N = min(3, 3 - 1) = 2 ENIs, 18 + 2 = 20 pool
        // addresses, + 1 trunk primary + 4 branch ENIs = 25.
        let plain = run("subnet: {cidr: 10.0.0.0/23}
node_groups: [{instance_type: m5.large, count: 2, pods_per_node: 10}]");
        let g = &plain.node_groups[0];
        assert_eq!(
            (g.enis_per_node, g.subnet_ips_per_node, g.trunk_ips_per_node),
            (3, 30, 0)
        );
        let sgp = run("subnet: {cidr: 10.0.0.0/23}
node_groups: [{instance_type: m5.large, count: 2, pods_per_node: 10, security_groups_for_pods: true, branch_pods_per_node: 4}]");
        let g = &sgp.node_groups[0];
        assert_eq!(
            (g.enis_per_node, g.trunk_ips_per_node, g.subnet_ips_per_node),
            (2, 5, 25)
        );
        assert_eq!(g.subnet_ips_total, 50);
        assert_eq!(sgp.pods_hosted, 28);
        // 18 pods on m5.large with SGP and 2 branch pods: N = min(ceil(18/9) + 1, 2) = 2 ENIs,
        // 18 + 2 pool addresses + trunk + 2 branches = 23; every slot used, one by the trunk.
        let full = run("subnet: {cidr: 10.0.0.0/23}
node_groups: [{instance_type: m5.large, count: 1, pods_per_node: 18, security_groups_for_pods: true, branch_pods_per_node: 2}]");
        let g = &full.node_groups[0];
        assert_eq!((g.enis_per_node, g.subnet_ips_per_node), (2, 23));
        assert!(
            g.warnings
                .iter()
                .any(|w| w.contains("one by the trunk ENI")),
            "{:?}",
            g.warnings
        );
    }

    #[test]
    fn growth_stops_at_max_pods() {
        let r = run("subnet: {prefix_length: 20}
config: {warm_ip_target: 30}
node_groups: [{instance_type: m5.xlarge, count: 1, pods_per_node: 20, kubelet_max_pods: 29}]");
        let g = &r.node_groups[0];
        assert_eq!((g.pod_ips_per_node, g.enis_per_node), (30, 3));
    }

    #[test]
    fn reference_target_zero_oscillates_and_ours_settles() {
        let base = "subnet: {prefix_length: 20}
config: {warm_eni_target: 0, policy: POLICY}
node_groups: [{instance_type: m5.large, count: 1, pods_per_node: 18}]";
        let r = run(&base.replace("POLICY", "reference"));
        assert!(r.node_groups[0].oscillates);
        assert_eq!(
            r.node_groups[0].enis_per_node, 3,
            "upper state: floor(18/9)+1"
        );
        let r = run(&base.replace("POLICY", "ours"));
        assert!(!r.node_groups[0].oscillates);
        assert_eq!(r.node_groups[0].enis_per_node, 3);
    }

    #[test]
    fn minimum_ip_target_alone_caps_the_reference_pool() {
        let base = "subnet: {prefix_length: 20}
config: {minimum_ip_target: 10, policy: POLICY}
node_groups: [{instance_type: m5.xlarge, count: 1, pods_per_node: 20}]";
        let r = run(&base.replace("POLICY", "reference"));
        assert_eq!(r.node_groups[0].pods_without_ip_per_node, 10);
        let r = run(&base.replace("POLICY", "ours"));
        assert_eq!(r.node_groups[0].pods_without_ip_per_node, 0);
    }

    #[test]
    fn an_exhausted_subnet_leaves_later_nodes_short() {
        let r = run("subnet: {cidr: 10.0.0.0/26}
node_groups: [{instance_type: m5.large, count: 4, pods_per_node: 10}]");
        assert!(!r.warnings.is_empty());
        let g = &r.node_groups[0];
        assert!(g.pods_without_ip_total > 0);
        assert!(r.subnet.ips_used <= 59);
        assert_eq!(r.pods_hosted + g.pods_without_ip_total, 40);
    }

    /// The demand flavour's steady state: once the demand history is quiet, a node keeps
    /// `min_warm` plus a step instead of a warm ENI; explicit IP targets stay floors.
    #[test]
    fn demand_steady_state_keeps_little_beyond_the_floors() {
        let reference = run(&format!("config: {{policy: reference}}\n{CLUSTER}"));
        let demand = run(&format!("config: {{policy: demand}}\n{CLUSTER}"));
        assert_eq!(demand.policy, Flavour::Demand);
        for (r, d) in reference.node_groups.iter().zip(&demand.node_groups) {
            assert!(d.unused_pod_ips_per_node <= 3, "{d:?}");
            assert!(d.unused_pod_ips_per_node < r.unused_pod_ips_per_node);
            assert_eq!(d.pods_without_ip_per_node, 0);
        }
        let floors = run(&format!(
            "config: {{policy: demand, warm_ip_target: 10, minimum_ip_target: 20}}\n{CLUSTER}"
        ));
        for g in &floors.node_groups {
            assert!(g.unused_pod_ips_per_node >= 10, "{g:?}");
        }
    }
}
