//! The fabric on its own, without ipamd: the simulator boots nodes and hot-plugs an ENI, the
//! test wires pods by hand the way the plugin and ipamd would (`vpc_cni_net`), and traffic shows
//! the VPC's behaviour. Root only; skipped otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use vpc_cni_e2e::fabric::{
    eui64_link_local, subnet_gateway, ENI_GATEWAY6, OUTSIDE_ADDR, OUTSIDE_ADDR6,
};
use vpc_cni_e2e::probe::{
    nonce, udp_probe, udp_probe_any, udp_send, udp_send_any, ProbeOutcome, UdpListener,
};
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

/// Runs `ip ARGS...` inside `ns`; fails with its stderr.
fn ip_in(ns: &Netns, args: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args.split_whitespace());
    let out = output_in(ns, cmd, None)?;
    ensure!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wires an IPv6 pod namespace to `node_ns` the way the reference plugin does (spec/cni.md
/// 2.5): the address as a /128 on the pod's eth0, `fe80::1` as a `/128 scope link` route, the
/// default route via it and a permanent neighbour entry for it (the host veth's MAC); on the
/// host, `<ip>/128 dev <host veth>`.
fn wire_pod6(node_ns: &Netns, host_if: &str, mac: &str, ip: Ipv6Addr) -> anyhow::Result<TestNetns> {
    let pod = TestNetns::new("pod6")?;
    ip_in(
        node_ns,
        &format!(
            "link add {host_if} address {mac} type veth peer name eth0 netns {}",
            pod.name()
        ),
    )?;
    ip_in(node_ns, &format!("link set {host_if} up"))?;
    ip_in(node_ns, &format!("-6 route add {ip}/128 dev {host_if}"))?;
    for cmd in [
        "link set lo up".to_owned(),
        "link set eth0 up".to_owned(),
        format!("-6 addr add {ip}/128 dev eth0 nodad"),
        "-6 route add fe80::1/128 dev eth0 scope link".to_owned(),
        "-6 route add default via fe80::1 dev eth0".to_owned(),
        format!("-6 neigh add fe80::1 lladdr {mac} dev eth0 nud permanent"),
    ] {
        ip_in(&pod, &cmd)?;
    }
    Ok(pod)
}

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

#[test]
fn ipv6_80s_and_addresses_are_routed_to_their_enis_through_fe80_ec2_1_with_sources_checked(
) -> anyhow::Result<()> {
    if skip_netns_test("IPv6 fabric scenario") {
        return Ok(());
    }
    let c = SimCluster::new(SimConfig {
        seed: 13,
        ..SimConfig::default()
    })?;
    let (vpc, v56) = c.create_vpc_ipv6("10.2.0.0/16")?;
    let (s1, net) = c.create_subnet_ipv6(&vpc, "10.2.1.0/24", 1)?;
    ensure!(v56.len == 56 && net.len == 64 && v56.contains_block(&net));
    let a = c.run_instance_ipv6(&s1, "m5.large")?;
    let b = c.run_instance_ipv6(&s1, "m5.large")?;
    c.check_hooks()?;
    let (a_ns, b_ns, out_ns) = (a.netns()?, b.netns()?, c.fabric.outside_ns()?);
    let mut owned = vec![
        c.fabric.vpc_ns_name().to_owned(),
        c.fabric.outside_ns_name().to_owned(),
        a.ns_name.clone(),
        b.ns_name.clone(),
    ];
    let a6 = a
        .primary_ipv6
        .context("node A launched with an IPv6 address")?;
    let b6 = b
        .primary_ipv6
        .context("node B launched with an IPv6 address")?;
    ensure!(
        net.contains(u128::from(a6)) && net.contains(u128::from(b6)),
        "{a6} and {b6} in {net}"
    );
    assert_eq!(a.gateway6(), ENI_GATEWAY6);

    // A booted node: its IPv6 address as a /128 on eth0, the EUI-64 link-local of the ENI's
    // MAC, and the default route via the ENI gateway fe80:ec2::1, which answers.
    let addrs = ip_in(&a_ns, "-6 -o addr show dev eth0")?;
    ensure!(addrs.contains(&format!("{a6}/128")), "eth0: {addrs}");
    let ll = eui64_link_local(&a.primary_mac).context("node A's MAC")?;
    ensure!(
        addrs.contains(&format!("{ll}/64")),
        "eth0 link-local {ll}: {addrs}"
    );
    let routes = ip_in(&a_ns, "-6 route show default")?;
    ensure!(
        routes.contains("via fe80:ec2::1 dev eth0"),
        "node A's IPv6 default route: {routes}"
    );
    let mut ping = Command::new("ping");
    ping.args(["-6", "-c", "1", "-w", "10", "fe80:ec2::1%eth0"]);
    let out = output_in(&a_ns, ping, None)?;
    ensure!(
        out.status.success(),
        "ping fe80:ec2::1 from node A: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Node ↔ node over IPv6 through the VPC router, sources preserved.
    let on_b = UdpListener::start_any(&b_ns, sa6(b6, PORT))?;
    let seen = expect_echo(
        udp_probe_any(&a_ns, None, on_b.socket_addr(), WAIT)?,
        "node A to node B over IPv6",
    )?;
    assert_eq!(seen, IpAddr::V6(a6), "node B sees node A's IPv6 address");
    let on_a = UdpListener::start_any(&a_ns, sa6(a6, PORT))?;
    let seen = expect_echo(
        udp_probe_any(&b_ns, None, on_a.socket_addr(), WAIT)?,
        "node B to node A over IPv6",
    )?;
    assert_eq!(seen, IpAddr::V6(b6));

    // The IPv6 outside, and the IPv4 one as before.
    let outside6 = UdpListener::start_any(&out_ns, sa6(OUTSIDE_ADDR6, PORT))?;
    let seen = expect_echo(
        udp_probe_any(&a_ns, None, outside6.socket_addr(), WAIT)?,
        "node A to the IPv6 outside",
    )?;
    assert_eq!(seen, IpAddr::V6(a6), "no NAT66: the outside sees node A");
    let outside4 = UdpListener::start(&out_ns, sa(OUTSIDE_ADDR, PORT))?;
    let seen = expect_echo(
        udp_probe(&a_ns, None, outside4.addr(), WAIT)?,
        "node A to the IPv4 outside",
    )?;
    assert_eq!(seen, IpAddr::V4(a.primary_ip));

    // ipamd's IPv6 mode, done through the simulator: one /80 on each node's primary ENI.
    let (_, pa) = c.assign_ipv6(&a.primary_eni, 0, 1)?;
    let (_, pb) = c.assign_ipv6(&b.primary_eni, 0, 1)?;
    c.check_hooks()?;
    let (pa, pb) = (pa[0], pb[0]);
    ensure!(pa.len == 80 && net.contains_block(&pa), "{pa}");
    let port = c.fabric.eni(&a.primary_eni).context("A's eth0 wired")?;
    ensure!(port.ipv6_prefixes.contains(&pa) && port.ipv6.contains(&a6));
    assert_eq!(port.link_local, ll);

    // A pod behind node A with an address of A's /80; an address of B's /80 on B's eth0.
    let pod_ip = Ipv6Addr::from(pa.base | 0x5);
    let b_pfx_ip = Ipv6Addr::from(pb.base | 0x7);
    ip_in(&b_ns, &format!("-6 addr add {b_pfx_ip}/128 dev eth0 nodad"))?;
    let pod = wire_pod6(&a_ns, "enipod6a", "02:00:00:00:06:01", pod_ip)?;
    owned.push(pod.name().to_owned());
    let on_b_pfx = UdpListener::start_any(&b_ns, sa6(b_pfx_ip, PORT))?;
    let seen = expect_echo(
        udp_probe_any(&pod, None, on_b_pfx.socket_addr(), WAIT)?,
        "pod on A to B's /80 address",
    )?;
    assert_eq!(seen, IpAddr::V6(pod_ip), "B sees the pod's own address");
    let on_pod = UdpListener::start_any(&pod, sa6(pod_ip, PORT))?;
    let seen = expect_echo(
        udp_probe_any(
            &b_ns,
            Some(IpAddr::V6(b_pfx_ip)),
            on_pod.socket_addr(),
            WAIT,
        )?,
        "B's /80 address to the pod on A",
    )?;
    assert_eq!(seen, IpAddr::V6(b_pfx_ip), "the pod sees B's /80 address");
    let seen = expect_echo(
        udp_probe_any(&pod, None, outside6.socket_addr(), WAIT)?,
        "pod to the IPv6 outside",
    )?;
    assert_eq!(
        seen,
        IpAddr::V6(pod_ip),
        "the outside sees the pod's own address"
    );
    let seen = expect_echo(
        udp_probe_any(&out_ns, None, on_pod.socket_addr(), WAIT)?,
        "the IPv6 outside to the pod",
    )?;
    assert_eq!(seen, IpAddr::V6(OUTSIDE_ADDR6));

    // Source/destination check: a pod behind A with an address of the /64 that EC2 never gave
    // A (the /64's first /80, which EC2 never hands out) is dropped at the VPC router; a
    // legitimate packet after it arrives.
    let rogue_ip = Ipv6Addr::from(net.base | 0xdead_beef);
    ensure!(!pa.contains(u128::from(rogue_ip)) && !pb.contains(u128::from(rogue_ip)));
    let rogue = wire_pod6(&a_ns, "enirogue6", "02:00:00:00:06:02", rogue_ip)?;
    owned.push(rogue.name().to_owned());
    let drops_before = c.fabric.source_check_drops6(&a.primary_eni)?;
    let spoofed = nonce("spoofed6");
    udp_send_any(
        &rogue,
        IpAddr::V6(rogue_ip),
        on_b.socket_addr(),
        spoofed.as_bytes(),
    )?;
    wait_until("the IPv6 source check to count a drop on A's eth0", || {
        Ok(c.fabric.source_check_drops6(&a.primary_eni)? > drops_before)
    })?;
    let legit = nonce("legit6");
    udp_send_any(
        &pod,
        IpAddr::V6(pod_ip),
        on_b.socket_addr(),
        legit.as_bytes(),
    )?;
    on_b.wait_for(legit.as_bytes(), WAIT)?;
    ensure!(
        !on_b
            .received()
            .iter()
            .any(|d| d.payload == spoofed.as_bytes()),
        "a packet with an unassigned IPv6 source passed the source check"
    );
    ensure!(
        c.fabric.source_check_drops(&a.primary_eni)?
            >= c.fabric.source_check_drops6(&a.primary_eni)?,
        "both families' drops add up"
    );

    // Unassigning A's /80 takes it off the VPC router: the outside is refused at once, the
    // node's own address still works.
    c.unassign_ipv6(&a.primary_eni, &[], &[pa])?;
    c.check_hooks()?;
    let port = c.fabric.eni(&a.primary_eni).context("A's eth0 wired")?;
    ensure!(!port.ipv6_prefixes.contains(&pa), "{pa} still on the port");
    expect_unreachable(
        udp_probe_any(&out_ns, None, on_pod.socket_addr(), WAIT)?,
        "the pod after its /80 was unassigned",
    )?;
    let seen = expect_echo(
        udp_probe_any(&out_ns, None, on_a.socket_addr(), WAIT)?,
        "node A after the unassign",
    )?;
    assert_eq!(seen, IpAddr::V6(OUTSIDE_ADDR6));

    // Everything goes with the cluster.
    drop((on_a, on_b, on_b_pfx, on_pod, outside6, outside4));
    drop((pod, rogue));
    drop(c);
    let left: Vec<String> = list_named()?
        .into_iter()
        .filter(|n| owned.contains(n))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn an_ipv4_vpc_turned_dual_stack_by_association_carries_ipv6_for_nodes_booted_after(
) -> anyhow::Result<()> {
    if skip_netns_test("dual-stack association scenario") {
        return Ok(());
    }
    let c = SimCluster::new(SimConfig {
        seed: 17,
        ..SimConfig::default()
    })?;
    let vpc = c.create_vpc("10.3.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.3.1.0/24")?;
    let before = c.run_instance(&s, "t3.medium")?;
    ensure!(before.primary_ipv6.is_none() && before.subnet6.is_none());
    let v56 = c.associate_vpc_ipv6(&vpc)?;
    let net = c.associate_subnet_ipv6(&s, 3)?;
    ensure!(v56.contains_block(&net) && net.len == 64, "{net} in {v56}");
    ensure!(c.fabric.vpc_cidrs6() == vec![v56]);
    let node = c.run_instance_ipv6(&s, "t3.medium")?;
    c.check_hooks()?;
    ensure!(node.subnet6 == Some(net), "node's /64: {:?}", node.subnet6);
    let v6 = node.primary_ipv6.context("IPv6 at launch")?;
    let ns = node.netns()?;
    let out_ns = c.fabric.outside_ns()?;
    let outside6 = UdpListener::start_any(&out_ns, sa6(OUTSIDE_ADDR6, PORT))?;
    let seen = expect_echo(
        udp_probe_any(&ns, None, outside6.socket_addr(), WAIT)?,
        "dual-stack node to the IPv6 outside",
    )?;
    assert_eq!(seen, IpAddr::V6(v6));
    // The node booted before the association has no IPv6 route: the network says so at once.
    match udp_probe_any(&before.netns()?, None, outside6.socket_addr(), WAIT)? {
        ProbeOutcome::Unreachable(_) => {}
        other => bail!("node booted before the /64 reached the IPv6 outside: {other:?}"),
    }
    Ok(())
}
