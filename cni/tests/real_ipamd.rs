//! The plugin binary against the real `ipamd` daemon (`--backend sim`: the embedded VPC
//! simulator) in real network namespaces (root only; skipped otherwise). ipamd runs as a process
//! in a test node namespace; every pod gets ADD, CHECK and DEL from the built `aws-cni`, and
//! everything is read back with netlink and from ipamd's introspection.
//!
//! Needs `target/<profile>/ipamd` (built by `cargo nextest run --workspace`, or
//! `cargo build -p ipamd`), or `IPAMD_BIN`.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::ipamd::RealIpamd;
use common::*;
use serde_json::json;
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::MAIN_TABLE;

/// Pods wired at once: more than one ENI's worth of addresses on an m5.large (9 per ENI), so
/// pods land on the primary ENI (main table) and on secondary ENIs (table device + 1).
const PODS: usize = 20;

struct Pod {
    ns: TestNetns,
    name: String,
    container: String,
    ip: Ipv4Addr,
    table: u32,
    conf: serde_json::Value,
    result: serde_json::Value,
}

#[test]
fn pods_add_check_ping_del_against_the_real_ipamd_and_leave_nothing_behind() {
    if skip_netns_test("real_ipamd") {
        return;
    }
    let host = TestNetns::new("node").expect("node ns");
    make_node(&host);
    let ipamd = RealIpamd::start(
        &host,
        &[
            ("VPC_CNI_SIM_INSTANCE_TYPE", "m5.large".into()),
            ("WARM_IP_TARGET", PODS.to_string()),
        ],
        None,
    );
    // The pool is filled in the background; the plugin's pool wait covers the rest, but a
    // filled pool keeps this test about wiring.
    ipamd.wait_for_free(PODS as i64);
    let versions = ["0.4.0", "1.0.0", "1.1.0"];
    let mut pods: Vec<Pod> = Vec::new();
    for i in 0..PODS {
        let version = versions[i % versions.len()];
        let ns = TestNetns::new("pod").expect("pod ns");
        let name = format!("real-{i}");
        let container = format!("rc{i}");
        let mut conf = conf(version, &ipamd.socket);
        conf["poolWaitSeconds"] = json!(30);
        conf["poolRetryMs"] = json!(100);
        let r = plugin(
            &host,
            &cni_env("ADD", &container, &ns_path(&ns), &name),
            &conf,
        );
        assert_eq!(
            r.code,
            0,
            "ADD {name}: {} {}\n--- ipamd ---\n{}",
            r.stdout,
            r.stderr,
            ipamd.log_text()
        );
        let res = r.json.expect("result");
        assert_eq!(res["cniVersion"], version);
        let veth = host_veth_name("eni", "default", &name, 0);
        assert_eq!(res["interfaces"][0]["name"], veth.as_str());
        assert_eq!(res["interfaces"][1]["name"], "eth0");
        assert_eq!(res["interfaces"][1]["sandbox"], ns_path(&ns).as_str());
        let table: u32 = res["interfaces"][1]["mac"]
            .as_str()
            .expect("route table in eth0's mac")
            .parse()
            .expect("table id");
        let addr = res["ips"][0]["address"].as_str().expect("address");
        let ip: Ipv4Addr = addr
            .strip_suffix("/32")
            .unwrap_or_else(|| panic!("a /32: {addr}"))
            .parse()
            .expect("ip");
        assert_wired(&host, &ns, &veth, ip, table, 9001);
        let chk = plugin(
            &host,
            &cni_env("CHECK", &container, &ns_path(&ns), &name),
            &with_prev(conf.clone(), &res),
        );
        assert_eq!(
            (chk.code, chk.json.clone()),
            (0, None),
            "CHECK {name}: {}",
            chk.stderr
        );
        pods.push(Pod {
            ns,
            name,
            container,
            ip,
            table,
            conf,
            result: res,
        });
    }

    // ipamd's view agrees with the results: each address assigned to its pod, on the ENI whose
    // route table the result names.
    let enis = ipamd.enis();
    assert_eq!(enis.assigned, PODS as i64, "ipamd counts every pod");
    for p in &pods {
        assert_eq!(
            enis.addresses.get(&p.ip),
            Some(&(p.table, p.name.clone())),
            "ipamd's introspection for {} ({})",
            p.ip,
            p.name
        );
    }
    let ips: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), PODS, "distinct addresses");
    let tables: BTreeSet<u32> = pods.iter().map(|p| p.table).collect();
    assert!(
        tables.len() >= 2,
        "pods on more than one ENI (9 addresses each): {tables:?}"
    );
    assert!(
        tables
            .iter()
            .all(|t| *t == MAIN_TABLE || (2..=3).contains(t)),
        "main for the primary ENI, device + 1 for the others: {tables:?}"
    );

    // Node to every pod, and every pod to the next one.
    for (i, p) in pods.iter().enumerate() {
        assert!(ping(host.name(), p.ip), "node -> {} ({})", p.name, p.ip);
        let next = &pods[(i + 1) % pods.len()];
        assert!(
            ping(p.ns.name(), next.ip),
            "{} ({}) -> {} ({})",
            p.name,
            p.ip,
            next.name,
            next.ip
        );
    }

    // DEL, DEL again, then DEL with an empty netns (as containerd does once the sandbox is
    // gone): all succeed and print nothing.
    for p in &pods {
        let conf = with_prev(p.conf.clone(), &p.result);
        for netns in [ns_path(&p.ns), ns_path(&p.ns), String::new()] {
            let del = plugin(&host, &cni_env("DEL", &p.container, &netns, &p.name), &conf);
            assert_eq!(
                (del.code, del.json.clone()),
                (0, None),
                "DEL {} (netns {netns:?}): {}",
                p.name,
                del.stderr
            );
        }
    }
    assert_eq!(pod_rules(&host), Vec::<String>::new(), "no pod rules left");
    assert_eq!(
        pod_routes(&host),
        Vec::<String>::new(),
        "no pod routes left"
    );
    let enis = ipamd.enis();
    assert_eq!(enis.assigned, 0, "ipamd: nothing assigned after DEL");
    assert!(
        enis.addresses.values().all(|(_, pod)| pod.is_empty()),
        "no address keeps a pod: {:?}",
        enis.addresses
    );
    // The pod namespaces go; their veths go with them.
    drop(pods);
    eventually("host veths to die with their pod namespaces", || {
        host_links(&host).is_empty()
    });
}
