//! Benchmarks of the planner and the timeline simulator (`cargo bench -p subnet-calc`).
//!
//! - `plan`: exact and workbook mode over 10,000 node groups in a /16.
//! - `simulate`: 1,000 nodes over 24 hours at the daemon's 5-second tick (17.28 million
//!   node-ticks), reference, ours and demand policies, reporting time per node-tick.
//!
//! Prints medians and p99 over repeated runs, with the machine's load average. Set
//! `BENCH_QUICK=1` for a short smoke run.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use subnet_calc::exact;
use subnet_calc::limits::Catalog;
use subnet_calc::plan::PlanInput;
use subnet_calc::timeline::{Timeline, TimelineInput};
use subnet_calc::workbook::{self, Sheet};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn measure(name: &str, runs: usize, mut f: impl FnMut() -> u64) -> Duration {
    let mut times = Vec::with_capacity(runs);
    let mut units = 0;
    for _ in 0..runs {
        let t = Instant::now();
        units = std::hint::black_box(f());
        times.push(t.elapsed());
    }
    times.sort();
    let median = percentile(&times, 0.5);
    println!(
        "{name:<44} runs {runs:>3}  median {:>10.3} ms  p99 {:>10.3} ms  ({units} units, {:.1} ns/unit)",
        median.as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        median.as_nanos() as f64 / units.max(1) as f64
    );
    median
}

/// A deterministic plan of `n` node groups drawn from the instance table.
fn big_plan(n: usize, config: &str) -> String {
    let types: Vec<_> = Catalog::embedded()
        .iter()
        .filter(|t| t.ipv4_per_eni >= 4 && t.max_enis >= 2)
        .map(|t| (t.instance_type.clone(), t.max_enis * (t.ipv4_per_eni - 1)))
        .collect();
    let mut s = format!("subnet: {{cidr: 10.0.0.0/16}}\nconfig: {config}\nnode_groups:\n");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (t, cap) = &types[(x % types.len() as u64) as usize];
        let pods = (x >> 20) % u64::from((*cap).min(108)) + 1;
        let _ = writeln!(
            s,
            "  - {{instance_type: {t}, count: 1, pods_per_node: {pods}}}"
        );
    }
    s
}

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", load.trim());
    let runs = if quick { 3 } else { 15 };
    for (label, config) in [
        ("warm ENI", "{warm_eni_target: 1}"),
        ("warm IP", "{warm_ip_target: 5, minimum_ip_target: 10}"),
        ("prefix", "{prefix_delegation: true, warm_prefix_target: 1}"),
    ] {
        let text = big_plan(10_000, config);
        let input = PlanInput::parse(&text).expect("plan parses");
        let groups = input.resolve(Catalog::embedded()).expect("plan resolves");
        measure(&format!("plan exact, 10000 groups, {label}"), runs, || {
            let r = exact::plan(&input, &groups).expect("plan");
            r.node_groups.len() as u64
        });
    }
    let input = PlanInput::parse(&big_plan(10_000, "{warm_eni_target: 1}")).expect("parse");
    measure("plan workbook, 10000 groups", runs, || {
        let r = workbook::compute(&input, Sheet::WarmEni).expect("workbook");
        r.pods_hosted
    });

    let hours = if quick { 2 } else { 24 };
    for (policy, targets) in [
        ("reference", "warm_eni_target: 1"),
        ("ours", "warm_eni_target: 1"),
        ("demand", "warm_eni_target: 1"),
        ("reference", "warm_ip_target: 5, minimum_ip_target: 10"),
        ("ours", "warm_ip_target: 5, minimum_ip_target: 10"),
        ("demand", "warm_ip_target: 5, minimum_ip_target: 10"),
    ] {
        let text = format!(
            "subnets: [{{name: a, cidr: 10.0.0.0/16}}, {{name: b, cidr: 10.1.0.0/16}}]
config: {{{targets}, policy: {policy}}}
duration: {hours}h
seed: 42
node_groups:
  - {{instance_type: m5.large, count: 500, subnet: a, spread: 0.3, pods: {{daily: {{min: 4, max: 20, peak: 14h}}}}}}
  - {{instance_type: m5.2xlarge, count: 500, subnet: b, spread: 0.3, pods: {{daily: {{min: 10, max: 40, peak: 15h}}}}}}
"
        );
        let input = TimelineInput::parse(&text).expect("timeline parses");
        let sim_runs = if quick { 1 } else { 5 };
        measure(
            &format!("simulate 1000 nodes {hours}h, {policy}, {targets}"),
            sim_runs,
            || {
                let t = Timeline::new(input.clone(), Catalog::embedded()).expect("valid");
                let ticks = t.node_ticks();
                let r = t.run();
                std::hint::black_box(r.samples.len());
                ticks
            },
        );
    }
}
