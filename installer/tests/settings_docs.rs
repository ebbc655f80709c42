//! The settings documentation and the ConfigMap cannot drift from the code: every environment
//! variable `ipamd::config::Config::parse` and the entrypoint's `Settings::parse` read (recorded
//! by the lookup function they are given, so nothing is listed by hand) must be documented in
//! `docs/settings.md` and have a key in `manifests/configmap.yaml` (`MY_NODE_NAME` and
//! `MY_POD_NAME` come from the downward API: they must be in the DaemonSet's `env` instead).
//! And the other way round: every ConfigMap key is read by one of them, or by the init step.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).expect("read manifest");
    serde_yaml::from_str(&text).expect("YAML")
}

/// Names `parse` asks `lookup` for, with every variable unset (so every default path runs).
fn recorded(parse: impl FnOnce(&dyn Fn(&str) -> Option<String>)) -> BTreeSet<String> {
    let asked = RefCell::new(BTreeSet::new());
    let lookup = |name: &str| -> Option<String> {
        asked.borrow_mut().insert(name.to_owned());
        None
    };
    parse(&lookup);
    asked.into_inner()
}

fn ipamd_vars() -> BTreeSet<String> {
    let vars = recorded(|lookup| {
        ipamd::config::Config::parse(lookup, &ipamd::config::Flags::default())
            .expect("ipamd's defaults parse");
    });
    // Spot checks that the recording sees the whole parse, first to last variable.
    for v in [
        "ENABLE_IPv6",
        "WARM_IP_TARGET",
        "AWS_VPC_K8S_CNI_BACKING_STORE",
        "VPC_CNI_RECONCILE_INTERVAL",
    ] {
        assert!(vars.contains(v), "{v} not recorded: {vars:?}");
    }
    assert!(vars.len() > 60, "only {} variables recorded", vars.len());
    vars
}

fn entrypoint_vars() -> BTreeSet<String> {
    recorded(|lookup| {
        vpc_cni_installer::settings::Settings::parse(lookup)
            .expect("the entrypoint's defaults parse");
    })
}

/// Names written as `NAME` in docs/settings.md.
fn documented() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("docs/settings.md")).expect("docs/settings.md");
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            !w.is_empty()
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && w.chars().any(|c| c.is_ascii_uppercase())
        })
        .map(str::to_owned)
        .collect()
}

fn configmap_keys() -> BTreeSet<String> {
    yaml("manifests/configmap.yaml")["data"]
        .as_object()
        .expect("data")
        .keys()
        .cloned()
        .collect()
}

/// Downward-API variables set in the daemon container's `env` of the DaemonSet.
fn daemonset_env() -> BTreeSet<String> {
    let ds = yaml("manifests/daemonset.yaml");
    ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect()
}

const DOWNWARD_API: &[&str] = &["MY_NODE_NAME", "MY_POD_NAME"];

/// Read by `vpc-cni-install init` and `run` outside `Settings::parse` (installer/src/main.rs).
const INSTALLER_MAIN_VARS: &[&str] = &[
    "DISABLE_TCP_EARLY_DEMUX",
    "ENABLE_IPv6",
    "ENABLE_V6_EGRESS",
    "HOST_CNI_BIN_PATH",
    "IPAMD_GRPC_SOCKET",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
];

#[test]
fn every_variable_ipamd_reads_is_documented_and_in_the_configmap() {
    let docs = documented();
    let keys = configmap_keys();
    let env = daemonset_env();
    let mut undocumented = Vec::new();
    let mut unset = Vec::new();
    for v in ipamd_vars() {
        if !docs.contains(&v) {
            undocumented.push(v.clone());
        }
        let in_manifests = if DOWNWARD_API.contains(&v.as_str()) {
            env.contains(&v)
        } else {
            keys.contains(&v)
        };
        if !in_manifests {
            unset.push(v);
        }
    }
    assert!(
        undocumented.is_empty(),
        "read by ipamd, missing from docs/settings.md: {undocumented:?}"
    );
    assert!(
        unset.is_empty(),
        "read by ipamd, missing from manifests/configmap.yaml (or the DaemonSet env for {DOWNWARD_API:?}): {unset:?}"
    );
}

#[test]
fn every_variable_the_entrypoint_reads_is_documented_and_in_the_configmap() {
    let docs = documented();
    let keys = configmap_keys();
    let vars = entrypoint_vars();
    assert!(vars.contains("POD_MTU") && vars.contains("HOST_CNI_CONFDIR_PATH"));
    let installer_main = std::fs::read_to_string(repo().join("installer/src/main.rs"))
        .expect("installer/src/main.rs");
    for v in INSTALLER_MAIN_VARS {
        assert!(
            installer_main.contains(&format!("\"{v}\"")),
            "{v} is no longer read by installer/src/main.rs: update INSTALLER_MAIN_VARS"
        );
    }
    let all: BTreeSet<String> = vars
        .into_iter()
        .chain(INSTALLER_MAIN_VARS.iter().map(|v| (*v).to_owned()))
        .collect();
    let undocumented: Vec<&String> = all.iter().filter(|v| !docs.contains(*v)).collect();
    assert!(
        undocumented.is_empty(),
        "read by the installer, missing from docs/settings.md: {undocumented:?}"
    );
    let unset: Vec<&String> = all.iter().filter(|v| !keys.contains(*v)).collect();
    assert!(
        unset.is_empty(),
        "read by the installer, missing from manifests/configmap.yaml: {unset:?}"
    );
}

#[test]
fn every_configmap_key_is_read_by_ipamd_or_the_installer() {
    let read: BTreeSet<String> = ipamd_vars()
        .into_iter()
        .chain(entrypoint_vars())
        .chain(INSTALLER_MAIN_VARS.iter().map(|v| (*v).to_owned()))
        .collect();
    let unread: Vec<String> = configmap_keys().difference(&read).cloned().collect();
    assert!(
        unread.is_empty(),
        "manifests/configmap.yaml keys nothing reads: {unread:?}"
    );
}

/// Variable names of spec/ipamd.md section 1 (the reference's settings), when the spec is beside
/// the repository (`<repo>/../shared`, as CI lays it out).
fn spec_variables() -> Option<BTreeSet<String>> {
    let text = std::fs::read_to_string(repo().join("../shared/spec/ipamd.md")).ok()?;
    let section = text.split("## 1. ").nth(1)?.split("## 2. ").next()?;
    let is_var = |w: &str| {
        let core = w
            .strip_suffix("v4")
            .or_else(|| w.strip_suffix("v6"))
            .unwrap_or(w);
        w.contains('_')
            && core
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && core.starts_with(|c: char| c.is_ascii_uppercase())
    };
    let mut out = BTreeSet::new();
    for w in section.split('`').skip(1).step_by(2) {
        // `AWS_VPC_K8S_EGRESS_V4/V6_PLUGIN_LOG_FILE` names two variables.
        if let Some((a, b)) = w.split_once("_V4/V6_") {
            out.insert(format!("{a}_V4_{b}"));
            out.insert(format!("{a}_V6_{b}"));
        } else if is_var(w) {
            out.insert(w.to_owned());
        }
    }
    Some(out)
}

#[test]
fn every_reference_setting_of_the_spec_is_documented() {
    let Some(spec) = spec_variables() else {
        eprintln!("spec/ipamd.md not beside the repository: not cross-checked");
        return;
    };
    assert!(spec.len() > 40, "parsed {spec:?}");
    assert!(spec.contains("WARM_IP_TARGET") && spec.contains("ENABLE_IPv4"));
    let docs = documented();
    let missing: Vec<&String> = spec.iter().filter(|v| !docs.contains(*v)).collect();
    assert!(
        missing.is_empty(),
        "settings of spec/ipamd.md section 1 missing from docs/settings.md: {missing:?}"
    );
}
