//! The daemon in-process against the VPC simulator served over HTTP on loopback, through the
//! real `aws-sdk-ec2` client and aws-config's IMDS client. No host wiring runs: nothing
//! touches any network namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipamd::aws::{AwsEc2, AwsSettings};
use ipamd::config::{Config, SimSettings};
use ipamd::daemon::{self, Daemon, Deps, VethCheck};
use ipamd::imds::{AwsImds, ImdsSettings};
use ipamd::sim_backend::{self, SimNode, SIM_CREDENTIALS, SIM_REGION};
use vpc_cni_rpc::{AddNetworkRequest, DelNetworkRequest};
use vpc_sim::control::FaultSpec;
use vpc_sim::sim::SimConfig;

const VERSION: &str = env!("CARGO_PKG_VERSION");

async fn sim(instance_type: &str, cfg: SimConfig) -> SimNode {
    sim_backend::start(
        &SimSettings {
            instance_type: instance_type.into(),
            vpc_cidr: "10.0.0.0/16".parse().unwrap(),
            subnet_cidr: "10.0.0.0/20".parse().unwrap(),
        },
        cfg,
    )
    .await
    .expect("simulator")
}

fn config(dir: &Path, node: &SimNode, vars: &[(&str, &str)]) -> Config {
    let sock = dir.join("ipamd.sock").display().to_string();
    let store = dir.join("ipam.json").display().to_string();
    let (ec2, imds) = (node.ec2_url(), node.imds_url());
    let mut all: Vec<(&str, &str)> = vec![
        ("IPAMD_GRPC_SOCKET", &sock),
        ("AWS_VPC_K8S_CNI_BACKING_STORE", &store),
        ("METRICS_BIND_ADDRESS", "127.0.0.1:0"),
        ("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0"),
        ("AWS_EC2_ENDPOINT", &ec2),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds),
        ("VPC_CNI_POOL_TICK", "100ms"),
        ("VPC_CNI_EC2_RETRY_BASE", "5ms"),
        ("VPC_CNI_EC2_MUTATING_RATE", "1000"),
        ("VPC_CNI_EC2_MUTATING_BURST", "1000"),
        ("VPC_CNI_EC2_DESCRIBE_RATE", "1000"),
        ("VPC_CNI_EC2_DESCRIBE_BURST", "1000"),
        ("VPC_CNI_EC2_MAX_ATTEMPTS", "12"),
    ];
    all.extend_from_slice(vars);
    Config::for_test(&all).expect("config")
}

async fn start(cfg: &Config, veth: VethCheck) -> Daemon {
    let imds = AwsImds::new(&ImdsSettings {
        endpoint: cfg.imds_endpoint.clone(),
        http_timeout: cfg.http_timeout,
    })
    .unwrap();
    let ec2 = AwsEc2::new(&AwsSettings {
        region: SIM_REGION.into(),
        endpoint: cfg.ec2_endpoint.clone(),
        http_timeout: cfg.http_timeout,
        version: "test".into(),
        static_credentials: Some((SIM_CREDENTIALS.0.into(), SIM_CREDENTIALS.1.into())),
    })
    .await;
    daemon::start(
        cfg,
        Deps {
            ec2: Arc::new(ec2),
            imds: Arc::new(imds),
            veth_exists: veth,
        },
    )
    .await
    .expect("daemon start-up")
}

fn all_veths() -> VethCheck {
    Arc::new(|_: &str, _: &str| true)
}

/// Polls `f` until it is true, failing with `what` after 20 s.
async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node's addresses as the simulator holds them: (secondary /32s, /28 prefixes), and
/// every ENI in the VPC that is not attached to the node (leaks).
fn sim_view(node: &SimNode) -> (BTreeSet<String>, BTreeSet<String>, Vec<String>) {
    node.shared.with(|s| {
        let m = s.model();
        let (mut ips, mut prefixes) = (BTreeSet::new(), BTreeSet::new());
        for e in m.instance_enis(&node.instance_id) {
            ips.extend(e.secondary_ips.iter().map(|a| format!("{a}/32")));
            prefixes.extend(e.ipv4_prefixes.iter().map(|p| p.to_string()));
        }
        let loose = m
            .enis
            .values()
            .filter(|e| e.vpc_id == node.vpc_id && e.attachment.is_none())
            .map(|e| e.id.clone())
            .collect();
        (ips, prefixes, loose)
    })
}

/// The daemon's addresses: (/32s, /28s).
fn ds_view(d: &Daemon) -> (BTreeSet<String>, BTreeSet<String>) {
    let ds = d.state().lock();
    let (mut ips, mut prefixes) = (BTreeSet::new(), BTreeSet::new());
    for e in ds.enis().values() {
        for c in e.cidrs.values() {
            if c.is_prefix {
                prefixes.insert(c.cidr.to_string());
            } else {
                ips.insert(c.cidr.to_string());
            }
        }
    }
    (ips, prefixes)
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn booted_to_warm_target(instance_type: &str, vars: &[(&str, &str)], prefix: bool) {
    let node = sim(instance_type, SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &node, vars);
    let d = start(&cfg, all_veths()).await;
    wait_until("the pool to reach its warm target", || async {
        !d.pool().is_low()
    })
    .await;
    let (ips, prefixes) = ds_view(&d);
    let (sim_ips, sim_prefixes, loose) = sim_view(&node);
    assert_eq!(
        ips, sim_ips,
        "{instance_type}: daemon and EC2 disagree on /32s"
    );
    assert_eq!(
        prefixes, sim_prefixes,
        "{instance_type}: daemon and EC2 disagree on /28s"
    );
    assert!(loose.is_empty(), "{instance_type}: leaked ENIs {loose:?}");
    if prefix {
        assert!(
            !prefixes.is_empty(),
            "{instance_type}: no prefix in PD mode"
        );
        assert!(ips.is_empty(), "{instance_type}: /32s in PD mode: {ips:?}");
    } else {
        let per_eni = subnet_calc::limits::Catalog::embedded()
            .get(instance_type)
            .unwrap()
            .slots_per_eni() as usize;
        // WARM_ENI_TARGET=1 with no pod: one ENI's worth of free addresses.
        assert!(
            ips.len() >= per_eni,
            "{instance_type}: {} IPs < {per_eni}",
            ips.len()
        );
        assert!(prefixes.is_empty());
    }
    let text = scrape(d.metrics_addr().unwrap());
    for name in [
        "awscni_eni_allocated",
        "awscni_total_ip_addresses",
        "awscni_assigned_ip_addresses",
        "awscni_eni_max",
        "awscni_ip_max",
        "awscni_aws_api_latency_ms",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    d.stop().await;
    node.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_to_the_warm_target_in_secondary_ip_mode_on_two_instance_types() {
    booted_to_warm_target("m5.large", &[], false).await;
    booted_to_warm_target("c5.xlarge", &[("WARM_ENI_TARGET", "2")], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_to_the_warm_target_in_prefix_mode_on_two_instance_types() {
    let pd = [
        ("ENABLE_PREFIX_DELEGATION", "true"),
        ("WARM_PREFIX_TARGET", "1"),
    ];
    booted_to_warm_target("m5.large", &pd, true).await;
    booted_to_warm_target("c5.xlarge", &pd, true).await;
}

fn add(c: &str) -> AddNetworkRequest {
    AddNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: format!("pod-{c}"),
        k8s_pod_namespace: "default".into(),
        container_id: c.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        ..Default::default()
    }
}

fn del(c: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: format!("pod-{c}"),
        k8s_pod_namespace: "default".into(),
        container_id: c.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        ..Default::default()
    }
}

async fn client(sock: &Path) -> vpc_cni_rpc::CniBackendClient<tonic::transport::Channel> {
    vpc_cni_rpc::connect_unix(sock, Duration::from_secs(5))
        .await
        .expect("connect to the daemon's socket")
}

/// AddNetwork until it succeeds (the pool may be topping up), with a bounded wait.
async fn add_ok(
    c: &mut vpc_cni_rpc::CniBackendClient<tonic::transport::Channel>,
    id: &str,
) -> Ipv4Addr {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .add_network(add(id))
            .await
            .expect("AddNetwork")
            .into_inner();
        if r.success {
            return r.ip_allocation_metadata[0]
                .i_pv4_addr
                .parse()
                .expect("an IPv4 address");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "AddNetwork {id} kept failing: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_adds_and_dels_never_hand_out_an_address_twice_and_a_restart_keeps_them() {
    let node = sim("m5.large", SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // m5.large holds 27 pod addresses: without a cooldown, released ones are reused at once.
    let cfg = config(
        dir.path(),
        &node,
        &[("WARM_IP_TARGET", "3"), ("IP_COOLDOWN_PERIOD", "0")],
    );
    let d = start(&cfg, all_veths()).await;
    let mut c = client(&cfg.grpc_socket).await;
    let mut held: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for i in 0..200 {
        let id = format!("c{i}");
        let ip = add_ok(&mut c, &id).await;
        if let Some(other) = held.insert(ip, id.clone()) {
            panic!("{ip} handed to {id} while {other} holds it");
        }
        order.push(id);
        // Keep 12 pods; release the oldest.
        if order.len() > 12 {
            let gone = order.remove(0);
            let r = c
                .del_network(del(&gone))
                .await
                .expect("DelNetwork")
                .into_inner();
            assert!(r.success, "DelNetwork {gone}: {r:?}");
            held.retain(|_, v| *v != gone);
        }
    }
    assert_eq!(held.len(), 12);
    // Restart: every held assignment survives, except a pod whose veth is gone.
    d.stop().await;
    let dropped = order[0].clone();
    let keep: Vec<String> = order[1..].to_vec();
    let veth: VethCheck = Arc::new(move |_ns: &str, name: &str| name != format!("pod-{dropped}"));
    let d = start(&cfg, veth).await;
    let restored: HashMap<String, Ipv4Addr> = d
        .state()
        .lock()
        .assignments()
        .into_iter()
        .map(|(ip, k)| (k.container_id.clone(), ip))
        .collect();
    let mut c = client(&cfg.grpc_socket).await;
    for (ip, id) in &held {
        if *id == order[0] {
            assert!(!restored.contains_key(id), "{id}'s veth is gone: dropped");
            continue;
        }
        assert_eq!(restored.get(id), Some(ip), "{id} lost its address");
        // AddNetwork is idempotent: the same sandbox gets the same address back.
        assert_eq!(add_ok(&mut c, id).await, *ip);
    }
    assert_eq!(restored.len(), keep.len());
    d.stop().await;
    node.running.shutdown();
}

async fn storm(code: &str) {
    let mut faults = BTreeMap::new();
    faults.insert(
        "*".to_owned(),
        FaultSpec {
            error_rate: 0.3,
            error_code: Some(code.to_owned()),
            ..Default::default()
        },
    );
    let node = sim(
        "m5.large",
        SimConfig {
            seed: 11,
            ..Default::default()
        },
    )
    .await;
    node.shared.with(|s| s.set_faults(faults));
    let dir = tempfile::tempdir().unwrap();
    // Small ENIs' worth: several ENIs are created and filled through the storm.
    let cfg = config(
        dir.path(),
        &node,
        &[("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "25")],
    );
    let d = start(&cfg, all_veths()).await;
    wait_until("the pool to reach its target through the storm", || async {
        !d.pool().is_low()
    })
    .await;
    let injected = node
        .shared
        .with(|s| s.calls().iter().filter(|c| c.outcome == code).count());
    assert!(injected > 0, "no {code} was injected");
    node.shared.with(|s| s.set_faults(BTreeMap::new()));
    let (ips, _) = ds_view(&d);
    let (sim_ips, _, loose) = sim_view(&node);
    assert!(ips.len() >= 25, "{} addresses after the storm", ips.len());
    assert_eq!(
        ips, sim_ips,
        "addresses leaked or lost in EC2 after {code} storm"
    );
    assert!(
        loose.is_empty(),
        "ENIs leaked after {code} storm: {loose:?}"
    );
    let ok = node
        .shared
        .with(|s| s.state_json()["summary"]["invariants"] == "ok");
    assert!(ok, "simulator invariants broken");
    d.stop().await;
    node.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_storm_is_survived_with_nothing_leaked() {
    storm("RequestLimitExceeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_storm_is_survived_with_nothing_leaked() {
    storm("InternalError").await;
}
