//! The real daemon and the real plugin on one simulated node: the workspace's `ipamd` binary
//! (`--backend aws`) started in a node namespace against the simulator served in the fabric
//! ([`crate::serve`]), the `aws-cni` binary run for ADD/DEL/CHECK as a container runtime does,
//! and read-outs of the daemon's state (introspection, checkpoint) to compare with the
//! simulator's.
//!
//! The binaries are the workspace's (`target/<profile>/ipamd` and `aws-cni`, see
//! [`workspace_bin`]): build them before running the tests
//! (`cargo build -p ipamd -p vpc-cni-plugin --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vpc_cni_net::Netns;
use vpc_cni_rpc::ServingStatus;

use crate::process::{output_in, NsProcess};
use crate::serve::SimServer;

/// A bounded wait generous enough for a busy 2-core machine; a healthy node answers in
/// milliseconds.
pub const WAIT: Duration = Duration::from_secs(20);
/// ipamd start-up: instance metadata, EC2 describes, the first pool fill.
pub const START_WAIT: Duration = Duration::from_secs(60);

/// `target/<profile>/<name>`, next to the `deps/` directory holding the running test
/// executable.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("test executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let bin = dir.join(name);
    ensure!(
        bin.is_file(),
        "{} is missing: build the binaries first (`cargo build -p ipamd -p vpc-cni-plugin \
         --bins`, or run the tests with `cargo test --workspace` / `cargo nextest run \
         --workspace`)",
        bin.display()
    );
    Ok(bin)
}

/// The seed of a scenario's random choices: `E2E_SEED` when set (to replay a run), else
/// taken from the clock. Scenarios print it at the start and in every failure.
pub fn e2e_seed() -> u64 {
    match std::env::var("E2E_SEED") {
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Copies the files of a failed run's directory `dir` (ipamd's log of every start, its
/// checkpoint, stdout) into `keep` (for example `$CARGO_TARGET_TMPDIR/<scenario>-<seed>`), so
/// that a failure seen once under load can be studied afterwards. Best effort: a failure to
/// copy is only reported.
pub fn keep_evidence(dir: &Path, keep: &Path) {
    if let Err(e) = std::fs::create_dir_all(keep) {
        eprintln!("e2e: cannot keep evidence in {}: {e}", keep.display());
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() {
            let _ = std::fs::copy(&p, keep.join(e.file_name()));
        }
    }
    eprintln!("e2e: ipamd's log and checkpoint kept in {}", keep.display());
}

/// Polls `f` every 50 ms until it returns true, failing with `what` once `wait` has passed.
pub fn wait_until(
    what: &str,
    wait: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {wait:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file's text, or a note saying why it could not be read (for failure messages).
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// ipamd's gRPC health on `socket`, from a runtime of its own: dropping it closes the
/// connection, so no idle client holds ipamd's graceful gRPC shutdown open.
pub fn health(socket: &Path, timeout: Duration) -> anyhow::Result<ServingStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime for the health check")?;
    Ok(rt.block_on(vpc_cni_rpc::check_health(socket, "", timeout))?)
}

/// `ip <args>` inside `ns`; stdout as text.
pub fn ip_in(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = output_in(ns, cmd, None)?;
    ensure!(out.status.success(), "ip {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `ipamd --backend aws` of a node, restartable: every start uses the same environment,
/// socket, checkpoint and log file (appended to, with a marker line per start).
///
/// Defaults: gRPC and introspection on unix sockets in `dir`, checkpoint `dir/ipam.json`, log
/// on stderr into `dir/ipamd.log`, metrics on a kernel-chosen loopback port, pool tick 500 ms,
/// no address cooldown. [`Ipamd::env`] adds or overrides variables before a start. Dropping
/// the handle kills the process.
#[derive(Debug)]
pub struct Ipamd {
    ns: Netns,
    bin: PathBuf,
    env: BTreeMap<OsString, OsString>,
    dir: PathBuf,
    process: Option<NsProcess>,
    starts: u32,
}

impl Ipamd {
    /// The daemon of node `instance_id` (namespace `ns`), talking to `server`, with its files
    /// in `dir`. Nothing runs until [`Ipamd::start`].
    pub fn new(
        bin: PathBuf,
        ns: &Netns,
        server: &SimServer,
        instance_id: &str,
        dir: &Path,
    ) -> anyhow::Result<Ipamd> {
        let mut ipamd = Ipamd {
            ns: ns.try_clone()?,
            bin,
            env: BTreeMap::new(),
            dir: dir.to_owned(),
            process: None,
            starts: 0,
        };
        let socket = ipamd.socket();
        let introspection = format!("unix:{}", ipamd.introspection_socket().display());
        let checkpoint = ipamd.checkpoint_path();
        ipamd
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_EC2_ENDPOINT", server.ec2_url())
            .env("AWS_ENDPOINT_URL_EC2", server.ec2_url())
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                server.imds_url(instance_id),
            )
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("IPAMD_GRPC_SOCKET", socket)
            .env("AWS_VPC_K8S_CNI_BACKING_STORE", checkpoint)
            .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
            .env("INTROSPECTION_BIND_ADDRESS", introspection)
            .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
            .env("VPC_CNI_POOL_TICK", "500ms")
            .env("IP_COOLDOWN_PERIOD", "0");
        Ok(ipamd)
    }

    /// Sets an environment variable of the next starts.
    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Unsets an environment variable of the next starts (e.g. the static EC2 credentials
    /// [`Ipamd::new`] sets, so that the daemon takes the instance role's from IMDS).
    pub fn unset_env(&mut self, key: impl Into<OsString>) -> &mut Self {
        self.env.remove(&key.into());
        self
    }

    /// The gRPC socket the plugin talks to.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("ipamd.sock")
    }

    /// The introspection socket.
    pub fn introspection_socket(&self) -> PathBuf {
        self.dir.join("introspect.sock")
    }

    /// The checkpoint file (`AWS_VPC_K8S_CNI_BACKING_STORE`).
    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join("ipam.json")
    }

    /// The log of every start so far.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("ipamd.log")
    }

    /// The log's text (for failure messages).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// The last `lines` lines of the log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How many times the daemon was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(NsProcess::pid)
    }

    /// Spawns the daemon without waiting for it to serve.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        ensure!(self.process.is_none(), "ipamd is already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open ipamd log")?;
        writeln!(log, "===== e2e: ipamd start {} =====", self.starts)?;
        let out = File::create(self.dir.join("ipamd.out")).context("create ipamd.out")?;
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .arg("--backend")
            .arg("aws")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log);
        self.process = Some(NsProcess::spawn(&self.ns, cmd)?);
        Ok(())
    }

    /// Waits (bounded) until the daemon's gRPC health is SERVING; fails early, with its log,
    /// if it exits.
    pub fn wait_serving(&mut self, wait: Duration) -> anyhow::Result<()> {
        let socket = self.socket();
        let started = {
            let process = self.process.as_mut().context("ipamd is not running")?;
            wait_until("ipamd health SERVING", wait, || {
                if let Some(status) = process.try_wait()? {
                    bail!("ipamd exited early ({status})");
                }
                let h = health(&socket, Duration::from_secs(2));
                Ok(matches!(h, Ok(ServingStatus::Serving)))
            })
        };
        started.with_context(|| format!("--- ipamd log (tail) ---\n{}", self.log_tail(80)))
    }

    /// [`Ipamd::spawn`] then [`Ipamd::wait_serving`] with [`START_WAIT`].
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_serving(START_WAIT)
    }

    /// SIGKILL (a crash) and reap; returns the exit status (`None` when it was not running).
    pub fn kill(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.process.take() {
            Some(mut p) => Ok(Some(p.kill()?)),
            None => Ok(None),
        }
    }

    /// The exit status if the daemon has exited on its own (a failpoint, a crash), without
    /// waiting; `None` while it runs or when it was not started. The handle is kept until
    /// [`Ipamd::kill`] reaps it.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.process.as_mut() {
            Some(p) => Ok(p.try_wait()?),
            None => Ok(None),
        }
    }

    /// The log of the latest start only (after its `===== e2e: ipamd start N =====` marker).
    pub fn log_of_last_start(&self) -> String {
        let log = self.log();
        let marker = format!("===== e2e: ipamd start {} =====", self.starts);
        match log.rfind(&marker) {
            Some(i) => log[i..].to_owned(),
            None => log,
        }
    }

    /// Sends SIGTERM to the running daemon without waiting.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("ipamd is not running")?;
        kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM).context("SIGTERM")?;
        Ok(())
    }

    /// Waits (bounded) for the daemon to exit on its own; returns its status.
    pub fn wait_exit(&mut self, wait: Duration) -> anyhow::Result<ExitStatus> {
        let p = self.process.as_mut().context("ipamd is not running")?;
        let status = p.wait_exit(wait)?;
        self.process = None;
        Ok(status)
    }

    /// `GET path` on the introspection socket; the body parsed as JSON.
    pub fn introspect(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let sock = self.introspection_socket();
        let mut stream = UnixStream::connect(&sock)
            .with_context(|| format!("connect to introspection {}", sock.display()))?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: ipamd\r\nConnection: close\r\n\r\n"
        )?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        ensure!(
            reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
            "introspection {path}: {reply}"
        );
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("introspection reply without a body")?;
        serde_json::from_str(body).with_context(|| format!("introspection body: {body}"))
    }

    /// The datastore as introspection `GET /v1/enis` shows it.
    pub fn view(&self) -> anyhow::Result<IpamdView> {
        IpamdView::parse(&self.introspect("/v1/enis")?)
    }

    /// The checkpoint file as written by the daemon.
    pub fn checkpoint(&self) -> anyhow::Result<Checkpoint> {
        Checkpoint::read(&self.checkpoint_path())
    }
}

/// Resident memory and open file descriptors of a process, read from `/proc/<pid>/status`
/// (`VmRSS`) and `/proc/<pid>/fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// `VmRSS` in KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/<pid>/fd`.
    pub fds: usize,
}

impl ProcSample {
    /// Samples process `pid`; fails (naming the file) when it is gone or `VmRSS` is missing.
    pub fn of(pid: u32) -> anyhow::Result<ProcSample> {
        let status_path = format!("/proc/{pid}/status");
        let status =
            std::fs::read_to_string(&status_path).with_context(|| format!("read {status_path}"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{status_path}: no VmRSS line in kB"))?;
        let fd_dir = format!("/proc/{pid}/fd");
        let fds = std::fs::read_dir(&fd_dir)
            .with_context(|| format!("read {fd_dir}"))?
            .count();
        Ok(ProcSample { rss_kib, fds })
    }
}

/// One ENI of ipamd's datastore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EniView {
    /// Primary ENI of the instance?
    pub is_primary: bool,
    /// Secondary /32 addresses in the pool.
    pub ips: BTreeSet<Ipv4Addr>,
    /// /28 prefixes in the pool (as text).
    pub prefixes: BTreeSet<String>,
    /// Assigned addresses → (pod namespace, pod name).
    pub assigned: BTreeMap<Ipv4Addr, (String, String)>,
}

/// ipamd's datastore, every card merged: ENI id → [`EniView`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamdView {
    /// ENIs by id.
    pub enis: BTreeMap<String, EniView>,
    /// `AssignedIPs` summed over the cards.
    pub assigned_count: i64,
}

impl IpamdView {
    /// Parses introspection `GET /v1/enis` (an object per card: `TotalIPs`, `AssignedIPs`,
    /// `ENIs` by id with `AvailableIPv4Cidrs` by CIDR with `IPAddresses` by address).
    pub fn parse(v: &serde_json::Value) -> anyhow::Result<IpamdView> {
        let cards = v.as_object().context("introspection: an object per card")?;
        ensure!(!cards.is_empty(), "introspection: no card");
        let mut out = IpamdView::default();
        for card in cards.values() {
            out.assigned_count += card["AssignedIPs"].as_i64().context("AssignedIPs")?;
            let enis = card["ENIs"].as_object().context("ENIs")?;
            for (id, e) in enis {
                let mut view = EniView {
                    is_primary: e["IsPrimary"].as_bool().unwrap_or(false),
                    ..EniView::default()
                };
                let cidrs = e["AvailableIPv4Cidrs"]
                    .as_object()
                    .context("AvailableIPv4Cidrs")?;
                for (cidr, info) in cidrs {
                    if info["IsPrefix"].as_bool().unwrap_or(false) {
                        view.prefixes.insert(cidr.clone());
                    } else {
                        let ip = cidr.split('/').next().unwrap_or(cidr);
                        view.ips.insert(ip.parse().with_context(|| cidr.clone())?);
                    }
                    let Some(addrs) = info["IPAddresses"].as_object() else {
                        continue;
                    };
                    for (addr, a) in addrs {
                        let key = &a["IPAMKey"];
                        if key["networkName"].as_str().unwrap_or("").is_empty() {
                            continue;
                        }
                        let meta = &a["IPAMMetadata"];
                        let pod = (
                            meta["k8sPodNamespace"].as_str().unwrap_or("").to_owned(),
                            meta["k8sPodName"].as_str().unwrap_or("").to_owned(),
                        );
                        view.assigned
                            .insert(addr.parse().with_context(|| addr.clone())?, pod);
                    }
                }
                out.enis.insert(id.clone(), view);
            }
        }
        Ok(out)
    }

    /// Every assigned address with its pod, over all ENIs (an address assigned on two ENIs
    /// appears once per ENI).
    pub fn assignments(&self) -> Vec<(Ipv4Addr, (String, String))> {
        self.enis
            .values()
            .flat_map(|e| e.assigned.iter().map(|(a, p)| (*a, p.clone())))
            .collect()
    }
}

/// One allocation of a `vpc-cni-ipam/1` checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// Sandbox container id.
    pub container_id: String,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Pod name from the metadata.
    pub pod_name: String,
}

/// A `vpc-cni-ipam/1` checkpoint file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Allocations in file order.
    pub allocations: Vec<CheckpointEntry>,
}

impl Checkpoint {
    /// Reads and checks `path` (version `vpc-cni-ipam/1`, IPv4 allocations); a missing file is
    /// an empty checkpoint.
    pub fn read(path: &Path) -> anyhow::Result<Checkpoint> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::default()),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("checkpoint: {text}"))?;
        ensure!(
            v["version"] == "vpc-cni-ipam/1",
            "checkpoint version: {text}"
        );
        let allocs = v["allocations"].as_array().context("allocations")?;
        let mut out = Checkpoint::default();
        for a in allocs {
            out.allocations.push(CheckpointEntry {
                container_id: a["containerID"].as_str().unwrap_or("").to_owned(),
                ipv4: a["ipv4"]
                    .as_str()
                    .context("ipv4")?
                    .parse()
                    .with_context(|| format!("allocation {a}"))?,
                pod_name: a["metadata"]["k8sPodName"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            });
        }
        Ok(out)
    }
}

/// The pod's global IPv6 addresses on `eth0`, as the pod itself sees them.
pub fn own_addresses6(ns: &Netns) -> anyhow::Result<Vec<std::net::Ipv6Addr>> {
    let out = ip_in(
        ns,
        &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"],
    )?;
    out.lines()
        .filter_map(|l| l.split(" inet6 ").nth(1))
        .filter_map(|r| r.split('/').next())
        .map(|a| a.parse().with_context(|| format!("address in {out}")))
        .collect()
}

/// The `aws-cni` plugin binary as a container runtime runs it: in the node namespace, `CNI_*`
/// variables, the network configuration on stdin.
#[derive(Debug)]
pub struct Plugin {
    bin: PathBuf,
    node_ns: Netns,
    socket: PathBuf,
    pool_wait_seconds: f64,
    extra_conf: serde_json::Map<String, serde_json::Value>,
}

/// A pod the plugin wired: its ADD result and IPv4 address.
#[derive(Debug, Clone)]
pub struct Added {
    /// The CNI result document (the runtime passes it back as `prevResult`).
    pub result: serde_json::Value,
    /// The pod's address.
    pub ip: Ipv4Addr,
}

/// A pod of an IPv6 cluster the plugin wired: its ADD result and IPv6 address.
#[derive(Debug, Clone)]
pub struct Added6 {
    /// The CNI result document.
    pub result: serde_json::Value,
    /// The pod's address.
    pub ip: std::net::Ipv6Addr,
}

/// The chained `egress-cni` plugin as the reference conflist runs it after `aws-cni`, with the
/// reference `host-local` as its IPAM (from `cni_path`).
#[derive(Debug)]
pub struct Egress {
    bin: PathBuf,
    node_ns: Netns,
    cni_path: String,
    conf: serde_json::Value,
}

impl Egress {
    /// IPv4 egress for the pods of an IPv6 node whose primary IPv4 address is `node_ip`
    /// (host-local addresses from 169.254.172.0/22 kept in `data_dir`, SNAT to `node_ip`).
    pub fn v4(
        bin: PathBuf,
        node_ns: &Netns,
        cni_path: &str,
        node_ip: Ipv4Addr,
        data_dir: &Path,
    ) -> anyhow::Result<Egress> {
        Ok(Egress {
            bin,
            node_ns: node_ns.try_clone()?,
            cni_path: cni_path.to_owned(),
            conf: serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "aws-cni",
                "type": "egress-cni",
                "enabled": "true",
                "mtu": "9001",
                "randomizeSNAT": "prng",
                "nodeIP": node_ip.to_string(),
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "169.254.172.0/22"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir,
                },
                "pluginLogFile": "stderr",
                "pluginLogLevel": "debug",
            }),
        })
    }

    /// Runs `command` for pod `pod` with `prev` (aws-cni's result) as `prevResult`.
    pub fn run(
        &self,
        command: &str,
        pod: &str,
        netns: &Path,
        prev: &serde_json::Value,
    ) -> anyhow::Result<Output> {
        let mut conf = self.conf.clone();
        conf["prevResult"] = prev.clone();
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("c-{pod}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
            );
        Ok(output_in(
            &self.node_ns,
            cmd,
            Some(conf.to_string().as_bytes()),
        )?)
    }

    /// ADD after aws-cni's `prev`; the chained result.
    pub fn add(
        &self,
        pod: &str,
        netns: &Path,
        prev: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let out = self.run("ADD", pod, netns, prev)?;
        ensure!(
            out.status.success(),
            "egress ADD {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("egress ADD {pod}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// DEL.
    pub fn del(&self, pod: &str, netns: &Path, prev: &serde_json::Value) -> anyhow::Result<()> {
        let out = self.run("DEL", pod, netns, prev)?;
        ensure!(
            out.status.success(),
            "egress DEL {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Plugin {
    /// The plugin `bin` in `node_ns`, talking to ipamd on `socket` (`poolWaitSeconds` 30).
    pub fn new(bin: PathBuf, node_ns: &Netns, socket: PathBuf) -> anyhow::Result<Plugin> {
        Ok(Plugin {
            bin,
            node_ns: node_ns.try_clone()?,
            socket,
            pool_wait_seconds: 30.0,
            extra_conf: serde_json::Map::new(),
        })
    }

    /// Sets `poolWaitSeconds`: how long ADD keeps asking ipamd while it has no free address
    /// or cannot be reached (default 30).
    pub fn with_pool_wait(mut self, seconds: f64) -> Plugin {
        self.pool_wait_seconds = seconds;
        self
    }

    /// Adds (or replaces) a field of the network configuration, e.g. `podSGEnforcingMode`.
    pub fn with_conf(mut self, key: &str, value: serde_json::Value) -> Plugin {
        self.extra_conf.insert(key.to_owned(), value);
        self
    }

    /// Runs `command` (`ADD`, `DEL`, `CHECK`) for pod `pod` (namespace `default`, sandbox
    /// `c-<pod>`, interface `eth0`) in the network namespace at `netns`; the raw output.
    pub fn run(
        &self,
        command: &str,
        pod: &str,
        netns: &Path,
        prev: Option<&serde_json::Value>,
    ) -> anyhow::Result<Output> {
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "aws-cni",
            "type": "aws-cni",
            "vethPrefix": "eni",
            "mtu": "9001",
            "pluginLogFile": "stderr",
            "pluginLogLevel": "Debug",
            "ipamdSocket": self.socket,
            "poolWaitSeconds": self.pool_wait_seconds,
        });
        for (k, v) in &self.extra_conf {
            conf[k.as_str()] = v.clone();
        }
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("c-{pod}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.bin.parent().context("plugin directory")?)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};\
                     K8S_POD_INFRA_CONTAINER_ID=c-{pod};K8S_POD_UID=uid-{pod}"
                ),
            );
        Ok(output_in(
            &self.node_ns,
            cmd,
            Some(conf.to_string().as_bytes()),
        )?)
    }

    /// ADD; the result and the pod's address (one IPv4 /32 expected).
    pub fn add(&self, pod: &str, netns: &Path) -> anyhow::Result<Added> {
        let (result, ip) = self.add_one(pod, netns, "32")?;
        Ok(Added { result, ip })
    }

    /// ADD of a pod in an IPv6 cluster; the result and the pod's address (one /128 expected).
    pub fn add6(&self, pod: &str, netns: &Path) -> anyhow::Result<Added6> {
        let (result, ip) = self.add_one(pod, netns, "128")?;
        Ok(Added6 { result, ip })
    }

    /// ADD expecting one address of prefix length `len`: the result and that address.
    fn add_one<A: std::str::FromStr>(
        &self,
        pod: &str,
        netns: &Path,
        len: &str,
    ) -> anyhow::Result<(serde_json::Value, A)>
    where
        A::Err: std::error::Error + Send + Sync + 'static,
    {
        let out = self.run("ADD", pod, netns, None)?;
        ensure!(
            out.status.success(),
            "ADD {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("ADD {pod} result: {}", String::from_utf8_lossy(&out.stdout))
        })?;
        let ips = result["ips"].as_array().context("result has no ips")?;
        ensure!(ips.len() == 1, "ADD {pod}: one address expected: {result}");
        let addr = ips[0]["address"].as_str().context("ips[0].address")?;
        let (ip, got) = addr.split_once('/').context("address without a length")?;
        ensure!(got == len, "ADD {pod}: a /{len} expected, got {addr}");
        let ip = ip.parse()?;
        Ok((result, ip))
    }

    /// DEL (with the ADD result as `prevResult` when known); success means exit 0 and no
    /// output.
    pub fn del(
        &self,
        pod: &str,
        netns: &Path,
        prev: Option<&serde_json::Value>,
    ) -> anyhow::Result<()> {
        let out = self.run("DEL", pod, netns, prev)?;
        ensure!(
            out.status.success() && out.stdout.is_empty(),
            "DEL {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// CHECK with the ADD result as `prevResult`.
    pub fn check(&self, pod: &str, netns: &Path, prev: &serde_json::Value) -> anyhow::Result<()> {
        let out = self.run("CHECK", pod, netns, Some(prev))?;
        ensure!(
            out.status.success(),
            "CHECK {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// The simulator's view of one instance's network interfaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimNodeView {
    /// ENIs attached to the instance (attached or detaching) → their secondary addresses.
    pub attached: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// ENIs of the instance's ipamd not attached to anything: description `aws-K8S-<instance>`
    /// or tag `node.k8s.amazonaws.com/instance_id=<instance>`, status `available` (what
    /// the leaked-ENI cleanup would have to delete).
    pub unattached: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

impl SimNodeView {
    /// Reads `instance_id`'s ENIs from the simulator.
    pub fn of(sim: &vpc_sim::server::Shared, instance_id: &str) -> SimNodeView {
        sim.with(|s| {
            let mut v = SimNodeView::default();
            for e in s.model().enis.values() {
                let ips: BTreeSet<Ipv4Addr> = e.secondary_ips.iter().copied().collect();
                match &e.attachment {
                    Some(a) if a.instance_id == instance_id => {
                        v.attached.insert(e.id.clone(), ips);
                    }
                    Some(_) => {}
                    None => {
                        let ours = e.description == format!("aws-K8S-{instance_id}")
                            || e.tags.get("node.k8s.amazonaws.com/instance_id")
                                == Some(&instance_id.to_owned());
                        if ours {
                            v.unattached.insert(e.id.clone(), ips);
                        }
                    }
                }
            }
            v
        })
    }
}

/// Differences between the simulator's ENIs of a node and ipamd's datastore: each entry says
/// what is leaked or missing. Empty when they agree (every attached ENI and every secondary
/// address in EC2 is in ipamd's pool and nothing else is, no unattached ENI of the node).
pub fn leaks(sim: &SimNodeView, ipamd: &IpamdView) -> Vec<String> {
    let mut out = Vec::new();
    for (id, ips) in &sim.attached {
        match ipamd.enis.get(id) {
            None => out.push(format!(
                "ENI {id} attached in EC2 with {} secondary addresses, unknown to ipamd",
                ips.len()
            )),
            Some(v) => {
                let leaked: Vec<_> = ips.difference(&v.ips).collect();
                if !leaked.is_empty() {
                    out.push(format!(
                        "ENI {id}: addresses assigned in EC2 but not in ipamd's pool: {leaked:?}"
                    ));
                }
                let ghost: Vec<_> = v.ips.difference(ips).collect();
                if !ghost.is_empty() {
                    out.push(format!(
                        "ENI {id}: addresses in ipamd's pool but not assigned in EC2: {ghost:?}"
                    ));
                }
            }
        }
    }
    for id in ipamd.enis.keys() {
        if !sim.attached.contains_key(id) {
            out.push(format!(
                "ENI {id} in ipamd's datastore but not attached in EC2"
            ));
        }
    }
    for (id, ips) in &sim.unattached {
        out.push(format!(
            "ENI {id} of this node left unattached (available) in EC2 with {} secondary \
             addresses",
            ips.len()
        ));
    }
    out
}

/// UDP from `from_ns` (bound to `src`, or any local address) to a listener on `pod_ip:port` in
/// `pod_ns`; returns the source address the pod saw. Fails with `what` when nothing comes back
/// within [`WAIT`] or the network reports the pod unreachable.
pub fn pod_reachable(
    what: &str,
    pod_ns: &Netns,
    pod_ip: Ipv4Addr,
    port: u16,
    from_ns: &Netns,
    src: Option<Ipv4Addr>,
) -> anyhow::Result<std::net::SocketAddr> {
    let dst = std::net::SocketAddrV4::new(pod_ip, port);
    let _listener = crate::probe::UdpListener::start(pod_ns, dst)?;
    match crate::probe::udp_probe(from_ns, src, dst, WAIT)? {
        crate::probe::ProbeOutcome::Echoed { seen_as } => Ok(seen_as),
        crate::probe::ProbeOutcome::TimedOut => bail!("{what}: no echo within {WAIT:?}"),
        crate::probe::ProbeOutcome::Unreachable(e) => bail!("{what}: unreachable ({e})"),
    }
}

/// A pod to probe with [`unreachable_pods`].
#[derive(Debug)]
pub struct PodRef<'a> {
    /// Pod name (for messages).
    pub name: &'a str,
    /// Its network namespace.
    pub ns: &'a Netns,
    /// Its address.
    pub ip: Ipv4Addr,
}

/// Probes every pod over UDP from its node (`node_ns`; the pod must see a node address, not
/// its own) and from another node (`other_ns`, bound to `other_ip`; the pod must see
/// `other_ip`: sources preserved across the VPC). Pods are probed concurrently (each from its
/// node first, then from the other node), so the whole check takes at most twice [`WAIT`].
/// Returns one line per failure, naming the ENI and device index that hold the pod's address;
/// empty when every pod answers.
pub fn unreachable_pods(
    fabric: &crate::Fabric,
    pods: &[PodRef<'_>],
    port: u16,
    node_ns: &Netns,
    other: Option<(&Netns, Ipv4Addr)>,
) -> Vec<String> {
    let enis = fabric.enis();
    let probe_one = |p: &PodRef<'_>| -> Vec<String> {
        let mut out = Vec::new();
        let on = enis
            .iter()
            .find(|e| e.ipv4.contains(&p.ip))
            .map_or("no ENI".to_owned(), |e| {
                format!("{} device {}", e.eni_id, e.device_index)
            });
        let what = format!("node → {} ({}, on {on})", p.name, p.ip);
        match pod_reachable(&what, p.ns, p.ip, port, node_ns, None) {
            Ok(seen) if seen.ip() == std::net::IpAddr::V4(p.ip) => {
                out.push(format!("{what}: the pod saw its own address {seen}"));
            }
            Ok(_) => {}
            Err(e) => out.push(format!("{e:#}")),
        }
        if let Some((other_ns, other_ip)) = other {
            let what = format!("other node {other_ip} → {} ({}, on {on})", p.name, p.ip);
            match pod_reachable(&what, p.ns, p.ip, port, other_ns, Some(other_ip)) {
                Ok(seen) if seen.ip() != std::net::IpAddr::V4(other_ip) => {
                    out.push(format!("{what}: source not preserved, the pod saw {seen}"));
                }
                Ok(_) => {}
                Err(e) => out.push(format!("{e:#}")),
            }
        }
        out
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|p| (p.name, scope.spawn(|| probe_one(p))))
            .collect();
        handles
            .into_iter()
            .flat_map(|(name, h)| {
                h.join()
                    .unwrap_or_else(|_| vec![format!("probe thread of {name} panicked")])
            })
            .collect()
    })
}
