//! Real round trips over a unix socket in a temporary directory: an in-test `CNIBackend`
//! served with `serve_unix`, clients made with `connect_unix` and `check_health`.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};
use vpc_cni_rpc::{
    bind_unix, check_client_version, check_health, connect_unix, connect_unix_direct,
    health_service, is_unknown_pod, serve_unix, AddNetworkReply, AddNetworkRequest, ClientError,
    CniBackend, CniBackendServer, DelNetworkReply, DelNetworkRequest, HealthHandle,
    IpAllocationMetadata, ServeError, ServingStatus, HEALTH_SERVICE, REASON_POD_DELETED,
    UNKNOWN_POD,
};

const VERSION: &str = "v-test";
const TIMEOUT: Duration = Duration::from_secs(5);

/// A tiny ipamd: one fixed pod ("default/known") has an address, every other pod is unknown.
struct FakeIpamd;

#[tonic::async_trait]
impl CniBackend for FakeIpamd {
    async fn add_network(
        &self,
        request: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let r = request.into_inner();
        check_client_version(&r.client_version, VERSION)?;
        Ok(Response::new(AddNetworkReply {
            success: true,
            ip_allocation_metadata: vec![IpAllocationMetadata {
                i_pv4_addr: "10.0.0.7".into(),
                device_number: 1,
                route_table_id: 2,
                ..Default::default()
            }],
            // Echo the key so the test sees the request arrived intact.
            network_policy_mode: format!("{}/{}/{}", r.network_name, r.container_id, r.if_name),
            ..Default::default()
        }))
    }

    async fn del_network(
        &self,
        request: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let r = request.into_inner();
        check_client_version(&r.client_version, VERSION)?;
        if r.k8s_pod_namespace == "default" && r.k8s_pod_name == "known" {
            Ok(Response::new(DelNetworkReply {
                success: true,
                ip_allocation_metadata: vec![IpAllocationMetadata {
                    i_pv4_addr: "10.0.0.7".into(),
                    ..Default::default()
                }],
                network_policy_mode: r.reason,
                ..Default::default()
            }))
        } else {
            Err(Status::unknown(format!(
                "1 error occurred:\n\t* {UNKNOWN_POD}\n\n"
            )))
        }
    }
}

struct Running {
    path: PathBuf,
    health: HealthHandle,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// Starts the fake ipamd with health on `path` and waits until the socket accepts connections.
async fn start(path: &Path) -> Running {
    let (health, health_server) = health_service().await;
    let routes = Routes::new(CniBackendServer::new(FakeIpamd)).add_service(health_server);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_unix(path.to_path_buf(), routes, async {
        let _ = stopped.await;
    }));
    wait_until_accepting(path).await;
    Running {
        path: path.to_path_buf(),
        health,
        stop,
        task,
    }
}

/// Polls (bounded) until the health service answers; the server binds inside its task.
async fn wait_until_accepting(path: &Path) {
    for _ in 0..500 {
        if check_health(path, "", TIMEOUT).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server on {} never accepted a connection", path.display());
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("server task did not panic")
            .expect("server stopped cleanly");
        assert!(
            !self.path.exists(),
            "socket file is removed after a clean shutdown"
        );
    }
}

fn add_request(version: &str) -> AddNetworkRequest {
    AddNetworkRequest {
        client_version: version.into(),
        k8s_pod_name: "known".into(),
        k8s_pod_namespace: "default".into(),
        container_id: "c0ffee".into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        netns: "/var/run/netns/cni-1".into(),
        ..Default::default()
    }
}

fn del_request(namespace: &str, name: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: name.into(),
        k8s_pod_namespace: namespace.into(),
        container_id: "c0ffee".into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        reason: REASON_POD_DELETED.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_del_round_trip_over_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    let server = start(&path).await;

    let mut client = connect_unix(&path, TIMEOUT).await.expect("connect");
    let reply = client
        .add_network(add_request(VERSION))
        .await
        .expect("AddNetwork")
        .into_inner();
    assert!(reply.success);
    assert_eq!(reply.network_policy_mode, "aws-cni/c0ffee/eth0");
    assert_eq!(reply.ip_allocation_metadata.len(), 1);
    assert_eq!(reply.ip_allocation_metadata[0].i_pv4_addr, "10.0.0.7");
    assert_eq!(reply.ip_allocation_metadata[0].device_number, 1);
    assert_eq!(reply.ip_allocation_metadata[0].route_table_id, 2);

    let reply = client
        .del_network(del_request("default", "known"))
        .await
        .expect("DelNetwork")
        .into_inner();
    assert!(reply.success);
    assert_eq!(reply.network_policy_mode, REASON_POD_DELETED);
    assert_eq!(reply.ip_allocation_metadata[0].i_pv4_addr, "10.0.0.7");

    server.stop().await;
}

#[tokio::test]
async fn a_wrong_client_version_is_refused_with_failed_precondition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    let server = start(&path).await;

    let mut client = connect_unix(&path, TIMEOUT).await.expect("connect");
    let status = client
        .add_network(add_request("v-other"))
        .await
        .expect_err("version mismatch must fail");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().starts_with("wrong client version"),
        "{}",
        status.message()
    );

    server.stop().await;
}

#[tokio::test]
async fn del_of_an_unknown_pod_carries_the_marker_to_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    let server = start(&path).await;

    let mut client = connect_unix(&path, TIMEOUT).await.expect("connect");
    let status = client
        .del_network(del_request("default", "never-added"))
        .await
        .expect_err("unknown pod is an error on the wire");
    assert!(is_unknown_pod(&status), "{status:?}");
    assert_ne!(
        status.message(),
        UNKNOWN_POD,
        "the marker sits in a longer message"
    );

    server.stop().await;
}

#[tokio::test]
async fn the_socket_has_mode_0660_and_a_created_parent_has_mode_0755() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parent = dir.path().join("var/run/aws-node");
    let path = parent.join("ipamd.sock");
    let server = start(&path).await;

    let meta = std::fs::metadata(&path).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    for d in [dir.path().join("var"), dir.path().join("var/run"), parent] {
        let mode = std::fs::metadata(&d).expect("dir").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{}", d.display());
    }

    server.stop().await;
}

#[tokio::test]
async fn an_existing_parent_directory_keeps_its_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let path = dir.path().join("ipamd.sock");
    let server = start(&path).await;
    let mode = std::fs::metadata(dir.path())
        .expect("dir")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o700);
    server.stop().await;
}

#[tokio::test]
async fn a_stale_socket_from_an_earlier_run_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    // A socket bound and dropped without unlinking: what a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind stale socket"));
    assert!(path.exists());
    let err = connect_unix(&path, TIMEOUT)
        .await
        .expect_err("nobody listens on a stale socket");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::ConnectionRefused));

    let server = start(&path).await;
    let mut client = connect_unix(&path, TIMEOUT).await.expect("connect");
    assert!(
        client
            .add_network(add_request(VERSION))
            .await
            .expect("AddNetwork")
            .into_inner()
            .success
    );
    server.stop().await;
}

#[tokio::test]
async fn a_stale_regular_file_is_replaced_but_a_directory_is_not_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    std::fs::write(&path, b"junk").expect("write");
    let listener = bind_unix(&path).expect("bind over a stale file");
    assert!(std::fs::metadata(&path)
        .expect("socket")
        .file_type()
        .is_socket());
    drop(listener);

    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).expect("mkdir");
    std::fs::write(busy.join("keep"), b"data").expect("write");
    let err = bind_unix(&busy).expect_err("a directory is not a stale socket");
    assert!(matches!(err, ServeError::RemoveStale { .. }), "{err:?}");
    assert!(busy.join("keep").exists());
}

#[tokio::test]
async fn health_is_not_serving_until_told_then_serving_for_both_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    let server = start(&path).await;

    for service in ["", HEALTH_SERVICE] {
        let status = check_health(&path, service, TIMEOUT).await.expect("check");
        assert_eq!(status, ServingStatus::NotServing, "{service:?}");
    }
    server.health.set_serving().await;
    for service in ["", HEALTH_SERVICE] {
        let status = check_health(&path, service, TIMEOUT).await.expect("check");
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    server.health.set_not_serving().await;
    let status = check_health(&path, "", TIMEOUT).await.expect("check");
    assert_eq!(status, ServingStatus::NotServing);

    let err = check_health(&path, "no.such.Service", TIMEOUT)
        .await
        .expect_err("unknown service");
    match err {
        ClientError::Health { source, .. } => assert_eq!(source.code(), Code::NotFound),
        other => panic!("unexpected error {other:?}"),
    }

    server.stop().await;
}

#[tokio::test]
async fn connecting_to_a_missing_socket_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.sock");

    let err = connect_unix(&path, Duration::from_secs(30))
        .await
        .expect_err("no socket, no client");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
    assert!(err.to_string().contains("missing.sock"), "{err}");

    let err = check_health(&path, "", Duration::from_secs(30))
        .await
        .expect_err("no socket, no health");
    assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
}

#[test]
fn the_client_works_on_a_current_thread_runtime_like_the_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server = start(&path).await;
        let mut client = connect_unix(&path, TIMEOUT).await.expect("connect");
        let reply = client
            .add_network(add_request(VERSION))
            .await
            .expect("AddNetwork");
        assert!(reply.into_inner().success);
        drop(client);
        server.stop().await;
    });
}

#[test]
fn the_direct_client_round_trips_on_a_current_thread_runtime_and_reports_dial_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ipamd.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let err = connect_unix_direct(dir.path().join("missing.sock"), TIMEOUT)
            .await
            .expect_err("no socket, no client");
        assert!(matches!(err, ClientError::Dial { .. }), "{err:?}");
        assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
        assert!(err.to_string().contains("missing.sock"), "{err}");

        let server = start(&path).await;
        let mut client = connect_unix_direct(&path, TIMEOUT).await.expect("connect");
        let reply = client
            .add_network(add_request(VERSION))
            .await
            .expect("AddNetwork")
            .into_inner();
        assert!(reply.success);
        assert_eq!(reply.network_policy_mode, "aws-cni/c0ffee/eth0");
        assert_eq!(reply.ip_allocation_metadata[0].route_table_id, 2);
        // A second call on the same connection; a server status comes through unchanged.
        let status = client
            .del_network(del_request("default", "nobody"))
            .await
            .expect_err("unknown pod");
        assert!(is_unknown_pod(&status), "{status:?}");
        let status = client
            .add_network(add_request("v-other"))
            .await
            .expect_err("wrong version");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        drop(client);
        server.stop().await;
    });
}
