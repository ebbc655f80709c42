//! The served shell: fault injection and latency over HTTP, the admin endpoints, and the
//! binary's start-up line and clean SIGTERM stop.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::{client, code, fixture, serve, status};
use vpc_sim::control::{FaultSpec, LatencyModel, LatencySpec};
use vpc_sim::sim::SimConfig;

fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let st = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        st,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

#[tokio::test]
async fn injected_errors_answer_with_their_status_and_change_nothing() {
    let (shared, srv) = serve(SimConfig {
        seed: 3,
        ..Default::default()
    })
    .await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    let mut faults = BTreeMap::new();
    faults.insert(
        "CreateNetworkInterface".to_owned(),
        FaultSpec {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    faults.insert(
        "DescribeSubnets".to_owned(),
        FaultSpec {
            unavailable_rate: 1.0,
            ..Default::default()
        },
    );
    shared.with(|s| s.set_faults(faults));
    let e = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .send()
        .await
        .unwrap_err();
    assert_eq!((code(&e).as_str(), status(&e)), ("InternalError", 500));
    let e = c.describe_subnets().send().await.unwrap_err();
    assert_eq!((code(&e).as_str(), status(&e)), ("Unavailable", 503));
    assert_eq!(shared.with(|s| s.model().enis.len()), 1);
    // Other actions are unaffected.
    c.describe_network_interfaces().send().await.unwrap();
    srv.shutdown();
}

#[tokio::test]
async fn a_lost_answer_takes_effect_and_a_retry_with_the_same_client_token_does_not_leak() {
    let (shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    let mut faults = BTreeMap::new();
    faults.insert(
        "CreateNetworkInterface".to_owned(),
        FaultSpec {
            lost_response_rate: 1.0,
            timeout_ms: Some(20),
            ..Default::default()
        },
    );
    shared.with(|s| s.set_faults(faults));
    let e = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .client_token("tok-1")
        .send()
        .await;
    assert!(e.is_err(), "the answer was lost");
    assert_eq!(
        shared.with(|s| s.model().enis.len()),
        2,
        "but the ENI exists"
    );
    shared.with(|s| s.set_faults(BTreeMap::new()));
    let r = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .client_token("tok-1")
        .send()
        .await
        .unwrap();
    let id = r
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    assert_eq!(shared.with(|s| s.model().enis.len()), 2);
    assert!(shared.with(|s| s.model().enis.contains_key(&id)));
    // A timed-out call changes nothing.
    let mut faults = BTreeMap::new();
    faults.insert(
        "*".to_owned(),
        FaultSpec {
            timeout_rate: 1.0,
            timeout_ms: Some(20),
            ..Default::default()
        },
    );
    shared.with(|s| s.set_faults(faults));
    assert!(c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .send()
        .await
        .is_err());
    assert_eq!(shared.with(|s| s.model().enis.len()), 2);
    let dropped = shared.with(|s| s.calls().iter().filter(|c| c.http_status == 0).count());
    assert_eq!(dropped, 2);
    srv.shutdown();
}

#[tokio::test]
async fn latency_model_delays_answers_and_is_logged() {
    let (shared, srv) = serve(SimConfig::default()).await;
    let mut l = LatencyModel::none();
    l.actions.insert(
        "DescribeSubnets".into(),
        LatencySpec {
            base_ms: 5.0,
            jitter_ms: 1.0,
        },
    );
    shared.with(|s| s.set_latency(l));
    let c = client(&srv.ec2_url());
    c.describe_subnets().send().await.unwrap();
    c.describe_network_interfaces().send().await.unwrap();
    let lat: Vec<(String, u64)> = shared.with(|s| {
        s.calls()
            .iter()
            .map(|c| (c.action.clone(), c.latency_ms))
            .collect()
    });
    assert!(
        lat.iter().any(|(a, ms)| a == "DescribeSubnets" && *ms >= 5),
        "{lat:?}"
    );
    assert!(
        lat.iter()
            .any(|(a, ms)| a == "DescribeNetworkInterfaces" && *ms == 0),
        "{lat:?}"
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_show_state_and_calls_and_change_knobs() {
    let (shared, srv) = serve(SimConfig::default()).await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    let admin = srv.admin;
    let get =
        |path: &'static str| tokio::task::spawn_blocking(move || http(admin, "GET", path, ""));
    let (st, body) = get("/v1/state").await.unwrap();
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["summary"]["invariants"], "ok");
    assert_eq!(v["summary"]["instances_running"], 1);
    assert!(v["instances"][&f.instance].is_object());
    let (_, body) = get("/v1/calls?since=1").await.unwrap();
    let calls: serde_json::Value = serde_json::from_str(&body).unwrap();
    let actions: Vec<&str> = calls
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["CreateSubnet", "CreateSecurityGroup", "RunInstances"]
    );
    let (st, _) = tokio::task::spawn_blocking(move || {
        http(
            admin,
            "PUT",
            "/v1/faults",
            r#"{"DescribeSubnets": {"error_rate": 1.0, "error_code": "UnauthorizedOperation"}}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(st, 200);
    let e = c.describe_subnets().send().await.unwrap_err();
    assert_eq!(
        (code(&e).as_str(), status(&e)),
        ("UnauthorizedOperation", 403)
    );
    let (st, _) =
        tokio::task::spawn_blocking(move || http(admin, "PUT", "/v1/throttle", "not json"))
            .await
            .unwrap();
    assert_eq!(st, 400);
    let _ = shared;
    srv.shutdown();
}

#[test]
fn binary_prints_where_it_listens_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpc-sim"))
        .args([
            "serve",
            "--ec2-listen",
            "127.0.0.1:0",
            "--imds-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--vpc-cidr",
            "10.0.0.0/16",
            "--subnet",
            "10.0.0.0/20@us-west-2b",
            "--instance",
            "t3.small",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let listening = loop {
        let l = lines.next().expect("output before exit").unwrap();
        seen.push(l.clone());
        if l.starts_with("vpc-sim: listening") {
            break l;
        }
    };
    assert!(
        seen.iter()
            .any(|l| l.contains(" instance i-") && l.contains("/i-")),
        "{seen:?}"
    );
    let ec2 = listening
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    let (st, body) = http(
        ec2.parse().unwrap(),
        "POST",
        "/",
        "Action=DescribeInstances",
    );
    assert_eq!(st, 200);
    assert!(
        body.contains("<instanceType>t3.small</instanceType>"),
        "{body}"
    );
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        lines.next().map(|l| l.unwrap()).as_deref(),
        Some("vpc-sim: stopped")
    );
}
