//! The Kubernetes client against an API-server verifier (kube-rs's tower-test pattern): a real
//! `kube::Client` over `tower_test::mock::pair()`, with a task that asserts each request
//! (method, path, query, body) and answers with API-server-shaped JSON.
//!
//! Every request is also classified into its RBAC need; `requests_made_are_exactly_the_published_set`
//! runs every scenario and checks that the union is `ipamd::io::k8s::API_REQUESTS` (plus
//! `NON_RESOURCE_URLS`), which is what the deployment's ClusterRole is checked against.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use ipamd::io::k8s::{
    self, ApiServerStatus, ConnectPolicy, K8s, K8sError, NodeInfo, RbacNeed, API_REQUESTS,
    NON_RESOURCE_URLS, POD_IPS_ANNOTATION, REASON_MISSING_IAM_PERMISSIONS,
};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{Handle, SendResponse};

const NODE: &str = "ip-10-0-0-1.us-west-2.compute.internal";
const POD: &str = "aws-node-x7k2p";
const POD_NS: &str = "kube-system";

type Log = Arc<Mutex<BTreeSet<RbacNeed>>>;

/// The API-server side of the mock: asserts and answers requests one by one.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    log: Log,
}

/// One request as the verifier saw it.
struct Seen {
    body: Option<Value>,
    content_type: Option<String>,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// Takes the next request, asserts method, path and query (kube writes an empty query,
    /// `Some("")`, on writes), records its RBAC need.
    async fn expect(&mut self, method: &str, path: &str, query: Option<&str>) -> Seen {
        let (req, send) = self
            .handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("the client was dropped before sending {method} {path}"));
        assert_eq!(req.method().as_str(), method, "method of {}", req.uri());
        assert_eq!(req.uri().path(), path);
        assert_eq!(req.uri().query(), query, "query of {method} {path}");
        self.log.lock().expect("log").insert(k8s::rbac_need(
            req.method().as_str(),
            req.uri().path(),
            req.uri().query(),
        ));
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().expect("ascii").to_owned());
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON body"));
        Seen {
            body,
            content_type,
            send,
        }
    }
}

fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let resp = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response");
    send.send_response(resp);
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn not_found(kind: &str, name: &str) -> Value {
    status_body(404, "NotFound", &format!("{kind} \"{name}\" not found"))
}

fn setup(log: &Log) -> (K8s, Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let k8s = K8s::new(client.clone(), NODE, POD, POD_NS);
    (
        k8s,
        client,
        ApiServer {
            handle,
            log: log.clone(),
        },
    )
}

fn node_json() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": NODE, "resourceVersion": "7",
            "labels": {"topology.kubernetes.io/zone": "us-west-2a",
                       "k8s.amazonaws.com/eniConfig": "from-label"},
            "annotations": {"k8s.amazonaws.com/eniConfig": "from-annotation"}
        },
        "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]},
        "status": {"capacity": {"cpu": "2", "memory": "8Gi", "pods": "29"}}
    })
}

fn eni_config_json(name: &str) -> Value {
    json!({
        "apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
        "metadata": {"name": name, "resourceVersion": "3"},
        "spec": {"subnet": "subnet-0aa", "securityGroups": ["sg-1", "sg-2"]}
    })
}

fn pod_json(ns: &str, name: &str, uid: &str, rv: &str, ip: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv},
        "spec": {"containers": [{"name": "c", "image": "i"}]}
    });
    if let Some(ip) = ip {
        pod["metadata"]["annotations"] = json!({ POD_IPS_ANNOTATION: ip });
    }
    pod
}

fn version_json() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.2", "gitCommit": "abc",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
        "compiler": "gc", "platform": "linux/amd64"
    })
}

const MERGE_PATCH: &str = "application/merge-patch+json";

// -------------------------------------------------------------------------------------------
// Scenarios, each usable alone or in the all-requests run
// -------------------------------------------------------------------------------------------

async fn scenario_node_info(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api
            .expect("GET", &format!("/api/v1/nodes/{NODE}"), None)
            .await;
        assert_eq!(seen.body, None);
        reply(seen.send, StatusCode::OK, &node_json());
    });
    let info = k8s
        .with_eni_config_keys("", "topology.kubernetes.io/zone")
        .node_info()
        .await
        .expect("node info");
    assert_eq!(
        info,
        NodeInfo {
            max_pods: Some(29),
            eni_config: "from-annotation".to_owned(),
            unschedulable: true,
        }
    );
    server.await.expect("verifier");
}

async fn scenario_eni_config(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api
            .expect("GET", &format!("/api/v1/nodes/{NODE}"), None)
            .await;
        let mut node = node_json();
        node["metadata"]["annotations"] = json!({});
        node["metadata"]["labels"] = json!({"vpc.amazonaws.com/externalEniConfig": "ext-cfg"});
        reply(seen.send, StatusCode::OK, &node);
        let seen = api
            .expect(
                "GET",
                "/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs/ext-cfg",
                None,
            )
            .await;
        reply(seen.send, StatusCode::OK, &eni_config_json("ext-cfg"));
        let seen = api
            .expect(
                "GET",
                "/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs/missing",
                None,
            )
            .await;
        reply(
            seen.send,
            StatusCode::NOT_FOUND,
            &not_found("eniconfigs.crd.k8s.amazonaws.com", "missing"),
        );
    });
    let (name, spec) = k8s.node_eni_config().await.expect("eniconfig");
    assert_eq!(name, "ext-cfg");
    assert_eq!(spec.subnet, "subnet-0aa");
    assert_eq!(
        spec.security_groups,
        Some(vec!["sg-1".to_owned(), "sg-2".to_owned()])
    );
    let err = k8s.eni_config("missing").await.expect_err("missing");
    assert!(
        matches!(&err, K8sError::EniConfigNotFound { name } if name == "missing"),
        "{err:?}"
    );
    drop(k8s);
    server.await.expect("verifier");
}

async fn scenario_set_pod_ip(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let path = "/api/v1/namespaces/default/pods/web-0";
        let seen = api.expect("PATCH", path, Some("")).await;
        assert_eq!(seen.content_type.as_deref(), Some(MERGE_PATCH));
        assert_eq!(
            seen.body,
            Some(json!({"metadata": {"annotations": {POD_IPS_ANNOTATION: "10.0.0.17"}}}))
        );
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json("default", "web-0", "u1", "8", Some("10.0.0.17")),
        );
        // The pod is already gone: not an error.
        let seen = api
            .expect("PATCH", "/api/v1/namespaces/default/pods/gone", Some(""))
            .await;
        reply(seen.send, StatusCode::NOT_FOUND, &not_found("pods", "gone"));
        // Any other refusal is.
        let seen = api.expect("PATCH", path, Some("")).await;
        reply(
            seen.send,
            StatusCode::FORBIDDEN,
            &status_body(403, "Forbidden", "pods \"web-0\" is forbidden"),
        );
    });
    k8s.set_pod_ip_annotation("default", "web-0", "10.0.0.17")
        .await
        .expect("set");
    k8s.set_pod_ip_annotation("default", "gone", "10.0.0.18")
        .await
        .expect("gone pod is fine");
    let err = k8s
        .set_pod_ip_annotation("default", "web-0", "10.0.0.17")
        .await
        .expect_err("forbidden");
    assert!(matches!(err, K8sError::Request { .. }), "{err:?}");
    drop(k8s);
    server.await.expect("verifier");
}

async fn scenario_clear_pod_ip(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let path = "/api/v1/namespaces/default/pods/web-0";
        // 1. Holds the released IP: cleared with the resourceVersion, after one conflict.
        let seen = api.expect("GET", path, None).await;
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json("default", "web-0", "u1", "41", Some("10.0.0.17")),
        );
        let seen = api.expect("PATCH", path, Some("")).await;
        assert_eq!(seen.content_type.as_deref(), Some(MERGE_PATCH));
        assert_eq!(
            seen.body,
            Some(json!({"metadata": {"resourceVersion": "41",
                                     "annotations": {POD_IPS_ANNOTATION: ""}}}))
        );
        reply(
            seen.send,
            StatusCode::CONFLICT,
            &status_body(409, "Conflict", "the object has been modified"),
        );
        let seen = api.expect("GET", path, None).await;
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json("default", "web-0", "u1", "42", Some("10.0.0.17")),
        );
        let seen = api.expect("PATCH", path, Some("")).await;
        assert_eq!(
            seen.body,
            Some(json!({"metadata": {"resourceVersion": "42",
                                     "annotations": {POD_IPS_ANNOTATION: ""}}}))
        );
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json("default", "web-0", "u1", "43", Some("")),
        );
        // 2. Holds another IP (the pod was re-added): left alone, no PATCH.
        let seen = api.expect("GET", path, None).await;
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json("default", "web-0", "u1", "44", Some("10.0.0.99")),
        );
        // 3. The pod is gone.
        let seen = api
            .expect("GET", "/api/v1/namespaces/default/pods/gone", None)
            .await;
        reply(seen.send, StatusCode::NOT_FOUND, &not_found("pods", "gone"));
    });
    assert!(k8s
        .clear_pod_ip_annotation("default", "web-0", "10.0.0.17")
        .await
        .expect("clear"));
    assert!(!k8s
        .clear_pod_ip_annotation("default", "web-0", "10.0.0.17")
        .await
        .expect("not ours"));
    assert!(!k8s
        .clear_pod_ip_annotation("default", "gone", "10.0.0.17")
        .await
        .expect("gone"));
    drop(k8s);
    server.await.expect("verifier");
}

async fn scenario_warning_event(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api
            .expect(
                "GET",
                &format!("/api/v1/namespaces/{POD_NS}/pods/{POD}"),
                None,
            )
            .await;
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json(POD_NS, POD, "uid-aws-node", "5", None),
        );
        for reason in [REASON_MISSING_IAM_PERMISSIONS, k8s::REASON_SUBNET_EXHAUSTED] {
            let seen = api
                .expect(
                    "POST",
                    &format!("/apis/events.k8s.io/v1/namespaces/{POD_NS}/events"),
                    Some(""),
                )
                .await;
            assert_eq!(seen.content_type.as_deref(), Some("application/json"));
            let ev = seen.body.expect("event body");
            assert_eq!(ev["apiVersion"], "events.k8s.io/v1");
            assert_eq!(ev["kind"], "Event");
            assert_eq!(ev["type"], "Warning");
            assert_eq!(ev["reason"], reason);
            assert_eq!(ev["action"], reason);
            assert_eq!(ev["reportingController"], "aws-node");
            assert_eq!(ev["reportingInstance"], format!("aws-node-{NODE}"));
            assert_eq!(ev["metadata"]["namespace"], POD_NS);
            let name = ev["metadata"]["name"].as_str().expect("name");
            assert!(name.starts_with(&format!("{POD}.")), "{name}");
            assert!(ev["eventTime"].as_str().expect("eventTime").ends_with('Z'));
            assert_eq!(
                ev["regarding"],
                json!({"apiVersion": "v1", "kind": "Pod", "name": POD,
                       "namespace": POD_NS, "uid": "uid-aws-node"})
            );
            assert!(ev["note"].as_str().expect("note").contains("ec2:"));
            let mut created = ev.clone();
            created["metadata"]["uid"] = json!("ev-uid");
            reply(seen.send, StatusCode::CREATED, &created);
        }
    });
    let iam = "ec2:AssignPrivateIpAddresses: UnauthorizedOperation";
    assert!(k8s
        .warn(REASON_MISSING_IAM_PERMISSIONS, iam)
        .await
        .expect("event"));
    // The pod's uid is read once.
    assert!(k8s
        .warn(
            k8s::REASON_SUBNET_EXHAUSTED,
            "ec2:CreateNetworkInterface: InsufficientFreeAddressesInSubnet in subnet-0aa",
        )
        .await
        .expect("event"));
    // The same warning again soon after is not posted.
    assert!(!k8s
        .warn(REASON_MISSING_IAM_PERMISSIONS, iam)
        .await
        .expect("suppressed"));
    drop(k8s);
    server.await.expect("verifier");
}

async fn scenario_warning_repeats_after_the_interval(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api
            .expect(
                "GET",
                &format!("/api/v1/namespaces/{POD_NS}/pods/{POD}"),
                None,
            )
            .await;
        reply(seen.send, StatusCode::NOT_FOUND, &not_found("pods", POD));
        for _ in 0..2 {
            let seen = api
                .expect(
                    "POST",
                    &format!("/apis/events.k8s.io/v1/namespaces/{POD_NS}/events"),
                    Some(""),
                )
                .await;
            let ev = seen.body.expect("event body");
            // The pod could not be read: the event still names it, without a uid.
            assert!(ev["regarding"].get("uid").is_none(), "{ev}");
            reply(seen.send, StatusCode::CREATED, &ev);
        }
    });
    let msg = "no free addresses in subnet-0aa";
    assert!(k8s
        .warn(k8s::REASON_SUBNET_EXHAUSTED, msg)
        .await
        .expect("first"));
    tokio::time::advance(k8s::EVENT_REPEAT_INTERVAL / 2).await;
    assert!(!k8s
        .warn(k8s::REASON_SUBNET_EXHAUSTED, msg)
        .await
        .expect("suppressed"));
    tokio::time::advance(k8s::EVENT_REPEAT_INTERVAL / 2).await;
    assert!(k8s
        .warn(k8s::REASON_SUBNET_EXHAUSTED, msg)
        .await
        .expect("again"));
    drop(k8s);
    server.await.expect("verifier");
}

async fn scenario_connect(log: &Log) {
    let (_, client, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api.expect("GET", "/version", None).await;
        reply(seen.send, StatusCode::OK, &version_json());
    });
    let status = k8s::connect_api_server(&client, &[], &ConnectPolicy::default())
        .await
        .expect("connect");
    assert_eq!(
        status,
        ApiServerStatus::Connected {
            git_version: "v1.33.2".to_owned()
        }
    );
    drop(client);
    server.await.expect("verifier");
}

/// Answers every request with a transport error (connection refused), recording it.
fn refuse_everything(mut api: ApiServer) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0;
        while let Some((req, send)) = api.handle.next_request().await {
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(req.uri().path(), "/version");
            api.log.lock().expect("log").insert(k8s::rbac_need(
                req.method().as_str(),
                req.uri().path(),
                req.uri().query(),
            ));
            n += 1;
            send.send_error(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ));
        }
        n
    })
}

async fn scenario_unreachable_optional(log: &Log) {
    let (_, client, api) = setup(log);
    let server = refuse_everything(api);
    let status = k8s::connect_api_server(&client, &[], &ConnectPolicy::default())
        .await
        .expect("runs without the API server");
    assert_eq!(status, ApiServerStatus::Unavailable);
    drop(client);
    // 30 s budget, one try every 5 s: tries at 0, 5, ..., 30 s.
    assert_eq!(server.await.expect("verifier"), 7);
}

async fn scenario_unreachable_required(log: &Log) {
    let (_, client, api) = setup(log);
    let server = refuse_everything(api);
    let needed = k8s::api_server_needed_by(true, false, false);
    let policy = ConnectPolicy {
        required_budget: Some(Duration::from_secs(60)),
        ..ConnectPolicy::default()
    };
    let err = k8s::connect_api_server(&client, &needed, &policy)
        .await
        .expect_err("required and unreachable");
    assert!(
        err.to_string()
            .contains("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"),
        "{err}"
    );
    drop(client);
    // Every 2 s for 60 s: tries at 0, 2, ..., 60 s.
    assert_eq!(server.await.expect("verifier"), 31);
}

async fn scenario_required_refused(log: &Log) {
    let (_, client, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api.expect("GET", "/version", None).await;
        reply(
            seen.send,
            StatusCode::FORBIDDEN,
            &status_body(403, "Forbidden", "forbidden: User cannot get path /version"),
        );
    });
    let needed = k8s::api_server_needed_by(false, true, false);
    let err = k8s::connect_api_server(&client, &needed, &ConnectPolicy::default())
        .await
        .expect_err("refused");
    assert!(matches!(err, K8sError::ApiServerRefused { .. }), "{err:?}");
    drop(client);
    server.await.expect("verifier");
}

async fn scenario_node_unreachable(log: &Log) {
    let (k8s, client, api) = setup(log);
    drop(api);
    let err = k8s.node_info().await.expect_err("no API server");
    assert!(matches!(err, K8sError::Request { .. }), "{err:?}");
    drop(client);
}

// -------------------------------------------------------------------------------------------

fn cni_node_json(rv: &str, features: Value) -> Value {
    json!({
        "apiVersion": "vpcresources.k8s.aws/v1alpha1", "kind": "CNINode",
        "metadata": {"name": NODE, "resourceVersion": rv},
        "spec": {"features": features, "tags": {"cluster.k8s.amazonaws.com/name": "c1"}}
    })
}

async fn scenario_cni_node_feature(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let path = format!("/apis/vpcresources.k8s.aws/v1alpha1/cninodes/{NODE}");
    let server = tokio::spawn(async move {
        // 1. Another feature listed: one merge patch with the resourceVersion and the list.
        let seen = api.expect("GET", &path, None).await;
        reply(
            seen.send,
            StatusCode::OK,
            &cni_node_json(
                "11",
                json!([{"name": "CustomNetworking", "value": "cfg-a"},
                       {"name": "SecurityGroupsForPods", "value": "stale"}]),
            ),
        );
        let seen = api.expect("PATCH", &path, Some("")).await;
        assert_eq!(seen.content_type.as_deref(), Some(MERGE_PATCH));
        assert_eq!(
            seen.body,
            Some(json!({
                "metadata": {"resourceVersion": "11"},
                "spec": {"features": [{"name": "CustomNetworking", "value": "cfg-a"},
                                      {"name": "SecurityGroupsForPods"}]}
            }))
        );
        reply(seen.send, StatusCode::OK, &cni_node_json("12", json!([])));
        // 2. Already there: no patch.
        let seen = api.expect("GET", &path, None).await;
        reply(
            seen.send,
            StatusCode::OK,
            &cni_node_json("12", json!([{"name": "SecurityGroupsForPods"}])),
        );
        // 3. Not created by the controller yet.
        let seen = api.expect("GET", &path, None).await;
        reply(
            seen.send,
            StatusCode::NOT_FOUND,
            &not_found("cninodes.vpcresources.k8s.aws", NODE),
        );
        // 4. Changed between GET and PATCH: the optimistic lock refuses.
        let seen = api.expect("GET", &path, None).await;
        reply(seen.send, StatusCode::OK, &cni_node_json("13", json!([])));
        let seen = api.expect("PATCH", &path, Some("")).await;
        assert_eq!(
            seen.body,
            Some(json!({
                "metadata": {"resourceVersion": "13"},
                "spec": {"features": [{"name": "SecurityGroupsForPods"}]}
            }))
        );
        reply(
            seen.send,
            StatusCode::CONFLICT,
            &status_body(409, "Conflict", "the object has been modified"),
        );
    });
    assert!(k8s
        .add_cni_node_feature(k8s::FEATURE_SGP, "")
        .await
        .expect("patched"));
    assert!(!k8s
        .add_cni_node_feature(k8s::FEATURE_SGP, "")
        .await
        .expect("already listed"));
    let err = k8s
        .add_cni_node_feature(k8s::FEATURE_SGP, "")
        .await
        .expect_err("missing CNINode");
    assert!(err.is_not_found(), "{err:?}");
    let err = k8s
        .add_cni_node_feature(k8s::FEATURE_SGP, "")
        .await
        .expect_err("conflict");
    assert!(
        matches!(&err, K8sError::Request { op, .. } if *op == "patch CNINode"),
        "{err:?}"
    );
    drop(k8s);
    server.await.expect("verifier");
}

async fn scenario_get_pod(log: &Log) {
    let (k8s, _, mut api) = setup(log);
    let server = tokio::spawn(async move {
        let seen = api
            .expect("GET", "/api/v1/namespaces/default/pods/web-0", None)
            .await;
        reply(
            seen.send,
            StatusCode::OK,
            &pod_json("default", "web-0", "u1", "8", None),
        );
        let seen = api
            .expect("GET", "/api/v1/namespaces/default/pods/gone", None)
            .await;
        reply(seen.send, StatusCode::NOT_FOUND, &not_found("pods", "gone"));
    });
    let pod = k8s.pod("default", "web-0").await.expect("pod");
    assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
    let err = k8s.pod("default", "gone").await.expect_err("gone");
    assert!(err.is_not_found(), "{err:?}");
    drop(k8s);
    server.await.expect("verifier");
}

fn log() -> Log {
    Arc::new(Mutex::new(BTreeSet::new()))
}

#[tokio::test]
async fn node_info_reads_capacity_eni_config_and_cordon() {
    scenario_node_info(&log()).await;
}

#[tokio::test]
async fn eni_config_is_read_by_the_name_the_node_selects() {
    scenario_eni_config(&log()).await;
}

#[tokio::test]
async fn pod_ip_annotation_is_set_with_one_merge_patch() {
    scenario_set_pod_ip(&log()).await;
}

#[tokio::test]
async fn pod_ip_annotation_is_cleared_only_when_it_holds_the_released_ip() {
    scenario_clear_pod_ip(&log()).await;
}

#[tokio::test]
async fn warnings_are_events_on_the_aws_node_pod() {
    scenario_warning_event(&log()).await;
}

#[tokio::test(start_paused = true)]
async fn an_identical_warning_is_posted_again_only_after_the_interval() {
    scenario_warning_repeats_after_the_interval(&log()).await;
}

#[tokio::test]
async fn start_up_connects_when_the_api_server_answers() {
    scenario_connect(&log()).await;
}

#[tokio::test(start_paused = true)]
async fn start_up_runs_without_an_unreachable_api_server_nobody_needs() {
    scenario_unreachable_optional(&log()).await;
}

#[tokio::test(start_paused = true)]
async fn start_up_fails_when_a_needed_api_server_stays_unreachable() {
    scenario_unreachable_required(&log()).await;
}

#[tokio::test]
async fn start_up_fails_at_once_when_a_needed_api_server_refuses() {
    scenario_required_refused(&log()).await;
}

#[tokio::test]
async fn node_read_fails_cleanly_without_an_api_server() {
    scenario_node_unreachable(&log()).await;
}

#[tokio::test]
async fn the_sgp_feature_is_added_to_the_cni_node_with_an_optimistic_lock() {
    scenario_cni_node_feature(&log()).await;
}

#[tokio::test]
async fn a_pod_is_read_by_namespace_and_name() {
    scenario_get_pod(&log()).await;
}

#[tokio::test(start_paused = true)]
async fn requests_made_are_exactly_the_published_set() {
    let log = log();
    scenario_cni_node_feature(&log).await;
    scenario_get_pod(&log).await;
    scenario_node_info(&log).await;
    scenario_eni_config(&log).await;
    scenario_set_pod_ip(&log).await;
    scenario_clear_pod_ip(&log).await;
    scenario_warning_event(&log).await;
    scenario_warning_repeats_after_the_interval(&log).await;
    scenario_connect(&log).await;
    scenario_unreachable_optional(&log).await;
    scenario_unreachable_required(&log).await;
    scenario_required_refused(&log).await;
    scenario_node_unreachable(&log).await;
    let seen = log.lock().expect("log").clone();
    let published: BTreeSet<RbacNeed> = API_REQUESTS
        .iter()
        .map(|r| RbacNeed::Resource {
            verb: r.verb.to_owned(),
            group: r.group.to_owned(),
            resource: r.resource.to_owned(),
        })
        .chain(NON_RESOURCE_URLS.iter().map(|p| RbacNeed::NonResource {
            verb: "get".to_owned(),
            path: (*p).to_owned(),
        }))
        .collect();
    assert_eq!(seen, published);
}
