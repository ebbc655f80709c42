//! The plugin killed mid-ADD (issue 14; root only, skipped otherwise): for each kill point of
//! `VPC_CNI_FAILPOINTS`, the built binary SIGKILLs itself there during ADD inside a test node
//! namespace; the runtime's DEL follows (same container id, netns and ifname, no prevResult:
//! the runtime never got a result). Afterwards no rule and no route in any table is left for
//! the pool's addresses, ipamd (the in-process backend) holds no address, a second ADD of the
//! same pod succeeds and is wired exactly, and once the pod namespace is gone no host veth
//! is left. Namespaces are removed when their values drop, on failure too.

mod common;

use common::ipamd::RealIpamd;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use serde_json::Value;
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Family, Netlink, Netns};
use vpc_cni_plugin::failpoint;
use vpc_cni_plugin::memory::MemoryIpam;

const POD: &str = "killed-0";
const CONTAINER: &str = "k0";

/// Every rule and route of `family` in `host`, in any table, that names one of `addrs`.
fn leftovers(host: &Netns, family: Family, addrs: &[IpAddr]) -> Vec<String> {
    rt().block_on(async {
        let h = Netlink::open(host).expect("netlink");
        let mut out: Vec<String> = h
            .rules(family)
            .await
            .expect("rules")
            .into_iter()
            .filter(|r| {
                [r.from, r.to]
                    .iter()
                    .flatten()
                    .any(|c| addrs.contains(&c.addr))
            })
            .map(|r| format!("rule {r}"))
            .collect();
        out.extend(
            h.routes(family, None)
                .await
                .expect("routes")
                .into_iter()
                .filter(|r| addrs.contains(&r.dst.addr))
                .map(|r| format!("route {r:?}")),
        );
        out
    })
}

fn env_with(cmd: &str, netns: &str, failpoints: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = cni_env(cmd, CONTAINER, netns, POD);
    if let Some(f) = failpoints {
        env.push((failpoint::ENV, f.to_string()));
    }
    env
}

/// Kill at `point` during ADD, DEL, check nothing is left, ADD again, DEL, remove the pod
/// namespace, check no veth is left.
/// What a kill test needs of an ipamd: its socket, how many addresses it holds for pods, and
/// every address it has (the pool may grow during the test).
struct Backend<'a> {
    socket: &'a std::path::Path,
    assigned: &'a dyn Fn() -> usize,
    pool: &'a dyn Fn() -> Vec<IpAddr>,
}

fn killed_add_then_del_leaves_nothing(
    point: &str,
    host: &TestNetns,
    ipamd: &Backend<'_>,
    family: Family,
    wired: &dyn Fn(&Netns, &str, IpAddr),
) {
    let pod = TestNetns::new("pod").expect("pod ns");
    let netns = ns_path(&pod);
    let mut conf = conf("1.0.0", ipamd.socket);
    conf["poolWaitSeconds"] = serde_json::json!(30);
    conf["poolRetryMs"] = serde_json::json!(100);
    let arm = format!("{point}=1");
    let add = plugin(host, &env_with("ADD", &netns, Some(&arm)), &conf);
    assert_eq!(
        (add.code, add.stdout.as_str()),
        (-1, ""),
        "{point}: ADD must die by its signal with nothing printed: {}",
        add.stderr
    );
    assert!(
        add.stderr.contains(&format!("failpoint {point} reached")),
        "{point}: {}",
        add.stderr
    );

    // What the killed ADD left: the later the point, the more there is to clean up.
    let reached = |p: &str| {
        let at = |n: &str| failpoint::ALL.iter().position(|x| *x == n).expect("point");
        at(point) >= at(p)
    };
    let veth = host_veth_name("eni", "default", POD, 0);
    let left = leftovers(host, family, &(ipamd.pool)());
    if reached(failpoint::POD_ADDRESS) {
        assert_eq!((ipamd.assigned)(), 1, "{point}: the address is held");
        assert!(
            host_links(host).contains(&veth),
            "{point}: the host veth exists"
        );
    }
    if reached(failpoint::HOST_ROUTE) {
        assert!(
            left.iter().any(|l| l.starts_with("route")),
            "{point}: {left:?}"
        );
    } else {
        assert!(left.is_empty(), "{point}: {left:?}");
    }
    if reached(failpoint::TO_POD_RULE) {
        assert!(
            left.iter().any(|l| l.starts_with("rule")),
            "{point}: {left:?}"
        );
    }

    let del = plugin(host, &env_with("DEL", &netns, None), &conf);
    assert_eq!(
        (del.code, del.json.clone()),
        (0, None),
        "{point}: DEL after the kill: {}",
        del.stderr
    );
    assert_eq!(
        leftovers(host, family, &(ipamd.pool)()),
        Vec::<String>::new(),
        "{point}: rules or routes left after DEL"
    );
    assert_eq!((ipamd.assigned)(), 0, "{point}: address still held");

    // The runtime retries the pod in the same namespace: a whole ADD, wired exactly.
    let again = plugin(host, &env_with("ADD", &netns, None), &conf);
    assert_eq!(
        again.code, 0,
        "{point}: second ADD: {} {}",
        again.stdout, again.stderr
    );
    let res: Value = again.json.expect("result");
    let addr = res["ips"][0]["address"].as_str().expect("address");
    let ip: IpAddr = addr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("ip");
    assert_eq!(res["interfaces"][0]["name"], veth.as_str(), "{point}");
    wired(&pod, &veth, ip);
    let del = plugin(
        host,
        &env_with("DEL", &netns, None),
        &with_prev(conf.clone(), &res),
    );
    assert_eq!(del.code, 0, "{point}: DEL: {}", del.stderr);
    assert_eq!(
        leftovers(host, family, &(ipamd.pool)()),
        Vec::<String>::new(),
        "{point}"
    );
    assert_eq!((ipamd.assigned)(), 0, "{point}");
    drop(pod);
    eventually(
        &format!("{point}: the host veth to go with the pod"),
        || host_links(host).is_empty(),
    );
}

#[test]
fn a_plugin_killed_at_any_add_step_leaves_nothing_the_runtimes_del_does_not_clean_up() {
    if skip_netns_test("kill_points") {
        return;
    }
    let host = TestNetns::new("node").expect("node ns");
    make_node(&host);
    // Table 3: the pod gets both host rules (512 and 1536).
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 1, 10), 2, 2, 3);
    let pool: Vec<IpAddr> = (10..12)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)))
        .collect();
    let wired = |pod: &Netns, veth: &str, ip: IpAddr| {
        let IpAddr::V4(ip) = ip else {
            panic!("an IPv4 pod got {ip}")
        };
        assert_wired(&host, pod, veth, ip, 3, 9001);
    };
    let assigned = || ipamd.ipam.assigned();
    let pool = || pool.clone();
    let backend = Backend {
        socket: &ipamd.socket,
        assigned: &assigned,
        pool: &pool,
    };
    for point in failpoint::ALL {
        killed_add_then_del_leaves_nothing(point, &host, &backend, Family::V4, &wired);
    }
}

#[test]
fn an_ipv6_pod_killed_at_any_add_step_leaves_nothing_either() {
    if skip_netns_test("kill_points_v6") {
        return;
    }
    let host = TestNetns::new("node6").expect("node ns");
    for args in [
        &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"][..],
        &["ip", "link", "set", "lo", "up"],
    ] {
        assert!(sh_in(host.name(), args).status.success(), "{args:?}");
    }
    let base: Ipv6Addr = "2001:db8:7:8:9::10".parse().expect("base");
    let ipamd = TestIpamd::start(MemoryIpam::pool_v6(base, 2));
    let pool: Vec<IpAddr> = (0..2u128)
        .map(|i| IpAddr::V6(Ipv6Addr::from(u128::from(base) + i)))
        .collect();
    let wired = |pod: &Netns, veth: &str, ip: IpAddr| {
        // The pod's /128 on eth0 and the host route and 512 rule for it.
        rt().block_on(async {
            let p = Netlink::open(pod).expect("pod nl");
            let eth0 = p.require_link("eth0").await.expect("eth0");
            let addrs = p.addresses(Some(eth0.index)).await.expect("addrs");
            assert!(addrs.iter().any(|a| a.cidr.addr == ip), "{addrs:?}");
        });
        let left = leftovers(&host, Family::V6, &[ip]);
        assert_eq!(left.len(), 2, "route and rule 512 for {ip}: {left:?}");
        assert!(host_links(&host).iter().any(|l| l == veth));
    };
    // Table main (the /80 is on the primary ENI): no 1536 rule, so add-to-pod-rule is the
    // instant after the 512 rule, as add-rules is.
    let assigned = || ipamd.ipam.assigned();
    let pool = || pool.clone();
    let backend = Backend {
        socket: &ipamd.socket,
        assigned: &assigned,
        pool: &pool,
    };
    for point in failpoint::ALL {
        killed_add_then_del_leaves_nothing(point, &host, &backend, Family::V6, &wired);
    }
}

#[test]
fn a_plugin_killed_at_any_add_step_leaves_nothing_held_in_the_real_ipamd() {
    if skip_netns_test("kill_points_real_ipamd") {
        return;
    }
    let host = TestNetns::new("rnode").expect("node ns");
    make_node(&host);
    let ipamd = RealIpamd::start(
        &host,
        &[
            ("VPC_CNI_SIM_INSTANCE_TYPE", "m5.large".into()),
            ("WARM_IP_TARGET", "2".into()),
        ],
        None,
    );
    ipamd.wait_for_free(2);
    let pool = || -> Vec<IpAddr> {
        ipamd
            .enis()
            .addresses
            .keys()
            .map(|a| IpAddr::V4(*a))
            .collect()
    };
    let assigned = || usize::try_from(ipamd.enis().assigned).unwrap_or(usize::MAX);
    let backend = Backend {
        socket: &ipamd.socket,
        assigned: &assigned,
        pool: &pool,
    };
    let wired = |pod: &Netns, veth: &str, ip: IpAddr| {
        let IpAddr::V4(ip) = ip else {
            panic!("an IPv4 pod got {ip}")
        };
        let (table, _) = ipamd.enis().addresses[&ip].clone();
        assert_wired(&host, pod, veth, ip, table, 9001);
    };
    for point in failpoint::ALL {
        killed_add_then_del_leaves_nothing(point, &host, &backend, Family::V4, &wired);
        let enis = ipamd.enis();
        assert!(
            enis.addresses.values().all(|(_, pod)| pod.is_empty()),
            "{point}: an address keeps a pod: {:?}\n{}",
            enis.addresses,
            ipamd.log_text()
        );
    }
}
