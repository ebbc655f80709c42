//! Branch-ENI (security groups for pods) pods in real network namespaces (root only; skipped
//! otherwise): the built binary run inside a test "host" namespace holding a "trunk" link and
//! a "hot-plugged" branch ENI (a veth end carrying the branch MAC), an in-process ipamd
//! answering with a VLAN, and every link, rule and route of spec cni.md 2.6 read back.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use serde_json::{json, Value};
use vpc_cni_net::names::{dummy_interface_name, host_veth_name};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Family, IpCidr, Netlink, Netns, Route, MAIN_TABLE};
use vpc_cni_plugin::memory::{BranchReply, IpamCall};

const VLAN: u16 = 5;
const TABLE: u32 = 105;
const BRANCH_MAC: &str = "0a:00:00:00:00:05";
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 1);

fn ip_in(ns: &TestNetns, args: &[&str]) {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    let out = sh_in(ns.name(), &all);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node: a trunk link (its index is ipamd's ParentIfIndex).
fn node() -> (TestNetns, u32) {
    let host = TestNetns::new("host").expect("host ns");
    make_node(&host);
    ip_in(
        &host,
        &[
            "link", "add", "trunk0", "type", "veth", "peer", "name", "trunk0p",
        ],
    );
    let index = rt().block_on(async {
        Netlink::open(&host)
            .expect("netlink")
            .require_link("trunk0")
            .await
            .expect("trunk")
            .index
    });
    (host, index)
}

/// The fabric hot-plugs the branch ENI into the node: its own link with the branch MAC.
fn hot_plug(host: &TestNetns) {
    ip_in(
        host,
        &[
            "link", "add", "eni-br5", "address", BRANCH_MAC, "type", "veth", "peer", "name",
            "eni-br5p",
        ],
    );
    ip_in(host, &["link", "set", "eni-br5p", "up"]);
}

fn ipamd(base: Ipv4Addr, trunk: u32) -> TestIpamd {
    let ipamd = TestIpamd::with_pool(base, 2, -1, 0);
    ipamd.ipam.set_branch(Some(BranchReply {
        vlan_id: i32::from(VLAN),
        eni_mac: BRANCH_MAC.into(),
        subnet_gw: GW.to_string(),
        parent_if_index: i32::try_from(trunk).expect("index"),
    }));
    ipamd
}

fn branch_conf(ipamd: &TestIpamd, mode: &str) -> Value {
    let mut c = conf("1.0.0", &ipamd.socket);
    c["podSGEnforcingMode"] = json!(mode);
    c["branchLink"] = json!("hotplug");
    c
}

fn veth(mode: &str, pod: &str) -> String {
    host_veth_name(
        if mode == "strict" { "vlan" } else { "eni" },
        "default",
        pod,
        0,
    )
}

/// Everything of the branch pod on the host, as text: links named `vlan.eth.*`, the rules at
/// 10, 512 and 1536, the routes of table 105, and the /32 routes of main.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    vlan_links: Vec<String>,
    rules: Vec<String>,
    vlan_table: Vec<String>,
    main_host_routes: Vec<String>,
}

fn describe_route(r: &Route, names: &[(u32, String)]) -> String {
    let dev = r
        .oif
        .and_then(|i| names.iter().find(|(j, _)| *j == i))
        .map_or("?".to_string(), |(_, n)| n.clone());
    match r.gateway {
        Some(gw) => format!("{} via {gw} dev {dev}", r.dst),
        None => format!("{} dev {dev} {:?}", r.dst, r.scope),
    }
}

fn host_state(host: &Netns) -> HostState {
    rt().block_on(async {
        let h = Netlink::open(host).expect("netlink");
        let links = h.links().await.expect("links");
        let names: Vec<(u32, String)> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        let mut rules: Vec<String> = h
            .rules(Family::V4)
            .await
            .expect("rules")
            .into_iter()
            .filter(|r| [10, 512, 1536].contains(&r.priority))
            .map(|r| r.to_string())
            .collect();
        rules.sort();
        let mut vlan_table: Vec<String> = h
            .routes(Family::V4, Some(TABLE))
            .await
            .expect("routes")
            .iter()
            .map(|r| describe_route(r, &names))
            .collect();
        vlan_table.sort();
        let main_host_routes = h
            .routes(Family::V4, Some(MAIN_TABLE))
            .await
            .expect("routes")
            .iter()
            .filter(|r| r.dst.prefix_len == 32)
            .map(|r| describe_route(r, &names))
            .collect();
        HostState {
            vlan_links: links
                .iter()
                .filter(|l| l.name.starts_with("vlan.eth."))
                .map(|l| {
                    format!(
                        "{} {} up={}",
                        l.name,
                        l.mac.map(|m| m.to_string()).unwrap_or_default(),
                        l.up
                    )
                })
                .collect(),
            rules,
            vlan_table,
            main_host_routes,
        }
    })
}

/// What spec 2.6 says ADD builds on the host for pod address `ip` behind `veth`.
fn expected(mode: &str, veth: &str, ip: Ipv4Addr) -> HostState {
    let vlan = format!("vlan.eth.{VLAN}");
    let mut vlan_table = vec![
        format!("{GW}/32 dev {vlan} Link"),
        format!("0.0.0.0/0 via {GW} dev {vlan}"),
    ];
    let (mut rules, main_host_routes) = if mode == "strict" {
        vlan_table.push(format!("{ip}/32 dev {veth} Link"));
        (
            vec![
                format!("10: from all iif {vlan} lookup {TABLE}"),
                format!("10: from all iif {veth} lookup {TABLE}"),
            ],
            vec![],
        )
    } else {
        (
            vec![
                format!("1536: from {ip}/32 lookup {TABLE}"),
                format!("512: from all to {ip}/32 lookup 254"),
            ],
            vec![format!("{ip}/32 dev {veth} Link")],
        )
    };
    rules.sort();
    vlan_table.sort();
    HostState {
        vlan_links: vec![format!("{vlan} {BRANCH_MAC} up=true")],
        rules,
        vlan_table,
        main_host_routes,
    }
}

fn nothing_left(host: &Netns) {
    let s = host_state(host);
    assert_eq!(
        s,
        HostState {
            vlan_links: vec![],
            rules: vec![],
            vlan_table: vec![],
            main_host_routes: vec![],
        }
    );
}

/// The pod side is the ordinary one (spec 2.2): the /32 on eth0, the gateway routes, the
/// permanent neighbour with the host veth's MAC.
fn assert_pod_side(host: &Netns, pod: &Netns, veth: &str, ip: Ipv4Addr) {
    rt().block_on(async {
        let h = Netlink::open(host).expect("host");
        let p = Netlink::open(pod).expect("pod");
        let hv = h.require_link(veth).await.expect("host veth");
        assert!(hv.up);
        let eth0 = p.require_link("eth0").await.expect("eth0");
        assert!(eth0.up);
        let addrs: Vec<IpCidr> = p
            .addresses(Some(eth0.index))
            .await
            .expect("addrs")
            .into_iter()
            .filter(|a| a.cidr.family() == Family::V4)
            .map(|a| a.cidr)
            .collect();
        assert_eq!(addrs, vec![IpCidr::host_v4(ip)]);
        let gw = IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1));
        let routes = p
            .routes(Family::V4, Some(MAIN_TABLE))
            .await
            .expect("routes");
        assert!(routes
            .iter()
            .any(|r| r.gateway == Some(gw) && r.dst.prefix_len == 0));
        let neigh = p
            .neighbours(Family::V4, Some(eth0.index))
            .await
            .expect("neigh");
        assert!(neigh
            .iter()
            .any(|n| n.ip == gw && n.permanent && n.mac == hv.mac));
    });
}

fn sysctl(host: &Netns, key: &str) -> Option<String> {
    match vpc_cni_net::sysctl::read(host, key) {
        Ok(v) => Some(v),
        Err(e) if e.errno() == Some(nix::libc::ENOENT) => None,
        Err(e) => panic!("sysctl {key}: {e}"),
    }
}

fn pod_ip(res: &Value) -> Ipv4Addr {
    res["ips"][0]["address"]
        .as_str()
        .expect("address")
        .trim_end_matches("/32")
        .parse()
        .expect("ip")
}

fn del_calls(ipamd: &TestIpamd) -> usize {
    ipamd
        .ipam
        .calls()
        .iter()
        .filter(|c| matches!(c, IpamCall::Del(_)))
        .count()
}

/// ADD in `mode`, with every check of the result and the host and pod wiring; returns the
/// pod namespace, the result and the host veth.
fn add(
    host: &TestNetns,
    ipamd: &TestIpamd,
    mode: &str,
    pod_name: &str,
) -> (TestNetns, Value, String) {
    let pod = TestNetns::new("pod").expect("pod ns");
    hot_plug(host);
    let conf = branch_conf(ipamd, mode);
    let r = plugin(
        host,
        &cni_env("ADD", pod_name, &ns_path(&pod), pod_name),
        &conf,
    );
    assert_eq!(r.code, 0, "ADD {mode}: {} {}", r.stdout, r.stderr);
    let res = r.json.expect("result");
    let veth = veth(mode, pod_name);
    let ip = pod_ip(&res);
    assert_eq!(
        res["interfaces"],
        json!([
            {"name": veth},
            {"name": "eth0", "mac": "0", "sandbox": ns_path(&pod)},
            {"name": dummy_interface_name("default", pod_name), "mac": VLAN.to_string()}
        ]),
        "{mode}"
    );
    assert_eq!(
        res["ips"],
        json!([{"interface": 1, "address": format!("{ip}/32"), "gateway": GW.to_string()}]),
        "{mode}"
    );
    assert_eq!(host_state(host), expected(mode, &veth, ip), "{mode}");
    assert_pod_side(host, &pod, &veth, ip);
    let vlan = format!("vlan.eth.{VLAN}");
    for (k, v) in [
        ("accept_ra", "0"),
        ("accept_redirects", "1"),
        ("forwarding", "0"),
    ] {
        if let Some(got) = sysctl(host, &format!("net/ipv6/conf/{vlan}/{k}")) {
            assert_eq!(got, v, "{vlan} {k}");
        }
    }
    let gone = rt().block_on(async {
        Netlink::open(host)
            .expect("nl")
            .link_by_name("eni-br5")
            .await
            .expect("get")
    });
    assert!(gone.is_none(), "the hot-plugged link was renamed");
    let chk = plugin(
        host,
        &cni_env("CHECK", pod_name, &ns_path(&pod), pod_name),
        &with_prev(conf, &res),
    );
    assert_eq!(
        (chk.code, chk.json.clone()),
        (0, None),
        "CHECK {mode}: {}",
        chk.stderr
    );
    (pod, res, veth)
}

#[test]
fn branch_pods_are_wired_checked_and_deleted_from_prev_result_in_both_modes() {
    if skip_netns_test("branch_prev_result") {
        return;
    }
    for (i, mode) in ["strict", "standard"].into_iter().enumerate() {
        let (host, trunk) = node();
        let ipamd = ipamd(
            Ipv4Addr::new(10, 0, 5, 10 + 2 * u8::try_from(i).expect("i")),
            trunk,
        );
        let name = format!("sg-{mode}");
        let (pod, res, veth) = add(&host, &ipamd, mode, &name);
        let conf = branch_conf(&ipamd, mode);

        // CHECK notices a flushed rule; put back, all is well again.
        let ip = pod_ip(&res);
        let rule: Vec<String> = if mode == "strict" {
            ["pref", "10", "iif", &veth, "lookup", "105"]
                .map(String::from)
                .to_vec()
        } else {
            ["pref", "512", "to", &format!("{ip}/32"), "lookup", "main"]
                .map(String::from)
                .to_vec()
        };
        let before = host_state(&host);
        let mut del_args = vec!["rule", "del"];
        del_args.extend(rule.iter().map(String::as_str));
        ip_in(&host, &del_args);
        let chk = plugin(
            &host,
            &cni_env("CHECK", &name, &ns_path(&pod), &name),
            &with_prev(conf.clone(), &res),
        );
        assert_eq!(chk.code, 1, "{mode}: {}", chk.stdout);
        let err = chk.json.expect("error");
        assert_eq!(err["code"], 104, "{err}");
        let mut add_args = vec!["rule", "add"];
        add_args.extend(rule.iter().map(String::as_str));
        ip_in(&host, &add_args);
        assert_eq!(host_state(&host), before, "{mode}");

        // DEL with an empty netns (the double-DEL race): success, nothing torn down.
        let del = plugin(
            &host,
            &cni_env("DEL", &name, "", &name),
            &with_prev(conf.clone(), &res),
        );
        assert_eq!((del.code, del.json.clone()), (0, None), "{}", del.stderr);
        assert_eq!(
            host_state(&host),
            before,
            "{mode}: the empty-netns DEL touched nothing"
        );

        // ipamd was asked to release too (best effort), and did.
        assert_eq!(del_calls(&ipamd), 1, "{mode}");
        assert_eq!(ipamd.ipam.assigned(), 0, "{mode}");

        // DEL from prevResult with ipamd gone: the local teardown needs it not.
        drop(ipamd);
        let del = plugin(
            &host,
            &cni_env("DEL", &name, &ns_path(&pod), &name),
            &with_prev(conf.clone(), &res),
        );
        assert_eq!((del.code, del.json.clone()), (0, None), "{}", del.stderr);
        nothing_left(&host);
        // And again: idempotent.
        let del = plugin(
            &host,
            &cni_env("DEL", &name, &ns_path(&pod), &name),
            &with_prev(conf, &res),
        );
        assert_eq!(del.code, 0, "{}", del.stderr);
        nothing_left(&host);
    }
}

#[test]
fn a_branch_pod_is_deleted_through_ipamds_reply_even_after_the_mode_changed() {
    if skip_netns_test("branch_del_reply") {
        return;
    }
    for (i, (add_mode, del_mode)) in [("strict", "standard"), ("standard", "strict")]
        .into_iter()
        .enumerate()
    {
        let (host, trunk) = node();
        let ipamd = ipamd(
            Ipv4Addr::new(10, 0, 5, 20 + 2 * u8::try_from(i).expect("i")),
            trunk,
        );
        let name = format!("sg-{add_mode}-{del_mode}");
        let (pod, res, _) = add(&host, &ipamd, add_mode, &name);
        // No prevResult: ipamd's DelNetwork reply carries the VLAN (spec 2.3 step 4), and the
        // conf now names the other mode: the teardown does not depend on it.
        let del = plugin(
            &host,
            &cni_env("DEL", &name, &ns_path(&pod), &name),
            &branch_conf(&ipamd, del_mode),
        );
        assert_eq!((del.code, del.json.clone()), (0, None), "{}", del.stderr);
        nothing_left(&host);
        assert_eq!(del_calls(&ipamd), 1);
        assert_eq!(ipamd.ipam.assigned(), 0);

        // Re-added, then deleted from prevResult under the other mode.
        let (pod2, res2, _) = add(&host, &ipamd, add_mode, &format!("{name}-b"));
        let del = plugin(
            &host,
            &cni_env(
                "DEL",
                &format!("{name}-b"),
                &ns_path(&pod2),
                &format!("{name}-b"),
            ),
            &with_prev(branch_conf(&ipamd, del_mode), &res2),
        );
        assert_eq!((del.code, del.json.clone()), (0, None), "{}", del.stderr);
        nothing_left(&host);
        drop((pod, res));
    }
}

#[test]
fn a_branch_add_without_the_branch_link_fails_naming_it_and_leaves_nothing() {
    if skip_netns_test("branch_add_fails") {
        return;
    }
    let (host, trunk) = node();
    let ipamd = ipamd(Ipv4Addr::new(10, 0, 5, 30), trunk);
    let pod = TestNetns::new("pod").expect("pod ns");
    // hotplug, but nothing was plugged in: the error names the MAC.
    let r = plugin(
        &host,
        &cni_env("ADD", "c1", &ns_path(&pod), "sg-none"),
        &branch_conf(&ipamd, "strict"),
    );
    assert_eq!(r.code, 1, "{}", r.stdout);
    let err = r.json.expect("error");
    assert!(err.to_string().contains(BRANCH_MAC), "{err}");
    nothing_left(&host);
    assert_eq!(ipamd.ipam.assigned(), 0, "released with SetupNSFailed");
    assert!(
        host_links(&host).iter().all(|l| !l.starts_with("vlan")),
        "{:?}",
        host_links(&host)
    );

    // The default branchLink, vlan: a real 802.1Q link, which this kernel may lack; then the
    // error says so by name, and nothing is left either.
    let mut c = branch_conf(&ipamd, "standard");
    c.as_object_mut().expect("conf").remove("branchLink");
    let r = plugin(&host, &cni_env("ADD", "c2", &ns_path(&pod), "sg-vlan"), &c);
    if r.code == 0 {
        let res = r.json.expect("result");
        let del = plugin(
            &host,
            &cni_env("DEL", "c2", &ns_path(&pod), "sg-vlan"),
            &with_prev(c, &res),
        );
        assert_eq!(del.code, 0, "{}", del.stderr);
    } else {
        let err = r.json.expect("error");
        assert!(err.to_string().contains("8021q"), "{err}");
    }
    nothing_left(&host);
    assert_eq!(ipamd.ipam.assigned(), 0);
}
