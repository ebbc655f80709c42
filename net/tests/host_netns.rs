//! ipamd's host verbs with the real implementation, in namespaces each test creates: a veth
//! end stands in for a secondary ENI (its peer lives in a "vpc" namespace, which plays the
//! subnet's router), and the SNAT/connmark rules are read back with iptables-save and nft.
//! Skips when not root.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use vpc_cni_net::host::{EniSpec, HostNetwork, NetlinkHostNetwork};
use vpc_cni_net::snat::{self, ConnmarkBackend, RandomizeSnat, SnatConfig};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Family, IpCidr, MacAddr, Netlink, Rule, Scope, VethEnd};

const ENI_MAC: &str = "02:00:00:00:01:01";

/// host:eth1 (the ENI, MAC set to the ENI's) <-> vpc:gw0 (10.0.2.1/24, the subnet router).
async fn plug_eni(host: &TestNetns, vpc: &TestNetns) -> Netlink {
    let h = Netlink::open(host).expect("host nl");
    let mac: MacAddr = ENI_MAC.parse().expect("mac");
    h.create_veth(
        &VethEnd {
            name: "eth1".into(),
            mtu: 1500,
            mac: Some(mac),
            up: false,
        },
        &VethEnd {
            name: "gw0".into(),
            mtu: 9001,
            mac: None,
            up: true,
        },
        Some(vpc),
    )
    .await
    .expect("veth");
    let v = Netlink::open(vpc).expect("vpc nl");
    let gw = v.require_link("gw0").await.expect("gw0");
    v.add_address(
        gw.index,
        "10.0.2.1/24".parse().expect("cidr"),
        Scope::Universe,
    )
    .await
    .expect("router address");
    h
}

fn eni() -> EniSpec {
    EniSpec {
        mac: ENI_MAC.parse().expect("mac"),
        primary_ip: Ipv4Addr::new(10, 0, 2, 10),
        subnet: "10.0.2.0/24".parse().expect("subnet"),
        mtu: 9001,
        route_table: 2,
        trunk: false,
    }
}

#[tokio::test]
async fn eni_setup_wires_the_eni_table_and_rule_and_replaces_dhcp_addresses() {
    if skip_netns_test("eni_setup_wires_the_eni_table_and_rule") {
        return;
    }
    let host = TestNetns::new("host").expect("host");
    let vpc = TestNetns::new("vpc").expect("vpc");
    let h = plug_eni(&host, &vpc).await;
    let eth1 = h.require_link("eth1").await.expect("eth1");
    // What DHCP would have put there.
    h.add_address(
        eth1.index,
        "10.0.2.77/24".parse().expect("cidr"),
        Scope::Universe,
    )
    .await
    .expect("dhcp address");

    let net = NetlinkHostNetwork::new(host.try_clone().expect("dup")).expect("net");
    let e = eni();
    for _ in 0..2 {
        let l = net.setup_eni(&e).await.expect("setup eni");
        assert_eq!(l.name, "eth1");
        assert_eq!(l.mtu, 9001);
        assert!(l.up);
    }
    let v4: Vec<IpCidr> = h
        .addresses(Some(eth1.index))
        .await
        .expect("addrs")
        .into_iter()
        .filter(|a| a.cidr.family() == Family::V4)
        .map(|a| a.cidr)
        .collect();
    assert_eq!(v4, vec!["10.0.2.10/24".parse::<IpCidr>().expect("cidr")]);

    let gw: IpAddr = Ipv4Addr::new(10, 0, 2, 1).into();
    let t2 = h.routes(Family::V4, Some(2)).await.expect("routes");
    assert_eq!(t2.len(), 2, "{t2:?}");
    assert!(t2
        .iter()
        .any(|r| r.dst == IpCidr::host(gw) && r.scope == Scope::Link && r.oif == Some(eth1.index)));
    assert!(t2
        .iter()
        .any(|r| r.dst.prefix_len == 0 && r.gateway == Some(gw) && r.oif == Some(eth1.index)));
    let main = h.routes(Family::V4, Some(254)).await.expect("routes");
    assert!(
        !main
            .iter()
            .any(|r| r.dst.trunc() == "10.0.2.0/24".parse().expect("c")),
        "{main:?}"
    );

    let rules: Vec<Rule> = h.rules(Family::V4).await.expect("rules");
    assert_eq!(
        rules
            .iter()
            .filter(|r| r.priority == 32765)
            .cloned()
            .collect::<Vec<_>>(),
        vec![e.rule()]
    );

    // Traffic from the ENI's address uses the ENI table and reaches the subnet router.
    let ok = Command::new("ip")
        .args([
            "netns",
            "exec",
            host.name(),
            "ping",
            "-c1",
            "-W1",
            "-I",
            "10.0.2.10",
            "10.0.2.1",
        ])
        .output()
        .expect("ping")
        .status
        .success();
    assert!(ok, "ping from the ENI address through table 2");

    assert_eq!(net.teardown_eni(e.primary_ip).await.expect("teardown"), 1);
    assert!(!h
        .rules(Family::V4)
        .await
        .expect("rules")
        .iter()
        .any(|r| r.priority == 32765));
    assert_eq!(
        net.teardown_eni(e.primary_ip)
            .await
            .expect("teardown twice"),
        0
    );

    let mut missing = eni();
    missing.mac = "02:00:00:00:09:09".parse().expect("mac");
    assert!(net
        .setup_eni(&missing)
        .await
        .expect_err("no such link")
        .is_not_found());
    assert_eq!(
        net.setup_primary_eni(e.mac, 1500)
            .await
            .expect("primary")
            .mtu,
        1500
    );
}

fn cfg() -> SnatConfig {
    SnatConfig {
        primary_ip: Ipv4Addr::new(10, 0, 0, 10),
        primary_if: "eth0".into(),
        vpc_cidrs: vec!["10.0.0.0/16".parse().expect("c")],
        exclude_cidrs: vec!["192.168.0.0/16".parse().expect("c")],
        external_snat: false,
        randomize: RandomizeSnat::Prng,
        node_port_support: true,
        veth_prefix: "eni".into(),
        connmark: 0x80,
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.trim() == needle).count()
}

#[tokio::test]
async fn snat_rules_are_applied_idempotently_updated_and_removed_inside_the_namespace() {
    if skip_netns_test("snat_rules_are_applied_idempotently") {
        return;
    }
    let host = TestNetns::new("host").expect("host");
    let net = NetlinkHostNetwork::new(host.try_clone().expect("dup"))
        .expect("net")
        .with_connmark_backend(ConnmarkBackend::Iptables);
    let c = cfg();
    net.apply_snat(&c).await.expect("apply");
    net.apply_snat(&c).await.expect("apply again");

    let nat = snat::iptables_save(&host, "nat").expect("save nat");
    let jump = "-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0";
    let ret =
        "-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN";
    let excl = "-A AWS-SNAT-CHAIN-0 -d 192.168.0.0/16 -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN";
    let snat_rule = "-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10 --random-fully";
    for l in [jump, ret, excl, snat_rule] {
        assert_eq!(count(&nat, l), 1, "{l}\n{nat}");
    }
    let cm_jump = "-A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0";
    let cm_restore = "-A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80";
    let cm_set = "-A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80";
    for l in [cm_jump, cm_restore, cm_set] {
        assert_eq!(count(&nat, l), 1, "{l}\n{nat}");
    }
    let pre: Vec<&str> = nat
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING"))
        .collect();
    assert_eq!(
        pre,
        vec![cm_jump, cm_restore],
        "restore sits after the jump"
    );
    let mangle = snat::iptables_save(&host, "mangle").expect("save mangle");
    assert_eq!(
        mangle
            .lines()
            .filter(|l| l.contains("AWS, primary ENI"))
            .count(),
        3,
        "{mangle}"
    );

    let h = net.netlink();
    let fw: Vec<Rule> = h
        .rules(Family::V4)
        .await
        .expect("rules")
        .into_iter()
        .filter(|r| r.priority == 1024)
        .collect();
    assert_eq!(
        fw,
        vec![Rule::new(Family::V4, 1024, 254).fwmark(0x80, 0x80)]
    );

    // A VPC CIDR change rewrites the chain: the stale RETURN goes.
    let mut c2 = c.clone();
    c2.vpc_cidrs = vec!["10.1.0.0/16".parse().expect("c")];
    net.apply_snat(&c2).await.expect("update");
    let nat = snat::iptables_save(&host, "nat").expect("save");
    assert_eq!(count(&nat, ret), 0, "{nat}");
    assert_eq!(
        count(&nat, &ret.replace("10.0.0.0", "10.1.0.0")),
        1,
        "{nat}"
    );
    assert_eq!(count(&nat, jump), 1);

    // External SNAT: jump, chains and connmark go; 1024 stays for node-port support.
    let mut ext = c2.clone();
    ext.external_snat = true;
    net.apply_snat(&ext).await.expect("external");
    let nat = snat::iptables_save(&host, "nat").expect("save");
    assert!(!nat.contains("AWS-SNAT-CHAIN-0"), "{nat}");
    assert!(!nat.contains("AWS-CONNMARK-CHAIN-0"), "{nat}");
    assert!(!nat.contains("AWS, CONNMARK"), "{nat}");
    assert_eq!(
        h.rules(Family::V4)
            .await
            .expect("rules")
            .iter()
            .filter(|r| r.priority == 1024)
            .count(),
        1
    );
    ext.node_port_support = false;
    net.apply_snat(&ext).await.expect("external, no node port");
    assert_eq!(
        h.rules(Family::V4)
            .await
            .expect("rules")
            .iter()
            .filter(|r| r.priority == 1024)
            .count(),
        0
    );
    let mangle = snat::iptables_save(&host, "mangle").expect("save mangle");
    assert!(!mangle.contains("AWS, primary ENI"), "{mangle}");

    // None of it reached the machine's own namespace.
    let root = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("root save");
    assert!(!String::from_utf8_lossy(&root.stdout).contains("AWS-SNAT-CHAIN-0"));
}

#[tokio::test]
async fn the_nftables_connmark_backend_installs_the_aws_cni_table() {
    if skip_netns_test("the_nftables_connmark_backend_installs_the_aws_cni_table") {
        return;
    }
    let host = TestNetns::new("host").expect("host");
    let net = NetlinkHostNetwork::new(host.try_clone().expect("dup"))
        .expect("net")
        .with_connmark_backend(ConnmarkBackend::Nftables);
    net.apply_snat(&cfg()).await.expect("apply");
    net.apply_snat(&cfg()).await.expect("apply again");
    let t = snat::nft_list(&host).expect("nft").expect("table exists");
    for want in [
        "type nat hook prerouting priority dstnat + 10; policy accept;",
        "fib daddr type local return",
        "iifname \"eni*\" counter",
        "jump snat-mark",
        "ip daddr 10.0.0.0/16 return",
        "ip daddr 192.168.0.0/16 return",
        "ct mark set ct mark | 0x00000080",
    ] {
        assert!(t.contains(want), "missing {want:?} in\n{t}");
    }
    assert_eq!(t.matches("ip daddr 10.0.0.0/16 return").count(), 1, "{t}");
    let nat = snat::iptables_save(&host, "nat").expect("save");
    assert!(
        !nat.contains("AWS-CONNMARK-CHAIN-0"),
        "iptables connmark rules are not used: {nat}"
    );
    assert!(
        nat.contains("AWS-SNAT-CHAIN-0"),
        "SNAT still uses iptables: {nat}"
    );
    let mut ext = cfg();
    ext.external_snat = true;
    net.apply_snat(&ext).await.expect("external");
    assert!(snat::nft_list(&host).expect("nft").is_none());
}

#[tokio::test]
async fn pod_rules_are_normalized_after_a_restart() {
    if skip_netns_test("pod_rules_are_normalized_after_a_restart") {
        return;
    }
    let host = TestNetns::new("host").expect("host");
    let net = NetlinkHostNetwork::new(host.try_clone().expect("dup")).expect("net");
    let h = net.netlink();
    let ip = Ipv4Addr::new(10, 0, 2, 33);
    let from = IpCidr::host_v4(ip);
    let to_pod = Rule::new(Family::V4, 512, 254).to(from);
    for r in [
        Rule::new(Family::V4, 1536, 3)
            .from(from)
            .to("10.0.0.0/16".parse().expect("c")),
        Rule::new(Family::V4, 1536, 3)
            .from(from)
            .to("10.1.0.0/16".parse().expect("c")),
        to_pod.clone(),
    ] {
        assert!(h.rule_add(&r).await.expect("seed"));
    }
    assert_eq!(
        net.normalize_pod_rules(ip).await.expect("normalize"),
        Some(3)
    );
    let mine: Vec<Rule> = h
        .rules(Family::V4)
        .await
        .expect("rules")
        .into_iter()
        .filter(|r| r.from == Some(from) || r.to == Some(from))
        .collect();
    assert_eq!(
        mine,
        vec![to_pod, Rule::new(Family::V4, 1536, 3).from(from)]
    );
    assert_eq!(
        net.normalize_pod_rules(Ipv4Addr::new(10, 0, 2, 34))
            .await
            .expect("none"),
        None
    );
}

#[tokio::test]
async fn the_egress_guard_rejects_new_connections_to_egress_only_addresses_once_per_family() {
    if skip_netns_test("the_egress_guard_rejects_new_connections") {
        return;
    }
    let host = TestNetns::new("host").expect("host");
    let net = NetlinkHostNetwork::new(host.try_clone().expect("dup")).expect("net");
    // A rule of someone else's first: ours goes above it.
    for bin in ["iptables", "ip6tables"] {
        let ok = host
            .run(|| {
                Command::new(bin)
                    .args(["-w", "5", "-A", "FORWARD", "-j", "ACCEPT"])
                    .status()
            })
            .expect("in ns")
            .expect("spawn");
        assert!(ok.success(), "{bin} -A FORWARD");
    }
    for (family, range, bin) in [
        (Family::V4, snat::EGRESS_V4_RANGE, "iptables-save"),
        (Family::V6, "fd00::ac:0/118", "ip6tables-save"),
    ] {
        assert!(net.guard_egress(family).await.expect("guard"), "added");
        assert!(
            !net.guard_egress(family).await.expect("again"),
            "already there"
        );
        let out = host
            .run(|| Command::new(bin).args(["-t", "filter"]).output())
            .expect("in ns")
            .expect("spawn");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let forward: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A FORWARD"))
            .collect();
        assert_eq!(forward.len(), 2, "{text}");
        assert!(
            forward[0].contains(&format!("-d {range}"))
                && forward[0].contains("--ctstate NEW")
                && forward[0].contains("-j REJECT"),
            "first FORWARD rule is the guard: {text}"
        );
    }
}
