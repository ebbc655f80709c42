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

use ipamd::config::{Config, SimSettings};
use ipamd::daemon::{self, Daemon, Deps, VethCheck};
use ipamd::io::ec2::aws::{AwsEc2, AwsSettings};
use ipamd::io::imds::{AwsImds, ImdsSettings};
use ipamd::io::sim_backend::{self, SimNode, SIM_CREDENTIALS, SIM_REGION};
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
            ipv6: false,
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

/// The real SDK EC2 client and aws-config IMDS client for `cfg`'s endpoints.
async fn deps(cfg: &Config, veth: VethCheck) -> Deps {
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
    Deps {
        ec2: Arc::new(ec2),
        imds: Arc::new(imds),
        veths: Arc::new(daemon::FixedVeths(veth)),
    }
}

async fn start(cfg: &Config, veth: VethCheck) -> Daemon {
    daemon::start(cfg, deps(cfg, veth).await)
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

/// An EC2 client of the test's own (what an operator or another tool would do behind the
/// daemon's back).
async fn outside_ec2(node: &SimNode) -> AwsEc2 {
    AwsEc2::new(&AwsSettings {
        region: SIM_REGION.into(),
        endpoint: Some(node.ec2_url()),
        http_timeout: Duration::from_secs(10),
        version: "test-outside".into(),
        static_credentials: Some((SIM_CREDENTIALS.0.into(), SIM_CREDENTIALS.1.into())),
    })
    .await
}

fn ds_has(d: &Daemon, ip: Ipv4Addr) -> bool {
    ds_view(d).0.contains(&format!("{ip}/32"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_evicts_addresses_removed_behind_its_back_and_adopts_added_ones() {
    use ipamd::io::ec2::{Addresses, Ec2Api};
    let node = sim("m5.large", SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("WARM_IP_TARGET", "3"),
            ("MINIMUM_IP_TARGET", "6"),
            ("VPC_CNI_RECONCILE_INTERVAL", "100ms"),
        ],
    );
    let d = start(&cfg, all_veths()).await;
    wait_until("the warm target", || async { !d.pool().is_low() }).await;
    let mut c = client(&cfg.grpc_socket).await;
    let pod_ip = add_ok(&mut c, "victim").await;
    let (eni, warm_ip) = {
        let ds = d.state().lock();
        let (id, e) = ds
            .enis()
            .iter()
            .find(|(_, e)| e.cidrs.contains_key(&ipamd::types::Ipv4Net::host(pod_ip)))
            .unwrap();
        let warm = e
            .cidrs
            .values()
            .find(|c| !c.is_prefix && c.addresses.values().all(|a| a.key.is_none()))
            .map(|c| c.cidr.addr())
            .unwrap();
        (id.clone(), warm)
    };
    let ec2 = outside_ec2(&node).await;
    // A warm address and the pod's address are taken away in EC2.
    ec2.unassign_ips(&eni, &[warm_ip, pod_ip]).await.unwrap();
    wait_until("reconcile to evict the removed addresses", || async {
        !ds_has(&d, warm_ip) && !ds_has(&d, pod_ip)
    })
    .await;
    assert!(
        !d.state()
            .lock()
            .assignments()
            .iter()
            .any(|(_, k)| k.container_id == "victim"),
        "the pod whose address went is no longer assigned"
    );
    // An address added in EC2 is adopted.
    let added = ec2.assign(&eni, Addresses::Ips(1)).await.unwrap().ips[0];
    wait_until("reconcile to adopt the added address", || async {
        ds_has(&d, added)
    })
    .await;
    let text = scrape(d.metrics_addr().unwrap());
    // (The added address may come in through reconcile or, when the ENI is full in EC2, through
    // the pool's PrivateIpAddressLimitExceeded resync: only the evictions are pinned here.)
    for series in [
        "awscni_force_removed_ips 1",
        "awscni_reconcile_count{fn=\"eniIPPoolReconcileDel\"}",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    d.stop().await;
    node.running.shutdown();
}

/// Puts a link with the ENI's MAC into a memory host whenever the simulator attaches an ENI
/// to the node (what the kernel does on EC2).
struct HotPlug {
    host: Arc<vpc_cni_net::MemoryHostNetwork>,
    instance: String,
}

impl vpc_sim::hooks::Hooks for HotPlug {
    fn on_attach(&mut self, ev: &vpc_sim::hooks::EniAttached) {
        if ev.instance_id == self.instance {
            self.host
                .add_link(&format!("eth{}", ev.device_index), ev.mac.parse().unwrap());
        }
    }
    fn on_detach(&mut self, _: &vpc_sim::hooks::EniDetached) {}
    fn on_assign(&mut self, _: &vpc_sim::hooks::AddressesChanged) {}
    fn on_unassign(&mut self, _: &vpc_sim::hooks::AddressesChanged) {}
}

async fn start_with_host(
    cfg: &Config,
    host: &Arc<vpc_cni_net::MemoryHostNetwork>,
) -> Result<Daemon, daemon::DaemonError> {
    daemon::start_node(
        cfg,
        deps(cfg, all_veths()).await,
        daemon::NodeParts {
            host: Some(Arc::new(ipamd::io::host::Host(host.clone()))),
            ..Default::default()
        },
    )
    .await
}

/// A memory host holding the node's primary interface.
fn host_with_primary(node: &SimNode) -> Arc<vpc_cni_net::MemoryHostNetwork> {
    let host = Arc::new(vpc_cni_net::MemoryHostNetwork::new());
    let mac = node.shared.with(|s| {
        s.model()
            .instance_enis(&node.instance_id)
            .into_iter()
            .find(|e| e.attachment.as_ref().is_some_and(|a| a.device_index == 0))
            .unwrap()
            .mac
    });
    host.add_link("eth0", mac.parse().unwrap());
    host
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_enis_are_wired_on_the_host_before_use_and_unwired_when_freed() {
    let node = sim("m5.large", SimConfig::default()).await;
    let host = host_with_primary(&node);
    node.shared.with(|s| {
        s.set_hooks(Box::new(HotPlug {
            host: host.clone(),
            instance: node.instance_id.clone(),
        }))
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("IP_COOLDOWN_PERIOD", "0"),
            ("VPC_CNI_MIN_ENI_AGE", "0"),
            ("VPC_CNI_DECREASE_INTERVAL", "0"),
            ("AWS_VPC_ENI_MTU", "9001"),
        ],
    );
    let d = start_with_host(&cfg, &host).await.expect("start-up");
    let snat = host.state().snat.expect("SNAT rules applied at start-up");
    assert_eq!(snat.primary_if, "eth0");
    // 12 pods fill the primary ENI and use the second; WARM_ENI_TARGET=1 adds a third. Each
    // secondary ENI is wired before any pod uses it.
    let mut c = client(&cfg.grpc_socket).await;
    for i in 0..12 {
        add_ok(&mut c, &format!("p{i}")).await;
    }
    wait_until("three ENIs", || async {
        d.state().lock().enis().len() == 3 && !d.pool().is_low()
    })
    .await;
    let secondary: Vec<(String, Ipv4Addr, u32)> = d
        .state()
        .lock()
        .enis()
        .values()
        .filter(|e| !e.is_primary)
        .map(|e| (e.id.clone(), e.primary_ip, e.device_number))
        .collect();
    let has_rule = |ip: Ipv4Addr| {
        host.state()
            .rules
            .iter()
            .any(|r| r.from == Some(vpc_cni_net::IpCidr::host_v4(ip)))
    };
    let wired = host.state();
    for (id, ip, device) in &secondary {
        let spec = wired
            .enis
            .iter()
            .find(|s| s.primary_ip == *ip)
            .unwrap_or_else(|| panic!("{id} not wired: {wired:?}"));
        assert_eq!(spec.route_table, device + 1, "{id}: table = device + 1");
        assert_eq!(spec.mtu, 9001);
        assert!(has_rule(*ip), "{id}: no rule from its primary IP");
    }
    // Every pod leaves: one warm ENI is enough, the other is freed and its rules go.
    for i in 0..12 {
        let r = c
            .del_network(del(&format!("p{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(r.success);
    }
    wait_until("a secondary ENI to be freed", || async {
        d.state().lock().enis().len() == 2 && d_enis(&node) == 2 && sim_view(&node).2.is_empty()
    })
    .await;
    let (freed, ip, _) = secondary
        .iter()
        .find(|(id, _, _)| d.state().lock().eni(id).is_none())
        .unwrap()
        .clone();
    assert_eq!(d_enis(&node), 2, "{freed} detached and deleted in EC2");
    assert!(!has_rule(ip), "{freed}'s rules are gone");
    d.stop().await;
    node.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eni_whose_link_never_appears_is_deleted_not_leaked_nor_used() {
    let node = sim("m5.large", SimConfig::default()).await;
    // No hot-plug: new ENIs never show up on the host.
    let host = host_with_primary(&node);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("MINIMUM_IP_TARGET", "15"),
            ("VPC_CNI_ENI_LINK_WAIT", "200ms"),
        ],
    );
    let d = start_with_host(&cfg, &host).await.expect("start-up");
    wait_until("an ENI to be created and deleted again", || async {
        node.shared.with(|s| {
            s.calls()
                .iter()
                .any(|c| c.action == "DeleteNetworkInterface" && c.outcome == "ok")
        })
    })
    .await;
    d.stop().await;
    assert_eq!(d_enis(&node), 1, "only the primary ENI stays attached");
    assert!(sim_view(&node).2.is_empty(), "no ENI leaked");
    node.running.shutdown();
}

fn d_enis(node: &SimNode) -> usize {
    node.shared
        .with(|s| s.model().instance_enis(&node.instance_id).len())
}

/// Writes the fake API server saw: (method, path, body).
type Writes = Arc<std::sync::Mutex<Vec<(String, String, serde_json::Value)>>>;

/// A Kubernetes API server for one node over kube-rs's tower-test mock: answers reads by path
/// (the Node, its ENIConfig, the aws-node pod), records and accepts writes (pod patches,
/// events), 404 otherwise.
fn fake_api_server(
    node: serde_json::Value,
    eni_config: serde_json::Value,
) -> (kube::Client, Writes) {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let writes: Writes = Arc::default();
    let seen = writes.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: serde_json::Value =
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let (status, answer) = match (method.as_str(), path.as_str()) {
                ("GET", "/api/v1/nodes/node-1") => (StatusCode::OK, node.clone()),
                ("GET", p) if p.starts_with("/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs/") => {
                    (StatusCode::OK, eni_config.clone())
                }
                ("GET", "/api/v1/namespaces/kube-system/pods/aws-node-1") => (
                    StatusCode::OK,
                    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "aws-node-1", "namespace": "kube-system", "uid": "u-1"}}),
                ),
                ("PATCH", p) if p.starts_with("/api/v1/namespaces/default/pods/") => {
                    seen.lock()
                        .unwrap()
                        .push((method.clone(), path.clone(), body.clone()));
                    let name = p.rsplit('/').next().unwrap_or_default();
                    (
                        StatusCode::OK,
                        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": name, "namespace": "default", "uid": "p"}}),
                    )
                }
                ("POST", "/apis/events.k8s.io/v1/namespaces/kube-system/events") => {
                    seen.lock()
                        .unwrap()
                        .push((method.clone(), path.clone(), body.clone()));
                    (StatusCode::CREATED, body)
                }
                _ => (
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": path}),
                ),
            };
            let resp = Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap();
            send.send_response(resp);
        }
    });
    (kube::Client::new(service, "default"), writes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_networking_max_pods_pod_annotation_and_subnet_exhaustion_event() {
    use vpc_sim::api::{Reply, Request};
    let node = sim("m5.large", SimConfig::default()).await;
    // The ENIConfig's subnet: a /28 (11 usable addresses) and its own security group.
    let (pod_subnet, pod_sg) = node.shared.with(|s| {
        let subnet = match s.call(
            0,
            Request::CreateSubnet {
                vpc_id: node.vpc_id.clone(),
                cidr: "10.0.16.0/28".parse().unwrap(),
                availability_zone: Some(sim_backend::SIM_AZ.into()),
                ipv6_cidr: None,
                tags: Default::default(),
            },
        ) {
            Ok(Reply::Subnet(v)) => v.id,
            other => panic!("CreateSubnet: {other:?}"),
        };
        let sg = match s.call(
            0,
            Request::CreateSecurityGroup {
                vpc_id: Some(node.vpc_id.clone()),
                name: "pods".into(),
                description: "pods".into(),
                tags: Default::default(),
            },
        ) {
            Ok(Reply::SecurityGroup(g)) => g.id,
            other => panic!("CreateSecurityGroup: {other:?}"),
        };
        (subnet, sg)
    });
    let node_json = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"k8s.amazonaws.com/eniConfig": "pods-a"}},
        "status": {"capacity": {"pods": "20"}}
    });
    let eni_config = serde_json::json!({
        "apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
        "metadata": {"name": "pods-a"},
        "spec": {"subnet": pod_subnet, "securityGroups": [pod_sg]}
    });
    let (api_client, writes) = fake_api_server(node_json, eni_config);
    let k8s = ipamd::io::k8s::K8s::new(api_client, "node-1", "aws-node-1", "kube-system");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            ("ANNOTATE_POD_IP", "true"),
            ("MINIMUM_IP_TARGET", "18"),
            ("WARM_IP_TARGET", "2"),
        ],
    );
    let d = daemon::start_node(
        &cfg,
        deps(&cfg, all_veths()).await,
        daemon::NodeParts {
            k8s: Some(k8s),
            ..Default::default()
        },
    )
    .await
    .expect("start-up");
    // The /28 runs out before 18 addresses: an event says so and growth pauses.
    wait_until("the subnet-exhausted event", || async {
        writes
            .lock()
            .unwrap()
            .iter()
            .any(|(_, _, b)| b["reason"] == "SubnetAddressesExhausted")
    })
    .await;
    let out = d.pool().tick().await.expect("tick");
    assert_eq!(
        out.decision.reason,
        subnet_calc::policy::Reason::Backoff,
        "growth paused after exhaustion"
    );
    // New ENIs are in the ENIConfig's subnet with its security group; the primary ENI holds
    // no pod address.
    let enis = node
        .shared
        .with(|s| s.model().instance_enis(&node.instance_id));
    let secondary: Vec<_> = enis
        .iter()
        .filter(|e| e.attachment.as_ref().is_some_and(|a| a.device_index > 0))
        .collect();
    assert!(!secondary.is_empty(), "no ENI was created");
    for e in &secondary {
        assert_eq!(
            e.subnet_id, pod_subnet,
            "{} outside the ENIConfig subnet",
            e.id
        );
        assert_eq!(e.groups, vec![pod_sg.clone()], "{} security groups", e.id);
    }
    let mut c = client(&cfg.grpc_socket).await;
    let ip = add_ok(&mut c, "annotated").await;
    let pod_net: ipamd::types::Ipv4Net = "10.0.16.0/28".parse().unwrap();
    assert!(
        pod_net.contains(ip),
        "{ip} is not from the ENIConfig subnet"
    );
    wait_until("the pod IP annotation", || async {
        writes.lock().unwrap().iter().any(|(m, p, b)| {
            m == "PATCH"
                && p.ends_with("/pods/pod-annotated")
                && b["metadata"]["annotations"]["vpc.amazonaws.com/pod-ips"] == ip.to_string()
        })
    })
    .await;
    d.stop().await;
    node.running.shutdown();
}

fn mutating_calls(node: &SimNode) -> usize {
    node.shared.with(|s| {
        s.calls()
            .iter()
            .filter(|c| ipamd::io::ec2::is_mutating(&c.action))
            .count()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_it_keeps_serving_but_neither_grows_nor_shrinks_the_pool() {
    let node = sim("m5.large", SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("WARM_IP_TARGET", "3"),
            ("IP_COOLDOWN_PERIOD", "0"),
            ("VPC_CNI_MIN_ENI_AGE", "0"),
            ("VPC_CNI_DECREASE_INTERVAL", "0"),
        ],
    );
    let d = start(&cfg, all_veths()).await;
    wait_until("the warm target", || async { !d.pool().is_low() }).await;
    d.terminate();
    let before = mutating_calls(&node);
    let mut c = client(&cfg.grpc_socket).await;
    // The warm addresses are still handed out...
    for i in 0..3 {
        add_ok(&mut c, &format!("t{i}")).await;
    }
    // ...but the pool, now below target, does not grow.
    assert!(d.pool().is_low());
    let out = d.pool().tick().await.unwrap();
    assert_eq!(out.decision.reason, subnet_calc::policy::Reason::Paused);
    assert!(out.decision.change.is_none() && out.freed_eni.is_none());
    // Releases are served; the surplus is not given back to EC2.
    for i in 0..3 {
        let r = c
            .del_network(del(&format!("t{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(r.success);
    }
    let out = d.pool().tick().await.unwrap();
    assert!(
        out.decision.change.is_none() && out.freed_eni.is_none(),
        "{out:?}"
    );
    assert_eq!(mutating_calls(&node), before, "no EC2 change after SIGTERM");
    // Stopping returns: every server and loop ends.
    tokio::time::timeout(Duration::from_secs(20), d.stop())
        .await
        .expect("clean stop");
    node.running.shutdown();
}

/// IPv6 mode on a dual-stack simulated node: one /80 assigned to the primary ENI through
/// `AssignIpv6Addresses` (the simulator holds it), pods answered in `IPv6Addr` with the VPC's
/// IPv6 CIDR, no pool growth, the checkpoint's `ipv6` entries, and a restart that keeps every
/// assignment and assigns no second /80.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_mode_serves_pods_from_one_80_and_a_restart_keeps_them() {
    let node = sim_backend::start(
        &SimSettings {
            instance_type: "m5.large".into(),
            vpc_cidr: "10.0.0.0/16".parse().unwrap(),
            subnet_cidr: "10.0.0.0/20".parse().unwrap(),
            ipv6: true,
        },
        SimConfig::default(),
    )
    .await
    .expect("simulator");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ],
    );
    let sim_prefixes = || {
        node.shared.with(|s| {
            s.model()
                .instance_enis(&node.instance_id)
                .iter()
                .flat_map(|e| e.ipv6_prefixes.iter().map(|p| p.to_string()))
                .collect::<Vec<_>>()
        })
    };
    let d = daemon::start_v6(&cfg, deps(&cfg, all_veths()).await, Default::default())
        .await
        .expect("IPv6 start-up");
    let prefix = d.prefix();
    assert_eq!(prefix.prefix_len(), 80);
    assert_eq!(
        sim_prefixes(),
        [prefix.to_string()],
        "EC2 holds exactly the /80"
    );
    let mut c = client(&cfg.grpc_socket).await;
    let mut held: BTreeMap<std::net::Ipv6Addr, String> = BTreeMap::new();
    for i in 0..60 {
        let id = format!("c{i}");
        let r = c
            .add_network(add(&id))
            .await
            .expect("AddNetwork")
            .into_inner();
        assert!(r.success, "AddNetwork {id}: {r:?}");
        let m = &r.ip_allocation_metadata[0];
        assert!(m.i_pv4_addr.is_empty(), "{m:?}");
        assert_eq!((m.device_number, m.route_table_id), (0, 254));
        assert_eq!(r.vp_cv6_cid_rs.len(), 1, "the VPC's /56: {r:?}");
        let ip: std::net::Ipv6Addr = m.i_pv6_addr.parse().expect("an IPv6 address");
        assert!(prefix.contains(ip), "{ip} outside {prefix}");
        if let Some(other) = held.insert(ip, id.clone()) {
            panic!("{ip} handed to {id} while {other} holds it");
        }
        if i % 3 == 2 {
            let gone = format!("c{}", i - 1);
            let r = c
                .del_network(del(&gone))
                .await
                .expect("DelNetwork")
                .into_inner();
            assert!(r.success, "DelNetwork {gone}: {r:?}");
            assert!(!r.ip_allocation_metadata[0].i_pv6_addr.is_empty());
            held.retain(|_, v| *v != gone);
        }
    }
    // Introspection lists the /80 under IPv6Cidrs with the pods' addresses; the metrics
    // count the assigned addresses.
    let intro = d.introspection_addr().expect("introspection address");
    let body = {
        let mut s = TcpStream::connect(intro).unwrap();
        write!(
            s,
            "GET /v1/enis HTTP/1.1\r\nHost: {intro}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("introspection JSON");
    let eni = v["0"]["ENIs"]
        .as_object()
        .and_then(|m| m.values().next())
        .expect("one ENI")
        .clone();
    let cidrs = eni["IPv6Cidrs"].as_object().expect("IPv6Cidrs");
    assert_eq!(cidrs.keys().collect::<Vec<_>>(), [&prefix.to_string()]);
    assert_eq!(
        eni["AvailableIPv4Cidrs"].as_object().map(|m| m.len()),
        Some(0)
    );
    let listed = cidrs[&prefix.to_string()]["IPAddresses"]
        .as_object()
        .expect("IPAddresses")
        .values()
        .filter(|a| {
            !a["IPAMKey"]["networkName"]
                .as_str()
                .unwrap_or("")
                .is_empty()
        })
        .count();
    assert_eq!(listed, held.len());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = scrape(d.metrics_addr().expect("metrics address"));
    assert!(
        text.contains(&format!("awscni_assigned_ip_addresses {}", held.len())),
        "{text}"
    );
    let text = std::fs::read_to_string(cfg.checkpoint_path(0)).expect("checkpoint");
    let file: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let entries = file["allocations"].as_array().expect("allocations");
    assert_eq!(entries.len(), held.len());
    assert!(entries
        .iter()
        .all(|e| e.get("ipv4").is_none() && e["ipv6"].is_string()));
    d.stop().await;
    let d = daemon::start_v6(&cfg, deps(&cfg, all_veths()).await, Default::default())
        .await
        .expect("IPv6 restart");
    assert_eq!(d.prefix(), prefix);
    assert_eq!(
        sim_prefixes(),
        [prefix.to_string()],
        "no second /80 after a restart"
    );
    let restored: BTreeMap<std::net::Ipv6Addr, String> = d
        .state()
        .lock()
        .assignments()
        .into_iter()
        .map(|(ip, k)| (ip, k.container_id))
        .collect();
    assert_eq!(restored, held);
    let mut c = client(&cfg.grpc_socket).await;
    let r = c
        .add_network(add("after"))
        .await
        .expect("AddNetwork")
        .into_inner();
    let ip: std::net::Ipv6Addr = r.ip_allocation_metadata[0]
        .i_pv6_addr
        .parse()
        .expect("IPv6");
    assert!(!held.contains_key(&ip), "{ip} is still held");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_mode_on_a_subnet_without_ipv6_fails_at_start_naming_the_call() {
    let node = sim("m5.large", SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &node,
        &[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ],
    );
    let e = daemon::start_v6(&cfg, deps(&cfg, all_veths()).await, Default::default())
        .await
        .expect_err("no IPv6 on the subnet");
    let msg = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(msg.contains("IPv6 /80"), "{msg}");
}

/// `VPC_CNI_POLICY=demand` on the simulator: pods served, the planner's request history saved
/// beside the checkpoint after the ticks, and taken back after a restart (which serves the
/// pods it kept and grows for new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demand_flavour_serves_pods_and_keeps_its_history_across_a_restart() {
    let node = sim("m5.large", SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &node, &[("VPC_CNI_POLICY", "demand")]);
    assert!(cfg.demand.is_some());
    let d = start(&cfg, all_veths()).await;
    let mut c = client(&cfg.grpc_socket).await;
    let mut held = BTreeSet::new();
    for i in 0..12 {
        assert!(held.insert(add_ok(&mut c, &format!("d{i}")).await));
    }
    let path = daemon::demand_path(&cfg);
    wait_until("the demand history on disk", || async {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<subnet_calc::policy::DemandState>(&b).ok())
            .is_some_and(|s| {
                let e = s.estimate(&subnet_calc::policy::DemandSettings::default(), s_now());
                e.expected_over(Duration::from_secs(600)) >= 1
            })
    })
    .await;
    d.stop().await;
    let d = start(&cfg, all_veths()).await;
    assert_eq!(d.state().lock().assignments().len(), 12);
    let mut c = client(&cfg.grpc_socket).await;
    for i in 12..20 {
        assert!(held.insert(add_ok(&mut c, &format!("d{i}")).await));
    }
    d.stop().await;
}

fn s_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}
