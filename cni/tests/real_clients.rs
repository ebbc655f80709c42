//! Real CNI clients and peers (root only; skipped when the tools are missing):
//! - the reference plugins of Debian's `containernetworking-plugins` (`portmap`, `bandwidth`,
//!   `tuning`) chained after ours in one conflist, executed the way libcni does (ADD in order
//!   with each result as the next `prevResult`, CHECK, DEL in reverse order);
//! - containerd's `ctr run --cni` with a private containerd (own root, state and socket in a
//!   temp dir) and a busybox rootfs, creating a container whose eth0 has our address.
//!
//! Everything runs inside a test "host" namespace; processes are started from a thread that
//! entered it (not `ip netns exec`, which would hide the cgroup mounts runc needs).

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;
use serde_json::{json, Value};
use vpc_cni_net::names::host_veth_name;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;

const REF_PLUGINS: &str = "/usr/lib/cni";

fn have(path: &str) -> bool {
    Path::new(path).exists()
}

fn run_in(ns: &Netns, cmd: &str, args: &[&str]) -> Output {
    ns.run(|| Command::new(cmd).args(args).output())
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// One plugin of a conflist, as libcni builds its stdin.
fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>, rc: &Value) -> Value {
    let mut c = plugin.clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    // Only the capabilities a plugin declares reach it.
    if let Some(caps) = plugin["capabilities"].as_object() {
        let mut runtime = json!({});
        for (k, on) in caps {
            if on.as_bool() == Some(true) && !rc[k].is_null() {
                runtime[k] = rc[k].clone();
            }
        }
        c["runtimeConfig"] = runtime;
    }
    c
}

fn binary(plugin: &Value) -> String {
    match plugin["type"].as_str().expect("type") {
        "aws-cni" => BIN.to_string(),
        t => format!("{REF_PLUGINS}/{t}"),
    }
}

#[test]
fn reference_portmap_bandwidth_and_tuning_chain_after_ours() {
    if skip_netns_test("chain") {
        return;
    }
    for p in ["portmap", "bandwidth", "tuning"] {
        if !have(&format!("{REF_PLUGINS}/{p}")) {
            eprintln!(
                "skipping: {REF_PLUGINS}/{p} missing (apt-get install containernetworking-plugins)"
            );
            return;
        }
    }
    let host = TestNetns::new("host").expect("host ns");
    let pod = TestNetns::new("pod").expect("pod ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 8, 10), 2, 1, 2);
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "aws-cni",
        "plugins": [
            conf("1.0.0", &ipamd.socket),
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "tuning", "sysctl": {
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
                "net.ipv6.conf.lo.disable_ipv6": "1"
            }}
        ]
    });
    let rc = json!({
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8000000, "ingressBurst": 800000, "egressRate": 8000000, "egressBurst": 800000}
    });
    let plugins = list["plugins"].as_array().expect("plugins").clone();
    let netns = pod.path().display().to_string();
    let env = |cmd: &str| cni_env(cmd, "chain1", &netns, "chained-0");
    let mut prev: Option<Value> = None;
    for p in &plugins {
        let r = exec_in(
            &host,
            &binary(p),
            &env("ADD"),
            &plugin_conf(&list, p, prev.as_ref(), &rc),
        );
        assert_eq!(r.code, 0, "ADD {}: {} {}", p["type"], r.stdout, r.stderr);
        prev = Some(r.json.expect("result"));
    }
    let result = prev.expect("final result");
    // Our interfaces and address survive the chain.
    let veth = host_veth_name("eni", "default", "chained-0", 0);
    assert_eq!(result["interfaces"][0]["name"], veth.as_str());
    assert_eq!(result["ips"][0]["address"], "10.0.8.10/32");
    // portmap: a DNAT to the pod; bandwidth: shaping on the host veth; tuning: v6 off in the pod.
    let nat = run_in(&host, "iptables-save", &["-t", "nat"]);
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(nat.contains("--to-destination 10.0.8.10:80"), "{nat}");
    let tc = run_in(&host, "tc", &["qdisc", "show", "dev", &veth]);
    assert!(
        String::from_utf8_lossy(&tc.stdout).contains("tbf"),
        "{:?}",
        tc
    );
    let v6 = sh_in(
        pod.name(),
        &["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"],
    );
    assert_eq!(String::from_utf8_lossy(&v6.stdout).trim(), "1");
    // CHECK through the chain. portmap's own CHECK (v1.1.1 here) always looks for an IPv6
    // DNAT chain it only creates for IPv6 results, so it fails for any IPv4-only chain; the
    // reference conflist sets `disableCheck: true` anyway. Every other plugin is checked.
    for p in plugins.iter().filter(|p| p["type"] != "portmap") {
        let r = exec_in(
            &host,
            &binary(p),
            &env("CHECK"),
            &plugin_conf(&list, p, Some(&result), &rc),
        );
        assert_eq!(r.code, 0, "CHECK {}: {} {}", p["type"], r.stdout, r.stderr);
    }
    // DEL in reverse order, twice (the second with an empty netns).
    for netns_arg in [netns.as_str(), ""] {
        for p in plugins.iter().rev() {
            let e = cni_env("DEL", "chain1", netns_arg, "chained-0");
            let r = exec_in(
                &host,
                &binary(p),
                &e,
                &plugin_conf(&list, p, Some(&result), &rc),
            );
            assert_eq!(r.code, 0, "DEL {}: {} {}", p["type"], r.stdout, r.stderr);
        }
    }
    let nat = run_in(&host, "iptables-save", &["-t", "nat"]);
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains("10.0.8.10"),
        "portmap cleaned up"
    );
    let rules = sh_in(host.name(), &["ip", "rule", "show"]);
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("10.0.8.10"));
    assert_eq!(ipamd.ipam.assigned(), 0);
}

/// A private containerd in the host test namespace; killed, and its files removed, on drop
/// (also when the test fails).
struct PrivateContainerd {
    child: Child,
    dir: tempfile::TempDir,
    cleanup: Vec<PathBuf>,
}

impl PrivateContainerd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn start(host: &Netns) -> PrivateContainerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
                d.join("root").display(),
                d.join("state").display(),
                d.join("containerd.sock").display()
            ),
        )
        .expect("config");
        let log_path = d.join("containerd.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = host
            .run(|| {
                Command::new("containerd")
                    .arg("--config")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
            })
            .expect("enter netns")
            .expect("spawn containerd");
        let mut c = PrivateContainerd {
            child,
            dir,
            cleanup: Vec::new(),
        };
        // containerd loads its plugins before it listens: on a loaded 2-core machine that
        // took over 5 s once, so wait longer than `eventually`, and stop at once with its log
        // if it exits instead.
        for _ in 0..1500 {
            if c.socket().exists() {
                return c;
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!(
                    "containerd exited with {status} before listening:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!(
            "containerd's socket did not appear within 30 s:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.cleanup {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn ctr_run_with_cni_gives_the_container_our_address_and_cleans_up() {
    if skip_netns_test("ctr") {
        return;
    }
    for tool in [
        "/usr/bin/ctr",
        "/usr/bin/containerd",
        "/usr/sbin/runc",
        "/bin/busybox",
    ] {
        if !have(tool) {
            eprintln!("skipping: {tool} missing (apt-get install containerd runc busybox-static)");
            return;
        }
    }
    let host = TestNetns::new("host").expect("host ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 0, 9, 10), 2, 1, 2);
    let mut ctrd = PrivateContainerd::start(&host);
    // ctr --cni reads /etc/cni/net.d and /opt/cni/bin: a uniquely named plugin copy and a
    // conflist that sorts first, both removed on drop.
    let id = std::process::id();
    let plugin_name = format!("aws-cni-test-{id}");
    std::fs::create_dir_all("/opt/cni/bin").expect("bin dir");
    std::fs::create_dir_all("/etc/cni/net.d").expect("conf dir");
    let bin = PathBuf::from(format!("/opt/cni/bin/{plugin_name}"));
    ctrd.cleanup.push(bin.clone());
    std::fs::copy(BIN, &bin).expect("install plugin");
    let conflist = PathBuf::from(format!("/etc/cni/net.d/00-vpc-cni-test-{id}.conflist"));
    ctrd.cleanup.push(conflist.clone());
    let mut plugin = conf("1.0.0", &ipamd.socket);
    plugin["type"] = json!(plugin_name);
    plugin["pluginLogFile"] = json!(ctrd.dir.path().join("plugin.log"));
    let list = json!({"cniVersion": "1.0.0", "name": "aws-cni", "plugins": [plugin]});
    std::fs::write(&conflist, list.to_string()).expect("conflist");
    let rootfs = ctrd.dir.path().join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(sub)).expect("rootfs");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    let socket = ctrd.socket();
    let out = host
        .run(|| {
            Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .args(["run", "--rm", "--cni", "--rootfs"])
                .arg(&rootfs)
                .args([
                    &format!("vcn-{id}"),
                    "/bin/busybox",
                    "sh",
                    "-c",
                    "ip -4 addr show eth0; ip route",
                ])
                .output()
        })
        .expect("enter netns")
        .expect("ctr");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(ctrd.dir.path().join("plugin.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "ctr: {stdout} {} plugin log: {log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("inet 10.0.9.10/32"),
        "eth0 has our address: {stdout}"
    );
    assert!(
        stdout.contains("default via 169.254.1.1 dev eth0"),
        "{stdout}"
    );
    // ctr ran DEL on exit: the address is back in the pool and the host rules are gone.
    assert_eq!(ipamd.ipam.assigned(), 0, "plugin log: {log}");
    let rules = sh_in(host.name(), &["ip", "rule", "show"]);
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("10.0.9.10"));
    drop(ctrd);
    assert!(!bin.exists() && !conflist.exists());
}
