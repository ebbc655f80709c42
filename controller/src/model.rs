//! The nouns of the reconcile, free of Kubernetes and SDK types: what the cluster says
//! ([`Cluster`]), what EC2 says ([`Fleet`]), and the pod annotation both sides share
//! ([`BranchEni`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::SecurityGroupPolicySpec;

/// Pod annotation holding the pod's branch ENIs (and the extended resource name the
/// reference's webhook puts in the first container's limits).
pub const POD_ENI_ANNOTATION: &str = "vpc.amazonaws.com/pod-eni";
/// Node label: ipamd sets it (`false`) to ask for a trunk, the controller sets `true` once
/// the trunk is attached.
pub const HAS_TRUNK_LABEL: &str = "vpc.amazonaws.com/has-trunk-attached";
/// The CNINode feature ipamd adds to ask for a trunk.
pub const FEATURE_SGP: &str = "SecurityGroupsForPods";

/// EC2 tag: the VLAN id of a branch (the reference's).
pub const TAG_VLAN_ID: &str = "vpcresources.k8s.aws/vlan-id";
/// EC2 tag: the trunk a branch belongs to (the reference's).
pub const TAG_TRUNK_ENI_ID: &str = "vpcresources.k8s.aws/trunk-eni-id";
/// EC2 tag: the instance of a trunk or branch (the reference's, shared with ipamd).
pub const TAG_INSTANCE_ID: &str = "node.k8s.amazonaws.com/instance_id";
/// EC2 tag key and value marking an ENI this controller owns (the reference's).
pub const TAG_OWNER: (&str, &str) = ("eks:eni:owner", "eks-vpc-resource-controller");
/// Value of the cluster tag `kubernetes.io/cluster/<name>`.
pub const CLUSTER_TAG_VALUE: &str = "owned";
/// Description of a trunk ENI (the reference's, with its `aws-k8s-` prefix).
pub const TRUNK_DESCRIPTION: &str = "aws-k8s-trunk-eni";
/// Description of a branch ENI.
pub const BRANCH_DESCRIPTION: &str = "aws-k8s-branch-eni";

/// The cluster tag key, `kubernetes.io/cluster/<cluster>`.
pub fn cluster_tag(cluster: &str) -> String {
    format!("kubernetes.io/cluster/{cluster}")
}

/// One branch ENI of a pod, one element of the `vpc.amazonaws.com/pod-eni` JSON list, with
/// the reference controller's keys in its order. Reading also accepts `vlanID` (the key the
/// reference CNI declares; Go matches keys case-insensitively, serde does not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchEni {
    /// Branch ENI id.
    #[serde(rename = "eniId")]
    pub eni_id: String,
    /// Its MAC address.
    #[serde(rename = "ifAddress")]
    pub if_address: String,
    /// Its primary private IPv4 address (`""` when none).
    #[serde(rename = "privateIp", default)]
    pub private_ip: String,
    /// Its IPv6 address (`""` when none).
    #[serde(rename = "ipv6Addr", default)]
    pub ipv6_addr: String,
    /// VLAN id on the trunk.
    #[serde(rename = "vlanId", alias = "vlanID")]
    pub vlan_id: u16,
    /// The subnet's IPv4 CIDR.
    #[serde(rename = "subnetCidr", default)]
    pub subnet_cidr: String,
    /// The subnet's IPv6 CIDR (`""` when none).
    #[serde(rename = "subnetV6Cidr", default)]
    pub subnet_v6_cidr: String,
    /// The trunk association id.
    #[serde(rename = "associationID", default)]
    pub association_id: String,
}

/// Parses a `vpc.amazonaws.com/pod-eni` value; the error names the field path.
pub fn parse_pod_eni(value: &str) -> Result<Vec<BranchEni>, String> {
    let mut de = serde_json::Deserializer::from_str(value);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let msg: String = e.into_inner().to_string().chars().take(256).collect();
        format!(
            "{POD_ENI_ANNOTATION}{}: {msg}",
            path.trim_start_matches('.')
        )
    })
}

/// The annotation value for `branches` (a JSON list, as the reference writes it).
pub fn pod_eni_value(branches: &[BranchEni]) -> String {
    serde_json::to_string(branches).unwrap_or_else(|_| "[]".to_owned())
}

/// A Kubernetes object key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Node as the reconcile needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObs {
    /// Node name.
    pub name: String,
    /// Node uid (the CNINode's owner reference).
    pub uid: String,
    /// `kubernetes.io/os` label.
    pub os: String,
    /// EC2 instance id from `spec.providerID` (`aws:///<az>/i-…`), or why there is none.
    pub instance_id: Result<String, String>,
    /// Asked for a trunk: label `vpc.amazonaws.com/has-trunk-attached` present, or its
    /// CNINode lists the `SecurityGroupsForPods` feature.
    pub wants_trunk: bool,
    /// Label `vpc.amazonaws.com/has-trunk-attached` is `true`.
    pub labelled_attached: bool,
    /// Its CNINode exists.
    pub has_cni_node: bool,
}

/// A Pod as the reconcile needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObs {
    /// Namespace and name.
    pub key: PodKey,
    /// Uid.
    pub uid: String,
    /// `spec.nodeName` (`None` while unscheduled).
    pub node: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `spec.hostNetwork` (never given a branch).
    pub host_network: bool,
    /// Phase `Succeeded` or `Failed`: its branch can go.
    pub terminal: bool,
    /// The `vpc.amazonaws.com/pod-eni` annotation: absent, parsed, or unparsable (why).
    pub annotation: Option<Result<Vec<BranchEni>, String>>,
}

/// A SecurityGroupPolicy.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObs {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Spec.
    pub spec: SecurityGroupPolicySpec,
}

/// Everything the API server says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    /// All nodes.
    pub nodes: Vec<NodeObs>,
    /// All pods.
    pub pods: Vec<PodObs>,
    /// All SecurityGroupPolicies.
    pub policies: Vec<PolicyObs>,
    /// Service account labels by (namespace, name).
    pub service_accounts: BTreeMap<(String, String), BTreeMap<String, String>>,
}

/// An ENI this controller tagged, as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniObs {
    /// ENI id.
    pub id: String,
    /// `trunk` or `interface` (`branch` on some answers).
    pub interface_type: String,
    /// `available`, `in-use`, ...
    pub status: String,
    /// MAC address.
    pub mac: String,
    /// Primary private IPv4.
    pub private_ip: Option<String>,
    /// IPv6 address.
    pub ipv6: Option<String>,
    /// Subnet.
    pub subnet_id: String,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Instance it is attached to.
    pub attached_to: Option<String>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

impl EniObs {
    /// A trunk ENI.
    pub fn is_trunk(&self) -> bool {
        self.interface_type == "trunk"
    }

    /// The trunk a branch says it belongs to (tag).
    pub fn trunk_tag(&self) -> Option<&str> {
        self.tags.get(TAG_TRUNK_ENI_ID).map(String::as_str)
    }

    /// The VLAN id a branch's tag says.
    pub fn vlan_tag(&self) -> Option<u16> {
        self.tags.get(TAG_VLAN_ID).and_then(|v| v.parse().ok())
    }

    /// The instance tag.
    pub fn instance_tag(&self) -> Option<&str> {
        self.tags.get(TAG_INSTANCE_ID).map(String::as_str)
    }
}

/// A trunk association as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociationObs {
    /// Association id.
    pub id: String,
    /// Trunk ENI.
    pub trunk: String,
    /// Branch ENI.
    pub branch: String,
    /// VLAN id.
    pub vlan: u16,
}

/// A subnet's CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetObs {
    /// IPv4 CIDR.
    pub cidr: String,
    /// IPv6 CIDR, if any.
    pub ipv6_cidr: Option<String>,
}

/// Everything EC2 says about the controller's ENIs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    /// ENIs carrying the controller's owner and cluster tags.
    pub enis: Vec<EniObs>,
    /// Associations of those trunks.
    pub associations: Vec<AssociationObs>,
    /// CIDRs of the subnets those ENIs are in.
    pub subnets: BTreeMap<String, SubnetObs>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_round_trips_in_the_reference_format() {
        let b = BranchEni {
            eni_id: "eni-0a".into(),
            if_address: "02:00:00:00:00:01".into(),
            private_ip: "10.0.1.5".into(),
            ipv6_addr: String::new(),
            vlan_id: 1,
            subnet_cidr: "10.0.1.0/24".into(),
            subnet_v6_cidr: String::new(),
            association_id: "trunk-assoc-0b".into(),
        };
        let v = pod_eni_value(std::slice::from_ref(&b));
        assert_eq!(
            v,
            r#"[{"eniId":"eni-0a","ifAddress":"02:00:00:00:00:01","privateIp":"10.0.1.5","ipv6Addr":"","vlanId":1,"subnetCidr":"10.0.1.0/24","subnetV6Cidr":"","associationID":"trunk-assoc-0b"}]"#
        );
        assert_eq!(parse_pod_eni(&v), Ok(vec![b.clone()]));
        let cni_spelling = v.replace("vlanId", "vlanID");
        assert_eq!(parse_pod_eni(&cni_spelling), Ok(vec![b]));
        let err = parse_pod_eni(r#"[{"eniId":"eni-1","ifAddress":"m","vlanId":"x"}]"#)
            .expect_err("bad vlan");
        assert!(
            err.starts_with("vpc.amazonaws.com/pod-eni[0].vlanId:"),
            "{err}"
        );
        assert!(parse_pod_eni("{}").is_err());
    }
}
