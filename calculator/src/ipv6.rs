//! IPv6 clusters: max pods and the subnet plan.
//!
//! In IPv6 mode ipamd puts one /80 prefix on each node's primary ENI and hands pods /128s from
//! it: addresses no longer limit pods, so max pods is kubelet's recommended ceiling, 110 pods on
//! instances with 30 vCPUs or fewer and 250 above (the max-pods script's rule). ipamd requires
//! prefix delegation for IPv6, which needs a Nitro (or bare-metal) instance, and refuses custom
//! networking. Pods reach IPv4 destinations through the node's IPv4 address, so the IPv4 subnet
//! only holds one address per node (the primary ENI's).
//!
//! A subnet's IPv6 block is always a /64: 65,536 aligned /80s. The first and the last hold
//! addresses AWS reserves in every subnet (the first four and the last), so 65,534 can be
//! handed out. A node's own IPv6 address on its primary ENI, when it has one, is a /128 drawn
//! from the same /64 and can make one more /80 unusable: the plan reports that worst case too.

use std::net::Ipv6Addr;

use serde::Serialize;

use crate::limits::{Hypervisor, InstanceLimits};
use crate::maxpods::{
    MaxPods, MaxPodsOptions, HOST_NETWORK_PODS, LARGE_INSTANCE_CEILING, SMALL_INSTANCE_CEILING,
};
use crate::plan::{InputError, PlanInput};

/// /80 prefixes in a /64.
pub const PREFIXES_PER_SUBNET: u64 = 1 << 16;
/// /80 prefixes of a /64 that EC2 can assign (the first and last hold reserved addresses).
pub const ASSIGNABLE_PREFIXES: u64 = PREFIXES_PER_SUBNET - 2;

/// Whether ipamd can run `limits` in IPv6 mode (prefix delegation: Nitro or bare metal).
pub fn supports_ipv6(limits: &InstanceLimits) -> bool {
    limits.hypervisor == Hypervisor::Nitro || limits.bare_metal
}

/// Max pods for an IPv6 node: the 110/250 ceiling. Errors (naming the option) when ipamd
/// would refuse to start: a non-Nitro instance, or custom networking.
pub fn max_pods(limits: &InstanceLimits, opts: &MaxPodsOptions) -> Result<MaxPods, String> {
    if !supports_ipv6(limits) {
        return Err(format!(
            "--instance-type: IPv6 needs prefix delegation, which {} ({} hypervisor) does not support",
            limits.instance_type, limits.hypervisor
        ));
    }
    if opts.custom_networking {
        return Err("--custom-networking: ipamd refuses custom networking in IPv6 mode".to_owned());
    }
    let ceiling = if limits.vcpus > 30 {
        LARGE_INSTANCE_CEILING
    } else {
        SMALL_INSTANCE_CEILING
    };
    let mut notes = vec![format!(
        "IPv6: pods take /128s from one /80 on the primary ENI, so addresses do not limit pods; {ceiling} is kubelet's recommended ceiling for {} vCPUs",
        limits.vcpus
    )];
    if opts.show_max_allowed {
        notes
            .push("--show-max-allowed: no address limit in IPv6 mode; the ceiling is shown".into());
    }
    if opts.max_eni.is_some() {
        notes.push("--max-eni: no effect in IPv6 mode (one ENI serves every pod)".into());
    }
    Ok(MaxPods {
        instance_type: limits.instance_type.clone(),
        max_pods: ceiling,
        max_allowed: ceiling,
        ceiling: None,
        enis: 1,
        ipv4_per_eni: limits.ipv4_per_eni,
        prefix_delegation_applied: true,
        vcpus: limits.vcpus,
        ipv6: true,
        security_groups_for_pods: None,
        default_card_only: false,
        all_cards: None,
        notes,
    })
}

/// One node group in an IPv6 plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ipv6Group {
    /// Instance type.
    pub instance_type: String,
    /// Nodes.
    pub nodes: u32,
    /// Pods per node asked for.
    pub pods_per_node: u32,
    /// Max pods per node (kubelet `maxPods` if given, else the 110/250 ceiling).
    pub max_pods: u32,
    /// /80 prefixes the group takes (one per node).
    pub prefixes: u64,
}

/// The subnet plan of an IPv6 cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ipv6Plan {
    /// The subnet's IPv6 block, if given.
    pub ipv6_cidr: Option<String>,
    /// Per node group.
    pub node_groups: Vec<Ipv6Group>,
    /// Nodes in all groups.
    pub nodes: u64,
    /// Pods in all groups.
    pub pods: u64,
    /// /80s the fleet takes: one per node on the primary ENI.
    pub prefixes_needed: u64,
    /// /80s taken in the worst case, when every node's own IPv6 address spoils one more.
    pub prefixes_worst_case: u64,
    /// /80s of the /64 EC2 can assign.
    pub prefixes_assignable: u64,
    /// The /64 has room for the fleet even in the worst case.
    pub fits: bool,
    /// IPv4 addresses the fleet takes from its subnet: one per node (pods egress through it).
    pub ipv4_addresses: u64,
    /// Warnings.
    pub warnings: Vec<String>,
}

/// Parses and checks a subnet's IPv6 block: an IPv6 network address with a /64 length.
pub fn parse_ipv6_cidr(s: &str) -> Result<(Ipv6Addr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not an IPv6 CIDR (e.g. 2600:1f14:a:b00::/64)"))?;
    let addr: Ipv6Addr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IPv6 address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("`/{len}` is not a prefix length"))?;
    if len != 64 {
        return Err(format!(
            "/{len}: an AWS subnet's IPv6 block is always a /64"
        ));
    }
    if u128::from(addr) & ((1u128 << 64) - 1) != 0 {
        return Err(format!("`{s}` has host bits set"));
    }
    Ok((addr, len))
}

/// The IPv6 plan of `input`'s node groups; `ipv6_cidr` is the subnet's /64 if known. The IPv4
/// pool settings do not apply (no warm pool in IPv6 mode).
pub fn plan(
    input: &PlanInput,
    catalog: &crate::limits::Catalog,
    ipv6_cidr: Option<&str>,
) -> Result<Ipv6Plan, InputError> {
    if let Some(c) = ipv6_cidr {
        parse_ipv6_cidr(c).map_err(|e| InputError::new("ipv6_cidr", e))?;
    }
    if input.node_groups.is_empty() {
        return Err(InputError::new(
            "node_groups",
            "give at least one node group",
        ));
    }
    if input.config.custom_networking {
        return Err(InputError::new(
            "config.custom_networking",
            "ipamd refuses custom networking in IPv6 mode",
        ));
    }
    let mut groups = Vec::new();
    let mut warnings = Vec::new();
    for (i, g) in input.node_groups.iter().enumerate() {
        let at = format!("node_groups[{i}]");
        let limits = catalog
            .lookup(&g.instance_type, &g.overrides())
            .map_err(|e| InputError::new(format!("{at}.instance_type"), e.to_string()))?;
        if g.count == 0 {
            return Err(InputError::new(format!("{at}.count"), "must be at least 1"));
        }
        let mp = max_pods(&limits, &MaxPodsOptions::default())
            .map_err(|e| InputError::new(format!("{at}.instance_type"), e))?;
        let max = g.kubelet_max_pods.unwrap_or(mp.max_pods);
        if max == 0 {
            return Err(InputError::new(
                format!("{at}.kubelet_max_pods"),
                "must be at least 1",
            ));
        }
        if g.pods_per_node + HOST_NETWORK_PODS > max {
            return Err(InputError::new(
                format!("{at}.pods_per_node"),
                format!(
                    "{} pods plus {HOST_NETWORK_PODS} host-network pods exceed the node's max pods ({max}) on {}",
                    g.pods_per_node, g.instance_type
                ),
            ));
        }
        if max > mp.max_pods {
            warnings.push(format!(
                "{at}: kubelet maxPods {max} is above the recommended {} for {} vCPUs",
                mp.max_pods, limits.vcpus
            ));
        }
        groups.push(Ipv6Group {
            instance_type: limits.instance_type.clone(),
            nodes: g.count,
            pods_per_node: g.pods_per_node,
            max_pods: max,
            prefixes: u64::from(g.count),
        });
    }
    let nodes: u64 = groups.iter().map(|g| u64::from(g.nodes)).sum();
    let pods: u64 = groups
        .iter()
        .map(|g| u64::from(g.nodes) * u64::from(g.pods_per_node))
        .sum();
    let worst = nodes * 2;
    let fits = worst <= ASSIGNABLE_PREFIXES;
    if !fits && nodes <= ASSIGNABLE_PREFIXES {
        warnings.push(format!(
            "{nodes} nodes fit only if their own IPv6 addresses leave enough /80s whole ({worst} in the worst case, {ASSIGNABLE_PREFIXES} assignable)"
        ));
    } else if !fits {
        warnings.push(format!(
            "{nodes} nodes need more /80s than a /64 has ({ASSIGNABLE_PREFIXES} assignable): split them over subnets"
        ));
    }
    Ok(Ipv6Plan {
        ipv6_cidr: ipv6_cidr.map(str::to_owned),
        node_groups: groups,
        nodes,
        pods,
        prefixes_needed: nodes,
        prefixes_worst_case: worst,
        prefixes_assignable: ASSIGNABLE_PREFIXES,
        fits,
        ipv4_addresses: nodes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Catalog, LimitOverrides};

    fn limits(t: &str) -> InstanceLimits {
        Catalog::embedded()
            .lookup(t, &LimitOverrides::default())
            .expect("known type")
    }

    #[test]
    fn ipv6_max_pods_is_the_ceiling_whatever_the_enis() {
        let o = MaxPodsOptions::default();
        // t3.small holds 11 pods in IPv4 mode; IPv6 lifts the address limit.
        assert_eq!(
            max_pods(&limits("t3.small"), &o).expect("nitro").max_pods,
            110
        );
        assert_eq!(
            max_pods(&limits("m5.large"), &o).expect("nitro").max_pods,
            110
        );
        // 32 vCPUs: above 30, 250.
        assert_eq!(
            max_pods(&limits("m5.8xlarge"), &o).expect("nitro").max_pods,
            250
        );
        // Bare metal runs prefix delegation in ipamd.
        assert_eq!(
            max_pods(&limits("m5.metal"), &o).expect("metal").max_pods,
            250
        );
    }

    #[test]
    fn ipv6_refuses_what_ipamd_refuses() {
        let o = MaxPodsOptions::default();
        let xen = Catalog::embedded()
            .iter()
            .find(|t| t.hypervisor == Hypervisor::Xen && !t.bare_metal)
            .expect("a Xen type in the table")
            .clone();
        assert!(max_pods(&xen, &o)
            .unwrap_err()
            .contains("prefix delegation"));
        let cn = MaxPodsOptions {
            custom_networking: true,
            ..o
        };
        assert!(max_pods(&limits("m5.large"), &cn)
            .unwrap_err()
            .starts_with("--custom-networking"));
    }

    #[test]
    fn a_plan_counts_one_prefix_per_node_and_checks_the_64() {
        let input = PlanInput::parse(
            "subnet: {cidr: 10.0.0.0/20}
node_groups:
  - {instance_type: t3.small, count: 10, pods_per_node: 100}
  - {instance_type: m5.8xlarge, count: 5, pods_per_node: 240}",
        )
        .expect("parses");
        let p = plan(&input, Catalog::embedded(), Some("2600:1f14:a:b00::/64")).expect("plan");
        assert_eq!((p.nodes, p.pods, p.prefixes_needed), (15, 2200, 15));
        assert_eq!(p.prefixes_worst_case, 30);
        assert!(p.fits);
        assert_eq!(p.ipv4_addresses, 15);
        // Too many pods for the ceiling: the field is named.
        let too_many = PlanInput::parse(
            "subnet: {cidr: 10.0.0.0/20}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 109}]",
        )
        .expect("parses");
        let e = plan(&too_many, Catalog::embedded(), None).unwrap_err();
        assert_eq!(e.field, "node_groups[0].pods_per_node");
        // A fleet bigger than a /64's worst case.
        let big = PlanInput::parse(
            "subnet: {cidr: 10.0.0.0/16}\nnode_groups: [{instance_type: m5.large, count: 40000, pods_per_node: 10}]",
        )
        .expect("parses");
        let p = plan(&big, Catalog::embedded(), None).expect("plan");
        assert!(!p.fits);
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn ipv6_cidrs_must_be_a_64_network() {
        assert!(parse_ipv6_cidr("2600:1f14:a:b00::/64").is_ok());
        assert!(parse_ipv6_cidr("2600:1f14:a:b00::/56")
            .unwrap_err()
            .contains("/64"));
        assert!(parse_ipv6_cidr("2600:1f14:a:b00::1/64")
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_ipv6_cidr("10.0.0.0/64").is_err());
        assert!(parse_ipv6_cidr("2600::").is_err());
    }
}
