//! IPv6 pods with the built binary (root only; skipped otherwise): an in-process ipamd that
//! answers as ipamd's IPv6 mode does (`IPv4Addr` empty, a /128 from the node's /80 in
//! `IPv6Addr`, device 0, table main), the plugin run inside a test "node" namespace, every
//! address, route, neighbour and rule read back with netlink, ping6 node→pod and pod→pod.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use common::*;
use serde_json::json;
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Family, IpCidr, Netlink, Netns, Rule, Scope, MAIN_TABLE};
use vpc_cni_plugin::memory::MemoryIpam;

/// Makes `host` an IPv6 node: loopback up with `2001:db8:ff::1/128`, forwarding on as the
/// init container sets it (`all/forwarding=1`). Changes only that test namespace.
fn make_v6_node(host: &TestNetns) {
    for args in [
        &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"][..],
        &["ip", "link", "set", "lo", "up"],
        &["ip", "-6", "addr", "add", "2001:db8:ff::1/128", "dev", "lo"],
    ] {
        let o = sh_in(host.name(), args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn ping6(from: &str, to: Ipv6Addr) -> bool {
    sh_in(from, &["ping", "-6", "-c", "1", "-W", "2", &to.to_string()])
        .status
        .success()
}

/// Exactly the reference's IPv6 wiring of one pod (spec 2.5).
fn assert_wired_v6(host: &Netns, pod: &Netns, veth: &str, ip: Ipv6Addr) {
    rt().block_on(async {
        let h = Netlink::open(host).expect("host nl");
        let p = Netlink::open(pod).expect("pod nl");
        let ip = IpCidr::host(IpAddr::V6(ip));
        let gw: IpAddr = "fe80::1".parse().expect("gw");
        let hl = h.require_link(veth).await.expect("host veth");
        let cl = p.require_link("eth0").await.expect("eth0");
        assert!(hl.up && cl.up);
        let globals: Vec<IpCidr> = p
            .addresses(Some(cl.index))
            .await
            .expect("addrs")
            .into_iter()
            .filter(|a| a.cidr.family() == Family::V6 && a.scope == Scope::Universe)
            .map(|a| a.cidr)
            .collect();
        assert_eq!(globals, vec![ip]);
        // The pod's /128 is added without DAD: usable when ADD returns.
        assert!(p
            .unsettled_v6_addresses(cl.index)
            .await
            .expect("dad")
            .iter()
            .all(|(a, _)| a.addr != ip.addr));
        let routes = p
            .routes(Family::V6, Some(MAIN_TABLE))
            .await
            .expect("routes");
        assert!(routes
            .iter()
            .any(|r| r.dst == IpCidr::host(gw) && r.oif == Some(cl.index) && r.gateway.is_none()));
        assert!(routes
            .iter()
            .any(|r| r.dst.prefix_len == 0 && r.gateway == Some(gw) && r.oif == Some(cl.index)));
        let n: Vec<_> = p
            .neighbours(Family::V6, Some(cl.index))
            .await
            .expect("neigh")
            .into_iter()
            .filter(|n| n.ip == gw)
            .collect();
        assert_eq!(n.len(), 1);
        assert!(n[0].permanent);
        assert_eq!(n[0].mac, hl.mac);
        let hr: Vec<_> = h
            .routes(Family::V6, Some(MAIN_TABLE))
            .await
            .expect("routes")
            .into_iter()
            .filter(|r| r.dst == ip)
            .collect();
        assert_eq!(hr.len(), 1);
        assert_eq!(hr[0].oif, Some(hl.index));
        let rules: Vec<Rule> = h
            .rules(Family::V6)
            .await
            .expect("rules")
            .into_iter()
            .filter(|r| r.to == Some(ip) || r.from == Some(ip))
            .collect();
        assert_eq!(rules, vec![Rule::new(Family::V6, 512, MAIN_TABLE).to(ip)]);
    });
}

/// The IPv6 pod rules (512/1536) and /128 host routes left in `host`.
fn v6_leftovers(host: &Netns) -> Vec<String> {
    rt().block_on(async {
        let h = Netlink::open(host).expect("nl");
        let mut out: Vec<String> = h
            .rules(Family::V6)
            .await
            .expect("rules")
            .into_iter()
            .filter(|r| r.priority == 512 || r.priority == 1536)
            .map(|r| r.to_string())
            .collect();
        out.extend(
            h.routes(Family::V6, Some(MAIN_TABLE))
                .await
                .expect("routes")
                .into_iter()
                // The pods' /128s: not link-local, not the node's own address on lo.
                .filter(|r| {
                    r.dst.prefix_len == 128
                        && !r.dst.addr.to_string().starts_with("fe80")
                        && r.dst.addr.to_string() != "2001:db8:ff::1"
                })
                .map(|r| format!("{r:?}")),
        );
        out
    })
}

#[test]
fn ipv6_pods_add_check_ping_del_with_the_binary_and_leave_nothing_behind() {
    if skip_netns_test("ipv6_pods") {
        return;
    }
    let host = TestNetns::new("node6").expect("node ns");
    make_v6_node(&host);
    let ipamd = TestIpamd::start(MemoryIpam::pool_v6(
        "2001:db8:1:2:3::20".parse().expect("base"),
        6,
    ));
    let mut pods = Vec::new();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let ns = TestNetns::new("pod6").expect("pod ns");
        let name = format!("v6-{i}");
        let container = format!("c6-{i}");
        let conf = conf(version, &ipamd.socket);
        let r = plugin(
            &host,
            &cni_env("ADD", &container, &ns_path(&ns), &name),
            &conf,
        );
        assert_eq!(r.code, 0, "ADD {i}: {} {}", r.stdout, r.stderr);
        let res = r.json.expect("result");
        let veth = host_veth_name("eni", "default", &name, 0);
        assert_eq!(res["interfaces"][0]["name"], veth.as_str());
        assert_eq!(
            res["interfaces"][1],
            json!({"name": "eth0", "mac": "254", "sandbox": ns_path(&ns)})
        );
        let addr = res["ips"][0]["address"]
            .as_str()
            .expect("address")
            .to_string();
        assert!(addr.ends_with("/128"), "{addr}");
        if *version == "0.4.0" {
            assert_eq!(res["ips"][0]["version"], "6");
        }
        let ip: Ipv6Addr = addr.trim_end_matches("/128").parse().expect("ip");
        assert_wired_v6(&host, &ns, &veth, ip);
        let chk = plugin(
            &host,
            &cni_env("CHECK", &container, &ns_path(&ns), &name),
            &with_prev(conf.clone(), &res),
        );
        assert_eq!(
            (chk.code, chk.json.clone()),
            (0, None),
            "CHECK {i}: {}",
            chk.stderr
        );
        pods.push((ns, name, container, ip, conf, res));
    }
    let node: Ipv6Addr = "2001:db8:ff::1".parse().expect("node");
    for (ns, _, _, ip, _, _) in &pods {
        assert!(ping6(host.name(), *ip), "node -> pod {ip}");
        assert!(ping6(ns.name(), node), "pod {ip} -> node");
        let other = pods
            .iter()
            .map(|p| p.3)
            .find(|o| o != ip)
            .expect("another pod");
        assert!(ping6(ns.name(), other), "pod {ip} -> pod {other}");
    }
    // CHECK sees drift when the host rule is flushed behind the plugin's back.
    let (ns0, name0, c0, ip0, conf0, res0) = &pods[0];
    let rule = Rule::new(Family::V6, 512, MAIN_TABLE).to(IpCidr::host(IpAddr::V6(*ip0)));
    rt().block_on(async {
        let h = Netlink::open(&host).expect("nl");
        assert!(h.rule_delete(&rule).await.expect("flush"));
    });
    let chk = plugin(
        &host,
        &cni_env("CHECK", c0, &ns_path(ns0), name0),
        &with_prev(conf0.clone(), res0),
    );
    assert_ne!(chk.code, 0, "CHECK must see the missing rule");
    assert!(chk.stdout.contains("512"), "{}", chk.stdout);
    for (ns, name, container, _, conf, res) in &pods {
        let del = plugin(
            &host,
            &cni_env("DEL", container, &ns_path(ns), name),
            &with_prev(conf.clone(), res),
        );
        assert_eq!(
            (del.code, del.json.clone()),
            (0, None),
            "DEL: {}",
            del.stderr
        );
        let again = plugin(
            &host,
            &cni_env("DEL", container, "", name),
            &with_prev(conf.clone(), res),
        );
        assert_eq!(again.code, 0, "second DEL: {}", again.stdout);
    }
    assert_eq!(v6_leftovers(&host), Vec::<String>::new());
    assert_eq!(ipamd.ipam.assigned(), 0);
    drop(pods);
    eventually("host veths to die with their pod namespaces", || {
        host_links(&host).is_empty()
    });
}

#[test]
fn ipv6_del_without_ipamd_removes_the_host_wiring_from_prev_result() {
    if skip_netns_test("ipv6_del_without_ipamd") {
        return;
    }
    let host = TestNetns::new("node6").expect("node ns");
    make_v6_node(&host);
    let ipamd = TestIpamd::start(MemoryIpam::pool_v6(
        "2001:db8:1:2:4::5".parse().expect("b"),
        1,
    ));
    let ns = TestNetns::new("pod6").expect("pod ns");
    let conf = conf("1.0.0", &ipamd.socket);
    let r = plugin(&host, &cni_env("ADD", "c1", &ns_path(&ns), "gone"), &conf);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let res = r.json.expect("result");
    assert_eq!(v6_leftovers(&host).len(), 2, "rule and route");
    drop(ipamd);
    let del = plugin(
        &host,
        &cni_env("DEL", "c1", &ns_path(&ns), "gone"),
        &with_prev(conf, &res),
    );
    assert_eq!(del.code, 0, "{}", del.stderr);
    assert_eq!(v6_leftovers(&host), Vec::<String>::new());
}
