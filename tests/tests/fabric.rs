//! The fabric on its own, without ipamd: the simulator boots nodes and hot-plugs an ENI, the
//! test wires pods by hand the way the plugin and ipamd would (`vpc_cni_net`), and traffic shows
//! the VPC's behaviour. Root only; skipped otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use vpc_cni_e2e::fabric::{subnet_gateway, OUTSIDE_ADDR};
use vpc_cni_e2e::probe::{nonce, udp_probe, udp_send, ProbeOutcome, UdpListener};
use vpc_cni_e2e::process::{output_in, NsProcess};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::host::{EniSpec, HostNetwork, NetlinkHostNetwork};
use vpc_cni_net::netns::list_named;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{names, IpCidr, MacAddr, Netlink, NetlinkPodNetwork, Netns, PodNetwork, PodSpec};
use vpc_cni_net::{RandomizeSnat, SnatConfig};
use vpc_sim::sim::SimConfig;

/// Generous on a busy 2-core machine; a healthy fabric answers in milliseconds.
const WAIT: Duration = Duration::from_secs(10);
const PORT: u16 = 7000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn seen_ip(addr: SocketAddr) -> IpAddr {
    addr.ip()
}

/// Wires a pod namespace to `node_ns` as the plugin does (veth, /32, gateway, rules).
async fn wire_pod(
    node_ns: &Netns,
    name: &str,
    ip: Ipv4Addr,
    route_table: u32,
) -> anyhow::Result<TestNetns> {
    let pod = TestNetns::new("pod")?;
    let net = NetlinkPodNetwork::new(node_ns.try_clone()?)?;
    net.setup_pod(&PodSpec {
        netns: pod.path().to_path_buf(),
        host_veth: names::host_veth_name("eni", "default", name, 0),
        container_ifname: "eth0".into(),
        index: 0,
        ipv4: ip,
        mtu: 9001,
        route_table,
    })
    .await
    .with_context(|| format!("wire pod {name} ({ip})"))?;
    Ok(pod)
}

/// Polls `f` until it returns true or `WAIT` passes.
fn wait_until(what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn expect_echo(outcome: ProbeOutcome, what: &str) -> anyhow::Result<IpAddr> {
    Ok(seen_ip(outcome.seen_as(what)?))
}

fn expect_unreachable(outcome: ProbeOutcome, what: &str) -> anyhow::Result<()> {
    match outcome {
        ProbeOutcome::Unreachable(_) => Ok(()),
        other => bail!("{what}: expected the VPC router to refuse it, got {other:?}"),
    }
}

#[test]
fn the_fabric_routes_enis_and_addresses_the_simulator_assigns_and_enforces_the_source_check(
) -> anyhow::Result<()> {
    if skip_netns_test("fabric scenario") {
        return Ok(());
    }
    let rt = runtime();
    let c = SimCluster::new(SimConfig {
        seed: 11,
        ..SimConfig::default()
    })?;
    let vpc = c.create_vpc("10.0.0.0/16")?;
    let s1 = c.create_subnet(&vpc, "10.0.1.0/24")?;
    let s2 = c.create_subnet(&vpc, "10.0.2.0/24")?;
    let a = c.run_instance(&s1, "m5.large")?;
    let b = c.run_instance(&s2, "t3.medium")?;
    c.check_hooks()?;
    let (a_ns, b_ns, out_ns) = (a.netns()?, b.netns()?, c.fabric.outside_ns()?);
    let mut owned = vec![
        c.fabric.vpc_ns_name().to_owned(),
        c.fabric.outside_ns_name().to_owned(),
        a.ns_name.clone(),
        b.ns_name.clone(),
    ];

    // Booted nodes: eth0 carries the primary ENI's MAC and address.
    rt.block_on(async {
        let nl = Netlink::open(&a_ns)?;
        let eth0 = nl.require_link("eth0").await?;
        ensure!(
            eth0.mac == Some(a.primary_mac.parse::<MacAddr>()?),
            "eth0 MAC"
        );
        ensure!(eth0.up, "eth0 up");
        let addrs = nl.addresses(Some(eth0.index)).await?;
        ensure!(
            addrs
                .iter()
                .any(|x| x.cidr.addr == IpAddr::V4(a.primary_ip)),
            "node A's eth0 has its primary {}: {addrs:?}",
            a.primary_ip
        );
        Ok(())
    })?;

    // Node ↔ node across subnets, through the subnet gateways.
    let on_b = UdpListener::start(&b_ns, sa(b.primary_ip, PORT))?;
    let seen = expect_echo(
        udp_probe(&a_ns, None, on_b.addr(), WAIT)?,
        "node A to node B",
    )?;
    assert_eq!(
        seen,
        IpAddr::V4(a.primary_ip),
        "node B sees node A's primary"
    );
    let on_a = UdpListener::start(&a_ns, sa(a.primary_ip, PORT))?;
    let seen = expect_echo(
        udp_probe(&b_ns, None, on_a.addr(), WAIT)?,
        "node B to node A",
    )?;
    assert_eq!(
        seen,
        IpAddr::V4(b.primary_ip),
        "node A sees node B's primary"
    );

    // ipamd's job, done through the simulator: a second ENI in B's subnet, two secondary
    // addresses and a /28 prefix.
    let eni = c.attach_new_eni(&s2, &a.instance_id, 1)?;
    let (ips, prefixes) = c.assign(&eni.eni_id, 2, 1)?;
    c.check_hooks()?;
    ensure!(
        ips.len() == 2 && prefixes.len() == 1,
        "assigned {ips:?} {prefixes:?}"
    );
    let port = c.fabric.eni(&eni.eni_id).context("ENI wired")?;
    assert_eq!(port.node_ifname, "eth1");
    let prefix_ip = Ipv4Addr::from(prefixes[0].base() + 3);
    let subnet2: IpCidr = "10.0.2.0/24".parse()?;
    let table = names::route_table_id(0, 1);

    let (pod1, pod2, rogue, rogue_ip) = rt.block_on(async {
        // The hot-plugged link appears in node A with the ENI's MAC, down until ipamd wires it.
        let nl = Netlink::open(&a_ns)?;
        let eth1 = nl.require_link("eth1").await?;
        ensure!(eth1.mac == Some(eni.mac.parse::<MacAddr>()?), "eth1 MAC");
        let host = NetlinkHostNetwork::new(a_ns.try_clone()?)?;
        host.setup_eni(&EniSpec {
            mac: eni.mac.parse()?,
            primary_ip: eni.primary_ip,
            subnet: subnet2,
            mtu: 9001,
            route_table: table,
            trunk: false,
        })
        .await?;
        let pod1 = wire_pod(&a_ns, "pod1", ips[0], table).await?;
        let pod2 = wire_pod(&a_ns, "pod2", prefix_ip, table).await?;
        // A pod whose address EC2 never gave this ENI.
        let taken: Vec<Ipv4Addr> = [eni.primary_ip, b.primary_ip, ips[0], ips[1]].into();
        let rogue_ip = (200..250)
            .map(|h| Ipv4Addr::new(10, 0, 2, h))
            .find(|ip| !taken.contains(ip) && !prefixes[0].contains(u32::from(*ip)))
            .context("a free address")?;
        let rogue = wire_pod(&a_ns, "rogue", rogue_ip, table).await?;
        Ok((pod1, pod2, rogue, rogue_ip))
    })?;
    owned.extend([pod1.name(), pod2.name(), rogue.name()].map(str::to_owned));

    // A pod on the secondary ENI is reachable from node B (same subnet: proxy ARP by the VPC
    // router), and each side sees the other's real address.
    let on_pod1 = UdpListener::start(&pod1, sa(ips[0], PORT))?;
    let seen = expect_echo(
        udp_probe(&b_ns, None, on_pod1.addr(), WAIT)?,
        "node B to pod1",
    )?;
    assert_eq!(seen, IpAddr::V4(b.primary_ip), "pod1 sees node B's primary");
    let seen = expect_echo(udp_probe(&pod1, None, on_b.addr(), WAIT)?, "pod1 to node B")?;
    assert_eq!(seen, IpAddr::V4(ips[0]), "node B sees pod1's own address");
    // The same through the /28 prefix, from the other subnet's node... and from node A itself.
    let on_pod2 = UdpListener::start(&pod2, sa(prefix_ip, PORT))?;
    let seen = expect_echo(
        udp_probe(&b_ns, None, on_pod2.addr(), WAIT)?,
        "node B to pod2",
    )?;
    assert_eq!(seen, IpAddr::V4(b.primary_ip));
    let seen = expect_echo(
        udp_probe(&pod2, None, on_pod1.addr(), WAIT)?,
        "pod2 to pod1",
    )?;
    assert_eq!(seen, IpAddr::V4(prefix_ip), "pod1 sees pod2's own address");

    // Source/destination check: the rogue pod's packets leave through eth1 and are dropped by
    // the VPC router; a legitimate packet sent after it on the same path arrives, so the rogue
    // one was dropped, not delayed.
    let drops_before = c.fabric.source_check_drops(&eni.eni_id)?;
    let spoofed = nonce("spoofed");
    udp_send(&rogue, rogue_ip, on_b.addr(), spoofed.as_bytes())?;
    wait_until("the source check to count a drop on eth1", || {
        Ok(c.fabric.source_check_drops(&eni.eni_id)? > drops_before)
    })?;
    let legit = nonce("legit");
    udp_send(&pod1, ips[0], on_b.addr(), legit.as_bytes())?;
    on_b.wait_for(legit.as_bytes(), WAIT)?;
    ensure!(
        !on_b
            .received()
            .iter()
            .any(|d| d.payload == spoofed.as_bytes()),
        "a packet with an unassigned source passed the source check"
    );

    // The internet gateway: the outside sees node and pod sources as they leave the VPC...
    let outside = UdpListener::start(&out_ns, sa(OUTSIDE_ADDR, PORT))?;
    let seen = expect_echo(udp_probe(&a_ns, None, outside.addr(), WAIT)?, "node A out")?;
    assert_eq!(seen, IpAddr::V4(a.primary_ip));
    let seen = expect_echo(udp_probe(&pod1, None, outside.addr(), WAIT)?, "pod1 out")?;
    assert_eq!(
        seen,
        IpAddr::V4(ips[0]),
        "no SNAT yet: the pod's own address"
    );
    // ...and with the reference's host SNAT applied in node A, a pod going out is SNATed to the
    // node's primary address (connmark → rule 1024 → eth0).
    rt.block_on(async {
        let host = NetlinkHostNetwork::new(a_ns.try_clone()?)?;
        host.apply_snat(&SnatConfig {
            primary_ip: a.primary_ip,
            primary_if: "eth0".into(),
            vpc_cidrs: vec!["10.0.0.0/16".parse()?],
            exclude_cidrs: vec![],
            external_snat: false,
            randomize: RandomizeSnat::Prng,
            node_port_support: true,
            veth_prefix: "eni".into(),
            connmark: 0x80,
        })
        .await?;
        anyhow::Ok(())
    })?;
    let seen = expect_echo(udp_probe(&pod2, None, outside.addr(), WAIT)?, "pod2 out")?;
    assert_eq!(seen, IpAddr::V4(a.primary_ip), "SNAT to node A's primary");
    let seen = expect_echo(udp_probe(&pod2, None, on_b.addr(), WAIT)?, "pod2 to node B")?;
    assert_eq!(seen, IpAddr::V4(prefix_ip), "no SNAT inside the VPC");

    // Unassigning pod1's address takes it off the VPC router.
    c.unassign(&eni.eni_id, &[ips[0]], &[])?;
    c.check_hooks()?;
    expect_unreachable(
        udp_probe(&out_ns, None, on_pod1.addr(), WAIT)?,
        "pod1 after unassign",
    )?;
    let seen = expect_echo(udp_probe(&out_ns, None, on_pod2.addr(), WAIT)?, "pod2 kept")?;
    assert_eq!(seen, IpAddr::V4(OUTSIDE_ADDR));

    // Detaching removes the link from the node and every route to the ENI.
    c.detach(&eni.attachment_id)?;
    c.check_hooks()?;
    ensure!(c.fabric.eni(&eni.eni_id).is_none(), "ENI still wired");
    rt.block_on(async {
        let nl = Netlink::open(&a_ns)?;
        ensure!(
            nl.link_by_name("eth1").await?.is_none(),
            "eth1 still in node A"
        );
        let vpc_nl = Netlink::open(&c.fabric.vpc_ns()?)?;
        ensure!(
            vpc_nl.link_by_name(&port.vpc_ifname).await?.is_none(),
            "VPC side of eth1 still there"
        );
        anyhow::Ok(())
    })?;
    expect_unreachable(
        udp_probe(&out_ns, None, on_pod2.addr(), WAIT)?,
        "pod2 after detach",
    )?;
    // Node B is untouched.
    expect_echo(
        udp_probe(&a_ns, None, on_b.addr(), WAIT)?,
        "node A to B after detach",
    )?;

    // Everything goes with the cluster, named namespaces included.
    drop((on_a, on_b, on_pod1, on_pod2, outside));
    drop((pod1, pod2, rogue));
    drop(c);
    let left: Vec<String> = list_named()?
        .into_iter()
        .filter(|n| owned.contains(n))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn a_node_reaches_the_simulator_served_in_the_vpc_and_runs_processes_in_its_namespace(
) -> anyhow::Result<()> {
    if skip_netns_test("serve and process scenario") {
        return Ok(());
    }
    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.1.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.1.0.0/20")?;
    let node = c.run_instance(&s, "c5.xlarge")?;
    let ns = node.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;

    // IMDSv2 from inside the node: a token, then the node's own MAC.
    let imds = match server.imds {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => bail!("IMDS on IPv6"),
    };
    let http = |req: String| -> anyhow::Result<String> {
        let mut stream =
            ns.run(move || std::net::TcpStream::connect_timeout(&imds.into(), WAIT))??;
        stream.set_read_timeout(Some(WAIT))?;
        use std::io::{Read, Write};
        stream.write_all(req.as_bytes())?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body)
    };
    let id = &node.instance_id;
    let token_reply = http(format!(
        "PUT /{id}/latest/api/token HTTP/1.1\r\nHost: x\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ))?;
    ensure!(
        token_reply.starts_with("HTTP/1.1 200"),
        "token: {token_reply}"
    );
    let token = token_reply
        .split("\r\n\r\n")
        .nth(1)
        .context("token body")?
        .trim()
        .to_owned();
    let mac_reply = http(format!(
        "GET /{id}/latest/meta-data/mac HTTP/1.1\r\nHost: x\r\nx-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
    ))?;
    ensure!(mac_reply.starts_with("HTTP/1.1 200"), "mac: {mac_reply}");
    ensure!(
        mac_reply.trim_end().ends_with(&node.primary_mac),
        "IMDS answers the node's MAC {}: {mac_reply}",
        node.primary_mac
    );

    // A one-shot command sees the node's network, not the host's.
    let mut cmd = Command::new("ip");
    cmd.args(["-o", "-4", "addr", "show", "dev", "eth0"]);
    let out = output_in(&ns, cmd, None)?;
    ensure!(out.status.success(), "ip addr: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains(&format!("{}/20", node.primary_ip)),
        "eth0: {text}"
    );
    assert_eq!(
        subnet_gateway("10.1.0.0/20".parse()?),
        Ipv4Addr::new(10, 1, 0, 1)
    );

    // A long-running process lives in the node's namespace until killed.
    let mut sleeper = NsProcess::spawn(&ns, {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        cmd
    })?;
    let its_ns = Netns::of_pid(sleeper.pid())?;
    ensure!(
        its_ns.id()? == ns.id()?,
        "the process runs in the node namespace"
    );
    ensure!(sleeper.try_wait()?.is_none(), "still running");
    let status = sleeper.kill()?;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
    c.check_hooks()?;
    Ok(())
}
