//! Crash safety (issue "End to end", scenario 2): 500 pod ADDs and their DELs through the real
//! `aws-cni` binary while the real `ipamd` is killed with SIGKILL at random points (at least
//! 10 times) and restarted. Afterwards no address is held by two pods, every live pod kept its
//! address and its connectivity, and once every pod is gone nothing is leaked between the
//! simulator's EC2 state and ipamd's datastore and checkpoint.
//!
//! Random choices come from a seeded generator; the seed is printed at the start and in every
//! failure (`E2E_SEED=<n>` replays the same schedule of operations and kill delays; the
//! interleaving with ipamd's own threads is up to the machine).
//!
//! A second scenario arms ipamd's failpoints (`VPC_CNI_FAILPOINTS`) so that it kills itself
//! inside pool growth at start (addresses assigned in EC2 but not yet in the datastore; an ENI
//! created but not attached) and inside group-commit checkpoint writes (before the write, before
//! the rename, before the directory sync), each followed by a restart and the runtime's DEL
//! retry: every acknowledged assignment kept, none held twice, nothing leaked in EC2, no
//! temporary checkpoint file left. A failing run keeps ipamd's log and checkpoint under
//! `target/tmp/`.
//!
//! Root only; skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vpc_cni_e2e::node::{
    ip_in, leaks, unreachable_pods, wait_until, workspace_bin, Added, Ipamd, Plugin, PodRef,
    SimNodeView,
};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_sim::rng::SimRng;
use vpc_sim::sim::SimConfig;

/// Pod ADDs in all.
const ADDS: usize = 500;
/// SIGKILLs of ipamd (spread over the first 900 operations; there are at least
/// `2 * ADDS - MAX_LIVE` operations).
const KILLS: usize = 12;
/// Most pods alive at once (an m5.large holds 27).
const MAX_LIVE: usize = 14;
/// Kill delay after an operation starts, drawn below this many milliseconds: from before the
/// plugin connects to after it is done.
const KILL_WINDOW_MS: u64 = 30;
const PORT: u16 = 7200;
/// How long the leak check may wait for ipamd's loops to catch up with EC2.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

struct Pod {
    name: String,
    ns: TestNetns,
    added: Added,
}

#[test]
fn ipamd_survives_sigkill_during_pod_churn() -> anyhow::Result<()> {
    if skip_netns_test("crash safety (ipamd SIGKILL during pod churn)") {
        return Ok(());
    }
    let seed = vpc_cni_e2e::node::e2e_seed();
    eprintln!("crash_safety: seed {seed} (replay with E2E_SEED={seed})");
    let tmp = tempfile::Builder::new().prefix("vcn-crash-").tempdir()?;
    let r = run(seed, tmp.path());
    if r.is_err() {
        keep_evidence(tmp.path(), &format!("crash_safety-{seed}"));
    }
    r.with_context(|| format!("crash_safety seed {seed} (replay with E2E_SEED={seed})"))
}

fn keep_evidence(dir: &std::path::Path, name: &str) {
    vpc_cni_e2e::node::keep_evidence(
        dir,
        &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name),
    );
}

fn run(seed: u64, tmp: &std::path::Path) -> anyhow::Result<()> {
    let mut rng = SimRng::new(seed);
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;

    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.4.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.4.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let other = c.run_instance(&s, "m5.large")?;
    let ns = node.netns()?;
    let other_ns = other.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;

    let mut ipamd = Ipamd::new(ipamd_bin, &ns, &server, &node.instance_id, tmp)?;
    ipamd.env("VPC_CNI_RECONCILE_INTERVAL", "2s");
    ipamd.start()?;
    // An ADD that finds ipamd dead gives up after 5 s (the runtime retries the pod later);
    // ipamd is restarted once the operation is over.
    let plugin = Plugin::new(cni_bin, &ns, ipamd.socket())?.with_pool_wait(5.0);

    // The kill schedule: KILLS distinct operation indices.
    let mut kill_at = BTreeSet::new();
    while kill_at.len() < KILLS {
        kill_at.insert(5 + rng.below(900) as usize);
    }
    eprintln!("crash_safety: kills before operations {kill_at:?}");

    let started = Instant::now();
    let mut live: Vec<Pod> = Vec::new();
    let (mut adds, mut dels, mut op, mut kills) = (0usize, 0usize, 0usize, 0usize);
    let (mut failed_adds, mut retried_dels) = (0usize, 0usize);
    let mut next_pod = 0usize;
    while adds < ADDS {
        let add = live.is_empty() || (live.len() < MAX_LIVE && (live.len() < 4 || rng.chance(0.5)));
        // A killer armed for this operation: SIGKILL after a random delay, from another thread,
        // while the plugin runs (or just before, or just after).
        let killer = if kill_at.contains(&op) {
            let pid = ipamd.pid().context("ipamd not running at a kill point")?;
            let delay = Duration::from_millis(rng.below(KILL_WINDOW_MS));
            Some(std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                delay
            }))
        } else {
            None
        };
        let what;
        let outcome: Result<(), (anyhow::Error, PendingDel)> = if add {
            adds += 1;
            let name = format!("p{next_pod}");
            next_pod += 1;
            let pod_ns = TestNetns::new("pod")?;
            what = format!("ADD {name}");
            match plugin.add(&name, pod_ns.path()) {
                Ok(added) => {
                    live.push(Pod {
                        name,
                        ns: pod_ns,
                        added,
                    });
                    Ok(())
                }
                Err(e) => {
                    // The runtime calls DEL after a failed ADD; done once ipamd is back.
                    failed_adds += 1;
                    Err((
                        e,
                        PendingDel {
                            name,
                            ns: pod_ns,
                            prev: None,
                        },
                    ))
                }
            }
        } else {
            dels += 1;
            let i = rng.below(live.len() as u64) as usize;
            let pod = live.swap_remove(i);
            what = format!("DEL {}", pod.name);
            match plugin.del(&pod.name, pod.ns.path(), Some(&pod.added.result)) {
                Ok(()) => Ok(()),
                Err(e) => Err((
                    e,
                    PendingDel {
                        name: pod.name,
                        ns: pod.ns,
                        prev: Some(pod.added.result),
                    },
                )),
            }
        };
        op += 1;
        let killed = match killer {
            Some(k) => {
                let delay = k
                    .join()
                    .map_err(|_| anyhow::anyhow!("killer thread panicked"))?;
                kills += 1;
                ipamd.kill()?;
                eprintln!(
                    "crash_safety: op {op} ({what}) SIGKILL after {delay:?}: {}",
                    if outcome.is_ok() {
                        "op succeeded"
                    } else {
                        "op failed"
                    }
                );
                true
            }
            None => false,
        };
        if killed {
            ipamd
                .start()
                .with_context(|| format!("restart {} after kill", kills))?;
        }
        if let Err((e, pending)) = outcome {
            if !killed {
                bail!(
                    "{what} failed with no crash around it: {e:#}\n--- ipamd log (tail) ---\n{}",
                    ipamd.log_tail(60)
                );
            }
            retried_dels += 1;
            let PendingDel {
                name,
                ns: pod_ns,
                prev,
            } = pending;
            plugin
                .del(&name, pod_ns.path(), prev.as_ref())
                .with_context(|| {
                    format!(
                        "DEL {name} after the crash (runtime retry)\n--- ipamd log (tail) ---\n{}",
                        ipamd.log_tail(60)
                    )
                })?;
            drop(pod_ns);
        }
    }
    ensure!(
        kills >= 10,
        "only {kills} kills happened (schedule {kill_at:?})"
    );
    eprintln!(
        "crash_safety: {adds} ADDs ({failed_adds} failed at a crash), {dels} DELs, \
         {retried_dels} DELs retried after a crash, {kills} SIGKILLs, {} live pods, churn took \
         {:?}",
        live.len(),
        started.elapsed()
    );

    // 1. No address is held by two pods, every live pod kept its address (ipamd and the
    //    checkpoint agree with what ADD returned), and EC2 has each on the node.
    check_kept(&ipamd, &c.sim, &node.instance_id, &live)?;

    // 2. Connectivity of every live pod: from its node, and from another node with the
    //    source preserved. Failures are reported after the leak check, with it.
    let refs: Vec<PodRef<'_>> = live
        .iter()
        .map(|p| PodRef {
            name: &p.name,
            ns: &p.ns,
            ip: p.added.ip,
        })
        .collect();
    let unreachable = unreachable_pods(
        &c.fabric,
        &refs,
        PORT,
        &ns,
        Some((&other_ns, other.primary_ip)),
    );
    drop(refs);
    let node_at_probe = if unreachable.is_empty() {
        String::new()
    } else {
        format!(
            "--- node links when probed ---\n{}--- node rules when probed ---\n{}",
            ip_in(&ns, &["-br", "link"]).unwrap_or_else(|e| format!("{e:#}\n")),
            ip_in(&ns, &["rule"]).unwrap_or_else(|e| format!("{e:#}\n"))
        )
    };

    // 3. Every pod goes; then nothing is leaked.
    let settled = drain_and_settle(&ipamd, &plugin, &c.sim, &node.instance_id, &mut live);
    let mut failures = Vec::new();
    if !unreachable.is_empty() {
        failures.push(format!(
            "live pods lost connectivity after the crashes: {unreachable:#?}\n{node_at_probe}"
        ));
    }
    if let Err(e) = settled {
        failures.push(format!("{e:#}"));
    }
    if !failures.is_empty() {
        bail!(
            "{}\n--- ipamd log (tail) ---\n{}",
            failures.join("\n"),
            ipamd.log_tail(80)
        );
    }
    c.check_hooks()?;
    ipamd.kill()?;
    drop(server);
    Ok(())
}

/// No address is held by two pods; ipamd's assignments and its checkpoint are exactly the
/// live pods with the addresses their ADD returned; EC2 has each on one of the node's ENIs.
fn check_kept(
    ipamd: &Ipamd,
    sim: &vpc_sim::server::Shared,
    instance_id: &str,
    live: &[Pod],
) -> anyhow::Result<()> {
    let mut by_ip: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for p in live {
        if let Some(other) = by_ip.insert(p.added.ip, &p.name) {
            bail!("{} and {} both hold {}", other, p.name, p.added.ip);
        }
    }
    let view = ipamd.view()?;
    let mut held: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for (ip, (_, pod)) in view.assignments() {
        held.entry(ip).or_default().push(pod);
    }
    let twice: Vec<_> = held.iter().filter(|(_, p)| p.len() > 1).collect();
    ensure!(
        twice.is_empty(),
        "ipamd holds addresses for two pods: {twice:?}"
    );
    let expected: BTreeMap<Ipv4Addr, Vec<String>> = live
        .iter()
        .map(|p| (p.added.ip, vec![p.name.clone()]))
        .collect();
    ensure!(
        held == expected,
        "ipamd's assignments differ from the live pods\n  ipamd: {held:?}\n  pods:  \
         {expected:?}\n--- ipamd log (tail) ---\n{}",
        ipamd.log_tail(80)
    );
    let cp = ipamd.checkpoint()?;
    let cp_set: BTreeSet<(String, Ipv4Addr)> = cp
        .allocations
        .iter()
        .map(|a| (a.container_id.clone(), a.ipv4))
        .collect();
    let live_set: BTreeSet<(String, Ipv4Addr)> = live
        .iter()
        .map(|p| (format!("c-{}", p.name), p.added.ip))
        .collect();
    ensure!(
        cp.allocations.len() == cp_set.len() && cp_set == live_set,
        "checkpoint differs from the live pods\n  checkpoint: {cp_set:?}\n  pods: {live_set:?}"
    );
    let sim = SimNodeView::of(sim, instance_id);
    for p in live {
        ensure!(
            sim.attached.values().any(|ips| ips.contains(&p.added.ip)),
            "{} ({}) is not assigned to any of the node's ENIs in EC2: {sim:?}",
            p.name,
            p.added.ip
        );
    }
    Ok(())
}

/// DELs every live pod, then waits until nothing is leaked: EC2's ENIs and addresses of the
/// node are exactly ipamd's pool (no ENI of the node left unattached), nothing is assigned,
/// the checkpoint is empty.
fn drain_and_settle(
    ipamd: &Ipamd,
    plugin: &Plugin,
    sim: &vpc_sim::server::Shared,
    instance_id: &str,
    live: &mut Vec<Pod>,
) -> anyhow::Result<()> {
    for p in live.drain(..) {
        plugin.del(&p.name, p.ns.path(), Some(&p.added.result))?;
    }
    let mut last = Vec::new();
    let settled = wait_until(
        "EC2 and ipamd to agree with no pod left",
        SETTLE_WAIT,
        || {
            let view = ipamd.view()?;
            last = leaks(&SimNodeView::of(sim, instance_id), &view);
            if view.assigned_count != 0 {
                last.push(format!("ipamd counts {} assigned", view.assigned_count));
            }
            let cp = ipamd.checkpoint()?;
            if !cp.allocations.is_empty() {
                last.push(format!("checkpoint holds {:?}", cp.allocations));
            }
            Ok(last.is_empty())
        },
    );
    settled.map_err(|e| anyhow::anyhow!("{e}: {last:#?}"))
}

/// A DEL the runtime still owes after an operation failed at a crash.
struct PendingDel {
    name: String,
    ns: TestNetns,
    prev: Option<serde_json::Value>,
}

/// Where the second scenario has ipamd kill itself (`VPC_CNI_FAILPOINTS`), in order, and
/// whether the point is reached at start-up (pool growth) or during pod operations (a
/// checkpoint write).
const KILL_POINTS: &[(&str, bool)] = &[
    // Pool growth at start: the primary ENI's addresses assigned in EC2, not yet in the
    // datastore; then a second ENI created, not yet attached.
    ("addresses-assigned=1", true),
    ("eni-created=1", true),
    // Group commit: a batch in the datastore, its write not begun; the temporary file written
    // and synced, not renamed; renamed, the directory not synced. Write 1 is the one at start.
    ("checkpoint-before-write=3", false),
    ("checkpoint-before-rename=4", false),
    ("checkpoint-before-dir-sync=3", false),
    ("checkpoint-before-rename=2", false),
    ("checkpoint-before-write=6", false),
    ("checkpoint-before-dir-sync=5", false),
];

#[test]
fn ipamd_killed_inside_a_checkpoint_write_or_pool_growth_loses_and_leaks_nothing(
) -> anyhow::Result<()> {
    if skip_netns_test("crash safety (ipamd killed at failpoints)") {
        return Ok(());
    }
    let seed = vpc_cni_e2e::node::e2e_seed();
    eprintln!("crash_safety failpoints: seed {seed} (replay with E2E_SEED={seed})");
    let tmp = tempfile::Builder::new().prefix("vcn-crashfp-").tempdir()?;
    let r = run_failpoints(seed, tmp.path());
    if r.is_err() {
        keep_evidence(tmp.path(), &format!("crash_safety_failpoints-{seed}"));
    }
    r.with_context(|| format!("crash_safety failpoints seed {seed} (replay with E2E_SEED={seed})"))
}

/// Waits for ipamd to kill itself at the armed failpoint; fails unless it died by SIGKILL
/// with the failpoint's line in its log.
fn died_at(ipamd: &mut Ipamd, point: &str) -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let status = ipamd
        .wait_exit(Duration::from_secs(60))
        .with_context(|| format!("ipamd did not stop at {point}\n{}", ipamd.log_tail(40)))?;
    let name = point.split('=').next().unwrap_or(point);
    ensure!(
        status.signal() == Some(Signal::SIGKILL as i32),
        "ipamd armed with {point} exited with {status}\n{}",
        ipamd.log_tail(40)
    );
    ensure!(
        ipamd.log().contains(&format!("failpoint {name} reached")),
        "ipamd was killed, but not by {point}\n{}",
        ipamd.log_tail(40)
    );
    Ok(())
}

fn run_failpoints(seed: u64, tmp: &std::path::Path) -> anyhow::Result<()> {
    let mut rng = SimRng::new(seed);
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;

    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.5.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.5.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let ns = node.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;

    let mut ipamd = Ipamd::new(ipamd_bin, &ns, &server, &node.instance_id, tmp)?;
    // More free addresses than the primary ENI holds: growth at start creates a second ENI.
    ipamd.env("WARM_IP_TARGET", "12");
    ipamd.env("VPC_CNI_RECONCILE_INTERVAL", "2s");
    let plugin = Plugin::new(cni_bin, &ns, ipamd.socket())?.with_pool_wait(5.0);

    let mut live: Vec<Pod> = Vec::new();
    let mut next_pod = 0usize;
    let (mut acked_adds, mut acked_dels, mut failed_ops) = (0usize, 0usize, 0usize);
    for (point, at_start) in KILL_POINTS {
        ipamd.env("VPC_CNI_FAILPOINTS", *point);
        if *at_start {
            ipamd.spawn()?;
            died_at(&mut ipamd, point)?;
            eprintln!("crash_safety failpoints: killed at start by {point}");
            continue;
        }
        ipamd.start()?;
        // Pod operations until one fails: the write it waited for was killed.
        let mut failed = None;
        for _ in 0..12 {
            let add = live.len() < 3 || (live.len() < 10 && rng.chance(0.6));
            if add {
                let name = format!("f{next_pod}");
                next_pod += 1;
                let pod_ns = TestNetns::new("pod")?;
                match plugin.add(&name, pod_ns.path()) {
                    Ok(added) => {
                        acked_adds += 1;
                        live.push(Pod {
                            name,
                            ns: pod_ns,
                            added,
                        });
                    }
                    Err(e) => {
                        failed = Some((
                            format!("ADD {name}"),
                            e,
                            PendingDel {
                                name,
                                ns: pod_ns,
                                prev: None,
                            },
                        ));
                        break;
                    }
                }
            } else {
                let pod = live.swap_remove(rng.below(live.len() as u64) as usize);
                match plugin.del(&pod.name, pod.ns.path(), Some(&pod.added.result)) {
                    Ok(()) => acked_dels += 1,
                    Err(e) => {
                        failed = Some((
                            format!("DEL {}", pod.name),
                            e,
                            PendingDel {
                                name: pod.name,
                                ns: pod.ns,
                                prev: Some(pod.added.result),
                            },
                        ));
                        break;
                    }
                }
            }
        }
        let (what, err, pending) = failed.with_context(|| {
            format!(
                "no pod operation failed with {point} armed\n{}",
                ipamd.log_tail(40)
            )
        })?;
        died_at(&mut ipamd, point).with_context(|| format!("{what} failed: {err:#}"))?;
        failed_ops += 1;
        eprintln!("crash_safety failpoints: {what} failed, ipamd killed by {point}");
        // Restarted unarmed; the runtime retries the DEL it owes.
        ipamd.env("VPC_CNI_FAILPOINTS", "");
        ipamd.start()?;
        let stale: Vec<_> = std::fs::read_dir(tmp)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ipam.json.tmp"))
            .collect();
        ensure!(
            stale.is_empty(),
            "temporary checkpoint files left after the restart: {stale:?}"
        );
        plugin
            .del(&pending.name, pending.ns.path(), pending.prev.as_ref())
            .with_context(|| {
                format!(
                    "DEL {} after the crash (runtime retry)\n{}",
                    pending.name,
                    ipamd.log_tail(40)
                )
            })?;
        ipamd.kill()?;
    }
    ipamd.env("VPC_CNI_FAILPOINTS", "");
    ipamd.start()?;
    ensure!(
        ipamd
            .log()
            .contains("own ENI left unattached by an earlier run deleted"),
        "the ENI created before the kill at eni-created was not deleted at the next start\n{}",
        ipamd.log_tail(80)
    );
    eprintln!(
        "crash_safety failpoints: {} kills, {acked_adds} ADDs and {acked_dels} DELs \
         acknowledged, {failed_ops} operations failed at a kill, {} pods live",
        KILL_POINTS.len(),
        live.len()
    );

    // Every acknowledged ADD still holds its address, nobody else does, and EC2 agrees.
    check_kept(&ipamd, &c.sim, &node.instance_id, &live)?;
    // Every pod goes; then EC2 and ipamd agree, with no ENI left unattached.
    drain_and_settle(&ipamd, &plugin, &c.sim, &node.instance_id, &mut live)
        .with_context(|| format!("--- ipamd log (tail) ---\n{}", ipamd.log_tail(80)))?;
    c.check_hooks()?;
    ipamd.kill()?;
    drop(server);
    Ok(())
}
