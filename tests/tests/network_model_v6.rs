//! The network model in IPv6 mode (issue "IPv6 clusters"): two dual-stack nodes in an IPv6
//! subnet, each running the real `ipamd` with `ENABLE_IPv6=true` and wiring pods with the real
//! `aws-cni`, followed by the real `egress-cni` for IPv4 egress, as the reference conflist
//! chains them.
//!
//! Each node's ipamd refuses new connections to the egress-only 169.254.172.0/22 (filter
//! `FORWARD`). For every pod:
//! - its address is in the /80 that EC2 (the simulator) holds on its node's primary ENI;
//! - its own view of its address (`eth0`) is the address ADD returned;
//! - a pod on the same node and a pod on the other node reach it over IPv6 and are seen with
//!   their own addresses (no NAT in IPv6);
//! - its node reaches it and is seen as the node's IPv6 address;
//! - it reaches an IPv6 host outside the VPC directly, seen with its own address;
//! - it reaches an IPv4-only host outside through the egress plugin (`v4if0`, SNAT on the
//!   node), seen as its node's primary IPv4 address.
//!
//! Then ipamd is SIGKILLed and restarted: every assignment is kept, no second /80 is
//! assigned, a new pod gets a new address; every pod is deleted (egress then aws-cni), the
//! checkpoint ends empty, no pod rule or egress route is left, and no host veth once the
//! pods' namespaces are gone.
//!
//! Everything lives in namespaces the test creates (deleted on drop, also on failure); ipamd
//! processes are killed on drop. Root only; skipped otherwise; skipped without the reference
//! `host-local` plugin.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

use anyhow::{ensure, Context};
use vpc_cni_e2e::fabric::{OUTSIDE_ADDR, OUTSIDE_ADDR6};
use vpc_cni_e2e::node::{
    ip_in, own_addresses6, wait_until, workspace_bin, Egress, Ipamd, Plugin, WAIT,
};
use vpc_cni_e2e::probe::{udp_probe_any, ProbeOutcome, UdpListener};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::{Node, SimCluster};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;
use vpc_sim::sim::SimConfig;

/// Pods listen here.
const PORT: u16 = 7600;
/// The outside listeners' port.
const OUTSIDE_PORT: u16 = 7601;
/// Where the reference plugins are (host-local for egress-cni).
const CNI_PLUGINS: &str = "/usr/lib/cni";
/// Pods per node.
const PODS: usize = 5;

struct Pod {
    name: String,
    node: usize,
    ns: TestNetns,
    ip: Ipv6Addr,
    /// The chained result (aws-cni then egress-cni): DEL's `prevResult`.
    result: serde_json::Value,
}

struct TestNode {
    node: Node,
    ns: Netns,
    ipv6: Ipv6Addr,
    ipamd: Ipamd,
    plugin: Plugin,
    egress: Egress,
}

/// UDP from `from` to `dst`; the source the listener saw, or why not.
fn seen(from: &Netns, dst: SocketAddr, what: &str) -> Result<IpAddr, String> {
    match udp_probe_any(from, None, dst, WAIT) {
        Ok(ProbeOutcome::Echoed { seen_as }) => Ok(seen_as.ip()),
        Ok(other) => Err(format!("{what}: {other:?}")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The /80s EC2 holds on `instance_id`'s ENIs.
fn sim_prefixes(c: &SimCluster, instance_id: &str) -> Vec<String> {
    c.sim.with(|s| {
        s.model()
            .instance_enis(instance_id)
            .iter()
            .flat_map(|e| e.ipv6_prefixes.iter().map(|p| p.to_string()))
            .collect()
    })
}

/// The IPv6 addresses in ipamd's checkpoint.
fn checkpoint_ipv6(path: &Path) -> anyhow::Result<BTreeSet<Ipv6Addr>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let mut out = BTreeSet::new();
    for a in v["allocations"].as_array().context("allocations")? {
        ensure!(a.get("ipv4").is_none(), "an IPv4 entry in IPv6 mode: {a}");
        out.insert(
            a["ipv6"]
                .as_str()
                .context("ipv6")?
                .parse()
                .with_context(|| format!("entry {a}"))?,
        );
    }
    Ok(out)
}

fn prefix_contains(prefix: &str, ip: Ipv6Addr) -> bool {
    let Some((base, len)) = prefix.split_once('/') else {
        return false;
    };
    let (Ok(base), Ok(len)) = (base.parse::<Ipv6Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(ip) & mask == u128::from(base) & mask
}

#[test]
fn network_model_ipv6_mode() -> anyhow::Result<()> {
    if skip_netns_test("network_model_ipv6_mode") {
        return Ok(());
    }
    if !Path::new(CNI_PLUGINS).join("host-local").exists() {
        eprintln!("network_model_ipv6_mode: skipped: no {CNI_PLUGINS}/host-local");
        return Ok(());
    }
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;
    let egress_bin = workspace_bin("egress-cni")?;
    let tmp = tempfile::Builder::new()
        .prefix("vcn-netmodel-v6-")
        .tempdir()?;
    let c = SimCluster::new(SimConfig::default())?;
    let (vpc, _block) = c.create_vpc_ipv6("10.9.0.0/16")?;
    let (subnet, _block64) = c.create_subnet_ipv6(&vpc, "10.9.0.0/20", 0)?;
    let server = serve(&c.fabric, c.sim.clone())?;

    // 1. Two dual-stack nodes, each with its daemon in IPv6 mode.
    let mut nodes = Vec::new();
    for i in 0..2 {
        let node = c.run_instance_ipv6(&subnet, "m5.large")?;
        let ns = node.netns()?;
        let ipv6 = node
            .primary_ipv6
            .context("an IPv6 node has an IPv6 address")?;
        let dir = tmp.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut ipamd = Ipamd::new(ipamd_bin.clone(), &ns, &server, &node.instance_id, &dir)?;
        ipamd
            .env("ENABLE_IPv4", "false")
            .env("ENABLE_IPv6", "true")
            .env("ENABLE_PREFIX_DELEGATION", "true");
        ipamd.spawn()?;
        let plugin = Plugin::new(cni_bin.clone(), &ns, ipamd.socket())?;
        let egress = Egress::v4(
            egress_bin.clone(),
            &ns,
            CNI_PLUGINS,
            node.primary_ip,
            &dir.join("egress-v4-ipam"),
        )?;
        nodes.push(TestNode {
            node,
            ns,
            ipv6,
            ipamd,
            plugin,
            egress,
        });
    }
    for n in &mut nodes {
        n.ipamd
            .wait_serving(vpc_cni_e2e::node::START_WAIT)
            .with_context(|| format!("ipamd of {}", n.node.instance_id))?;
    }
    for n in &nodes {
        let filter = vpc_cni_net::snat::iptables_save(&n.ns, "filter")?;
        ensure!(
            filter
                .lines()
                .any(|l| l.starts_with("-A FORWARD -d 169.254.172.0/22")
                    && l.contains("--ctstate NEW")
                    && l.contains("-j REJECT")),
            "{}: ipamd guards the egress-only addresses:\n{filter}",
            n.node.instance_id
        );
    }
    let prefixes: Vec<String> = nodes
        .iter()
        .map(|n| {
            let p = sim_prefixes(&c, &n.node.instance_id);
            ensure!(
                p.len() == 1,
                "{}: one /80 expected, EC2 holds {p:?}",
                n.node.instance_id
            );
            Ok(p[0].clone())
        })
        .collect::<anyhow::Result<_>>()?;

    // 2. The pods: aws-cni, then egress-cni with aws-cni's result.
    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..PODS {
            let name = format!("v6n{i}-pod-{k}");
            let ns = TestNetns::new("pod")?;
            let added = n.plugin.add6(&name, ns.path()).with_context(|| {
                format!(
                    "ADD {name}\n--- ipamd log (tail) ---\n{}",
                    n.ipamd.log_tail(40)
                )
            })?;
            ensure!(
                prefix_contains(&prefixes[i], added.ip),
                "{name}: {} is not in its node's /80 {}",
                added.ip,
                prefixes[i]
            );
            let result = n.egress.add(&name, ns.path(), &added.result)?;
            let ifaces: Vec<&str> = result["interfaces"]
                .as_array()
                .map(|a| a.iter().filter_map(|i| i["name"].as_str()).collect())
                .unwrap_or_default();
            ensure!(
                ifaces.contains(&"v4if0"),
                "{name}: the egress interface is in the result: {result}"
            );
            ensure!(
                result["ips"] == added.result["ips"],
                "{name}: egress-cni must not add its addresses to ips: {result}"
            );
            pods.push(Pod {
                name,
                node: i,
                ns,
                ip: added.ip,
                result,
            });
        }
    }
    c.check_hooks()?;
    let distinct: BTreeSet<Ipv6Addr> = pods.iter().map(|p| p.ip).collect();
    ensure!(distinct.len() == pods.len(), "every pod its own address");

    // 3. Traffic.
    let mut listeners = Vec::new();
    for p in &pods {
        listeners.push(UdpListener::start_any(
            &p.ns,
            SocketAddr::new(IpAddr::V6(p.ip), PORT),
        )?);
    }
    let outside_ns = c.fabric.outside_ns()?;
    let _outside6 = UdpListener::start_any(
        &outside_ns,
        SocketAddr::new(IpAddr::V6(OUTSIDE_ADDR6), OUTSIDE_PORT),
    )?;
    let _outside4 = UdpListener::start(&outside_ns, SocketAddrV4::new(OUTSIDE_ADDR, OUTSIDE_PORT))?;
    let check = |p: &Pod| -> Vec<String> {
        let mut errs = Vec::new();
        let me = IpAddr::V6(p.ip);
        match own_addresses6(&p.ns) {
            Ok(a) if a == vec![p.ip] => {}
            Ok(a) => errs.push(format!(
                "{}: eth0 holds {a:?}, ADD returned {}",
                p.name, p.ip
            )),
            Err(e) => errs.push(format!("{}: {e:#}", p.name)),
        }
        let here: Vec<&Pod> = pods
            .iter()
            .filter(|q| q.node == p.node && q.name != p.name)
            .collect();
        let there: Vec<&Pod> = pods.iter().filter(|q| q.node != p.node).collect();
        for (peer, where_) in [(here[0], "on one node"), (there[0], "across nodes")] {
            let what = format!(
                "{} ({}) → {} ({}) {where_}",
                p.name, p.ip, peer.name, peer.ip
            );
            match seen(&p.ns, SocketAddr::new(IpAddr::V6(peer.ip), PORT), &what) {
                Ok(a) if a == me => {}
                Ok(a) => errs.push(format!("{what}: source not preserved, seen as {a}")),
                Err(e) => errs.push(e),
            }
        }
        let n = &nodes[p.node];
        let what = format!("node {} → {} ({})", n.ipv6, p.name, p.ip);
        match seen(&n.ns, SocketAddr::new(me, PORT), &what) {
            Ok(a) if a == IpAddr::V6(n.ipv6) => {}
            Ok(a) => errs.push(format!(
                "{what}: the pod saw {a}, not the node's IPv6 address"
            )),
            Err(e) => errs.push(e),
        }
        let what = format!("{} ({}) → outside {OUTSIDE_ADDR6}", p.name, p.ip);
        match seen(
            &p.ns,
            SocketAddr::new(IpAddr::V6(OUTSIDE_ADDR6), OUTSIDE_PORT),
            &what,
        ) {
            Ok(a) if a == me => {}
            Ok(a) => errs.push(format!(
                "{what}: seen as {a}, expected the pod's own address"
            )),
            Err(e) => errs.push(e),
        }
        let what = format!(
            "{} → IPv4 outside {OUTSIDE_ADDR} through egress-cni",
            p.name
        );
        match seen(
            &p.ns,
            SocketAddr::new(IpAddr::V4(OUTSIDE_ADDR), OUTSIDE_PORT),
            &what,
        ) {
            Ok(a) if a == IpAddr::V4(n.node.primary_ip) => {}
            Ok(a) => errs.push(format!(
                "{what}: seen as {a}, expected the node's primary IPv4 {}",
                n.node.primary_ip
            )),
            Err(e) => errs.push(e),
        }
        errs
    };
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|p| (p.name.clone(), scope.spawn(move || check(p))))
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
    ensure!(
        failures.is_empty(),
        "{} failures over {} pods:\n{}",
        failures.len(),
        pods.len(),
        failures.join("\n")
    );

    // 4. ipamd SIGKILLed and restarted: every assignment kept, no second /80.
    let n0 = &mut nodes[0];
    let before = checkpoint_ipv6(&n0.ipamd.checkpoint_path())?;
    let held: BTreeSet<Ipv6Addr> = pods.iter().filter(|p| p.node == 0).map(|p| p.ip).collect();
    ensure!(before == held, "checkpoint {before:?} != pods {held:?}");
    n0.ipamd.kill()?;
    n0.ipamd.start()?;
    ensure!(
        sim_prefixes(&c, &n0.node.instance_id) == vec![prefixes[0].clone()],
        "a restart assigns no second /80"
    );
    let after = checkpoint_ipv6(&n0.ipamd.checkpoint_path())?;
    ensure!(
        after == held,
        "after the restart the checkpoint holds {after:?}, pods {held:?}"
    );
    let extra_ns = TestNetns::new("pod")?;
    let extra = n0.plugin.add6("v6n0-extra", extra_ns.path())?;
    ensure!(
        !held.contains(&extra.ip),
        "{} is handed out twice",
        extra.ip
    );
    n0.plugin
        .del("v6n0-extra", extra_ns.path(), Some(&extra.result))?;

    // 5. Every pod deleted: egress-cni, then aws-cni (the conflist's DEL order is reversed).
    for p in &pods {
        let n = &nodes[p.node];
        n.egress.del(&p.name, p.ns.path(), &p.result)?;
        n.plugin.del(&p.name, p.ns.path(), Some(&p.result))?;
    }
    for n in &nodes {
        let left = checkpoint_ipv6(&n.ipamd.checkpoint_path())?;
        ensure!(
            left.is_empty(),
            "{}: checkpoint still holds {left:?}",
            n.node.instance_id
        );
        let rules = ip_in(&n.ns, &["-6", "rule", "show"])?;
        ensure!(
            !rules.lines().any(|l| l.starts_with("512:")),
            "{}: pod rules left:\n{rules}",
            n.node.instance_id
        );
        let nat_rules = vpc_cni_net::snat::iptables_save(&n.ns, "nat")?;
        ensure!(
            !nat_rules.contains("CNI-E4-"),
            "{}: egress SNAT chains left:\n{nat_rules}",
            n.node.instance_id
        );
        let nat = ip_in(&n.ns, &["-4", "route", "show"])?;
        ensure!(
            !nat.contains("169.254.172."),
            "{}: egress routes left:\n{nat}",
            n.node.instance_id
        );
    }
    // The runtime deletes the pods' namespaces after DEL: their veths go with them (the
    // kernel tears a namespace down asynchronously, hence the bounded wait).
    drop(pods);
    drop(extra_ns);
    for n in &nodes {
        let veths = || -> anyhow::Result<Vec<String>> {
            let links = ip_in(&n.ns, &["-o", "link", "show"])?;
            Ok(links
                .lines()
                .filter(|l| l.contains(": eni") || l.contains(": veth"))
                .map(str::to_owned)
                .collect())
        };
        wait_until("the pods' host veths to go", WAIT, || {
            Ok(veths()?.is_empty())
        })
        .with_context(|| format!("{}: left {:?}", n.node.instance_id, veths()))?;
    }
    drop(nodes);
    drop(server);
    Ok(())
}
