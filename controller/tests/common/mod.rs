//! A stateful API-server stand-in on the server end of `tower_test::mock::pair()`: a real
//! `kube::Client` talks to it, it checks every request is one the API server accepts (method,
//! path, query, content type, body shape), records each request's RBAC need, and answers with
//! API-server-shaped JSON from an in-memory object store (lists with `limit`/`continue`,
//! merge patches, creates with `409 AlreadyExists`, the uid precondition of a pod patch).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use vpc_cni_controller::k8s::{rbac_need, RbacNeed};

/// The objects, by kind then `namespace/name` (cluster-scoped: `name`).
#[derive(Debug, Default)]
pub struct Store {
    pub objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    pub needs: BTreeSet<RbacNeed>,
    pub requests: Vec<String>,
    pub page_size: Option<usize>,
    pub next_rv: u64,
}

pub type Shared = Arc<Mutex<Store>>;

fn kind_of(path: &str) -> Option<(&'static str, &'static str, bool)> {
    // (kind key, apiVersion, namespaced)
    let table: &[(&str, &'static str, &'static str, bool)] = &[
        ("/api/v1/nodes", "nodes", "v1", false),
        ("/api/v1/pods", "pods", "v1", true),
        ("/api/v1/serviceaccounts", "serviceaccounts", "v1", true),
        (
            "/apis/vpcresources.k8s.aws/v1alpha1/cninodes",
            "cninodes",
            "vpcresources.k8s.aws/v1alpha1",
            false,
        ),
        (
            "/apis/vpcresources.k8s.aws/v1beta1/securitygrouppolicies",
            "securitygrouppolicies",
            "vpcresources.k8s.aws/v1beta1",
            true,
        ),
    ];
    table
        .iter()
        .find(|(p, ..)| *p == path)
        .map(|(_, k, v, n)| (*k, *v, *n))
}

pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl Store {
    pub fn put(&mut self, kind: &'static str, obj: Value) {
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = obj["metadata"]["name"].as_str().expect("name").to_owned();
        let key = ns.map_or(name.clone(), |ns| format!("{ns}/{name}"));
        self.objects.entry(kind).or_default().insert(key, obj);
    }

    pub fn get(&self, kind: &str, key: &str) -> Option<&Value> {
        self.objects.get(kind).and_then(|m| m.get(key))
    }

    pub fn remove(&mut self, kind: &str, key: &str) -> Option<Value> {
        self.objects.get_mut(kind).and_then(|m| m.remove(key))
    }

    fn answer(
        &mut self,
        method: &str,
        path: &str,
        query: Option<&str>,
        ctype: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.next_rv += 1;
        let rv = self.next_rv.to_string();
        if method == "GET" {
            let (kind, api_version, _) = kind_of(path)
                .unwrap_or_else(|| panic!("GET of {path}: not a list the controller makes"));
            let q: BTreeMap<String, String> = form(query.expect("a list carries limit"));
            let limit: usize = q
                .get("limit")
                .expect("limit")
                .parse()
                .expect("limit number");
            assert!(limit > 0 && limit <= 500, "limit {limit}");
            assert!(!q.contains_key("watch"), "no watches");
            let page = self.page_size.unwrap_or(limit).min(limit);
            let start: usize = q
                .get("continue")
                .map_or(0, |c| c.parse().expect("our continue token"));
            let all: Vec<Value> = self
                .objects
                .get(kind)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let items: Vec<Value> = all.iter().skip(start).take(page).cloned().collect();
            let mut meta = json!({"resourceVersion": rv});
            if start + page < all.len() {
                meta["continue"] = json!((start + page).to_string());
            }
            let list_kind = format!(
                "{}List",
                all.first()
                    .and_then(|o| o["kind"].as_str())
                    .unwrap_or("Object")
            );
            return (
                StatusCode::OK,
                json!({"kind": list_kind, "apiVersion": api_version, "metadata": meta, "items": items}),
            );
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segs.as_slice()) {
            ("POST", ["apis", "vpcresources.k8s.aws", "v1alpha1", "cninodes"]) => {
                assert_eq!(ctype, Some("application/json"));
                let mut obj = body.expect("body");
                assert_eq!(obj["kind"], "CNINode");
                assert_eq!(obj["apiVersion"], "vpcresources.k8s.aws/v1alpha1");
                let name = obj["metadata"]["name"].as_str().expect("name").to_owned();
                if self.get("cninodes", &name).is_some() {
                    return (
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("cninodes.vpcresources.k8s.aws \"{name}\" already exists"),
                        ),
                    );
                }
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj["metadata"]["uid"] = json!(format!("uid-cninode-{name}"));
                self.put("cninodes", obj.clone());
                (StatusCode::CREATED, obj)
            }
            ("POST", ["api", "v1", "namespaces", ns, "events"]) => {
                let obj = body.expect("body");
                assert_eq!(obj["kind"], "Event");
                assert_eq!(obj["metadata"]["namespace"], *ns);
                let mut obj = obj;
                let name = format!(
                    "{}{}",
                    obj["metadata"]["generateName"]
                        .as_str()
                        .expect("generateName"),
                    rv
                );
                obj["metadata"]["name"] = json!(name);
                self.put("events", obj.clone());
                (StatusCode::CREATED, obj)
            }
            ("PATCH", ["api", "v1", "nodes", name]) => {
                assert_eq!(ctype, Some("application/merge-patch+json"));
                let patch = body.expect("body");
                let Some(obj) = self.objects.get_mut("nodes").and_then(|m| m.get_mut(*name)) else {
                    return (
                        StatusCode::NOT_FOUND,
                        status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                    );
                };
                merge(obj, &patch);
                obj["metadata"]["resourceVersion"] = json!(rv);
                (StatusCode::OK, obj.clone())
            }
            ("PATCH", ["api", "v1", "namespaces", ns, "pods", name]) => {
                assert_eq!(ctype, Some("application/merge-patch+json"));
                let patch = body.expect("body");
                let key = format!("{ns}/{name}");
                let Some(obj) = self.objects.get_mut("pods").and_then(|m| m.get_mut(&key)) else {
                    return (
                        StatusCode::NOT_FOUND,
                        status(404, "NotFound", &format!("pods \"{name}\" not found")),
                    );
                };
                if let Some(uid) = patch["metadata"]["uid"].as_str() {
                    if obj["metadata"]["uid"].as_str() != Some(uid) {
                        return (
                            StatusCode::CONFLICT,
                            status(409, "Conflict", "Precondition failed: UID in precondition"),
                        );
                    }
                }
                merge(obj, &patch);
                obj["metadata"]["resourceVersion"] = json!(rv);
                (StatusCode::OK, obj.clone())
            }
            _ => panic!("{method} {path}: not a request the controller makes"),
        }
    }
}

fn form(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// A client and the store it talks to (served by a spawned task until the client is dropped).
pub fn fake_api() -> (Client, Shared) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let store: Shared = Arc::default();
    let st = store.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().as_str().to_owned();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().map(str::to_owned);
            let ctype = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().expect("ascii").to_owned());
            let bytes = req.into_body().collect_bytes().await.expect("body");
            let body = (!bytes.is_empty())
                .then(|| serde_json::from_slice::<Value>(&bytes).expect("JSON body"));
            let (code, answer) = {
                let mut s = st.lock().expect("store");
                s.needs.insert(rbac_need(&method, &path, query.as_deref()));
                s.requests.push(format!("{method} {path}"));
                s.answer(&method, &path, query.as_deref(), ctype.as_deref(), body)
            };
            let resp = Response::builder()
                .status(code)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                .expect("response");
            send.send_response(resp);
        }
    });
    (Client::new(service, "default"), store)
}

pub fn node(name: &str, instance: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1",
                        "labels": labels},
           "spec": {"providerID": format!("aws:///us-west-2a/{instance}")},
           "status": {"capacity": {"pods": "29"}}})
}

pub fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"),
                        "resourceVersion": "1", "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
           "status": {"phase": "Running"}})
}

pub fn policy(ns: &str, name: &str, selector: Value, groups: &[&str]) -> Value {
    json!({"apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
           "metadata": {"namespace": ns, "name": name, "uid": format!("uid-sgp-{name}"), "resourceVersion": "1"},
           "spec": {"podSelector": selector, "securityGroups": {"groupIds": groups}}})
}

pub fn service_account(ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"namespace": ns, "name": name, "uid": format!("uid-sa-{name}"),
                        "resourceVersion": "1", "labels": labels}})
}
