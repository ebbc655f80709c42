//! The deployment in `manifests/` checked against the code it deploys, so they cannot drift:
//! the ClusterRole is exactly the rules generated from ipamd's published request set, the CRD
//! is ipamd's generated definition, the Grafana dashboard has the panels the issue asks for
//! (that a live ipamd serves every metric it queries: `tests/metrics_live.rs`), the
//! ConfigMap's defaults are accepted by ipamd and the entrypoint and cover every setting ipamd
//! documents, every manifest validates against the Kubernetes schemas offline, and
//! `kubectl kustomize` renders the whole set.
//!
//! `UPDATE_MANIFESTS=1 cargo test -p vpc-cni-installer --test manifests` rewrites the generated
//! files (`eniconfig-crd.yaml`) instead of failing on a difference.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vpc_cni_installer::settings::Settings;

/// Kubernetes version whose schemas the manifests are validated against (the API the
/// `k8s-openapi` feature of the workspace targets).
const KUBERNETES_VERSION: &str = "1.33.0";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn yaml(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(name)).expect("read manifest");
    serde_yaml::from_str(&text).expect("YAML")
}

#[test]
fn cluster_role_is_exactly_the_rules_generated_from_ipamds_requests() {
    let role = yaml("clusterrole.yaml");
    assert_eq!(role["kind"], "ClusterRole");
    assert_eq!(role["metadata"]["name"], "aws-node");
    let generated =
        serde_json::to_value(ipamd::io::k8s::cluster_role_rules(|_| true)).expect("json");
    assert_eq!(role["rules"], generated);
    // No non-resource URLs: ipamd only GETs /version, which every client may read.
    assert_eq!(ipamd::io::k8s::NON_RESOURCE_URLS, ["/version"]);
    let binding = yaml("clusterrolebinding.yaml");
    assert_eq!(binding["roleRef"]["name"], "aws-node");
    assert_eq!(binding["subjects"][0]["name"], "aws-node");
    assert_eq!(binding["subjects"][0]["namespace"], "kube-system");
}

#[test]
fn eniconfig_crd_is_ipamds_generated_definition() {
    let path = dir().join("eniconfig-crd.yaml");
    let generated = ipamd::io::k8s::eni_config_crd_yaml().expect("yaml");
    if std::env::var_os("UPDATE_MANIFESTS").is_some() {
        let header = "# Generated from ipamd::io::k8s::eni_config_crd() (the reference chart's definition);\n\
                      # do not edit: UPDATE_MANIFESTS=1 cargo test -p vpc-cni-installer --test manifests\n";
        std::fs::write(&path, format!("{header}{generated}")).expect("write");
    }
    let on_disk: Value = yaml("eniconfig-crd.yaml");
    let expected: Value = serde_yaml::from_str(&generated).expect("yaml");
    assert_eq!(
        on_disk, expected,
        "manifests/eniconfig-crd.yaml differs from ipamd's CRD; regenerate with UPDATE_MANIFESTS=1"
    );
    assert_eq!(on_disk["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(
        on_disk["metadata"]["name"],
        "eniconfigs.crd.k8s.amazonaws.com"
    );
}

/// Metric names in a PromQL expression (identifiers starting with `awscni_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("awscni_") {
                out.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

fn dashboard_metrics(dash: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let panels = dash["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["definition"].as_str() {
            out.extend(metric_names(q));
        }
    }
    out
}

#[test]
fn the_dashboard_shows_every_panel_the_issue_asks_for() {
    // Whether a live ipamd serves every queried name: tests/metrics_live.rs.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("grafana-dashboard.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    let queried = dashboard_metrics(&dash);
    for needed in [
        "awscni_total_ip_addresses",
        "awscni_assigned_ip_addresses",
        "awscni_warm_ip_addresses",
        "awscni_cooldown_ip_addresses",
        "awscni_eni_allocated",
        "awscni_ec2_calls_total",
        "awscni_ec2_errors_total",
        "awscni_ec2_throttled_total",
        "awscni_ec2_call_duration_seconds_bucket",
        "awscni_pool_topup_duration_seconds_bucket",
        "awscni_ipamd_error_count",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.iter().any(|p| p["type"] == "table"));
    // Every panel has a title and at least one query.
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
    }
}

fn configmap_data() -> Vec<(String, String)> {
    let cm = yaml("configmap.yaml");
    cm["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_owned()))
        .collect()
}

#[test]
fn configmap_defaults_are_accepted_by_ipamd_and_the_entrypoint() {
    let data = configmap_data();
    let vars: Vec<(&str, &str)> = data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ipamd::config::Config::for_test(&vars).expect("ipamd accepts the ConfigMap's defaults");
    let s = Settings::for_test(&vars).expect("the entrypoint accepts the ConfigMap's defaults");
    assert_eq!(s.veth_prefix, "eni");
    assert_eq!(s.pod_mtu, 9001);
}

#[test]
fn configmap_lists_every_setting_ipamd_documents() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipamd/README.md"))
            .expect("ipamd README");
    let keys: BTreeSet<String> = configmap_data().into_iter().map(|(k, _)| k).collect();
    let mut documented = BTreeSet::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = line.split('|').nth(1).unwrap_or("");
        for (i, part) in first_cell.split('`').enumerate() {
            let name = part.trim();
            if i % 2 == 1
                && !name.is_empty()
                && !name.starts_with('_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.chars().any(|c| c.is_ascii_uppercase())
            {
                documented.insert(name.to_owned());
            }
        }
    }
    assert!(documented.len() > 30, "parsed {documented:?}");
    let missing: Vec<&String> = documented.difference(&keys).collect();
    assert!(missing.is_empty(), "not in configmap.yaml: {missing:?}");
}

#[test]
fn entrypoint_validation_agrees_with_ipamd() {
    let cases: &[(&str, &str)] = &[
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "eni"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "lo"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "vlan"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "abcd"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "abcde"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "a_-9"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "e.n"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "e n"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "e/"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "é"),
        ("AWS_VPC_ENI_MTU", "575"),
        ("AWS_VPC_ENI_MTU", "576"),
        ("AWS_VPC_ENI_MTU", "9001"),
        ("AWS_VPC_ENI_MTU", "9002"),
        ("AWS_VPC_ENI_MTU", "x"),
        ("IP_COOLDOWN_PERIOD", "0"),
        ("IP_COOLDOWN_PERIOD", "45"),
        ("IP_COOLDOWN_PERIOD", "-1"),
        ("IP_COOLDOWN_PERIOD", "abc"),
    ];
    for (var, value) in cases {
        let ours = Settings::for_test(&[(var, value)]).is_ok();
        let ipamd = ipamd::config::Config::for_test(&[(var, value)]).is_ok();
        assert_eq!(
            ours, ipamd,
            "{var}={value}: entrypoint {ours}, ipamd {ipamd}"
        );
    }
}

#[test]
fn daemonset_runs_the_installer_with_the_reference_wiring() {
    let ds = yaml("daemonset.yaml");
    assert_eq!(ds["metadata"]["name"], "aws-node");
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    assert_eq!(ds["spec"]["selector"]["matchLabels"]["k8s-app"], "aws-node");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "aws-node");
    let init = &pod["initContainers"][0];
    assert_eq!(init["command"][1], "init");
    let main = &pod["containers"][0];
    let cmd: Vec<&str> = main["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("str"))
        .collect();
    assert_eq!(&cmd[1..2], ["run"]);
    assert!(cmd.contains(&"--") && cmd.last() == Some(&"/app/ipamd"));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(main[probe]["exec"]["command"][1], "health", "{probe}");
        assert_eq!(main[probe]["timeoutSeconds"], 10);
    }
    assert_eq!(main["livenessProbe"]["initialDelaySeconds"], 60);
    assert_eq!(main["readinessProbe"]["initialDelaySeconds"], 1);
    assert_eq!(main["ports"][0]["containerPort"], 61678);
    assert_eq!(
        main["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    let cm = yaml("configmap.yaml");
    for c in [init, main] {
        assert_eq!(
            c["envFrom"][0]["configMapRef"]["name"],
            cm["metadata"]["name"]
        );
    }
    let mounts: BTreeSet<(String, String)> = main["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_owned(),
                m["mountPath"].as_str().expect("path").to_owned(),
            )
        })
        .collect();
    for (name, path) in [
        ("cni-bin-dir", "/host/opt/cni/bin"),
        ("cni-net-dir", "/host/etc/cni/net.d"),
        ("log-dir", "/host/var/log/aws-routed-eni"),
        ("run-dir", "/var/run/aws-node"),
        ("xtables-lock", "/run/xtables.lock"),
    ] {
        assert!(
            mounts.contains(&(name.to_owned(), path.to_owned())),
            "{name} at {path}"
        );
    }
    // The image carries no registry host: the kustomization's images transformer sets it.
    assert_eq!(main["image"], "vpc-cni-rs:0.1.0");
    assert_eq!(init["image"], "vpc-cni-rs:0.1.0");
}

/// A tool the CI machine installs (scripts/setup-machine.sh); elsewhere the test says it skips.
fn tool(name: &str) -> Option<Command> {
    let found = Command::new(name).arg("--help").output().is_ok();
    if !found {
        eprintln!("skipping: {name} is not installed (scripts/setup-machine.sh installs it)");
    }
    found.then(|| Command::new(name))
}

const OBJECT_MANIFESTS: &[&str] = &[
    "eniconfig-crd.yaml",
    "serviceaccount.yaml",
    "clusterrole.yaml",
    "clusterrolebinding.yaml",
    "configmap.yaml",
    "daemonset.yaml",
    // The cluster side of security groups for pods (controller/tests/manifests.rs checks
    // these against the controller's code).
    "securitygrouppolicy-crd.yaml",
    "cninode-crd.yaml",
    "controller-serviceaccount.yaml",
    "controller-clusterrole.yaml",
    "controller-clusterrolebinding.yaml",
    "controller-deployment.yaml",
];

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let kustomization = yaml("kustomization.yaml");
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|v| v.as_str().expect("str"))
        .collect();
    assert_eq!(listed, OBJECT_MANIFESTS);
    let Some(mut cmd) = tool("kubernetes-validate") else {
        return;
    };
    let out = cmd
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(OBJECT_MANIFESTS.iter().map(|f| dir().join(f)))
        .output()
        .expect("kubernetes-validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout.matches(" passed ").count() + stderr.matches(" passed ").count(),
        OBJECT_MANIFESTS.len(),
        "{stdout}{stderr}"
    );
}

#[test]
fn kustomize_renders_every_object_with_an_overridable_image() {
    let Some(mut cmd) = tool("kubectl") else {
        return;
    };
    let out = cmd
        .arg("kustomize")
        .arg(dir())
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut kinds = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("yaml document");
        kinds.insert(v["kind"].as_str().expect("kind").to_owned());
        if v["kind"] == "DaemonSet" {
            assert_eq!(
                v["spec"]["template"]["spec"]["containers"][0]["image"],
                "vpc-cni-rs:0.1.0"
            );
        }
    }
    let expected: BTreeSet<String> = [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(kinds, expected);

    // An overlay retargets both images with kustomize's images transformer (`bases`, not
    // `resources`, for a directory: Debian 12's kubectl 1.20 embeds kustomize 2).
    let tmp = tempfile::tempdir().expect("tmp");
    let (base, overlay) = (tmp.path().join("base"), tmp.path().join("overlay"));
    std::fs::create_dir(&base).expect("mkdir");
    std::fs::create_dir(&overlay).expect("mkdir");
    for entry in std::fs::read_dir(dir()).expect("manifests") {
        let path = entry.expect("entry").path();
        // Files only: `image/` (the Dockerfile) is not part of the kustomization.
        if path.is_file() {
            std::fs::copy(&path, base.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "bases:\n  - ../base\nimages:\n  - name: vpc-cni-rs\n    newName: mirror/vpc-cni-rs\n    newTag: 9.9.9\n",
    )
    .expect("write overlay");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .expect("kubectl kustomize overlay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // aws-node's two containers and the resource controller's one.
    assert_eq!(
        text.matches("image: mirror/vpc-cni-rs:9.9.9").count(),
        3,
        "{text}"
    );
    assert!(!text.contains("image: vpc-cni-rs:"));
}

/// Kubernetes versions EKS runs clusters on (standard and extended support) whose schemas
/// `kubernetes-validate` bundles (1.37.0 of the tool has 1.25 to 1.37). Update with EKS's
/// release calendar.
const EKS_VERSIONS: &[&str] = &[
    "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0",
];

#[test]
fn the_kustomized_manifests_validate_for_every_eks_version() {
    // What `kubectl apply -k manifests/` sends, whatever the kustomization lists.
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir())
        .output()
        .expect("kubectl (scripts/setup-machine.sh installs kubernetes-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let documents = serde_yaml::Deserializer::from_str(&text).count();
    assert!(documents >= OBJECT_MANIFESTS.len(), "{text}");
    let tmp = tempfile::tempdir().expect("tmp");
    let rendered = tmp.path().join("aws-node.yaml");
    std::fs::write(&rendered, &text).expect("write");
    for version in EKS_VERSIONS {
        let out = Command::new("kubernetes-validate")
            .args(["--kubernetes-version", version, "--strict"])
            .arg(&rendered)
            .output()
            .expect("kubernetes-validate (scripts/setup-machine.sh installs it)");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "Kubernetes {version}: {report}");
        assert_eq!(
            report.matches(" passed ").count(),
            documents,
            "Kubernetes {version}: every document validated: {report}"
        );
    }
}
