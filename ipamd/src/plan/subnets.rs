//! Subnet discovery and exclusion (spec/ipamd.md 5.3): which subnets a new ENI may go to.
//! Pure: the inputs are EC2's subnet answers and the cluster's name.

use crate::io::ec2::{SubnetInfo, TAG_SUBNET_ROLE};
use crate::plan::reconcile::TAG_SUBNET_CLUSTER_PREFIX;

/// `IsSubnetExcluded`: tag `kubernetes.io/role/cni=0` → excluded; cluster-scoped
/// (`cni.networking.k8s.aws/cluster/*`) without this cluster's tag → excluded; untagged or
/// unknown (`None`) → not excluded.
pub fn subnet_excluded(subnet: Option<&SubnetInfo>, cluster: &str) -> bool {
    let Some(s) = subnet else { return false };
    if s.tags.get(TAG_SUBNET_ROLE).map(String::as_str) == Some("0") {
        return true;
    }
    !cluster_tags_match(s, cluster)
}

fn cluster_tags_match(s: &SubnetInfo, cluster: &str) -> bool {
    if cluster.is_empty() {
        return true;
    }
    let scoped = s
        .tags
        .keys()
        .any(|k| k.starts_with(TAG_SUBNET_CLUSTER_PREFIX));
    !scoped
        || s.tags
            .contains_key(&format!("{TAG_SUBNET_CLUSTER_PREFIX}{cluster}"))
}

/// Subnet discovery: the subnets in which to try `CreateNetworkInterface`, most free addresses
/// first (ties by id). Eligible: role tag not `0`, and tagged or the node's primary subnet; with
/// a cluster name, cluster-scoped subnets must name it.
pub fn eligible_subnets(
    subnets: &[SubnetInfo],
    primary_subnet: &str,
    cluster: &str,
) -> Vec<SubnetInfo> {
    let mut v: Vec<SubnetInfo> = subnets
        .iter()
        .filter(|s| match s.tags.get(TAG_SUBNET_ROLE) {
            Some(v) => v != "0",
            None => s.id == primary_subnet,
        })
        .filter(|s| cluster_tags_match(s, cluster))
        .cloned()
        .collect();
    v.sort_by(|a, b| b.available.cmp(&a.available).then_with(|| a.id.cmp(&b.id)));
    v
}

/// The subnets for a new ENI: with discovery, [`eligible_subnets`] (on a `DescribeSubnets`
/// failure, `subnets` is `None`: the primary subnet unless excluded); without, the primary
/// subnet unless it is tagged `0`. Empty: no subnet may be used.
pub fn subnets_for_new_eni(
    discovery: bool,
    subnets: Option<&[SubnetInfo]>,
    primary_subnet: &str,
    cluster: &str,
) -> Vec<String> {
    let primary = subnets.and_then(|v| v.iter().find(|s| s.id == primary_subnet));
    if discovery {
        if let Some(all) = subnets {
            return eligible_subnets(all, primary_subnet, cluster)
                .into_iter()
                .map(|s| s.id)
                .collect();
        }
        if subnet_excluded(primary, cluster) {
            return Vec::new();
        }
        return vec![primary_subnet.to_owned()];
    }
    let tagged_off =
        primary.is_some_and(|s| s.tags.get(TAG_SUBNET_ROLE).map(String::as_str) == Some("0"));
    if tagged_off {
        Vec::new()
    } else {
        vec![primary_subnet.to_owned()]
    }
}
