//! The real daemon and the real plugin on one simulated node: `ipamd --backend aws` runs in the
//! node namespace against the simulator served in the fabric (EC2 + IMDS over HTTP), and the
//! `aws-cni` binary wires pods in their own namespaces. Root only; skipped otherwise.
//!
//! The binaries are the workspace's (`target/<profile>/ipamd` and `aws-cni`), built by
//! `cargo test --workspace` / `cargo nextest run --workspace` before tests run.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Context};
use vpc_cni_e2e::node::{health, ip_in, wait_until, workspace_bin, Ipamd, Plugin, WAIT};
use vpc_cni_e2e::probe::{udp_probe, UdpListener};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::netns::list_named;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_rpc::ServingStatus;
use vpc_sim::sim::SimConfig;

const PORT: u16 = 7100;
const PODS: usize = 5;

#[test]
fn ipamd_and_plugin_on_a_simulated_node() -> anyhow::Result<()> {
    if skip_netns_test("node e2e (ipamd + aws-cni)") {
        return Ok(());
    }
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;
    let tmp = tempfile::Builder::new().prefix("vcn-node-e2e-").tempdir()?;
    // 1. A VPC, one subnet, the node under test and a second node for cross-node traffic.
    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.3.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.3.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let other = c.run_instance(&s, "m5.large")?;
    let subnet_cidr = node.subnet;
    let ns = node.netns()?;
    let other_ns = other.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;

    // 2. ipamd in the node namespace, talking to the served simulator.
    let mut ipamd = Ipamd::new(ipamd_bin, &ns, &server, &node.instance_id, tmp.path())?;
    ipamd.start()?;

    // 3. ADD for every pod, each in its own namespace.
    let plugin = Plugin::new(cni_bin, &ns, ipamd.socket())?;
    let mut pods = Vec::new();
    for i in 0..PODS {
        let name = format!("pod-{i}");
        let pod_ns = TestNetns::new("pod")?;
        let added = plugin
            .add(&name, pod_ns.path())
            .with_context(|| format!("--- ipamd log ---\n{}", ipamd.log()))?;
        let (result, ip) = (added.result, added.ip);
        pods.push((name, pod_ns, result, ip));
    }
    let addrs: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.3).collect();
    ensure!(addrs.len() == PODS, "pod addresses are distinct: {addrs:?}");
    let node_enis: Vec<_> = c
        .fabric
        .enis()
        .into_iter()
        .filter(|e| e.instance_id == node.instance_id)
        .collect();
    for &ip in &addrs {
        ensure!(
            subnet_cidr.contains(u32::from(ip)),
            "{ip} is inside the subnet {subnet_cidr}"
        );
        ensure!(
            ip != node.primary_ip,
            "a pod never gets the node's primary address"
        );
        ensure!(
            node_enis.iter().any(|e| e.ipv4.contains(&ip)),
            "{ip} is assigned to one of the node's ENIs in the simulator: {node_enis:?}"
        );
    }
    c.check_hooks()?;
    let assigned = ipamd.view()?.assigned_count;
    ensure!(
        assigned == PODS as i64,
        "ipamd's introspection counts {assigned} assigned addresses, {PODS} expected"
    );

    // 4. Node → pod and other node → pod, sources preserved.
    for (name, pod_ns, _, ip) in &pods {
        let listener = UdpListener::start(pod_ns, SocketAddrV4::new(*ip, PORT))?;
        let seen = udp_probe(&ns, None, SocketAddrV4::new(*ip, PORT), WAIT)?
            .seen_as(&format!("node → {name} ({ip})"))?;
        ensure!(
            seen.ip() != IpAddr::V4(*ip),
            "the node reaches {name} from its own side, saw {seen}"
        );
        let seen = udp_probe(
            &other_ns,
            Some(other.primary_ip),
            SocketAddrV4::new(*ip, PORT),
            WAIT,
        )?
        .seen_as(&format!("other node → {name} ({ip})"))?;
        ensure!(
            seen.ip() == IpAddr::V4(other.primary_ip),
            "{name} sees the other node as itself ({}), saw {seen}",
            other.primary_ip
        );
        drop(listener);
    }

    // 5. DEL every pod; nothing of theirs is left in the node namespace.
    for (name, pod_ns, result, _) in &pods {
        plugin.del(name, pod_ns.path(), Some(result))?;
    }
    let routes = ip_in(&ns, &["-4", "route", "show", "table", "all"])?;
    let rules = ip_in(&ns, &["-4", "rule", "show"])?;
    for ip in &addrs {
        let needle = format!("{ip} ");
        ensure!(
            !routes.contains(&needle),
            "host route for {ip} left after DEL:\n{routes}"
        );
        ensure!(
            !rules.contains(&format!("{ip}")),
            "rule for {ip} left after DEL:\n{rules}"
        );
    }
    let assigned = ipamd.view()?.assigned_count;
    ensure!(
        assigned == 0,
        "ipamd still counts {assigned} assigned addresses after every DEL"
    );
    // The runtime deletes the pod namespaces; their veths go with them.
    let pod_names: Vec<String> = pods.iter().map(|p| p.1.name().to_owned()).collect();
    drop(pods);
    wait_until("pod veths gone from the node", WAIT, || {
        Ok(!ip_in(&ns, &["-o", "link", "show"])?.contains(" eni"))
    })?;

    // The released addresses are free again in ipamd (cooldown 0): as many new pods as before
    // get addresses.
    let mut again = Vec::new();
    for i in 0..PODS {
        let name = format!("again-{i}");
        let pod_ns = TestNetns::new("pod")?;
        let added = plugin
            .add(&name, pod_ns.path())
            .with_context(|| format!("--- ipamd log ---\n{}", ipamd.log()))?;
        let (result, ip) = (added.result, added.ip);
        ensure!(
            subnet_cidr.contains(u32::from(ip)),
            "{ip} is a subnet address"
        );
        again.push((name, pod_ns, result));
    }
    for (name, pod_ns, result) in &again {
        plugin.del(name, pod_ns.path(), Some(result))?;
    }
    drop(again);

    // SIGTERM (ipamd/src/main.rs): the first one stops allocation and keeps serving, a second
    // one stops the process cleanly.
    ipamd.sigterm().context("first SIGTERM")?;
    let terminating = wait_until("ipamd to log that it is terminating", WAIT, || {
        Ok(ipamd.log().contains("terminating:"))
    });
    if let Err(e) = terminating {
        bail!("{e}\n--- ipamd log ---\n{}", ipamd.log());
    }
    let health = health(&ipamd.socket(), WAIT);
    ensure!(
        matches!(health, Ok(ServingStatus::Serving)),
        "ipamd keeps serving after the first SIGTERM: {health:?}"
    );
    ipamd.sigterm().context("second SIGTERM")?;
    let exited = ipamd.wait_exit(WAIT);
    let status = match exited {
        Ok(s) => s,
        Err(e) => bail!(
            "{e}: ipamd did not exit after a second SIGTERM\n--- ipamd log ---\n{}",
            ipamd.log()
        ),
    };
    ensure!(
        status.success(),
        "ipamd exits cleanly on SIGTERM ({status})\n--- ipamd log ---\n{}",
        ipamd.log()
    );
    drop(server);
    c.check_hooks()?;
    drop(c);

    let left: Vec<String> = list_named()?
        .into_iter()
        .filter(|n| {
            pod_names.contains(n) || n.starts_with(&format!("vcn-node-{}-", std::process::id()))
        })
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}
