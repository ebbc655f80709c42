//! The pool-policy sweep (`cargo bench -p subnet-calc --bench policy_sweep`): the reference and
//! the demand-driven flavour on the same timelines, side by side.
//!
//! Timelines: every configuration of the oscillation grid in `tests/policy_properties.rs`
//! (t3.small, m5.large, m5.xlarge; prefix mode off and on; warm ENI, warm/minimum IP and warm
//! prefix targets) as 8 nodes over a day with a daily cycle and 1.5 replacements per pod per
//! hour, plus the quick-start day (`examples/daily-cycle.yaml`), a burst day and a flat day.
//!
//! For each: idle pod addresses (allocated minus assigned, time-averaged and peak), mutating EC2
//! calls and pod-seconds waiting, and whether the aim holds: time-averaged idle at most a third
//! of the reference's, mutating calls at most the reference's, no waiting where the reference
//! has none. `BENCH_QUICK=1` runs 6 hours instead of 24; `DEMAND='{min_release: 2}'` sweeps
//! other demand settings (YAML, as `config.demand` in a timeline file);
//! `LATENCY='{assign: 300, create_eni: 3000}'` charges EC2's time to grow the pool (ms) to the
//! pods that wait for it (`ec2_latency_ms` in a timeline file).

use std::time::Instant;

use subnet_calc::limits::{Catalog, LimitOverrides};
use subnet_calc::node::Ec2Latency;
use subnet_calc::policy::{DemandSettings, Flavour};
use subnet_calc::timeline::{self, TimelineInput, TimelineReport};

struct Row {
    name: String,
    reference: TimelineReport,
    demand: TimelineReport,
}

impl Row {
    fn idle_ok(&self) -> bool {
        self.demand.idle_ips_avg * 3.0 <= self.reference.idle_ips_avg
    }
    fn calls_ok(&self) -> bool {
        self.demand.ec2_calls.mutating() <= self.reference.ec2_calls.mutating()
    }
    fn wait_ok(&self) -> bool {
        self.reference.pending_pod_seconds > 0 || self.demand.pending_pod_seconds == 0
    }
}

fn run(
    text: &str,
    policy: Flavour,
    hours: Option<u64>,
    demand: Option<&DemandSettings>,
    latency: Option<Ec2Latency>,
) -> TimelineReport {
    let mut input = TimelineInput::parse(text).expect("timeline parses");
    input.config.policy = policy;
    if let Some(l) = latency {
        input.ec2_latency_ms = l;
    }
    if let Some(d) = demand {
        input.config.demand = *d;
    }
    if let Some(h) = hours {
        input.duration.0 = input.duration.0.min(h * 3600);
    }
    timeline::simulate(input, Catalog::embedded()).expect("timeline runs")
}

fn grid() -> Vec<(String, String)> {
    let mut targets: Vec<(u32, u32, u32, u32)> = (0..3).map(|we| (we, 0, 0, 0)).collect();
    for (wi, mi) in [(1, 0), (5, 0), (0, 5), (0, 20), (3, 10), (16, 16), (30, 0)] {
        targets.push((1, wi, mi, 0));
    }
    for wp in 0..3 {
        targets.push((1, 0, 0, wp));
    }
    let mut out = Vec::new();
    for ty in ["t3.small", "m5.large", "m5.xlarge"] {
        let l = Catalog::embedded()
            .lookup(ty, &LimitOverrides::default())
            .expect("known type");
        let cap = l.max_enis * (l.ipv4_per_eni - 1);
        let max = (f64::from(cap) / 1.2).floor() as u32;
        let min = (max / 6).max(1);
        for pd in [false, true] {
            for &(we, wi, mi, wp) in &targets {
                if pd && wi == 0 && mi == 0 && wp == 0 {
                    continue; // ipamd refuses prefix mode without a target
                }
                let name = format!(
                    "{ty} pd={} eni={we} ip={wi} min={mi} pfx={wp}",
                    u8::from(pd)
                );
                let text = format!(
                    "subnet: {{cidr: 10.0.0.0/19}}
config: {{warm_eni_target: {we}, warm_ip_target: {wi}, minimum_ip_target: {mi}, warm_prefix_target: {wp}, prefix_delegation: {pd}}}
duration: 24h
seed: 21
node_groups:
  - {{instance_type: {ty}, count: 8, spread: 0.2, churn_per_hour: 1.5, pods: {{daily: {{min: {min}, max: {max}, peak: 14h}}}}}}
"
                );
                out.push((name, text));
            }
        }
    }
    for (name, file) in [
        ("quick-start day (daily-cycle.yaml)", "daily-cycle.yaml"),
        ("burst day (burst-day.yaml)", "burst-day.yaml"),
        ("flat day (flat-day.yaml)", "flat-day.yaml"),
    ] {
        let path = format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("example readable");
        out.push((name.to_owned(), text));
    }
    out
}

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let hours = quick.then_some(6);
    let demand: Option<DemandSettings> = std::env::var("DEMAND").ok().map(|y| {
        let d: DemandSettings = serde_yaml::from_str(&y).expect("DEMAND is demand settings");
        d.validate().expect("valid DEMAND settings");
        d
    });
    if let Some(d) = &demand {
        println!("demand settings: {d:?}");
    }
    let latency: Option<Ec2Latency> = std::env::var("LATENCY")
        .ok()
        .map(|y| serde_yaml::from_str(&y).expect("LATENCY is {assign: ms, create_eni: ms}"));
    if let Some(l) = &latency {
        println!("EC2 latency charged to waiting pods: {l:?}");
    }
    let started = Instant::now();
    let rows: Vec<Row> = grid()
        .into_iter()
        .map(|(name, text)| Row {
            reference: run(&text, Flavour::Reference, hours, None, latency),
            demand: run(&text, Flavour::Demand, hours, demand.as_ref(), latency),
            name,
        })
        .collect();
    println!(
        "policy sweep: {} timelines, reference vs demand, {} ({:.1} s)\n",
        rows.len(),
        if quick { "6 h each" } else { "24 h each" },
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>6} {:>6} {:>6} {:>7} {:>7} {:>8} {:>8}  aim",
        "timeline",
        "idle ref",
        "idle dem",
        "ratio",
        "pk ref",
        "pk dem",
        "mut ref",
        "mut dem",
        "wait ref",
        "wait dem"
    );
    let (mut idle_ok, mut calls_ok, mut wait_ok, mut all_ok) = (0, 0, 0, 0);
    let (mut sum_ref, mut sum_dem, mut calls_ref, mut calls_dem) = (0.0, 0.0, 0u64, 0u64);
    let (mut wait_ref, mut wait_dem, mut wait_worse) = (0u64, 0u64, 0usize);
    for r in &rows {
        let ratio = if r.reference.idle_ips_avg > 0.0 {
            r.demand.idle_ips_avg / r.reference.idle_ips_avg
        } else {
            f64::NAN
        };
        let mut miss = Vec::new();
        if !r.idle_ok() {
            miss.push("idle");
        }
        if !r.calls_ok() {
            miss.push("calls");
        }
        if !r.wait_ok() {
            miss.push("wait");
        }
        idle_ok += usize::from(r.idle_ok());
        calls_ok += usize::from(r.calls_ok());
        wait_ok += usize::from(r.wait_ok());
        all_ok += usize::from(miss.is_empty());
        sum_ref += r.reference.idle_ips_avg;
        sum_dem += r.demand.idle_ips_avg;
        calls_ref += r.reference.ec2_calls.mutating();
        calls_dem += r.demand.ec2_calls.mutating();
        wait_ref += r.reference.pending_pod_seconds;
        wait_dem += r.demand.pending_pod_seconds;
        wait_worse += usize::from(r.demand.pending_pod_seconds > r.reference.pending_pod_seconds);
        println!(
            "{:<44} {:>9.1} {:>9.1} {:>6.2} {:>6} {:>6} {:>7} {:>7} {:>8} {:>8}  {}",
            r.name,
            r.reference.idle_ips_avg,
            r.demand.idle_ips_avg,
            ratio,
            r.reference.idle_ips_peak,
            r.demand.idle_ips_peak,
            r.reference.ec2_calls.mutating(),
            r.demand.ec2_calls.mutating(),
            r.reference.pending_pod_seconds,
            r.demand.pending_pod_seconds,
            if miss.is_empty() {
                "met".to_owned()
            } else {
                format!("missed: {}", miss.join(", "))
            }
        );
    }
    let n = rows.len();
    println!(
        "\naim met in {all_ok} of {n}: idle <= 1/3 in {idle_ok}, calls <= reference in {calls_ok}, no new waiting in {wait_ok}"
    );
    println!(
        "totals: idle {sum_ref:.0} -> {sum_dem:.0} ({:.2}), mutating calls {calls_ref} -> {calls_dem} ({:.2})",
        sum_dem / sum_ref.max(1e-9),
        calls_dem as f64 / calls_ref.max(1) as f64
    );
    println!(
        "pod-seconds waiting {wait_ref} -> {wait_dem}; demand waits longer than the reference in {wait_worse} of {n}"
    );
}
