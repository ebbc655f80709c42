//! A small stateful stand-in for the Kubernetes API server, for scenarios that run ipamd and
//! the resource controller as real binaries (no kube-apiserver can be installed on our
//! machines). It keeps objects as JSON and answers the requests those two binaries make:
//!
//! - `GET /version`;
//! - `GET` of one object and of a collection (cluster-wide or in a namespace), with
//!   `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`) and `fieldSelector` (`path=value`,
//!   `path!=value`, any dotted field);
//! - `POST` (create; `generateName` honoured; `409 AlreadyExists`), `PUT` (replace),
//!   `PATCH` with `application/merge-patch+json` or `application/strategic-merge-patch+json`
//!   (both applied as an RFC 7386 merge patch, which is what the strategic merge does for the
//!   maps these clients patch), `DELETE`;
//! - optimistic locking: a `metadata.resourceVersion` in a PUT or PATCH body that is not the
//!   object's current one is `409 Conflict`, as the API server answers.
//!
//! What it does not do is refused loudly rather than faked: watches (`watch=true`), JSON
//! patches, server-side apply, and any path it does not parse get `400`/`415` with a message
//! saying so, so a client that starts needing one fails its test instead of passing on a
//! guess. There is no authentication, admission, defaulting, garbage collection or
//! finalizers: a scenario deletes what the cluster would delete (a pod, when its node's
//! kubelet would) itself. Every request is logged (`requests`) so a scenario can check what
//! a binary asked for.
//!
//! [`KubeApi::serve`] listens on [`SERVICE_ADDR`] inside the fabric's VPC namespace (as the
//! simulator's server does), so a process in any node namespace reaches it through its
//! default route; [`KubeApi::write_kubeconfig`] writes the kubeconfig those processes take
//! from `KUBECONFIG`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use crate::error::Result;
use crate::fabric::{Fabric, SERVICE_ADDR};
use crate::serve::spawn_in_vpc;

/// Collection key of pods (`<group>/<version>/<resource>`, core group empty).
pub const PODS: &str = "/v1/pods";
/// Collection key of nodes.
pub const NODES: &str = "/v1/nodes";
/// Collection key of events (`events.k8s.io/v1`).
pub const EVENTS: &str = "events.k8s.io/v1/events";
/// Collection key of SecurityGroupPolicies.
pub const SECURITY_GROUP_POLICIES: &str = "vpcresources.k8s.aws/v1beta1/securitygrouppolicies";
/// Collection key of CNINodes.
pub const CNINODES: &str = "vpcresources.k8s.aws/v1alpha1/cninodes";

/// The Kubernetes version the stand-in reports.
pub const GIT_VERSION: &str = "v1.33.0-vpc-cni-e2e";

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Status answered.
    pub status: u16,
}

#[derive(Debug, Default)]
struct Store {
    /// (collection key, namespace or "", name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    revision: u64,
    uids: u64,
    log: Vec<Logged>,
}

impl Store {
    fn next_revision(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    /// Fills the server-set metadata of a new object and stores it.
    fn insert_new(
        &mut self,
        key: &str,
        ns: &str,
        mut obj: Value,
    ) -> std::result::Result<Value, ApiFailure> {
        let name = match obj.pointer("/metadata/name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
            {
                Some(g) if !g.is_empty() => {
                    self.uids += 1;
                    format!("{g}{:05x}", self.uids)
                }
                _ => {
                    return Err(ApiFailure::invalid(
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            },
        };
        let id = (key.to_owned(), ns.to_owned(), name.clone());
        if self.objects.contains_key(&id) {
            return Err(ApiFailure::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource_of(key)),
            ));
        }
        self.uids += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.uids);
        let rv = self.next_revision();
        let meta = metadata_mut(&mut obj)?;
        meta.insert("name".into(), json!(name));
        if !ns.is_empty() {
            meta.insert("namespace".into(), json!(ns));
        }
        // A uid the scenario chose (the pod's, which the runtime passes as K8S_POD_UID) is
        // kept; the clients under test never create objects that need one.
        meta.entry("uid").or_insert_with(|| json!(uid));
        meta.insert("resourceVersion".into(), json!(rv));
        meta.entry("creationTimestamp")
            .or_insert_with(|| json!("2026-01-01T00:00:00Z"));
        self.objects.insert(id, obj.clone());
        Ok(obj)
    }
}

fn metadata_mut(obj: &mut Value) -> std::result::Result<&mut Map<String, Value>, ApiFailure> {
    let top = obj
        .as_object_mut()
        .ok_or_else(|| ApiFailure::invalid("the body is not a JSON object"))?;
    top.entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| ApiFailure::invalid("metadata: must be an object"))
}

fn resource_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// A failure answered as a Kubernetes `Status`.
#[derive(Debug)]
struct ApiFailure {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiFailure {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiFailure {
            code,
            reason,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    fn not_found(key: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource_of(key)),
        )
    }
    fn body(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "code": self.code,
        })
    }
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    key: String,
    /// `None`: every namespace (a cluster-scoped resource, or a list across namespaces).
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (String::from("/v1"), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let key = |res: &str| {
        if group == "/v1" {
            format!("/v1/{res}")
        } else {
            format!("{group}/{res}")
        }
    };
    // A trailing `status` subresource is the object itself here.
    let rest: Vec<&str> = match rest {
        [head @ .., "status"] if !head.is_empty() && head.len() != 3 => head.to_vec(),
        _ => rest.to_vec(),
    };
    match rest.as_slice() {
        ["namespaces", ns, res] => Some(Target {
            key: key(res),
            namespace: Some((*ns).to_owned()),
            name: None,
        }),
        ["namespaces", ns, res, name] => Some(Target {
            key: key(res),
            namespace: Some((*ns).to_owned()),
            name: Some((*name).to_owned()),
        }),
        [res] => Some(Target {
            key: key(res),
            namespace: None,
            name: None,
        }),
        [res, name] => Some(Target {
            key: key(res),
            namespace: None,
            name: Some((*name).to_owned()),
        }),
        _ => None,
    }
}

/// RFC 7386: `null` deletes, objects merge recursively, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn field_str<'a>(obj: &'a Value, dotted: &str) -> Option<&'a str> {
    let pointer = format!("/{}", dotted.replace('.', "/"));
    obj.pointer(&pointer).and_then(Value::as_str)
}

/// Whether `obj` matches a label selector (equality and existence terms).
fn matches_labels(obj: &Value, selector: &str) -> std::result::Result<bool, ApiFailure> {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let ok = if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else if term.contains(' ') || term.contains('(') {
            return Err(ApiFailure::invalid(format!(
                "labelSelector: set-based term {term:?} is not supported by the stand-in"
            )));
        } else {
            get(term).is_some()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn matches_fields(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                field_str(obj, k.trim()).unwrap_or("") != v.trim()
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                field_str(obj, k.trim()).unwrap_or("") == v.trim()
            } else {
                false
            }
        })
}

fn list_kind(items: &[Value], key: &str) -> String {
    items
        .first()
        .and_then(|i| i.get("kind"))
        .and_then(Value::as_str)
        .map(|k| format!("{k}List"))
        .unwrap_or_else(|| format!("{}List", resource_of(key)))
}

fn handle(
    store: &mut Store,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> std::result::Result<(u16, Value), ApiFailure> {
    if path == "/version" || path == "/version/" {
        return Ok((
            200,
            json!({"major": "1", "minor": "33", "gitVersion": GIT_VERSION,
                   "platform": "linux/amd64"}),
        ));
    }
    let target = parse_path(path).ok_or_else(|| {
        ApiFailure::new(
            404,
            "NotFound",
            format!("the stand-in does not serve {path}"),
        )
    })?;
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return Err(ApiFailure::invalid(
            "watch: the API stand-in does not serve watches (list and poll instead)",
        ));
    }
    let ns = target.namespace.clone().unwrap_or_default();
    let parse_body = || -> std::result::Result<Value, ApiFailure> {
        serde_json::from_slice(body)
            .map_err(|e| ApiFailure::invalid(format!("request body is not JSON: {e}")))
    };
    match (method, &target.name) {
        (&Method::GET, Some(name)) => store
            .objects
            .get(&(target.key.clone(), ns, name.clone()))
            .cloned()
            .map(|o| (200, o))
            .ok_or_else(|| ApiFailure::not_found(&target.key, name)),
        (&Method::GET, None) => {
            let labels = query.get("labelSelector").map(String::as_str).unwrap_or("");
            let fields = query.get("fieldSelector").map(String::as_str).unwrap_or("");
            let mut items = Vec::new();
            for ((k, o_ns, _), obj) in &store.objects {
                if k != &target.key || target.namespace.as_ref().is_some_and(|n| n != o_ns) {
                    continue;
                }
                if matches_labels(obj, labels)? && matches_fields(obj, fields) {
                    items.push(obj.clone());
                }
            }
            let kind = list_kind(&items, &target.key);
            let api_version = target
                .key
                .rsplit_once('/')
                .map_or("v1", |(gv, _)| gv.strip_prefix('/').unwrap_or(gv));
            Ok((
                200,
                json!({"kind": kind, "apiVersion": api_version,
                       "metadata": {"resourceVersion": store.revision.to_string()},
                       "items": items}),
            ))
        }
        (&Method::POST, None) => {
            let obj = parse_body()?;
            store.insert_new(&target.key, &ns, obj).map(|o| (201, o))
        }
        (&Method::PUT, Some(name)) | (&Method::PATCH, Some(name)) => {
            let id = (target.key.clone(), ns, name.clone());
            let current = store
                .objects
                .get(&id)
                .cloned()
                .ok_or_else(|| ApiFailure::not_found(&target.key, name))?;
            let incoming = parse_body()?;
            let current_rv = current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if let Some(rv) = incoming
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                if rv != current_rv {
                    return Err(ApiFailure::new(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has \
                             been modified; please apply your changes to the latest version \
                             and try again",
                            resource_of(&target.key)
                        ),
                    ));
                }
            }
            let mut next = if method == Method::PUT {
                incoming
            } else {
                let media = content_type.split(';').next().unwrap_or("").trim();
                if media != "application/merge-patch+json"
                    && media != "application/strategic-merge-patch+json"
                {
                    return Err(ApiFailure::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the API stand-in applies merge patches only, not {media:?}"),
                    ));
                }
                let mut next = current.clone();
                merge_patch(&mut next, &incoming);
                next
            };
            // Identity fields are the server's.
            let keep = |p: &str| current.pointer(p).cloned();
            let rv = store.next_revision();
            let meta = metadata_mut(&mut next)?;
            for (field, pointer) in [
                ("name", "/metadata/name"),
                ("namespace", "/metadata/namespace"),
                ("uid", "/metadata/uid"),
                ("creationTimestamp", "/metadata/creationTimestamp"),
            ] {
                match keep(pointer) {
                    Some(v) => {
                        meta.insert(field.into(), v);
                    }
                    None => {
                        meta.remove(field);
                    }
                }
            }
            meta.insert("resourceVersion".into(), json!(rv));
            store.objects.insert(id, next.clone());
            Ok((200, next))
        }
        (&Method::DELETE, Some(name)) => store
            .objects
            .remove(&(target.key.clone(), ns, name.clone()))
            .map(|o| (200, o))
            .ok_or_else(|| ApiFailure::not_found(&target.key, name)),
        _ => Err(ApiFailure::new(
            405,
            "MethodNotAllowed",
            format!("{method} {path} is not served by the stand-in"),
        )),
    }
}

/// The stand-in's state, shared by the server and the scenario.
#[derive(Debug, Clone, Default)]
pub struct KubeApi {
    store: Arc<Mutex<Store>>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    match store.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

impl KubeApi {
    /// An empty cluster.
    pub fn new() -> KubeApi {
        KubeApi::default()
    }

    /// Creates an object as a client's POST would (`namespace` empty for cluster-scoped).
    pub fn create(&self, key: &str, namespace: &str, obj: Value) -> anyhow::Result<Value> {
        lock(&self.store)
            .insert_new(key, namespace, obj)
            .map_err(|f| anyhow::anyhow!("create {key} {namespace}: {}", f.message))
    }

    /// One object, if present.
    pub fn get(&self, key: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.store)
            .objects
            .get(&(key.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every object of a collection, in every namespace.
    pub fn list(&self, key: &str) -> Vec<Value> {
        lock(&self.store)
            .objects
            .iter()
            .filter(|((k, _, _), _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Applies a merge patch as a client's PATCH would; the object must exist.
    pub fn patch(
        &self,
        key: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> anyhow::Result<Value> {
        let mut s = lock(&self.store);
        let id = (key.to_owned(), namespace.to_owned(), name.to_owned());
        let rv = s.next_revision();
        let obj = s
            .objects
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("patch {key} {namespace}/{name}: not found"))?;
        merge_patch(obj, patch);
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(rv));
        }
        Ok(obj.clone())
    }

    /// Deletes an object (as the cluster would); `false` if it was absent.
    pub fn delete(&self, key: &str, namespace: &str, name: &str) -> bool {
        lock(&self.store)
            .objects
            .remove(&(key.to_owned(), namespace.to_owned(), name.to_owned()))
            .is_some()
    }

    /// Every request served so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        lock(&self.store).log.clone()
    }

    /// Answers one HTTP request.
    async fn serve_one(
        self,
        req: Request<Incoming>,
    ) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let content_type = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = Limited::new(req.into_body(), 4 << 20)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let query = query_map(uri.query());
        let mut store = lock(&self.store);
        let (status, value) = match handle(
            &mut store,
            &method,
            uri.path(),
            &query,
            &content_type,
            &body,
        ) {
            Ok(ok) => ok,
            Err(f) => (f.code, f.body()),
        };
        store.log.push(Logged {
            method: method.to_string(),
            uri: uri.to_string(),
            status,
        });
        drop(store);
        let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }

    /// Serves this state on [`SERVICE_ADDR`] (a port the kernel picks) inside the fabric's
    /// VPC namespace, on its own thread; stops when the returned server is dropped.
    pub fn serve(&self, fabric: &Fabric) -> Result<KubeServer> {
        let api = self.clone();
        let (addr, stop, thread) =
            spawn_in_vpc(fabric, "kube-api", move |tx, stop_rx| async move {
                let any = SocketAddr::V4(SocketAddrV4::new(SERVICE_ADDR, 0));
                let listener = match TcpListener::bind(any).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(format!("bind {any}: {e}")));
                        return;
                    }
                };
                match listener.local_addr() {
                    Ok(a) => {
                        let _ = tx.send(Ok(a));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("local_addr: {e}")));
                        return;
                    }
                }
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let api = api.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| api.clone().serve_one(req));
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            })?;
        Ok(KubeServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// The stand-in served in the fabric; stops when dropped.
#[derive(Debug)]
pub struct KubeServer {
    /// Where it listens (in the VPC namespace, reachable from every node).
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeServer {
    /// The server URL for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig at `path` pointing at this server (no credentials: the stand-in
    /// authenticates nobody).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n\
             users:\n- name: e2e\n  user: {{}}\ncontexts:\n- name: e2e\n  context:\n    \
             cluster: e2e\n    user: e2e\ncurrent-context: e2e\n",
            self.url()
        );
        std::fs::write(path, text)
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(
        s: &mut Store,
        m: Method,
        path: &str,
        q: &str,
        ct: &str,
        body: Value,
    ) -> std::result::Result<(u16, Value), ApiFailure> {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        handle(s, &m, path, &query_map(Some(q)), ct, &body)
    }

    #[test]
    fn paths_name_collections_and_objects() {
        let t = parse_path("/api/v1/namespaces/default/pods/web").unwrap();
        assert_eq!(
            (t.key.as_str(), t.namespace.as_deref(), t.name.as_deref()),
            (PODS, Some("default"), Some("web"))
        );
        let t = parse_path("/api/v1/pods").unwrap();
        assert_eq!((t.key.as_str(), t.namespace, t.name), (PODS, None, None));
        let t = parse_path("/apis/vpcresources.k8s.aws/v1alpha1/cninodes/node-a").unwrap();
        assert_eq!(
            (t.key.as_str(), t.name.as_deref()),
            (CNINODES, Some("node-a"))
        );
        let t = parse_path("/api/v1/namespaces/default/pods/web/status").unwrap();
        assert_eq!(t.name.as_deref(), Some("web"));
        assert!(parse_path("/healthz").is_none());
    }

    #[test]
    fn create_get_list_patch_delete_round_trip() {
        let mut s = Store::default();
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": "web", "labels": {"app": "db"}},
                         "spec": {"nodeName": "n1"}});
        let (code, made) = req(
            &mut s,
            Method::POST,
            "/api/v1/namespaces/default/pods",
            "",
            "application/json",
            pod.clone(),
        )
        .unwrap();
        assert_eq!(code, 201);
        assert_eq!(made["metadata"]["namespace"], "default");
        let rv = made["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        let dup = req(
            &mut s,
            Method::POST,
            "/api/v1/namespaces/default/pods",
            "",
            "application/json",
            pod,
        )
        .unwrap_err();
        assert_eq!((dup.code, dup.reason), (409, "AlreadyExists"));

        let (_, list) = req(
            &mut s,
            Method::GET,
            "/api/v1/pods",
            "fieldSelector=spec.nodeName%3Dn1&labelSelector=app%3Ddb",
            "",
            Value::Null,
        )
        .unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["kind"], "PodList");
        let (_, none) = req(
            &mut s,
            Method::GET,
            "/api/v1/pods",
            "fieldSelector=spec.nodeName%3Dn2",
            "",
            Value::Null,
        )
        .unwrap();
        assert!(none["items"].as_array().unwrap().is_empty());
        let (_, none) = req(
            &mut s,
            Method::GET,
            "/api/v1/namespaces/other/pods",
            "",
            "",
            Value::Null,
        )
        .unwrap();
        assert!(none["items"].as_array().unwrap().is_empty());

        let (_, patched) = req(&mut s, Method::PATCH, "/api/v1/namespaces/default/pods/web", "",
            "application/merge-patch+json",
            json!({"metadata": {"annotations": {"a": "1"}, "labels": {"app": null}, "uid": "forged"}})).unwrap();
        assert_eq!(patched["metadata"]["annotations"]["a"], "1");
        assert!(patched["metadata"]["labels"].get("app").is_none());
        assert_eq!(patched["metadata"]["uid"], made["metadata"]["uid"]);
        assert_ne!(patched["metadata"]["resourceVersion"].as_str().unwrap(), rv);

        let stale = req(
            &mut s,
            Method::PATCH,
            "/api/v1/namespaces/default/pods/web",
            "",
            "application/merge-patch+json",
            json!({"metadata": {"resourceVersion": rv}}),
        )
        .unwrap_err();
        assert_eq!((stale.code, stale.reason), (409, "Conflict"));
        let jp = req(
            &mut s,
            Method::PATCH,
            "/api/v1/namespaces/default/pods/web",
            "",
            "application/json-patch+json",
            json!([]),
        )
        .unwrap_err();
        assert_eq!(jp.code, 415);

        let (code, _) = req(
            &mut s,
            Method::DELETE,
            "/api/v1/namespaces/default/pods/web",
            "",
            "",
            Value::Null,
        )
        .unwrap();
        assert_eq!(code, 200);
        let gone = req(
            &mut s,
            Method::GET,
            "/api/v1/namespaces/default/pods/web",
            "",
            "",
            Value::Null,
        )
        .unwrap_err();
        assert_eq!((gone.code, gone.reason), (404, "NotFound"));
    }

    #[test]
    fn watches_and_unknown_selectors_are_refused_not_faked() {
        let mut s = Store::default();
        let w = req(
            &mut s,
            Method::GET,
            "/api/v1/pods",
            "watch=true",
            "",
            Value::Null,
        )
        .unwrap_err();
        assert_eq!(w.code, 400);
        assert!(w.message.contains("watch"));
        req(
            &mut s,
            Method::POST,
            "/api/v1/nodes",
            "",
            "",
            json!({"metadata": {"name": "n"}}),
        )
        .unwrap();
        let e = req(
            &mut s,
            Method::GET,
            "/api/v1/nodes",
            "labelSelector=a%20in%20(b)",
            "",
            Value::Null,
        )
        .unwrap_err();
        assert!(e.message.contains("labelSelector"));
    }

    #[test]
    fn generate_name_and_merge_patch_semantics() {
        let mut s = Store::default();
        let (_, ev) = req(
            &mut s,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/kube-system/events",
            "",
            "",
            json!({"metadata": {"generateName": "aws-node."}}),
        )
        .unwrap();
        assert!(ev["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("aws-node."));
        let mut v = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        merge_patch(&mut v, &json!({"a": {"c": [3], "e": null}, "d": null}));
        assert_eq!(v, json!({"a": {"b": 1, "c": [3]}}));
    }
}
