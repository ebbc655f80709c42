//! Kubernetes API: the own Node, the ENIConfig CRD, the pod IP annotation, Warning events,
//! and for security groups for pods the pod's branch-ENI annotation and the node's CNINode
//! feature (spec/ipamd.md section 8), with the start-up decision of whether the daemon needs
//! an API server at all.
//!
//! The `kube::Client` is used directly (not wrapped); tests drive a real client over
//! `tower_test::mock::pair()` with a verifier that asserts every request. The complete set of
//! requests this module can make is published in [`API_REQUESTS`] and [`NON_RESOURCE_URLS`],
//! so that the deployment's ClusterRole can be checked against it: nothing here lists or
//! watches.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

/// Pod annotation holding the pod's branch ENIs, written by the VPC resource controller
/// (security groups for pods); also the prefix of the extended resource its webhook puts in
/// the first container's limits.
pub const POD_ENI_ANNOTATION: &str = "vpc.amazonaws.com/pod-eni";
/// The CNINode feature that asks the VPC resource controller for a trunk ENI.
pub const FEATURE_SGP: &str = "SecurityGroupsForPods";
/// Pod annotation holding the pod's IP (`ANNOTATE_POD_IP`).
pub const POD_IPS_ANNOTATION: &str = "vpc.amazonaws.com/pod-ips";
/// Node label naming an ENIConfig managed out of band; wins over everything else.
pub const EXTERNAL_ENI_CONFIG_LABEL: &str = "vpc.amazonaws.com/externalEniConfig";
/// Default of `ENI_CONFIG_ANNOTATION_DEF` and `ENI_CONFIG_LABEL_DEF`.
pub const DEFAULT_ENI_CONFIG_KEY: &str = "k8s.amazonaws.com/eniConfig";
/// ENIConfig used when the node names none.
pub const DEFAULT_ENI_CONFIG_NAME: &str = "default";
/// Taint key of a cordoned node (effect `NoSchedule`).
pub const UNSCHEDULABLE_TAINT_KEY: &str = "node.kubernetes.io/unschedulable";
/// `reportingController` of our events.
pub const EVENT_REPORTER: &str = "aws-node";
/// Event reason when EC2 answers `UnauthorizedOperation` (the reference's).
pub const REASON_MISSING_IAM_PERMISSIONS: &str = "MissingIAMPermissions";
/// Event reason when no subnet usable by the node has free addresses left (ours).
pub const REASON_SUBNET_EXHAUSTED: &str = "SubnetAddressesExhausted";
/// Timeout of one Node or ENIConfig GET (the reference's 3 s).
pub const GET_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of a write (patch, event).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of the optimistic-lock clear of the pod IP annotation on `409 Conflict`.
pub const CONFLICT_RETRIES: usize = 5;
/// An identical Warning event (same reason and message) is posted at most once per this long.
pub const EVENT_REPEAT_INTERVAL: Duration = Duration::from_secs(300);

/// One kind of resource request the client makes: the RBAC triple it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiRequest {
    /// RBAC verb (`get`, `list`, `watch`, `create`, `patch`, `update`, `delete`).
    pub verb: &'static str,
    /// API group, `""` for the core group.
    pub group: &'static str,
    /// Resource (plural), with `/subresource` when there is one.
    pub resource: &'static str,
    /// The setting without which the request is never made (`None`: always possible).
    pub only_with: Option<&'static str>,
}

/// Every resource request this module makes, sorted. The tests check that the requests the
/// client really sends are exactly these (ignoring `only_with`).
pub const API_REQUESTS: &[ApiRequest] = &[
    ApiRequest {
        verb: "create",
        group: "events.k8s.io",
        resource: "events",
        only_with: None,
    },
    ApiRequest {
        verb: "get",
        group: "",
        resource: "nodes",
        only_with: None,
    },
    ApiRequest {
        verb: "get",
        group: "",
        resource: "pods",
        only_with: None,
    },
    ApiRequest {
        verb: "get",
        group: "crd.k8s.amazonaws.com",
        resource: "eniconfigs",
        only_with: Some("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"),
    },
    ApiRequest {
        verb: "get",
        group: "vpcresources.k8s.aws",
        resource: "cninodes",
        only_with: Some("ENABLE_POD_ENI"),
    },
    ApiRequest {
        verb: "patch",
        group: "",
        resource: "pods",
        only_with: Some("ANNOTATE_POD_IP"),
    },
    ApiRequest {
        verb: "patch",
        group: "vpcresources.k8s.aws",
        resource: "cninodes",
        only_with: Some("ENABLE_POD_ENI"),
    },
];

/// The least-privilege ClusterRole rules for [`API_REQUESTS`]: one rule per (group,
/// resource) with its verbs, keeping the requests only made `only_with` a setting when
/// `include(setting)` says so (pass `|_| true` for a role that allows every feature).
pub fn cluster_role_rules(include: impl Fn(&str) -> bool) -> Vec<PolicyRule> {
    let mut by_resource: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for req in API_REQUESTS {
        if req.only_with.is_some_and(|setting| !include(setting)) {
            continue;
        }
        by_resource
            .entry((req.group, req.resource))
            .or_default()
            .push(req.verb.to_owned());
    }
    by_resource
        .into_iter()
        .map(|((group, resource), verbs)| PolicyRule {
            api_groups: Some(vec![group.to_owned()]),
            resources: Some(vec![resource.to_owned()]),
            verbs,
            ..PolicyRule::default()
        })
        .collect()
}

/// Non-resource URLs the client GETs (`/version`, allowed to every client by the default
/// `system:public-info-viewer` role, so a ClusterRole need not list it).
pub const NON_RESOURCE_URLS: &[&str] = &["/version"];

/// What a request needs from RBAC, by method and path (the query decides list/watch).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RbacNeed {
    /// A resource request.
    Resource {
        /// RBAC verb.
        verb: String,
        /// API group (`""` core).
        group: String,
        /// Resource (plural), `resource/subresource` for a subresource.
        resource: String,
    },
    /// A non-resource URL with its verb.
    NonResource {
        /// RBAC verb (`get`, ...).
        verb: String,
        /// The URL path.
        path: String,
    },
}

/// Classifies a Kubernetes API request (HTTP method, path, query) the way the API server's
/// authorizer does, e.g. `GET /api/v1/namespaces/ns/pods/p` → `get` `""` `pods`.
pub fn rbac_need(method: &str, path: &str, query: Option<&str>) -> RbacNeed {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => {
            return RbacNeed::NonResource {
                verb: method.to_ascii_lowercase(),
                path: path.to_owned(),
            }
        }
    };
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
        [] => {
            return RbacNeed::NonResource {
                verb: method.to_ascii_lowercase(),
                path: path.to_owned(),
            }
        }
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => {
            return RbacNeed::Resource {
                verb: other.to_ascii_lowercase(),
                group: group.to_owned(),
                resource,
            }
        }
    };
    RbacNeed::Resource {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource,
    }
}

/// Spec of an `ENIConfig` (`eniconfigs.crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped): the
/// subnet and security groups of the ENIs created for nodes that select it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "crd.k8s.amazonaws.com",
    version = "v1alpha1",
    kind = "ENIConfig",
    plural = "eniconfigs",
    singular = "eniconfig",
    root = "EniConfig",
    doc = "ENIConfig: subnet and security groups for the ENIs of the nodes that select it (custom networking)"
)]
pub struct EniConfigSpec {
    /// Subnet id of new ENIs (must be in the node's availability zone).
    pub subnet: String,
    /// Security group ids of new ENIs; none means the primary ENI's.
    #[serde(
        default,
        rename = "securityGroups",
        skip_serializing_if = "Option::is_none"
    )]
    pub security_groups: Option<Vec<String>>,
}

/// The ENIConfig CustomResourceDefinition as the reference chart ships it: cluster scope,
/// `v1alpha1` served and stored, `spec.subnet` required, `spec.securityGroups` a string list,
/// an empty `status` object, unknown fields preserved at the root.
pub fn eni_config_crd() -> CustomResourceDefinition {
    let mut crd = EniConfig::crd();
    crd.spec.preserve_unknown_fields = Some(false);
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema.x_kubernetes_preserve_unknown_fields = Some(true);
            let props = schema.properties.get_or_insert_with(BTreeMap::new);
            props.insert(
                "status".to_owned(),
                JSONSchemaProps {
                    type_: Some("object".to_owned()),
                    ..JSONSchemaProps::default()
                },
            );
            if let Some(spec) = props.get_mut("spec") {
                let spec_props = spec.properties.get_or_insert_with(BTreeMap::new);
                spec_props.insert(
                    "securityGroups".to_owned(),
                    JSONSchemaProps {
                        type_: Some("array".to_owned()),
                        description: Some(
                            "Security group ids of new ENIs; none means the primary ENI's."
                                .to_owned(),
                        ),
                        items: Some(JSONSchemaPropsOrArray::Schema(Box::new(JSONSchemaProps {
                            type_: Some("string".to_owned()),
                            ..JSONSchemaProps::default()
                        }))),
                        ..JSONSchemaProps::default()
                    },
                );
            }
        }
    }
    crd
}

/// [`eni_config_crd`] as a YAML document, for the manifests.
pub fn eni_config_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&eni_config_crd())
}

/// One feature of a CNINode (`spec.features[]`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct CniNodeFeature {
    /// `SecurityGroupsForPods` or `CustomNetworking`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The feature's value (`""` for `SecurityGroupsForPods`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
}

/// Spec of a `CNINode` (`cninodes.vpcresources.k8s.aws/v1alpha1`, cluster-scoped, named after
/// the node, created by the VPC resource controller): the features the node asks it for.
/// Only the fields ipamd reads; the rest of the object is left as it is by the merge patch.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "vpcresources.k8s.aws",
    version = "v1alpha1",
    kind = "CNINode",
    plural = "cninodes",
    singular = "cninode",
    root = "CniNode",
    doc = "CNINode: the VPC features a node delegates to the VPC resource controller"
)]
pub struct CniNodeSpec {
    /// Features the node asks for.
    #[serde(default)]
    pub features: Vec<CniNodeFeature>,
}

/// The features a CNINode must list after adding `{name, value}`: `None` when it already
/// lists exactly that; else the list with any feature of the same name and another value
/// replaced (the reference's `AddFeatureToCNINode`).
pub fn features_with(
    current: &[CniNodeFeature],
    name: &str,
    value: &str,
) -> Option<Vec<CniNodeFeature>> {
    if current.iter().any(|f| f.name == name && f.value == value) {
        return None;
    }
    let mut out: Vec<CniNodeFeature> = current.iter().filter(|f| f.name != name).cloned().collect();
    out.push(CniNodeFeature {
        name: name.to_owned(),
        value: value.to_owned(),
    });
    Some(out)
}

/// One element of the `vpc.amazonaws.com/pod-eni` annotation (a JSON list written by the VPC
/// resource controller). Go reads the keys case-insensitively: `vlanId` (what controllers
/// write) and `vlanID` (the key the reference CNI declares) are both taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PodEniEntry {
    /// Branch ENI id.
    #[serde(rename = "eniId")]
    pub eni_id: String,
    /// The branch ENI's MAC address.
    #[serde(rename = "ifAddress")]
    pub if_address: String,
    /// Its private IPv4 address.
    #[serde(rename = "privateIp")]
    pub private_ip: String,
    /// Its IPv6 address.
    #[serde(rename = "ipv6Addr")]
    pub ipv6_addr: String,
    /// VLAN id on the trunk.
    #[serde(rename = "vlanID", alias = "vlanId")]
    pub vlan_id: i64,
    /// The branch subnet's IPv4 CIDR.
    #[serde(rename = "subnetCidr")]
    pub subnet_cidr: String,
    /// The branch subnet's IPv6 CIDR.
    #[serde(rename = "subnetV6Cidr")]
    pub subnet_v6_cidr: String,
}

/// A branch ENI as AddNetwork answers it: validated [`PodEniEntry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodBranch {
    /// The pod's IPv4 address.
    pub ip: std::net::Ipv4Addr,
    /// The branch ENI's MAC, as written (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// VLAN id, 1..=4094.
    pub vlan_id: u16,
    /// The branch subnet.
    pub subnet: crate::types::Ipv4Net,
}

/// Parses an annotation value into its list; the error names the field path
/// (`vpc.amazonaws.com/pod-eni[0].vlanID: ...`).
pub fn parse_pod_eni(value: &str) -> Result<Vec<PodEniEntry>, String> {
    let mut de = serde_json::Deserializer::from_str(value);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        format!(
            "{POD_ENI_ANNOTATION}{path}: {}",
            clip_message(&e.into_inner().to_string())
        )
    })
}

/// The first branch of an annotation value, checked (spec/ipamd.md 4.4): an IPv4 address, a
/// MAC, a VLAN id other than 0 and a parseable subnet; the error names the field.
pub fn pod_branch(value: &str) -> Result<PodBranch, String> {
    let list = parse_pod_eni(value)?;
    let Some(first) = list.first() else {
        return Err(format!("{POD_ENI_ANNOTATION}: an empty list"));
    };
    let field = |f: &str, why: String| format!("{POD_ENI_ANNOTATION}[0].{f}: {why}");
    let ip = first
        .private_ip
        .parse::<std::net::Ipv4Addr>()
        .map_err(|_| {
            field(
                "privateIp",
                format!("{:?} is not an IPv4 address", clip(&first.private_ip)),
            )
        })?;
    let mac_ok = first.if_address.split(':').count() == 6
        && first
            .if_address
            .split(':')
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !mac_ok {
        return Err(field(
            "ifAddress",
            format!("{:?} is not a MAC address", clip(&first.if_address)),
        ));
    }
    let vlan_id = match u16::try_from(first.vlan_id) {
        Ok(v) if (1..=4094).contains(&v) => v,
        _ => {
            return Err(field(
                "vlanID",
                format!("{} is not a VLAN id in 1..=4094", first.vlan_id),
            ))
        }
    };
    let subnet = first
        .subnet_cidr
        .parse::<crate::types::Ipv4Net>()
        .map_err(|e| field("subnetCidr", format!("{:?}: {e}", clip(&first.subnet_cidr))))?;
    Ok(PodBranch {
        ip,
        mac: first.if_address.to_ascii_lowercase(),
        vlan_id,
        subnet,
    })
}

/// Whether the pod asks for a branch ENI: its first container's `resources.limits` has a
/// resource named `vpc.amazonaws.com/pod-eni...` (the resource controller's webhook adds it).
pub fn pod_wants_branch(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.resources.as_ref())
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.keys().any(|k| k.starts_with(POD_ENI_ANNOTATION)))
}

/// The pod's `vpc.amazonaws.com/pod-eni` annotation, if any.
pub fn pod_eni_annotation(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_ENI_ANNOTATION))
        .map(String::as_str)
}

/// Errors of the Kubernetes layer.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// A request failed (transport error or API error status).
    #[error("{op} {object}")]
    Request {
        /// What was attempted, e.g. `get node`.
        op: &'static str,
        /// The object, e.g. `ip-10-0-0-1.ec2.internal`.
        object: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// A request got no answer in time.
    #[error("{op} {object}: no answer within {after:?}")]
    Timeout {
        /// What was attempted.
        op: &'static str,
        /// The object.
        object: String,
        /// The timeout.
        after: Duration,
    },
    /// An object answered by the API server that the daemon cannot use: a field of the wrong
    /// type, or a value it refuses (an ENIConfig subnet that is no subnet id, ...).
    #[error("{kind} {name:?}: {field}: {why}")]
    BadObject {
        /// `Node` or `ENIConfig`.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// The field, as a path (`spec.securityGroups[1]`, `metadata.labels`).
        field: String,
        /// What is wrong.
        why: String,
    },
    /// The ENIConfig the node selects does not exist.
    #[error("ENIConfig {name:?} not found")]
    EniConfigNotFound {
        /// Its name.
        name: String,
    },
    /// The client configuration could not be built (no in-cluster environment nor kubeconfig).
    #[error("cannot configure the Kubernetes client")]
    Config(#[source] kube::Error),
    /// An enabled feature needs the API server and it refused us for good (e.g. 401/403).
    #[error("the API server is required by {needed_by} and refused the client")]
    ApiServerRefused {
        /// The settings that need it.
        needed_by: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

impl K8sError {
    /// `true` for an API answer `404 Not Found`.
    pub fn is_not_found(&self) -> bool {
        match self {
            K8sError::Request { source, .. } => is_not_found(source),
            K8sError::EniConfigNotFound { .. } => true,
            _ => false,
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_not_found())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_conflict())
}

/// What the daemon needs from its own Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `status.capacity.pods` (kubelet's max pods), if set.
    pub max_pods: Option<u32>,
    /// The ENIConfig the node selects (see [`eni_config_name_of`]).
    pub eni_config: String,
    /// Tainted `node.kubernetes.io/unschedulable:NoSchedule` (cordoned).
    pub unschedulable: bool,
}

/// The ENIConfig name a node selects, in the reference's order: label
/// `vpc.amazonaws.com/externalEniConfig`, then the annotation `annotation_key`
/// (`ENI_CONFIG_ANNOTATION_DEF`), then the label `label_key` (`ENI_CONFIG_LABEL_DEF`), then
/// `default`. Unlike the reference, an empty value counts as absent (no ENIConfig can have
/// an empty name).
pub fn eni_config_name_of(node: &Node, annotation_key: &str, label_key: &str) -> String {
    let labels = node.metadata.labels.as_ref();
    let annotations = node.metadata.annotations.as_ref();
    let pick = |map: Option<&BTreeMap<String, String>>, key: &str| {
        map.and_then(|m| m.get(key))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    pick(labels, EXTERNAL_ENI_CONFIG_LABEL)
        .or_else(|| pick(annotations, annotation_key))
        .or_else(|| pick(labels, label_key))
        .unwrap_or_else(|| DEFAULT_ENI_CONFIG_NAME.to_owned())
}

/// [`NodeInfo`] of a Node object.
pub fn node_info_of(node: &Node, annotation_key: &str, label_key: &str) -> NodeInfo {
    let max_pods = node
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("pods"))
        .and_then(|q| q.0.parse().ok());
    let unschedulable = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| {
            taints
                .iter()
                .any(|t| t.key == UNSCHEDULABLE_TAINT_KEY && t.effect == "NoSchedule")
        });
    NodeInfo {
        max_pods,
        eni_config: eni_config_name_of(node, annotation_key, label_key),
        unschedulable,
    }
}

/// Checks an ENIConfig's spec: `subnet` a subnet id (`subnet-` and hexadecimal digits),
/// each security group a security group id (`sg-` and hexadecimal digits). Returns the field
/// and what is wrong.
pub fn check_eni_config(spec: &EniConfigSpec) -> Result<(), (String, String)> {
    fn aws_id(v: &str, prefix: &str) -> bool {
        v.strip_prefix(prefix).is_some_and(|hex| {
            !hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
    }
    if !aws_id(&spec.subnet, "subnet-") {
        return Err((
            "spec.subnet".into(),
            format!("{:?} is not a subnet id (subnet-<hex>)", clip(&spec.subnet)),
        ));
    }
    for (i, g) in spec.security_groups.iter().flatten().enumerate() {
        if !aws_id(g, "sg-") {
            return Err((
                format!("spec.securityGroups[{i}]"),
                format!("{:?} is not a security group id (sg-<hex>)", clip(g)),
            ));
        }
    }
    Ok(())
}

/// Whether `name` can name an ENIConfig: a DNS subdomain name (RFC 1123, at most 253
/// characters of lower-case alphanumerics, `-` and `.`).
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The node field the ENIConfig name came from, for an error about it.
fn eni_config_field(node: &Node, annotation_key: &str, label_key: &str) -> String {
    let has = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .is_some_and(|v| !v.is_empty())
    };
    if has(&node.metadata.labels, EXTERNAL_ENI_CONFIG_LABEL) {
        format!("metadata.labels[{EXTERNAL_ENI_CONFIG_LABEL:?}]")
    } else if has(&node.metadata.annotations, annotation_key) {
        format!("metadata.annotations[{annotation_key:?}]")
    } else {
        format!("metadata.labels[{label_key:?}]")
    }
}

/// At most 256 characters of a parser's message (which quotes the value it refused).
fn clip_message(m: &str) -> String {
    let mut out: String = m.chars().take(256).collect();
    if out.len() < m.len() {
        out.push('…');
    }
    out
}

/// At most 64 characters of `v`, for error messages.
fn clip(v: &str) -> String {
    let mut out: String = v.chars().take(64).collect();
    if out.len() < v.len() {
        out.push('…');
    }
    out
}

async fn bounded<T>(
    after: Duration,
    op: &'static str,
    object: &str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, K8sError> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(K8sError::Request {
            op,
            object: object.to_owned(),
            source,
        }),
        Err(_) => Err(K8sError::Timeout {
            op,
            object: object.to_owned(),
            after,
        }),
    }
}

/// The daemon's Kubernetes client: its own Node, ENIConfigs, pod annotations and events.
#[derive(Clone)]
pub struct K8s {
    client: Client,
    node_name: String,
    pod_name: String,
    pod_namespace: String,
    annotation_key: String,
    label_key: String,
    own_pod_uid: std::sync::Arc<OnceCell<Option<String>>>,
    recent_events: std::sync::Arc<std::sync::Mutex<RecentEvents>>,
}

/// When each (reason, message) event was last posted.
type RecentEvents = std::collections::HashMap<(String, String), tokio::time::Instant>;

impl std::fmt::Debug for K8s {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8s")
            .field("node_name", &self.node_name)
            .field("pod_name", &self.pod_name)
            .field("pod_namespace", &self.pod_namespace)
            .finish_non_exhaustive()
    }
}

impl K8s {
    /// A client for node `node_name` (`MY_NODE_NAME`), reporting events on the pod
    /// `pod_namespace/pod_name` (`MY_POD_NAME`, normally in `kube-system`). The ENIConfig keys
    /// default to `k8s.amazonaws.com/eniConfig` (see [`K8s::with_eni_config_keys`]).
    pub fn new(
        client: Client,
        node_name: impl Into<String>,
        pod_name: impl Into<String>,
        pod_namespace: impl Into<String>,
    ) -> K8s {
        K8s {
            client,
            node_name: node_name.into(),
            pod_name: pod_name.into(),
            pod_namespace: pod_namespace.into(),
            annotation_key: DEFAULT_ENI_CONFIG_KEY.to_owned(),
            label_key: DEFAULT_ENI_CONFIG_KEY.to_owned(),
            own_pod_uid: std::sync::Arc::new(OnceCell::new()),
            recent_events: std::sync::Arc::default(),
        }
    }

    /// Sets the node annotation key (`ENI_CONFIG_ANNOTATION_DEF`) and label key
    /// (`ENI_CONFIG_LABEL_DEF`) naming the ENIConfig; an empty key keeps the default.
    pub fn with_eni_config_keys(mut self, annotation_key: &str, label_key: &str) -> K8s {
        if !annotation_key.is_empty() {
            self.annotation_key = annotation_key.to_owned();
        }
        if !label_key.is_empty() {
            self.label_key = label_key.to_owned();
        }
        self
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// GETs a cluster-scoped object (3 s timeout), the same request as `Api::get`, and
    /// parses it naming the field path of a malformed answer ([`K8sError::BadObject`]).
    /// Callers name the type (`get_object::<Node>`): `ipamd/tests/rbac_source.rs` reads it
    /// from the source to check the ClusterRole.
    async fn get_object<K>(
        &self,
        op: &'static str,
        kind: &'static str,
        name: &str,
    ) -> Result<K, K8sError>
    where
        K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned,
    {
        let mut req = kube::core::Request::new(K::url_path(&(), None))
            .get(name, &kube::api::GetParams::default())
            .map_err(|e| K8sError::Request {
                op,
                object: name.to_owned(),
                source: kube::Error::BuildRequest(e),
            })?;
        req.extensions_mut().insert("get");
        let text = bounded(GET_TIMEOUT, op, name, self.client.request_text(req)).await?;
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| K8sError::BadObject {
            kind,
            name: name.to_owned(),
            field: e.path().to_string(),
            why: clip_message(&e.into_inner().to_string()),
        })
    }

    async fn node(&self) -> Result<Node, K8sError> {
        self.get_object::<Node>("get node", "Node", &self.node_name)
            .await
    }

    /// GETs the own Node (3 s timeout): max pods, ENIConfig name, cordon taint.
    pub async fn node_info(&self) -> Result<NodeInfo, K8sError> {
        let node = self.node().await?;
        Ok(node_info_of(&node, &self.annotation_key, &self.label_key))
    }

    /// GETs an ENIConfig by name (3 s timeout); [`K8sError::EniConfigNotFound`] when absent,
    /// [`K8sError::BadObject`] naming the field when its spec is unusable
    /// ([`check_eni_config`]).
    pub async fn eni_config(&self, name: &str) -> Result<EniConfigSpec, K8sError> {
        match self
            .get_object::<EniConfig>("get ENIConfig", "ENIConfig", name)
            .await
        {
            Ok(cfg) => {
                check_eni_config(&cfg.spec).map_err(|(field, why)| K8sError::BadObject {
                    kind: "ENIConfig",
                    name: name.to_owned(),
                    field,
                    why,
                })?;
                Ok(cfg.spec)
            }
            Err(e) if e.is_not_found() => Err(K8sError::EniConfigNotFound {
                name: name.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The node's ENIConfig: the Node's choice (see [`eni_config_name_of`]), which must be an
    /// object name (else [`K8sError::BadObject`] naming the label or annotation), then
    /// [`K8s::eni_config`]; returns its name too.
    pub async fn node_eni_config(&self) -> Result<(String, EniConfigSpec), K8sError> {
        let node = self.node().await?;
        let name = eni_config_name_of(&node, &self.annotation_key, &self.label_key);
        if !is_object_name(&name) {
            return Err(K8sError::BadObject {
                kind: "Node",
                name: self.node_name.clone(),
                field: eni_config_field(&node, &self.annotation_key, &self.label_key),
                why: format!(
                    "{:?} cannot name an ENIConfig (not a DNS subdomain name)",
                    clip(&name)
                ),
            });
        }
        let spec = self.eni_config(&name).await?;
        Ok((name, spec))
    }

    /// Sets `vpc.amazonaws.com/pod-ips` on pod `namespace/name` to `ip` (one merge patch).
    /// A pod that no longer exists is not an error.
    pub async fn set_pod_ip_annotation(
        &self,
        namespace: &str,
        name: &str,
        ip: &str,
    ) -> Result<(), K8sError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({
            "metadata": { "annotations": { POD_IPS_ANNOTATION: ip } }
        });
        let object = format!("{namespace}/{name}");
        match bounded(
            WRITE_TIMEOUT,
            "annotate pod",
            &object,
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => {
                tracing::debug!(pod = %object, "pod gone, annotation not set");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Clears `vpc.amazonaws.com/pod-ips` (sets it to `""`, as the reference) on pod
    /// `namespace/name`, only if it still holds `released_ip`: GET, then a merge patch carrying
    /// the pod's `resourceVersion` (optimistic lock), retried on `409 Conflict`. A pod that no
    /// longer exists is not an error. Returns whether the annotation was cleared.
    pub async fn clear_pod_ip_annotation(
        &self,
        namespace: &str,
        name: &str,
        released_ip: &str,
    ) -> Result<bool, K8sError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let object = format!("{namespace}/{name}");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let pod = match bounded(GET_TIMEOUT, "get pod", &object, api.get(name)).await {
                Ok(pod) => pod,
                Err(e) if e.is_not_found() => return Ok(false),
                Err(e) => return Err(e),
            };
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(POD_IPS_ANNOTATION));
            if current.map(String::as_str) != Some(released_ip) {
                tracing::debug!(pod = %object, ?current, released_ip, "pod IP annotation not ours to clear");
                return Ok(false);
            }
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": pod.metadata.resource_version,
                    "annotations": { POD_IPS_ANNOTATION: "" }
                }
            });
            let result = tokio::time::timeout(
                WRITE_TIMEOUT,
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await;
            match result {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) if is_not_found(&e) => return Ok(false),
                Ok(Err(e)) if is_conflict(&e) && attempt < CONFLICT_RETRIES => continue,
                Ok(Err(source)) => {
                    return Err(K8sError::Request {
                        op: "clear pod IP annotation",
                        object,
                        source,
                    })
                }
                Err(_) => {
                    return Err(K8sError::Timeout {
                        op: "clear pod IP annotation",
                        object,
                        after: WRITE_TIMEOUT,
                    })
                }
            }
        }
    }

    /// GETs pod `namespace/name` (3 s timeout). A missing pod is an error with
    /// [`K8sError::is_not_found`].
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Pod, K8sError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let object = format!("{namespace}/{name}");
        bounded(GET_TIMEOUT, "get pod", &object, api.get(name)).await
    }

    /// Adds feature `{name, value}` to the node's CNINode (named after the node) unless it
    /// is already listed: GET, then one merge patch carrying the object's `resourceVersion`
    /// (optimistic lock) and the whole feature list, a same-name feature with another value
    /// replaced. Returns whether a patch was sent. A missing CNINode (the VPC resource
    /// controller creates it) is an error with [`K8sError::is_not_found`]; the caller retries.
    pub async fn add_cni_node_feature(&self, name: &str, value: &str) -> Result<bool, K8sError> {
        let node = self
            .get_object::<CniNode>("get CNINode", "CNINode", &self.node_name)
            .await?;
        let Some(features) = features_with(&node.spec.features, name, value) else {
            return Ok(false);
        };
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": node.metadata.resource_version },
            "spec": { "features": features },
        });
        let api: Api<CniNode> = Api::all(self.client.clone());
        bounded(
            WRITE_TIMEOUT,
            "patch CNINode",
            &self.node_name,
            api.patch(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await?;
        Ok(true)
    }

    /// The own pod's uid, read once (an event without it does not show in `kubectl describe`);
    /// `None` if the pod cannot be read.
    async fn own_pod_uid(&self) -> Option<String> {
        self.own_pod_uid
            .get_or_init(|| async {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.pod_namespace);
                let object = format!("{}/{}", self.pod_namespace, self.pod_name);
                match bounded(GET_TIMEOUT, "get pod", &object, api.get(&self.pod_name)).await {
                    Ok(pod) => pod.metadata.uid,
                    Err(e) => {
                        tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "cannot read the aws-node pod; events will carry no uid");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// The Warning event [`K8s::warn`] posts, at time `now` (public for inspection).
    pub fn warning_event(
        &self,
        reason: &str,
        message: &str,
        uid: Option<String>,
        now: SystemTime,
    ) -> Event {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let stamp = k8s_openapi::jiff::Timestamp::new(
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            i32::try_from(since.subsec_micros() * 1000).unwrap_or(0),
        )
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", self.pod_name, since.as_nanos())),
                namespace: Some(self.pod_namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(stamp)),
            reporting_controller: Some(EVENT_REPORTER.to_owned()),
            reporting_instance: Some(format!("{EVENT_REPORTER}-{}", self.node_name)),
            action: Some(reason.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(message.chars().take(1024).collect()),
            type_: Some("Warning".to_owned()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(self.pod_name.clone()),
                namespace: Some(self.pod_namespace.clone()),
                uid,
                ..ObjectReference::default()
            }),
            ..Event::default()
        }
    }

    /// Posts an `events.k8s.io/v1` Warning on the aws-node pod, reporter `aws-node`, e.g.
    /// [`REASON_MISSING_IAM_PERMISSIONS`] or [`REASON_SUBNET_EXHAUSTED`]. The first call reads
    /// the pod once for its uid. The same reason and message are posted at most once per
    /// [`EVENT_REPEAT_INTERVAL`] (a retry loop does not flood the API server); returns whether
    /// the event was posted.
    pub async fn warn(&self, reason: &str, message: &str) -> Result<bool, K8sError> {
        let key = (reason.to_owned(), message.to_owned());
        let now = tokio::time::Instant::now();
        {
            let recent = self
                .recent_events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if recent
                .get(&key)
                .is_some_and(|at| now.saturating_duration_since(*at) < EVENT_REPEAT_INTERVAL)
            {
                tracing::debug!(reason, message, "repeated warning event suppressed");
                return Ok(false);
            }
        }
        let uid = self.own_pod_uid().await;
        let event = self.warning_event(reason, message, uid, SystemTime::now());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.pod_namespace);
        bounded(
            WRITE_TIMEOUT,
            "create event",
            reason,
            api.create(&PostParams::default(), &event),
        )
        .await?;
        let mut recent = self
            .recent_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.retain(|_, at| now.saturating_duration_since(*at) < EVENT_REPEAT_INTERVAL);
        recent.insert(key, now);
        Ok(true)
    }
}

/// The settings enabled that need an API server at start-up (their environment variable
/// names): custom networking, the pod IP annotation, security groups for pods.
pub fn api_server_needed_by(
    custom_networking: bool,
    annotate_pod_ip: bool,
    pod_eni: bool,
) -> Vec<&'static str> {
    [
        (custom_networking, "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"),
        (annotate_pod_ip, "ANNOTATE_POD_IP"),
        (pod_eni, "ENABLE_POD_ENI"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

/// Polling cadence of [`connect_api_server`] (the reference's by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectPolicy {
    /// Poll interval when an enabled feature needs the API server (2 s).
    pub required_poll: Duration,
    /// Give up after this long even when required (`None`: wait forever, as the reference).
    pub required_budget: Option<Duration>,
    /// Poll interval when no feature needs it (5 s).
    pub optional_poll: Duration,
    /// How long to try when no feature needs it before running without it (30 s).
    pub optional_budget: Duration,
}

impl Default for ConnectPolicy {
    fn default() -> Self {
        ConnectPolicy {
            required_poll: Duration::from_secs(2),
            required_budget: None,
            optional_poll: Duration::from_secs(5),
            optional_budget: Duration::from_secs(30),
        }
    }
}

/// Result of the start-up connectivity check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiServerStatus {
    /// `/version` answered; `git_version` is the server's.
    Connected {
        /// The API server's `gitVersion`.
        git_version: String,
    },
    /// Not reachable within the budget and no enabled feature needs it: run without it.
    Unavailable,
}

/// A refusal that polling cannot cure (the client is misconfigured or not allowed).
fn is_permanent(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 429 && s.code != 408)
}

/// Start-up connectivity check (`GET /version`). When `needed_by` (see
/// [`api_server_needed_by`]) is non-empty, polls every `required_poll` until the server
/// answers (or `required_budget` runs out: an error), and fails at once on a 4xx refusal.
/// Otherwise tries every `optional_poll` for `optional_budget`, and if the server is still
/// unreachable logs that the daemon runs without it and returns
/// [`ApiServerStatus::Unavailable`]; the caller may keep polling in the background with
/// [`wait_for_api_server`].
pub async fn connect_api_server(
    client: &Client,
    needed_by: &[&str],
    policy: &ConnectPolicy,
) -> Result<ApiServerStatus, K8sError> {
    let required = !needed_by.is_empty();
    let (poll, budget) = if required {
        (policy.required_poll, policy.required_budget)
    } else {
        (policy.optional_poll, Some(policy.optional_budget))
    };
    let started = tokio::time::Instant::now();
    loop {
        let err = match client.apiserver_version().await {
            Ok(info) => {
                tracing::info!(version = %info.git_version, "connected to the Kubernetes API server");
                return Ok(ApiServerStatus::Connected {
                    git_version: info.git_version,
                });
            }
            Err(e) => e,
        };
        if required && is_permanent(&err) {
            return Err(K8sError::ApiServerRefused {
                needed_by: needed_by.join(", "),
                source: err,
            });
        }
        tracing::debug!(error = %err, "Kubernetes API server not reachable yet");
        let out_of_budget = budget.is_some_and(|b| started.elapsed() + poll > b);
        if out_of_budget {
            if required {
                return Err(K8sError::Request {
                    op: "reach API server needed by",
                    object: needed_by.join(", "),
                    source: err,
                });
            }
            tracing::warn!(
                error = %err,
                waited = ?started.elapsed(),
                "running without the Kubernetes API server: no enabled feature needs it \
                 (custom networking, ANNOTATE_POD_IP and ENABLE_POD_ENI are off); \
                 max pods comes from the instance limits and no events are recorded until it answers"
            );
            return Ok(ApiServerStatus::Unavailable);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Polls `GET /version` every `poll` until the API server answers; returns its `gitVersion`.
/// For the background reconnection after [`ApiServerStatus::Unavailable`].
pub async fn wait_for_api_server(client: &Client, poll: Duration) -> String {
    loop {
        match client.apiserver_version().await {
            Ok(info) => {
                tracing::info!(version = %info.git_version, "Kubernetes API server reachable again");
                return info.git_version;
            }
            Err(e) => tracing::debug!(error = %e, "Kubernetes API server still unreachable"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// Builds a client from a configuration. Installs the aws-lc-rs TLS provider as the process
/// default first (unless one is installed): with both of rustls's providers compiled into the
/// binary, as the AWS SDK and kube bring them, rustls would otherwise refuse to pick one.
pub fn client_from_config(config: kube::Config) -> Result<Client, K8sError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    Client::try_from(config).map_err(K8sError::Config)
}

/// Builds a client from the in-cluster service account (or a kubeconfig), with
/// `CLUSTER_ENDPOINT` overriding the API server URL when given.
pub async fn client_from_env(cluster_endpoint: Option<&str>) -> Result<Client, K8sError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| K8sError::Config(kube::Error::InferConfig(e)))?;
    if let Some(endpoint) = cluster_endpoint.filter(|e| !e.is_empty()) {
        config.cluster_url = endpoint.parse().map_err(|e: http::uri::InvalidUri| {
            K8sError::Config(kube::Error::HttpError(http::Error::from(e)))
        })?;
    }
    client_from_config(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn node(
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        taints: &[(&str, &str)],
        pods: Option<&str>,
    ) -> Node {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        Node {
            metadata: ObjectMeta {
                name: Some("n1".to_owned()),
                labels: map(labels),
                annotations: map(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|(k, e)| Taint {
                            key: (*k).to_owned(),
                            effect: (*e).to_owned(),
                            ..Taint::default()
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            status: pods.map(|p| NodeStatus {
                capacity: Some(BTreeMap::from([(
                    "pods".to_owned(),
                    Quantity(p.to_owned()),
                )])),
                ..NodeStatus::default()
            }),
        }
    }

    const K: &str = DEFAULT_ENI_CONFIG_KEY;

    #[test]
    fn eni_config_resolution_follows_the_reference_order() {
        let zone = "topology.kubernetes.io/zone";
        let all = node(
            &[
                (EXTERNAL_ENI_CONFIG_LABEL, "ext"),
                (K, "label"),
                (zone, "az1"),
            ],
            &[(K, "annot")],
            &[],
            None,
        );
        assert_eq!(eni_config_name_of(&all, K, K), "ext");
        let no_ext = node(&[(K, "label")], &[(K, "annot")], &[], None);
        assert_eq!(eni_config_name_of(&no_ext, K, K), "annot");
        let label_only = node(&[(K, "label")], &[], &[], None);
        assert_eq!(eni_config_name_of(&label_only, K, K), "label");
        let zoned = node(&[(zone, "us-west-2a")], &[], &[], None);
        assert_eq!(eni_config_name_of(&zoned, K, zone), "us-west-2a");
        assert_eq!(eni_config_name_of(&zoned, K, K), "default");
        let custom_annot = node(&[], &[("example.com/eni", "c")], &[], None);
        assert_eq!(eni_config_name_of(&custom_annot, "example.com/eni", K), "c");
        let empty = node(&[(EXTERNAL_ENI_CONFIG_LABEL, "")], &[(K, "")], &[], None);
        assert_eq!(eni_config_name_of(&empty, K, K), "default");
    }

    #[test]
    fn node_info_reads_max_pods_and_only_the_noschedule_cordon_taint() {
        let cordoned = node(
            &[],
            &[],
            &[(UNSCHEDULABLE_TAINT_KEY, "NoSchedule")],
            Some("29"),
        );
        assert_eq!(
            node_info_of(&cordoned, K, K),
            NodeInfo {
                max_pods: Some(29),
                eni_config: "default".to_owned(),
                unschedulable: true
            }
        );
        let other = node(
            &[],
            &[],
            &[
                (UNSCHEDULABLE_TAINT_KEY, "NoExecute"),
                ("node.kubernetes.io/not-ready", "NoSchedule"),
            ],
            None,
        );
        let info = node_info_of(&other, K, K);
        assert!(!info.unschedulable);
        assert_eq!(info.max_pods, None);
    }

    #[test]
    fn rbac_need_classifies_like_the_authorizer() {
        let r = |verb: &str, group: &str, resource: &str| RbacNeed::Resource {
            verb: verb.to_owned(),
            group: group.to_owned(),
            resource: resource.to_owned(),
        };
        assert_eq!(
            rbac_need("GET", "/api/v1/nodes/n1", None),
            r("get", "", "nodes")
        );
        assert_eq!(
            rbac_need("GET", "/api/v1/nodes", None),
            r("list", "", "nodes")
        );
        assert_eq!(
            rbac_need("GET", "/api/v1/pods", Some("watch=true&fieldSelector=x")),
            r("watch", "", "pods")
        );
        assert_eq!(
            rbac_need("PATCH", "/api/v1/namespaces/default/pods/p", None),
            r("patch", "", "pods")
        );
        assert_eq!(
            rbac_need(
                "POST",
                "/apis/events.k8s.io/v1/namespaces/kube-system/events",
                None
            ),
            r("create", "events.k8s.io", "events")
        );
        assert_eq!(
            rbac_need(
                "GET",
                "/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs/default",
                None
            ),
            r("get", "crd.k8s.amazonaws.com", "eniconfigs")
        );
        assert_eq!(
            rbac_need("PATCH", "/api/v1/namespaces/ns/pods/p/status", None),
            r("patch", "", "pods/status")
        );
        assert_eq!(
            rbac_need("GET", "/api/v1/namespaces", None),
            r("list", "", "namespaces")
        );
        assert_eq!(
            rbac_need("GET", "/version", None),
            RbacNeed::NonResource {
                verb: "get".to_owned(),
                path: "/version".to_owned()
            }
        );
    }

    #[test]
    fn cluster_role_rules_group_verbs_and_drop_unused_features() {
        let all = serde_json::to_value(cluster_role_rules(|_| true)).expect("json");
        assert_eq!(
            all,
            serde_json::json!([
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
                {"apiGroups": ["crd.k8s.amazonaws.com"], "resources": ["eniconfigs"], "verbs": ["get"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
                {"apiGroups": ["vpcresources.k8s.aws"], "resources": ["cninodes"], "verbs": ["get", "patch"]},
            ])
        );
        let minimal = serde_json::to_value(cluster_role_rules(|_| false)).expect("json");
        assert_eq!(
            minimal,
            serde_json::json!([
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
            ])
        );
    }

    #[test]
    fn published_request_set_is_sorted_and_unique() {
        let mut sorted = API_REQUESTS.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, API_REQUESTS);
    }

    #[test]
    fn crd_matches_the_reference_definition() {
        let crd = serde_json::to_value(eni_config_crd()).expect("json");
        assert_eq!(crd["metadata"]["name"], "eniconfigs.crd.k8s.amazonaws.com");
        assert_eq!(crd["spec"]["group"], "crd.k8s.amazonaws.com");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["preserveUnknownFields"], false);
        assert_eq!(crd["spec"]["names"]["kind"], "ENIConfig");
        assert_eq!(crd["spec"]["names"]["plural"], "eniconfigs");
        assert_eq!(crd["spec"]["names"]["singular"], "eniconfig");
        let versions = crd["spec"]["versions"].as_array().expect("versions");
        assert_eq!(versions.len(), 1);
        let v = &versions[0];
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(v["served"], true);
        assert_eq!(v["storage"], true);
        let schema = &v["schema"]["openAPIV3Schema"];
        assert_eq!(schema["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(schema["properties"]["status"]["type"], "object");
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["subnet"]));
        assert_eq!(spec["properties"]["subnet"]["type"], "string");
        assert_eq!(spec["properties"]["securityGroups"]["type"], "array");
        assert_eq!(
            spec["properties"]["securityGroups"]["items"]["type"],
            "string"
        );
        assert!(spec["properties"]["securityGroups"]
            .get("nullable")
            .is_none());
        let yaml = eni_config_crd_yaml().expect("yaml");
        assert!(yaml.contains("kind: CustomResourceDefinition"));
        let back: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml parses");
        assert_eq!(back, crd);
    }

    #[test]
    fn eni_config_spec_security_groups_are_optional() {
        let s: EniConfigSpec = serde_json::from_str(r#"{"subnet":"subnet-1"}"#).expect("parse");
        assert_eq!(s.security_groups, None);
        let s: EniConfigSpec =
            serde_json::from_str(r#"{"subnet":"subnet-1","securityGroups":["sg-1"]}"#)
                .expect("parse");
        assert_eq!(s.security_groups, Some(vec!["sg-1".to_owned()]));
        assert!(serde_json::from_str::<EniConfigSpec>(r#"{"securityGroups":[]}"#).is_err());
    }

    #[tokio::test]
    async fn an_https_client_builds_whatever_tls_providers_are_compiled_in() {
        let config = kube::Config::new("https://127.0.0.1:6443".parse().expect("uri"));
        let client = client_from_config(config).expect("client");
        assert_eq!(client.default_namespace(), "default");
    }

    const BRANCH: &str = r#"[{"eniId":"eni-0b1","ifAddress":"0A:00:00:00:00:01","privateIp":"10.0.1.5","ipv6Addr":"","vlanId":3,"subnetCidr":"10.0.1.0/24","subnetV6Cidr":"","associationID":"trunk-assoc-1"}]"#;

    #[test]
    fn the_pod_eni_annotation_takes_both_vlan_spellings_and_names_a_bad_field() {
        let b = pod_branch(BRANCH).expect("controller's spelling");
        assert_eq!(
            b,
            PodBranch {
                ip: "10.0.1.5".parse().unwrap(),
                mac: "0a:00:00:00:00:01".into(),
                vlan_id: 3,
                subnet: "10.0.1.0/24".parse().unwrap(),
            }
        );
        let cni_spelling = BRANCH.replace("vlanId", "vlanID");
        assert_eq!(pod_branch(&cni_spelling).expect("CNI's spelling"), b);
        let cases = [
            (BRANCH.replace("10.0.1.5", ""), "[0].privateIp"),
            (BRANCH.replace("0A:00:00:00:00:01", ""), "[0].ifAddress"),
            (BRANCH.replace("\"vlanId\":3", "\"vlanId\":0"), "[0].vlanID"),
            (BRANCH.replace("10.0.1.0/24", "10.0.1.0"), "[0].subnetCidr"),
            (
                BRANCH.replace("\"vlanId\":3", "\"vlanId\":\"x\""),
                "[0].vlanId",
            ),
            ("[]".to_owned(), "empty list"),
            ("{}".to_owned(), POD_ENI_ANNOTATION),
        ];
        for (value, field) in cases {
            let err = pod_branch(&value).expect_err(&value);
            assert!(err.contains(field), "{value}: {err}");
            assert!(err.starts_with(POD_ENI_ANNOTATION), "{err}");
        }
    }

    #[test]
    fn a_pod_wants_a_branch_only_through_its_first_containers_limits() {
        let pod = |limits: &[&str], first: bool| -> Pod {
            let c = serde_json::json!({
                "name": "c", "image": "i",
                "resources": {"limits": limits.iter().map(|k| (k.to_string(), serde_json::json!("1"))).collect::<serde_json::Map<_, _>>()}
            });
            let plain = serde_json::json!({"name": "p", "image": "i"});
            let containers = if first {
                vec![c, plain]
            } else {
                vec![plain, c]
            };
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"}, "spec": {"containers": containers}
            }))
            .unwrap()
        };
        assert!(pod_wants_branch(&pod(&["vpc.amazonaws.com/pod-eni"], true)));
        assert!(!pod_wants_branch(&pod(
            &["vpc.amazonaws.com/pod-eni"],
            false
        )));
        assert!(!pod_wants_branch(&pod(&["cpu"], true)));
    }

    #[test]
    fn a_cni_node_feature_is_added_once_and_replaces_a_stale_value() {
        let f = |n: &str, v: &str| CniNodeFeature {
            name: n.into(),
            value: v.into(),
        };
        assert_eq!(
            features_with(&[f("CustomNetworking", "a")], FEATURE_SGP, ""),
            Some(vec![f("CustomNetworking", "a"), f(FEATURE_SGP, "")])
        );
        assert_eq!(features_with(&[f(FEATURE_SGP, "")], FEATURE_SGP, ""), None);
        assert_eq!(
            features_with(
                &[f(FEATURE_SGP, "x"), f("CustomNetworking", "a")],
                FEATURE_SGP,
                ""
            ),
            Some(vec![f("CustomNetworking", "a"), f(FEATURE_SGP, "")])
        );
    }

    #[test]
    fn api_server_is_needed_only_by_the_three_features() {
        assert!(api_server_needed_by(false, false, false).is_empty());
        assert_eq!(
            api_server_needed_by(true, false, true),
            vec!["AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "ENABLE_POD_ENI"]
        );
        assert_eq!(
            api_server_needed_by(false, true, false),
            vec!["ANNOTATE_POD_IP"]
        );
    }
}
