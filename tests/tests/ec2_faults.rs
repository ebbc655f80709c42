//! EC2 faults (issue "End to end", scenario 3): a period of throttling (small token buckets in
//! the simulator) and 5xx errors (injected `InternalError` 500 and `Unavailable` 503) while
//! pods come and go through the real `aws-cni` binary. Pods keep starting from the warm pool,
//! the daemon's EC2 call rate stays within its `VPC_CNI_EC2_*` pacing (counted in the
//! simulator's call log), and once the faults stop nothing leaks: the simulator's ENIs and
//! addresses are ipamd's pool, and ipamd's assignments and checkpoint are the live pods.
//!
//! Random choices come from a seeded generator; the seed is printed at the start and in every
//! failure (`E2E_SEED=<n>` replays the operation schedule; the simulator's fault draws use the
//! same seed).
//!
//! Root only; skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use vpc_cni_e2e::node::{
    leaks, pod_reachable, wait_until, workspace_bin, Added, Ipamd, Plugin, SimNodeView, START_WAIT,
};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_sim::control::{BucketSpec, FaultSpec, ThrottleConfig};
use vpc_sim::rng::SimRng;
use vpc_sim::sim::{CallRecord, SimConfig};

/// ipamd's pacing under test (`VPC_CNI_EC2_*`).
/// Tight enough that retries under faults run into ipamd's own limiter.
const MUTATING_RATE: u32 = 2;
const MUTATING_BURST: u32 = 3;
const DESCRIBE_RATE: u32 = 4;
const DESCRIBE_BURST: u32 = 4;
/// Warm addresses ipamd keeps (`WARM_IP_TARGET`); pods alive at once stay well below it, so
/// every ADD is served from the warm pool even when EC2 answers nothing but errors.
const WARM_IPS: usize = 8;
const MAX_LIVE: usize = 4;
/// The fault period lasts at least this many pod operations, and until the simulator has
/// answered at least `MIN_THROTTLED` throttles and `MIN_5XX` server errors to ipamd.
const MIN_OPS: usize = 40;
const MIN_THROTTLED: usize = 3;
const MIN_5XX: usize = 5;
/// Bound on the fault period; reaching it fails the test with the counts seen.
const MAX_FAULT_PERIOD: Duration = Duration::from_secs(120);
/// Time skew allowed between ipamd's rate limiter admitting a call and the simulator logging
/// it (scheduling on a busy machine, loopback HTTP).
const SKEW_MS: u64 = 1000;
const PORT: u16 = 7300;
const SETTLE_WAIT: Duration = Duration::from_secs(90);

struct Pod {
    name: String,
    ns: TestNetns,
    added: Added,
}

#[test]
fn pods_keep_starting_through_throttling_and_5xx() -> anyhow::Result<()> {
    if skip_netns_test("EC2 faults (throttling and 5xx)") {
        return Ok(());
    }
    let seed = vpc_cni_e2e::node::e2e_seed();
    eprintln!("ec2_faults: seed {seed} (replay with E2E_SEED={seed})");
    run(seed).with_context(|| format!("ec2_faults seed {seed} (replay with E2E_SEED={seed})"))
}

/// Checks one call class against a token bucket of `rate` per second and `burst`: in every
/// window between two calls of the class, at most `burst + rate × (window + SKEW_MS)` calls.
fn within_pacing(class: &str, calls: &[&CallRecord], rate: u32, burst: u32) -> Result<(), String> {
    for i in 0..calls.len() {
        for j in i..calls.len() {
            let n = (j - i + 1) as f64;
            let window = calls[j].at_ms.saturating_sub(calls[i].at_ms);
            let allowed = f64::from(burst) + f64::from(rate) * (window + SKEW_MS) as f64 / 1000.0;
            if n > allowed {
                let listed: Vec<String> = calls[i..=j]
                    .iter()
                    .map(|c| format!("{}@{}ms:{}", c.action, c.at_ms, c.outcome))
                    .collect();
                return Err(format!(
                    "{class}: {n} calls in {window} ms, pacing allows {allowed:.1} \
                     ({rate}/s, burst {burst}, skew {SKEW_MS} ms): {listed:?}"
                ));
            }
        }
    }
    Ok(())
}

/// The most calls logged within any 1000 ms (for the report).
fn busiest_second(calls: &[&CallRecord]) -> usize {
    (0..calls.len())
        .map(|i| {
            calls[i..]
                .iter()
                .take_while(|c| c.at_ms < calls[i].at_ms + 1000)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn run(seed: u64) -> anyhow::Result<()> {
    let mut rng = SimRng::new(seed);
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;
    let tmp = tempfile::Builder::new().prefix("vcn-faults-").tempdir()?;

    let c = SimCluster::new(SimConfig {
        seed,
        ..SimConfig::default()
    })?;
    let vpc = c.create_vpc("10.6.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.6.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let ns = node.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;
    // Calls before this one are the test's own, in-process.
    let first_seq = c.sim.with(|s| s.calls().back().map_or(0, |c| c.seq)) + 1;

    let mut ipamd = Ipamd::new(ipamd_bin, &ns, &server, &node.instance_id, tmp.path())?;
    ipamd
        .env("WARM_ENI_TARGET", "0")
        .env("WARM_IP_TARGET", WARM_IPS.to_string())
        .env("VPC_CNI_DECREASE_INTERVAL", "1s")
        .env("VPC_CNI_RECONCILE_INTERVAL", "2s")
        .env("VPC_CNI_EC2_MUTATING_RATE", MUTATING_RATE.to_string())
        .env("VPC_CNI_EC2_MUTATING_BURST", MUTATING_BURST.to_string())
        .env("VPC_CNI_EC2_DESCRIBE_RATE", DESCRIBE_RATE.to_string())
        .env("VPC_CNI_EC2_DESCRIBE_BURST", DESCRIBE_BURST.to_string())
        .env("VPC_CNI_EC2_RETRY_BASE", "100ms");
    ipamd.start()?;
    let plugin = Plugin::new(cni_bin, &ns, ipamd.socket())?;
    wait_until("the warm pool to fill", START_WAIT, || {
        let v = ipamd.view()?;
        Ok(v.enis.values().map(|e| e.ips.len()).sum::<usize>() >= WARM_IPS)
    })
    .with_context(|| format!("--- ipamd log (tail) ---\n{}", ipamd.log_tail(60)))?;

    // The fault period: small buckets for everything ipamd calls, 5xx on half of the calls
    // that get through.
    let fault_seq = c.sim.with(|s| s.calls().back().map_or(0, |c| c.seq)) + 1;
    let small = |capacity, refill_per_sec| BucketSpec {
        capacity,
        refill_per_sec,
    };
    let mut buckets = BTreeMap::new();
    for a in [
        "AssignPrivateIpAddresses",
        "UnassignPrivateIpAddresses",
        "CreateNetworkInterface",
        "AttachNetworkInterface",
        "DetachNetworkInterface",
        "DeleteNetworkInterface",
        "CreateTags",
        "ModifyNetworkInterfaceAttribute",
    ] {
        buckets.insert(a.to_owned(), small(1.0, 0.25));
    }
    for a in [
        "DescribeNetworkInterfaces",
        "DescribeInstances",
        "DescribeSubnets",
        "DescribeInstanceTypes",
    ] {
        buckets.insert(a.to_owned(), small(2.0, 0.5));
    }
    let faults = BTreeMap::from([(
        "*".to_owned(),
        FaultSpec {
            error_rate: 0.3,
            unavailable_rate: 0.2,
            ..FaultSpec::default()
        },
    )]);
    c.sim.with(|s| {
        s.set_throttle(ThrottleConfig {
            enabled: true,
            buckets,
        });
        s.set_faults(faults);
    });

    let started = Instant::now();
    let mut live: Vec<Pod> = Vec::new();
    let (mut ops, mut adds, mut next_pod) = (0usize, 0usize, 0usize);
    let counts = |c: &SimCluster| {
        c.sim.with(|s| {
            let (mut throttled, mut server) = (0usize, 0usize);
            for r in s.calls().iter().filter(|r| r.seq >= fault_seq) {
                if r.outcome == "RequestLimitExceeded" {
                    throttled += 1;
                } else if r.http_status >= 500 {
                    server += 1;
                }
            }
            (throttled, server)
        })
    };
    loop {
        let (throttled, server_errors) = counts(&c);
        if ops >= MIN_OPS && throttled >= MIN_THROTTLED && server_errors >= MIN_5XX {
            eprintln!(
                "ec2_faults: fault period of {ops} pod operations ({adds} ADDs) took {:?}; \
                 the simulator answered {throttled} throttles and {server_errors} 5xx",
                started.elapsed()
            );
            break;
        }
        ensure!(
            started.elapsed() < MAX_FAULT_PERIOD,
            "after {ops} pod operations in {MAX_FAULT_PERIOD:?} the simulator had answered only {throttled} throttles \
             and {server_errors} 5xx to ipamd (want {MIN_THROTTLED} and {MIN_5XX}): ipamd \
             hardly calls EC2 while pods come and go"
        );
        ops += 1;
        let add = live.is_empty() || (live.len() < MAX_LIVE && rng.chance(0.5));
        if add {
            adds += 1;
            let name = format!("f{next_pod}");
            next_pod += 1;
            let pod_ns = TestNetns::new("pod")?;
            let added = plugin.add(&name, pod_ns.path()).with_context(|| {
                format!(
                    "ADD {name} during the fault period (warm pool should serve it)\n\
                     --- ipamd log (tail) ---\n{}",
                    ipamd.log_tail(60)
                )
            })?;
            live.push(Pod {
                name,
                ns: pod_ns,
                added,
            });
        } else {
            let i = rng.below(live.len() as u64) as usize;
            let pod = live.swap_remove(i);
            plugin
                .del(&pod.name, pod.ns.path(), Some(&pod.added.result))
                .with_context(|| format!("DEL {} during the fault period", pod.name))?;
        }
    }

    // Faults stop.
    c.sim.with(|s| {
        s.set_throttle(ThrottleConfig::default());
        s.set_faults(BTreeMap::new());
    });

    // Pacing: every call ipamd made, by class, within its token buckets.
    let calls: Vec<CallRecord> = c.sim.with(|s| {
        s.calls()
            .iter()
            .filter(|r| r.seq >= first_seq)
            .cloned()
            .collect()
    });
    let (describe, mutating): (Vec<&CallRecord>, Vec<&CallRecord>) =
        calls.iter().partition(|r| r.action.starts_with("Describe"));
    let mut by_action: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in &calls {
        let e = by_action.entry(r.action.as_str()).or_default();
        e.0 += 1;
        if r.outcome != "ok" {
            e.1 += 1;
        }
    }
    eprintln!(
        "ec2_faults: ipamd made {} EC2 calls ({} describe, {} mutating); per action (calls, \
         errors): {by_action:?}",
        calls.len(),
        describe.len(),
        mutating.len()
    );
    eprintln!(
        "ec2_faults: most calls in any 1 s window: {} describe (pacing {DESCRIBE_RATE}/s, burst \
         {DESCRIBE_BURST}), {} mutating (pacing {MUTATING_RATE}/s, burst {MUTATING_BURST})",
        busiest_second(&describe),
        busiest_second(&mutating)
    );
    within_pacing("describe calls", &describe, DESCRIBE_RATE, DESCRIBE_BURST)
        .map_err(anyhow::Error::msg)?;
    within_pacing("mutating calls", &mutating, MUTATING_RATE, MUTATING_BURST)
        .map_err(anyhow::Error::msg)?;

    // Nothing leaks once the faults stop: with the pods still alive, then with none.
    let mut last = Vec::new();
    let agree = |live: &[Pod], last: &mut Vec<String>| -> anyhow::Result<bool> {
        let view = ipamd.view()?;
        let sim = SimNodeView::of(&c.sim, &node.instance_id);
        *last = leaks(&sim, &view);
        let held: BTreeSet<(Ipv4Addr, String)> = view
            .assignments()
            .into_iter()
            .map(|(ip, (_, pod))| (ip, pod))
            .collect();
        let want: BTreeSet<(Ipv4Addr, String)> =
            live.iter().map(|p| (p.added.ip, p.name.clone())).collect();
        if held != want || view.assigned_count != live.len() as i64 {
            last.push(format!(
                "ipamd assigns {held:?} (count {}), pods hold {want:?}",
                view.assigned_count
            ));
        }
        let cp: BTreeSet<(Ipv4Addr, String)> = ipamd
            .checkpoint()?
            .allocations
            .into_iter()
            .map(|a| (a.ipv4, a.pod_name))
            .collect();
        if cp != want {
            last.push(format!("checkpoint holds {cp:?}, pods hold {want:?}"));
        }
        Ok(last.is_empty())
    };
    let settled = wait_until(
        "EC2 and ipamd to agree after the faults",
        SETTLE_WAIT,
        || agree(&live, &mut last),
    );
    if let Err(e) = settled {
        bail!(
            "{e}: {last:#?}\n--- ipamd log (tail) ---\n{}",
            ipamd.log_tail(80)
        );
    }
    for p in &live {
        pod_reachable(
            &format!("node → {} ({})", p.name, p.added.ip),
            &p.ns,
            p.added.ip,
            PORT,
            &ns,
            None,
        )?;
    }
    for p in live.drain(..) {
        plugin.del(&p.name, p.ns.path(), Some(&p.added.result))?;
    }
    let settled = wait_until(
        "EC2 and ipamd to agree with no pod left",
        SETTLE_WAIT,
        || agree(&[], &mut last),
    );
    if let Err(e) = settled {
        bail!(
            "{e}: {last:#?}\n--- ipamd log (tail) ---\n{}",
            ipamd.log_tail(80)
        );
    }
    c.check_hooks()?;
    ipamd.kill()?;
    drop(server);
    Ok(())
}
