//! Inputs that the fuzz targets (`fuzz_inputs.rs`, `fuzz_http.rs`) found to break a parser,
//! each kept literally as a named test. Each test fails on the code before its fix.

use std::path::Path;
use std::time::Duration;

use ipamd::store::checkpoint::{parse, CheckpointError, CheckpointStore, FileStore};
use ipamd::store::datastore::{DataStore, DsError, EniSpec, IpamKey};

fn store_v4() -> DataStore {
    let mut ds = DataStore::new(false, false, false, Duration::from_secs(30));
    ds.add_eni(
        EniSpec {
            id: "eni-0".into(),
            mac: "02:00:00:00:00:01".into(),
            is_primary: true,
            is_trunk: false,
            is_efa: false,
            device_number: 0,
            primary_ip: "10.0.0.5".parse().expect("ip"),
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/24".parse().expect("cidr"),
            excluded: false,
        },
        Duration::ZERO,
    );
    for i in 10..20 {
        ds.add_cidr(
            "eni-0",
            format!("10.0.0.{i}/32").parse().expect("cidr"),
            false,
        )
        .expect("cidr");
    }
    ds
}

// --- checkpoint ---------------------------------------------------------------------------

/// Found by `checkpoint_wrong_types_name_the_field`: a wrong JSON type in an allocation gave
/// "checkpoint ... is corrupt" with no word of which field.
#[test]
fn checkpoint_wrong_type_names_the_field_path() {
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.0.10"},{"networkName":"aws-cni","containerID":"b","ifName":"eth0","ipv4":5}]}"#;
    let e = parse(Path::new("/x/ipam.json"), bytes).expect_err("refused");
    let text = e.to_string();
    assert!(text.contains("allocations[1].ipv4"), "{text}");
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.0.10","metadata":{"interfacesCount":"one"}}]}"#;
    let text = parse(Path::new("x"), bytes)
        .expect_err("refused")
        .to_string();
    assert!(
        text.contains("allocations[0].metadata.interfacesCount"),
        "{text}"
    );
}

/// Found in review while writing `checkpoint_huge_files_are_bounded` (which failed too: a
/// 64 MiB file was read and parsed whole): a checkpoint path that names an endless device
/// (`/dev/zero`) was read into memory without end; any file past the limit is now refused
/// after reading one byte more than the limit.
#[test]
fn checkpoint_endless_file_is_refused_not_read_whole() {
    let s = FileStore::new("/dev/zero");
    match s.read() {
        Err(CheckpointError::TooLarge { limit, .. }) => {
            assert_eq!(limit, ipamd::store::checkpoint::MAX_FILE_BYTES)
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// Found by `restore_accepts_exactly_the_parsed_entries`: the same pod key twice (with two
/// addresses) was accepted; the first address then stayed held by a key that no DEL could
/// find (a leak for good).
#[test]
fn restore_refuses_one_key_holding_two_addresses() {
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"c","ifName":"eth0","ipv4":"10.0.0.10"},{"networkName":"aws-cni","containerID":"c","ifName":"eth0","ipv4":"10.0.0.11"}]}"#;
    let file = parse(Path::new("x"), bytes).expect("parses");
    let mut ds = store_v4();
    let e = ds.restore(&file, &|_, _| true).expect_err("refused");
    assert!(matches!(e, DsError::DuplicateKey(_)), "{e:?}");
    assert!(e.to_string().contains("containerID"), "{e}");
    assert!(ds.assignments().is_empty(), "nothing restored");
    // The same container with two interfaces is two keys: both restored.
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"c","ifName":"eth0","ipv4":"10.0.0.10"},{"networkName":"aws-cni","containerID":"c","ifName":"eth1","ipv4":"10.0.0.11"}]}"#;
    let file = parse(Path::new("x"), bytes).expect("parses");
    let mut ds = store_v4();
    assert_eq!(ds.restore(&file, &|_, _| true).expect("ok").restored, 2);
    assert_eq!(
        ds.lookup(&IpamKey::new("aws-cni", "c", "eth1"))
            .map(|ip| ip.to_string()),
        Some("10.0.0.11".to_owned())
    );
}

/// Found by `restore_refusal_changes_nothing`: a duplicate address late in the file was
/// refused only after the entries before it had been restored into the datastore.
#[test]
fn restore_refusal_leaves_the_datastore_unchanged() {
    let bytes = br#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.0.10"},{"networkName":"aws-cni","containerID":"b","ifName":"eth0","ipv4":"10.0.0.12"},{"networkName":"aws-cni","containerID":"c","ifName":"eth0","ipv4":"10.0.0.10"}]}"#;
    let file = parse(Path::new("x"), bytes).expect("parses");
    let mut ds = store_v4();
    assert_eq!(
        ds.restore(&file, &|_, _| true),
        Err(DsError::DuplicateIp("10.0.0.10".into()))
    );
    assert!(ds.assignments().is_empty());
    assert!(ds.checkpoint().allocations.is_empty());
}

// --- environment variables ----------------------------------------------------------------

/// Found by `every_variable_with_every_edge_value`: `VPC_CNI_DEMAND_LEAD_TIME` longer than
/// the default window was refused as `VPC_CNI_DEMAND_WINDOW=""`, naming a variable that was
/// not set and not the one that was.
#[test]
fn demand_lead_time_past_the_window_names_both_variables() {
    let e = ipamd::config::Config::for_test(&[("VPC_CNI_DEMAND_LEAD_TIME", "31536000")])
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("VPC_CNI_DEMAND_LEAD_TIME") && e.contains("VPC_CNI_DEMAND_WINDOW"),
        "{e}"
    );
}

/// Found by `every_variable_with_every_edge_value`: a duration of `u64::MAX` seconds was
/// accepted, and `Instant::now() + VPC_CNI_ENI_LINK_WAIT` (the wait for a new ENI's link)
/// then panics with an overflow on the first ENI attach.
#[test]
fn a_duration_past_the_clock_is_refused_naming_the_variable() {
    for (var, v) in [
        ("VPC_CNI_ENI_LINK_WAIT", "18446744073709551615"),
        ("VPC_CNI_POOL_TICK", "5124095576030431h"),
        ("IP_COOLDOWN_PERIOD", "9223372036854775807"),
        ("HTTP_TIMEOUT", "9223372036854775807"),
    ] {
        let e = ipamd::config::Config::for_test(&[(var, v)])
            .expect_err("refused")
            .to_string();
        assert!(e.contains(var), "{e}");
    }
    let cfg = ipamd::config::Config::for_test(&[("VPC_CNI_ENI_LINK_WAIT", "31536000")])
        .expect("a year is accepted");
    assert!(std::time::Instant::now()
        .checked_add(cfg.eni_link_wait)
        .is_some());
}

// --- gRPC requests ------------------------------------------------------------------------

mod grpc {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    use ipamd::serve::grpc::{Backend, BackendEvents, ReplySettings, VERSION};
    use ipamd::store::checkpoint::MemoryStore;
    use ipamd::store::commit::{PoolState, TokioClock};
    use tonic::{Code, Request};
    use vpc_cni_rpc::{AddNetworkRequest, CniBackend, DelNetworkRequest};

    #[derive(Default)]
    struct Reasons(Mutex<BTreeSet<String>>);

    impl BackendEvents for Reasons {
        fn del_request(&self, reason: &str) {
            self.0.lock().expect("lock").insert(reason.to_owned());
        }
    }

    fn backend() -> (Arc<PoolState>, Backend, Arc<Reasons>) {
        let st = Arc::new(PoolState::new(
            super::store_v4(),
            Box::new(MemoryStore::default()),
            Arc::new(TokioClock::new()),
        ));
        let reasons = Arc::new(Reasons::default());
        let b = Backend::new(st.clone(), ReplySettings::default()).with_events(reasons.clone());
        (st, b, reasons)
    }

    fn add(container: &str, ifname: &str) -> AddNetworkRequest {
        AddNetworkRequest {
            client_version: VERSION.into(),
            k8s_pod_name: "web-0".into(),
            k8s_pod_namespace: "default".into(),
            container_id: container.into(),
            if_name: ifname.into(),
            network_name: "aws-cni".into(),
            ..Default::default()
        }
    }

    /// Found by `grpc_requests_are_served_or_refused_naming_the_field`: every distinct
    /// DelNetwork `Reason` became a new series of `awscni_del_ip_req_count` (a client could
    /// grow the daemon's memory and the scrape without bound).
    #[tokio::test]
    async fn an_unknown_del_reason_is_one_metric_label() {
        let (_st, b, reasons) = backend();
        for reason in ["2333d_l92", "x", "PodDeleted"] {
            let _ = b
                .del_network(Request::new(DelNetworkRequest {
                    client_version: VERSION.into(),
                    container_id: "c".into(),
                    if_name: "eth0".into(),
                    network_name: "aws-cni".into(),
                    reason: reason.into(),
                    ..Default::default()
                }))
                .await;
        }
        let seen: Vec<String> = reasons.0.lock().expect("lock").iter().cloned().collect();
        assert_eq!(seen, ["PodDeleted", "other"]);
    }

    /// Found by `grpc_requests_are_served_or_refused_naming_the_field`: an interface name
    /// with a newline (and container ids of any size or characters) got an address and went
    /// into the checkpoint and the logs.
    #[tokio::test]
    async fn a_key_no_plugin_can_send_is_refused_naming_the_field() {
        let (st, b, _) = backend();
        let huge = "a".repeat(1 << 20);
        for (req, field) in [
            (add("o_e-n_zq_-__sa", "a\nb"), "IfName"),
            (add(&huge, "eth0"), "ContainerID"),
            (add("a/../b", "eth0"), "ContainerID"),
            (add("c1", "eth0-with-a-long-name"), "IfName"),
        ] {
            let e = b.add_network(Request::new(req)).await.expect_err("refused");
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().starts_with(field), "{}", e.message());
        }
        assert!(st.lock().assignments().is_empty(), "nothing assigned");
    }

    /// Found by `grpc_requests_are_served_or_refused_naming_the_field`: an AddNetwork without
    /// a container id answered `Success=false` like an empty pool, so the plugin waited for an
    /// address that could never come; a wrong version's message named no field.
    #[tokio::test]
    async fn an_empty_key_field_and_a_wrong_version_are_named() {
        let (_st, b, _) = backend();
        let e = b
            .add_network(Request::new(add("", "eth0")))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("ContainerID"), "{}", e.message());
        let mut r = add("c1", "eth0");
        r.client_version = "\u{0}".into();
        let e = b.add_network(Request::new(r)).await.expect_err("refused");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("ClientVersion"), "{}", e.message());
    }
}

/// Found by `node_and_eni_config_objects_are_used_or_refused_naming_the_field` (the same
/// holds for the checkpoint): a refusal quoted the whole refused value, a 1 MiB string made
/// a 1 MiB error message and log line.
#[test]
fn checkpoint_refusal_message_is_bounded() {
    let big = "x".repeat(1 << 20);
    let doc = format!(
        r#"{{"version":"vpc-cni-ipam/1","allocations":[{{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.0.1","allocationTimestamp":"{big}"}}]}}"#
    );
    let e = parse(Path::new("x"), doc.as_bytes())
        .expect_err("refused")
        .to_string();
    assert!(e.len() < 1024, "{} bytes", e.len());
    assert!(e.contains("allocations[0].allocationTimestamp"));
}

// --- ENIConfig and Node objects -----------------------------------------------------------

mod k8s {
    use http::{Request, Response};
    use ipamd::io::k8s::{K8s, K8sError};
    use kube::client::Body;
    use serde_json::{json, Value};

    /// Answers the Node GET with `node` and any ENIConfig GET with `eni`; returns the paths
    /// asked for.
    async fn node_eni_config(
        node: Value,
        eni: Value,
    ) -> (
        Result<(String, ipamd::io::k8s::EniConfigSpec), K8sError>,
        Vec<String>,
    ) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let path = req.uri().path().to_owned();
                let body = if path.starts_with("/api/v1/nodes/") {
                    &node
                } else {
                    &eni
                };
                paths.push(path);
                send.send_response(
                    Response::builder()
                        .status(200)
                        .body(Body::from(serde_json::to_vec(body).expect("json")))
                        .expect("response"),
                );
            }
            paths
        });
        let k = K8s::new(client, "n1", "aws-node-1", "kube-system");
        let r = k.node_eni_config().await;
        drop(k);
        (r, server.await.expect("server"))
    }

    fn node(label: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n1", "labels": {"k8s.amazonaws.com/eniConfig": label}}})
    }

    fn eni(spec: Value) -> Value {
        json!({"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
               "metadata": {"name": "a"}, "spec": spec})
    }

    fn bad_field(r: &Result<(String, ipamd::io::k8s::EniConfigSpec), K8sError>) -> String {
        match r {
            Err(K8sError::BadObject { field, .. }) => field.clone(),
            other => panic!("expected BadObject, got {other:?}"),
        }
    }

    /// Found by `node_and_eni_config_objects_are_used_or_refused_naming_the_field`: an
    /// ENIConfig whose subnet or security groups are no ids (empty, `bogus`) was taken, and
    /// EC2 was asked to create an ENI in subnet "".
    #[tokio::test]
    async fn an_eni_config_of_bogus_ids_is_refused_naming_the_field() {
        for (spec, field) in [
            (json!({"subnet": ""}), "spec.subnet"),
            (json!({"subnet": "not-a-subnet"}), "spec.subnet"),
            (
                json!({"subnet": "subnet-0123456789abcdef0", "securityGroups": ["sg-0123abcd", "bogus"]}),
                "spec.securityGroups[1]",
            ),
        ] {
            let (r, _) = node_eni_config(node("a"), eni(spec)).await;
            assert_eq!(bad_field(&r), field);
        }
        let (r, _) = node_eni_config(
            node("a"),
            eni(json!({"subnet": "subnet-0123456789abcdef0", "securityGroups": ["sg-0123abcd"]})),
        )
        .await;
        assert!(r.is_ok(), "{r:?}");
    }

    /// Found by `node_and_eni_config_objects_are_used_or_refused_naming_the_field`: a wrong
    /// JSON type in an ENIConfig gave kube's "invalid type: integer `5`, expected a string"
    /// without the field; and its message quoted a refused 64 KiB value whole.
    #[tokio::test]
    async fn a_wrong_type_in_an_eni_config_names_the_field_in_a_short_message() {
        let (r, _) = node_eni_config(node("a"), eni(json!({"subnet": 5}))).await;
        assert_eq!(bad_field(&r), "spec.subnet");
        let huge = format!("subnet-{}", "f".repeat(1 << 16));
        let (r, _) = node_eni_config(node("a"), eni(Value::String(huge))).await;
        assert_eq!(bad_field(&r), "spec");
        let text = r.expect_err("refused").to_string();
        assert!(text.len() < 2048, "{} bytes", text.len());
    }

    /// Found by `node_and_eni_config_objects_are_used_or_refused_naming_the_field`: a node
    /// label that is no object name (`../../api/v1/secrets/x`) went into the ENIConfig GET's
    /// path.
    #[tokio::test]
    async fn a_node_label_that_cannot_name_an_eni_config_is_refused_before_any_get() {
        let (r, paths) = node_eni_config(node("../../api/v1/secrets/x"), eni(json!({}))).await;
        assert_eq!(
            bad_field(&r),
            r#"metadata.labels["k8s.amazonaws.com/eniConfig"]"#
        );
        assert_eq!(paths, ["/api/v1/nodes/n1"], "no ENIConfig GET");
    }
}
