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
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vpc_cni_e2e::demo::add_network_with;
use vpc_sim::control::LatencyModel;

#[path = "common/inproc.rs"]
mod inproc;
use inproc::percentile;

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

async fn one_run(flavour: Flavour, pods: usize, seed: u64) -> anyhow::Result<Sample> {
    let run = inproc::start(
        INSTANCE_TYPE,
        "10.0.0.0/18",
        seed,
        LatencyModel::realistic(),
        &[("VPC_CNI_POLICY", flavour.name())],
    )
    .await?;
    let channel = run.channel().await?;

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
    let mut seen = run.mutating_calls().values().sum::<u64>();
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = run.mutating_calls().values().sum::<u64>();
        if now != seen || run.daemon.pool().is_low() {
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
    let mutating_by_action = run.mutating_calls();
    let (idle, enis) = {
        let ds = run.daemon.state().lock();
        let t = ds.totals();
        (t.total.saturating_sub(t.assigned) as u64, t.enis as usize)
    };
    run.stop().await;
    Ok(Sample {
        burst,
        mutating: mutating_by_action.values().sum(),
        mutating_by_action,
        idle,
        enis,
    })
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
