//! The network model (issue "End to end", scenario 1), in secondary-IP mode and in prefix
//! mode: three nodes of different instance types, each running the real `ipamd` and wiring
//! pods with the real `aws-cni`, at least 60 pods spread over primary and secondary ENIs.
//!
//! For every pod:
//! - its own view of its address (`eth0` in its namespace) is the address ADD returned;
//! - a pod on the same node reaches it and is seen with its own address;
//! - a pod on another node reaches it and is seen with its own address (sources preserved
//!   across the VPC: no SNAT between VPC addresses);
//! - its node reaches it, and the pod sees the node's primary address;
//! - it reaches the outside namespace (beyond the internet gateway) and is seen there as its
//!   node's primary address (SNAT on the node), except on the node whose ipamd runs with
//!   `AWS_VPC_K8S_CNI_EXTERNALSNAT=true`, where the outside sees the pod's own address (the
//!   VPC router routes the reply back to the ENI that holds it).
//!
//! In both modes the instance types and pod counts are chosen so that every node fills its
//! primary ENI and places pods on secondary ENIs; the test checks that it did.
//!
//! Everything lives in namespaces the test creates (deleted on drop, also on failure); ipamd
//! processes are killed on drop. Root only; skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context};
use vpc_cni_e2e::fabric::OUTSIDE_ADDR;
use vpc_cni_e2e::node::{ip_in, workspace_bin, Ipamd, Plugin, WAIT};
use vpc_cni_e2e::probe::{udp_probe, ProbeOutcome, UdpListener};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::{EniPort, Node, SimCluster};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;
use vpc_sim::sim::SimConfig;

/// Pods listen here.
const PORT: u16 = 7500;
/// The outside listener's port.
const OUTSIDE_PORT: u16 = 7501;

/// One node of a scenario: instance type, pods to start, external SNAT or not.
struct NodePlan {
    instance_type: &'static str,
    pods: usize,
    external_snat: bool,
}

/// A wired pod.
struct Pod {
    name: String,
    node: usize,
    ns: TestNetns,
    ip: Ipv4Addr,
}

/// A node under test: its fabric node, its daemon (killed on drop) and its plugin.
struct TestNode {
    node: Node,
    ns: Netns,
    ipamd: Ipamd,
    plugin: Plugin,
    external_snat: bool,
}

/// The ENI of `enis` that holds `ip` (as a secondary address or inside a prefix).
fn eni_of(enis: &[EniPort], ip: Ipv4Addr) -> Option<&EniPort> {
    enis.iter()
        .find(|e| e.ipv4.contains(&ip) || e.prefixes.iter().any(|p| p.contains(u32::from(ip))))
}

/// The pod's IPv4 addresses on `eth0`, as the pod sees them.
fn own_addresses(ns: &Netns) -> anyhow::Result<Vec<Ipv4Addr>> {
    let out = ip_in(ns, &["-4", "-o", "addr", "show", "dev", "eth0"])?;
    out.lines()
        .filter_map(|l| l.split(" inet ").nth(1))
        .filter_map(|r| r.split('/').next())
        .map(|a| a.parse().with_context(|| format!("address in {out}")))
        .collect()
}

/// UDP from `from` to `dst`; the source address the listener saw, or why not.
fn seen(from: &Netns, dst: SocketAddrV4, what: &str) -> Result<Ipv4Addr, String> {
    match udp_probe(from, None, dst, WAIT) {
        Ok(ProbeOutcome::Echoed { seen_as }) => match seen_as.ip() {
            IpAddr::V4(a) => Ok(a),
            IpAddr::V6(a) => Err(format!("{what}: seen as IPv6 {a}")),
        },
        Ok(ProbeOutcome::TimedOut) => Err(format!("{what}: no echo within {WAIT:?}")),
        Ok(ProbeOutcome::Unreachable(e)) => Err(format!("{what}: unreachable ({e})")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Runs the scenario: a VPC `10.<octet>.0.0/16`, one /20 subnet, the nodes of `plan`, ipamd
/// with `mode_env` on each.
fn scenario(
    label: &str,
    octet: u8,
    mode_env: &[(&str, &str)],
    plan: &[NodePlan],
) -> anyhow::Result<()> {
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("vcn-netmodel-{label}-"))
        .tempdir()?;
    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc(&format!("10.{octet}.0.0/16"))?;
    let subnet = c.create_subnet(&vpc, &format!("10.{octet}.0.0/20"))?;
    let server = serve(&c.fabric, c.sim.clone())?;

    // 1. The nodes and their daemons.
    let mut nodes = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        let node = c.run_instance(&subnet, p.instance_type)?;
        let ns = node.netns()?;
        let dir = tmp.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut ipamd = Ipamd::new(ipamd_bin.clone(), &ns, &server, &node.instance_id, &dir)?;
        for (k, v) in mode_env {
            ipamd.env(*k, *v);
        }
        ipamd.env(
            "AWS_VPC_K8S_CNI_EXTERNALSNAT",
            if p.external_snat { "true" } else { "false" },
        );
        ipamd.spawn()?;
        let plugin = Plugin::new(cni_bin.clone(), &ns, ipamd.socket())?;
        nodes.push(TestNode {
            node,
            ns,
            ipamd,
            plugin,
            external_snat: p.external_snat,
        });
    }
    for n in &mut nodes {
        n.ipamd
            .wait_serving(vpc_cni_e2e::node::START_WAIT)
            .with_context(|| format!("ipamd of {}", n.node.instance_id))?;
    }

    // 2. The pods, each node's in turn (a node's ADDs wait for its pool to grow).
    let mut pods = Vec::new();
    for (i, (n, p)) in nodes.iter().zip(plan).enumerate() {
        for k in 0..p.pods {
            let name = format!("n{i}-pod-{k}");
            let ns = TestNetns::new("pod")?;
            let added = n.plugin.add(&name, ns.path()).with_context(|| {
                format!(
                    "ADD {name} on {} ({})\n--- ipamd log (tail) ---\n{}",
                    n.node.instance_id,
                    p.instance_type,
                    n.ipamd.log_tail(60)
                )
            })?;
            pods.push(Pod {
                name,
                node: i,
                ns,
                ip: added.ip,
            });
        }
    }
    c.check_hooks()?;
    let total: usize = plan.iter().map(|p| p.pods).sum();
    let distinct: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ensure!(
        distinct.len() == total,
        "{total} distinct pod addresses expected, got {}",
        distinct.len()
    );

    // 3. Placement: every pod's address is held by one of its node's ENIs in EC2; every node
    //    has pods on its primary ENI and on at least one secondary ENI.
    let enis = c.fabric.enis();
    for (i, n) in nodes.iter().enumerate() {
        let mut by_device: BTreeMap<u32, usize> = BTreeMap::new();
        for p in pods.iter().filter(|p| p.node == i) {
            let e = eni_of(&enis, p.ip)
                .with_context(|| format!("{} ({}) is held by no ENI", p.name, p.ip))?;
            ensure!(
                e.instance_id == n.node.instance_id,
                "{} ({}) is on {} of {}, not of its node {}",
                p.name,
                p.ip,
                e.eni_id,
                e.instance_id,
                n.node.instance_id
            );
            *by_device.entry(e.device_index).or_default() += 1;
        }
        ensure!(
            by_device.contains_key(&0) && by_device.keys().any(|d| *d > 0),
            "{label}: node {i} ({}) has pods on the primary ENI and on a secondary ENI; pods \
             per device index: {by_device:?}",
            plan[i].instance_type
        );
        eprintln!(
            "{label}: node {i} {} pods per device index {by_device:?}",
            plan[i].instance_type
        );
    }

    // 4. Traffic. Every pod listens on PORT; the outside listens on OUTSIDE_PORT.
    let mut listeners = Vec::new();
    for p in &pods {
        listeners.push(UdpListener::start(&p.ns, SocketAddrV4::new(p.ip, PORT))?);
    }
    let outside_ns = c.fabric.outside_ns()?;
    let _outside = UdpListener::start(&outside_ns, SocketAddrV4::new(OUTSIDE_ADDR, OUTSIDE_PORT))?;
    let per_node: Vec<Vec<&Pod>> = (0..nodes.len())
        .map(|i| pods.iter().filter(|p| p.node == i).collect())
        .collect();
    let check = |idx: usize, p: &Pod| -> Vec<String> {
        let mut errs = Vec::new();
        let here = &per_node[p.node];
        let pos = here
            .iter()
            .position(|q| q.name == p.name)
            .unwrap_or_default();
        // Own view.
        match own_addresses(&p.ns) {
            Ok(a) if a == vec![p.ip] => {}
            Ok(a) => errs.push(format!(
                "{}: eth0 holds {a:?}, ADD returned {}",
                p.name, p.ip
            )),
            Err(e) => errs.push(format!("{}: {e:#}", p.name)),
        }
        // Pod → pod on the same node (its neighbour in the node's list).
        let peer = here[(pos + 1) % here.len()];
        let what = format!(
            "{} ({}) → {} ({}) on one node",
            p.name, p.ip, peer.name, peer.ip
        );
        match seen(&p.ns, SocketAddrV4::new(peer.ip, PORT), &what) {
            Ok(a) if a == p.ip => {}
            Ok(a) => errs.push(format!("{what}: seen as {a}")),
            Err(e) => errs.push(e),
        }
        // Pod → pod on the next node.
        let there = &per_node[(p.node + 1) % per_node.len()];
        let peer = there[idx % there.len()];
        let what = format!(
            "{} ({}) → {} ({}) across nodes",
            p.name, p.ip, peer.name, peer.ip
        );
        match seen(&p.ns, SocketAddrV4::new(peer.ip, PORT), &what) {
            Ok(a) if a == p.ip => {}
            Ok(a) => errs.push(format!("{what}: source not preserved, seen as {a}")),
            Err(e) => errs.push(e),
        }
        // Its node → the pod.
        let n = &nodes[p.node];
        let what = format!("node {} → {} ({})", n.node.primary_ip, p.name, p.ip);
        match seen(&n.ns, SocketAddrV4::new(p.ip, PORT), &what) {
            Ok(a) if a == n.node.primary_ip => {}
            Ok(a) => errs.push(format!(
                "{what}: the pod saw {a}, not the node's primary address"
            )),
            Err(e) => errs.push(e),
        }
        // Pod → outside.
        let what = format!("{} ({}) → outside {OUTSIDE_ADDR}", p.name, p.ip);
        let expected = if n.external_snat {
            p.ip
        } else {
            n.node.primary_ip
        };
        match seen(&p.ns, SocketAddrV4::new(OUTSIDE_ADDR, OUTSIDE_PORT), &what) {
            Ok(a) if a == expected => {}
            Ok(a) => errs.push(format!(
                "{what}: seen as {a}, expected {expected} (external SNAT {})",
                n.external_snat
            )),
            Err(e) => errs.push(e),
        }
        errs
    };
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(idx, p)| (p.name.clone(), scope.spawn(move || check(idx, p))))
            .collect();
        handles
            .into_iter()
            .flat_map(|(name, h)| {
                h.join()
                    .unwrap_or_else(|_| vec![format!("check thread of {name} panicked")])
            })
            .collect()
    });
    drop(listeners);
    let mut logs = String::new();
    if !failures.is_empty() {
        for n in &nodes {
            logs.push_str(&format!(
                "\n--- ipamd of {} (tail) ---\n{}",
                n.node.instance_id,
                n.ipamd.log_tail(30)
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{label}: {} failures over {total} pods:\n{}{logs}",
        failures.len(),
        failures.join("\n")
    );
    c.check_hooks()?;
    drop(pods);
    drop(nodes);
    drop(server);
    Ok(())
}

#[test]
fn network_model_secondary_ip_mode() -> anyhow::Result<()> {
    if skip_netns_test("network model, secondary-IP mode") {
        return Ok(());
    }
    // Default pool policy (WARM_ENI_TARGET 1). Primary ENI capacities (secondary addresses):
    // t3.medium 5, m5.large 9, m5.xlarge 14; each node gets more pods than that.
    scenario(
        "ip",
        21,
        &[],
        &[
            NodePlan {
                instance_type: "t3.medium",
                pods: 14,
                external_snat: false,
            },
            NodePlan {
                instance_type: "m5.large",
                pods: 22,
                external_snat: false,
            },
            NodePlan {
                instance_type: "m5.xlarge",
                pods: 24,
                external_snat: true,
            },
        ],
    )
}

#[test]
fn network_model_prefix_mode() -> anyhow::Result<()> {
    if skip_netns_test("network model, prefix mode") {
        return Ok(());
    }
    // Nitro types with two addresses per ENI: the primary ENI holds one /28 (16 pods), so
    // 20 pods per node take a second ENI.
    scenario(
        "prefix",
        22,
        &[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
        ],
        &[
            NodePlan {
                instance_type: "t3.nano",
                pods: 20,
                external_snat: false,
            },
            NodePlan {
                instance_type: "t3.micro",
                pods: 20,
                external_snat: true,
            },
            NodePlan {
                instance_type: "t3a.micro",
                pods: 20,
                external_snat: false,
            },
        ],
    )
}
