//! Pod wiring with the real netlink implementation, in namespaces each test creates ("host"
//! stands in for the node, "pod" for the sandbox). Skips when not root.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::netlink::LinkWatch;
use vpc_cni_net::pod::{PodDrift, SetupStep};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{
    sysctl, Family, IpCidr, Netlink, NetlinkPodNetwork, Netns, PodNetwork, PodSpec, Rule, Scope,
    VethEnd,
};

fn spec(pod: &TestNetns, name: &str, ip: Ipv4Addr, table: u32) -> PodSpec {
    PodSpec {
        netns: pod.path().to_path_buf(),
        host_veth: host_veth_name("eni", "default", name, 0),
        container_ifname: "eth0".into(),
        index: 0,
        ipv4: ip,
        mtu: 9001,
        route_table: table,
    }
}

fn ping(ns: &TestNetns, target: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns.name(), "ping", "-c1", "-W1", target])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn host_rules_for(rules: &[Rule], ip: IpCidr) -> Vec<Rule> {
    rules
        .iter()
        .filter(|r| r.from == Some(ip) || r.to == Some(ip))
        .cloned()
        .collect()
}

#[tokio::test]
async fn setup_builds_exactly_the_reference_wiring_and_teardown_removes_the_host_side() {
    if skip_netns_test("setup_builds_exactly_the_reference_wiring") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let s = spec(&pod, "web-0", Ipv4Addr::new(10, 0, 1, 5), 2);
    let w = net.setup_pod(&s).await.expect("setup");
    assert_eq!(w.host_veth, "eni0d7763386da");

    let h = Netlink::open(&host).expect("host nl");
    let p = Netlink::open(&pod).expect("pod nl");
    let ip = IpCidr::host_v4(s.ipv4);
    let gw: IpAddr = Ipv4Addr::new(169, 254, 1, 1).into();

    // Host end: name, explicit MAC, MTU, up, a veth.
    let hl = h.require_link("eni0d7763386da").await.expect("host veth");
    assert_eq!(hl.mac, Some(w.host_mac));
    assert!(w.host_mac.is_local_unicast());
    assert_eq!(hl.mtu, 9001);
    assert!(hl.up);
    assert_eq!(hl.kind.as_deref(), Some("veth"));
    assert!(
        h.addresses(Some(hl.index))
            .await
            .expect("addrs")
            .iter()
            .all(|a| a.cidr.family() == Family::V6),
        "the host veth gets no IPv4 address"
    );

    // Pod end: eth0, up, MTU, exactly the /32.
    let cl = p.require_link("eth0").await.expect("eth0");
    assert!(cl.up);
    assert_eq!(cl.mtu, 9001);
    let v4: Vec<IpCidr> = p
        .addresses(Some(cl.index))
        .await
        .expect("addrs")
        .into_iter()
        .filter(|a| a.cidr.family() == Family::V4)
        .map(|a| a.cidr)
        .collect();
    assert_eq!(v4, vec![ip]);

    // Pod routes: gw/32 scope link and default via gw, both on eth0 in main.
    let routes = p.routes(Family::V4, Some(254)).await.expect("routes");
    assert!(
        routes.iter().any(|r| r.dst == IpCidr::host(gw)
            && r.scope == Scope::Link
            && r.oif == Some(cl.index)),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r.dst.prefix_len == 0 && r.gateway == Some(gw) && r.oif == Some(cl.index)),
        "{routes:?}"
    );

    // Permanent neighbour: the gateway resolves to the host veth's MAC.
    let neigh = p
        .neighbours(Family::V4, Some(cl.index))
        .await
        .expect("neigh");
    let n = neigh
        .iter()
        .find(|n| n.ip == gw)
        .expect("gateway neighbour");
    assert!(n.permanent);
    assert_eq!(n.mac, Some(hl.mac.expect("mac")));

    // Host route and rules.
    let hroutes = h.routes(Family::V4, Some(254)).await.expect("routes");
    assert!(
        hroutes
            .iter()
            .any(|r| r.dst == ip && r.scope == Scope::Link && r.oif == Some(hl.index)),
        "{hroutes:?}"
    );
    let rules = host_rules_for(&h.rules(Family::V4).await.expect("rules"), ip);
    assert_eq!(
        rules,
        vec![
            Rule::new(Family::V4, 512, 254).to(ip),
            Rule::new(Family::V4, 1536, 2).from(ip),
        ]
    );

    // IPv6 sysctls of the host veth, written before link-up (skipped without IPv6).
    if let Ok(ra) = sysctl::read(&host, "net/ipv6/conf/eni0d7763386da/accept_ra") {
        assert_eq!(ra, "0");
        assert_eq!(
            sysctl::read(&host, "net/ipv6/conf/eni0d7763386da/accept_redirects").expect("r"),
            "1"
        );
        assert_eq!(
            sysctl::read(&host, "net/ipv6/conf/eni0d7763386da/forwarding").expect("r"),
            "0"
        );
    }

    assert_eq!(net.check_pod(&s).await.expect("check"), vec![]);

    // The root namespace got nothing.
    let root = Netlink::current().expect("root nl");
    assert!(root
        .link_by_name("eni0d7763386da")
        .await
        .expect("root")
        .is_none());

    // A stale CIDR-scoped copy from an old plugin goes too.
    let stale = Rule::new(Family::V4, 1536, 2)
        .from(ip)
        .to("10.0.0.0/16".parse().expect("cidr"));
    assert!(h.rule_add(&stale).await.expect("stale"));
    assert!(!h.rule_add(&stale).await.expect("EEXIST tolerated"));

    let r = net.teardown_pod(&s.teardown()).await.expect("teardown");
    assert_eq!(r.rules_deleted, 3);
    assert!(r.host_route_deleted);
    assert!(host_rules_for(&h.rules(Family::V4).await.expect("rules"), ip).is_empty());
    assert!(!h
        .routes(Family::V4, Some(254))
        .await
        .expect("routes")
        .iter()
        .any(|r| r.dst == ip));
    let drift = net.check_pod(&s).await.expect("check");
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, PodDrift::MissingRule { .. })),
        "{drift:?}"
    );

    let again = net
        .teardown_pod(&s.teardown())
        .await
        .expect("teardown twice");
    assert_eq!(again.rules_deleted, 0);
    assert!(!again.host_route_deleted);
}

#[tokio::test]
async fn teardown_works_after_the_pod_namespace_is_gone() {
    if skip_netns_test("teardown_works_after_the_pod_namespace_is_gone") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let s = spec(&pod, "gone-0", Ipv4Addr::new(10, 0, 2, 9), 3);
    net.setup_pod(&s).await.expect("setup");
    pod.delete().expect("delete pod ns");
    let r = net.teardown_pod(&s.teardown()).await.expect("teardown");
    assert_eq!(r.rules_deleted, 2);
    let h = Netlink::open(&host).expect("nl");
    assert!(host_rules_for(
        &h.rules(Family::V4).await.expect("rules"),
        IpCidr::host_v4(s.ipv4)
    )
    .is_empty());
    net.teardown_pod(&s.teardown())
        .await
        .expect("teardown twice");
    assert!(net
        .check_pod(&s)
        .await
        .expect_err("no netns")
        .is_not_found());
}

async fn assert_nothing_left(host: &Netns, pod: &Netns, s: &PodSpec) {
    let h = Netlink::open(host).expect("host nl");
    let p = Netlink::open(pod).expect("pod nl");
    let ip = IpCidr::host_v4(s.ipv4);
    assert!(
        h.link_by_name(&s.host_veth).await.expect("get").is_none(),
        "host veth left"
    );
    let pod_links: Vec<String> = p
        .links()
        .await
        .expect("links")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(pod_links, vec!["lo".to_string()]);
    assert!(
        host_rules_for(&h.rules(Family::V4).await.expect("rules"), ip).is_empty(),
        "host rules left"
    );
    assert!(
        host_rules_for(&p.rules(Family::V4).await.expect("rules"), ip).is_empty(),
        "pod rules left"
    );
    assert!(
        !h.routes(Family::V4, None)
            .await
            .expect("routes")
            .iter()
            .any(|r| r.dst == ip),
        "host route left"
    );
}

#[tokio::test]
async fn a_failure_at_any_setup_step_leaves_nothing_behind() {
    if skip_netns_test("a_failure_at_any_setup_step_leaves_nothing_behind") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    // Interface index 1 exercises the pod-side rule and a non-main pod table as well.
    let mut s = spec(&pod, "fail-0", Ipv4Addr::new(10, 0, 3, 7), 10100);
    s.index = 1;
    s.container_ifname = "mNicIf1".into();
    for step in SetupStep::for_family(Family::V4) {
        let net = NetlinkPodNetwork::new(host.try_clone().expect("dup"))
            .expect("net")
            .with_fault(Some(step));
        let err = net.setup_pod(&s).await.expect_err("injected");
        assert!(err.to_string().contains(&step.to_string()), "{step}: {err}");
        assert_nothing_left(&host, &pod, &s).await;
    }
    // A real kernel error mid-way (the container name is taken) is rolled back the same way.
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let mut taken = s.clone();
    taken.container_ifname = "lo".into();
    net.setup_pod(&taken).await.expect_err("name taken");
    assert_nothing_left(&host, &pod, &s).await;
    // And after all that the same pod still wires cleanly, pod rule included.
    let w = net.setup_pod(&s).await.expect("clean setup");
    assert_eq!(w.gateway, IpAddr::V4(Ipv4Addr::new(169, 254, 1, 2)));
    let p = Netlink::open(&pod).expect("nl");
    assert!(p
        .rules(Family::V4)
        .await
        .expect("rules")
        .contains(&Rule::new(Family::V4, 1, 1).from(IpCidr::host_v4(s.ipv4))));
    assert_eq!(net.check_pod(&s).await.expect("check"), vec![]);
}

#[tokio::test]
async fn re_adding_a_pod_with_the_same_name_replaces_the_old_veth() {
    if skip_netns_test("re_adding_a_pod_with_the_same_name_replaces_the_old_veth") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let old = TestNetns::new("pod").expect("pod ns");
    let new = TestNetns::new("pod").expect("pod ns");
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let s_old = spec(&old, "db-0", Ipv4Addr::new(10, 0, 4, 1), 254);
    let first = net.setup_pod(&s_old).await.expect("first");
    let s_new = spec(&new, "db-0", Ipv4Addr::new(10, 0, 4, 2), 254);
    let second = net.setup_pod(&s_new).await.expect("second");
    assert_eq!(first.host_veth, second.host_veth);
    assert_ne!(first.host_mac, second.host_mac);
    assert_eq!(net.check_pod(&s_new).await.expect("check"), vec![]);
    let h = Netlink::open(&host).expect("nl");
    let rules = h.rules(Family::V4).await.expect("rules");
    // main-table pods get no 1536 rule
    assert!(!rules.iter().any(|r| r.priority == 1536));
}

#[tokio::test]
async fn pods_and_host_ping_each_other_through_the_wiring() {
    if skip_netns_test("pods_and_host_ping_each_other_through_the_wiring") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let a = TestNetns::new("pod").expect("pod a");
    let b = TestNetns::new("pod").expect("pod b");
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let sa = spec(&a, "ping-a", Ipv4Addr::new(10, 0, 5, 10), 2);
    let sb = spec(&b, "ping-b", Ipv4Addr::new(10, 0, 5, 11), 254);
    net.setup_pod(&sa).await.expect("a");
    net.setup_pod(&sb).await.expect("b");
    // The node's own address (its eth0 in production) on the test host's loopback.
    let h = Netlink::open(&host).expect("nl");
    let lo = h.require_link("lo").await.expect("lo");
    h.set_up(lo.index).await.expect("lo up");
    h.add_address(
        lo.index,
        "10.99.0.1/32".parse().expect("cidr"),
        Scope::Universe,
    )
    .await
    .expect("node ip");
    sysctl::write(&host, "net/ipv4/ip_forward", "1").expect("forwarding in the test host ns");

    assert!(ping(&host, "10.0.5.10"), "host -> pod a");
    assert!(ping(&host, "10.0.5.11"), "host -> pod b");
    assert!(ping(&a, "10.99.0.1"), "pod a -> host");
    assert!(ping(&a, "10.0.5.11"), "pod a -> pod b");
    assert!(ping(&b, "10.0.5.10"), "pod b -> pod a");

    net.teardown_pod(&sb.teardown()).await.expect("del b");
    assert!(!ping(&host, "10.0.5.11"), "pod b unreachable after DEL");
}

#[test]
fn a_guard_enters_and_restores_and_run_uses_its_own_thread() {
    if skip_netns_test("a_guard_enters_and_restores") {
        return;
    }
    let ns = TestNetns::new("guard").expect("ns");
    let before = Netns::current().expect("cur").id().expect("id");
    {
        let _g = ns.enter().expect("enter");
        assert!(ns.is_current().expect("cur"));
    }
    assert_eq!(Netns::current().expect("cur").id().expect("id"), before);
    let inside = ns
        .run(|| Netns::current().and_then(|n| n.id()))
        .expect("run")
        .expect("id");
    assert_eq!(inside, ns.id().expect("id"));
    assert_eq!(Netns::current().expect("cur").id().expect("id"), before);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let ns2 = ns.try_clone().expect("dup");
    let inside = rt
        .block_on(ns2.run_async(|| Netns::current().and_then(|n| n.id())))
        .expect("run_async")
        .expect("id");
    assert_eq!(inside, ns.id().expect("id"));
    assert!(vpc_cni_net::netns::list_named()
        .expect("list")
        .contains(&ns.name().to_string()));
    let name = ns.name().to_string();
    drop(ns2);
    drop(ns);
    assert!(!vpc_cni_net::netns::list_named()
        .expect("list")
        .contains(&name));
}

#[test]
fn a_panicking_test_still_deletes_its_namespace() {
    if skip_netns_test("a_panicking_test_still_deletes_its_namespace") {
        return;
    }
    let name = std::panic::catch_unwind(|| {
        let ns = TestNetns::new("panic").expect("ns");
        let name = ns.name().to_string();
        std::panic::panic_any(name);
    })
    .expect_err("panicked");
    let name = name.downcast::<String>().expect("name");
    assert!(!vpc_cni_net::netns::list_named()
        .expect("list")
        .contains(&name));
}

#[tokio::test]
async fn the_container_end_is_born_in_the_pod_namespace_and_never_appears_on_the_host() {
    if skip_netns_test("the_container_end_is_born_in_the_pod_namespace") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let mut host_watch = LinkWatch::open(&host).expect("host watch");
    let mut pod_watch = LinkWatch::open(&pod).expect("pod watch");
    let s = spec(&pod, "born-0", Ipv4Addr::new(10, 0, 6, 1), 2);
    let w = net.setup_pod(&s).await.expect("setup");

    // Created on the host and then moved, eth0 would have been announced (RTM_NEWLINK) and
    // withdrawn (RTM_DELLINK) in the host namespace; created in the pod and the host end
    // moved, the host veth's name would show up in the pod namespace.
    let host_events = host_watch.events().await.expect("host events");
    assert!(
        host_events
            .iter()
            .any(|e| e.new && e.name == w.host_veth && e.index == w.host_ifindex),
        "the host end appears on the host: {host_events:?}"
    );
    assert!(
        host_events.iter().all(|e| e.name == w.host_veth),
        "nothing but the host end ever appears on the host: {host_events:?}"
    );
    let pod_events = pod_watch.events().await.expect("pod events");
    assert!(
        pod_events
            .iter()
            .any(|e| e.new && e.name == "eth0" && e.index == w.container_ifindex),
        "eth0 appears in the pod: {pod_events:?}"
    );
    assert!(
        pod_events.iter().all(|e| e.name == "eth0") && pod_events.iter().all(|e| e.new),
        "nothing but eth0 appears in the pod, and nothing leaves it: {pod_events:?}"
    );
    assert_eq!(net.check_pod(&s).await.expect("check"), vec![]);
}

#[tokio::test]
async fn add_and_del_among_many_unrelated_links_and_rules_are_exact_and_dump_nothing() {
    if skip_netns_test("add_and_del_among_many_unrelated_links_and_rules") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let h = Netlink::open(&host).expect("host nl");
    // 300 unrelated links (150 veth pairs) and other pods' rules on the node, some for the
    // same table as ours.
    let mut others = Vec::new();
    for i in 0..150u32 {
        let end = |n: String| VethEnd {
            name: n,
            mtu: 1500,
            mac: None,
            up: false,
        };
        h.add_veth(&end(format!("xa{i}")), &end(format!("xb{i}")), None)
            .await
            .expect("unrelated veth");
        let ip = IpCidr::host_v4(Ipv4Addr::new(10, 7, (i / 200) as u8, (i % 200) as u8 + 1));
        for r in [
            Rule::new(Family::V4, 512, 254).to(ip),
            Rule::new(Family::V4, 1536, 2).from(ip),
        ] {
            assert!(h.rule_add(&r).await.expect("other pod's rule"));
            others.push(r);
        }
    }
    let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("net");
    let s = spec(&pod, "crowd-0", Ipv4Addr::new(10, 0, 7, 9), 2);
    let w = net.setup_pod(&s).await.expect("setup");
    assert_eq!(
        net.dump_requests(),
        0,
        "ADD reads no whole table (links, rules, routes, neighbours)"
    );
    assert_eq!(net.check_pod(&s).await.expect("check"), vec![]);
    let hl = h.require_link(&s.host_veth).await.expect("host veth");
    assert_eq!((hl.index, hl.mac), (w.host_ifindex, Some(w.host_mac)));

    let before = net.dump_requests();
    let r = net.teardown_pod(&s.teardown()).await.expect("teardown");
    assert_eq!(net.dump_requests(), before, "DEL reads no whole table");
    assert_eq!(r.rules_deleted, 2);
    assert!(r.host_route_deleted);
    let left = h.rules(Family::V4).await.expect("rules");
    assert!(host_rules_for(&left, IpCidr::host_v4(s.ipv4)).is_empty());
    for o in &others {
        assert!(left.contains(o), "another pod's rule survives: {o}");
    }
    assert_eq!(h.links().await.expect("links").len(), 301 + 1);
}
