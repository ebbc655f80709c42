//! The controller's ClusterRole (`manifests/controller-clusterrole.yaml`) is what the code asks
//! of the API server, derived from the source of `controller/src/k8s.rs` itself: every
//! `Api<T>` it builds and every kube call made on one, and every `list_lenient::<T>` list.
//! `k8s_api.rs` checks the requests really sent; this catches a call no test runs. Fails when
//! either side changes without the other, or when Kubernetes is reached outside k8s.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vpc_cni_controller::k8s::API_REQUESTS;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn resource_of(ty: &str) -> (&'static str, &'static str) {
    match ty {
        "Node" => ("", "nodes"),
        "Pod" => ("", "pods"),
        "ServiceAccount" => ("", "serviceaccounts"),
        "Event" => ("", "events"),
        "CniNode" => ("vpcresources.k8s.aws", "cninodes"),
        "SecurityGroupPolicy" => ("vpcresources.k8s.aws", "securitygrouppolicies"),
        other => panic!("k8s.rs uses kind {other}: add its group and resource here"),
    }
}

fn verb_of(method: &str) -> &'static str {
    match method {
        "get" | "get_opt" => "get",
        "list" => "list",
        "watch" => "watch",
        "create" => "create",
        "replace" => "update",
        "patch" => "patch",
        "delete" => "delete",
        other => panic!("k8s.rs calls Api::{other}: add its RBAC verb here"),
    }
}

fn calls_in(source: &str) -> BTreeSet<(String, String, String)> {
    let mut current: Option<&str> = None;
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        if let Some(rest) = code.split("let api: Api<").nth(1) {
            current = rest.split('>').next();
        }
        let mut rest = code;
        while let Some(at) = rest.find("list_lenient") {
            let after = &rest[at + "list_lenient".len()..];
            if let Some(ty) = after.strip_prefix("::<") {
                let ty = ty.split('>').next().unwrap_or("");
                let (g, r) = resource_of(ty);
                found.insert(("list".to_owned(), g.to_owned(), r.to_owned()));
            } else {
                assert!(
                    after.starts_with('<') || after.starts_with(' '),
                    "a list_lenient call without its type (`list_lenient::<T>`): {line}"
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
                let (g, r) = resource_of(ty);
                found.insert((verb_of(&method).to_owned(), g.to_owned(), r.to_owned()));
            }
            rest = after;
        }
    }
    found
}

#[test]
fn the_cluster_role_is_exactly_what_k8s_rs_calls() {
    let source = std::fs::read_to_string(src().join("k8s.rs")).unwrap();
    let used = calls_in(&source);
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
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/controller-clusterrole.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        for g in rule["apiGroups"].as_sequence().expect("apiGroups") {
            for r in rule["resources"].as_sequence().expect("resources") {
                for v in rule["verbs"].as_sequence().expect("verbs") {
                    granted.insert((
                        v.as_str().unwrap().to_owned(),
                        g.as_str().unwrap().to_owned(),
                        r.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    assert_eq!(
        granted, used,
        "the ClusterRole grants other than what k8s.rs calls"
    );
}

#[test]
fn kubernetes_is_reached_only_from_k8s_rs() {
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == "k8s.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in ["Api<", "Api::", "request_text", "kube::Client"] {
            assert!(
                !text.contains(needle),
                "{} uses {needle}: Kubernetes calls belong in k8s.rs",
                path.display()
            );
        }
    }
}

#[test]
fn the_scan_sees_calls() {
    let sample = "let api: Api<Pod> = x;\napi.patch(a);\nself.list_lenient::<Node>(\"Node\");\n";
    let found = calls_in(sample);
    assert_eq!(
        found,
        BTreeSet::from([
            ("patch".to_owned(), String::new(), "pods".to_owned()),
            ("list".to_owned(), String::new(), "nodes".to_owned()),
        ])
    );
}
