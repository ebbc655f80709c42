//! The ClusterRole in `manifests/clusterrole.yaml` is exactly what the code asks of the API
//! server, derived from the source of `ipamd/src/io/k8s.rs` itself: every `Api<T>` it builds
//! and every kube call it makes on one. `k8s_api.rs` checks the requests the scenarios really
//! send; this catches a call no scenario runs. Fails when either side changes without the
//! other (or when Kubernetes is reached from anywhere but k8s.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ipamd::io::k8s::API_REQUESTS;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// (group, resource) of the kube object types the module uses.
fn resource_of(ty: &str, source: &str) -> (&'static str, &'static str) {
    match ty {
        "Node" => ("", "nodes"),
        "Pod" => ("", "pods"),
        "EniConfig" => ("crd.k8s.amazonaws.com", "eniconfigs"),
        "CniNode" => ("vpcresources.k8s.aws", "cninodes"),
        "Event" if source.contains("use k8s_openapi::api::events::v1::Event;") => {
            ("events.k8s.io", "events")
        }
        "Event" => ("", "events"),
        other => panic!("k8s.rs builds an Api<{other}>: add its group and resource here"),
    }
}

/// The RBAC verb of a `kube::Api` method (`None`: not a request).
fn verb_of(method: &str) -> &'static str {
    match method {
        "get" | "get_opt" | "get_metadata" | "get_metadata_opt" => "get",
        "list" | "list_metadata" => "list",
        "watch" | "watch_metadata" => "watch",
        "create" => "create",
        "replace" => "update",
        "patch" | "patch_metadata" => "patch",
        "delete" => "delete",
        "delete_collection" => "deletecollection",
        other => panic!("k8s.rs calls Api::{other}: add its RBAC verb (and subresource) here"),
    }
}

/// (verb, group, resource) of every kube call in `source`, in order of appearance: each
/// `let api: Api<T>` sets the type the following `api.method(` calls are made on.
fn calls_in(source: &str) -> BTreeSet<(String, String, String)> {
    let mut current: Option<&str> = None;
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        if let Some(rest) = code.split("let api: Api<").nth(1) {
            current = rest.split('>').next();
        }
        // `self.get_object::<T>(...)`: the module's GET of a cluster-scoped object.
        let mut rest = code;
        while let Some(at) = rest.find("get_object") {
            let after = &rest[at + "get_object".len()..];
            if let Some(ty) = after.strip_prefix("::<") {
                let ty = ty.split('>').next().unwrap_or("");
                let (group, resource) = resource_of(ty, source);
                found.insert(("get".to_owned(), group.to_owned(), resource.to_owned()));
            } else {
                assert!(
                    after.starts_with('<') || after.starts_with(" "),
                    "a get_object call without its type (`get_object::<T>`): {line}"
                );
            }
            rest = after;
        }
        let mut rest = code;
        while let Some(at) = rest.find("api.") {
            let after = &rest[at + 4..];
            let method: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if after[method.len()..].starts_with('(') {
                let ty = current.expect("an api call before any `let api: Api<T>`");
                let (group, resource) = resource_of(ty, source);
                found.insert((
                    verb_of(&method).to_owned(),
                    group.to_owned(),
                    resource.to_owned(),
                ));
            }
            rest = after;
        }
    }
    found
}

#[test]
fn the_cluster_role_is_exactly_what_k8s_rs_calls() {
    let source = std::fs::read_to_string(src().join("io/k8s.rs")).unwrap();
    let used = calls_in(&source);
    assert!(
        used.len() >= 4,
        "the scan sees the module's calls: {used:?}"
    );

    let published: BTreeSet<(String, String, String)> = API_REQUESTS
        .iter()
        .map(|r| (r.verb.to_owned(), r.group.to_owned(), r.resource.to_owned()))
        .collect();
    assert_eq!(
        used, published,
        "k8s.rs's calls and API_REQUESTS differ (update API_REQUESTS, then the ClusterRole)"
    );

    let role: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/clusterrole.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_sequence()
                .unwrap_or_else(|| panic!("rule without {k}: {rule:?}"))
                .iter()
                .map(|v| v.as_str().expect("string").to_owned())
                .collect()
        };
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape: {rule:?}"
        );
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    assert_ne!(resource, "*", "no wildcard resources");
                    granted.insert((verb.clone(), group.clone(), resource.clone()));
                }
            }
        }
    }
    assert_eq!(
        granted, used,
        "manifests/clusterrole.yaml grants something other than what k8s.rs calls"
    );
}

#[test]
fn kubernetes_is_reached_only_through_k8s_rs() {
    let mut offenders = BTreeMap::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("io/k8s.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for needle in [
                "Api<",
                "Api::all",
                "Api::namespaced",
                "kube::Api",
                ".request::<",
            ] {
                if text.contains(needle) {
                    offenders
                        .entry(path.display().to_string())
                        .or_insert_with(Vec::new)
                        .push(needle);
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "Kubernetes calls outside io/k8s.rs escape the RBAC check: {offenders:?}"
    );
}

#[test]
fn the_scan_classifies_a_new_call() {
    // The scan itself: a list of pods and a node patch would be seen.
    let source = "let api: Api<Pod> = x;\n api.list(&lp)\n let api: Api<Node> = y;\n bounded(api.patch(n, &p, &q))";
    let seen = calls_in(source);
    assert!(seen.contains(&("list".into(), String::new(), "pods".into())));
    assert!(seen.contains(&("patch".into(), String::new(), "nodes".into())));
}
