//! The daemon against the planner: one compressed day of pod arrivals and departures driven
//! through the real ipamd on the VPC simulator, and the planner's prediction of the same day.
//!
//! The day: pods on one `m5.4xlarge` node follow a daily cycle (10 at the trough, 110 at the
//! peak, highest at 60% of the day) with a batch job of 40 pods for 5% of the day at 30%,
//! compressed into `DVP_SECONDS` (default 960 s: a day at 90x). Pods change every pool tick
//! (5 s, the default of both); the timers (IP cooldown 30 s, release gate 30 s, minimum ENI age
//! 60 s) and the demand flavour's windows are real time on both sides, the same values.
//!
//! - **planner**: `subnet_calc::timeline` on the same trace, one node, the same settings, the
//!   mean EC2 latencies of the simulator's realistic model charged to waiting pods.
//! - **daemon**: ipamd in-process (the real SDK clients over HTTP) on a served simulator with
//!   the realistic EC2 latencies. A driver brings the pods to the trace at every tick as the
//!   runtime would: the waiting pods ask with `AddNetwork` over the gRPC socket, all at once
//!   (as concurrent sandbox starts do), and, finding no address, ask again every 250 ms; leaving pods (pending ones first, then running ones
//!   chosen by a seeded random draw, as the planner chooses them) get `DelNetwork`. The
//!   datastore's totals are sampled every second; the EC2 calls are the simulator's log.
//!
//! For each configuration both are printed side by side: addresses held (time-averaged and
//! peak), idle addresses (held but not assigned), mutating EC2 calls by action (the actions
//! the planner models; any other mutating call the daemon made is listed apart), and
//! pod-seconds waiting, with the difference in percent and whether addresses held and calls
//! agree within 5%. The configurations run concurrently, each with its own simulator and
//! daemon, so the whole bench takes one compressed day.
//!
//! `cargo bench -p vpc-cni-e2e --bench daemon_vs_planner`; `DVP_SECONDS` changes the length of
//! the day, `DVP_CASES` (comma-separated names) picks configurations.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::{bail, Context};
use subnet_calc::limits::Catalog;
use subnet_calc::node::Ec2Action;
use subnet_calc::timeline::{TimelineInput, TimelineReport};
use tokio::time::Instant;
use vpc_cni_e2e::demo::{add_request, del_request, Client};
use vpc_sim::control::LatencyModel;

#[path = "common/inproc.rs"]
mod inproc;

const INSTANCE_TYPE: &str = "m5.4xlarge";
const SUBNET: &str = "10.0.0.0/18";
/// Pool tick of both sides, and the step at which pods change.
const TICK: u64 = 5;
/// A pod without an address asks again this often (the plugin's retry).
const RETRY: Duration = Duration::from_millis(250);
/// Waiting pods asking at once, at most: below the gRPC socket's streams per connection
/// (`VPC_CNI_GRPC_MAX_STREAMS`, 64), since the driver's pods share one connection.
const IN_FLIGHT: usize = 48;
/// Means of the simulator's realistic latencies, for the planner's waiting model: one assign,
/// and create + attach of an ENI.
const ASSIGN_MS: u64 = 150;
const CREATE_ENI_MS: u64 = 1000;
/// Agreement asked of addresses held and EC2 calls.
const AGREE: f64 = 0.05;

/// One configuration: the same settings as ipamd variables and as planner fields.
#[derive(Clone)]
struct Case {
    name: &'static str,
    policy: &'static str,
    env: Vec<(&'static str, &'static str)>,
    planner: serde_json::Value,
}

fn cases() -> Vec<Case> {
    use serde_json::json;
    vec![
        Case {
            name: "reference-eni1",
            policy: "reference",
            env: vec![],
            planner: json!({}),
        },
        Case {
            name: "reference-ip5-min10",
            policy: "reference",
            env: vec![("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "10")],
            planner: json!({"warm_ip_target": 5, "minimum_ip_target": 10}),
        },
        Case {
            name: "ours-eni1",
            policy: "ours",
            env: vec![],
            planner: json!({}),
        },
        Case {
            name: "demand",
            policy: "demand",
            // The day is compressed, so is the demand memory: a few minutes instead of 30.
            env: vec![
                ("VPC_CNI_DEMAND_WINDOW", "3m"),
                ("VPC_CNI_DEMAND_GROW_BATCH", "60s"),
                ("VPC_CNI_DEMAND_HOLD", "60s"),
            ],
            planner: json!({"demand": {"window": 180, "grow_batch": 60, "hold": 60}}),
        },
    ]
}

/// The compressed day as a step trace: (second, pods) at every tick.
fn day(seconds: u64) -> Vec<(u64, u32)> {
    let (min, max, batch) = (10.0, 110.0, 40.0);
    let d = seconds as f64;
    (0..=seconds / TICK)
        .map(|i| {
            let t = i * TICK;
            let phase = (t as f64 - 0.6 * d) / d * std::f64::consts::TAU;
            let mut pods = min + (max - min) * (1.0 + phase.cos()) / 2.0;
            if (0.30 * d..0.35 * d).contains(&(t as f64)) {
                pods += batch;
            }
            (t, pods.round() as u32)
        })
        .collect()
}

fn at(trace: &[(u64, u32)], t: u64) -> u32 {
    let i = trace.partition_point(|p| p.0 <= t);
    if i == 0 {
        0
    } else {
        trace[i - 1].1
    }
}

/// What one side measured.
#[derive(Debug, Default)]
struct Measured {
    held_avg: f64,
    held_peak: u64,
    idle_avg: f64,
    idle_peak: u64,
    /// Mutating calls of the actions the planner models, by EC2 action name.
    calls: BTreeMap<String, u64>,
    /// Mutating calls of other actions (daemon only).
    other_calls: BTreeMap<String, u64>,
    waiting_pod_seconds: f64,
}

impl Measured {
    fn mutating(&self) -> u64 {
        self.calls.values().sum()
    }
}

fn planner(case: &Case, trace: &[(u64, u32)], seconds: u64) -> anyhow::Result<Measured> {
    let mut config = case.planner.clone();
    config["policy"] = case.policy.into();
    let input = serde_json::json!({
        "subnet": {"cidr": SUBNET},
        "config": config,
        "duration": seconds,
        "tick": TICK,
        "sample_every": TICK,
        "seed": 7,
        "ec2_latency_ms": {"assign": ASSIGN_MS, "create_eni": CREATE_ENI_MS},
        "node_groups": [{
            "instance_type": INSTANCE_TYPE,
            "count": 1,
            "pods": {"trace": trace},
        }],
    });
    let input = TimelineInput::parse(&input.to_string())
        .map_err(|e| anyhow::anyhow!("planner input for {}: {e}", case.name))?;
    let r: TimelineReport = subnet_calc::timeline::simulate(input, Catalog::embedded())
        .map_err(|e| anyhow::anyhow!("planner for {}: {e}", case.name))?;
    let n = r.samples.len().max(1) as f64;
    let calls = Ec2Action::ALL
        .iter()
        .filter(|a| a.is_mutating())
        .map(|a| (a.name().to_owned(), r.ec2_calls.get(*a)))
        .filter(|(_, n)| *n > 0)
        .collect();
    Ok(Measured {
        held_avg: r
            .samples
            .iter()
            .map(|s| s.allocated_ips as f64)
            .sum::<f64>()
            / n,
        held_peak: r.allocated_ips_peak,
        idle_avg: r.idle_ips_avg,
        idle_peak: r.idle_ips_peak,
        calls,
        other_calls: BTreeMap::new(),
        waiting_pod_seconds: r.pending_pod_seconds as f64,
    })
}

/// One `AddNetwork`: `Ok(true)` when the pod got an address, `Ok(false)` when ipamd had none.
async fn add_once(client: &mut Client, pod: &str) -> anyhow::Result<bool> {
    let r = client
        .add_network(add_request(pod))
        .await
        .with_context(|| format!("AddNetwork {pod}"))?
        .into_inner();
    Ok(r.success)
}

/// One `DelNetwork`; a pod ipamd does not know (one that never got an address) is deleted
/// already, as the plugin takes it.
async fn del(client: &mut Client, pod: &str) -> anyhow::Result<()> {
    let r = match client.del_network(del_request(pod)).await {
        Ok(r) => r.into_inner(),
        Err(s) if vpc_cni_rpc::is_unknown_pod(&s) => return Ok(()),
        Err(s) => return Err(s).with_context(|| format!("DelNetwork {pod}")),
    };
    if !r.success {
        bail!("DelNetwork {pod} refused");
    }
    Ok(())
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn daemon(case: &Case, trace: &[(u64, u32)], seconds: u64) -> anyhow::Result<Measured> {
    let tick = TICK.to_string();
    let mut env = vec![
        ("VPC_CNI_POLICY", case.policy),
        ("VPC_CNI_POOL_TICK", &tick),
    ];
    env.extend(case.env.iter().copied());
    let run = inproc::start(INSTANCE_TYPE, SUBNET, 7, LatencyModel::realistic(), &env).await?;
    let mut client = Client::new(run.channel().await?);
    let model: BTreeMap<&str, ()> = Ec2Action::ALL
        .iter()
        .filter(|a| a.is_mutating())
        .map(|a| (a.name(), ()))
        .collect();

    let t0 = Instant::now();
    let mut rng = 0x5eed_u64;
    let mut next_pod = 0u64;
    let mut running: Vec<String> = Vec::new();
    let mut pending: VecDeque<(String, Instant)> = VecDeque::new();
    let (mut held_sum, mut idle_sum, mut samples) = (0u64, 0u64, 0u64);
    let (mut held_peak, mut idle_peak) = (0u64, 0u64);
    let mut waited = Duration::ZERO;
    let steps_per_second = (1000 / RETRY.as_millis()) as u64;
    for step in 0..=seconds * steps_per_second {
        tokio::time::sleep_until(t0 + RETRY * step as u32).await;
        let (second, sub) = (step / steps_per_second, step % steps_per_second);
        if sub == 0 && second % TICK == 0 {
            let want = at(trace, second) as usize;
            while running.len() + pending.len() < want {
                pending.push_back((format!("pod-{next_pod}"), Instant::now()));
                next_pod += 1;
            }
            while running.len() + pending.len() > want {
                if let Some((pod, since)) = pending.pop_back() {
                    waited += since.elapsed();
                    del(&mut client, &pod).await?;
                    continue;
                }
                let i = (splitmix(&mut rng) % running.len() as u64) as usize;
                let pod = running.swap_remove(i);
                del(&mut client, &pod).await?;
            }
        }
        if !pending.is_empty() {
            // Every waiting pod asks at once, as the runtime's concurrent sandbox starts do
            // (one plugin each): the daemon sees a tick's arrivals together, as the planner
            // does, rather than one refused pod per retry.
            let mut asks = tokio::task::JoinSet::new();
            for (i, (pod, _)) in pending.iter().take(IN_FLIGHT).enumerate() {
                let (mut c, pod) = (client.clone(), pod.clone());
                asks.spawn(async move { (i, add_once(&mut c, &pod).await) });
            }
            let mut served = vec![false; pending.len()];
            while let Some(answer) = asks.join_next().await {
                let (i, got) = answer.context("AddNetwork task")?;
                served[i] = got?;
            }
            let mut still = VecDeque::with_capacity(pending.len());
            for ((pod, since), got) in pending.drain(..).zip(served) {
                if got {
                    waited += since.elapsed();
                    running.push(pod);
                } else {
                    still.push_back((pod, since));
                }
            }
            pending = still;
        }
        if sub == 0 {
            let t = run.daemon.state().lock().totals();
            let idle = t.total.saturating_sub(t.assigned);
            held_sum += t.total;
            idle_sum += idle;
            held_peak = held_peak.max(t.total);
            idle_peak = idle_peak.max(idle);
            samples += 1;
        }
    }
    for (_, since) in &pending {
        waited += since.elapsed();
    }
    let (mut calls, mut other_calls) = (BTreeMap::new(), BTreeMap::new());
    for (action, n) in run.mutating_calls() {
        if model.contains_key(action.as_str()) {
            calls.insert(action, n);
        } else {
            other_calls.insert(action, n);
        }
    }
    run.stop().await;
    let n = samples.max(1) as f64;
    Ok(Measured {
        held_avg: held_sum as f64 / n,
        held_peak,
        idle_avg: idle_sum as f64 / n,
        idle_peak,
        calls,
        other_calls,
        waiting_pod_seconds: waited.as_secs_f64(),
    })
}

/// Relative difference of the daemon's figure from the planner's.
fn diff(planner: f64, daemon: f64) -> f64 {
    if planner == 0.0 {
        if daemon == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (daemon - planner) / planner
    }
}

fn report(case: &Case, p: &Measured, d: &Measured) -> bool {
    println!("\n{} (VPC_CNI_POLICY={}{})", case.name, case.policy, {
        let s: Vec<String> = case.env.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        s.concat()
    });
    println!(
        "  {:<28} {:>10} {:>10} {:>9}",
        "", "planner", "daemon", "diff"
    );
    let row = |what: &str, a: f64, b: f64, checked: bool| -> bool {
        let x = diff(a, b);
        let ok = x.abs() <= AGREE;
        println!(
            "  {what:<28} {a:>10.1} {b:>10.1} {:>+8.1}% {}",
            x * 100.0,
            if !checked {
                ""
            } else if ok {
                "within 5%"
            } else {
                "NOT within 5%"
            }
        );
        !checked || ok
    };
    let mut ok = true;
    ok &= row("addresses held, average", p.held_avg, d.held_avg, true);
    ok &= row(
        "addresses held, peak",
        p.held_peak as f64,
        d.held_peak as f64,
        true,
    );
    row("idle addresses, average", p.idle_avg, d.idle_avg, false);
    row(
        "idle addresses, peak",
        p.idle_peak as f64,
        d.idle_peak as f64,
        false,
    );
    ok &= row(
        "mutating EC2 calls",
        p.mutating() as f64,
        d.mutating() as f64,
        true,
    );
    let actions: std::collections::BTreeSet<&String> =
        p.calls.keys().chain(d.calls.keys()).collect();
    for a in actions {
        let get = |m: &Measured| m.calls.get(a).copied().unwrap_or(0) as f64;
        row(&format!("  {a}"), get(p), get(d), false);
    }
    row(
        "pod-seconds waiting",
        p.waiting_pod_seconds,
        d.waiting_pod_seconds,
        false,
    );
    if !d.other_calls.is_empty() {
        let s: Vec<String> = d
            .other_calls
            .iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        println!(
            "  daemon's other mutating calls (not modelled): {}",
            s.join(", ")
        );
    }
    ok
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("daemon_vs_planner: bench");
        return Ok(());
    }
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-')) {
        if !"daemon_vs_planner".contains(filter.as_str()) {
            return Ok(());
        }
    }
    let seconds: u64 = match std::env::var("DVP_SECONDS") {
        Ok(v) => v.parse().with_context(|| format!("DVP_SECONDS={v:?}"))?,
        Err(_) => 960,
    };
    if seconds < 10 * TICK {
        bail!("DVP_SECONDS={seconds}: at least {} seconds", 10 * TICK);
    }
    let mut cases = cases();
    if let Ok(names) = std::env::var("DVP_CASES") {
        let want: Vec<&str> = names.split(',').map(str::trim).collect();
        for w in &want {
            if !cases.iter().any(|c| c.name == *w) {
                let all: Vec<&str> = cases.iter().map(|c| c.name).collect();
                bail!("DVP_CASES: no case {w:?} (cases: {})", all.join(", "));
            }
        }
        cases.retain(|c| want.contains(&c.name));
    }
    let trace = day(seconds);
    println!(
        "daemon vs planner: one {INSTANCE_TYPE}, a day compressed into {seconds} s ({:.0}x), \
         {} configurations concurrently; load average {}",
        86_400.0 / seconds as f64,
        cases.len(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let planned: Vec<Measured> = cases
        .iter()
        .map(|c| planner(c, &trace, seconds))
        .collect::<anyhow::Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let measured: Vec<Measured> = rt.block_on(async {
        let runs: Vec<_> = cases
            .iter()
            .map(|c| {
                let (c, trace) = (c.clone(), trace.clone());
                tokio::spawn(async move {
                    daemon(&c, &trace, seconds)
                        .await
                        .with_context(|| format!("daemon run {}", c.name))
                })
            })
            .collect();
        let mut out = Vec::new();
        for r in runs {
            out.push(r.await??);
        }
        anyhow::Ok(out)
    })?;
    let mut all_ok = true;
    for ((c, p), d) in cases.iter().zip(&planned).zip(&measured) {
        all_ok &= report(c, p, d);
    }
    println!(
        "\naddresses held and mutating calls within 5% in every configuration: {}",
        if all_ok { "yes" } else { "NO" }
    );
    Ok(())
}
