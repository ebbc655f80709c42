//! The plan file: a subnet, the pool settings and node groups, as YAML or JSON.
//!
//! ```yaml
//! subnet: {cidr: 10.0.0.0/23}          # or {prefix_length: 23}
//! config: {warm_eni_target: 1, warm_ip_target: 0, minimum_ip_target: 0, warm_prefix_target: 0,
//!          prefix_delegation: false, max_eni: null, custom_networking: false, policy: reference}
//! host_networking_ips: 2               # workbook mode only
//! node_groups:
//!   - {instance_type: m5.large, count: 3, pods_per_node: 20}
//! ```
//!
//! Parsing rejects unknown fields, wrong types and negative numbers with the field's path;
//! [`PlanInput::resolve`] then checks the values against each other and the instance table.

use serde::{Deserialize, Serialize};

use crate::demand::DemandSettings;
use crate::limits::{Catalog, InstanceLimits, LimitOverrides};
use crate::maxpods::{self, Formula, MaxPodsOptions};
use crate::policy::{Flavour, NodeLimits, PoolConfig, Timers};
use crate::subnet::{self, Ipv4Cidr};

/// A rejected input, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    /// Path of the offending field, e.g. `node_groups[1].pods_per_node`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl InputError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses YAML or JSON text into `T`, with the failing field's path in the error.
pub fn parse_document<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, InputError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        // serde_yaml prefixes its own (sometimes shorter) path; keep only the reason.
        let reason = match msg.split_once(": ") {
            Some((p, rest)) if !p.contains(' ') => rest.to_owned(),
            _ => msg,
        };
        let field = if path == "." || path.is_empty() {
            "(document)".to_owned()
        } else {
            path
        };
        InputError::new(field, reason)
    })
}

/// The subnet the node groups share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetSpec {
    /// The subnet's CIDR.
    #[serde(default)]
    pub cidr: Option<Ipv4Cidr>,
    /// Only its size (prefix length).
    #[serde(default)]
    pub prefix_length: Option<u8>,
}

impl SubnetSpec {
    /// The prefix length, whichever way it was given.
    pub fn prefix_len(&self) -> Result<u8, InputError> {
        match (self.cidr, self.prefix_length) {
            (Some(c), None) => Ok(c.prefix_len()),
            (None, Some(l)) => Ok(l),
            (Some(c), Some(l)) if c.prefix_len() == l => Ok(l),
            (Some(_), Some(_)) => Err(InputError::new(
                "subnet",
                "cidr and prefix_length disagree; give one",
            )),
            (None, None) => Err(InputError::new("subnet", "give cidr or prefix_length")),
        }
    }

    /// The CIDR, or a stand-in of the right size when only the length was given.
    pub fn cidr_or_default(&self) -> Result<Ipv4Cidr, InputError> {
        let len = self.prefix_len()?;
        Ok(self
            .cidr
            .unwrap_or_else(|| Ipv4Cidr::containing(0x0a00_0000, len)))
    }
}

fn one() -> u32 {
    1
}

/// Pool settings, named like ipamd's environment variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// `WARM_ENI_TARGET` (default 1).
    #[serde(default = "one")]
    pub warm_eni_target: u32,
    /// `WARM_IP_TARGET`.
    #[serde(default)]
    pub warm_ip_target: u32,
    /// `MINIMUM_IP_TARGET`.
    #[serde(default)]
    pub minimum_ip_target: u32,
    /// `WARM_PREFIX_TARGET`.
    #[serde(default)]
    pub warm_prefix_target: u32,
    /// `ENABLE_PREFIX_DELEGATION`.
    #[serde(default)]
    pub prefix_delegation: bool,
    /// `MAX_ENI`.
    #[serde(default)]
    pub max_eni: Option<u32>,
    /// `AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG`.
    #[serde(default)]
    pub custom_networking: bool,
    /// Which policy the nodes run (default `reference`, the AWS VPC CNI).
    #[serde(default)]
    pub policy: Flavour,
    /// `IP_COOLDOWN_PERIOD` in seconds (default 30; timelines only).
    #[serde(default)]
    pub ip_cooldown_seconds: Option<u64>,
    /// Settings of the `demand` policy (timelines, and exact mode: the steady state once the
    /// node's demand history is quiet).
    #[serde(default)]
    pub demand: DemandSettings,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            warm_eni_target: 1,
            warm_ip_target: 0,
            minimum_ip_target: 0,
            warm_prefix_target: 0,
            prefix_delegation: false,
            max_eni: None,
            custom_networking: false,
            policy: Flavour::Reference,
            ip_cooldown_seconds: None,
            demand: DemandSettings::default(),
        }
    }
}

impl PlanConfig {
    /// The policy configuration for an instance (prefix mode only where EC2 supports it).
    pub fn pool_config(&self, instance: &InstanceLimits) -> PoolConfig {
        let mut timers = Timers::default();
        if let Some(s) = self.ip_cooldown_seconds {
            timers.ip_cooldown = std::time::Duration::from_secs(s);
        }
        PoolConfig {
            rules: self.policy.rules(),
            prefix_delegation: self.prefix_delegation && instance.supports_prefix_delegation(),
            warm_eni_target: self.warm_eni_target,
            warm_ip_target: self.warm_ip_target,
            minimum_ip_target: self.minimum_ip_target,
            warm_prefix_target: self.warm_prefix_target,
            custom_networking: self.custom_networking,
            timers,
        }
    }

    fn validate(&self) -> Result<(), InputError> {
        if let Err((field, message)) = self.demand.validate() {
            return Err(InputError::new(format!("config.demand.{field}"), message));
        }
        if self.max_eni == Some(0) {
            return Err(InputError::new(
                "config.max_eni",
                "must be at least 1 (or null)",
            ));
        }
        if self.prefix_delegation
            && self.warm_ip_target == 0
            && self.minimum_ip_target == 0
            && self.warm_prefix_target == 0
        {
            return Err(InputError::new(
                "config.warm_prefix_target",
                "prefix delegation needs warm_prefix_target, warm_ip_target or minimum_ip_target above 0 (ipamd refuses to start otherwise)",
            ));
        }
        Ok(())
    }
}

/// One group of identical nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroupSpec {
    /// EC2 instance type.
    pub instance_type: String,
    /// Number of nodes.
    pub count: u32,
    /// Pods per node that need a VPC address (DaemonSet pods included, host-network excluded).
    pub pods_per_node: u32,
    /// Override: ENIs on the default network card.
    #[serde(default)]
    pub max_enis: Option<u32>,
    /// Override: IPv4 addresses per ENI.
    #[serde(default)]
    pub ipv4_per_eni: Option<u32>,
    /// Override: vCPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Kubelet `maxPods` (default: nodeadm's eni-max-pods value; with prefix delegation, the
    /// EKS max-pods calculator's recommendation).
    #[serde(default)]
    pub kubelet_max_pods: Option<u32>,
    /// Security groups for pods on these nodes (`ENABLE_POD_ENI`): each node gets a trunk ENI
    /// (one ENI slot, one subnet address) when its type is trunking compatible.
    #[serde(default)]
    pub security_groups_for_pods: bool,
    /// Pods per node on branch ENIs (their own security groups), besides `pods_per_node`:
    /// one subnet address each, no ENI slot, at most the type's branch limit.
    #[serde(default)]
    pub branch_pods_per_node: u32,
}

impl NodeGroupSpec {
    /// The overrides this group gives.
    pub fn overrides(&self) -> LimitOverrides {
        LimitOverrides {
            max_enis: self.max_enis,
            ipv4_per_eni: self.ipv4_per_eni,
            vcpus: self.vcpus,
            ..Default::default()
        }
    }
}

/// A whole plan file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInput {
    /// The subnet.
    pub subnet: SubnetSpec,
    /// Pool settings.
    #[serde(default)]
    pub config: PlanConfig,
    /// Workbook cell "Host Networking IPs" (default 2).
    #[serde(default = "two")]
    pub host_networking_ips: u32,
    /// Workbook cell "Daemonset Pods": accepted, and ignored as the workbook ignores it.
    #[serde(default)]
    pub daemonset_pods: Option<u32>,
    /// Node groups.
    pub node_groups: Vec<NodeGroupSpec>,
}

fn two() -> u32 {
    2
}

/// A node group resolved against the instance table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedGroup {
    /// The group as given.
    pub spec: NodeGroupSpec,
    /// Its limits, overrides applied.
    pub limits: InstanceLimits,
    /// Pool configuration for this type.
    pub pool: PoolConfig,
    /// Node limits for the policy.
    pub node: NodeLimits,
    /// Kubelet max pods.
    pub kubelet_max_pods: u32,
    /// Branch-ENI pods per node when the nodes carry a trunk ENI (security groups for pods).
    pub branch_pods: Option<u32>,
    /// Notes about the group (prefix mode unsupported, ...).
    pub notes: Vec<String>,
}

impl PlanInput {
    /// Parses YAML or JSON.
    pub fn parse(text: &str) -> Result<Self, InputError> {
        parse_document(text)
    }

    /// Checks the plan and resolves every group against `catalog`.
    pub fn resolve(&self, catalog: &Catalog) -> Result<Vec<ResolvedGroup>, InputError> {
        let len = self.subnet.prefix_len()?;
        if subnet::aws_usable_ips(len).is_none() {
            return Err(InputError::new(
                if self.subnet.cidr.is_some() {
                    "subnet.cidr"
                } else {
                    "subnet.prefix_length"
                },
                format!("/{len} is not a VPC subnet size (AWS allows /16 to /28)"),
            ));
        }
        self.config.validate()?;
        if self.node_groups.is_empty() {
            return Err(InputError::new(
                "node_groups",
                "give at least one node group",
            ));
        }
        self.node_groups
            .iter()
            .enumerate()
            .map(|(i, g)| resolve_group(&self.config, g, catalog, &format!("node_groups[{i}]")))
            .collect()
    }
}

fn resolve_group(
    cfg: &PlanConfig,
    g: &NodeGroupSpec,
    catalog: &Catalog,
    at: &str,
) -> Result<ResolvedGroup, InputError> {
    let limits = catalog
        .lookup(&g.instance_type, &g.overrides())
        .map_err(|e| InputError::new(format!("{at}.instance_type"), e.to_string()))?;
    if g.count == 0 {
        return Err(InputError::new(format!("{at}.count"), "must be at least 1"));
    }
    let mut notes = Vec::new();
    if cfg.prefix_delegation && !limits.supports_prefix_delegation() {
        notes.push(format!(
            "{} is not Nitro: ipamd falls back to secondary IPs",
            limits.instance_type
        ));
    }
    let pool = cfg.pool_config(&limits);
    let trunk = crate::limits::trunk_limits_with(&g.instance_type, &LimitOverrides::default());
    if g.branch_pods_per_node > 0 && !g.security_groups_for_pods {
        return Err(InputError::new(
            format!("{at}.branch_pods_per_node"),
            "needs security_groups_for_pods: true",
        ));
    }
    let pod_enis = NodeLimits::new(&limits, cfg.max_eni, None).max_enis;
    let branch_pods = if !g.security_groups_for_pods {
        None
    } else if !trunk.trunking_compatible {
        if g.branch_pods_per_node > 0 {
            return Err(InputError::new(
                format!("{at}.branch_pods_per_node"),
                format!(
                    "{} is not trunking compatible: it takes no trunk ENI and no branch pods",
                    limits.instance_type
                ),
            ));
        }
        notes.push(format!(
            "{} is not trunking compatible: security groups for pods has no effect",
            limits.instance_type
        ));
        None
    } else if pod_enis < 2 {
        return Err(InputError::new(
            "config.max_eni",
            "security groups for pods needs an ENI slot for the trunk besides the primary ENI",
        ));
    } else if g.branch_pods_per_node > trunk.usable_branches() {
        return Err(InputError::new(
            format!("{at}.branch_pods_per_node"),
            format!(
                "{} carries at most {} branch ENIs",
                limits.instance_type,
                trunk.usable_branches()
            ),
        ));
    } else {
        Some(g.branch_pods_per_node)
    };
    let mp_opts = MaxPodsOptions {
        formula: if pool.prefix_delegation {
            Formula::Calculator
        } else {
            Formula::EniMaxPods
        },
        prefix_delegation: pool.prefix_delegation,
        custom_networking: false,
        max_eni: cfg.max_eni,
        security_groups_for_pods: branch_pods.is_some(),
        branch_pods,
        ..Default::default()
    };
    let kubelet_max_pods = g
        .kubelet_max_pods
        .unwrap_or_else(|| maxpods::max_pods(&limits, &mp_opts).max_pods);
    if kubelet_max_pods == 0 {
        return Err(InputError::new(
            format!("{at}.kubelet_max_pods"),
            "must be at least 1",
        ));
    }
    let host_pods = maxpods::HOST_NETWORK_PODS;
    let branch = branch_pods.unwrap_or(0);
    if g.pods_per_node + branch + host_pods > kubelet_max_pods {
        return Err(InputError::new(
            format!("{at}.pods_per_node"),
            format!(
                "{} pods{} plus {host_pods} host-network pods exceed the node's max pods ({kubelet_max_pods}) on {}",
                g.pods_per_node,
                if branch > 0 { format!(" and {branch} branch pods") } else { String::new() },
                limits.instance_type
            ),
        ));
    }
    let node = NodeLimits::new(&limits, cfg.max_eni, Some(kubelet_max_pods));
    Ok(ResolvedGroup {
        spec: g.clone(),
        limits,
        pool,
        node,
        kubelet_max_pods,
        branch_pods,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> InputError {
        PlanInput::parse(text)
            .and_then(|p| p.resolve(Catalog::embedded()).map(|_| ()))
            .expect_err("should be rejected")
    }

    const OK: &str = "subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.large, count: 3, pods_per_node: 20}]\n";

    #[test]
    fn a_valid_plan_resolves() {
        let p = PlanInput::parse(OK).expect("parses");
        let g = p.resolve(Catalog::embedded()).expect("valid");
        assert_eq!(g[0].kubelet_max_pods, 29);
        assert_eq!(g[0].node.max_enis, 3);
        let j = r#"{"subnet": {"prefix_length": 23}, "node_groups": [{"instance_type": "m5.large", "count": 1, "pods_per_node": 1}]}"#;
        assert!(PlanInput::parse(j)
            .expect("json")
            .resolve(Catalog::embedded())
            .is_ok());
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let cases = [
            ("subnet: {cidr: 10.0.0.0/23}\nconfig: {warm_ip_target: -1}\nnode_groups: []", "config.warm_ip_target"),
            ("subnet: {cidr: 10.0.0.0/23}\nconfig: {warm_ip_targt: 1}\nnode_groups: []", "config.warm_ip_targt"),
            ("subnet: {cidr: 10.0.0.300/23}\nnode_groups: []", "subnet.cidr"),
            ("subnet: {cidr: 10.0.0.0/30}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 1}]", "subnet.cidr"),
            ("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 40}]", "node_groups[0].pods_per_node"),
            ("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.lage, count: 1, pods_per_node: 4}]", "node_groups[0].instance_type"),
            ("subnet: {cidr: 10.0.0.0/23}\nconfig: {prefix_delegation: true}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 4}]", "config.warm_prefix_target"),
            ("subnet: {}\nnode_groups: []", "subnet"),
        ];
        for (text, field) in cases {
            let e = err(text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
        assert!(err(cases[5].0).message.contains("m5.large"));
    }

    #[test]
    fn security_groups_for_pods_inputs() {
        // m5.large with security groups for pods: kubelet max pods (3-1)*9 + 2 + 4 = 24.
        let p = PlanInput::parse("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 10, security_groups_for_pods: true, branch_pods_per_node: 4}]").expect("parses");
        let g = p.resolve(Catalog::embedded()).expect("valid");
        assert_eq!((g[0].branch_pods, g[0].kubelet_max_pods), (Some(4), 24));
        let cases = [
            ("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 4, branch_pods_per_node: 2}]", "node_groups[0].branch_pods_per_node"),
            ("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 4, security_groups_for_pods: true, branch_pods_per_node: 10}]", "node_groups[0].branch_pods_per_node"),
            ("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: t3.medium, count: 1, pods_per_node: 4, security_groups_for_pods: true, branch_pods_per_node: 1}]", "node_groups[0].branch_pods_per_node"),
            ("subnet: {cidr: 10.0.0.0/23}\nconfig: {max_eni: 1}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 4, security_groups_for_pods: true}]", "config.max_eni"),
            ("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: m5.large, count: 1, pods_per_node: 20, security_groups_for_pods: true, branch_pods_per_node: 9}]", "node_groups[0].pods_per_node"),
        ];
        for (text, field) in cases {
            let e = err(text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
        // A type without trunking: a note, no branch pods, the usual max pods.
        let p = PlanInput::parse("subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: t3.medium, count: 1, pods_per_node: 4, security_groups_for_pods: true}]").expect("parses");
        let g = p.resolve(Catalog::embedded()).expect("valid");
        assert_eq!((g[0].branch_pods, g[0].kubelet_max_pods), (None, 17));
        assert!(g[0]
            .notes
            .iter()
            .any(|n| n.contains("not trunking compatible")));
    }
}
