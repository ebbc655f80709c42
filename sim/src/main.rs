//! `vpc-sim`: serves the VPC simulator on loopback (EC2 Query API, IMDSv2, admin JSON).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use vpc_sim::api::{Reply, Request, RunInstances};
use vpc_sim::control::{FaultSpec, LatencyModel};
use vpc_sim::server::{self, Shared};
use vpc_sim::sim::{SimConfig, Simulator};

#[derive(Parser)]
#[command(
    name = "vpc-sim",
    version,
    about = "A VPC simulator with AWS's EC2 semantics, on loopback"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Latency {
    /// No added latency.
    None,
    /// EC2-like latencies per call.
    Realistic,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the EC2 API, instance metadata and the admin view until SIGTERM or Ctrl-C.
    Serve {
        /// EC2 Query API listen address.
        #[arg(long, default_value = "127.0.0.1:4566")]
        ec2_listen: SocketAddr,
        /// IMDS listen address.
        #[arg(long, default_value = "127.0.0.1:4567")]
        imds_listen: SocketAddr,
        /// Admin JSON listen address.
        #[arg(long, default_value = "127.0.0.1:4568")]
        admin_listen: SocketAddr,
        /// JSON simulator config (SimConfig); flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seed of every random choice.
        #[arg(long)]
        seed: Option<u64>,
        /// Region.
        #[arg(long)]
        region: Option<String>,
        /// Delay before EC2 changes show in instance metadata (ms).
        #[arg(long)]
        imds_delay_ms: Option<u64>,
        /// Time a detach takes before the ENI is `available` (ms).
        #[arg(long)]
        detach_delay_ms: Option<u64>,
        /// Latency model; `realistic` also sets the metadata delay to 1 s and the detach delay
        /// to 3 s unless given.
        #[arg(long, value_enum)]
        latency: Option<Latency>,
        /// Enable AWS-shaped per-action token buckets (RequestLimitExceeded).
        #[arg(long)]
        throttle: bool,
        /// Fault injection: ACTION=KIND:RATE, KIND one of error, unavailable, timeout, lost
        /// (ACTION `*` = every action). Repeatable.
        #[arg(long = "fault")]
        faults: Vec<String>,
        /// Create a VPC with this CIDR at start (with an Amazon IPv6 /56).
        #[arg(long)]
        vpc_cidr: Option<String>,
        /// Create a subnet CIDR[@AZ] in that VPC at start. Repeatable.
        #[arg(long = "subnet")]
        subnets: Vec<String>,
        /// Launch an instance of this type in the first subnet at start. Repeatable.
        #[arg(long = "instance")]
        instances: Vec<String>,
    },
}

fn parse_fault(s: &str, faults: &mut BTreeMap<String, FaultSpec>) -> anyhow::Result<()> {
    let (action, spec) = s
        .split_once('=')
        .context("--fault expects ACTION=KIND:RATE")?;
    let (kind, rate) = spec
        .split_once(':')
        .context("--fault expects ACTION=KIND:RATE")?;
    let rate: f64 = rate
        .parse()
        .context("fault rate must be a number in 0..1")?;
    let f = faults.entry(action.to_owned()).or_default();
    match kind {
        "error" => f.error_rate = rate,
        "unavailable" => f.unavailable_rate = rate,
        "timeout" => f.timeout_rate = rate,
        "lost" => f.lost_response_rate = rate,
        other => bail!("unknown fault kind {other}"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cmd::Serve {
        ec2_listen,
        imds_listen,
        admin_listen,
        config,
        seed,
        region,
        imds_delay_ms,
        detach_delay_ms,
        latency,
        throttle,
        faults,
        vpc_cidr,
        subnets,
        instances,
    } = Cli::parse().cmd;
    for a in [ec2_listen, imds_listen, admin_listen] {
        if !a.ip().is_loopback() {
            bail!("{a}: vpc-sim only listens on loopback addresses");
        }
    }
    let mut cfg: SimConfig = match config {
        Some(p) => serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => SimConfig::default(),
    };
    cfg.seed = seed.unwrap_or(cfg.seed);
    cfg.region = region.or(cfg.region);
    match latency {
        Some(Latency::None) => cfg.latency = LatencyModel::none(),
        Some(Latency::Realistic) => {
            // EC2 as seen from a node: calls take time, metadata trails EC2 by about a second
            // and a detach takes a few seconds to complete.
            cfg.latency = LatencyModel::realistic();
            cfg.imds_delay_ms = cfg.imds_delay_ms.max(1000);
            cfg.detach_delay_ms = cfg.detach_delay_ms.max(3000);
        }
        None => {}
    }
    cfg.imds_delay_ms = imds_delay_ms.unwrap_or(cfg.imds_delay_ms);
    cfg.detach_delay_ms = detach_delay_ms.unwrap_or(cfg.detach_delay_ms);
    cfg.throttle.enabled |= throttle;
    for f in &faults {
        parse_fault(f, &mut cfg.faults)?;
    }
    cfg.epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut sim = Simulator::new(cfg);
    let mut launched = Vec::new();
    if let Some(cidr) = vpc_cidr {
        let cidr = cidr
            .parse()
            .map_err(|e| anyhow::anyhow!("--vpc-cidr: {e}"))?;
        let Reply::Vpc(vpc) = sim.call(
            0,
            Request::CreateVpc {
                cidr,
                amazon_ipv6: true,
                tags: Default::default(),
            },
        )?
        else {
            bail!("CreateVpc answered something else")
        };
        let v6 = vpc.ipv6_cidr.context("VPC without IPv6")?;
        let mut first = None;
        for (n, s) in subnets.iter().enumerate() {
            let (c, az) = match s.split_once('@') {
                Some((c, az)) => (c, Some(az.to_owned())),
                None => (s.as_str(), None),
            };
            let cidr = c
                .parse()
                .map_err(|e| anyhow::anyhow!("--subnet {s}: {e}"))?;
            let ipv6_cidr = vpc_sim::ipv6::Ipv6Block::new(v6.base | ((n as u128 + 1) << 64), 64);
            let Reply::Subnet(sub) = sim.call(
                0,
                Request::CreateSubnet {
                    vpc_id: vpc.id.clone(),
                    cidr,
                    availability_zone: az,
                    ipv6_cidr,
                    tags: Default::default(),
                },
            )?
            else {
                bail!("CreateSubnet answered something else")
            };
            println!(
                "vpc-sim: subnet {} {} {}",
                sub.id, sub.cidr, sub.availability_zone
            );
            first.get_or_insert(sub.id);
        }
        for t in &instances {
            let subnet_id = first.clone().context("--instance needs a --subnet")?;
            let Reply::Reservation(r) = sim.call(
                0,
                Request::RunInstances(RunInstances {
                    image_id: "ami-0123456789abcdef0".into(),
                    instance_type: t.clone(),
                    min_count: 1,
                    max_count: 1,
                    subnet_id: Some(subnet_id),
                    ..Default::default()
                }),
            )?
            else {
                bail!("RunInstances answered something else")
            };
            launched.extend(r.instances.into_iter().map(|(i, _)| i.id));
        }
        println!("vpc-sim: vpc {} {}", vpc.id, vpc.cidr);
    } else if !subnets.is_empty() || !instances.is_empty() {
        bail!("--subnet and --instance need --vpc-cidr");
    }
    // Handlers first: a SIGTERM right after the "listening" line must stop us cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let running = server::start(Shared::new(sim), ec2_listen, imds_listen, admin_listen).await?;
    for i in &launched {
        println!("vpc-sim: instance {i} imds {}", running.imds_url(i));
    }
    println!(
        "vpc-sim: listening ec2 http://{} imds http://{} admin http://{}",
        running.ec2, running.imds, running.admin
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    running.shutdown();
    println!("vpc-sim: stopped");
    Ok(())
}
