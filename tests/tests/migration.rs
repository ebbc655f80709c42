//! Migration (issue "End to end", scenario 5): a node that ran the reference daemon starts our
//! `ipamd`. The node's EC2 state is what the reference leaves (secondary addresses on the
//! primary ENI, a warm secondary ENI with its description and tags), its pods are wired as the
//! reference plugin wires them (host veth `eni<sha1(namespace.name)[..11]>`, a /32 in the pod,
//! a `169.254.1.1` gateway with a permanent neighbour entry, a host route and the
//! to-container rule at priority 512), and its checkpoint is a `vpc-cni-ipam/1` file in the
//! reference's exact encoding (spec/ipamd.md 3.4), including an entry of a pod deleted while
//! the daemon was down and a legacy `_migrated-from-cri` entry.
//!
//! Our ipamd must keep every existing pod's address and connectivity, drop the stale entry,
//! never hand a kept address to a new pod, release the legacy pod on its DEL, and leak nothing
//! once every pod is gone.
//!
//! Root only; skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use vpc_cni_e2e::node::{
    ip_in, leaks, pod_reachable, unreachable_pods, wait_until, workspace_bin, Ipamd, Plugin,
    PodRef, SimNodeView,
};
use vpc_cni_e2e::process::output_in;
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;
use vpc_sim::api::{CreateEni, Reply, Request};
use vpc_sim::sim::SimConfig;

const PORT: u16 = 7400;
/// Pods the reference daemon left running (on the primary ENI).
const PODS: usize = 5;
const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// `allocationTimestamp` of the reference's entries: Unix nanoseconds.
const T0_NS: i64 = 1_700_000_000_123_456_789;

/// A pod the reference stack left behind.
struct OldPod {
    name: String,
    ns: TestNetns,
    ip: Ipv4Addr,
    /// `metadata` written for it, or none (legacy CRI-migrated entry).
    legacy: bool,
}

/// `ip -batch` in `ns`.
fn ip_batch(ns: &Netns, lines: &[String]) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    let out = output_in(ns, cmd, Some(script.as_bytes()))?;
    ensure!(
        out.status.success(),
        "ip -batch failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Wires a pod as the reference plugin does (routed veth, spec/cni.md): host side
/// `eni<hash>` in the node, `eth0` in the pod with `ip/32`, default route via `169.254.1.1`
/// whose neighbour entry is the host veth's MAC, host route `ip dev eni<hash>` and rule
/// `to ip lookup main` at priority 512.
fn reference_wire(
    node_ns: &Netns,
    pod: &TestNetns,
    name: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let host = host_veth_name("eni", "default", name, 0);
    ip_batch(
        node_ns,
        &[
            format!(
                "link add {host} mtu 9001 type veth peer name eth0 mtu 9001 netns {}",
                pod.name()
            ),
            format!("link set {host} up"),
            format!("route add {ip}/32 dev {host} scope link"),
            format!("rule add to {ip}/32 lookup main priority 512"),
        ],
    )?;
    let link = ip_in(node_ns, &["-o", "link", "show", &host])?;
    let mac = link
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("MAC of {host}: {link}"))?
        .to_owned();
    ip_batch(
        pod,
        &[
            "link set lo up".into(),
            format!("addr add {ip}/32 dev eth0"),
            "link set eth0 up".into(),
            "route add 169.254.1.1/32 dev eth0 scope link".into(),
            "route add default via 169.254.1.1 dev eth0".into(),
            format!("neigh add 169.254.1.1 dev eth0 lladdr {mac} nud permanent"),
        ],
    )
}

/// One allocation in the reference's encoding (Go `encoding/json` of its struct: field order
/// networkName, containerID, ifName, ipv4, allocationTimestamp, metadata; empty fields
/// omitted).
fn reference_entry(pod: &OldPod, ts: i64) -> String {
    if pod.legacy {
        format!(
            r#"{{"networkName":"_migrated-from-cri","containerID":"c-{}","ifName":"unknown","ipv4":"{}","allocationTimestamp":{ts},"metadata":{{}}}}"#,
            pod.name, pod.ip
        )
    } else {
        format!(
            r#"{{"networkName":"aws-cni","containerID":"c-{}","ifName":"eth0","ipv4":"{}","allocationTimestamp":{ts},"metadata":{{"k8sPodNamespace":"default","k8sPodName":"{}","interfacesCount":1}}}}"#,
            pod.name, pod.ip, pod.name
        )
    }
}

#[test]
fn ipamd_takes_over_a_reference_node() -> anyhow::Result<()> {
    if skip_netns_test("migration from the reference daemon") {
        return Ok(());
    }
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;
    let tmp = tempfile::Builder::new().prefix("vcn-migrate-").tempdir()?;

    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.7.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.7.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let other = c.run_instance(&s, "m5.large")?;
    let ns = node.netns()?;
    let other_ns = other.netns()?;

    // 1. EC2 as the reference left it: 9 secondary addresses on the primary ENI, a warm
    //    secondary ENI (its description and instance tag) with 9 more.
    let (primary_ips, _) = c.assign(&node.primary_eni, 9, 0)?;
    let r = c.call(Request::CreateNetworkInterface(CreateEni {
        subnet_id: s.clone(),
        description: format!("aws-K8S-{}", node.instance_id),
        secondary_count: Some(9),
        tags: BTreeMap::from([
            (
                "node.k8s.amazonaws.com/instance_id".to_owned(),
                node.instance_id.clone(),
            ),
            (
                "node.k8s.amazonaws.com/createdAt".to_owned(),
                "2023-11-14T22:13:20Z".to_owned(),
            ),
        ]),
        ..CreateEni::default()
    }))?;
    let Reply::NetworkInterface { eni, .. } = r else {
        bail!("CreateNetworkInterface: {r:?}");
    };
    c.call(Request::AttachNetworkInterface {
        eni_id: eni.id.clone(),
        instance_id: node.instance_id.clone(),
        device_index: 1,
        network_card_index: None,
    })?;

    // 2. Pods wired by the reference plugin: PODS with metadata, one legacy entry, and one
    //    pod deleted while the daemon was down (its entry stays in the checkpoint, its veth is
    //    gone).
    ensure!(primary_ips.len() == 9, "9 secondaries: {primary_ips:?}");
    let mut old: Vec<OldPod> = Vec::new();
    for (i, ip) in primary_ips.iter().take(PODS + 1).enumerate() {
        let legacy = i == PODS;
        let name = if legacy {
            "legacy-0".to_owned()
        } else {
            format!("web-{i}")
        };
        let pod_ns = TestNetns::new("pod")?;
        reference_wire(&ns, &pod_ns, &name, *ip)?;
        old.push(OldPod {
            name,
            ns: pod_ns,
            ip: *ip,
            legacy,
        });
    }
    let stale_ip = primary_ips[PODS + 1];
    let stale = OldPod {
        name: "gone-0".into(),
        ns: TestNetns::new("pod")?,
        ip: stale_ip,
        legacy: false,
    };

    // 3. The reference's checkpoint.
    let server = serve(&c.fabric, c.sim.clone())?;
    let mut ipamd = Ipamd::new(ipamd_bin, &ns, &server, &node.instance_id, tmp.path())?;
    let entries: Vec<String> = old
        .iter()
        .chain(std::iter::once(&stale))
        .enumerate()
        .map(|(i, p)| reference_entry(p, T0_NS + i as i64 * 1_000_000_007))
        .collect();
    let file = format!(
        r#"{{"version":"vpc-cni-ipam/1","allocations":[{}]}}"#,
        entries.join(",")
    ) + "\n";
    std::fs::write(ipamd.checkpoint_path(), &file)?;
    drop(stale);

    // 4. Our ipamd starts on it.
    ipamd.start()?;
    let plugin = Plugin::new(cni_bin, &ns, ipamd.socket())?;

    let view = ipamd.view()?;
    let held: BTreeMap<Ipv4Addr, String> = view
        .assignments()
        .into_iter()
        .map(|(ip, (_, name))| (ip, name))
        .collect();
    let want: BTreeMap<Ipv4Addr, String> = old
        .iter()
        .map(|p| {
            (
                p.ip,
                if p.legacy {
                    String::new()
                } else {
                    p.name.clone()
                },
            )
        })
        .collect();
    ensure!(
        held == want && view.assigned_count == old.len() as i64,
        "ipamd did not keep the reference's assignments\n  ipamd: {held:?} (count {})\n  \
         reference: {want:?}\n--- ipamd log (tail) ---\n{}",
        view.assigned_count,
        ipamd.log_tail(60)
    );
    // The checkpoint is written back normalised: same keys, addresses and timestamps, the
    // stale entry gone.
    let text = std::fs::read_to_string(ipamd.checkpoint_path())?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(v["version"] == "vpc-cni-ipam/1", "checkpoint: {text}");
    let got: BTreeSet<(String, String, String, String, i64)> = v["allocations"]
        .as_array()
        .context("allocations")?
        .iter()
        .map(|a| {
            (
                a["networkName"].as_str().unwrap_or("").to_owned(),
                a["containerID"].as_str().unwrap_or("").to_owned(),
                a["ifName"].as_str().unwrap_or("").to_owned(),
                a["ipv4"].as_str().unwrap_or("").to_owned(),
                a["allocationTimestamp"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String, String, String, i64)> = old
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (net, ifname) = if p.legacy {
                ("_migrated-from-cri", "unknown")
            } else {
                ("aws-cni", "eth0")
            };
            (
                net.to_owned(),
                format!("c-{}", p.name),
                ifname.to_owned(),
                p.ip.to_string(),
                T0_NS + i as i64 * 1_000_000_007,
            )
        })
        .collect();
    ensure!(
        got == expected,
        "checkpoint after start-up\n  got:      {got:?}\n  expected: {expected:?}\n  file: {text}"
    );

    // 5. Every old pod keeps its connectivity: from its node and from another node.
    let refs: Vec<PodRef<'_>> = old
        .iter()
        .map(|p| PodRef {
            name: &p.name,
            ns: &p.ns,
            ip: p.ip,
        })
        .collect();
    let unreachable = unreachable_pods(
        &c.fabric,
        &refs,
        PORT,
        &ns,
        Some((&other_ns, other.primary_ip)),
    );
    ensure!(
        unreachable.is_empty(),
        "reference pods lost connectivity under our ipamd: {unreachable:#?}\n--- ipamd log \
         (tail) ---\n{}",
        ipamd.log_tail(60)
    );
    drop(refs);

    // 6. New pods never get a kept address; the stale one is free again.
    let kept: BTreeSet<Ipv4Addr> = old.iter().map(|p| p.ip).collect();
    let mut new = Vec::new();
    for i in 0..12 {
        let name = format!("new-{i}");
        let pod_ns = TestNetns::new("pod")?;
        let added = plugin
            .add(&name, pod_ns.path())
            .with_context(|| format!("--- ipamd log (tail) ---\n{}", ipamd.log_tail(60)))?;
        ensure!(
            !kept.contains(&added.ip),
            "{name} got {} which the reference gave to an existing pod",
            added.ip
        );
        new.push((name, pod_ns, added));
    }
    let new_ips: BTreeSet<Ipv4Addr> = new.iter().map(|n| n.2.ip).collect();
    ensure!(
        new_ips.len() == new.len(),
        "new pods share addresses: {new_ips:?}"
    );
    let (name, pod_ns, added) = &new[0];
    pod_reachable(
        &format!("node → {name} ({})", added.ip),
        pod_ns,
        added.ip,
        PORT,
        &ns,
        None,
    )?;

    // 7. DEL of everything (the legacy pod by its container id); nothing left or leaked.
    for p in &old {
        plugin
            .del(&p.name, p.ns.path(), None)
            .with_context(|| format!("DEL of reference pod {}", p.name))?;
    }
    for (name, pod_ns, added) in &new {
        plugin.del(name, pod_ns.path(), Some(&added.result))?;
    }
    let mut last = Vec::new();
    let settled = wait_until(
        "EC2 and ipamd to agree with no pod left",
        SETTLE_WAIT,
        || {
            let view = ipamd.view()?;
            last = leaks(&SimNodeView::of(&c.sim, &node.instance_id), &view);
            if view.assigned_count != 0 {
                last.push(format!("ipamd still assigns {:?}", view.assignments()));
            }
            let cp = ipamd.checkpoint()?;
            if !cp.allocations.is_empty() {
                last.push(format!("checkpoint holds {:?}", cp.allocations));
            }
            Ok(last.is_empty())
        },
    );
    if let Err(e) = settled {
        bail!(
            "{e}: {last:#?}\n--- ipamd log (tail) ---\n{}",
            ipamd.log_tail(80)
        );
    }
    let routes = ip_in(&ns, &["-4", "route", "show", "table", "all"])?;
    let rules = ip_in(&ns, &["-4", "rule", "show"])?;
    for ip in &kept {
        ensure!(
            !routes.contains(&format!("{ip} ")),
            "host route for {ip} left after DEL:\n{routes}"
        );
        ensure!(
            !rules.contains(&format!(" {ip} ")),
            "rule for {ip} left after DEL:\n{rules}"
        );
    }
    c.check_hooks()?;
    ipamd.kill()?;
    drop(server);
    Ok(())
}
