//! The Kubernetes client against an API-server verifier (kube-rs's tower-test pattern): a real
//! `kube::Client` over `tower_test::mock::pair()`, with a task that asserts each request
//! (method, path, query, content type, body) in order and answers API-server-shaped JSON.
//! The RBAC needs of every request are collected and must be exactly `API_REQUESTS`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{Handle, SendResponse};
use vpc_cni_controller::k8s::{rbac_need, Involved, Kube, RbacNeed, API_REQUESTS};
use vpc_cni_controller::model::{BranchEni, PodKey, POD_ENI_ANNOTATION};

struct Verifier {
    handle: Handle<Request<Body>, Response<Body>>,
    needs: BTreeSet<RbacNeed>,
}

struct Seen {
    body: Option<Value>,
    content_type: Option<String>,
    send: SendResponse<Response<Body>>,
}

impl Verifier {
    async fn expect(&mut self, method: &str, path: &str, query: Option<&str>) -> Seen {
        let (req, send) = self
            .handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("client dropped before {method} {path}"));
        assert_eq!(req.method().as_str(), method, "method of {}", req.uri());
        assert_eq!(req.uri().path(), path);
        assert_eq!(req.uri().query(), query, "query of {method} {path}");
        self.needs
            .insert(rbac_need(method, path, req.uri().query()));
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().expect("ascii").to_owned());
        let bytes = req.into_body().collect_bytes().await.expect("body");
        Seen {
            body: (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("json")),
            content_type,
            send,
        }
    }
}

fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response"),
    );
}

fn list(kind: &str, api_version: &str, items: Value, cont: Option<&str>) -> Value {
    let mut meta = json!({"resourceVersion": "10"});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": meta, "items": items})
}

fn setup() -> (Kube, Verifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    (
        Kube::new(client, "c1"),
        Verifier {
            handle,
            needs: BTreeSet::new(),
        },
    )
}

#[tokio::test]
async fn every_request_is_asserted_and_the_set_is_exactly_the_published_one() {
    let (kube, mut api) = setup();
    let server = tokio::spawn(async move {
        // observe(): nodes (two pages), CNINodes, pods, policies, service accounts.
        let s = api.expect("GET", "/api/v1/nodes", Some("&limit=500")).await;
        reply(
            s.send,
            StatusCode::OK,
            &list(
                "Node",
                "v1",
                json!([
                    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "uid": "u1",
                     "labels": {"vpc.amazonaws.com/has-trunk-attached": "false", "kubernetes.io/os": "linux"}},
                     "spec": {"providerID": "aws:///us-west-2a/i-0abc"}}
                ]),
                Some("page2"),
            ),
        );
        let s = api
            .expect("GET", "/api/v1/nodes", Some("&limit=500&continue=page2"))
            .await;
        reply(
            s.send,
            StatusCode::OK,
            &list(
                "Node",
                "v1",
                json!([
                    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2", "uid": "u2"},
                     "spec": {"providerID": "aws:///us-west-2a/i-0def"}},
                    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "broken", "labels": "not a map"}}
                ]),
                None,
            ),
        );
        let s = api
            .expect(
                "GET",
                "/apis/vpcresources.k8s.aws/v1alpha1/cninodes",
                Some("&limit=500"),
            )
            .await;
        reply(
            s.send,
            StatusCode::OK,
            &list(
                "CNINode",
                "vpcresources.k8s.aws/v1alpha1",
                json!([
                    {"apiVersion": "vpcresources.k8s.aws/v1alpha1", "kind": "CNINode", "metadata": {"name": "n2"},
                     "spec": {"features": [{"name": "SecurityGroupsForPods"}]}}
                ]),
                None,
            ),
        );
        let s = api.expect("GET", "/api/v1/pods", Some("&limit=500")).await;
        reply(
            s.send,
            StatusCode::OK,
            &list(
                "Pod",
                "v1",
                json!([
                    {"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"namespace": "ns", "name": "db", "uid": "pu1", "labels": {"app": "db"},
                                  "annotations": {POD_ENI_ANNOTATION: "[{\"eniId\":\"eni-1\",\"ifAddress\":\"m\",\"vlanId\":3}]"}},
                     "spec": {"nodeName": "n1", "serviceAccountName": "pci", "containers": []},
                     "status": {"phase": "Running"}},
                    {"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"namespace": "ns", "name": "done", "uid": "pu2"},
                     "spec": {"nodeName": "n1", "hostNetwork": true, "containers": []},
                     "status": {"phase": "Succeeded"}}
                ]),
                None,
            ),
        );
        let s = api
            .expect(
                "GET",
                "/apis/vpcresources.k8s.aws/v1beta1/securitygrouppolicies",
                Some("&limit=500"),
            )
            .await;
        reply(
            s.send,
            StatusCode::OK,
            &list(
                "SecurityGroupPolicy",
                "vpcresources.k8s.aws/v1beta1",
                json!([
                    {"apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
                     "metadata": {"namespace": "ns", "name": "p"},
                     "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "securityGroups": {"groupIds": ["sg-1"]}}},
                    {"apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
                     "metadata": {"namespace": "ns", "name": "bad"},
                     "spec": {"securityGroups": {"groupIds": "sg-1"}}}
                ]),
                None,
            ),
        );
        let s = api
            .expect("GET", "/api/v1/serviceaccounts", Some("&limit=500"))
            .await;
        reply(
            s.send,
            StatusCode::OK,
            &list(
                "ServiceAccount",
                "v1",
                json!([
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "ns", "name": "pci", "labels": {"role": "pci"}}}
                ]),
                None,
            ),
        );

        // create_cni_node: the body, then an AlreadyExists that is not an error.
        let s = api
            .expect(
                "POST",
                "/apis/vpcresources.k8s.aws/v1alpha1/cninodes",
                Some(""),
            )
            .await;
        let body = s.body.expect("body");
        assert_eq!(body["metadata"]["name"], "n1");
        assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(body["metadata"]["labels"]["kubernetes.io/os"], "linux");
        assert_eq!(body["spec"]["tags"]["cluster.k8s.amazonaws.com/name"], "c1");
        assert_eq!(
            body["spec"]["tags"]["node.k8s.amazonaws.com/instance_id"],
            "i-0abc"
        );
        assert!(body["metadata"].get("finalizers").is_none());
        reply(s.send, StatusCode::CREATED, &body);
        let s = api
            .expect(
                "POST",
                "/apis/vpcresources.k8s.aws/v1alpha1/cninodes",
                Some(""),
            )
            .await;
        reply(
            s.send,
            StatusCode::CONFLICT,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
        );

        // label_trunk_attached: a merge patch of one label.
        let s = api.expect("PATCH", "/api/v1/nodes/n1", Some("")).await;
        assert_eq!(
            s.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(
            s.body.expect("body"),
            json!({"metadata": {"labels": {"vpc.amazonaws.com/has-trunk-attached": "true"}}})
        );
        reply(
            s.send,
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
        );

        // annotate_pod: uid precondition and the reference's JSON; a 409 is an error.
        for code in [StatusCode::OK, StatusCode::CONFLICT] {
            let s = api
                .expect("PATCH", "/api/v1/namespaces/ns/pods/db", Some(""))
                .await;
            assert_eq!(
                s.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            let body = s.body.expect("body");
            assert_eq!(body["metadata"]["uid"], "pu1");
            let value: Value = serde_json::from_str(
                body["metadata"]["annotations"][POD_ENI_ANNOTATION]
                    .as_str()
                    .expect("string"),
            )
            .expect("json");
            assert_eq!(
                value,
                json!([{"eniId": "eni-9", "ifAddress": "02:00:00:00:00:09", "privateIp": "10.0.1.9",
                "ipv6Addr": "", "vlanId": 7, "subnetCidr": "10.0.1.0/24", "subnetV6Cidr": "", "associationID": "trunk-assoc-1"}])
            );
            if code == StatusCode::OK {
                reply(
                    s.send,
                    code,
                    &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db", "namespace": "ns"}}),
                );
            } else {
                reply(
                    s.send,
                    code,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Conflict", "code": 409, "message": "Precondition failed: UID"}),
                );
            }
        }

        // event: core/v1 on the pod.
        let s = api
            .expect("POST", "/api/v1/namespaces/ns/events", Some(""))
            .await;
        let body = s.body.expect("body");
        assert_eq!(body["involvedObject"]["kind"], "Pod");
        assert_eq!(body["involvedObject"]["uid"], "pu1");
        assert_eq!(body["reason"], "BranchAllocationFailed");
        assert_eq!(body["source"]["component"], "vpc-resource-controller");
        reply(s.send, StatusCode::CREATED, &body);
        api.needs
    });

    let (cluster, warnings) = kube.observe().await.expect("observe");
    assert_eq!(cluster.nodes.len(), 2);
    let n1 = &cluster.nodes[0];
    assert_eq!(n1.instance_id, Ok("i-0abc".to_owned()));
    assert!(n1.wants_trunk && !n1.labelled_attached && !n1.has_cni_node);
    let n2 = &cluster.nodes[1];
    assert!(n2.wants_trunk, "the CNINode feature asks for a trunk");
    assert!(n2.has_cni_node);
    assert_eq!(cluster.pods.len(), 2);
    assert_eq!(cluster.pods[0].service_account, "pci");
    assert_eq!(
        cluster.pods[0]
            .annotation
            .as_ref()
            .expect("annotation")
            .as_ref()
            .expect("parsed")[0]
            .vlan_id,
        3
    );
    assert!(cluster.pods[1].terminal && cluster.pods[1].host_network);
    assert_eq!(cluster.policies.len(), 1);
    assert_eq!(cluster.service_accounts.len(), 1);
    let objects: Vec<&str> = warnings.iter().map(|w| w.object.as_str()).collect();
    assert_eq!(
        objects,
        ["Node broken", "SecurityGroupPolicy ns/bad"],
        "{warnings:?}"
    );
    assert!(
        warnings[0].why.starts_with("metadata.labels"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].why.starts_with("spec.securityGroups.groupIds"),
        "{warnings:?}"
    );

    kube.create_cni_node("n1", "u1", "linux", "i-0abc")
        .await
        .expect("created");
    kube.create_cni_node("n1", "u1", "linux", "i-0abc")
        .await
        .expect("exists is fine");
    kube.label_trunk_attached("n1").await.expect("label");
    let pod = PodKey {
        namespace: "ns".into(),
        name: "db".into(),
    };
    let b = BranchEni {
        eni_id: "eni-9".into(),
        if_address: "02:00:00:00:00:09".into(),
        private_ip: "10.0.1.9".into(),
        ipv6_addr: String::new(),
        vlan_id: 7,
        subnet_cidr: "10.0.1.0/24".into(),
        subnet_v6_cidr: String::new(),
        association_id: "trunk-assoc-1".into(),
    };
    kube.annotate_pod(&pod, "pu1", std::slice::from_ref(&b))
        .await
        .expect("annotated");
    let err = kube
        .annotate_pod(&pod, "pu1", &[b])
        .await
        .expect_err("uid mismatch");
    assert!(err.is_conflict(), "{err}");
    kube.event(
        &Involved {
            kind: "Pod",
            namespace: "ns",
            name: "db",
            uid: "pu1",
        },
        "Warning",
        "BranchAllocationFailed",
        "no",
    )
    .await
    .expect("event");

    let needs = server.await.expect("verifier");
    let published: BTreeSet<RbacNeed> = API_REQUESTS
        .iter()
        .map(|r| RbacNeed::Resource {
            verb: r.verb.to_owned(),
            group: r.group.to_owned(),
            resource: r.resource.to_owned(),
        })
        .collect();
    assert_eq!(needs, published);
}
