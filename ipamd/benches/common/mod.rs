//! Shared pieces of the ipamd benches: percentiles and printing (as `cni/benches/latency.rs`),
//! the VPC simulator served on loopback, a daemon started in-process against it with the real
//! SDK clients, the gRPC requests, and `/proc` readings.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipamd::config::{Config, SimSettings};
use ipamd::daemon::{self, Daemon, Deps};
use ipamd::io::ec2::aws::{AwsEc2, AwsSettings};
use ipamd::io::imds::{AwsImds, ImdsSettings};
use ipamd::io::sim_backend::{self, SimNode, SIM_CREDENTIALS, SIM_REGION};
use tonic::transport::Channel;
use vpc_cni_rpc::{AddNetworkRequest, CniBackendClient, DelNetworkRequest};
use vpc_sim::sim::SimConfig;

/// The version handshake string the daemon expects.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `p`-quantile (0..=1) of `v` (sorts `v`).
pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// `/proc/loadavg`, for the record (the machine is shared).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// An environment variable parsed as a number, or `default`.
pub fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A multi-threaded runtime with as many workers as the daemon binary gets (one per core).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Serves a simulator (no added latency) with one node of `instance_type` on loopback.
pub async fn sim(instance_type: &str, seed: u64) -> SimNode {
    sim_backend::start(
        &SimSettings {
            instance_type: instance_type.into(),
            vpc_cidr: "10.0.0.0/16".parse().expect("cidr"),
            subnet_cidr: "10.0.0.0/18".parse().expect("cidr"),
            ipv6: false,
        },
        SimConfig {
            seed,
            ..Default::default()
        },
    )
    .await
    .expect("simulator")
}

/// The daemon's configuration: socket and checkpoint in `dir`, endpoints of `node`, servers on
/// loopback port 0, every other setting at its default unless `vars` says otherwise.
pub fn config(dir: &Path, node: &SimNode, vars: &[(&str, &str)]) -> Config {
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
    ];
    all.extend_from_slice(vars);
    Config::for_test(&all).expect("config")
}

/// Starts the daemon in-process with the real SDK EC2 client and IMDS client, every pod's
/// veth present.
pub async fn start(cfg: &Config) -> Daemon {
    let imds = AwsImds::new(&ImdsSettings {
        endpoint: cfg.imds_endpoint.clone(),
        http_timeout: cfg.http_timeout,
    })
    .expect("IMDS client");
    let ec2 = AwsEc2::new(&AwsSettings {
        region: SIM_REGION.into(),
        endpoint: cfg.ec2_endpoint.clone(),
        http_timeout: cfg.http_timeout,
        version: "bench".into(),
        static_credentials: Some((SIM_CREDENTIALS.0.into(), SIM_CREDENTIALS.1.into())),
    })
    .await;
    daemon::start(
        cfg,
        Deps {
            ec2: Arc::new(ec2),
            imds: Arc::new(imds),
            // No veths here: every pod counts as present (restore and orphan sweep).
            veths: Arc::new(daemon::AllVethsPresent),
        },
    )
    .await
    .expect("daemon start-up")
}

/// Polls `f` every 5 ms until it is true; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// AddNetwork of sandbox `c`, as the plugin sends it.
pub fn add(c: &str) -> AddNetworkRequest {
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

/// DelNetwork of sandbox `c`, as the plugin sends it.
pub fn del(c: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: format!("pod-{c}"),
        k8s_pod_namespace: "default".into(),
        container_id: c.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        reason: vpc_cni_rpc::REASON_POD_DELETED.into(),
        ..Default::default()
    }
}

/// Connects to the daemon's socket, retrying for up to 20 s while it comes up.
pub async fn client(sock: &Path) -> CniBackendClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match vpc_cni_rpc::connect_unix(sock, Duration::from_secs(5)).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "daemon socket {}: {e}",
                    sock.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// AddNetwork of `id` until it succeeds (the pool may be growing), for up to `limit`.
pub async fn add_ok(c: &mut CniBackendClient<Channel>, id: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let r = c
            .add_network(add(id))
            .await
            .expect("AddNetwork")
            .into_inner();
        if r.success {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "AddNetwork {id} kept failing for {limit:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fields of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, `RssAnon`, ...) and `Threads`.
pub fn proc_status(pid: u32, fields: &[&str]) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    fields
        .iter()
        .map(|f| {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{f}:")))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            ((*f).to_owned(), v)
        })
        .collect()
}
