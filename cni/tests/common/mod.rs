//! Shared pieces of the plugin's integration tests: an in-process ipamd (`CNIBackend` over a
//! unix socket in a temp dir, backed by `MemoryIpam`), running the built `aws-cni` binary
//! inside a test namespace, and netlink read-backs.

#![allow(dead_code)]

pub mod ipamd;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::{json, Value};
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use vpc_cni_net::Netns;
use vpc_cni_plugin::memory::{MemoryIpam, PoolAddress};
use vpc_cni_rpc::{
    AddNetworkReply, AddNetworkRequest, CniBackend, CniBackendServer, DelNetworkReply,
    DelNetworkRequest,
};

/// The built plugin binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_aws-cni");

struct Backend(Arc<MemoryIpam>);

#[tonic::async_trait]
impl CniBackend for Backend {
    async fn add_network(
        &self,
        r: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        self.0.add(r.get_ref()).map(Response::new)
    }

    async fn del_network(
        &self,
        r: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        self.0.del(r.get_ref()).map(Response::new)
    }
}

/// An in-process ipamd served on `<tempdir>/ipamd.sock` until dropped.
pub struct TestIpamd {
    /// The address pool and request log.
    pub ipam: Arc<MemoryIpam>,
    /// The socket path.
    pub socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestIpamd {
    /// Serves `pool` with health SERVING; returns once the socket accepts connections.
    pub fn start(pool: Vec<PoolAddress>) -> TestIpamd {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/ipamd.sock");
        let ipam = Arc::new(MemoryIpam::new(vpc_cni_plugin::CLIENT_VERSION, pool));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ipam2, socket2) = (ipam.clone(), socket.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (health, health_server) = vpc_cni_rpc::health_service().await;
                health.set_serving().await;
                let routes =
                    Routes::new(CniBackendServer::new(Backend(ipam2))).add_service(health_server);
                let listener = vpc_cni_rpc::bind_unix(&socket2).expect("bind");
                ready_tx.send(()).expect("ready");
                vpc_cni_rpc::serve_listener(listener, routes, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
            });
        });
        ready_rx.recv().expect("server ready");
        TestIpamd {
            ipam,
            socket,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `n` addresses from `base` on device `dev` with host table `table`.
    pub fn with_pool(base: Ipv4Addr, n: u32, dev: i32, table: i32) -> TestIpamd {
        TestIpamd::start(MemoryIpam::pool(base, n, dev, table))
    }
}

impl Drop for TestIpamd {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The plugin's network config (`cniVersion` `version`) pointing at `socket`.
pub fn conf(version: &str, socket: &std::path::Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "aws-cni",
        "type": "aws-cni",
        "vethPrefix": "eni",
        "mtu": "9001",
        "podSGEnforcingMode": "strict",
        "pluginLogFile": "stderr",
        "pluginLogLevel": "info",
        "ipamdSocket": socket,
        "poolWaitSeconds": 1,
        "poolRetryMs": 50,
    })
}

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// stdout, parsed when not empty.
    pub json: Option<Value>,
    /// Raw stdout.
    pub stdout: String,
    /// stderr (logs).
    pub stderr: String,
}

/// Runs `bin` inside `ns` (a thread enters the namespace and spawns the child there, so the
/// plugin's "host" is the test namespace, never the root one).
pub fn exec_in(ns: &Netns, bin: &str, env: &[(&str, String)], stdin: &Value) -> Run {
    let input = stdin.to_string();
    let out = ns
        .run(|| {
            let mut child = Command::new(bin)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn plugin");
            // VERSION and the about text do not read stdin: a broken pipe is fine.
            let _ = child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes());
            child.wait_with_output().expect("wait plugin")
        })
        .expect("enter netns");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if stdout.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("stdout is not exactly one JSON document ({e}): {stdout:?}")
        }))
    };
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The CNI environment of one pod.
pub fn cni_env(
    command: &str,
    container: &str,
    netns: &str,
    pod: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container.to_string()),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/usr/lib/cni".to_string()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container}"
            ),
        ),
    ]
}

/// Runs the plugin binary inside `ns`.
pub fn plugin(ns: &Netns, env: &[(&str, String)], stdin: &Value) -> Run {
    exec_in(ns, BIN, env, stdin)
}

/// `conf` with `prevResult` set.
pub fn with_prev(mut conf: Value, prev: &Value) -> Value {
    conf["prevResult"] = prev.clone();
    conf
}

/// A current-thread runtime for netlink read-backs.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs a shell command inside the named namespace (`ip netns exec`), returning success.
pub fn sh_in(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec")
}

/// Polls `f` every 20 ms for up to 5 s.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..250 {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// The path of a test namespace, as `CNI_NETNS`.
pub fn ns_path(ns: &vpc_cni_net::testing::TestNetns) -> String {
    ns.path().display().to_string()
}

/// Reads back everything ADD must have built for one pod (host veth `veth`, pod address `ip`,
/// ENI route table `table`, `mtu`) and compares it with the spec (spec/cni.md 6.2), exactly:
/// the pod's `eth0` has that one IPv4 address and the pod's main table exactly the two routes
/// (`169.254.1.1 scope link`, default via it), one permanent neighbour entry for the gateway
/// with the host veth's MAC; on the host exactly one route to the pod (`dev veth scope link` in
/// main) and exactly the pod's rules (`to ip lookup main` at 512, plus `from ip lookup table` at
/// 1536 when `table` is not main).
pub fn assert_wired(host: &Netns, pod: &Netns, veth: &str, ip: Ipv4Addr, table: u32, mtu: u32) {
    use std::net::IpAddr;
    use vpc_cni_net::{Family, IpCidr, Netlink, Route, MAIN_TABLE};
    rt().block_on(async {
        let h = Netlink::open(host).expect("host netlink");
        let p = Netlink::open(pod).expect("pod netlink");
        let hl = h
            .link_by_name(veth)
            .await
            .expect("links")
            .expect("host veth exists");
        assert!(hl.up, "host veth {veth} up");
        assert_eq!(hl.mtu, mtu, "host veth {veth} MTU");
        let host_mac = hl.mac.expect("host mac");
        assert!(
            host_mac.is_local_unicast(),
            "host MAC is set explicitly (local unicast)"
        );
        let eth0 = p.link_by_name("eth0").await.expect("links").expect("eth0");
        assert!(eth0.up, "eth0 up");
        assert_eq!(eth0.mtu, mtu, "eth0 MTU");
        let cidr = IpCidr::host_v4(ip);
        let addrs: Vec<IpCidr> = p
            .addresses(Some(eth0.index))
            .await
            .expect("addrs")
            .into_iter()
            .filter(|a| a.cidr.addr.is_ipv4())
            .map(|a| a.cidr)
            .collect();
        assert_eq!(addrs, vec![cidr], "eth0's IPv4 addresses");
        let gw = IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1));
        let mut routes = p
            .routes(Family::V4, Some(MAIN_TABLE))
            .await
            .expect("routes");
        let mut expected = vec![
            Route::link_scope(IpCidr::host(gw), eth0.index, MAIN_TABLE),
            Route::default_via(gw, eth0.index, MAIN_TABLE),
        ];
        let key = |r: &Route| (r.dst.prefix_len, r.dst.addr);
        routes.sort_by_key(key);
        expected.sort_by_key(key);
        assert_eq!(routes, expected, "the pod's main table");
        let neigh: Vec<_> = p
            .neighbours(Family::V4, Some(eth0.index))
            .await
            .expect("neigh")
            .into_iter()
            .filter(|n| n.ip == gw)
            .collect();
        assert!(
            neigh.len() == 1 && neigh[0].permanent && neigh[0].mac == Some(host_mac),
            "one permanent 169.254.1.1 -> host veth MAC {host_mac}: {neigh:?}"
        );
        let to_pod: Vec<Route> = h
            .routes(Family::V4, None)
            .await
            .expect("routes")
            .into_iter()
            .filter(|r| r.dst == cidr)
            .collect();
        assert_eq!(
            to_pod,
            vec![Route::link_scope(cidr, hl.index, MAIN_TABLE)],
            "the host's routes to {cidr}"
        );
        let mut rules: Vec<(u32, Option<IpCidr>, Option<IpCidr>, u32)> = h
            .rules(Family::V4)
            .await
            .expect("rules")
            .into_iter()
            .filter(|r| r.from == Some(cidr) || r.to == Some(cidr))
            .map(|r| (r.priority, r.from, r.to, r.table))
            .collect();
        rules.sort();
        let mut want = vec![(512, None, Some(cidr), MAIN_TABLE)];
        if table != MAIN_TABLE {
            want.push((1536, Some(cidr), None, table));
        }
        assert_eq!(
            rules, want,
            "the host's rules for {cidr} (1536 only for secondary ENIs)"
        );
    });
}

/// The pod rules (512/1536) left in `host`.
pub fn pod_rules(host: &Netns) -> Vec<String> {
    rt().block_on(async {
        let h = vpc_cni_net::Netlink::open(host).expect("netlink");
        h.rules(vpc_cni_net::Family::V4)
            .await
            .expect("rules")
            .into_iter()
            .filter(|r| r.priority == 512 || r.priority == 1536)
            .map(|r| r.to_string())
            .collect()
    })
}

/// The host routes to /32s (the pods') left in `host`'s main table.
pub fn pod_routes(host: &Netns) -> Vec<String> {
    rt().block_on(async {
        let h = vpc_cni_net::Netlink::open(host).expect("netlink");
        h.routes(vpc_cni_net::Family::V4, Some(vpc_cni_net::MAIN_TABLE))
            .await
            .expect("routes")
            .into_iter()
            .filter(|r| r.dst.prefix_len == 32)
            .map(|r| format!("{r:?}"))
            .collect()
    })
}

/// The links of `host` other than `lo`.
pub fn host_links(host: &Netns) -> Vec<String> {
    rt().block_on(async {
        let h = vpc_cni_net::Netlink::open(host).expect("netlink");
        h.links()
            .await
            .expect("links")
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n != "lo")
            .collect()
    })
}

/// One ping from the named namespace `from` to `to` (2 s bound).
pub fn ping(from: &str, to: Ipv4Addr) -> bool {
    sh_in(from, &["ping", "-c", "1", "-W", "2", &to.to_string()])
        .status
        .success()
}

/// Makes `host` a node: loopback up, forwarding on (pod to pod), and `192.168.255.1/32` on `lo`
/// to ping from. Changes only that test namespace.
pub fn make_node(host: &vpc_cni_net::testing::TestNetns) {
    assert!(
        sh_in(host.name(), &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .status
            .success()
    );
    assert!(sh_in(host.name(), &["ip", "link", "set", "lo", "up"])
        .status
        .success());
    assert!(sh_in(
        host.name(),
        &["ip", "addr", "add", "192.168.255.1/32", "dev", "lo"]
    )
    .status
    .success());
}
