//! The Kubernetes side: lists of nodes, CNINodes, pods, SecurityGroupPolicies and service
//! accounts turned into a [`Cluster`], and the three writes the controller makes (create a
//! CNINode, label a node, annotate a pod). The `kube::Client` is used directly; tests drive a
//! real client over `tower_test::mock::pair()`. The requests this module makes are published
//! in [`API_REQUESTS`], which the controller's ClusterRole is checked against.
//!
//! Lists are read page by page (`limit`/`continue`) as raw JSON and each item is parsed on its
//! own, so one malformed object is reported (naming its field) and skipped instead of failing
//! the whole list.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResource, CustomResourceExt, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::{
    parse_pod_eni, pod_eni_value, BranchEni, Cluster, NodeObs, PodKey, PodObs, PolicyObs,
    FEATURE_SGP, HAS_TRUNK_LABEL, POD_ENI_ANNOTATION, TAG_INSTANCE_ID,
};
use crate::policy::SecurityGroupPolicy;
use crate::reconcile::Warning;

pub use ipamd::io::k8s::{rbac_need, ApiRequest, RbacNeed};

/// Tag key on the CNINode's `spec.tags` naming the cluster (the reference's).
pub const CNINODE_TAG_CLUSTER: &str = "cluster.k8s.amazonaws.com/name";
/// Page size of the lists.
pub const LIST_PAGE: u32 = 500;
/// Timeout of one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One feature of a CNINode.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Feature {
    /// `SecurityGroupsForPods` or `CustomNetworking`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The feature's value (the ENIConfig name for `CustomNetworking`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
}

/// Spec of a `CNINode` (`cninodes.vpcresources.k8s.aws/v1alpha1`, cluster-scoped, one per
/// node, same name), as the reference defines it.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "vpcresources.k8s.aws",
    version = "v1alpha1",
    kind = "CNINode",
    plural = "cninodes",
    singular = "cninode",
    shortname = "cnd",
    root = "CniNode",
    doc = "CNINode: the VPC features a node delegates to the VPC resource controller"
)]
pub struct CniNodeSpec {
    /// Features the node asks for (ipamd adds them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<Feature>,
    /// Tags added to every network interface made for the node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The CNINode CustomResourceDefinition (the reference's: cluster scope, `v1alpha1`, short
/// name `cnd`), for `manifests/cninode-crd.yaml`.
pub fn cni_node_crd() -> CustomResourceDefinition {
    CniNode::crd()
}

/// [`cni_node_crd`] as YAML.
pub fn cni_node_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&cni_node_crd())
}

/// Every resource request this module makes, sorted.
pub const API_REQUESTS: &[ApiRequest] = &[
    req("create", "", "events"),
    req("list", "", "nodes"),
    req("patch", "", "nodes"),
    req("list", "", "pods"),
    req("patch", "", "pods"),
    req("list", "", "serviceaccounts"),
    req("create", "vpcresources.k8s.aws", "cninodes"),
    req("list", "vpcresources.k8s.aws", "cninodes"),
    req("list", "vpcresources.k8s.aws", "securitygrouppolicies"),
];

const fn req(verb: &'static str, group: &'static str, resource: &'static str) -> ApiRequest {
    ApiRequest {
        verb,
        group,
        resource,
        only_with: None,
    }
}

/// The least-privilege ClusterRole rules for [`API_REQUESTS`]: one rule per (group,
/// resource) with its verbs.
pub fn cluster_role_rules() -> Vec<PolicyRule> {
    let mut by: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for r in API_REQUESTS {
        by.entry((r.group, r.resource))
            .or_default()
            .push(r.verb.to_owned());
    }
    by.into_iter()
        .map(|((g, r), verbs)| PolicyRule {
            api_groups: Some(vec![g.to_owned()]),
            resources: Some(vec![r.to_owned()]),
            verbs,
            ..PolicyRule::default()
        })
        .collect()
}

/// Errors of the Kubernetes layer.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// A request failed.
    #[error("{op} {object}")]
    Request {
        /// What was attempted.
        op: &'static str,
        /// The object.
        object: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// No answer in time.
    #[error("{op} {object}: no answer within {after:?}")]
    Timeout {
        /// What was attempted.
        op: &'static str,
        /// The object.
        object: String,
        /// The timeout.
        after: Duration,
    },
    /// A list answer that is not a list.
    #[error("list {kind}: {field}: {why}")]
    BadList {
        /// The kind listed.
        kind: &'static str,
        /// The field.
        field: String,
        /// What is wrong.
        why: String,
    },
}

impl K8sError {
    fn status(&self) -> Option<u16> {
        match self {
            K8sError::Request {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            _ => None,
        }
    }

    /// `404 Not Found`.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// `409 Conflict` (also `AlreadyExists`).
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}

async fn bounded<T>(
    op: &'static str,
    object: &str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, K8sError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(K8sError::Request {
            op,
            object: object.to_owned(),
            source,
        }),
        Err(_) => Err(K8sError::Timeout {
            op,
            object: object.to_owned(),
            after: REQUEST_TIMEOUT,
        }),
    }
}

/// The instance id of a `spec.providerID` (`aws:///<az>/i-…`, last path segment).
pub fn instance_id_of(provider_id: Option<&str>) -> Result<String, String> {
    let Some(p) = provider_id.filter(|p| !p.is_empty()) else {
        return Err("spec.providerID: not set (the node's instance is unknown)".to_owned());
    };
    let last = p.rsplit('/').next().unwrap_or("");
    let ok = last.strip_prefix("i-").is_some_and(|hex| {
        !hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if !p.starts_with("aws://") || !ok {
        let shown: String = p.chars().take(96).collect();
        return Err(format!(
            "spec.providerID: {shown:?} is not aws:///<zone>/i-<hex>"
        ));
    }
    Ok(last.to_owned())
}

/// The controller's Kubernetes client.
#[derive(Clone)]
pub struct Kube {
    client: Client,
    cluster: String,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Kube {
    /// A client for cluster `cluster` (the name written into CNINodes' tags).
    pub fn new(client: Client, cluster: &str) -> Kube {
        Kube {
            client,
            cluster: cluster.to_owned(),
        }
    }

    /// Lists every object of kind `K` page by page, parsing each item on its own: the items
    /// that parse, and a warning naming the field of each that does not. Callers name the
    /// type (`list_lenient::<Node>`): the RBAC source check reads it.
    async fn list_lenient<K>(
        &self,
        kind: &'static str,
        warnings: &mut Vec<Warning>,
    ) -> Result<Vec<K>, K8sError>
    where
        K: Resource<DynamicType = ()> + serde::de::DeserializeOwned,
    {
        let mut out = Vec::new();
        let mut cont: Option<String> = None;
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let mut lp = ListParams::default().limit(LIST_PAGE);
            if let Some(c) = &cont {
                lp = lp.continue_token(c);
            }
            let mut request = kube::core::Request::new(K::url_path(&(), None))
                .list(&lp)
                .map_err(|e| K8sError::Request {
                    op: "list",
                    object: kind.to_owned(),
                    source: kube::Error::BuildRequest(e),
                })?;
            request.extensions_mut().insert("list");
            let text = bounded("list", kind, self.client.request_text(request)).await?;
            #[derive(Deserialize)]
            struct Page {
                #[serde(default)]
                items: Vec<serde_json::Value>,
                #[serde(default)]
                metadata: PageMeta,
            }
            #[derive(Deserialize, Default)]
            struct PageMeta {
                #[serde(default, rename = "continue")]
                cont: Option<String>,
            }
            let mut de = serde_json::Deserializer::from_str(&text);
            let page: Page =
                serde_path_to_error::deserialize(&mut de).map_err(|e| K8sError::BadList {
                    kind,
                    field: e.path().to_string(),
                    why: e.into_inner().to_string().chars().take(256).collect(),
                })?;
            for item in page.items {
                let name = item
                    .pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .map(|ns| format!("{ns}/"))
                    .unwrap_or_default()
                    + item
                        .pointer("/metadata/name")
                        .and_then(|v| v.as_str())
                        .unwrap_or("?");
                match serde_path_to_error::deserialize::<_, K>(item) {
                    Ok(k) => out.push(k),
                    Err(e) => {
                        let path = e.path().to_string();
                        let msg: String = e.into_inner().to_string().chars().take(256).collect();
                        warnings.push(Warning {
                            object: format!("{kind} {name}"),
                            why: format!("{path}: {msg}"),
                        });
                    }
                }
            }
            match page.metadata.cont.filter(|c| !c.is_empty()) {
                Some(c) if seen.insert(c.clone()) => cont = Some(c),
                Some(c) => {
                    return Err(K8sError::BadList {
                        kind,
                        field: "metadata.continue".to_owned(),
                        why: format!("token {c:?} repeated"),
                    })
                }
                None => return Ok(out),
            }
        }
    }

    /// Lists everything the reconcile reads.
    pub async fn observe(&self) -> Result<(Cluster, Vec<Warning>), K8sError> {
        let mut warnings = Vec::new();
        let nodes = self.list_lenient::<Node>("Node", &mut warnings).await?;
        let cni_nodes = self
            .list_lenient::<CniNode>("CNINode", &mut warnings)
            .await?;
        let pods = self.list_lenient::<Pod>("Pod", &mut warnings).await?;
        let policies = self
            .list_lenient::<SecurityGroupPolicy>("SecurityGroupPolicy", &mut warnings)
            .await?;
        let accounts = self
            .list_lenient::<ServiceAccount>("ServiceAccount", &mut warnings)
            .await?;
        Ok((
            cluster_of(&nodes, &cni_nodes, &pods, &policies, &accounts),
            warnings,
        ))
    }

    /// Creates the node's CNINode (owned by the node, labelled with its OS, tagged with the
    /// cluster and instance). One that already exists is not an error.
    pub async fn create_cni_node(
        &self,
        node: &str,
        node_uid: &str,
        os: &str,
        instance_id: &str,
    ) -> Result<(), K8sError> {
        let api: Api<CniNode> = Api::all(self.client.clone());
        let mut obj = CniNode::new(
            node,
            CniNodeSpec {
                features: Vec::new(),
                tags: BTreeMap::from([
                    (CNINODE_TAG_CLUSTER.to_owned(), self.cluster.clone()),
                    (TAG_INSTANCE_ID.to_owned(), instance_id.to_owned()),
                ]),
            },
        );
        obj.metadata = ObjectMeta {
            name: Some(node.to_owned()),
            labels: (!os.is_empty())
                .then(|| BTreeMap::from([("kubernetes.io/os".to_owned(), os.to_owned())])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Node".to_owned(),
                name: node.to_owned(),
                uid: node_uid.to_owned(),
                controller: Some(true),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        };
        match bounded(
            "create CNINode",
            node,
            api.create(&PostParams::default(), &obj),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets `vpc.amazonaws.com/has-trunk-attached=true` on the node (merge patch).
    pub async fn label_trunk_attached(&self, node: &str) -> Result<(), K8sError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"labels": {HAS_TRUNK_LABEL: "true"}}});
        bounded(
            "label node",
            node,
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
    }

    /// Writes `vpc.amazonaws.com/pod-eni` on the pod (merge patch carrying the pod's uid, so a
    /// pod re-created under the same name is refused rather than annotated).
    pub async fn annotate_pod(
        &self,
        pod: &PodKey,
        uid: &str,
        branches: &[BranchEni],
    ) -> Result<(), K8sError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = serde_json::json!({
            "metadata": {
                "uid": uid,
                "annotations": {POD_ENI_ANNOTATION: pod_eni_value(branches)}
            }
        });
        bounded(
            "annotate pod",
            &pod.to_string(),
            api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
    }

    /// Posts a core/v1 Event (`type_` `Normal` or `Warning`) on an object.
    pub async fn event(
        &self,
        on: &Involved<'_>,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), K8sError> {
        let Involved {
            kind,
            namespace,
            name,
            uid,
        } = *on;
        use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
        let ns = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let now = k8s_openapi::jiff::Timestamp::now();
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.")),
                namespace: Some(ns.to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some(kind.to_owned()),
                name: Some(name.to_owned()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                uid: (!uid.is_empty()).then(|| uid.to_owned()),
                ..ObjectReference::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.chars().take(1024).collect()),
            type_: Some(type_.to_owned()),
            source: Some(EventSource {
                component: Some(crate::run::CONTROLLER_NAME.to_owned()),
                ..EventSource::default()
            }),
            first_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            last_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            count: Some(1),
            ..Event::default()
        };
        bounded(
            "create event",
            reason,
            api.create(&PostParams::default(), &ev),
        )
        .await
        .map(|_| ())
    }
}

/// The object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Involved<'a> {
    /// `Pod`, `Node`.
    pub kind: &'a str,
    /// Namespace (`""` for cluster-scoped objects; the event then goes to `default`).
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// Uid (`""` when unknown).
    pub uid: &'a str,
}

/// Turns the lists into the reconcile's [`Cluster`].
pub fn cluster_of(
    nodes: &[Node],
    cni_nodes: &[CniNode],
    pods: &[Pod],
    policies: &[SecurityGroupPolicy],
    accounts: &[ServiceAccount],
) -> Cluster {
    let cni: BTreeMap<&str, &CniNode> = cni_nodes
        .iter()
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c)))
        .collect();
    let nodes = nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let labels = n.metadata.labels.clone().unwrap_or_default();
            let cn = cni.get(name.as_str());
            let feature = cn.is_some_and(|c| c.spec.features.iter().any(|f| f.name == FEATURE_SGP));
            Some(NodeObs {
                uid: n.metadata.uid.clone().unwrap_or_default(),
                os: labels.get("kubernetes.io/os").cloned().unwrap_or_default(),
                instance_id: instance_id_of(n.spec.as_ref().and_then(|s| s.provider_id.as_deref())),
                wants_trunk: labels.contains_key(HAS_TRUNK_LABEL) || feature,
                labelled_attached: labels.get(HAS_TRUNK_LABEL).map(String::as_str) == Some("true"),
                has_cni_node: cn.is_some(),
                name,
            })
        })
        .collect();
    let pods = pods
        .iter()
        .filter_map(|p| {
            let spec = p.spec.as_ref();
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            Some(PodObs {
                key: PodKey {
                    namespace: p.metadata.namespace.clone()?,
                    name: p.metadata.name.clone()?,
                },
                uid: p.metadata.uid.clone()?,
                node: spec
                    .and_then(|s| s.node_name.clone())
                    .filter(|n| !n.is_empty()),
                labels: p.metadata.labels.clone().unwrap_or_default(),
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".to_owned()),
                host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
                terminal: matches!(phase, Some("Succeeded" | "Failed")),
                annotation: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(POD_ENI_ANNOTATION))
                    .map(|v| parse_pod_eni(v)),
            })
        })
        .collect();
    let policies = policies
        .iter()
        .filter_map(|p| {
            Some(PolicyObs {
                namespace: p.metadata.namespace.clone()?,
                name: p.metadata.name.clone()?,
                spec: p.spec.clone(),
            })
        })
        .collect();
    let service_accounts = accounts
        .iter()
        .filter_map(|a| {
            Some((
                (a.metadata.namespace.clone()?, a.metadata.name.clone()?),
                a.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect();
    Cluster {
        nodes,
        pods,
        policies,
        service_accounts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_give_instance_ids_or_say_why_not() {
        assert_eq!(
            instance_id_of(Some("aws:///us-west-2a/i-0123456789abcdef0")),
            Ok("i-0123456789abcdef0".to_owned())
        );
        assert!(instance_id_of(None)
            .expect_err("none")
            .starts_with("spec.providerID"));
        assert!(instance_id_of(Some("gce://p/z/n")).is_err());
        assert!(instance_id_of(Some("aws:///us-west-2a/i-../../x")).is_err());
    }

    #[test]
    fn published_requests_are_sorted_by_group_then_resource_and_unique() {
        let key = |r: &ApiRequest| (r.group, r.resource, r.verb);
        let mut sorted = API_REQUESTS.to_vec();
        sorted.sort_by_key(key);
        sorted.dedup();
        let listed: Vec<_> = API_REQUESTS.iter().map(key).collect();
        let want: Vec<_> = sorted.iter().map(key).collect();
        assert_eq!(listed, want);
    }

    #[test]
    fn cninode_crd_is_the_references() {
        let crd = serde_json::to_value(cni_node_crd()).expect("json");
        assert_eq!(crd["metadata"]["name"], "cninodes.vpcresources.k8s.aws");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["names"]["kind"], "CNINode");
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["cnd"])
        );
        assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["features"]["type"], "array");
        assert_eq!(spec["properties"]["tags"]["type"], "object");
    }
}
