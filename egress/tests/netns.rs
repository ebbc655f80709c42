//! egress-cni with the built binary in namespaces the test creates (root only; skipped
//! otherwise): a "node" namespace with an uplink to an "outside" namespace, a pod wired by the
//! aws-cni pod wiring (`vpc-cni-net`), the reference `host-local` as IPAM from
//! `/usr/lib/cni`. The outside namespace has no route back to the egress ranges, so a reply
//! only arrives when the node SNATed the pod's packets to its own address.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use vpc_cni_egress::wiring::chain_name;
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Family, NetlinkPodNetwork, PodIfSpec, PodNetwork};
use vpc_cni_plugin::result::{AddResult, DummyInfo, PodAttachment};
use vpc_cni_plugin::version::CniVersion;

const BIN: &str = env!("CARGO_BIN_EXE_egress-cni");
const CNI_PATH: &str = "/usr/lib/cni";

fn sh(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec")
}

fn must(ns: &str, args: &[&str]) {
    let o = sh(ns, args);
    assert!(
        o.status.success(),
        "{ns}: {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn out(ns: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&sh(ns, args).stdout).into_owned()
}

fn have_host_local() -> bool {
    std::path::Path::new(CNI_PATH).join("host-local").exists()
}

/// A node namespace with `eth0` to an outside namespace: node `10.0.0.10/24` and
/// `2001:db8:aa::10/64`, outside `10.0.0.1/24`, `2001:db8:aa::1/64` and the far hosts
/// `198.51.100.7` and `2001:db8:bb::7` on its loopback; the node's default routes go outside.
/// The outside knows nothing of the node's pods.
fn node_and_outside() -> (TestNetns, TestNetns) {
    let node = TestNetns::new("enode").expect("node ns");
    let outside = TestNetns::new("eout").expect("outside ns");
    let (n, o) = (node.name().to_string(), outside.name().to_string());
    must(
        &n,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "ext", "netns", &o,
        ],
    );
    for (ns, dev, v4, v6) in [
        (&n, "eth0", "10.0.0.10/24", "2001:db8:aa::10/64"),
        (&o, "ext", "10.0.0.1/24", "2001:db8:aa::1/64"),
    ] {
        must(ns, &["ip", "link", "set", "lo", "up"]);
        must(ns, &["ip", "link", "set", dev, "up"]);
        must(ns, &["ip", "addr", "add", v4, "dev", dev]);
        must(ns, &["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]);
    }
    must(&o, &["ip", "addr", "add", "198.51.100.7/32", "dev", "lo"]);
    must(
        &o,
        &["ip", "-6", "addr", "add", "2001:db8:bb::7/128", "dev", "lo"],
    );
    must(&n, &["ip", "route", "add", "default", "via", "10.0.0.1"]);
    must(
        &n,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:aa::1",
        ],
    );
    // As the init container sets it (IPv6 mode or ENABLE_V6_EGRESS), in the test node only.
    must(&n, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    // Counters of what reaches the outside from the node's own addresses.
    must(
        &o,
        &["iptables", "-A", "INPUT", "-s", "10.0.0.10", "-p", "icmp"],
    );
    must(
        &o,
        &[
            "ip6tables",
            "-A",
            "INPUT",
            "-s",
            "2001:db8:aa::10",
            "-p",
            "ipv6-icmp",
        ],
    );
    (node, outside)
}

fn counted(outside: &str, bin: &str, src: &str) -> u64 {
    let text = out(outside, &[bin, "-L", "INPUT", "-v", "-n", "-x"]);
    text.lines()
        .filter(|l| l.contains(src))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Wires a pod into `node` as aws-cni does and returns its namespace and the result JSON
/// (0.4.0) aws-cni would have printed.
fn wire_pod(node: &TestNetns, name: &str, ip: &str) -> (TestNetns, Value) {
    let pod = TestNetns::new("epod").expect("pod ns");
    let spec = PodIfSpec {
        netns: pod.path().to_path_buf(),
        host_veth: host_veth_name("eni", "default", name, 0),
        container_ifname: "eth0".into(),
        index: 0,
        ip: ip.parse().expect("ip"),
        mtu: 9001,
        route_table: 254,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let net = NetlinkPodNetwork::new(node.try_clone().expect("dup")).expect("net");
        net.setup_interface(&spec).await.expect("wire pod");
    });
    let att = PodAttachment {
        host_veth: Some(spec.host_veth.clone()),
        container_ifname: "eth0".into(),
        sandbox: pod.path().display().to_string(),
        ip: spec.ip,
        route_table: 254,
    };
    let r = AddResult::build(&[att], "dummyx", DummyInfo::Normal { device_number: 0 });
    (pod, r.render(CniVersion::V0_4_0))
}

fn conf(node_ip: &str, subnet: &str, dst: &str, data_dir: &std::path::Path, prev: &Value) -> Value {
    json!({
        "cniVersion": "0.4.0",
        "name": "aws-cni",
        "type": "egress-cni",
        "enabled": "true",
        "mtu": "9001",
        "randomizeSNAT": "prng",
        "nodeIP": node_ip,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": dst}],
            "dataDir": data_dir,
        },
        "pluginLogFile": "stderr",
        "pluginLogLevel": "debug",
        "prevResult": prev,
    })
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn egress(node: &TestNetns, command: &str, container: &str, netns: &str, stdin: &str) -> Run {
    let o = node
        .run(|| {
            let mut child = Command::new(BIN)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", container)
                .env("CNI_NETNS", netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", CNI_PATH)
                .env(
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            let _ = child
                .stdin
                .take()
                .expect("stdin")
                .write_all(stdin.as_bytes());
            child.wait_with_output().expect("wait")
        })
        .expect("enter node ns");
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The addresses host-local holds (one file per address, named by it).
fn reserved(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("aws-cni"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ipv4_egress_for_an_ipv6_pod_snats_to_the_node_and_del_removes_everything() {
    if skip_netns_test("ipv4_egress") || !have_host_local() {
        return;
    }
    let (node, outside) = node_and_outside();
    let (pod, prev) = wire_pod(&node, "e4", "2001:db8:1:2:3::9");
    let data = tempfile::tempdir().expect("dir");
    let c = conf(
        "10.0.0.10",
        "169.254.172.0/22",
        "0.0.0.0/0",
        data.path(),
        &prev,
    );
    let netns = pod.path().display().to_string();
    let r = egress(&node, "ADD", "ctr-e4", &netns, &c.to_string());
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let res: Value = serde_json::from_str(&r.stdout).expect("result");
    // prevResult with the egress veth appended; its address not in ips.
    let ifaces = res["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 5);
    assert_eq!(
        &ifaces[..3],
        prev["interfaces"].as_array().expect("prev")[..].as_ref()
    );
    let host_veth = ifaces[3]["name"].as_str().expect("host veth").to_string();
    assert!(
        host_veth.starts_with("veth") && host_veth.len() == 12,
        "{host_veth}"
    );
    assert_eq!(ifaces[4]["name"], "v4if0");
    assert_eq!(ifaces[4]["sandbox"], netns.as_str());
    assert_eq!(res["ips"], prev["ips"]);

    // Pod: v4if0 with a /22 from the range; gateway and subnet routes via .1 with src.
    let addr = out(
        pod.name(),
        &["ip", "-4", "-o", "addr", "show", "dev", "v4if0"],
    );
    assert!(
        addr.contains("169.254.172.") && addr.contains("/22"),
        "{addr}"
    );
    let routes = out(pod.name(), &["ip", "-4", "route", "show"]);
    assert!(
        routes.contains("default via 169.254.172.1 dev v4if0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.172.0/22 via 169.254.172.1 dev v4if0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.172.1 dev v4if0 scope link src 169.254.172."),
        "{routes}"
    );
    let host_addr = out(
        node.name(),
        &["ip", "-4", "-o", "addr", "show", "dev", &host_veth],
    );
    assert!(host_addr.contains("169.254.172.1/32"), "{host_addr}");
    assert_eq!(
        out(node.name(), &["sysctl", "-n", "net.ipv4.ip_forward"]).trim(),
        "1"
    );
    let chain = chain_name(Family::V4, "aws-cni", "ctr-e4");
    let nat = out(node.name(), &["iptables", "-t", "nat", "-S"]);
    assert!(nat.contains(&format!("-N {chain}")), "{nat}");
    assert!(
        nat.contains("-d 224.0.0.0/4") && nat.contains("--to-source 10.0.0.10 --random-fully"),
        "{nat}"
    );
    assert!(nat.contains(&format!("-j {chain}")), "{nat}");
    assert_eq!(
        reserved(data.path()).len(),
        1,
        "host-local holds one address"
    );

    // The pod reaches an IPv4 host outside; the outside saw the node's address.
    let before = counted(outside.name(), "iptables", "10.0.0.10");
    let ping = sh(pod.name(), &["ping", "-c", "2", "-W", "2", "198.51.100.7"]);
    assert!(
        ping.status.success(),
        "pod -> outside: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert!(counted(outside.name(), "iptables", "10.0.0.10") >= before + 2);

    // CHECK passes; DEL removes chain, jump, veth and the reservation; DEL twice is fine.
    let mut c_prev = c.clone();
    c_prev["prevResult"] = res.clone();
    let chk = egress(&node, "CHECK", "ctr-e4", &netns, &c_prev.to_string());
    assert_eq!(chk.code, 0, "{} {}", chk.stdout, chk.stderr);
    let d = egress(&node, "DEL", "ctr-e4", &netns, &c_prev.to_string());
    assert_eq!((d.code, d.stdout.trim()), (0, ""), "{}", d.stderr);
    let nat = out(node.name(), &["iptables", "-t", "nat", "-S"]);
    assert!(!nat.contains(&chain), "{nat}");
    assert!(!out(pod.name(), &["ip", "link"]).contains("v4if0"));
    assert!(!out(node.name(), &["ip", "link"]).contains(&host_veth));
    assert!(reserved(data.path()).is_empty(), "host-local released");
    let chk = egress(&node, "CHECK", "ctr-e4", &netns, &c_prev.to_string());
    assert_ne!(chk.code, 0, "CHECK after DEL must fail");
    for ns in [netns.as_str(), ""] {
        let d = egress(&node, "DEL", "ctr-e4", ns, &c_prev.to_string());
        assert_eq!(d.code, 0, "DEL again ({ns:?}): {}", d.stdout);
    }
}

#[test]
fn the_snat_chain_goes_even_when_the_pod_namespace_is_gone() {
    if skip_netns_test("egress_netns_gone") || !have_host_local() {
        return;
    }
    let (node, _outside) = node_and_outside();
    let (pod, prev) = wire_pod(&node, "e4g", "2001:db8:1:2:3::a");
    let data = tempfile::tempdir().expect("dir");
    let c = conf(
        "10.0.0.10",
        "169.254.172.0/22",
        "0.0.0.0/0",
        data.path(),
        &prev,
    );
    let netns = pod.path().display().to_string();
    let r = egress(&node, "ADD", "ctr-gone", &netns, &c.to_string());
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    drop(pod);
    // An ADD that fails after IPAM (the namespace is gone) gives the address back.
    let r = egress(&node, "ADD", "ctr-late", &netns, &c.to_string());
    assert_eq!(r.code, 1, "{}", r.stdout);
    let e: Value = serde_json::from_str(&r.stdout).expect("error json");
    assert_eq!(e["code"], 122, "{e}");
    assert_eq!(
        reserved(data.path()).len(),
        1,
        "only ctr-gone's address is held"
    );
    let d = egress(&node, "DEL", "ctr-gone", &netns, &c.to_string());
    assert_eq!(d.code, 0, "{} {}", d.stdout, d.stderr);
    let nat = out(node.name(), &["iptables", "-t", "nat", "-S"]);
    assert!(!nat.contains("CNI-E4-"), "{nat}");
    assert!(reserved(data.path()).is_empty());
}

#[test]
fn ipv6_egress_for_an_ipv4_pod_snats_to_the_node_ipv6() {
    if skip_netns_test("ipv6_egress") || !have_host_local() {
        return;
    }
    let (node, outside) = node_and_outside();
    let (pod, prev) = wire_pod(&node, "e6", "10.0.1.9");
    let data = tempfile::tempdir().expect("dir");
    let c = conf(
        "2001:db8:aa::10",
        "fd00::ac:00/118",
        "::/0",
        data.path(),
        &prev,
    );
    let netns = pod.path().display().to_string();
    let r = egress(&node, "ADD", "ctr-e6", &netns, &c.to_string());
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let res: Value = serde_json::from_str(&r.stdout).expect("result");
    assert_eq!(res["interfaces"][4]["name"], "v6if0");
    assert_eq!(res["ips"], prev["ips"]);
    assert_eq!(
        out(
            pod.name(),
            &["sysctl", "-n", "net.ipv6.conf.eth0.disable_ipv6"]
        )
        .trim(),
        "1",
        "the primary interface carries no IPv6"
    );
    let addr = out(
        pod.name(),
        &[
            "ip", "-6", "-o", "addr", "show", "dev", "v6if0", "scope", "global",
        ],
    );
    assert!(
        addr.contains("fd00::ac:") && addr.contains("/118"),
        "{addr}"
    );
    assert!(!addr.contains("tentative"), "DAD waited for: {addr}");
    let routes = out(pod.name(), &["ip", "-6", "route", "show", "default"]);
    assert!(
        routes.contains("via fe80::") && routes.contains("dev v6if0"),
        "{routes}"
    );
    let chain = chain_name(Family::V6, "aws-cni", "ctr-e6");
    let nat = out(node.name(), &["ip6tables", "-t", "nat", "-S"]);
    assert!(
        nat.contains(&format!("-N {chain}")) && nat.contains("-d ff00::/8"),
        "{nat}"
    );
    assert!(
        nat.contains("--to-source 2001:db8:aa::10 --random-fully"),
        "{nat}"
    );

    let before = counted(outside.name(), "ip6tables", "2001:db8:aa::10");
    let ping = sh(
        pod.name(),
        &["ping", "-6", "-c", "2", "-W", "2", "2001:db8:bb::7"],
    );
    assert!(
        ping.status.success(),
        "pod -> outside v6: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert!(counted(outside.name(), "ip6tables", "2001:db8:aa::10") >= before + 2);

    let d = egress(&node, "DEL", "ctr-e6", &netns, &c.to_string());
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert!(!out(node.name(), &["ip6tables", "-t", "nat", "-S"]).contains(&chain));
    assert!(!out(pod.name(), &["ip", "link"]).contains("v6if0"));
    assert!(reserved(data.path()).is_empty());
}

#[test]
fn disabled_passes_prev_result_through_byte_for_byte() {
    if skip_netns_test("egress_disabled") {
        return;
    }
    let node = TestNetns::new("enode").expect("node ns");
    let prev = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eni1"},{"name":"eth0","mac":"254","sandbox":"/x"}],   "ips":[{"version":"6","interface":1,"address":"2001:db8::5/128"}],"dns":{}}"#;
    let stdin = format!(
        r#"{{"cniVersion":"0.4.0","name":"aws-cni","type":"egress-cni","enabled":"false","nodeIP":"10.0.0.10","ipam":{{"type":"host-local"}},"pluginLogFile":"stderr","prevResult":{prev}}}"#
    );
    let r = egress(&node, "ADD", "c-off", "/proc/self/ns/net", &stdin);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim_end_matches('\n'), prev);
    let d = egress(&node, "DEL", "c-off", "", &stdin);
    assert_eq!((d.code, d.stdout.as_str()), (0, ""));
    // And a config error names its field.
    let bad = stdin.replace(r#""enabled":"false""#, r#""enabled":"maybe""#);
    let r = egress(&node, "ADD", "c-off", "/proc/self/ns/net", &bad);
    assert_eq!(r.code, 1);
    let e: Value = serde_json::from_str(&r.stdout).expect("error json");
    assert_eq!(e["code"], 7);
    assert!(e["msg"].as_str().expect("msg").contains("enabled"), "{e}");
}
