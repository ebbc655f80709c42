//! The `SecurityGroupPolicy` custom resource (`vpcresources.k8s.aws/v1beta1`, namespaced,
//! short name `sgp`) as the reference defines it, its CustomResourceDefinition, and how a
//! policy selects pods: by the pod's labels (`podSelector`), by its service account's labels
//! (`serviceAccountSelector`), or both (then both must match).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceSubresources,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of a `SecurityGroupPolicy`: which pods of its namespace get a branch ENI, and with
/// which security groups.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vpcresources.k8s.aws",
    version = "v1beta1",
    kind = "SecurityGroupPolicy",
    plural = "securitygrouppolicies",
    singular = "securitygrouppolicy",
    shortname = "sgp",
    namespaced,
    doc = "Custom Resource Definition for applying security groups to pods"
)]
pub struct SecurityGroupPolicySpec {
    /// Pods whose labels match (an empty selector matches every pod of the namespace).
    #[serde(
        default,
        rename = "podSelector",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "label_selector_schema")]
    pub pod_selector: Option<LabelSelector>,
    /// Pods whose service account's labels match.
    #[serde(
        default,
        rename = "serviceAccountSelector",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "label_selector_schema")]
    pub service_account_selector: Option<LabelSelector>,
    /// The security groups of the selected pods' branch ENIs.
    #[serde(default, rename = "securityGroups")]
    pub security_groups: GroupIds,
}

/// The schema of a `metav1.LabelSelector` as the reference CRD carries it.
fn label_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A label selector is a label query over a set of resources. The result of matchLabels and matchExpressions are ANDed. An empty label selector matches all objects. A null label selector matches no objects.",
        "type": "object",
        "properties": {
            "matchExpressions": {
                "description": "matchExpressions is a list of label selector requirements. The requirements are ANDed.",
                "type": "array",
                "items": {
                    "description": "A label selector requirement is a selector that contains values, a key, and an operator that relates the key and values.",
                    "type": "object",
                    "properties": {
                        "key": {"description": "key is the label key that the selector applies to.", "type": "string"},
                        "operator": {"description": "operator represents a key's relationship to a set of values. Valid operators are In, NotIn, Exists and DoesNotExist.", "type": "string"},
                        "values": {"description": "values is an array of string values. If the operator is In or NotIn, the values array must be non-empty. If the operator is Exists or DoesNotExist, the values array must be empty.", "type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "atomic"}
                    },
                    "required": ["key", "operator"]
                },
                "x-kubernetes-list-type": "atomic"
            },
            "matchLabels": {
                "description": "matchLabels is a map of {key,value} pairs, each equivalent to an element of matchExpressions with operator In and that single value. The requirements are ANDed.",
                "type": "object",
                "additionalProperties": {"type": "string"}
            }
        },
        "x-kubernetes-map-type": "atomic"
    })
}

/// `spec.securityGroups`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct GroupIds {
    /// Security group ids (`sg-…`) applied to the branch ENI of every selected pod.
    #[serde(default, rename = "groupIds", skip_serializing_if = "Vec::is_empty")]
    pub group_ids: Vec<String>,
}

/// The CustomResourceDefinition as the reference ships it
/// (`securitygrouppolicies.vpcresources.k8s.aws`): namespaced, `v1beta1` served and stored,
/// short name `sgp`, the `Security-Group-Ids` printer column, `groupIds` with at least one
/// item, no status subresource.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = SecurityGroupPolicy::crd();
    for version in &mut crd.spec.versions {
        version.additional_printer_columns = Some(vec![CustomResourceColumnDefinition {
            name: "Security-Group-Ids".to_owned(),
            type_: "string".to_owned(),
            json_path: ".spec.securityGroups.groupIds".to_owned(),
            description: Some(
                "The security group IDs to apply to the elastic network interface of pods that match this policy"
                    .to_owned(),
            ),
            ..CustomResourceColumnDefinition::default()
        }]);
        version.subresources = Some(CustomResourceSubresources::default());
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let groups = schema
            .properties
            .as_mut()
            .and_then(|p| p.get_mut("spec"))
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("securityGroups"))
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("groupIds"));
        if let Some(groups) = groups {
            groups.min_items = Some(1);
        }
    }
    crd
}

/// [`crd`] as a YAML document, for `manifests/securitygrouppolicy-crd.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}

/// A label selector that cannot be evaluated; `field` is its path in the policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct SelectorError {
    /// Path of the offending field, e.g. `spec.podSelector.matchExpressions[0].operator`.
    pub field: String,
    /// What is wrong.
    pub why: String,
}

/// Whether `selector` (at path `field`, for errors) matches `labels`, with Kubernetes'
/// semantics: `matchLabels` and every `matchExpressions` requirement ANDed; an empty selector
/// matches everything. Operators `In`, `NotIn`, `Exists`, `DoesNotExist`; `In`/`NotIn` need
/// values, `Exists`/`DoesNotExist` must have none.
pub fn selector_matches(
    selector: &LabelSelector,
    field: &str,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let mut matched = true;
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            matched = false;
        }
    }
    for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
        let here = format!("{field}.matchExpressions[{i}]");
        if !requirement_matches(req, &here, labels)? {
            matched = false;
        }
    }
    Ok(matched)
}

fn requirement_matches(
    req: &LabelSelectorRequirement,
    field: &str,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let values = req.values.as_deref().unwrap_or_default();
    let value = labels.get(&req.key);
    let need_values = |yes: bool| -> Result<(), SelectorError> {
        if yes == values.is_empty() {
            return Err(SelectorError {
                field: format!("{field}.values"),
                why: if yes {
                    format!("operator {} needs at least one value", req.operator)
                } else {
                    format!("operator {} takes no values", req.operator)
                },
            });
        }
        Ok(())
    };
    match req.operator.as_str() {
        "In" => {
            need_values(true)?;
            Ok(value.is_some_and(|v| values.contains(v)))
        }
        "NotIn" => {
            need_values(true)?;
            Ok(!value.is_some_and(|v| values.contains(v)))
        }
        "Exists" => {
            need_values(false)?;
            Ok(value.is_some())
        }
        "DoesNotExist" => {
            need_values(false)?;
            Ok(value.is_none())
        }
        other => Err(SelectorError {
            field: format!("{field}.operator"),
            why: format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
        }),
    }
}

/// Why a policy selects nothing at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Neither selector is set (the reference ignores such a policy).
    #[error("spec: neither podSelector nor serviceAccountSelector is set")]
    NoSelector,
    /// `spec.securityGroups.groupIds` is empty.
    #[error("spec.securityGroups.groupIds: no security group")]
    NoGroups,
    /// A group id is not `sg-` and hexadecimal digits.
    #[error(
        "spec.securityGroups.groupIds[{index}]: {value:?} is not a security group id (sg-<hex>)"
    )]
    BadGroup {
        /// Position in the list.
        index: usize,
        /// The value (at most 64 characters).
        value: String,
    },
    /// A selector cannot be evaluated.
    #[error(transparent)]
    Selector(#[from] SelectorError),
}

/// Whether `id` is a security group id: `sg-` and 1 to 32 hexadecimal digits.
pub fn is_security_group_id(id: &str) -> bool {
    id.strip_prefix("sg-").is_some_and(|hex| {
        !hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// Checks a policy's spec as the reference filters policies (a selector and at least one
/// group), plus that every group is a security group id.
pub fn check(spec: &SecurityGroupPolicySpec) -> Result<(), PolicyError> {
    if spec.pod_selector.is_none() && spec.service_account_selector.is_none() {
        return Err(PolicyError::NoSelector);
    }
    if spec.security_groups.group_ids.is_empty() {
        return Err(PolicyError::NoGroups);
    }
    for (index, g) in spec.security_groups.group_ids.iter().enumerate() {
        if !is_security_group_id(g) {
            return Err(PolicyError::BadGroup {
                index,
                value: g.chars().take(64).collect(),
            });
        }
    }
    Ok(())
}

/// Whether the policy selects a pod with `pod_labels` running as a service account with
/// `sa_labels` (`None`: the service account does not exist, so a service account selector
/// cannot match). Both set selectors must match, as in the reference.
pub fn selects(
    spec: &SecurityGroupPolicySpec,
    pod_labels: &BTreeMap<String, String>,
    sa_labels: Option<&BTreeMap<String, String>>,
) -> Result<bool, PolicyError> {
    check(spec)?;
    if let Some(sel) = &spec.pod_selector {
        if !selector_matches(sel, "spec.podSelector", pod_labels)? {
            return Ok(false);
        }
    }
    if let Some(sel) = &spec.service_account_selector {
        let Some(sa) = sa_labels else {
            return Ok(false);
        };
        if !selector_matches(sel, "spec.serviceAccountSelector", sa)? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn spec(v: serde_json::Value) -> SecurityGroupPolicySpec {
        serde_json::from_value(v).expect("spec")
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let l = labels(&[("app", "db"), ("tier", "back")]);
        let sel: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "db"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["back", "mid"]},
                {"key": "env", "operator": "DoesNotExist"},
                {"key": "app", "operator": "Exists"},
                {"key": "zone", "operator": "NotIn", "values": ["a"]}
            ]
        }))
        .expect("selector");
        assert_eq!(selector_matches(&sel, "s", &l), Ok(true));
        let l2 = labels(&[("app", "db"), ("tier", "front")]);
        assert_eq!(selector_matches(&sel, "s", &l2), Ok(false));
        let l3 = labels(&[("app", "web"), ("tier", "back")]);
        assert_eq!(selector_matches(&sel, "s", &l3), Ok(false));
        assert_eq!(
            selector_matches(&LabelSelector::default(), "s", &BTreeMap::new()),
            Ok(true)
        );
        let bad: LabelSelector = serde_json::from_value(json!({
            "matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Like"}]
        }))
        .expect("selector");
        let err = selector_matches(&bad, "spec.podSelector", &l).expect_err("bad operator");
        assert_eq!(err.field, "spec.podSelector.matchExpressions[1].operator");
        let no_values: LabelSelector = serde_json::from_value(json!({
            "matchExpressions": [{"key": "a", "operator": "In", "values": []}]
        }))
        .expect("selector");
        let err = selector_matches(&no_values, "x", &l).expect_err("no values");
        assert_eq!(err.field, "x.matchExpressions[0].values");
    }

    #[test]
    fn a_policy_needs_a_selector_and_groups_and_ands_its_selectors() {
        let pod = labels(&[("app", "db")]);
        let sa = labels(&[("role", "pci")]);
        let both = spec(json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "serviceAccountSelector": {"matchLabels": {"role": "pci"}},
            "securityGroups": {"groupIds": ["sg-0a1b"]}
        }));
        assert_eq!(selects(&both, &pod, Some(&sa)), Ok(true));
        assert_eq!(selects(&both, &pod, Some(&BTreeMap::new())), Ok(false));
        assert_eq!(selects(&both, &pod, None), Ok(false));
        assert_eq!(selects(&both, &BTreeMap::new(), Some(&sa)), Ok(false));
        let sa_only = spec(json!({
            "serviceAccountSelector": {"matchLabels": {"role": "pci"}},
            "securityGroups": {"groupIds": ["sg-0a1b"]}
        }));
        assert_eq!(selects(&sa_only, &BTreeMap::new(), Some(&sa)), Ok(true));
        let none = spec(json!({"securityGroups": {"groupIds": ["sg-1"]}}));
        assert_eq!(
            selects(&none, &pod, Some(&sa)),
            Err(PolicyError::NoSelector)
        );
        let empty = spec(json!({"podSelector": {}, "securityGroups": {"groupIds": []}}));
        assert_eq!(selects(&empty, &pod, None), Err(PolicyError::NoGroups));
        let bad =
            spec(json!({"podSelector": {}, "securityGroups": {"groupIds": ["sg-1", "default"]}}));
        let err = selects(&bad, &pod, None).expect_err("bad group");
        assert_eq!(
            err.to_string(),
            "spec.securityGroups.groupIds[1]: \"default\" is not a security group id (sg-<hex>)"
        );
    }

    #[test]
    fn crd_matches_the_reference_definition() {
        let crd = serde_json::to_value(crd()).expect("json");
        assert_eq!(
            crd["metadata"]["name"],
            "securitygrouppolicies.vpcresources.k8s.aws"
        );
        assert_eq!(crd["spec"]["group"], "vpcresources.k8s.aws");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], "SecurityGroupPolicy");
        assert_eq!(crd["spec"]["names"]["plural"], "securitygrouppolicies");
        assert_eq!(crd["spec"]["names"]["singular"], "securitygrouppolicy");
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["sgp"]));
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1beta1");
        assert_eq!(v["served"], true);
        assert_eq!(v["storage"], true);
        assert_eq!(v["subresources"], json!({}));
        assert_eq!(
            v["additionalPrinterColumns"][0]["jsonPath"],
            ".spec.securityGroups.groupIds"
        );
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let groups = &spec["securityGroups"]["properties"]["groupIds"];
        assert_eq!(groups["type"], "array");
        assert_eq!(groups["minItems"], 1);
        assert_eq!(groups["items"]["type"], "string");
        for sel in ["podSelector", "serviceAccountSelector"] {
            let p = &spec[sel]["properties"];
            assert_eq!(p["matchLabels"]["type"], "object", "{sel}");
            assert_eq!(p["matchExpressions"]["type"], "array", "{sel}");
            assert_eq!(
                p["matchExpressions"]["items"]["required"],
                json!(["key", "operator"]),
                "{sel}"
            );
        }
        let yaml = crd_yaml().expect("yaml");
        let back: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml parses");
        assert_eq!(back, crd);
    }
}
