//! Shared pieces of the plugin's integration tests: an in-process ipamd (`CNIBackend` over a
//! unix socket in a temp dir, backed by `MemoryIpam`), running the built `aws-cni` binary
//! inside a test namespace, and netlink read-backs.

#![allow(dead_code)]

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
