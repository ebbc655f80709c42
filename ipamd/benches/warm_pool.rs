//! Time from start to a warm pool with the simulator's realistic EC2 latencies
//! (`vpc_sim::control::LatencyModel::realistic`: describes ~40 ms, assign ~150 ms, create
//! ENI ~300 ms, attach ~700 ms, plus exponential tails), in secondary-IP mode and in prefix
//! mode, with every pool and pacing setting at its default (`WARM_ENI_TARGET=1`,
//! `WARM_PREFIX_TARGET=1`, 5 s pool tick, 5 mutating calls/s).
//!
//! `cargo bench -p ipamd --bench warm_pool` (not run in CI; no root needed). Environment:
//! `RUNS` (starts per mode, default 5), `INSTANCE_TYPE` (default m5.large).
//!
//! The daemon runs in-process (`daemon::start`, the same start-up as the binary, including
//! building the SDK clients) against the simulator served on loopback; the latency model is
//! switched on after the simulator created the node. Printed per mode: time until
//! `daemon::start` returns (gRPC serving; pre-scaling included) and until the pool manager
//! no longer sees the pool low, p50 and p99 (with few runs p99 is the slowest), and for the
//! last run the EC2 calls made, by action, with the latency the simulator added.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{env_or, loadavg, ms, pct};
use vpc_sim::control::LatencyModel;

/// One start: (serving, warm, calls by action: (count, added latency ms)).
async fn one(
    instance_type: &str,
    seed: u64,
    vars: &[(&str, &str)],
) -> (Duration, Duration, BTreeMap<String, (u64, u64)>) {
    let node = common::sim(instance_type, seed).await;
    let first = node
        .shared
        .with(|s| s.calls().back().map(|c| c.seq).unwrap_or(0));
    node.shared
        .with(|s| s.set_latency(LatencyModel::realistic()));
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = common::config(dir.path(), &node, vars);
    let t0 = Instant::now();
    let d = common::start(&cfg).await;
    let serving = t0.elapsed();
    let pool = d.pool().clone();
    common::wait_until("the warm pool", Duration::from_secs(300), || {
        let p = pool.clone();
        async move { !p.is_low() }
    })
    .await;
    let warm = t0.elapsed();
    let mut calls: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    node.shared.with(|s| {
        for c in s.calls().iter().filter(|c| c.seq > first) {
            let e = calls.entry(c.action.clone()).or_default();
            e.0 += 1;
            e.1 += c.latency_ms;
        }
    });
    d.stop().await;
    node.running.shutdown();
    (serving, warm, calls)
}

fn main() {
    let runs = env_or("RUNS", 5);
    let instance_type = std::env::var("INSTANCE_TYPE").unwrap_or_else(|_| "m5.large".into());
    println!("loadavg before: {}", loadavg());
    let rt = common::runtime();
    let modes: [(&str, &[(&str, &str)]); 2] = [
        ("secondary IPs, WARM_ENI_TARGET=1", &[]),
        (
            "prefixes, WARM_PREFIX_TARGET=1",
            &[
                ("ENABLE_PREFIX_DELEGATION", "true"),
                ("WARM_PREFIX_TARGET", "1"),
            ],
        ),
    ];
    let mut rows = Vec::new();
    for (name, vars) in modes {
        let (mut serving, mut warm) = (Vec::new(), Vec::new());
        let mut last = BTreeMap::new();
        for run in 0..runs {
            let (s, w, calls) = rt.block_on(one(&instance_type, 100 + run as u64, vars));
            serving.push(s);
            warm.push(w);
            last = calls;
        }
        println!("\n{name} ({instance_type}), EC2 calls of the last run:");
        for (action, (n, lat)) in &last {
            println!("  {action:<34}{n:>4} calls  {lat:>6} ms added latency");
        }
        rows.push((name, serving, warm));
    }
    println!(
        "\n{:<40}{:>12}{:>12}{:>12}{:>12}",
        "", "serving p50", "serving p99", "warm p50", "warm p99"
    );
    for (name, mut s, mut w) in rows {
        println!(
            "{name:<40}{:>12}{:>12}{:>12}{:>12}   ({} runs)",
            ms(pct(&mut s, 0.5)),
            ms(pct(&mut s, 0.99)),
            ms(pct(&mut w, 0.5)),
            ms(pct(&mut w, 0.99)),
            s.len()
        );
    }
    println!("loadavg after: {}", loadavg());
}
