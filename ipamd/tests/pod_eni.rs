//! Security groups for pods in the gRPC backend (spec/ipamd.md 4.4 step 2, 4.5 step 4):
//! AddNetwork and DelNetwork through the `CNIBackend` service with a real `kube::Client`
//! over a tower-test verifier (which asserts each pod GET and answers it) and a fake host link
//! lookup standing in for netlink.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use ipamd::io::host::{HostError, PodEniHost};
use ipamd::io::k8s::K8s;
use ipamd::serve::grpc::{Backend, PodEniSupport, ReplySettings, VERSION};
use ipamd::store::checkpoint::FileStore;
use ipamd::store::commit::{PoolState, TokioClock};
use ipamd::store::datastore::{DataStore, EniSpec};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tonic::Request as GrpcRequest;
use tower_test::mock::Handle;
use vpc_cni_rpc::{AddNetworkRequest, CniBackend, DelNetworkRequest};

const TRUNK_MAC: &str = "02:00:00:00:00:7e";
const TRUNK_INDEX: u32 = 7;
const ANNOTATION: &str = r#"[{"eniId":"eni-0b1","ifAddress":"0a:00:00:00:00:01","privateIp":"10.0.1.5","vlanId":3,"subnetCidr":"10.0.1.0/24","subnetV6Cidr":"","associationID":"a-1"}]"#;

/// The host's links by MAC.
#[derive(Default)]
struct FakeLinks {
    by_mac: Mutex<BTreeMap<String, u32>>,
}

#[async_trait::async_trait]
impl PodEniHost for FakeLinks {
    async fn link_index_by_mac(&self, mac: &str) -> Result<Option<u32>, HostError> {
        Ok(self.by_mac.lock().unwrap().get(mac).copied())
    }
    async fn move_local_rule(&self) -> Result<bool, HostError> {
        Ok(false)
    }
}

fn datastore(with_trunk: bool) -> DataStore {
    let mut ds = DataStore::new(false, false, false, Duration::from_secs(30));
    let eni = |id: &str, mac: &str, primary: bool, trunk: bool, dev: u32, ip: &str| EniSpec {
        id: id.into(),
        mac: mac.into(),
        is_primary: primary,
        is_trunk: trunk,
        is_efa: false,
        device_number: dev,
        primary_ip: ip.parse().unwrap(),
        subnet_id: "subnet-1".into(),
        subnet_cidr: "10.0.0.0/24".parse().unwrap(),
        excluded: false,
    };
    ds.add_eni(
        eni("eni-0", "02:00:00:00:00:01", true, false, 0, "10.0.0.5"),
        Duration::ZERO,
    );
    ds.add_cidr("eni-0", "10.0.0.10/32".parse().unwrap(), false)
        .unwrap();
    if with_trunk {
        ds.add_eni(
            eni("eni-trunk", TRUNK_MAC, false, true, 2, "10.0.0.6"),
            Duration::ZERO,
        );
    }
    ds
}

struct Node {
    backend: Backend,
    state: Arc<PoolState>,
    api: Handle<Request<Body>, Response<Body>>,
    _dir: tempfile::TempDir,
}

fn node(with_trunk: bool, trunk_link: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(PoolState::new(
        datastore(with_trunk),
        Box::new(FileStore::new(dir.path().join("ipam.json"))),
        Arc::new(TokioClock::new()),
    ));
    let (service, api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let k8s = K8s::new(
        Client::new(service, "default"),
        "node-1",
        "aws-node",
        "kube-system",
    );
    let links = FakeLinks::default();
    if trunk_link {
        links
            .by_mac
            .lock()
            .unwrap()
            .insert(TRUNK_MAC.into(), TRUNK_INDEX);
    }
    let backend = Backend::new(
        state.clone(),
        ReplySettings {
            vpc_cidrs: vec!["10.0.0.0/16".into()],
            network_policy_mode: "standard".into(),
            ..Default::default()
        },
    )
    .with_pod_eni(PodEniSupport {
        k8s,
        host: Arc::new(links),
    });
    Node {
        backend,
        state,
        api,
        _dir: dir,
    }
}

fn pod(uid: &str, branch: bool, annotation: Option<&str>) -> Value {
    let mut c = json!({"name": "app", "image": "i"});
    if branch {
        c["resources"] = json!({"limits": {"vpc.amazonaws.com/pod-eni": "1", "cpu": "1"}});
    }
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "uid": uid, "resourceVersion": "4"},
        "spec": {"containers": [c]}
    });
    if let Some(a) = annotation {
        p["metadata"]["annotations"] = json!({ "vpc.amazonaws.com/pod-eni": a });
    }
    p
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

/// Answers the next request, which must be the GET of pod `shop/web-0`.
async fn answer_pod_get(
    api: &mut Handle<Request<Body>, Response<Body>>,
    code: StatusCode,
    body: Value,
) {
    let (req, send) = api.next_request().await.expect("a pod GET");
    assert_eq!(req.method(), "GET");
    assert_eq!(req.uri().path(), "/api/v1/namespaces/shop/pods/web-0");
    send.send_response(
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

fn add(container: &str) -> AddNetworkRequest {
    AddNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: "web-0".into(),
        k8s_pod_namespace: "shop".into(),
        container_id: container.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        ..Default::default()
    }
}

fn del(container: &str, uid: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: "web-0".into(),
        k8s_pod_namespace: "shop".into(),
        k8s_pod_uid: uid.into(),
        container_id: container.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        reason: vpc_cni_rpc::REASON_POD_DELETED.into(),
        ..Default::default()
    }
}

fn allocations(st: &PoolState) -> usize {
    st.lock().checkpoint().allocations.len()
}

#[tokio::test]
async fn a_branch_eni_pod_is_answered_from_its_annotation_and_the_trunk_link() {
    let mut n = node(true, true);
    let (reply, ()) = tokio::join!(
        n.backend.add_network(GrpcRequest::new(add("c1"))),
        answer_pod_get(
            &mut n.api,
            StatusCode::OK,
            pod("u1", true, Some(ANNOTATION))
        )
    );
    let r = reply.unwrap().into_inner();
    assert!(r.success);
    assert_eq!(r.ip_allocation_metadata.len(), 1);
    let ip = &r.ip_allocation_metadata[0];
    assert_eq!(ip.i_pv4_addr, "10.0.1.5");
    assert_eq!((ip.device_number, ip.route_table_id), (-1, 0));
    assert_eq!(r.pod_vlan_id, 3);
    assert_eq!(r.pod_enimac, "0a:00:00:00:00:01");
    assert_eq!(r.pod_eni_subnet_gw, "10.0.1.1");
    assert_eq!(r.parent_if_index, TRUNK_INDEX as i32);
    assert_eq!(r.vp_cv4_cid_rs, vec!["10.0.0.0/16".to_owned()]);
    assert_eq!(r.network_policy_mode, "standard");
    assert_eq!(allocations(&n.state), 0, "no datastore involvement");
}

#[tokio::test]
async fn an_ordinary_pod_with_sgp_on_gets_a_datastore_address() {
    let mut n = node(true, true);
    let (reply, ()) = tokio::join!(
        n.backend.add_network(GrpcRequest::new(add("c1"))),
        answer_pod_get(&mut n.api, StatusCode::OK, pod("u1", false, None))
    );
    let r = reply.unwrap().into_inner();
    assert!(r.success);
    assert_eq!(r.ip_allocation_metadata[0].i_pv4_addr, "10.0.0.10");
    assert_eq!(r.ip_allocation_metadata[0].route_table_id, 254);
    assert_eq!(r.pod_vlan_id, 0);
    assert_eq!(r.parent_if_index, 0);
    assert_eq!(allocations(&n.state), 1);
}

#[tokio::test]
async fn a_branch_pod_without_trunk_link_or_usable_annotation_gets_success_false() {
    let bad_vlan = ANNOTATION.replace("\"vlanId\":3", "\"vlanId\":0");
    let no_mac = ANNOTATION.replace("0a:00:00:00:00:01", "");
    let bad_subnet = ANNOTATION.replace("10.0.1.0/24", "10.0.1.0");
    let cases: Vec<(&str, bool, bool, StatusCode, Value)> = vec![
        (
            "pod unreadable",
            true,
            true,
            StatusCode::INTERNAL_SERVER_ERROR,
            status(500, "InternalError"),
        ),
        (
            "pod gone",
            true,
            true,
            StatusCode::NOT_FOUND,
            status(404, "NotFound"),
        ),
        (
            "no annotation yet",
            true,
            true,
            StatusCode::OK,
            pod("u1", true, None),
        ),
        (
            "vlan 0",
            true,
            true,
            StatusCode::OK,
            pod("u1", true, Some(&bad_vlan)),
        ),
        (
            "no MAC",
            true,
            true,
            StatusCode::OK,
            pod("u1", true, Some(&no_mac)),
        ),
        (
            "bad subnet",
            true,
            true,
            StatusCode::OK,
            pod("u1", true, Some(&bad_subnet)),
        ),
        (
            "no trunk ENI",
            false,
            true,
            StatusCode::OK,
            pod("u1", true, Some(ANNOTATION)),
        ),
        (
            "no trunk link",
            true,
            false,
            StatusCode::OK,
            pod("u1", true, Some(ANNOTATION)),
        ),
    ];
    for (what, trunk, link, code, body) in cases {
        let mut n = node(trunk, link);
        let (reply, ()) = tokio::join!(
            n.backend.add_network(GrpcRequest::new(add("c1"))),
            answer_pod_get(&mut n.api, code, body)
        );
        let r = reply.expect("Success=false, not a gRPC error").into_inner();
        assert!(!r.success, "{what}");
        assert!(r.ip_allocation_metadata.is_empty(), "{what}");
        assert_eq!(
            allocations(&n.state),
            0,
            "{what}: the datastore is not used"
        );
    }
}

#[tokio::test]
async fn del_of_an_unknown_pod_with_sgp_follows_the_pod_object() {
    // Gone from the API server: done.
    let mut n = node(true, true);
    let (reply, ()) = tokio::join!(
        n.backend.del_network(GrpcRequest::new(del("c1", "u1"))),
        answer_pod_get(&mut n.api, StatusCode::NOT_FOUND, status(404, "NotFound"))
    );
    assert!(reply.unwrap().into_inner().success);

    // A branch pod: released with its VLAN and address.
    let (reply, ()) = tokio::join!(
        n.backend.del_network(GrpcRequest::new(del("c1", "u1"))),
        answer_pod_get(
            &mut n.api,
            StatusCode::OK,
            pod("u1", true, Some(ANNOTATION))
        )
    );
    let r = reply.unwrap().into_inner();
    assert!(r.success);
    assert_eq!(r.pod_vlan_id, 3);
    assert_eq!(r.ip_allocation_metadata[0].i_pv4_addr, "10.0.1.5");

    // Another pod of the same name (new uid): a failure, and not one the plugin ignores.
    let (reply, ()) = tokio::join!(
        n.backend.del_network(GrpcRequest::new(del("c1", "u-old"))),
        answer_pod_get(
            &mut n.api,
            StatusCode::OK,
            pod("u1", true, Some(ANNOTATION))
        )
    );
    let e = reply.expect_err("uid mismatch");
    assert!(e.message().contains("UID mismatch"), "{e:?}");
    assert!(!vpc_cni_rpc::is_unknown_pod(&e), "{e:?}");

    // The API server failing: a failure too.
    let (reply, ()) = tokio::join!(
        n.backend.del_network(GrpcRequest::new(del("c1", "u1"))),
        answer_pod_get(
            &mut n.api,
            StatusCode::INTERNAL_SERVER_ERROR,
            status(500, "InternalError")
        )
    );
    let e = reply.expect_err("API server error");
    assert!(!vpc_cni_rpc::is_unknown_pod(&e), "{e:?}");

    // An ordinary pod unknown to the datastore: the unknown-pod contract stands.
    let (reply, ()) = tokio::join!(
        n.backend.del_network(GrpcRequest::new(del("c1", "u1"))),
        answer_pod_get(&mut n.api, StatusCode::OK, pod("u1", false, None))
    );
    let e = reply.expect_err("unknown pod");
    assert!(vpc_cni_rpc::is_unknown_pod(&e), "{e:?}");
}

#[tokio::test]
async fn del_of_a_known_pod_with_sgp_never_reads_the_pod() {
    let mut n = node(true, true);
    let (reply, ()) = tokio::join!(
        n.backend.add_network(GrpcRequest::new(add("c1"))),
        answer_pod_get(&mut n.api, StatusCode::OK, pod("u1", false, None))
    );
    assert!(reply.unwrap().into_inner().success);
    // The verifier would panic on any request: DEL must be served from the datastore alone.
    let r = n
        .backend
        .del_network(GrpcRequest::new(del("c1", "u1")))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert_eq!(r.ip_allocation_metadata[0].i_pv4_addr, "10.0.0.10");
    assert_eq!(allocations(&n.state), 0);
    drop(n.backend);
    assert!(n.api.next_request().await.is_none(), "no request was made");
}
