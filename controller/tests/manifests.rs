//! The controller's manifests checked against the code they deploy: the two CRDs are the
//! generated definitions, the ClusterRole is exactly the rules generated from the published
//! request set, the binding and the Deployment point at the right names and binary.
//!
//! `UPDATE_MANIFESTS=1 cargo test -p vpc-cni-controller --test manifests` rewrites the
//! generated CRD files instead of failing on a difference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn yaml(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(name)).expect("read manifest");
    serde_yaml::from_str(&text).expect("YAML")
}

fn generated(name: &str, header: &str, text: String) {
    let path = dir().join(name);
    let full = format!("{header}{text}");
    if std::env::var_os("UPDATE_MANIFESTS").is_some() {
        std::fs::write(&path, &full).expect("write");
    }
    let on_disk: Value = yaml(name);
    let want: Value = serde_yaml::from_str(&text).expect("generated YAML");
    assert_eq!(
        on_disk, want,
        "manifests/{name} differs from the generated CRD; regenerate with UPDATE_MANIFESTS=1"
    );
}

#[test]
fn crds_are_the_generated_definitions() {
    generated(
        "securitygrouppolicy-crd.yaml",
        "# Generated from vpc_cni_controller::policy::crd() (the reference's SecurityGroupPolicy).\n",
        vpc_cni_controller::policy::crd_yaml().expect("yaml"),
    );
    generated(
        "cninode-crd.yaml",
        "# Generated from vpc_cni_controller::k8s::cni_node_crd() (the reference's CNINode).\n",
        vpc_cni_controller::k8s::cni_node_crd_yaml().expect("yaml"),
    );
}

#[test]
fn cluster_role_is_exactly_the_generated_rules() {
    let role = yaml("controller-clusterrole.yaml");
    assert_eq!(role["kind"], "ClusterRole");
    assert_eq!(role["metadata"]["name"], "vpc-resource-controller");
    let rules = serde_json::to_value(vpc_cni_controller::k8s::cluster_role_rules()).expect("json");
    assert_eq!(role["rules"], rules);
    let binding = yaml("controller-clusterrolebinding.yaml");
    assert_eq!(binding["roleRef"]["name"], "vpc-resource-controller");
    assert_eq!(binding["subjects"][0]["name"], "vpc-resource-controller");
    assert_eq!(binding["subjects"][0]["namespace"], "kube-system");
    let sa = yaml("controller-serviceaccount.yaml");
    assert_eq!(sa["metadata"]["name"], "vpc-resource-controller");
    assert_eq!(sa["metadata"]["namespace"], "kube-system");
}

#[test]
fn deployment_runs_one_controller_with_its_settings() {
    let d = yaml("controller-deployment.yaml");
    assert_eq!(d["kind"], "Deployment");
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "vpc-resource-controller");
    assert!(pod.get("hostNetwork").is_none());
    let c = &pod["containers"][0];
    assert_eq!(c["command"][0], "/app/vpc-resource-controller");
    assert_eq!(c["image"], "vpc-cni-rs:0.1.0");
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    let env: Vec<&str> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    for needed in ["CLUSTER_NAME", "AWS_REGION"] {
        assert!(env.contains(&needed), "{needed} in {env:?}");
    }
    let k = yaml("kustomization.yaml");
    let listed: Vec<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|v| v.as_str().expect("str"))
        .collect();
    for f in [
        "securitygrouppolicy-crd.yaml",
        "cninode-crd.yaml",
        "controller-serviceaccount.yaml",
        "controller-clusterrole.yaml",
        "controller-clusterrolebinding.yaml",
        "controller-deployment.yaml",
    ] {
        assert!(listed.contains(&f), "{f} in the kustomization");
    }
}
