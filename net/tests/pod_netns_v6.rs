//! IPv6 pod wiring (spec cni.md 2.5) with the real netlink implementation, in namespaces each
//! test creates ("host" stands in for the node, "pod" for the sandbox). Skips when not root.

use std::net::IpAddr;
use std::process::Command;

use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::pod::SetupStep;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{
    sysctl, Family, IpCidr, Netlink, NetlinkPodNetwork, Netns, PodIfSpec, PodNetwork, Rule, Scope,
};

fn spec(pod: &TestNetns, name: &str, ip: &str, table: u32) -> PodIfSpec {
    PodIfSpec {
        netns: pod.path().to_path_buf(),
        host_veth: host_veth_name("eni", "default", name, 0),
        container_ifname: "eth0".into(),
        index: 0,
        ip: ip.parse().expect("ip"),
        mtu: 9001,
        route_table: table,
    }
}

fn ping6(ns: &TestNetns, target: &str) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-6",
            "-c1",
            "-W2",
            target,
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn rules_for(rules: &[Rule], ip: IpCidr) -> Vec<Rule> {
    rules
        .iter()
        .filter(|r| r.from == Some(ip) || r.to == Some(ip))
        .cloned()
        .collect()
}

/// A pod namespace whose IPv6 starts disabled, as with `DISABLE_POD_V6`-style runtimes or a
/// node default of 1: the wiring must turn it on where the reference does.
fn pod_ns_with_v6_off() -> TestNetns {
    let pod = TestNetns::new("pod6").expect("pod ns");
    for k in [
        "net/ipv6/conf/default/disable_ipv6",
        "net/ipv6/conf/lo/disable_ipv6",
    ] {
        sysctl::write(&pod, k, "1").expect("v6 off in the pod ns");
    }
    pod
}

#[tokio::test]
async fn ipv6_setup_builds_the_reference_wiring_and_teardown_removes_the_host_side() {
    if skip_netns_test("ipv6_setup_builds_the_reference_wiring") {
        return;
    }
    let host = TestNetns::new("host6").expect("host ns");
    let pod = pod_ns_with_v6_off();
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let s = spec(&pod, "web-0", "2001:db8:1:2:5::a", 254);
    let w = net.setup_interface(&s).await.expect("setup");
    let gw: IpAddr = "fe80::1".parse().expect("gw");
    assert_eq!(w.gateway, gw);
    assert_eq!(w.ip, s.ip);

    let h = Netlink::open(&host).expect("host nl");
    let p = Netlink::open(&pod).expect("pod nl");
    let ip = IpCidr::host(s.ip);
    let hl = h.require_link(&s.host_veth).await.expect("host veth");
    let cl = p.require_link("eth0").await.expect("eth0");
    assert_eq!(hl.mac, Some(w.host_mac));
    assert!(hl.up && cl.up);

    // IPv6 turned on for the interface and lo; the host veth's sysctls as for IPv4.
    assert_eq!(
        sysctl::read(&pod, "net/ipv6/conf/eth0/disable_ipv6").expect("r"),
        "0"
    );
    assert_eq!(
        sysctl::read(&pod, "net/ipv6/conf/lo/disable_ipv6").expect("r"),
        "0"
    );
    let hk = |k: &str| format!("net/ipv6/conf/{}/{k}", s.host_veth);
    assert_eq!(sysctl::read(&host, &hk("accept_ra")).expect("r"), "0");
    assert_eq!(
        sysctl::read(&host, &hk("accept_redirects")).expect("r"),
        "1"
    );
    assert_eq!(sysctl::read(&host, &hk("forwarding")).expect("r"), "0");

    // Exactly the /128 as global address, and DAD over when ADD returns.
    let globals: Vec<IpCidr> = p
        .addresses(Some(cl.index))
        .await
        .expect("addrs")
        .into_iter()
        .filter(|a| a.cidr.family() == Family::V6 && a.scope == Scope::Universe)
        .map(|a| a.cidr)
        .collect();
    assert_eq!(globals, vec![ip]);
    // The /128 is usable when ADD returns: added without DAD (nothing to be duplicate of),
    // and the host veth's link-local answers at once.
    let unsettled = p.unsettled_v6_addresses(cl.index).await.expect("flags");
    assert!(
        unsettled.iter().all(|(a, _)| a.addr != ip.addr),
        "the pod's address is not tentative: {unsettled:?}"
    );
    assert_eq!(sysctl::read(&host, &hk("accept_dad")).expect("r"), "0");

    // Pod routes: fe80::1/128 dev eth0 and default via fe80::1 dev eth0, in main.
    let routes = p.routes(Family::V6, Some(254)).await.expect("routes");
    assert!(
        routes
            .iter()
            .any(|r| r.dst == IpCidr::host(gw) && r.gateway.is_none() && r.oif == Some(cl.index)),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r.dst.prefix_len == 0 && r.gateway == Some(gw) && r.oif == Some(cl.index)),
        "{routes:?}"
    );

    // Permanent neighbour fe80::1 -> host veth MAC.
    let neigh = p
        .neighbours(Family::V6, Some(cl.index))
        .await
        .expect("neigh");
    let n = neigh
        .iter()
        .find(|n| n.ip == gw)
        .expect("gateway neighbour");
    assert!(n.permanent);
    assert_eq!(n.mac, hl.mac);

    // Host: <ip>/128 dev hostVeth in main, inet6 rule to <ip> lookup main at 512, nothing else.
    let hroutes = h.routes(Family::V6, Some(254)).await.expect("routes");
    assert!(
        hroutes
            .iter()
            .any(|r| r.dst == ip && r.oif == Some(hl.index)),
        "{hroutes:?}"
    );
    let rules = rules_for(&h.rules(Family::V6).await.expect("rules"), ip);
    assert_eq!(rules, vec![Rule::new(Family::V6, 512, 254).to(ip)]);
    assert!(h
        .rules(Family::V4)
        .await
        .expect("v4 rules")
        .iter()
        .all(|r| r.priority != 512));

    assert_eq!(net.check_interface(&s).await.expect("check"), vec![]);

    // DEL: the host side goes, twice is fine, the veth stays for the runtime.
    let r = net.teardown_pod(&s.teardown()).await.expect("del");
    assert_eq!(r.rules_deleted, 1);
    assert!(r.host_route_deleted);
    assert!(rules_for(&h.rules(Family::V6).await.expect("rules"), ip).is_empty());
    assert!(!h
        .routes(Family::V6, None)
        .await
        .expect("routes")
        .iter()
        .any(|x| x.dst == ip));
    let r2 = net.teardown_pod(&s.teardown()).await.expect("del twice");
    assert_eq!(r2.rules_deleted, 0);
    assert!(!r2.host_route_deleted);
    let drift = net.check_interface(&s).await.expect("check after del");
    assert_eq!(drift.len(), 2, "{drift:?}");
}

async fn assert_nothing_left(host: &Netns, pod: &Netns, s: &PodIfSpec) {
    let h = Netlink::open(host).expect("host nl");
    let p = Netlink::open(pod).expect("pod nl");
    let ip = IpCidr::host(s.ip);
    assert!(h.link_by_name(&s.host_veth).await.expect("get").is_none());
    let names: Vec<String> = p
        .links()
        .await
        .expect("links")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, vec!["lo".to_string()]);
    for nl in [&h, &p] {
        assert!(rules_for(&nl.rules(Family::V6).await.expect("rules"), ip).is_empty());
        assert!(!nl
            .routes(Family::V6, None)
            .await
            .expect("routes")
            .iter()
            .any(|r| r.dst == ip));
    }
}

#[tokio::test]
async fn an_ipv6_failure_at_any_step_leaves_nothing_behind() {
    if skip_netns_test("an_ipv6_failure_at_any_step_leaves_nothing_behind") {
        return;
    }
    let host = TestNetns::new("host6").expect("host ns");
    let pod = TestNetns::new("pod6").expect("pod ns");
    // Index 1 on a secondary-ENI table: the pod rule and the 1536 rule, both inet6.
    let mut s = spec(&pod, "fail-6", "2001:db8:1:2:5::b", 10100);
    s.index = 1;
    s.container_ifname = "mNicIf1".into();
    for step in SetupStep::for_family(Family::V6) {
        let net = NetlinkPodNetwork::new(host.try_clone().expect("dup"))
            .expect("net")
            .with_fault(Some(step));
        let err = net.setup_interface(&s).await.expect_err("injected");
        assert!(err.to_string().contains(&step.to_string()), "{step}: {err}");
        assert_nothing_left(&host, &pod, &s).await;
    }
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let w = net.setup_interface(&s).await.expect("clean setup");
    assert_eq!(w.gateway, "fe80::2".parse::<IpAddr>().expect("gw"));
    let p = Netlink::open(&pod).expect("nl");
    assert!(p
        .rules(Family::V6)
        .await
        .expect("rules")
        .contains(&Rule::new(Family::V6, 1, 1).from(IpCidr::host(s.ip))));
    let h = Netlink::open(&host).expect("nl");
    assert_eq!(
        rules_for(
            &h.rules(Family::V6).await.expect("rules"),
            IpCidr::host(s.ip)
        ),
        vec![
            Rule::new(Family::V6, 512, 254).to(IpCidr::host(s.ip)),
            Rule::new(Family::V6, 1536, 10100).from(IpCidr::host(s.ip)),
        ]
    );
    assert_eq!(net.check_interface(&s).await.expect("check"), vec![]);
    assert_eq!(
        net.teardown_pod(&s.teardown())
            .await
            .expect("del")
            .rules_deleted,
        2
    );
}

#[tokio::test]
async fn ipv6_pods_and_host_ping_each_other_through_the_wiring() {
    if skip_netns_test("ipv6_pods_and_host_ping_each_other") {
        return;
    }
    let host = TestNetns::new("host6").expect("host ns");
    let a = pod_ns_with_v6_off();
    let b = TestNetns::new("pod6").expect("pod b");
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let sa = spec(&a, "ping6-a", "2001:db8:1:2:5::10", 254);
    let sb = spec(&b, "ping6-b", "2001:db8:1:2:5::11", 254);
    net.setup_interface(&sa).await.expect("a");
    net.setup_interface(&sb).await.expect("b");
    // The node's own address on the test host's loopback, and forwarding as the init
    // container sets it (all/forwarding=1), in the test namespace only.
    let h = Netlink::open(&host).expect("nl");
    let lo = h.require_link("lo").await.expect("lo");
    h.set_up(lo.index).await.expect("lo up");
    h.add_address(
        lo.index,
        "2001:db8:ff::1/128".parse().expect("cidr"),
        Scope::Universe,
    )
    .await
    .expect("node ip");
    sysctl::write(&host, "net/ipv6/conf/all/forwarding", "1").expect("v6 forwarding");
    // all/forwarding=1 copies itself to every interface; the reference's per-veth 0 again.
    for s in [&sa, &sb] {
        sysctl::write(
            &host,
            &format!("net/ipv6/conf/{}/forwarding", s.host_veth),
            "0",
        )
        .expect("veth forwarding");
    }

    assert!(ping6(&host, "2001:db8:1:2:5::10"), "host -> pod a");
    assert!(ping6(&host, "2001:db8:1:2:5::11"), "host -> pod b");
    assert!(ping6(&a, "2001:db8:ff::1"), "pod a -> host");
    assert!(ping6(&a, "2001:db8:1:2:5::11"), "pod a -> pod b");
    assert!(ping6(&b, "2001:db8:1:2:5::10"), "pod b -> pod a");

    net.teardown_pod(&sb.teardown()).await.expect("del b");
    assert!(
        !ping6(&host, "2001:db8:1:2:5::11"),
        "pod b unreachable after DEL"
    );
}
