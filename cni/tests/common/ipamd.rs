//! The real `ipamd` daemon with `--backend sim` (the embedded VPC simulator on loopback), run
//! as a process inside a test node namespace. Its gRPC socket and checkpoint live in a temp
//! dir; metrics and introspection listen on port 0 of the node namespace's loopback. `--backend
//! sim` does no host wiring (ipamd/src/daemon.rs), so the namespace sees only what the plugin
//! builds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vpc_cni_net::Netns;
use vpc_cni_rpc::ServingStatus;

/// Start-up bound: the simulator, IMDS, EC2 describes and the first pool fill, on a busy
/// 2-core machine. A healthy start takes well under a second.
pub const START_WAIT: Duration = Duration::from_secs(90);
/// Bound on one introspection or health request, and on waiting for the pool to fill.
pub const WAIT: Duration = Duration::from_secs(60);

/// `target/<profile>/<name>`, next to the `deps/` directory holding this test or bench
/// executable, or `$<VAR>` when set (e.g. `IPAMD_BIN`). Panics, saying how to build it, when
/// the binary is missing.
pub fn workspace_bin(name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p {name}` for the tests, `cargo build \
         --release -p {name}` for the bench; `cargo nextest run --workspace` builds it), or set \
         {var}",
        bin.display()
    );
    bin
}

/// A running `ipamd --backend sim`, killed when dropped.
pub struct RealIpamd {
    /// The gRPC socket the plugin dials.
    pub socket: PathBuf,
    /// ipamd's stderr (its log).
    pub log: PathBuf,
    /// The introspection address (in the node namespace).
    pub introspection: SocketAddr,
    node: Netns,
    child: Child,
    _dir: tempfile::TempDir,
}

/// A snapshot of ipamd's introspection (`GET /v1/enis`, card 0).
#[derive(Debug, Clone)]
pub struct Enis {
    /// `TotalIPs`.
    pub total: i64,
    /// `AssignedIPs`.
    pub assigned: i64,
    /// Every address of every ENI: route table id, and the pod name it is assigned to (empty
    /// when free).
    pub addresses: BTreeMap<Ipv4Addr, (u32, String)>,
}

impl RealIpamd {
    /// Starts ipamd inside `node` (whose loopback must be up) with `env` added to the settings
    /// of a test node, and waits until its gRPC health answers SERVING. `data` (e.g. a tmpfs
    /// directory) holds the socket and checkpoint; `None` uses the system temp dir.
    pub fn start(node: &Netns, env: &[(&str, String)], data: Option<&Path>) -> RealIpamd {
        let bin = workspace_bin("ipamd", "IPAMD_BIN");
        let dir = match data {
            Some(d) => tempfile::Builder::new()
                .prefix("vcn-ipamd-")
                .tempdir_in(d)
                .expect("tempdir"),
            None => tempfile::Builder::new()
                .prefix("vcn-ipamd-")
                .tempdir()
                .expect("tempdir"),
        };
        let socket = dir.path().join("run/ipamd.sock");
        let log = dir.path().join("ipamd.log");
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .args(["--backend", "sim"])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("IPAMD_GRPC_SOCKET", &socket)
            .env(
                "AWS_VPC_K8S_CNI_BACKING_STORE",
                dir.path().join("state/ipam.json"),
            )
            .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
            .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
            .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
            .env("VPC_CNI_POOL_TICK", "200ms")
            .env("IP_COOLDOWN_PERIOD", "0")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("ipamd log file"));
        // Spawned from a thread inside the node namespace: the daemon lives there.
        let child = node
            .run(move || cmd.spawn())
            .expect("enter node netns")
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut ipamd = RealIpamd {
            socket,
            log,
            introspection: SocketAddr::from(([127, 0, 0, 1], 0)),
            node: node.try_clone().expect("dup netns"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(status) = ipamd.child.try_wait().expect("try_wait") {
                panic!(
                    "ipamd exited during start-up ({status}):\n{}",
                    ipamd.log_text()
                );
            }
            if let Some(addr) = ready_line_introspection(&ipamd.log_text()) {
                ipamd.introspection = addr;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ipamd not ready after {START_WAIT:?}:\n{}",
                ipamd.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let health = super::rt().block_on(vpc_cni_rpc::check_health(&ipamd.socket, "", WAIT));
        assert!(
            matches!(health, Ok(ServingStatus::Serving)),
            "ipamd health after its ready line: {health:?}\n{}",
            ipamd.log_text()
        );
        ipamd
    }

    /// ipamd's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<ipamd log: {e}>"))
    }

    /// `GET /v1/enis` from inside the node namespace.
    pub fn enis(&self) -> Enis {
        let addr = self.introspection;
        let reply = self
            .node
            .run(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
                s.set_read_timeout(Some(WAIT))?;
                s.write_all(b"GET /v1/enis HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                Ok(reply)
            })
            .expect("enter node netns")
            .unwrap_or_else(|e| panic!("introspection {addr}: {e}"));
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        assert!(head.contains(" 200 "), "introspection reply: {reply}");
        let cards: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("introspection body ({e}): {body}"));
        let card = &cards["0"];
        let mut addresses = BTreeMap::new();
        for eni in card["ENIs"].as_object().expect("ENIs").values() {
            let table = eni["RouteTableID"].as_u64().expect("RouteTableID") as u32;
            for cidr in eni["AvailableIPv4Cidrs"]
                .as_object()
                .expect("AvailableIPv4Cidrs")
                .values()
            {
                for (ip, info) in cidr["IPAddresses"].as_object().expect("IPAddresses") {
                    let pod = info["IPAMMetadata"]["k8sPodName"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    addresses.insert(ip.parse().expect("address"), (table, pod));
                }
            }
        }
        Enis {
            total: card["TotalIPs"].as_i64().expect("TotalIPs"),
            assigned: card["AssignedIPs"].as_i64().expect("AssignedIPs"),
            addresses,
        }
    }

    /// Waits (bounded by [`WAIT`]) until ipamd has at least `free` unassigned addresses.
    pub fn wait_for_free(&self, free: i64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let e = self.enis();
            if e.total - e.assigned >= free {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipamd has {} free addresses after {WAIT:?}, {free} wanted:\n{}",
                e.total - e.assigned,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The introspection address in ipamd's `ready:` line (ipamd/src/main.rs).
fn ready_line_introspection(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.starts_with("ipamd: ready:"))?;
    line.split("introspection Some(")
        .nth(1)?
        .split(')')
        .next()?
        .parse()
        .ok()
}

impl Drop for RealIpamd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
