//! Shared by the benches that run ipamd in-process on a served VPC simulator: start the
//! simulator and the daemon with the real SDK clients, and count the EC2 calls it answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipamd::config::{Config, SimSettings};
use ipamd::daemon::{self, Daemon, Deps};
use ipamd::io::ec2::aws::{AwsEc2, AwsSettings};
use ipamd::io::imds::{AwsImds, ImdsSettings};
use ipamd::io::sim_backend::{self, SimNode, SIM_CREDENTIALS, SIM_REGION};
use vpc_sim::control::LatencyModel;
use vpc_sim::sim::SimConfig;

/// A daemon running in this process against its own simulator.
pub struct InProc {
    /// The simulator with the node's VPC, subnet and instance.
    pub node: SimNode,
    /// The daemon.
    pub daemon: Daemon,
    /// Its configuration (socket path among it).
    pub cfg: Config,
    /// The last simulator call before the daemon started: calls after it are the daemon's.
    pub since: u64,
    _dir: tempfile::TempDir,
}

/// Serves a simulator with one `instance_type` node in `subnet_cidr` (VPC 10.0.0.0/16), sets
/// `latency` once the set-up is done, and starts ipamd on it with `env` added to the
/// socket, checkpoint and endpoint settings.
pub async fn start(
    instance_type: &str,
    subnet_cidr: &str,
    seed: u64,
    latency: LatencyModel,
    env: &[(&str, &str)],
) -> anyhow::Result<InProc> {
    let node = sim_backend::start(
        &SimSettings {
            instance_type: instance_type.into(),
            vpc_cidr: "10.0.0.0/16".parse().context("VPC CIDR")?,
            subnet_cidr: subnet_cidr.parse().context("subnet CIDR")?,
            ipv6: false,
        },
        SimConfig {
            seed,
            // Every call of a long run is counted.
            call_log_limit: 1 << 20,
            ..SimConfig::default()
        },
    )
    .await?;
    // The set-up (VPC, subnet, instance) is not the node's business: latencies from here on.
    node.shared.with(|s| s.set_latency(latency));
    let since = last_seq(&node);
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ipamd.sock").display().to_string();
    let store = dir.path().join("ipam.json").display().to_string();
    let (ec2_url, imds_url) = (node.ec2_url(), node.imds_url());
    let mut vars: Vec<(&str, &str)> = vec![
        ("IPAMD_GRPC_SOCKET", &sock),
        ("AWS_VPC_K8S_CNI_BACKING_STORE", &store),
        ("METRICS_BIND_ADDRESS", "127.0.0.1:0"),
        ("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0"),
        ("AWS_EC2_ENDPOINT", &ec2_url),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds_url),
    ];
    vars.extend_from_slice(env);
    let cfg = Config::for_test(&vars)?;
    let imds = AwsImds::new(&ImdsSettings {
        endpoint: cfg.imds_endpoint.clone(),
        http_timeout: cfg.http_timeout,
    })?;
    let ec2 = AwsEc2::new(&AwsSettings {
        region: SIM_REGION.into(),
        endpoint: cfg.ec2_endpoint.clone(),
        http_timeout: cfg.http_timeout,
        version: "bench".into(),
        static_credentials: Some((SIM_CREDENTIALS.0.into(), SIM_CREDENTIALS.1.into())),
    })
    .await;
    let daemon = daemon::start(
        &cfg,
        Deps {
            ec2: Arc::new(ec2),
            imds: Arc::new(imds),
            // No veths here: every pod counts as present (restore and orphan sweep).
            veths: Arc::new(daemon::AllVethsPresent),
        },
    )
    .await?;
    Ok(InProc {
        node,
        daemon,
        cfg,
        since,
        _dir: dir,
    })
}

impl InProc {
    /// A gRPC channel to the daemon's socket.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(vpc_cni_rpc::connect_channel(&self.cfg.grpc_socket, Duration::from_secs(5)).await?)
    }

    /// Mutating EC2 calls (every action but `Describe*`) the daemon made so far, by action.
    pub fn mutating_calls(&self) -> BTreeMap<String, u64> {
        mutating_calls(&self.node, self.since)
    }

    /// Stops the daemon and the simulator.
    pub async fn stop(self) {
        self.daemon.stop().await;
        self.node.running.shutdown();
    }
}

/// Mutating EC2 calls (every action but `Describe*`) after sequence number `since`.
pub fn mutating_calls(node: &SimNode, since: u64) -> BTreeMap<String, u64> {
    node.shared.with(|s| {
        let mut out = BTreeMap::new();
        for c in s.calls().iter().filter(|c| c.seq > since) {
            if !c.action.starts_with("Describe") {
                *out.entry(c.action.clone()).or_insert(0) += 1;
            }
        }
        out
    })
}

/// The sequence number of the simulator's last call.
pub fn last_seq(node: &SimNode) -> u64 {
    node.shared
        .with(|s| s.calls().back().map(|c| c.seq).unwrap_or(0))
}

/// Nearest-rank percentile of sorted values.
#[allow(dead_code)] // not every bench prints percentiles
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
