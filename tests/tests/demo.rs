//! The quick-start demo binary (`vpc-cni-demo`), run as a user runs it: its exit status, its
//! human summary and the facts of its JSON summary, checked against each other and against
//! what the daemon and EC2 said during the run (the demo records ipamd's introspection view and
//! the simulator's addresses next to what the pods got). As root the namespace mode runs too.
//! Both families: the default IPv4 cluster and `--ipv6` (or `VPC_CNI_DEMO_IPV6=1`).
//!
//! Needs the workspace's `ipamd`, `aws-cni` and `egress-cni` binaries next to the demo binary
//! (`cargo build -p ipamd -p vpc-cni-plugin -p vpc-cni-egress --bins`, or a workspace test
//! run).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
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
    for name in ["ipamd", "aws-cni", "egress-cni"] {
        ensure!(
            dir.join(name).is_file(),
            "{} is missing: `cargo build -p ipamd -p vpc-cni-plugin -p vpc-cni-egress --bins` \
             first",
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
    run_demo_env(args, &[])
}

/// [`run_demo`] with extra environment variables.
fn run_demo_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Run> {
    bins_present()?;
    let out_dir = tempfile::tempdir()?;
    let stdout_path = out_dir.path().join("stdout");
    let stderr_path = out_dir.path().join("stderr");
    let mut child = Command::new(demo_bin())
        .args(args)
        .env_remove("VPC_CNI_DEMO_IPV6")
        .envs(env.iter().copied())
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
    ensure!(j["family"] == "ipv4", "the default is an IPv4 cluster: {j}");
    ensure!(
        !text.contains("IPv6"),
        "an IPv4 demo says nothing of IPv6:\n{text}"
    );

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

fn ip6(v: &serde_json::Value) -> anyhow::Result<Ipv6Addr> {
    v.as_str()
        .with_context(|| format!("an IPv6 address expected: {v}"))?
        .parse()
        .with_context(|| format!("an IPv6 address expected: {v}"))
}

/// `(network, length)` of an IPv6 CIDR string.
fn cidr6(v: &serde_json::Value) -> anyhow::Result<(Ipv6Addr, u32)> {
    let s = v
        .as_str()
        .with_context(|| format!("an IPv6 prefix expected: {v}"))?;
    let (base, len) = s.split_once('/').with_context(|| format!("prefix {s}"))?;
    Ok((base.parse()?, len.parse()?))
}

fn in_prefix((base, len): (Ipv6Addr, u32), ip: Ipv6Addr) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(ip) & mask == u128::from(base) & mask
}

/// Runs the IPv6 demo in `mode` (`--ipv6`, or `VPC_CNI_DEMO_IPV6=1` when `via_env`) and
/// checks its summary's facts; `plugins` is the reference plugins' directory it is given
/// (`None`: its default).
fn demo6_summary_holds(
    mode: &str,
    expect_mode: &str,
    via_env: bool,
    plugins: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let json_path = dir.path().join("summary.json");
    let pods = PODS.to_string();
    let json_arg = json_path.display().to_string();
    let plugins_arg = plugins.map(|p| p.display().to_string());
    let mut args = vec!["--mode", mode, "--pods", &pods, "--json", &json_arg];
    if let Some(p) = &plugins_arg {
        args.extend(["--cni-plugins-dir", p.as_str()]);
    }
    let env: &[(&str, &str)] = if via_env {
        &[("VPC_CNI_DEMO_IPV6", "1")]
    } else {
        args.push("--ipv6");
        &[]
    };
    let run = run_demo_env(&args, env)?;
    ensure!(
        run.success,
        "the demo failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    let text = &run.stdout;
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    ensure!(j["mode"] == expect_mode, "mode {} in {j}", j["mode"]);
    ensure!(j["family"] == "ipv6", "family {} in {j}", j["family"]);
    ensure!(
        text.lines()
            .next()
            .is_some_and(|l| l.contains("IPv6 cluster")),
        "the summary's first line names the family:\n{text}"
    );

    // One /80 on the primary ENI in EC2; ipamd holds that one and no other, inside the
    // subnet's /64.
    let ec2 = j["ec2_ipv6_prefixes"]
        .as_array()
        .context("ec2_ipv6_prefixes")?;
    ensure!(ec2.len() == 1, "one /80 in EC2 expected: {j}");
    let prefix = cidr6(&ec2[0])?;
    ensure!(prefix.1 == 80, "a /80 expected: {}", ec2[0]);
    let subnet6 = cidr6(&j["subnet_ipv6"])?;
    ensure!(
        subnet6.1 == 64 && in_prefix(subnet6, prefix.0),
        "the /80 {} is not in the subnet's /64 {}",
        ec2[0],
        j["subnet_ipv6"]
    );
    for pool in ["warm_pool", "pool_with_pods"] {
        ensure!(
            j[pool]["ipv6_prefixes"].as_array() == Some(ec2),
            "{pool}: ipamd's prefixes {} differ from EC2's {ec2:?}",
            j[pool]["ipv6_prefixes"]
        );
    }

    // The pods: distinct IPv6 addresses in the /80, not the node's; shown in the summary.
    let node_ipv6 = match &j["node_ipv6"] {
        serde_json::Value::Null => None,
        v => Some(ip6(v)?),
    };
    let pods = j["pods"].as_array().context("pods")?;
    ensure!(pods.len() == PODS, "{PODS} pods expected: {j}");
    let mut by_name = BTreeMap::new();
    for p in pods {
        let name = p["name"].as_str().context("pod name")?.to_owned();
        let addr = ip6(&p["ip"])?;
        ensure!(
            in_prefix(prefix, addr) && Some(addr) != node_ipv6,
            "{name}: {addr} is not a pod address of {}",
            ec2[0]
        );
        ensure!(
            text.lines()
                .any(|l| l.contains(&name) && l.contains(&addr.to_string())),
            "the summary does not show {name} at {addr}:\n{text}"
        );
        by_name.insert(name, addr);
    }
    let distinct: BTreeSet<Ipv6Addr> = by_name.values().copied().collect();
    ensure!(
        distinct.len() == PODS,
        "addresses are not distinct: {by_name:?}"
    );
    let daemon: BTreeMap<String, Ipv6Addr> = j["pool_with_pods"]["pods"]
        .as_object()
        .context("pool_with_pods.pods")?
        .iter()
        .map(|(k, v)| Ok((k.clone(), ip6(v)?)))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        daemon == by_name,
        "ipamd says {daemon:?}, the pods got {by_name:?}"
    );
    ensure!(j["pool_with_pods"]["assigned"] == PODS, "{j}");
    ensure!(j["warm_pool"]["assigned"] == 0, "{j}");
    ensure!(j["assigned_after_delete"] == 0, "{j}");
    ensure!(
        j["ec2_addresses"].as_array().is_some_and(Vec::is_empty),
        "no secondary IPv4 address in an IPv6 cluster: {j}"
    );

    // ipamd's EC2 calls: the one /80, and no IPv4 pool work.
    let calls = j["ec2_calls"].as_object().context("ec2_calls")?;
    ensure!(
        calls.get("AssignIpv6Addresses").and_then(|n| n.as_u64()) == Some(1),
        "one AssignIpv6Addresses expected: {calls:?}"
    );
    for v4 in [
        "AssignPrivateIpAddresses",
        "CreateNetworkInterface",
        "AttachNetworkInterface",
    ] {
        ensure!(!calls.contains_key(v4), "{v4} in IPv6 mode: {calls:?}");
    }
    let checks: Vec<&str> = j["checks"]
        .as_array()
        .context("checks")?
        .iter()
        .map(|c| c.as_str().context("check"))
        .collect::<anyhow::Result<_>>()?;
    for c in &checks {
        ensure!(text.contains(c), "check {c:?} not in the summary:\n{text}");
    }
    if expect_mode == "grpc" {
        ensure!(
            text.contains("namespaces SKIPPED"),
            "the gRPC-only summary must say namespaces were skipped:\n{text}"
        );
    } else {
        let node_ipv6 = node_ipv6.context("a node of the namespace demo has an IPv6 address")?;
        ensure!(
            checks
                .iter()
                .any(|c| c.starts_with("UDP over IPv6") && c.contains(&node_ipv6.to_string())),
            "no IPv6 connectivity check in {checks:?}"
        );
        ensure!(
            checks.iter().any(|c| c.contains("IPv6 outside host")),
            "no outside IPv6 check in {checks:?}"
        );
        let node_ip: Ipv4Addr = j["node_ip"].as_str().context("node_ip")?.parse()?;
        let egress = checks
            .iter()
            .any(|c| c.contains("through egress-cni") && c.contains(&node_ip.to_string()));
        let plugins = plugins.unwrap_or(std::path::Path::new("/usr/lib/cni"));
        let notes = j["notes"].as_array().context("notes")?;
        if plugins.join("host-local").is_file() {
            ensure!(egress, "no IPv4 egress check in {checks:?}");
            ensure!(notes.is_empty(), "{notes:?}");
            ensure!(j["egress_cni_add_ms"].is_u64(), "{j}");
        } else {
            ensure!(
                !egress,
                "an IPv4 egress check without host-local: {checks:?}"
            );
            ensure!(
                notes.len() == 1
                    && notes[0].as_str().is_some_and(|n| {
                        n.contains("host-local") && n.contains(&plugins.display().to_string())
                    }),
                "the summary's note names the missing host-local: {notes:?}"
            );
            ensure!(
                text.contains("IPv4 egress SKIPPED"),
                "without host-local the summary says egress was skipped:\n{text}"
            );
            ensure!(j["egress_cni_add_ms"].is_null(), "{j}");
        }
        ensure!(j["aws_cni_add_ms"].is_u64(), "{j}");
        ensure!(!text.contains("namespaces SKIPPED"), "{text}");
    }
    let left = namespaces_of(run.pid)?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn the_grpc_only_ipv6_demo_hands_out_addresses_of_the_one_80() -> anyhow::Result<()> {
    demo6_summary_holds("grpc", "grpc", false, None)
}

#[test]
fn the_ipv6_demo_is_also_turned_on_by_its_environment_variable() -> anyhow::Result<()> {
    let expect = if can_create_netns() { "netns" } else { "grpc" };
    demo6_summary_holds("auto", expect, true, None)
}

#[test]
fn the_ipv6_namespace_demo_checks_traffic_and_egress() -> anyhow::Result<()> {
    if vpc_cni_net::testing::skip_netns_test("ipv6 namespace demo") {
        return Ok(());
    }
    demo6_summary_holds("netns", "netns", false, None)
}

#[test]
fn without_host_local_the_ipv6_namespace_demo_skips_egress_and_says_so() -> anyhow::Result<()> {
    if vpc_cni_net::testing::skip_netns_test("ipv6 namespace demo without host-local") {
        return Ok(());
    }
    let empty = tempfile::tempdir()?;
    demo6_summary_holds("netns", "netns", false, Some(empty.path()))
}

#[test]
fn a_malformed_ipv6_variable_is_refused_by_name() -> anyhow::Result<()> {
    let run = run_demo_env(&["--mode", "grpc"], &[("VPC_CNI_DEMO_IPV6", "maybe")])?;
    ensure!(!run.success, "the demo must fail: {}", run.stdout);
    ensure!(run.stderr.contains("VPC_CNI_DEMO_IPV6"), "{}", run.stderr);
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
    interrupted_demo_cleans_up(&[])
}

#[test]
fn ctrl_c_in_the_middle_of_the_ipv6_namespace_demo_cleans_everything_up() -> anyhow::Result<()> {
    interrupted_demo_cleans_up(&["--ipv6"])
}

/// SIGINT to a namespace demo (with `extra` arguments) while it creates pods: it fails, says
/// it was interrupted, and leaves no namespace.
fn interrupted_demo_cleans_up(extra: &[&str]) -> anyhow::Result<()> {
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
        .args(extra)
        .env_remove("VPC_CNI_DEMO_IPV6")
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
