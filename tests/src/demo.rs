//! The quick-start demo (`vpc-cni-demo`): the product's main job on one simulated node.
//!
//! A node boots, the real `ipamd` fills its warm pool from the VPC simulator, pods are created,
//! their connectivity is checked, and a short summary says what happened (pool state, pod
//! addresses, the EC2 calls ipamd made, what was checked). Everything is cleaned up, also on
//! error or Ctrl-C.
//!
//! Two modes ([`Mode`]):
//!
//! - **network namespaces** (root): the fabric of [`crate::fabric`] boots a node and a second
//!   node in namespaces, the simulator is served in the VPC namespace, `ipamd --backend aws`
//!   runs in the node namespace, and the real `aws-cni` plugin wires each pod in a namespace of
//!   its own. UDP probes check node → pod and other node → pod.
//! - **gRPC only** (anyone): `ipamd --backend sim` runs with its embedded simulator on
//!   loopback, and pods are `AddNetwork` / `DelNetwork` calls over its socket, as the plugin
//!   makes them. No namespace is created and no packet is sent to a pod.
//!
//! Either way the demo checks the addresses against the daemon (its introspection endpoint)
//! and against EC2 (the simulator's state), and fails with an error when a check does not hold.
//!
//! [`Family::V6`] (`--ipv6`) runs an IPv6 cluster instead: ipamd with `ENABLE_IPv6=true`,
//! `ENABLE_PREFIX_DELEGATION=true`, `ENABLE_IPv4=false` holds one /80 on the primary ENI and
//! hands out its addresses. In namespace mode both nodes are dual-stack and run ipamd in IPv6
//! mode; pods on the node are wired by `aws-cni` then `egress-cni` (IPv4 egress through the
//! node, with the reference `host-local` from `/usr/lib/cni`; without it the IPv4 egress check
//! is skipped and the summary says so), one peer pod runs on the other node, and UDP probes
//! check node → pod, other node → pod, pod ↔ pod on one node and across nodes, pod → the
//! outside IPv6 host (all with sources preserved) and pod → the outside IPv4 host (seen as the
//! node's primary IPv4 address). In gRPC-only mode the addresses are checked against the /80
//! that ipamd's introspection and the simulator's admin state show.

use crate::node::{ip_in, own_addresses6};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use subnet_calc::subnet::Ipv4Cidr;
use vpc_cni_net::netns::list_named;
use vpc_cni_net::testing::{can_create_netns, TestNetns};
use vpc_cni_net::Netns;
use vpc_cni_rpc::{AddNetworkRequest, DelNetworkRequest, ServingStatus};
use vpc_sim::server::Shared;
use vpc_sim::sim::SimConfig;

use crate::fabric::{OUTSIDE_ADDR, OUTSIDE_ADDR6};
use crate::probe::{udp_probe, udp_probe_any, UdpListener};
use crate::process::NsProcess;
use crate::serve::serve;
use crate::SimCluster;

/// Bound on every single wait (a healthy node answers in milliseconds; the machine may be busy).
const WAIT: Duration = Duration::from_secs(20);
/// Bound on ipamd's start-up (IMDS, EC2 describes, the first pool fill).
const START_WAIT: Duration = Duration::from_secs(40);
/// UDP port the pods' echo listeners use.
const PORT: u16 = 7100;
/// Actions the embedded simulator's own set-up makes before ipamd runs.
const SETUP_ACTIONS: [&str; 4] = [
    "CreateVpc",
    "CreateSubnet",
    "CreateSecurityGroup",
    "RunInstances",
];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs SIGINT and SIGTERM handlers that only set a flag: the demo then stops at its next
/// step or poll, and every namespace and process is cleaned up as on any other error.
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (mut int, mut term) = match (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    (Ok(i), Ok(t)) => (i, t),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
                        eprintln!("vpc-cni-demo: interrupted: cleaning up");
                    }
                }
            });
        })
        .context("signal thread")?;
    rx.recv()
        .context("signal thread exited")?
        .context("installing signal handlers")
}

/// Fails once SIGINT or SIGTERM has arrived.
fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// How pods are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Network namespaces when running as root, gRPC only otherwise.
    Auto,
    /// Network namespaces (root only): real node, real plugin, real pod namespaces.
    Namespaces,
    /// `AddNetwork` / `DelNetwork` over the daemon's socket; no namespace.
    GrpcOnly,
}

impl Mode {
    /// The name used on the command line and in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Namespaces => "netns",
            Mode::GrpcOnly => "grpc",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "netns" => Ok(Mode::Namespaces),
            "grpc" => Ok(Mode::GrpcOnly),
            other => Err(format!("{other}: expected auto, netns or grpc")),
        }
    }
}

/// The cluster's address family: pods get IPv4 addresses (the default) or, with
/// `ENABLE_IPv6=true` and prefix delegation, IPv6 addresses from one /80 of the node's
/// primary ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// IPv4 cluster: secondary addresses (or /28 prefixes) of the node's ENIs.
    #[default]
    V4,
    /// IPv6 cluster: ipamd in IPv6 mode, pods in the /80 on the primary ENI, IPv4 egress
    /// through the chained `egress-cni` plugin.
    V6,
}

impl Family {
    /// The name used in the JSON summary (`ipv4`, `ipv6`).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pods to create.
    pub pods: usize,
    /// Directory holding the `ipamd` and `aws-cni` binaries.
    pub bin_dir: PathBuf,
    /// How pods are created.
    pub mode: Mode,
    /// Instance type of the node.
    pub instance_type: String,
    /// The cluster's address family.
    pub family: Family,
    /// Directory of the reference CNI plugins (`host-local` for `egress-cni` in IPv6
    /// namespace mode; [`CNI_PLUGINS`] by default).
    pub cni_plugins: PathBuf,
}

/// Addresses of the pool as ipamd's introspection (`GET /v1/enis`) shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    /// ENIs managed.
    pub enis: usize,
    /// Addresses held (pod slots).
    pub total: i64,
    /// Addresses assigned to pods.
    pub assigned: i64,
    /// Pod name → address, for every assigned address.
    pub pods: BTreeMap<String, IpAddr>,
    /// The IPv6 prefixes ipamd holds (IPv6 mode), as CIDR strings.
    pub ipv6_prefixes: BTreeSet<String>,
}

impl PoolView {
    fn parse(body: &str) -> anyhow::Result<PoolView> {
        let cards: serde_json::Value =
            serde_json::from_str(body).with_context(|| format!("introspection body: {body}"))?;
        let cards = cards
            .as_object()
            .context("introspection: an object per network card")?;
        let mut v = PoolView::default();
        for card in cards.values() {
            v.total += card["TotalIPs"].as_i64().context("TotalIPs")?;
            v.assigned += card["AssignedIPs"].as_i64().context("AssignedIPs")?;
            let enis = card["ENIs"].as_object().context("ENIs")?;
            v.enis += enis.len();
            for eni in enis.values() {
                if let Some(v6) = eni["IPv6Cidrs"].as_object() {
                    v.ipv6_prefixes.extend(v6.keys().cloned());
                }
                let cidrs = ["AvailableIPv4Cidrs", "IPv6Cidrs"]
                    .iter()
                    .filter_map(|k| eni[*k].as_object())
                    .flat_map(|m| m.values());
                for cidr in cidrs {
                    let Some(addrs) = cidr["IPAddresses"].as_object() else {
                        continue;
                    };
                    for a in addrs.values() {
                        let pod = a["IPAMMetadata"]["k8sPodName"].as_str().unwrap_or("");
                        if pod.is_empty() {
                            continue;
                        }
                        let ip: IpAddr = a["Address"]
                            .as_str()
                            .context("Address")?
                            .parse()
                            .context("Address")?;
                        v.pods.insert(pod.to_owned(), ip);
                    }
                }
            }
        }
        Ok(v)
    }

    fn line(&self) -> String {
        let prefixes = if self.ipv6_prefixes.is_empty() {
            String::new()
        } else {
            let list: Vec<&str> = self.ipv6_prefixes.iter().map(String::as_str).collect();
            format!(" (prefix {})", list.join(", "))
        };
        format!(
            "{} ENI{}, {} addresses{prefixes}, {} assigned to pods",
            self.enis,
            if self.enis == 1 { "" } else { "s" },
            self.total,
            self.assigned
        )
    }
}

/// One pod of the demo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// The address ipamd gave it.
    pub ip: IpAddr,
}

/// What the demo did and found. Every check in [`Summary::checks`] held (a failed check ends
/// the demo with an error instead).
#[derive(Debug, Clone)]
pub struct Summary {
    /// The mode that ran ([`Mode::Namespaces`] or [`Mode::GrpcOnly`]).
    pub mode: Mode,
    /// The address family that ran.
    pub family: Family,
    /// Why namespaces were skipped, in gRPC-only mode.
    pub skipped: Option<String>,
    /// Instance id of the node.
    pub instance_id: String,
    /// Its instance type.
    pub instance_type: String,
    /// Its subnet.
    pub subnet: Ipv4Cidr,
    /// Its primary address.
    pub node_ip: Ipv4Addr,
    /// The subnet's IPv6 /64 (IPv6 mode).
    pub subnet6: Option<String>,
    /// The node's IPv6 address, when it has one (IPv6 mode).
    pub node_ipv6: Option<Ipv6Addr>,
    /// IPv6 prefixes EC2 (the simulator) holds on the node's primary ENI with the pods
    /// running (IPv6 mode: the one /80).
    pub ec2_ipv6_prefixes: Vec<String>,
    /// What the run could not do and why (a missing optional plugin, say).
    pub notes: Vec<String>,
    /// IPv6 namespace mode: of [`Summary::pods_took`], the time in `aws-cni` ADD and in
    /// `egress-cni` ADD (`None` when egress-cni was not chained).
    pub add_split: Option<(Duration, Option<Duration>)>,
    /// From starting ipamd to gRPC SERVING.
    pub boot: Duration,
    /// The pool once ipamd serves, before any pod.
    pub warm_pool: PoolView,
    /// Creating every pod.
    pub pods_took: Duration,
    /// The pods, in creation order.
    pub pods: Vec<Pod>,
    /// The pool with every pod running (ipamd's view, with its pod → address map).
    pub pool_with_pods: PoolView,
    /// Secondary addresses EC2 (the simulator) holds on the node's ENIs with the pods running.
    pub ec2_addresses: BTreeSet<Ipv4Addr>,
    /// EC2 calls ipamd made, by action.
    pub ec2_calls: BTreeMap<String, u64>,
    /// What was checked (all held).
    pub checks: Vec<String>,
    /// Addresses ipamd counts as assigned after every pod was deleted.
    pub assigned_after_delete: i64,
    /// How the demo cleaned up.
    pub cleanup: Vec<String>,
}

impl Summary {
    /// EC2 calls that change something (every action but `Describe*`).
    pub fn mutating_calls(&self) -> u64 {
        self.ec2_calls
            .iter()
            .filter(|(a, _)| !a.starts_with("Describe"))
            .map(|(_, n)| n)
            .sum()
    }

    /// `Describe*` calls.
    pub fn describe_calls(&self) -> u64 {
        self.ec2_calls
            .iter()
            .filter(|(a, _)| a.starts_with("Describe"))
            .map(|(_, n)| n)
            .sum()
    }

    /// The summary as JSON (what `--json` writes; the demo's test reads it).
    pub fn to_json(&self) -> serde_json::Value {
        let pool = |p: &PoolView| {
            serde_json::json!({
                "enis": p.enis, "total": p.total, "assigned": p.assigned,
                "pods": p.pods.iter().map(|(k, v)| (k.clone(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "ipv6_prefixes": p.ipv6_prefixes,
            })
        };
        let mut j = serde_json::json!({
            "mode": self.mode.name(),
            "family": self.family.name(),
            "namespaces_skipped": self.skipped,
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "subnet": self.subnet.to_string(),
            "node_ip": self.node_ip.to_string(),
            "boot_ms": self.boot.as_millis() as u64,
            "warm_pool": pool(&self.warm_pool),
            "pods_ms": self.pods_took.as_millis() as u64,
            "pods": self.pods.iter().map(|p| serde_json::json!({"name": p.name, "ip": p.ip.to_string()})).collect::<Vec<_>>(),
            "pool_with_pods": pool(&self.pool_with_pods),
            "ec2_addresses": self.ec2_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ec2_calls": self.ec2_calls,
            "ec2_mutating_calls": self.mutating_calls(),
            "ec2_describe_calls": self.describe_calls(),
            "checks": self.checks,
            "assigned_after_delete": self.assigned_after_delete,
            "cleanup": self.cleanup,
            "notes": self.notes,
        });
        if self.family == Family::V6 {
            j["subnet_ipv6"] = serde_json::json!(self.subnet6);
            j["node_ipv6"] = serde_json::json!(self.node_ipv6.map(|a| a.to_string()));
            j["ec2_ipv6_prefixes"] = serde_json::json!(self.ec2_ipv6_prefixes);
            if let Some((cni, egress)) = self.add_split {
                j["aws_cni_add_ms"] = serde_json::json!(cni.as_millis() as u64);
                j["egress_cni_add_ms"] = serde_json::json!(egress.map(|e| e.as_millis() as u64));
            }
        }
        j
    }

    /// The short human summary.
    pub fn render(&self) -> String {
        let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        let mut s = String::new();
        let how = match self.mode {
            Mode::Namespaces => "network namespaces, the real aws-cni plugin".to_owned(),
            _ => "gRPC only".to_owned(),
        };
        let cluster = match self.family {
            Family::V4 => "",
            Family::V6 => ", IPv6 cluster",
        };
        let _ = writeln!(
            s,
            "== vpc-cni demo: one node on the VPC simulator ({how}{cluster})"
        );
        if let Some(why) = &self.skipped {
            let _ = writeln!(
                s,
                "note        namespaces SKIPPED ({why}): pods are AddNetwork/DelNetwork calls over \
                 ipamd's socket; no pod network and no packet was checked"
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "note        {n}");
        }
        match self.family {
            Family::V4 => {
                let _ = writeln!(
                    s,
                    "node        {} ({}), primary {} in subnet {}",
                    self.instance_id, self.instance_type, self.node_ip, self.subnet
                );
            }
            Family::V6 => {
                let v6 = self.node_ipv6.map_or_else(
                    || " (no IPv6 address of its own)".to_owned(),
                    |a| format!(" and {a}"),
                );
                let _ = writeln!(
                    s,
                    "node        {} ({}), primary {}{v6} in subnet {} and {}",
                    self.instance_id,
                    self.instance_type,
                    self.node_ip,
                    self.subnet,
                    self.subnet6.as_deref().unwrap_or("no IPv6 block")
                );
                let _ = writeln!(
                    s,
                    "family      IPv6 (ENABLE_IPv6=true, ENABLE_PREFIX_DELEGATION=true): EC2 \
                     holds {} on the primary ENI",
                    self.ec2_ipv6_prefixes.join(", ")
                );
            }
        }
        let _ = writeln!(
            s,
            "warm pool   ipamd serving after {}: {}",
            secs(self.boot),
            self.warm_pool.line()
        );
        let split = match self.add_split {
            Some((cni, egress)) => format!(
                " (aws-cni {}{})",
                secs(cni),
                egress.map_or_else(String::new, |e| format!(", egress-cni {}", secs(e)))
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "pods        {} created in {}{split}:",
            self.pods.len(),
            secs(self.pods_took)
        );
        for p in &self.pods {
            let _ = writeln!(s, "              {:<8} {}", p.name, p.ip);
        }
        let _ = writeln!(
            s,
            "pool        with the pods: {}",
            self.pool_with_pods.line()
        );
        let by_action: Vec<String> = self
            .ec2_calls
            .iter()
            .filter(|(a, _)| !a.starts_with("Describe"))
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "EC2 calls   by ipamd: {} mutating ({}), {} describe",
            self.mutating_calls(),
            by_action.join(", "),
            self.describe_calls()
        );
        let mut first = true;
        for c in &self.checks {
            let head = if first { "checked" } else { "" };
            first = false;
            let _ = writeln!(s, "{head:<12}ok  {c}");
        }
        let _ = writeln!(s, "cleanup     {}", self.cleanup.join("; "));
        s
    }
}

/// `target/<profile>/<name>` next to the running executable (or in `dir`).
pub fn find_bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let bin = dir.join(name);
    ensure!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p ipamd -p vpc-cni-plugin -p vpc-cni-egress --bins`)",
        bin.display()
    );
    Ok(bin)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = read_log(path);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!(
        "--- {} (last lines) ---\n{}",
        path.display(),
        lines[from..].join("\n")
    )
}

/// Polls `f` until it returns true or `wait` passes; stops on Ctrl-C.
fn wait_until(
    what: &str,
    wait: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        check_interrupted()?;
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {wait:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A current-thread runtime for the gRPC client calls.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// ipamd's gRPC health.
fn health(socket: &Path) -> anyhow::Result<bool> {
    let status = runtime()?.block_on(vpc_cni_rpc::check_health(
        socket,
        "",
        Duration::from_secs(2),
    ));
    Ok(matches!(status, Ok(ServingStatus::Serving)))
}

/// A plain HTTP/1.0 GET on loopback (or inside `ns`), body returned.
fn http_get(ns: Option<&Netns>, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let connect = move || TcpStream::connect_timeout(&addr, WAIT);
    let mut stream = match ns {
        Some(ns) => ns.run(connect)??,
        None => connect()?,
    };
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no body in {reply}"))?;
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "GET {path}: {head}"
    );
    Ok(body.to_owned())
}

/// The address ipamd prints after `label` in its log (`introspection Some(` in its ready line,
/// ` admin http://` in its embedded-simulator line), waiting for the line to be written.
fn logged_addr(log: &Path, label: &str) -> anyhow::Result<SocketAddr> {
    let mut found = None;
    wait_until(&format!("{label:?} in ipamd's log"), WAIT, || {
        let text = read_log(log);
        let Some(rest) = text.split(label).nth(1) else {
            return Ok(false);
        };
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        found = Some(word);
        Ok(true)
    })
    .with_context(|| tail(log))?;
    let word = found.unwrap_or_default();
    word.parse()
        .with_context(|| format!("{label:?} address {word:?} in ipamd's log"))
}

/// The simulator, in-process (namespace mode) or through its admin endpoint (gRPC mode).
enum SimView {
    InProcess(Shared),
    Admin(SocketAddr),
}

impl SimView {
    fn state(&self) -> anyhow::Result<serde_json::Value> {
        match self {
            SimView::InProcess(s) => Ok(s.with(|s| s.state_json())),
            SimView::Admin(a) => Ok(serde_json::from_str(&http_get(None, *a, "/v1/state")?)?),
        }
    }

    fn calls(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let v = match self {
            SimView::InProcess(s) => s.with(|s| serde_json::json!(s.calls())),
            SimView::Admin(a) => serde_json::from_str(&http_get(None, *a, "/v1/calls")?)?,
        };
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The call log's last sequence number.
    fn last_seq(&self) -> anyhow::Result<u64> {
        Ok(self
            .calls()?
            .iter()
            .filter_map(|c| c["seq"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// Calls after `since` (sequence number), by action; the embedded simulator's own set-up
    /// calls are left out.
    fn calls_by_action(&self, since: u64) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for c in self.calls()? {
            let action = c["action"].as_str().unwrap_or("");
            if c["seq"].as_u64().unwrap_or(0) <= since || SETUP_ACTIONS.contains(&action) {
                continue;
            }
            *out.entry(action.to_owned()).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// The primary ENI of `instance_id` in the simulator's state: its IPv6 prefixes and its
    /// first IPv6 address.
    fn primary_eni_ipv6(
        &self,
        instance_id: &str,
    ) -> anyhow::Result<(Vec<String>, Option<Ipv6Addr>)> {
        let state = self.state()?;
        let eni_id = state["instances"][instance_id]["primary_eni"]
            .as_str()
            .with_context(|| format!("simulator state: primary_eni of {instance_id}"))?;
        let eni = &state["network_interfaces"][eni_id];
        let prefixes = eni["ipv6_prefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                p.as_str()
                    .map(str::to_owned)
                    .context("simulator state: ipv6_prefixes")
            })
            .collect::<anyhow::Result<Vec<String>>>()?;
        let ipv6 = match eni["ipv6_addresses"].as_array().and_then(|a| a.first()) {
            Some(a) => Some(
                a.as_str()
                    .context("simulator state: ipv6_addresses")?
                    .parse()
                    .context("simulator state: ipv6_addresses")?,
            ),
            None => None,
        };
        Ok((prefixes, ipv6))
    }

    /// Secondary IPv4 addresses of the ENIs attached to `instance_id`.
    fn node_addresses(&self, instance_id: &str) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
        let state = self.state()?;
        let enis = state["network_interfaces"]
            .as_object()
            .context("simulator state: network_interfaces")?;
        let mut out = BTreeSet::new();
        for e in enis.values() {
            if e["attachment"]["instance_id"].as_str() != Some(instance_id) {
                continue;
            }
            for ip in e["secondary_ips"].as_array().into_iter().flatten() {
                out.insert(
                    ip.as_str()
                        .context("secondary_ips")?
                        .parse()
                        .context("secondary_ips")?,
                );
            }
        }
        Ok(out)
    }
}

/// An ipamd process, killed (with its process group) when dropped.
enum Daemon {
    InNs(NsProcess),
    Local(Child),
}

impl Daemon {
    fn pid(&self) -> u32 {
        match self {
            Daemon::InNs(p) => p.pid(),
            Daemon::Local(c) => c.id(),
        }
    }

    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(match self {
            Daemon::InNs(p) => p.try_wait()?,
            Daemon::Local(c) => c.try_wait()?,
        })
    }

    /// SIGTERM twice (the first stops allocation, the second stops ipamd), then waits.
    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = Pid::from_raw(i32::try_from(self.pid())?);
        for _ in 0..2 {
            if self.exited()?.is_none() {
                let _ = kill(pid, Signal::SIGTERM);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.exited()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("ipamd (pid {pid}) did not exit within {WAIT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        match self {
            Daemon::InNs(_) => {} // NsProcess kills its group on drop.
            Daemon::Local(c) => {
                if let Ok(None) = c.try_wait() {
                    if let Ok(pid) = i32::try_from(c.id()) {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    let _ = c.wait();
                }
            }
        }
    }
}

/// ipamd's environment common to both modes.
fn ipamd_command(bin: &Path, dir: &Path, socket: &Path, log: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("IPAMD_GRPC_SOCKET", socket)
        .env("AWS_VPC_K8S_CNI_BACKING_STORE", dir.join("ipam.json"))
        .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
        .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
        .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
        .env("VPC_CNI_POOL_TICK", "500ms")
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("ipamd.out"))?)
        .stderr(File::create(log)?);
    Ok(cmd)
}

/// The variables of ipamd's IPv6 mode, as the reference's IPv6 manifests set them.
fn ipv6_env(cmd: &mut Command) {
    cmd.env("ENABLE_IPv4", "false")
        .env("ENABLE_IPv6", "true")
        .env("ENABLE_PREFIX_DELEGATION", "true");
}

/// Waits for ipamd's health to say SERVING.
fn wait_serving(d: &mut Daemon, socket: &Path, log: &Path) -> anyhow::Result<()> {
    let started = wait_until("ipamd's gRPC health to say SERVING", START_WAIT, || {
        if let Some(status) = d.exited()? {
            bail!("ipamd exited early ({status})");
        }
        health(socket)
    });
    started.with_context(|| tail(log))
}

/// `2600:1f14::/80` → (network, length).
fn parse_v6_prefix(cidr: &str) -> anyhow::Result<(Ipv6Addr, u32)> {
    let (base, len) = cidr
        .split_once('/')
        .with_context(|| format!("IPv6 prefix {cidr:?}: no length"))?;
    let base: Ipv6Addr = base
        .parse()
        .with_context(|| format!("IPv6 prefix {cidr:?}: address"))?;
    let len: u32 = len
        .parse()
        .with_context(|| format!("IPv6 prefix {cidr:?}: length"))?;
    ensure!(len <= 128, "IPv6 prefix {cidr:?}: length over 128");
    Ok((base, len))
}

/// Whether `ip` is inside `(network, length)`.
fn v6_contains((base, len): (Ipv6Addr, u32), ip: Ipv6Addr) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(ip) & mask == u128::from(base) & mask
}

/// Checks shared by both modes: the pods' addresses are distinct, inside the subnet (IPv4) or
/// the /80 EC2 holds on the primary ENI (IPv6), not the node's, shown by ipamd's introspection
/// for the right pod, and (IPv4) held by the node in EC2.
fn check_addresses(s: &Summary, checks: &mut Vec<String>, requested: usize) -> anyhow::Result<()> {
    let addrs: BTreeSet<IpAddr> = s.pods.iter().map(|p| p.ip).collect();
    ensure!(
        s.pods.len() == requested && addrs.len() == requested,
        "{requested} distinct addresses expected: {:?}",
        s.pods
    );
    match s.family {
        Family::V4 => {
            for p in &s.pods {
                let IpAddr::V4(ip) = p.ip else {
                    bail!(
                        "{} got the IPv6 address {} in an IPv4 cluster",
                        p.name,
                        p.ip
                    );
                };
                ensure!(
                    s.subnet.contains(u32::from(ip)) && ip != s.node_ip,
                    "{} got {}: not a pod address of subnet {}",
                    p.name,
                    p.ip,
                    s.subnet
                );
            }
            checks.push(format!(
                "{requested} pod addresses distinct, inside {} and not the node's",
                s.subnet
            ));
        }
        Family::V6 => {
            let [prefix] = s.ec2_ipv6_prefixes.as_slice() else {
                bail!(
                    "one /80 expected on the primary ENI in EC2, it holds {:?}",
                    s.ec2_ipv6_prefixes
                );
            };
            let net = parse_v6_prefix(prefix)?;
            ensure!(
                net.1 == 80,
                "EC2 holds {prefix} on the primary ENI, not a /80"
            );
            for p in &s.pods {
                let IpAddr::V6(ip) = p.ip else {
                    bail!(
                        "{} got the IPv4 address {} in an IPv6 cluster",
                        p.name,
                        p.ip
                    );
                };
                ensure!(
                    v6_contains(net, ip) && Some(ip) != s.node_ipv6,
                    "{} got {}: not a pod address of the /80 {prefix}",
                    p.name,
                    p.ip
                );
            }
            let ipamd: Vec<&String> = s.pool_with_pods.ipv6_prefixes.iter().collect();
            ensure!(
                ipamd == vec![prefix],
                "ipamd holds the prefixes {ipamd:?}, EC2 {prefix} on the primary ENI"
            );
            checks.push(format!(
                "{requested} pod IPv6 addresses distinct, inside the /80 {prefix} EC2 holds on \
                 the primary ENI (ipamd holds the same and no other), not the node's"
            ));
        }
    }
    let expected: BTreeMap<String, IpAddr> =
        s.pods.iter().map(|p| (p.name.clone(), p.ip)).collect();
    ensure!(
        s.pool_with_pods.pods == expected,
        "ipamd's introspection shows {:?}, the pods got {expected:?}",
        s.pool_with_pods.pods
    );
    ensure!(
        s.pool_with_pods.assigned == requested as i64,
        "ipamd counts {} assigned addresses, {requested} expected",
        s.pool_with_pods.assigned
    );
    checks.push("ipamd's introspection shows each pod at the address it got".into());
    if s.family == Family::V6 {
        return Ok(());
    }
    for p in &s.pods {
        let IpAddr::V4(ip) = p.ip else {
            bail!(
                "{} got the IPv6 address {} in an IPv4 cluster",
                p.name,
                p.ip
            );
        };
        ensure!(
            s.ec2_addresses.contains(&ip),
            "{} ({}) is not assigned to the node's ENIs in EC2: {:?}",
            p.name,
            p.ip,
            s.ec2_addresses
        );
    }
    checks.push("each address is assigned to one of the node's ENIs in EC2".into());
    Ok(())
}

/// Runs the demo in `opts.mode` and returns its summary, after cleaning up.
pub fn run(opts: &Options) -> anyhow::Result<Summary> {
    ensure!(opts.pods > 0, "at least one pod");
    let ipamd = find_bin(&opts.bin_dir, "ipamd")?;
    let mode = match opts.mode {
        Mode::Auto if can_create_netns() => Mode::Namespaces,
        Mode::Auto => Mode::GrpcOnly,
        m => m,
    };
    match mode {
        Mode::Namespaces => {
            ensure!(
                can_create_netns(),
                "network namespaces need root (run without --mode netns for the gRPC-only demo)"
            );
            let cni = find_bin(&opts.bin_dir, "aws-cni")?;
            match opts.family {
                Family::V4 => run_namespaces(opts, &ipamd, &cni),
                Family::V6 => {
                    let egress = find_bin(&opts.bin_dir, "egress-cni")?;
                    run_namespaces6(opts, &ipamd, &cni, &egress)
                }
            }
        }
        _ => {
            let why = if can_create_netns() {
                "asked for gRPC only"
            } else {
                "not root"
            };
            run_grpc(opts, &ipamd, why)
        }
    }
}

fn run_namespaces(opts: &Options, ipamd_bin: &Path, cni_bin: &Path) -> anyhow::Result<Summary> {
    let tmp = tempfile::Builder::new().prefix("vpc-cni-demo-").tempdir()?;
    let socket = tmp.path().join("ipamd.sock");
    let log = tmp.path().join("ipamd.log");
    let mut cleanup = Vec::new();
    let prefix = "vcn-";
    let mine = format!("-{}-", std::process::id());
    let created = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with(prefix) && n.contains(&mine))
            .collect()
    };

    let summary = {
        // 1. A VPC, one subnet, the node and a second node (for cross-node traffic).
        let c = SimCluster::new(SimConfig::default())?;
        let vpc = c.create_vpc("10.3.0.0/16")?;
        let s = c.create_subnet(&vpc, "10.3.0.0/20")?;
        let node = c.run_instance(&s, &opts.instance_type)?;
        let other = c.run_instance(&s, "m5.large")?;
        let ns = node.netns()?;
        let other_ns = other.netns()?;
        let server = serve(&c.fabric, c.sim.clone())?;
        let sim = SimView::InProcess(c.sim.clone());
        let since = sim.last_seq()?;
        check_interrupted()?;

        // 2. ipamd in the node namespace.
        let mut cmd = ipamd_command(ipamd_bin, tmp.path(), &socket, &log)?;
        cmd.arg("--backend")
            .arg("aws")
            .env("AWS_EC2_ENDPOINT", server.ec2_url())
            .env("AWS_ENDPOINT_URL_EC2", server.ec2_url())
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                server.imds_url(&node.instance_id),
            )
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("IP_COOLDOWN_PERIOD", "0");
        let booting = Instant::now();
        let mut d = Daemon::InNs(NsProcess::spawn(&ns, cmd)?);
        wait_serving(&mut d, &socket, &log)?;
        let boot = booting.elapsed();
        let introspection = logged_addr(&log, "introspection Some(")?;
        let pool = || -> anyhow::Result<PoolView> {
            PoolView::parse(&http_get(Some(&ns), introspection, "/v1/enis")?)
        };
        let warm_pool = pool()?;

        // 3. Pods: CNI ADD through the real plugin, each in its own namespace.
        let plugin = crate::node::Plugin::new(cni_bin.to_path_buf(), &ns, socket.clone())?
            .with_pool_wait(20.0);
        let adding = Instant::now();
        let mut pods = Vec::new();
        for i in 0..opts.pods {
            check_interrupted()?;
            let name = format!("pod-{i}");
            let pod_ns = TestNetns::new("pod")?;
            let added = plugin
                .add(&name, pod_ns.path())
                .with_context(|| tail(&log))?;
            pods.push((name, pod_ns, added.result, added.ip));
        }
        let pods_took = adding.elapsed();
        let mut summary = Summary {
            mode: Mode::Namespaces,
            family: Family::V4,
            skipped: None,
            instance_id: node.instance_id.clone(),
            instance_type: opts.instance_type.clone(),
            subnet: node.subnet,
            node_ip: node.primary_ip,
            subnet6: None,
            node_ipv6: None,
            ec2_ipv6_prefixes: Vec::new(),
            notes: Vec::new(),
            add_split: None,
            boot,
            warm_pool,
            pods_took,
            pods: pods
                .iter()
                .map(|p| Pod {
                    name: p.0.clone(),
                    ip: IpAddr::V4(p.3),
                })
                .collect(),
            pool_with_pods: pool()?,
            ec2_addresses: sim.node_addresses(&node.instance_id)?,
            ec2_calls: BTreeMap::new(),
            checks: Vec::new(),
            assigned_after_delete: -1,
            cleanup: Vec::new(),
        };
        let mut checks = Vec::new();
        check_addresses(&summary, &mut checks, opts.pods)?;
        c.check_hooks()?;

        // 4. Connectivity: node → pod and other node → pod, sources preserved.
        for (name, pod_ns, _, ip) in &pods {
            check_interrupted()?;
            let dst = SocketAddrV4::new(*ip, PORT);
            let _listener = UdpListener::start(pod_ns, dst)?;
            let seen = udp_probe(&ns, None, dst, WAIT)?.seen_as(&format!("node → {name}"))?;
            ensure!(
                seen.ip() != IpAddr::V4(*ip),
                "the node reaches {name} from its own side, saw {seen}"
            );
            let seen = udp_probe(&other_ns, Some(other.primary_ip), dst, WAIT)?
                .seen_as(&format!("other node → {name}"))?;
            ensure!(
                seen.ip() == IpAddr::V4(other.primary_ip),
                "{name} sees the other node as {seen}, not as itself ({})",
                other.primary_ip
            );
        }
        checks.push(format!(
            "UDP node → pod and other node ({}) → pod for every pod, source address preserved",
            other.primary_ip
        ));

        // 5. CNI DEL of every pod: nothing of theirs is left on the node.
        for (name, pod_ns, result, _) in &pods {
            plugin.del(name, pod_ns.path(), Some(result))?;
        }
        let routes = ip_in(&ns, &["-4", "route", "show", "table", "all"])?;
        let rules = ip_in(&ns, &["-4", "rule", "show"])?;
        for p in &summary.pods {
            ensure!(
                !routes.contains(&format!("{} ", p.ip)) && !rules.contains(&p.ip.to_string()),
                "a route or rule for {} is left after DEL:\n{routes}\n{rules}",
                p.ip
            );
        }
        summary.assigned_after_delete = pool()?.assigned;
        ensure!(
            summary.assigned_after_delete == 0,
            "ipamd still counts {} assigned addresses after every DEL",
            summary.assigned_after_delete
        );
        checks.push("after CNI DEL: no pod route or rule left, ipamd counts 0 assigned".into());
        summary.ec2_calls = sim.calls_by_action(since)?;
        c.check_hooks()?;
        summary.checks = checks;

        // 6. Stop ipamd as the kubelet would (SIGTERM), then drop every namespace.
        let status = d.stop()?;
        ensure!(
            status.success(),
            "ipamd exited with {status}\n{}",
            tail(&log)
        );
        cleanup.push("ipamd stopped by SIGTERM".to_owned());
        let made = created(list_named()?).len();
        drop(pods);
        drop(plugin);
        drop(server);
        drop(c);
        cleanup.push(format!("{made} network namespaces deleted"));
        summary
    };
    let left = created(list_named()?);
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    let mut summary = summary;
    cleanup.push("none left".into());
    summary.cleanup = cleanup;
    Ok(summary)
}

/// Where the reference plugins are installed (`host-local`, the IPAM of `egress-cni`): the
/// default of [`Options::cni_plugins`].
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
/// UDP port of the outside hosts' echo listeners.
const OUTSIDE_PORT: u16 = 7101;

/// UDP from `ns` to `dst`: the source address the listener saw.
fn seen_from(ns: &Netns, dst: SocketAddr, what: &str) -> anyhow::Result<IpAddr> {
    check_interrupted()?;
    Ok(udp_probe_any(ns, None, dst, WAIT)?.seen_as(what)?.ip())
}

/// The namespace demo of an IPv6 cluster: two dual-stack nodes, ipamd in IPv6 mode on both,
/// pods on the node wired by aws-cni and (with the reference `host-local`) egress-cni, one
/// peer pod on the other node.
fn run_namespaces6(
    opts: &Options,
    ipamd_bin: &Path,
    cni_bin: &Path,
    egress_bin: &Path,
) -> anyhow::Result<Summary> {
    let tmp = tempfile::Builder::new().prefix("vpc-cni-demo-").tempdir()?;
    let socket = tmp.path().join("ipamd.sock");
    let log = tmp.path().join("ipamd.log");
    let mut cleanup = Vec::new();
    let prefix = "vcn-";
    let mine = format!("-{}-", std::process::id());
    let created = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with(prefix) && n.contains(&mine))
            .collect()
    };
    let plugins_dir = opts
        .cni_plugins
        .to_str()
        .with_context(|| format!("CNI plugin directory {:?}", opts.cni_plugins))?;
    let host_local = opts.cni_plugins.join("host-local").is_file();
    let mut notes = Vec::new();
    if !host_local {
        notes.push(format!(
            "the reference host-local plugin is missing from {plugins_dir}: egress-cni not \
             chained, IPv4 egress SKIPPED"
        ));
    }

    let summary = {
        // 1. A dual-stack VPC and subnet, the node and a second node, both with IPv6.
        let c = SimCluster::new(SimConfig::default())?;
        let (vpc, _block56) = c.create_vpc_ipv6("10.3.0.0/16")?;
        let (s, block64) = c.create_subnet_ipv6(&vpc, "10.3.0.0/20", 0)?;
        let node = c.run_instance_ipv6(&s, &opts.instance_type)?;
        let other = c.run_instance_ipv6(&s, "m5.large")?;
        let ns = node.netns()?;
        let other_ns = other.netns()?;
        let node_ipv6 = node
            .primary_ipv6
            .context("the node was launched without an IPv6 address")?;
        let other_ipv6 = other
            .primary_ipv6
            .context("the other node was launched without an IPv6 address")?;
        let server = serve(&c.fabric, c.sim.clone())?;
        let sim = SimView::InProcess(c.sim.clone());
        check_interrupted()?;

        // 2. ipamd in IPv6 mode on the other node (for the peer pod), then on the node; the
        //    EC2 calls counted are the node's ipamd's from its start on.
        let other_dir = tmp.path().join("other-node");
        std::fs::create_dir_all(&other_dir)?;
        let mut other_ipamd = crate::node::Ipamd::new(
            ipamd_bin.to_path_buf(),
            &other_ns,
            &server,
            &other.instance_id,
            &other_dir,
        )?;
        other_ipamd
            .env("ENABLE_IPv4", "false")
            .env("ENABLE_IPv6", "true")
            .env("ENABLE_PREFIX_DELEGATION", "true");
        other_ipamd.spawn()?;
        other_ipamd.wait_serving(START_WAIT)?;
        check_interrupted()?;
        let since = sim.last_seq()?;
        let mut cmd = ipamd_command(ipamd_bin, tmp.path(), &socket, &log)?;
        cmd.arg("--backend")
            .arg("aws")
            .env("AWS_EC2_ENDPOINT", server.ec2_url())
            .env("AWS_ENDPOINT_URL_EC2", server.ec2_url())
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                server.imds_url(&node.instance_id),
            )
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("IP_COOLDOWN_PERIOD", "0");
        ipv6_env(&mut cmd);
        let booting = Instant::now();
        let mut d = Daemon::InNs(NsProcess::spawn(&ns, cmd)?);
        wait_serving(&mut d, &socket, &log)?;
        let boot = booting.elapsed();
        let introspection = logged_addr(&log, "introspection Some(")?;
        let pool = || -> anyhow::Result<PoolView> {
            PoolView::parse(&http_get(Some(&ns), introspection, "/v1/enis")?)
        };
        let warm_pool = pool()?;

        // 3. Pods: aws-cni (IPv6 wiring), then egress-cni with aws-cni's result, as the
        //    reference conflist chains them; one peer pod on the other node.
        let plugin = crate::node::Plugin::new(cni_bin.to_path_buf(), &ns, socket.clone())?
            .with_pool_wait(20.0);
        let egress = if host_local {
            Some(crate::node::Egress::v4(
                egress_bin.to_path_buf(),
                &ns,
                plugins_dir,
                node.primary_ip,
                &tmp.path().join("egress-v4-ipam"),
            )?)
        } else {
            None
        };
        let adding = Instant::now();
        let mut pods = Vec::new();
        let (mut cni_took, mut egress_took) = (Duration::ZERO, Duration::ZERO);
        for i in 0..opts.pods {
            check_interrupted()?;
            let name = format!("pod-{i}");
            let pod_ns = TestNetns::new("pod")?;
            let started = Instant::now();
            let added = plugin
                .add6(&name, pod_ns.path())
                .with_context(|| tail(&log))?;
            cni_took += started.elapsed();
            let result = match &egress {
                Some(e) => {
                    let started = Instant::now();
                    let chained = e.add(&name, pod_ns.path(), &added.result)?;
                    egress_took += started.elapsed();
                    ensure!(
                        chained["ips"] == added.result["ips"],
                        "{name}: egress-cni changed the result's ips: {chained}"
                    );
                    chained
                }
                None => added.result.clone(),
            };
            pods.push((name, pod_ns, result, added.ip));
        }
        let pods_took = adding.elapsed();
        let other_plugin =
            crate::node::Plugin::new(cni_bin.to_path_buf(), &other_ns, other_ipamd.socket())?
                .with_pool_wait(20.0);
        let peer_ns = TestNetns::new("pod")?;
        let peer = other_plugin
            .add6("peer-0", peer_ns.path())
            .with_context(|| other_ipamd.log_tail(40))?;

        let (ec2_ipv6_prefixes, _) = sim.primary_eni_ipv6(&node.instance_id)?;
        let mut summary = Summary {
            mode: Mode::Namespaces,
            family: Family::V6,
            skipped: None,
            instance_id: node.instance_id.clone(),
            instance_type: opts.instance_type.clone(),
            subnet: node.subnet,
            node_ip: node.primary_ip,
            subnet6: Some(block64.to_string()),
            node_ipv6: Some(node_ipv6),
            ec2_ipv6_prefixes,
            notes,
            add_split: Some((cni_took, egress.as_ref().map(|_| egress_took))),
            boot,
            warm_pool,
            pods_took,
            pods: pods
                .iter()
                .map(|p| Pod {
                    name: p.0.clone(),
                    ip: IpAddr::V6(p.3),
                })
                .collect(),
            pool_with_pods: pool()?,
            ec2_addresses: sim.node_addresses(&node.instance_id)?,
            ec2_calls: BTreeMap::new(),
            checks: Vec::new(),
            assigned_after_delete: -1,
            cleanup: Vec::new(),
        };
        let mut checks = Vec::new();
        check_addresses(&summary, &mut checks, opts.pods)?;
        for (name, pod_ns, _, ip) in &pods {
            let own = own_addresses6(pod_ns)?;
            ensure!(
                own == vec![*ip],
                "{name}: eth0 holds {own:?}, ADD returned {ip}"
            );
        }
        checks.push("each pod's eth0 holds exactly the IPv6 address ADD returned".into());
        c.check_hooks()?;

        // 4. Connectivity over IPv6 (no NAT: every source preserved) and IPv4 egress.
        let v6 = |ip: Ipv6Addr, port: u16| SocketAddr::new(IpAddr::V6(ip), port);
        let mut listeners = Vec::new();
        for (_, pod_ns, _, ip) in &pods {
            listeners.push(UdpListener::start_any(pod_ns, v6(*ip, PORT))?);
        }
        listeners.push(UdpListener::start_any(&peer_ns, v6(peer.ip, PORT))?);
        let outside_ns = c.fabric.outside_ns()?;
        listeners.push(UdpListener::start_any(
            &outside_ns,
            v6(OUTSIDE_ADDR6, OUTSIDE_PORT),
        )?);
        if egress.is_some() {
            listeners.push(UdpListener::start(
                &outside_ns,
                SocketAddrV4::new(OUTSIDE_ADDR, OUTSIDE_PORT),
            )?);
        }
        let expect = |what: &str, seen: IpAddr, want: IpAddr| -> anyhow::Result<()> {
            ensure!(seen == want, "{what}: seen as {seen}, expected {want}");
            Ok(())
        };
        for (k, (name, pod_ns, _, ip)) in pods.iter().enumerate() {
            let me = IpAddr::V6(*ip);
            let what = format!("node → {name}");
            expect(
                &what,
                seen_from(&ns, v6(*ip, PORT), &what)?,
                node_ipv6.into(),
            )?;
            let what = format!("other node → {name}");
            let seen = seen_from(&other_ns, v6(*ip, PORT), &what)?;
            expect(&what, seen, other_ipv6.into())?;
            let what = format!("peer pod on the other node → {name}");
            expect(
                &what,
                seen_from(&peer_ns, v6(*ip, PORT), &what)?,
                peer.ip.into(),
            )?;
            let what = format!("{name} → peer pod on the other node");
            expect(&what, seen_from(pod_ns, v6(peer.ip, PORT), &what)?, me)?;
            if pods.len() > 1 {
                let (next, _, _, next_ip) = &pods[(k + 1) % pods.len()];
                let what = format!("{name} → {next} on the node");
                expect(&what, seen_from(pod_ns, v6(*next_ip, PORT), &what)?, me)?;
            }
            let what = format!("{name} → outside {OUTSIDE_ADDR6}");
            let seen = seen_from(pod_ns, v6(OUTSIDE_ADDR6, OUTSIDE_PORT), &what)?;
            expect(&what, seen, me)?;
            if egress.is_some() {
                let what = format!("{name} → IPv4 outside {OUTSIDE_ADDR} through egress-cni");
                let dst = SocketAddr::V4(SocketAddrV4::new(OUTSIDE_ADDR, OUTSIDE_PORT));
                expect(
                    &what,
                    seen_from(pod_ns, dst, &what)?,
                    node.primary_ip.into(),
                )?;
            }
        }
        drop(listeners);
        checks.push(format!(
            "UDP over IPv6 node ({node_ipv6}) → pod, other node ({other_ipv6}) → pod, pod ↔ a pod \
             on the other node ({}){}, source address preserved",
            peer.ip,
            if pods.len() > 1 {
                ", pod → pod on the node"
            } else {
                ""
            }
        ));
        checks.push(format!(
            "UDP pod → IPv6 outside host {OUTSIDE_ADDR6}, seen as the pod's own address"
        ));
        if egress.is_some() {
            checks.push(format!(
                "UDP pod → IPv4 outside host {OUTSIDE_ADDR} through egress-cni (v4if0), seen as \
                 the node's primary IPv4 {}",
                node.primary_ip
            ));
        }

        // 5. CNI DEL of every pod (egress-cni first: the conflist's DEL order is reversed).
        for (name, pod_ns, result, _) in &pods {
            if let Some(e) = &egress {
                e.del(name, pod_ns.path(), result)?;
            }
            plugin.del(name, pod_ns.path(), Some(result))?;
        }
        other_plugin.del("peer-0", peer_ns.path(), Some(&peer.result))?;
        let routes = ip_in(&ns, &["-6", "route", "show", "table", "all"])?;
        let rules = ip_in(&ns, &["-6", "rule", "show"])?;
        for p in &summary.pods {
            ensure!(
                !routes.contains(&format!("{} ", p.ip)) && !rules.contains(&p.ip.to_string()),
                "a route or rule for {} is left after DEL:\n{routes}\n{rules}",
                p.ip
            );
        }
        let routes4 = ip_in(&ns, &["-4", "route", "show"])?;
        ensure!(
            !routes4.contains("169.254.172."),
            "egress routes left after DEL:\n{routes4}"
        );
        let nat = vpc_cni_net::snat::iptables_save(&ns, "nat")?;
        ensure!(
            !nat.contains("CNI-E4-"),
            "egress SNAT chains left after DEL:\n{nat}"
        );
        summary.assigned_after_delete = pool()?.assigned;
        ensure!(
            summary.assigned_after_delete == 0,
            "ipamd still counts {} assigned addresses after every DEL",
            summary.assigned_after_delete
        );
        checks.push(
            "after CNI DEL: no pod route or rule, no egress route or SNAT chain left, ipamd \
             counts 0 assigned"
                .into(),
        );
        summary.ec2_calls = sim.calls_by_action(since)?;
        c.check_hooks()?;
        summary.checks = checks;

        // 6. Stop both daemons as the kubelet would (SIGTERM), then drop every namespace.
        let status = d.stop()?;
        ensure!(
            status.success(),
            "ipamd exited with {status}\n{}",
            tail(&log)
        );
        other_ipamd.sigterm()?;
        std::thread::sleep(Duration::from_millis(200));
        let _ = other_ipamd.sigterm();
        let other_status = other_ipamd.wait_exit(WAIT)?;
        ensure!(
            other_status.success(),
            "the other node's ipamd exited with {other_status}\n{}",
            other_ipamd.log_tail(40)
        );
        cleanup.push("both nodes' ipamd stopped by SIGTERM".to_owned());
        let made = created(list_named()?).len();
        drop(pods);
        drop(peer_ns);
        drop(plugin);
        drop(other_plugin);
        drop(egress);
        drop(other_ipamd);
        drop(server);
        drop(c);
        cleanup.push(format!("{made} network namespaces deleted"));
        summary
    };
    let left = created(list_named()?);
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    let mut summary = summary;
    cleanup.push("none left".into());
    summary.cleanup = cleanup;
    Ok(summary)
}

/// The `AddNetwork` the plugin sends for pod `pod` (container `c-<pod>`, `eth0`).
pub fn add_request(pod: &str) -> AddNetworkRequest {
    AddNetworkRequest {
        client_version: env!("CARGO_PKG_VERSION").into(),
        k8s_pod_name: pod.into(),
        k8s_pod_namespace: "default".into(),
        k8s_pod_infra_container_id: format!("c-{pod}"),
        container_id: format!("c-{pod}"),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        ..Default::default()
    }
}

/// The `DelNetwork` the plugin sends when pod `pod` is deleted.
pub fn del_request(pod: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        client_version: env!("CARGO_PKG_VERSION").into(),
        k8s_pod_name: pod.into(),
        k8s_pod_namespace: "default".into(),
        k8s_pod_infra_container_id: format!("c-{pod}"),
        container_id: format!("c-{pod}"),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        reason: vpc_cni_rpc::REASON_POD_DELETED.into(),
        ..Default::default()
    }
}

/// A `CNIBackend` client over ipamd's socket.
pub type Client = vpc_cni_rpc::CniBackendClient<tonic::transport::Channel>;

/// AddNetwork for pod `pod` (container `c-<pod>`) as the plugin makes it: retried every
/// 250 ms while ipamd has no free address, for at most `wait`. Stops on Ctrl-C (see
/// [`install_interrupt_handler`]).
pub async fn add_network_with(
    client: &mut Client,
    pod: &str,
    wait: Duration,
) -> anyhow::Result<Ipv4Addr> {
    match add_network_any(client, pod, wait).await? {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => bail!("AddNetwork {pod}: an IPv6 address ({ip}) in an IPv4 cluster"),
    }
}

/// [`add_network_with`] for either family: the IPv4 address of the reply, or its IPv6
/// address when ipamd runs in IPv6 mode (the reply's `IPv4Addr` is then empty).
pub async fn add_network_any(
    client: &mut Client,
    pod: &str,
    wait: Duration,
) -> anyhow::Result<IpAddr> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        check_interrupted()?;
        let r = client
            .add_network(add_request(pod))
            .await
            .with_context(|| format!("AddNetwork {pod}"))?
            .into_inner();
        if r.success {
            let md = r
                .ip_allocation_metadata
                .first()
                .with_context(|| format!("AddNetwork {pod}: no address in the reply"))?;
            return match (md.i_pv4_addr.as_str(), md.i_pv6_addr.as_str()) {
                (v4, "") => v4.parse().map(IpAddr::V4),
                ("", v6) => v6.parse().map(IpAddr::V6),
                (v4, v6) => bail!("AddNetwork {pod}: both IPv4Addr {v4:?} and IPv6Addr {v6:?}"),
            }
            .with_context(|| format!("AddNetwork {pod}: {md:?}"));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("AddNetwork {pod}: no free address after {wait:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn run_grpc(opts: &Options, ipamd_bin: &Path, why: &str) -> anyhow::Result<Summary> {
    let tmp = tempfile::Builder::new().prefix("vpc-cni-demo-").tempdir()?;
    let socket = tmp.path().join("ipamd.sock");
    let log = tmp.path().join("ipamd.log");
    let mut cmd = ipamd_command(ipamd_bin, tmp.path(), &socket, &log)?;
    cmd.arg("--backend")
        .arg("sim")
        .env("VPC_CNI_SIM_INSTANCE_TYPE", &opts.instance_type)
        .env("VPC_CNI_SIM_VPC_CIDR", "10.3.0.0/16")
        .env("VPC_CNI_SIM_SUBNET_CIDR", "10.3.0.0/20")
        .env("IP_COOLDOWN_PERIOD", "0")
        .process_group(0);
    if opts.family == Family::V6 {
        ipv6_env(&mut cmd);
    }
    let booting = Instant::now();
    let mut d = Daemon::Local(
        cmd.spawn()
            .with_context(|| format!("starting {}", ipamd_bin.display()))?,
    );
    wait_serving(&mut d, &socket, &log)?;
    let boot = booting.elapsed();
    let introspection = logged_addr(&log, "introspection Some(")?;
    let sim = SimView::Admin(logged_addr(&log, " admin http://")?);
    let pool = || -> anyhow::Result<PoolView> {
        PoolView::parse(&http_get(None, introspection, "/v1/enis")?)
    };
    let warm_pool = pool()?;
    let state = sim.state()?;
    let (instance_id, inst) = state["instances"]
        .as_object()
        .and_then(|m| m.iter().next())
        .context("simulator state: no instance")?;
    let primary_eni = inst["primary_eni"].as_str().unwrap_or("");
    let node_ip: Ipv4Addr = state["network_interfaces"][primary_eni]["primary_ip"]
        .as_str()
        .context("simulator state: the node's primary address")?
        .parse()?;
    let subnet_id = inst["subnet_id"].as_str().unwrap_or("");
    let subnet: Ipv4Cidr = state["subnets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["id"].as_str() == Some(subnet_id))
        .and_then(|s| s["cidr"].as_str())
        .context("simulator state: the node's subnet")?
        .parse()
        .map_err(|e| anyhow::anyhow!("subnet CIDR: {e}"))?;

    let subnet6 = state["subnets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["id"].as_str() == Some(subnet_id))
        .and_then(|s| s["ipv6_cidr"].as_str())
        .map(str::to_owned);

    let rt = runtime()?;
    let names: Vec<String> = (0..opts.pods).map(|i| format!("pod-{i}")).collect();
    let adding = Instant::now();
    let pods = rt.block_on(async {
        let mut client = vpc_cni_rpc::connect_unix(&socket, WAIT).await?;
        let mut pods = Vec::new();
        for name in &names {
            let ip = add_network_any(&mut client, name, WAIT)
                .await
                .with_context(|| tail(&log))?;
            pods.push(Pod {
                name: name.clone(),
                ip,
            });
        }
        anyhow::Ok(pods)
    })?;
    let pods_took = adding.elapsed();
    let (ec2_ipv6_prefixes, node_ipv6) = sim.primary_eni_ipv6(instance_id)?;
    let mut summary = Summary {
        mode: Mode::GrpcOnly,
        family: opts.family,
        skipped: Some(why.to_owned()),
        instance_id: instance_id.clone(),
        instance_type: opts.instance_type.clone(),
        subnet,
        node_ip,
        subnet6,
        node_ipv6,
        ec2_ipv6_prefixes,
        notes: Vec::new(),
        add_split: None,
        boot,
        warm_pool,
        pods_took,
        pods,
        pool_with_pods: pool()?,
        ec2_addresses: sim.node_addresses(instance_id)?,
        ec2_calls: BTreeMap::new(),
        checks: Vec::new(),
        assigned_after_delete: -1,
        cleanup: Vec::new(),
    };
    let mut checks = Vec::new();
    check_addresses(&summary, &mut checks, opts.pods)?;
    ensure!(health(&socket)?, "ipamd's gRPC health is not SERVING");
    checks.push("ipamd's gRPC health SERVING with the pods running".into());
    rt.block_on(async {
        let mut client = vpc_cni_rpc::connect_unix(&socket, WAIT).await?;
        for name in &names {
            let r = client.del_network(del_request(name)).await?.into_inner();
            ensure!(r.success, "DelNetwork {name}: {r:?}");
        }
        anyhow::Ok(())
    })?;
    summary.assigned_after_delete = pool()?.assigned;
    ensure!(
        summary.assigned_after_delete == 0,
        "ipamd still counts {} assigned addresses after every DelNetwork",
        summary.assigned_after_delete
    );
    checks.push("after DelNetwork: ipamd counts 0 assigned".into());
    summary.ec2_calls = sim.calls_by_action(0)?;
    summary.checks = checks;
    // The runtime owns the client connections: dropping it closes them, so ipamd's graceful
    // gRPC shutdown does not wait for an idle client.
    drop(rt);
    let status = d.stop()?;
    ensure!(
        status.success(),
        "ipamd exited with {status}\n{}",
        tail(&log)
    );
    drop(d);
    drop(tmp);
    summary.cleanup = vec![
        "ipamd and its embedded simulator stopped by SIGTERM".into(),
        "socket and checkpoint directory removed".into(),
    ];
    Ok(summary)
}
