//! The plugin in real network namespaces (root only; skipped otherwise): the built binary run
//! as a process inside a test "host" namespace, an in-process ipamd on a unix socket, and every
//! address, route, rule and neighbour read back with netlink.

mod common;

use std::net::Ipv4Addr;

use common::*;
use serde_json::json;
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::pod::SetupStep;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Family, Netlink, NetlinkPodNetwork, MAIN_TABLE};
use vpc_cni_plugin::driver::Driver;
use vpc_cni_plugin::memory::{IpamCall, MemoryIpam, MemoryPolicyAgent};

#[test]
fn many_pods_add_check_ping_del_with_the_binary_and_leave_nothing_behind() {
    if skip_netns_test("many_pods") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    make_node(&host);
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 1, 10), 8, 2, 3);
    let mut pods = Vec::new();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let ns = TestNetns::new("pod").expect("pod ns");
        let name = format!("web-{i}");
        let container = format!("c{i}");
        let conf = conf(version, &ipamd.socket);
        let r = plugin(
            &host,
            &cni_env("ADD", &container, &ns_path(&ns), &name),
            &conf,
        );
        assert_eq!(r.code, 0, "ADD {i}: {} {}", r.stdout, r.stderr);
        let res = r.json.expect("result");
        assert_eq!(res["cniVersion"], *version);
        let veth = host_veth_name("eni", "default", &name, 0);
        assert_eq!(res["interfaces"][0]["name"], veth.as_str());
        assert_eq!(
            res["interfaces"][1],
            json!({"name": "eth0", "mac": "3", "sandbox": ns_path(&ns)})
        );
        assert_eq!(res["interfaces"][2]["sandbox"], "2");
        let addr = res["ips"][0]["address"]
            .as_str()
            .expect("address")
            .to_string();
        let ip: Ipv4Addr = addr.trim_end_matches("/32").parse().expect("ip");
        assert_eq!(version == &"0.4.0", res["ips"][0].get("version").is_some());
        assert_wired(&host, &ns, &veth, ip, 3, 9001);
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
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.3).collect();
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ips.len(), "distinct addresses");
    for (ns, _, _, ip, _, _) in &pods {
        assert!(ping(host.name(), *ip), "node -> pod {ip}");
        let other = ips.iter().find(|o| *o != ip).expect("another pod");
        assert!(ping(ns.name(), *other), "pod {ip} -> pod {other}");
    }
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
        // DEL twice, the second time with an empty netns, as containerd does.
        let again = plugin(
            &host,
            &cni_env("DEL", container, "", name),
            &with_prev(conf.clone(), res),
        );
        assert_eq!(again.code, 0, "second DEL: {}", again.stdout);
    }
    assert!(
        pod_rules(&host).is_empty(),
        "no pod rules left: {:?}",
        pod_rules(&host)
    );
    assert_eq!(ipamd.ipam.assigned(), 0);
    let reasons: Vec<String> = ipamd
        .ipam
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            IpamCall::Del(d) => Some(d.reason),
            IpamCall::Add(_) => None,
        })
        .collect();
    assert!(reasons.iter().all(|r| r == "PodDeleted"));
    drop(pods);
    eventually("host veths to die with their pod namespaces", || {
        host_links(&host).is_empty()
    });
}

#[test]
fn a_pod_on_the_primary_eni_gets_only_the_512_rule_and_check_reports_flushed_rules() {
    if skip_netns_test("primary_eni") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 2, 10), 1, 0, 254);
    let mut conf = conf("1.0.0", &ipamd.socket);
    conf["mtu"] = json!("1500");
    let env = cni_env("ADD", "c1", &ns_path(&pod), "db-0");
    let r = plugin(&host, &env, &conf);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let res = r.json.expect("result");
    let veth = host_veth_name("eni", "default", "db-0", 0);
    assert_wired(
        &host,
        &pod,
        &veth,
        Ipv4Addr::new(10, 0, 2, 10),
        MAIN_TABLE,
        1500,
    );
    // Something flushes the pod's rule on the node: CHECK must say so.
    assert!(sh_in(host.name(), &["ip", "rule", "del", "pref", "512"])
        .status
        .success());
    let chk = plugin(
        &host,
        &cni_env("CHECK", "c1", &ns_path(&pod), "db-0"),
        &with_prev(conf.clone(), &res),
    );
    assert_eq!(chk.code, 1);
    let err = chk.json.expect("error JSON");
    assert_eq!(err["code"], 104, "{err}");
    assert!(err["msg"].as_str().expect("msg").contains("512"), "{err}");
    let del = plugin(
        &host,
        &cni_env("DEL", "c1", &ns_path(&pod), "db-0"),
        &with_prev(conf, &res),
    );
    assert_eq!(del.code, 0);
    assert!(pod_rules(&host).is_empty());
}

#[test]
fn del_without_ipamd_removes_host_rules_from_prev_result_and_succeeds() {
    if skip_netns_test("del_without_ipamd") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 3, 10), 1, 1, 2);
    let conf = conf("0.4.0", &ipamd.socket);
    let r = plugin(&host, &cni_env("ADD", "c1", &ns_path(&pod), "api-0"), &conf);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let res = r.json.expect("result");
    assert_eq!(pod_rules(&host).len(), 2);
    let socket = ipamd.socket.clone();
    drop(ipamd);
    assert!(!socket.exists() || std::os::unix::net::UnixStream::connect(&socket).is_err());
    // The namespace is gone too, and the runtime sends an empty CNI_NETNS.
    drop(pod);
    let del = plugin(
        &host,
        &cni_env("DEL", "c1", "", "api-0"),
        &with_prev(conf.clone(), &res),
    );
    assert_eq!((del.code, del.json), (0, None), "{}", del.stderr);
    assert!(pod_rules(&host).is_empty(), "{:?}", pod_rules(&host));
    // No prevResult and no ipamd: still success.
    let del = plugin(&host, &cni_env("DEL", "c1", "", "api-0"), &conf);
    assert_eq!(del.code, 0);
}

#[test]
fn add_waits_for_the_pool_then_gives_up_with_code_11() {
    if skip_netns_test("pool_wait") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 4, 10), 1, 1, 2);
    ipamd.ipam.set_warming(4);
    let conf = conf("1.1.0", &ipamd.socket);
    let r = plugin(&host, &cni_env("ADD", "c1", &ns_path(&pod), "w-0"), &conf);
    assert_eq!(
        r.code, 0,
        "a warming pool is waited for: {} {}",
        r.stdout, r.stderr
    );
    assert_eq!(ipamd.ipam.calls().len(), 5);
    let pod2 = TestNetns::new("pod").expect("pod ns");
    let start = std::time::Instant::now();
    let r = plugin(&host, &cni_env("ADD", "c2", &ns_path(&pod2), "w-1"), &conf);
    assert_eq!(r.code, 1);
    let err = r.json.expect("error");
    assert_eq!(err["code"], 11, "{err}");
    assert_eq!(err["cniVersion"], "1.1.0");
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        host_links(&host).len() == 1,
        "the failed ADD built nothing: {:?}",
        host_links(&host)
    );
}

#[test]
fn a_failure_in_the_middle_of_add_is_rolled_back_and_the_address_released() {
    if skip_netns_test("rollback") {
        return;
    }
    for step in [
        SetupStep::HostVethUp,
        SetupStep::PodNeighbour,
        SetupStep::HostRoute,
        SetupStep::FromPodRule,
    ] {
        let host = TestNetns::new("host").expect("host ns");
        let pod = TestNetns::new("pod").expect("pod ns");
        let rt = rt();
        let ipam = MemoryIpam::new("v", MemoryIpam::pool(Ipv4Addr::new(10, 0, 5, 10), 1, 1, 2));
        let net = rt
            .block_on(async { NetlinkPodNetwork::new(host.try_clone().expect("dup")) })
            .expect("netlink")
            .with_fault(Some(step));
        let d = Driver::new(ipam, net, MemoryPolicyAgent::default(), "v");
        let inv = vpc_cni_plugin::env::Invocation {
            command: vpc_cni_plugin::env::Command::Add,
            container_id: "c1".into(),
            netns: ns_path(&pod),
            ifname: "eth0".into(),
            args: vpc_cni_plugin::env::CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=rb")
                .expect("args"),
            path: "/usr/lib/cni".into(),
        };
        let conf = vpc_cni_plugin::config::NetConf::parse(
            conf("1.0.0", std::path::Path::new("/nonexistent"))
                .to_string()
                .as_bytes(),
        )
        .expect("conf");
        let e = rt
            .block_on(d.add(&inv, &conf))
            .expect_err("injected failure");
        assert_eq!(e.code(), 103, "{step}");
        assert!(
            host_links(&host).is_empty(),
            "{step}: host veth removed: {:?}",
            host_links(&host)
        );
        assert!(
            pod_rules(&host).is_empty(),
            "{step}: {:?}",
            pod_rules(&host)
        );
        let pod_links = rt.block_on(async {
            Netlink::open(&pod)
                .expect("nl")
                .links()
                .await
                .expect("links")
        });
        assert!(
            pod_links.iter().all(|l| l.name == "lo"),
            "{step}: {pod_links:?}"
        );
        assert_eq!(d.ipam().assigned(), 0, "{step}");
        assert!(
            matches!(d.ipam().calls().last(), Some(IpamCall::Del(r)) if r.reason == "SetupNSFailed")
        );
        let routes = rt.block_on(async {
            Netlink::open(&host)
                .expect("nl")
                .routes(Family::V4, Some(MAIN_TABLE))
                .await
                .expect("routes")
        });
        assert!(routes.is_empty(), "{step}: {routes:?}");
    }
}

#[test]
fn version_status_gc_and_bad_input_answer_one_json_document() {
    if skip_netns_test("misc") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 6, 10), 2, 1, 2);
    let v = plugin(&host, &[("CNI_COMMAND", "VERSION".into())], &json!({}));
    assert_eq!(v.code, 0);
    assert_eq!(v.json.expect("version")["supportedVersions"][6], "1.1.0");
    let about = plugin(&host, &[], &json!({}));
    assert_eq!((about.code, about.stdout.as_str()), (0, ""));
    assert!(about.stderr.contains("CNI protocol versions supported"));
    let conf11 = conf("1.1.0", &ipamd.socket);
    let st = plugin(&host, &[("CNI_COMMAND", "STATUS".into())], &conf11);
    assert_eq!((st.code, st.json), (0, None), "{}", st.stderr);
    let mut down = conf11.clone();
    down["ipamdSocket"] = json!("/nonexistent/ipamd.sock");
    let st = plugin(&host, &[("CNI_COMMAND", "STATUS".into())], &down);
    assert_eq!(st.json.expect("error")["code"], 50);
    let st = plugin(
        &host,
        &[("CNI_COMMAND", "STATUS".into())],
        &conf("1.0.0", &ipamd.socket),
    );
    assert_eq!(st.json.expect("error")["code"], 1, "STATUS needs 1.1.0");
    // GC removes a leaked pod rule and keeps a live pod's.
    let pod = TestNetns::new("pod").expect("pod ns");
    let r = plugin(
        &host,
        &cni_env("ADD", "c1", &ns_path(&pod), "gc-0"),
        &conf11,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(sh_in(
        host.name(),
        &[
            "ip",
            "rule",
            "add",
            "pref",
            "512",
            "to",
            "10.9.9.9/32",
            "lookup",
            "main"
        ]
    )
    .status
    .success());
    assert!(sh_in(
        host.name(),
        &[
            "ip",
            "rule",
            "add",
            "pref",
            "1536",
            "from",
            "10.9.9.9/32",
            "lookup",
            "7"
        ]
    )
    .status
    .success());
    assert_eq!(pod_rules(&host).len(), 4);
    let mut gc = conf11.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
    let g = plugin(&host, &[("CNI_COMMAND", "GC".into())], &gc);
    assert_eq!((g.code, g.json), (0, None), "{}", g.stderr);
    let left = pod_rules(&host);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|r| r.contains("10.0.6.10")), "{left:?}");
    // Bad input: exactly one error JSON on stdout, with the spec's codes.
    let bad = plugin(
        &host,
        &cni_env("ADD", "c2", &ns_path(&pod), "x"),
        &json!("nope"),
    );
    assert_eq!(bad.json.expect("error")["code"], 6);
    let mut long = conf11.clone();
    long["vethPrefix"] = json!("toolong");
    let bad = plugin(&host, &cni_env("ADD", "c2", &ns_path(&pod), "x"), &long);
    assert_eq!(bad.json.expect("error")["code"], 7);
    let bad = plugin(
        &host,
        &cni_env("ADD", "c2", "/var/run/netns/does-not-exist", "x"),
        &conf11,
    );
    assert_eq!(bad.json.expect("error")["code"], 3);
    let own = "/proc/self/ns/net".to_string();
    let bad = plugin(&host, &cni_env("ADD", "c2", &own, "x"), &conf11);
    assert_eq!(
        bad.json.expect("error")["code"],
        4,
        "the plugin's own netns is refused"
    );
    let mut env = cni_env("ADD", "c2", &ns_path(&pod), "x");
    env.retain(|(k, _)| *k != "CNI_IFNAME");
    let bad = plugin(&host, &env, &conf11);
    assert_eq!(bad.json.expect("error")["code"], 4);
    let del = plugin(
        &host,
        &cni_env("DEL", "c1", &ns_path(&pod), "gc-0"),
        &with_prev(conf11, &r.json.expect("res")),
    );
    assert_eq!(del.code, 0);
}

/// A driver over the real netlink pod network in `host`, with `ipam`.
fn netlink_driver(
    rt: &tokio::runtime::Runtime,
    host: &TestNetns,
    ipam: MemoryIpam,
) -> Driver<MemoryIpam, NetlinkPodNetwork, MemoryPolicyAgent> {
    let net = rt
        .block_on(async { NetlinkPodNetwork::new(host.try_clone().expect("dup")) })
        .expect("netlink");
    Driver::new(ipam, net, MemoryPolicyAgent::default(), "v")
}

fn add_invocation(pod: &TestNetns, name: &str) -> vpc_cni_plugin::env::Invocation {
    vpc_cni_plugin::env::Invocation {
        command: vpc_cni_plugin::env::Command::Add,
        container_id: format!("c-{name}"),
        netns: ns_path(pod),
        ifname: "eth0".into(),
        args: vpc_cni_plugin::env::CniArgs::parse(&format!(
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"
        ))
        .expect("args"),
        path: "/usr/lib/cni".into(),
    }
}

fn no_wait_conf() -> vpc_cni_plugin::config::NetConf {
    let mut c = conf("1.0.0", std::path::Path::new("/nonexistent"));
    c["poolWaitSeconds"] = json!(0);
    vpc_cni_plugin::config::NetConf::parse(c.to_string().as_bytes()).expect("conf")
}

#[test]
fn an_add_that_ipamd_refuses_leaves_no_veth_in_either_namespace() {
    if skip_netns_test("an_add_that_ipamd_refuses_leaves_no_veth") {
        return;
    }
    // The veth pair is built while ipamd is asked; a refusal must take it away again.
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let rt = rt();
    let d = netlink_driver(&rt, &host, MemoryIpam::new("v", Vec::new()));
    let e = rt
        .block_on(d.add(&add_invocation(&pod, "refused"), &no_wait_conf()))
        .expect_err("empty pool");
    assert_eq!(e.code(), 102, "{e}");
    assert!(host_links(&host).is_empty(), "{:?}", host_links(&host));
    let pod_links = rt.block_on(async {
        Netlink::open(&pod)
            .expect("nl")
            .links()
            .await
            .expect("links")
    });
    assert!(pod_links.iter().all(|l| l.name == "lo"), "{pod_links:?}");
    // And the same pod wires cleanly once there is an address.
    let d = netlink_driver(
        &rt,
        &host,
        MemoryIpam::new("v", MemoryIpam::pool(Ipv4Addr::new(10, 0, 8, 10), 1, 1, 2)),
    );
    rt.block_on(d.add(&add_invocation(&pod, "refused"), &no_wait_conf()))
        .expect("add");
    let veth = host_veth_name("eni", "default", "refused", 0);
    assert_wired(&host, &pod, &veth, Ipv4Addr::new(10, 0, 8, 10), 2, 9001);
}

#[test]
fn add_and_del_through_the_driver_among_many_pods_are_exact_and_dump_nothing() {
    if skip_netns_test("add_and_del_through_the_driver_among_many_pods") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let rt = rt();
    let d = netlink_driver(
        &rt,
        &host,
        MemoryIpam::new("v", MemoryIpam::pool(Ipv4Addr::new(10, 0, 9, 10), 61, 1, 2)),
    );
    let conf = no_wait_conf();
    let pods: Vec<TestNetns> = (0..61)
        .map(|_| TestNetns::new("pod").expect("pod ns"))
        .collect();
    let mut results = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let r = rt
            .block_on(d.add(&add_invocation(pod, &format!("crowd-{i}")), &conf))
            .expect("add");
        results.push(r.render(conf.cni_version));
    }
    assert_eq!(
        d.net().dump_requests(),
        0,
        "61 ADDs read no whole table of the host or a pod"
    );
    let last = pods.last().expect("pods");
    let veth = host_veth_name("eni", "default", "crowd-60", 0);
    let ip: Ipv4Addr = results[60]["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("the last pod's address");
    assert_wired(&host, last, &veth, ip, 2, 9001);
    let mut del = add_invocation(last, "crowd-60");
    del.command = vpc_cni_plugin::env::Command::Del;
    let mut c = conf.clone();
    c.prev_result = Some(results[60].clone());
    rt.block_on(d.del(&del, &c)).expect("del");
    assert_eq!(d.net().dump_requests(), 0, "DEL reads no whole table");
    assert_eq!(pod_rules(&host).len(), 2 * 60, "the other pods' rules stay");
}

#[test]
fn add_into_a_file_that_is_not_a_namespace_is_refused_before_ipamd_is_asked() {
    if skip_netns_test("not_a_namespace") {
        return;
    }
    let host = TestNetns::new("host").expect("host ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 5, 10), 2, 1, 2);
    let conf = conf("1.1.0", &ipamd.socket);
    // A stale path, as a runtime leaves it after unmounting a sandbox: a regular file.
    let dir = tempfile::tempdir().expect("dir");
    let stale = dir.path().join("netns-stale");
    std::fs::write(&stale, b"").expect("file");
    let r = plugin(
        &host,
        &cni_env("ADD", "c1", &stale.display().to_string(), "s-0"),
        &conf,
    );
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let err = r.json.expect("error");
    // skel's rule for a CNI_NETNS that is not a namespace: container unknown (3).
    assert_eq!(err["code"], 3, "{err}");
    assert!(
        err["details"]
            .as_str()
            .unwrap_or("")
            .contains("not a network namespace"),
        "{err}"
    );
    assert!(
        ipamd.ipam.calls().is_empty(),
        "ipamd was asked: {:?}",
        ipamd.ipam.calls()
    );
    assert!(
        host_links(&host).is_empty(),
        "nothing built: {:?}",
        host_links(&host)
    );
}
