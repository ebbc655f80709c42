//! Burst benchmark: 110 pods at once on a cold node, the reference policy against ours.
//!
//! Each run serves a fresh VPC simulator on loopback with one node (`m5.4xlarge`, 8 ENIs of 30
//! addresses: room for 110 pods in secondary-IP mode) and the realistic EC2 latencies of
//! `vpc_sim::control::LatencyModel::realistic` (describes ~70 ms, assign ~250 ms, create ENI
//! ~450 ms, attach ~1.1 s), starts ipamd in-process with its defaults (WARM_ENI_TARGET=1, 5 s
//! pool tick, EC2 pacing of 5 mutating calls/s) and only `VPC_CNI_POLICY` set, waits until it
//! serves (boot and pre-scaling done: a cold node), then sends 110 `AddNetwork` calls at once
//! over its gRPC socket, each retried every 250 ms while ipamd has no free address, as the
//! plugin does.
//!
//! Measured per run:
//! - **burst**: from the first `AddNetwork` until every pod has its address;
//! - **mutating calls**: EC2 calls other than `Describe*` ipamd made from its start until the
//!   pool is quiet again (not low, no mutating call for two pool ticks);
//! - **idle addresses**: addresses ipamd holds but no pod uses, once quiet.
//!
//! Repetitions interleave the flavours (reference first on even repetitions, ours first on odd
//! ones) so that machine load drifts hit both alike. Prints every run, then per flavour the
//! median, p99 (nearest rank) and min–max, and the ratios of the medians against the aim
//! (ours at most half the reference's burst time and mutating calls).
//!
//! `cargo bench -p vpc-cni-e2e --bench burst`; `BURST_REPS` (default 5) and `BURST_PODS`
//! (default 110) change the size.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipamd::config::{Config, SimSettings};
use ipamd::daemon::{self, Deps, VethCheck};
use ipamd::io::ec2::aws::{AwsEc2, AwsSettings};
use ipamd::io::imds::{AwsImds, ImdsSettings};
use ipamd::io::sim_backend::{self, SimNode, SIM_CREDENTIALS, SIM_REGION};
use vpc_cni_e2e::demo::add_network_with;
use vpc_sim::control::LatencyModel;
use vpc_sim::sim::SimConfig;

const INSTANCE_TYPE: &str = "m5.4xlarge";
/// How long the pool must stay without a mutating call to count as quiet (two default ticks).
const QUIET: Duration = Duration::from_secs(10);
/// Bound on one burst.
const BURST_WAIT: Duration = Duration::from_secs(180);
/// Bound on the pool settling after the burst.
const SETTLE_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Flavour {
    Reference,
    Ours,
}

impl Flavour {
    fn name(self) -> &'static str {
        match self {
            Flavour::Reference => "reference",
            Flavour::Ours => "ours",
        }
    }
}

#[derive(Debug, Clone)]
struct Sample {
    burst: Duration,
    mutating: u64,
    mutating_by_action: BTreeMap<String, u64>,
    idle: u64,
    enis: usize,
}

fn env_usize(var: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(var) {
        Ok(v) => v.parse().with_context(|| format!("{var}={v:?}")),
        Err(_) => Ok(default),
    }
}

/// Mutating EC2 calls (every action but `Describe*`) after sequence number `since`.
fn mutating_calls(node: &SimNode, since: u64) -> BTreeMap<String, u64> {
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

fn last_seq(node: &SimNode) -> u64 {
    node.shared
        .with(|s| s.calls().back().map(|c| c.seq).unwrap_or(0))
}

async fn one_run(flavour: Flavour, pods: usize, seed: u64) -> anyhow::Result<Sample> {
    let node = sim_backend::start(
        &SimSettings {
            instance_type: INSTANCE_TYPE.into(),
            vpc_cidr: "10.0.0.0/16".parse().context("VPC CIDR")?,
            subnet_cidr: "10.0.0.0/18".parse().context("subnet CIDR")?,
            ipv6: false,
        },
        SimConfig {
            seed,
            ..SimConfig::default()
        },
    )
    .await?;
    // The set-up (VPC, subnet, instance) is not the node's business: latencies from here on.
    node.shared
        .with(|s| s.set_latency(LatencyModel::realistic()));
    let since = last_seq(&node);
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("ipamd.sock").display().to_string();
    let store = dir.path().join("ipam.json").display().to_string();
    let (ec2_url, imds_url) = (node.ec2_url(), node.imds_url());
    let cfg = Config::for_test(&[
        ("IPAMD_GRPC_SOCKET", &sock),
        ("AWS_VPC_K8S_CNI_BACKING_STORE", &store),
        ("METRICS_BIND_ADDRESS", "127.0.0.1:0"),
        ("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0"),
        ("AWS_EC2_ENDPOINT", &ec2_url),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds_url),
        ("VPC_CNI_POLICY", flavour.name()),
    ])?;
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
    let veth: VethCheck = Arc::new(|_: &str, _: &str| true);
    let d = daemon::start(
        &cfg,
        Deps {
            ec2: Arc::new(ec2),
            imds: Arc::new(imds),
            veth_exists: veth,
        },
    )
    .await?;
    let channel = vpc_cni_rpc::connect_channel(&cfg.grpc_socket, Duration::from_secs(5)).await?;

    // The burst.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..pods {
        let mut client = vpc_cni_rpc::CniBackendClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            add_network_with(&mut client, &format!("burst-{i}"), BURST_WAIT).await
        }));
    }
    let mut addrs = std::collections::BTreeSet::new();
    for t in tasks {
        addrs.insert(t.await??);
    }
    let burst = start.elapsed();
    if addrs.len() != pods {
        bail!("{} distinct addresses for {pods} pods", addrs.len());
    }

    // Quiet: not low and no mutating call for QUIET.
    let settle_deadline = Instant::now() + SETTLE_WAIT;
    let mut seen = mutating_calls(&node, since).values().sum::<u64>();
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = mutating_calls(&node, since).values().sum::<u64>();
        if now != seen || d.pool().is_low() {
            seen = now;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() >= QUIET {
            break;
        }
        if Instant::now() >= settle_deadline {
            bail!("{} pool not quiet within {SETTLE_WAIT:?}", flavour.name());
        }
    }
    let mutating_by_action = mutating_calls(&node, since);
    let (idle, enis) = {
        let ds = d.state().lock();
        let t = ds.totals();
        (t.total.saturating_sub(t.assigned) as u64, t.enis as usize)
    };
    d.stop().await;
    node.running.shutdown();
    Ok(Sample {
        burst,
        mutating: mutating_by_action.values().sum(),
        mutating_by_action,
        idle,
        enis,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median_f64(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

struct Stats {
    median: f64,
    p99: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    Stats {
        median: median_f64(&v),
        p99: percentile(&v, 99.0),
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a filter argument other than ours means "not this one".
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("burst: bench");
        return Ok(());
    }
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-')) {
        if !"burst".contains(filter.as_str()) {
            return Ok(());
        }
    }
    let reps = env_usize("BURST_REPS", 5)?.max(1);
    let pods = env_usize("BURST_PODS", 110)?.max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "burst: {pods} pods on a cold {INSTANCE_TYPE}, realistic EC2 latencies, {reps} interleaved \
         repetitions per flavour"
    );
    let mut samples: BTreeMap<Flavour, Vec<Sample>> = BTreeMap::new();
    for rep in 0..reps {
        let order = if rep % 2 == 0 {
            [Flavour::Reference, Flavour::Ours]
        } else {
            [Flavour::Ours, Flavour::Reference]
        };
        for f in order {
            let s = rt
                .block_on(one_run(f, pods, 1000 + rep as u64))
                .with_context(|| format!("{} repetition {rep}", f.name()))?;
            let calls: Vec<String> = s
                .mutating_by_action
                .iter()
                .map(|(a, n)| format!("{a} {n}"))
                .collect();
            println!(
                "  rep {rep} {:<9} burst {:>6.2} s  mutating {:>3} ({})  idle {:>3}  ENIs {}",
                f.name(),
                s.burst.as_secs_f64(),
                s.mutating,
                calls.join(", "),
                s.idle,
                s.enis
            );
            samples.entry(f).or_default().push(s);
        }
    }
    println!();
    println!(
        "{:<10} {:>28} {:>28} {:>28}",
        "flavour",
        "burst s: median p99 [min-max]",
        "mutating: median p99 [min-max]",
        "idle: median p99 [min-max]"
    );
    let mut medians = BTreeMap::new();
    for (f, v) in &samples {
        let b = stats(v.iter().map(|s| s.burst.as_secs_f64()).collect());
        let m = stats(v.iter().map(|s| s.mutating as f64).collect());
        let i = stats(v.iter().map(|s| s.idle as f64).collect());
        println!(
            "{:<10} {:>7.2} {:>6.2} [{:.2}-{:.2}] {:>9.1} {:>5} [{}-{}] {:>12.1} {:>5} [{}-{}]",
            f.name(),
            b.median,
            b.p99,
            b.min,
            b.max,
            m.median,
            m.p99,
            m.min,
            m.max,
            i.median,
            i.p99,
            i.min,
            i.max
        );
        medians.insert(*f, (b.median, m.median, i.median));
    }
    if let (Some(r), Some(o)) = (
        medians.get(&Flavour::Reference),
        medians.get(&Flavour::Ours),
    ) {
        let verdict = |ratio: f64| if ratio <= 0.5 { "met" } else { "NOT met" };
        let time = o.0 / r.0;
        let calls = o.1 / r.1;
        println!();
        println!(
            "ours / reference (medians): burst time {time:.2} (aim <= 0.50: {}), mutating calls \
             {calls:.2} (aim <= 0.50: {}), idle addresses {:.0} vs {:.0}",
            verdict(time),
            verdict(calls),
            o.2,
            r.2
        );
    }
    Ok(())
}
