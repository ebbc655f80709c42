//! The quick-start demo binary (`vpc-cni-demo`), run as a user runs it: its exit status, its
//! human summary and the facts of its JSON summary, checked against each other and against
//! what the daemon and EC2 said during the run (the demo records ipamd's introspection view and
//! the simulator's addresses next to what the pods got). As root the namespace mode runs too.
//!
//! Needs the workspace's `ipamd` and `aws-cni` binaries next to the demo binary
//! (`cargo build -p ipamd -p vpc-cni-plugin --bins`, or a workspace test run).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use subnet_calc::subnet::Ipv4Cidr;
use vpc_cni_net::netns::list_named;
use vpc_cni_net::testing::can_create_netns;

const PODS: usize = 4;
/// Bound on one demo run (it takes seconds; the machine may be busy).
const RUN_WAIT: Duration = Duration::from_secs(120);

fn demo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vpc-cni-demo"))
}

fn bins_present() -> anyhow::Result<()> {
    let dir = demo_bin()
        .parent()
        .context("demo binary directory")?
        .to_path_buf();
    for name in ["ipamd", "aws-cni"] {
        ensure!(
            dir.join(name).is_file(),
            "{} is missing: `cargo build -p ipamd -p vpc-cni-plugin --bins` first",
            dir.join(name).display()
        );
    }
    Ok(())
}

/// Namespaces named by the process `pid` (TestNetns: `vcn-<tag>-<pid>-<n>`).
fn namespaces_of(pid: u32) -> anyhow::Result<Vec<String>> {
    let mark = format!("-{pid}-");
    Ok(list_named()?
        .into_iter()
        .filter(|n| n.starts_with("vcn-") && n.contains(&mark))
        .collect())
}

struct Run {
    pid: u32,
    stdout: String,
    stderr: String,
    success: bool,
}

/// Runs the demo with `args`, bounded by [`RUN_WAIT`].
fn run_demo(args: &[&str]) -> anyhow::Result<Run> {
    bins_present()?;
    let out_dir = tempfile::tempdir()?;
    let stdout_path = out_dir.path().join("stdout");
    let stderr_path = out_dir.path().join("stderr");
    let mut child = Command::new(demo_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let pid = child.id();
    let deadline = Instant::now() + RUN_WAIT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "the demo did not finish within {RUN_WAIT:?}: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Run {
        pid,
        stdout: std::fs::read_to_string(&stdout_path)?,
        stderr: std::fs::read_to_string(&stderr_path)?,
        success: status.success(),
    })
}

fn ip(v: &serde_json::Value) -> anyhow::Result<Ipv4Addr> {
    v.as_str()
        .with_context(|| format!("an address expected: {v}"))?
        .parse()
        .with_context(|| format!("an address expected: {v}"))
}

/// Runs the demo in `mode` and checks its summary's facts.
fn demo_summary_holds(mode: &str, expect_mode: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let json_path = dir.path().join("summary.json");
    let pods = PODS.to_string();
    let json_arg = json_path.display().to_string();
    let run = run_demo(&["--mode", mode, "--pods", &pods, "--json", &json_arg])?;
    ensure!(
        run.success,
        "the demo failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    let text = &run.stdout;
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    ensure!(j["mode"] == expect_mode, "mode {} in {j}", j["mode"]);

    // The pods: distinct addresses inside the subnet, not the node's.
    let subnet: Ipv4Cidr = j["subnet"]
        .as_str()
        .context("subnet")?
        .parse()
        .map_err(|e| anyhow::anyhow!("subnet: {e}"))?;
    let node_ip = ip(&j["node_ip"])?;
    let pods = j["pods"].as_array().context("pods")?;
    ensure!(pods.len() == PODS, "{PODS} pods expected: {j}");
    let mut by_name = BTreeMap::new();
    for p in pods {
        let name = p["name"].as_str().context("pod name")?.to_owned();
        let addr = ip(&p["ip"])?;
        ensure!(
            subnet.contains(u32::from(addr)) && addr != node_ip,
            "{name}: {addr} is not a pod address of {subnet}"
        );
        // The human summary names each pod with its address.
        ensure!(
            text.lines()
                .any(|l| l.contains(&name) && l.contains(&addr.to_string())),
            "the summary does not show {name} at {addr}:\n{text}"
        );
        by_name.insert(name, addr);
    }
    let distinct: BTreeSet<Ipv4Addr> = by_name.values().copied().collect();
    ensure!(
        distinct.len() == PODS,
        "addresses are not distinct: {by_name:?}"
    );

    // The daemon's view (introspection, recorded with the pods running) matches.
    let daemon: BTreeMap<String, Ipv4Addr> = j["pool_with_pods"]["pods"]
        .as_object()
        .context("pool_with_pods.pods")?
        .iter()
        .map(|(k, v)| Ok((k.clone(), ip(v)?)))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        daemon == by_name,
        "ipamd says {daemon:?}, the pods got {by_name:?}"
    );
    ensure!(j["pool_with_pods"]["assigned"] == PODS, "{j}");
    ensure!(j["warm_pool"]["assigned"] == 0, "{j}");
    ensure!(
        j["warm_pool"]["total"].as_i64().unwrap_or(0) > 0,
        "the warm pool was filled before any pod: {j}"
    );
    ensure!(j["assigned_after_delete"] == 0, "{j}");

    // EC2 holds every pod address on the node; the calls that put them there are counted.
    let ec2: BTreeSet<Ipv4Addr> = j["ec2_addresses"]
        .as_array()
        .context("ec2_addresses")?
        .iter()
        .map(ip)
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        distinct.is_subset(&ec2),
        "EC2 holds {ec2:?}, pods have {distinct:?}"
    );
    let calls = j["ec2_calls"].as_object().context("ec2_calls")?;
    let mutating: u64 = calls
        .iter()
        .filter(|(a, _)| !a.starts_with("Describe"))
        .map(|(_, n)| n.as_u64().unwrap_or(0))
        .sum();
    ensure!(
        j["ec2_mutating_calls"] == mutating && mutating > 0,
        "mutating calls {} vs {calls:?}",
        j["ec2_mutating_calls"]
    );
    ensure!(
        calls.contains_key("AssignPrivateIpAddresses")
            || calls.contains_key("CreateNetworkInterface"),
        "no call that adds addresses: {calls:?}"
    );
    ensure!(
        text.contains(&format!("{mutating} mutating")),
        "the summary does not count {mutating} mutating calls:\n{text}"
    );
    let checks = j["checks"].as_array().context("checks")?;
    for c in checks {
        let c = c.as_str().context("check")?;
        ensure!(text.contains(c), "check {c:?} not in the summary:\n{text}");
    }
    if expect_mode == "grpc" {
        ensure!(
            text.contains("namespaces SKIPPED"),
            "the gRPC-only summary must say namespaces were skipped:\n{text}"
        );
    } else {
        ensure!(
            checks
                .iter()
                .any(|c| c.as_str().is_some_and(|c| c.starts_with("UDP node"))),
            "no connectivity check in {checks:?}"
        );
        ensure!(!text.contains("SKIPPED"), "{text}");
    }
    let left = namespaces_of(run.pid)?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn the_grpc_only_demo_summary_matches_the_daemon() -> anyhow::Result<()> {
    let expect = "grpc";
    demo_summary_holds("grpc", expect)
}

#[test]
fn the_default_demo_runs_the_real_mode_as_root_and_grpc_only_otherwise() -> anyhow::Result<()> {
    let expect = if can_create_netns() { "netns" } else { "grpc" };
    demo_summary_holds("auto", expect)
}

#[test]
fn asking_for_namespaces_without_root_fails_clearly() -> anyhow::Result<()> {
    if can_create_netns() {
        eprintln!("skipping: running as root, namespaces are available");
        return Ok(());
    }
    let run = run_demo(&["--mode", "netns"])?;
    ensure!(!run.success, "the demo must fail: {}", run.stdout);
    ensure!(run.stderr.contains("need root"), "{}", run.stderr);
    Ok(())
}

#[test]
fn ctrl_c_in_the_middle_of_the_namespace_demo_cleans_everything_up() -> anyhow::Result<()> {
    if vpc_cni_net::testing::skip_netns_test("demo interrupted") {
        return Ok(());
    }
    bins_present()?;
    // Enough pods that the run is still creating them when the first pod namespace shows.
    let mut child = Command::new(demo_bin())
        .args([
            "--mode",
            "netns",
            "--instance-type",
            "m5.2xlarge",
            "--pods",
            "50",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let pod_ns = format!("vcn-pod-{pid}-");
    let deadline = Instant::now() + RUN_WAIT;
    loop {
        if list_named()?.iter().any(|n| n.starts_with(&pod_ns)) {
            break;
        }
        if let Some(s) = child.try_wait()? {
            anyhow::bail!("the demo ended ({s}) before creating a pod namespace");
        }
        ensure!(
            Instant::now() < deadline,
            "no pod namespace within {RUN_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let deadline = Instant::now() + RUN_WAIT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            anyhow::bail!("the demo did not stop within {RUN_WAIT:?} of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    ensure!(!status.success(), "an interrupted demo fails: {stderr}");
    ensure!(stderr.contains("interrupted"), "{stderr}");
    let left = namespaces_of(pid)?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}
