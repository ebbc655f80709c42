//! The soak run (issue 14): one simulated node through many pod ADDs and DELs while ipamd is
//! SIGKILLed and restarted, EC2 is throttled and fails in bursts, and the reconcile and
//! leaked-ENI cleanup loops run at short periods. At the end nothing is duplicated, lost or
//! leaked, and ipamd's resident memory and open descriptors stayed flat.
//!
//! - ipamd is the workspace's binary, `--backend aws`: the real EC2 client against the
//!   simulator served over HTTP in the fabric, started in the node namespace as every e2e
//!   scenario starts it ([`vpc_cni_e2e::node::Ipamd`]).
//! - Pod operations are AddNetwork/DelNetwork over ipamd's unix socket as the plugin sends
//!   them (one connection per operation); one pod in [`PLUGIN_EVERY`] goes through the real
//!   `aws-cni` binary into a real pod namespace instead. The runtime's semantics: an ADD that
//!   failed or was abandoned (the client gave up before the answer) is followed by a DEL; some
//!   DELs are repeated; a DEL that failed because ipamd was down is retried after the restart.
//!   The DEL after an abandoned ADD is sent at once, and the pod's host veth goes with it: it
//!   may be served before the abandoned ADD (ipamd answers "unknown pod", then assigns the
//!   late ADD's address to a pod that is gone). ipamd's orphan sweep releases such an address
//!   once it is older than [`ORPHAN_GRACE`] and its veth was absent on two consecutive sweeps;
//!   every release it logs must be of a pod whose ADD was abandoned or failed (a live pod's
//!   would be a bug), and the end checks find no address left to one.
//!   At most [`MAX_LIVE`] pods hold addresses at once (the m5.large's 27 secondary addresses);
//!   the number alive follows a seeded random target, so the pool grows and shrinks by whole
//!   ENIs.
//! - Kills: `ops / 125` (at least 4) in the first 60 % of the operations, each either a SIGKILL
//!   from another thread 0-40 ms after an operation starts, or a failpoint
//!   (`VPC_CNI_FAILPOINTS`: inside a checkpoint write, before an ENI is attached, before
//!   assigned addresses reach the datastore) armed at the restart before it. The last 40 % of
//!   the operations are one process: the long segment whose memory is checked.
//! - EC2 bursts (`ops / 125`, at least 4, 15-55 operations each): small token buckets
//!   (`RequestLimitExceeded`), `InternalError`/`Unavailable` answers and lost answers, or all
//!   of them.
//! - Every acknowledged ADD is checked at once against the pods alive: no address given twice.
//! - At the end: faults off, then (polled until they agree, at least two reconcile periods and
//!   two EC2 reads by ipamd's loops after the faults stopped) ipamd's datastore by
//!   introspection, its checkpoint file and the simulator's ENIs all describe exactly the pods
//!   alive, no address held twice, no ENI or address leaked; then every pod is deleted and the
//!   same holds with none.
//! - ipamd's `VmRSS` and descriptor count are sampled every few operations of each process and
//!   printed as a series. Checks (counts, not times): in every segment with enough samples, the
//!   descriptors after the first fifth never exceed the most seen in that fifth by more than
//!   [`FD_SLACK`]; in the long segment, RSS from the end of its first fifth to its last sample
//!   grows by less than [`RSS_SLACK_KIB`].
//!
//! `SOAK_OPS=<n>` scales the run (default 1,000; the long run is 10,000, see the README);
//! `E2E_SEED=<n>` replays a schedule. A failing run keeps ipamd's log and checkpoint under
//! `target/tmp/`. Root only; skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vpc_cni_e2e::demo::{add_request, del_request};
use vpc_cni_e2e::node::{
    e2e_seed, keep_evidence, leaks, wait_until, workspace_bin, Ipamd, Plugin, ProcSample,
    SimNodeView,
};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::{Netlink, VethEnd};
use vpc_cni_rpc::{is_unknown_pod, AddNetworkRequest};
use vpc_sim::control::{BucketSpec, FaultSpec, ThrottleConfig};
use vpc_sim::rng::SimRng;
use vpc_sim::sim::SimConfig;

/// Operations of the short run (the CI one).
const DEFAULT_OPS: usize = 1000;
/// Most pods holding an address at once (live plus those whose DEL is still owed): an
/// m5.large has 3 ENIs of 10 addresses, 27 of them secondary.
const MAX_LIVE: usize = 27;
/// ipamd's orphan grace (`VPC_CNI_ORPHAN_GRACE`): short, so that the orphans of abandoned
/// ADDs are released during the run.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// What ipamd logs when its orphan sweep releases an address.
const ORPHAN_RELEASED: &str = "released an orphaned address";
/// One new pod in this many goes through the real plugin binary and a real namespace.
const PLUGIN_EVERY: u64 = 12;
/// How long an ADD keeps asking while ipamd has no free address (the plugin's
/// `poolWaitSeconds`, shortened).
const POOL_WAIT: Duration = Duration::from_secs(3);
/// A gRPC call that takes longer than this is a hang (healthy ipamd answers in milliseconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Descriptors allowed above the warm-up's highest count: the EC2 client's pooled
/// connections (one per concurrent call: pool loop, reconcile, leaked-ENI cleanup, a retry in
/// flight), a gRPC or introspection connection being closed, a checkpoint file being written.
/// A leak of one descriptor per operation, per EC2 call or per loop run passes this within a
/// segment of the short run.
const FD_SLACK: usize = 8;
/// RSS growth allowed over the long segment after its warm-up, in KiB. Allocator arenas of
/// the runtime's worker threads, the EC2 client's connection pool and the metrics' label sets
/// reach their size during warm-up; after it, 4 MiB is about 10 KiB per operation over the
/// short run's 400-operation segment and 1 KiB per operation over the long run's 4,000: a
/// request, a reply or a datastore entry kept per operation would exceed it.
const RSS_SLACK_KIB: u64 = 4096;
/// ipamd's reconcile period (`VPC_CNI_RECONCILE_INTERVAL`).
const RECONCILE_PERIOD: Duration = Duration::from_secs(1);
/// How long the final checks wait for ipamd's loops and EC2 to agree.
const SETTLE_WAIT: Duration = Duration::from_secs(90);

/// The run's size, from `SOAK_OPS`.
#[derive(Debug, Clone, Copy)]
struct Scale {
    ops: usize,
    kills: usize,
    bursts: usize,
    sample_every: usize,
}

impl Scale {
    fn from_env() -> anyhow::Result<Scale> {
        let ops = match std::env::var("SOAK_OPS") {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 200)
                .with_context(|| format!("SOAK_OPS: {v:?} is not a count of at least 200"))?,
            Err(_) => DEFAULT_OPS,
        };
        Ok(Scale {
            ops,
            kills: (ops / 125).max(4),
            bursts: (ops / 125).max(4),
            sample_every: (ops / 400).max(10),
        })
    }
}

/// One planned kill of ipamd.
#[derive(Debug, Clone)]
enum Kill {
    /// SIGKILL from another thread `delay_ms` after operation `at` starts.
    External { at: usize, delay_ms: u64 },
    /// ipamd armed with failpoint `point` at the start before; killed from outside at
    /// operation `by` if the point was not reached by then.
    Failpoint { point: String, by: usize },
}

/// The failpoints, each with how many hits to draw the count from (checkpoint writes happen
/// once per operation or more; address assignments every few operations; ENI creations a few
/// times per thousand operations: while `eni-created` is armed the pods go and come back, and
/// when it is not reached by the segment's end ipamd is killed from outside instead).
const FAILPOINTS: &[(&str, u64)] = &[
    ("checkpoint-before-rename", 40),
    ("eni-created", 1),
    ("checkpoint-before-dir-sync", 40),
    ("addresses-assigned", 3),
    ("checkpoint-before-write", 40),
];

/// A burst of EC2 trouble over operations `start..start + len`.
#[derive(Debug, Clone, Copy)]
struct Burst {
    start: usize,
    len: usize,
    throttle: bool,
    errors: bool,
}

fn plan(scale: Scale, rng: &mut SimRng) -> (Vec<Kill>, Vec<Burst>) {
    let span = scale.ops * 6 / 10 - 20;
    let step = span / scale.kills;
    let mut kills = Vec::new();
    for i in 0..scale.kills {
        let at = 20 + i * step + rng.below((step / 2).max(1) as u64) as usize;
        if i % 2 == 1 {
            let (point, range) = FAILPOINTS[(i / 2) % FAILPOINTS.len()];
            let n = 1 + rng.below(range.min(step as u64));
            kills.push(Kill::Failpoint {
                point: format!("{point}={n}"),
                by: at + step / 2,
            });
        } else {
            kills.push(Kill::External {
                at,
                delay_ms: rng.below(40),
            });
        }
    }
    let bstep = scale.ops / scale.bursts;
    let bursts = (0..scale.bursts)
        .map(|b| {
            let kind = b % 3;
            Burst {
                start: b * bstep + rng.below((bstep / 2).max(1) as u64) as usize,
                len: 15 + rng.below(40) as usize,
                throttle: kind != 1,
                errors: kind != 0,
            }
        })
        .collect();
    (kills, bursts)
}

/// How a pod was added.
enum Via {
    /// AddNetwork over the socket.
    Grpc,
    /// The plugin binary, into this namespace, with this result.
    Plugin {
        ns: TestNetns,
        result: serde_json::Value,
    },
}

/// A pod whose ADD was acknowledged and which is not deleted.
struct Pod {
    name: String,
    ip: Ipv4Addr,
    via: Via,
}

/// A DEL the runtime owes: after an ADD that failed or was abandoned, or a DEL that failed.
struct Owed {
    name: String,
    /// For a plugin pod: its namespace and, when known, the ADD result.
    plugin: Option<(TestNetns, Option<serde_json::Value>)>,
    /// Not sent before this operation (with ipamd running).
    due: usize,
}

/// What an AddNetwork came to.
enum AddOutcome {
    Assigned(Ipv4Addr),
    /// `Success=false` until [`POOL_WAIT`] ran out.
    NoAddress,
    /// The client stopped waiting (as a plugin killed by its runtime's timeout).
    Abandoned,
    /// Transport or status error.
    Failed(String),
}

/// The plugin's side of the socket: one connection per operation. As the plugin does, the
/// pod's host-side veth (`eni<hash>`, here a veth pair with both ends on the node) is made
/// before the AddNetwork and removed after the DelNetwork: ipamd keeps a restored
/// checkpoint entry only while its pod's veth exists.
struct Rpc {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
    node: Netlink,
}

fn host_veth(pod: &str) -> String {
    vpc_cni_net::names::host_veth_name("eni", "default", pod, 0)
}

impl Rpc {
    fn new(socket: PathBuf, node_ns: &vpc_cni_net::Netns) -> anyhow::Result<Rpc> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let node = {
            let _in_rt = rt.enter();
            Netlink::open(node_ns)?
        };
        Ok(Rpc { rt, socket, node })
    }

    fn add_host_veth(&self, pod: &str) -> anyhow::Result<()> {
        let end = |name: String| VethEnd {
            name,
            mtu: 9001,
            mac: None,
            up: false,
        };
        let local = end(host_veth(pod));
        let peer = end(format!(
            "p{}",
            vpc_cni_net::names::pod_hash("default", pod, 0)
        ));
        self.rt
            .block_on(self.node.add_veth(&local, &peer, None))
            .with_context(|| format!("host veth of {pod}"))
    }

    fn add(&self, pod: &str, abandon_after: Option<Duration>) -> AddOutcome {
        let req = AddNetworkRequest {
            netns: format!("/var/run/netns/{pod}"),
            ..add_request(pod)
        };
        let call = async {
            let deadline = tokio::time::Instant::now() + POOL_WAIT;
            loop {
                let mut client = vpc_cni_rpc::connect_unix_direct(&self.socket, CALL_TIMEOUT)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let r = tokio::time::timeout(CALL_TIMEOUT, client.add_network(req.clone()))
                    .await
                    .map_err(|_| format!("AddNetwork hung for {CALL_TIMEOUT:?}"))?
                    .map_err(|s| format!("AddNetwork: {s}"))?
                    .into_inner();
                if r.success {
                    let md = r
                        .ip_allocation_metadata
                        .first()
                        .ok_or("AddNetwork: success without an address")?;
                    return md
                        .i_pv4_addr
                        .parse::<Ipv4Addr>()
                        .map(Some)
                        .map_err(|e| format!("AddNetwork: IPv4Addr {:?}: {e}", md.i_pv4_addr));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.rt.block_on(async {
            let r = match abandon_after {
                Some(d) => match tokio::time::timeout(d, call).await {
                    Ok(r) => r,
                    Err(_) => return AddOutcome::Abandoned,
                },
                None => call.await,
            };
            match r {
                Ok(Some(ip)) => AddOutcome::Assigned(ip),
                Ok(None) => AddOutcome::NoAddress,
                Err(e) => AddOutcome::Failed(e),
            }
        })
    }

    /// DelNetwork ("unknown pod" counts as done, as the plugin treats it), then the host veth
    /// goes.
    fn del(&self, pod: &str) -> Result<(), String> {
        let req = del_request(pod);
        self.rt.block_on(async {
            let mut client = vpc_cni_rpc::connect_unix_direct(&self.socket, CALL_TIMEOUT)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            match tokio::time::timeout(CALL_TIMEOUT, client.del_network(req)).await {
                Err(_) => Err(format!("DelNetwork hung for {CALL_TIMEOUT:?}")),
                Ok(Err(s)) if is_unknown_pod(&s) => Ok(()),
                Ok(Err(s)) => Err(format!("DelNetwork: {s}")),
                Ok(Ok(r)) if r.get_ref().success => Ok(()),
                Ok(Ok(r)) => Err(format!("DelNetwork: {:?}", r.into_inner())),
            }?;
            self.node
                .delete_link_by_name(&host_veth(pod))
                .await
                .map(|_| ())
                .map_err(|e| format!("delete host veth: {e}"))
        })
    }
}

/// One ipamd process: its samples, and how it started and ended.
#[derive(Debug)]
struct Segment {
    pid: u32,
    first_op: usize,
    armed: Option<String>,
    ended_by: String,
    samples: Vec<(usize, ProcSample)>,
}

#[derive(Debug, Default)]
struct Stats {
    adds: usize,
    adds_via_plugin: usize,
    dels: usize,
    dels_repeated: usize,
    adds_abandoned: usize,
    adds_no_address: usize,
    failed_at_crash: usize,
    owed_retried: usize,
    kills_external: usize,
    kills_failpoint: usize,
    kills_at_start: usize,
    failpoints_not_reached: usize,
    plugin_add_failures: Vec<String>,
}

struct Soak<'a> {
    scale: Scale,
    rng: SimRng,
    ipamd: Ipamd,
    plugin: Plugin,
    rpc: Rpc,
    c: &'a SimCluster,
    instance_id: String,
    live: Vec<Pod>,
    owed: Vec<Owed>,
    kills: Vec<Kill>,
    next_kill: usize,
    killer: Option<(JoinHandle<()>, u64)>,
    segments: Vec<Segment>,
    stats: Stats,
    op: usize,
    next_pod: usize,
    /// Pods whose ADD was abandoned or failed: the only ones whose address the orphan sweep
    /// may release.
    may_be_orphaned: BTreeSet<String>,
}

#[test]
fn soak_pod_churn_with_kills_and_ec2_bursts() -> anyhow::Result<()> {
    if skip_netns_test("soak (pod churn, ipamd kills, EC2 bursts)") {
        return Ok(());
    }
    let scale = Scale::from_env()?;
    let seed = e2e_seed();
    eprintln!("soak: seed {seed} (replay with E2E_SEED={seed}), {scale:?}");
    let tmp = tempfile::Builder::new().prefix("vcn-soak-").tempdir()?;
    let r = run(seed, scale, tmp.path());
    if r.is_err() {
        keep_evidence(
            tmp.path(),
            &Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("soak-{seed}")),
        );
    }
    r.with_context(|| format!("soak seed {seed} (replay with E2E_SEED={seed})"))
}

fn run(seed: u64, scale: Scale, tmp: &Path) -> anyhow::Result<()> {
    let mut rng = SimRng::new(seed);
    let (kills, bursts) = plan(scale, &mut rng);
    eprintln!("soak: kills {kills:?}");
    eprintln!("soak: EC2 bursts {bursts:?}");
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;

    let c = SimCluster::new(SimConfig {
        seed,
        ..SimConfig::default()
    })?;
    let vpc = c.create_vpc("10.7.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.7.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let ns = node.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;
    let first_seq = c.sim.with(|s| s.calls().back().map_or(0, |c| c.seq)) + 1;

    let mut ipamd = Ipamd::new(ipamd_bin, &ns, &server, &node.instance_id, tmp)?;
    ipamd
        .env("WARM_IP_TARGET", "4")
        .env("CLUSTER_NAME", "soak")
        .env("VPC_CNI_POOL_TICK", "200ms")
        .env("VPC_CNI_DECREASE_INTERVAL", "1s")
        .env("VPC_CNI_MIN_ENI_AGE", "2s")
        .env(
            "VPC_CNI_RECONCILE_INTERVAL",
            format!("{}ms", RECONCILE_PERIOD.as_millis()),
        )
        .env("VPC_CNI_LEAKED_ENI_DELAY", "0s")
        .env("VPC_CNI_LEAKED_ENI_INTERVAL", "2s")
        .env(
            "VPC_CNI_ORPHAN_GRACE",
            format!("{}ms", ORPHAN_GRACE.as_millis()),
        )
        .env("VPC_CNI_EC2_RETRY_BASE", "50ms");
    let plugin = Plugin::new(cni_bin, &ns, ipamd.socket())?.with_pool_wait(POOL_WAIT.as_secs_f64());
    let rpc = Rpc::new(ipamd.socket(), &ns)?;
    let mut soak = Soak {
        scale,
        rng,
        ipamd,
        plugin,
        rpc,
        c: &c,
        instance_id: node.instance_id.clone(),
        live: Vec::new(),
        owed: Vec::new(),
        kills,
        next_kill: 0,
        killer: None,
        segments: Vec::new(),
        stats: Stats::default(),
        op: 0,
        next_pod: 0,
        may_be_orphaned: BTreeSet::new(),
    };
    let started = Instant::now();
    let r = soak.churn(&bursts);
    let r = r.and_then(|()| {
        eprintln!("soak: churn took {:?}", started.elapsed());
        soak.final_checks()
    });
    soak.print_report(first_seq);
    let mem = soak.memory_checks();
    let r = r.and_then(|()| soak.orphan_checks());
    if let Err(e) = r {
        bail!(
            "{e:#}\n--- ipamd log (tail) ---\n{}",
            soak.ipamd.log_tail(80)
        );
    }
    mem?;
    c.check_hooks()?;
    soak.ipamd.kill()?;
    drop(soak);
    drop(server);
    Ok(())
}

fn faults_for(b: &Burst) -> (ThrottleConfig, BTreeMap<String, FaultSpec>) {
    let mut buckets = BTreeMap::new();
    if b.throttle {
        for a in [
            "AssignPrivateIpAddresses",
            "UnassignPrivateIpAddresses",
            "CreateNetworkInterface",
            "AttachNetworkInterface",
            "DetachNetworkInterface",
            "DeleteNetworkInterface",
            "CreateTags",
            "ModifyNetworkInterfaceAttribute",
        ] {
            buckets.insert(
                a.to_owned(),
                BucketSpec {
                    capacity: 2.0,
                    refill_per_sec: 1.0,
                },
            );
        }
        for a in [
            "DescribeNetworkInterfaces",
            "DescribeInstances",
            "DescribeSubnets",
            "DescribeInstanceTypes",
        ] {
            buckets.insert(
                a.to_owned(),
                BucketSpec {
                    capacity: 3.0,
                    refill_per_sec: 2.0,
                },
            );
        }
    }
    let mut faults = BTreeMap::new();
    if b.errors {
        faults.insert(
            "*".to_owned(),
            FaultSpec {
                error_rate: 0.2,
                unavailable_rate: 0.1,
                lost_response_rate: 0.03,
                timeout_ms: Some(300),
                ..FaultSpec::default()
            },
        );
    }
    (
        ThrottleConfig {
            enabled: b.throttle,
            buckets,
        },
        faults,
    )
}

impl Soak<'_> {
    fn churn(&mut self, bursts: &[Burst]) -> anyhow::Result<()> {
        while !self.start_segment()? {}
        let mut target = 0usize;
        while self.op < self.scale.ops {
            let op = self.op;
            if op.is_multiple_of(40) {
                target = self.rng.below(MAX_LIVE as u64 + 1) as usize;
            }
            let target = self.eni_created_target().unwrap_or(target);
            for b in bursts {
                if b.start == op {
                    let (t, f) = faults_for(b);
                    self.c.sim.with(|s| {
                        s.set_throttle(t);
                        s.set_faults(f);
                    });
                } else if b.start + b.len == op {
                    self.c.sim.with(|s| {
                        s.set_throttle(ThrottleConfig::default());
                        s.set_faults(BTreeMap::new());
                    });
                }
            }
            self.arm_killer()?;
            let held = self.live.len() + self.owed.len();
            let add = held < MAX_LIVE
                && (self.live.is_empty()
                    || if held < target {
                        self.rng.chance(0.8)
                    } else {
                        self.rng.chance(0.2)
                    });
            let ok = if add { self.add()? } else { self.del()? };
            self.op += 1;
            self.after_op(ok)?;
            if self.op.is_multiple_of(self.scale.ops / 10) {
                eprintln!(
                    "soak: op {}: {} pods alive, {} kills, {} ipamd processes",
                    self.op,
                    self.live.len(),
                    self.stats.kills_external + self.stats.kills_failpoint,
                    self.segments.len()
                );
            }
        }
        self.c.sim.with(|s| {
            s.set_throttle(ThrottleConfig::default());
            s.set_faults(BTreeMap::new());
        });
        Ok(())
    }

    /// While `eni-created` is armed, the pods alive first aim at none, so that ipamd frees
    /// its secondary ENIs, then at [`MAX_LIVE`], so that it creates them again.
    fn eni_created_target(&self) -> Option<usize> {
        let seg = self.segments.last()?;
        if !seg.armed.as_deref()?.starts_with("eni-created") {
            return None;
        }
        let Some(Kill::Failpoint { by, .. }) = self.kills.get(self.next_kill) else {
            return None;
        };
        let half = seg.first_op + by.saturating_sub(seg.first_op) / 2;
        Some(if self.op < half { 0 } else { MAX_LIVE })
    }

    /// Starts the killer thread of an external kill (or of a failpoint that was not reached in
    /// time) at its operation.
    fn arm_killer(&mut self) -> anyhow::Result<()> {
        if self.killer.is_some() {
            return Ok(());
        }
        let delay_ms = match self.kills.get(self.next_kill) {
            Some(Kill::External { at, delay_ms }) if *at <= self.op => *delay_ms,
            Some(Kill::Failpoint { by, .. }) if *by <= self.op => {
                self.stats.failpoints_not_reached += 1;
                0
            }
            _ => return Ok(()),
        };
        let pid = self
            .ipamd
            .pid()
            .context("ipamd not running at a kill point")?;
        let handle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        });
        self.killer = Some((handle, delay_ms));
        Ok(())
    }

    fn add(&mut self) -> anyhow::Result<bool> {
        self.stats.adds += 1;
        let name = format!("s{}", self.next_pod);
        self.next_pod += 1;
        if self.rng.below(PLUGIN_EVERY) == 0 {
            self.stats.adds_via_plugin += 1;
            let ns = TestNetns::new("pod")?;
            return match self.plugin.add(&name, ns.path()) {
                Ok(added) => {
                    self.acknowledged(&name, added.ip)?;
                    self.live.push(Pod {
                        name,
                        ip: added.ip,
                        via: Via::Plugin {
                            ns,
                            result: added.result,
                        },
                    });
                    Ok(true)
                }
                Err(e) => {
                    self.may_be_orphaned.insert(name.clone());
                    if self.stats.plugin_add_failures.len() < 5 {
                        self.stats
                            .plugin_add_failures
                            .push(format!("op {}: {e:#}", self.op));
                    }
                    self.owed.push(Owed {
                        name,
                        plugin: Some((ns, None)),
                        due: self.op,
                    });
                    Ok(false)
                }
            };
        }
        // One ADD in 30 is abandoned by its client after 0-5 ms.
        let abandon = self
            .rng
            .chance(1.0 / 30.0)
            .then(|| Duration::from_micros(self.rng.below(5000)));
        self.rpc.add_host_veth(&name)?;
        match self.rpc.add(&name, abandon) {
            AddOutcome::Assigned(ip) => {
                self.acknowledged(&name, ip)?;
                self.live.push(Pod {
                    name,
                    ip,
                    via: Via::Grpc,
                });
                Ok(true)
            }
            AddOutcome::Abandoned => {
                self.stats.adds_abandoned += 1;
                self.may_be_orphaned.insert(name.clone());
                // The runtime's DEL follows at once (in after_op).
                self.owed.push(Owed {
                    name,
                    plugin: None,
                    due: self.op,
                });
                Ok(true)
            }
            AddOutcome::NoAddress => {
                // The runtime's DEL follows at once (in after_op).
                self.stats.adds_no_address += 1;
                self.owed.push(Owed {
                    name,
                    plugin: None,
                    due: self.op,
                });
                Ok(true)
            }
            AddOutcome::Failed(e) => {
                self.may_be_orphaned.insert(name.clone());
                self.owed.push(Owed {
                    name,
                    plugin: None,
                    due: self.op,
                });
                self.check_failure(&format!("ADD: {e}"))?;
                Ok(false)
            }
        }
    }

    /// An acknowledged address must not be one a live pod holds.
    fn acknowledged(&self, name: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        if let Some(other) = self.live.iter().find(|p| p.ip == ip) {
            bail!(
                "op {}: ADD {name} was given {ip}, which {} holds",
                self.op,
                other.name
            );
        }
        Ok(())
    }

    fn del(&mut self) -> anyhow::Result<bool> {
        if self.live.is_empty() {
            return Ok(true);
        }
        self.stats.dels += 1;
        let i = self.rng.below(self.live.len() as u64) as usize;
        let pod = self.live.swap_remove(i);
        let repeat = self.rng.chance(0.05);
        let r = match &pod.via {
            Via::Grpc => self.rpc.del(&pod.name).map_err(anyhow::Error::msg),
            Via::Plugin { ns, result } => self.plugin.del(&pod.name, ns.path(), Some(result)),
        };
        let op = self.op;
        let owed = |pod: Pod| Owed {
            name: pod.name,
            due: op,
            plugin: match pod.via {
                Via::Grpc => None,
                Via::Plugin { ns, result } => Some((ns, Some(result))),
            },
        };
        match r {
            Ok(()) if repeat => {
                self.stats.dels_repeated += 1;
                self.owed.push(owed(pod));
                self.pay_owed_now()?;
                Ok(true)
            }
            Ok(()) => Ok(true),
            Err(e) => {
                let name = pod.name.clone();
                self.owed.push(owed(pod));
                self.check_failure(&format!("DEL {name}: {e:#}"))?;
                Ok(false)
            }
        }
    }

    /// An operation failed: fine when ipamd is down or going down (the DEL is owed until the
    /// restart); otherwise an error, except for an ADD that found no free address.
    fn check_failure(&mut self, what: &str) -> anyhow::Result<()> {
        if self.killer.is_some() || self.dying()? {
            return Ok(());
        }
        bail!(
            "op {}: {what} failed with ipamd running and no kill around it",
            self.op
        )
    }

    /// Whether ipamd has exited or exits within a moment (a failpoint raising SIGKILL).
    fn dying(&mut self) -> anyhow::Result<bool> {
        for _ in 0..20 {
            if self.ipamd.exited()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(false)
    }

    /// The runtime's DELs for what is owed and due (everything after a restart and at the
    /// end: the abandoned ADDs' requests died with the old process or were long served), with
    /// ipamd running. Stops at the first failure, which must be ipamd going down.
    fn pay_owed(&mut self, all: bool) -> anyhow::Result<()> {
        let mut i = 0;
        while i < self.owed.len() {
            if !all && self.owed[i].due > self.op {
                i += 1;
                continue;
            }
            let o = self.owed.swap_remove(i);
            let r = match &o.plugin {
                None => self.rpc.del(&o.name).map_err(anyhow::Error::msg),
                Some((ns, prev)) => self.plugin.del(&o.name, ns.path(), prev.as_ref()),
            };
            if let Err(e) = r {
                let name = o.name.clone();
                self.owed.push(o);
                self.check_failure(&format!("owed DEL {name}: {e:#}"))?;
                return Ok(());
            }
        }
        Ok(())
    }

    fn pay_owed_now(&mut self) -> anyhow::Result<()> {
        self.pay_owed(false)
    }

    fn after_op(&mut self, ok: bool) -> anyhow::Result<()> {
        let crashed = match &self.killer {
            Some((h, _)) if h.is_finished() || !ok => true,
            Some(_) => false,
            None => self.ipamd.exited()?.is_some() || (!ok && self.dying()?),
        };
        if crashed {
            self.recover()?;
        } else if !self.owed.is_empty() {
            // The runtime's DELs that are due (after an ADD that found no free address: at once).
            self.pay_owed_now()?;
            if self.ipamd.exited()?.is_some() {
                self.recover()?;
            }
        }
        if let (Some(seg), Some(pid)) = (self.segments.last_mut(), self.ipamd.pid()) {
            if (self.op - seg.first_op).is_multiple_of(self.scale.sample_every) {
                if let Ok(s) = ProcSample::of(pid) {
                    seg.samples.push((self.op, s));
                }
            }
        }
        Ok(())
    }

    /// Reaps the dead ipamd, says why it died, restarts it (armed for the next planned kill)
    /// and pays the owed DELs; again if it dies meanwhile.
    fn recover(&mut self) -> anyhow::Result<()> {
        loop {
            let external = match self.killer.take() {
                Some((h, delay)) => {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("killer thread panicked"))?;
                    Some(delay)
                }
                None => None,
            };
            let status = self.ipamd.kill()?;
            let log = self.ipamd.log_of_last_start();
            let fired = FAILPOINTS
                .iter()
                .find(|(p, _)| log.contains(&format!("failpoint {p} reached")))
                .map(|(p, _)| *p);
            let cause = match (fired, external) {
                (Some(p), _) => {
                    self.stats.kills_failpoint += 1;
                    format!("failpoint {p}")
                }
                (None, Some(d)) => {
                    self.stats.kills_external += 1;
                    format!("SIGKILL {d} ms into an operation")
                }
                (None, None) => bail!(
                    "op {}: ipamd exited on its own ({status:?}) with no kill\n{}",
                    self.op,
                    tail(&log, 60)
                ),
            };
            self.stats.failed_at_crash += self.owed.len();
            if let Some(seg) = self.segments.last_mut() {
                seg.ended_by = format!("{cause} at op {}", self.op);
            }
            self.next_kill += 1;
            while !self.start_segment()? {}
            let owed = self.owed.len();
            self.pay_owed(true)?;
            self.stats.owed_retried += owed - self.owed.len();
            if self.owed.is_empty() && self.ipamd.exited()?.is_none() {
                return Ok(());
            }
            // pay_owed_now only stops early when ipamd is dying (an armed failpoint).
        }
    }

    /// Starts ipamd, armed with the next planned failpoint; false when it died at that
    /// failpoint during start-up (then the kill is counted and the next one planned).
    fn start_segment(&mut self) -> anyhow::Result<bool> {
        let armed = match self.kills.get(self.next_kill) {
            Some(Kill::Failpoint { point, .. }) => Some(point.clone()),
            _ => None,
        };
        self.ipamd
            .env("VPC_CNI_FAILPOINTS", armed.clone().unwrap_or_default());
        self.ipamd.spawn()?;
        let pid = self.ipamd.pid().context("ipamd pid")?;
        self.segments.push(Segment {
            pid,
            first_op: self.op,
            armed: armed.clone(),
            ended_by: "end of run".into(),
            samples: Vec::new(),
        });
        match self.ipamd.wait_serving(vpc_cni_e2e::node::START_WAIT) {
            Ok(()) => Ok(true),
            Err(e) => {
                let log = self.ipamd.log_of_last_start();
                let fired = armed.as_deref().and_then(|a| {
                    let name = a.split('=').next().unwrap_or(a);
                    log.contains(&format!("failpoint {name} reached"))
                        .then_some(name)
                });
                let Some(name) = fired else {
                    return Err(e.context(format!("ipamd start at op {}", self.op)));
                };
                self.ipamd.kill()?;
                self.stats.kills_failpoint += 1;
                self.stats.kills_at_start += 1;
                if let Some(seg) = self.segments.last_mut() {
                    seg.ended_by = format!("failpoint {name} during start-up");
                }
                self.next_kill += 1;
                Ok(false)
            }
        }
    }

    /// After the churn (faults off): retry what is owed, then ipamd's datastore, its
    /// checkpoint and EC2 must describe exactly the live pods; then with every pod deleted,
    /// nothing.
    fn final_checks(&mut self) -> anyhow::Result<()> {
        let quiet_since = (
            Instant::now(),
            self.c.sim.with(|s| s.calls().back().map_or(0, |c| c.seq)) + 1,
        );
        self.pay_owed(true)?;
        ensure!(self.owed.is_empty(), "DELs still owed at the end");
        let planned = self.kills.len();
        let done = self.stats.kills_external + self.stats.kills_failpoint;
        ensure!(
            done >= planned,
            "{done} kills happened of {planned} planned"
        );
        let live: BTreeSet<(Ipv4Addr, String)> =
            self.live.iter().map(|p| (p.ip, p.name.clone())).collect();
        ensure!(
            live.len() == self.live.len(),
            "two live pods share an address"
        );
        self.settle(&live, quiet_since)
            .context("with the live pods, after the last restart")?;
        eprintln!(
            "soak: {} live pods: datastore, checkpoint and EC2 agree",
            live.len()
        );
        for p in std::mem::take(&mut self.live) {
            match &p.via {
                Via::Grpc => self.rpc.del(&p.name).map_err(anyhow::Error::msg)?,
                Via::Plugin { ns, result } => self.plugin.del(&p.name, ns.path(), Some(result))?,
            }
        }
        self.settle(&BTreeSet::new(), quiet_since)
            .context("after deleting every pod")?;
        eprintln!("soak: no pod left: nothing assigned, nothing leaked in EC2");
        Ok(())
    }

    /// Waits until the datastore (introspection), the checkpoint and the simulator agree with
    /// `live` (address, pod name): no address held twice, no assignment missing or extra, no
    /// ENI or address leaked; and until ipamd's loops have run since the faults stopped
    /// (`quiet_since`: time and first call sequence number): two reconcile periods and two
    /// `DescribeNetworkInterfaces` answered.
    fn settle(
        &self,
        live: &BTreeSet<(Ipv4Addr, String)>,
        quiet_since: (Instant, u64),
    ) -> anyhow::Result<()> {
        let mut last = Vec::new();
        let r = wait_until(
            "datastore, checkpoint and EC2 to agree",
            SETTLE_WAIT,
            || {
                last.clear();
                let reads = self.c.sim.with(|s| {
                    s.calls()
                        .iter()
                        .filter(|c| {
                            c.seq >= quiet_since.1
                                && c.action == "DescribeNetworkInterfaces"
                                && c.outcome == "ok"
                        })
                        .count()
                });
                if reads < 2 || quiet_since.0.elapsed() < 2 * RECONCILE_PERIOD {
                    last.push(format!(
                        "{reads} DescribeNetworkInterfaces since the faults stopped"
                    ));
                }
                let view = self.ipamd.view()?;
                let mut held: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
                for (ip, (_, pod)) in view.assignments() {
                    held.entry(ip).or_default().push(pod);
                }
                for (ip, pods) in &held {
                    if pods.len() > 1 {
                        last.push(format!("{ip} held by {pods:?}"));
                    }
                }
                let assigned: BTreeSet<(Ipv4Addr, String)> = held
                    .iter()
                    .flat_map(|(ip, pods)| pods.iter().map(|p| (*ip, p.clone())))
                    .collect();
                if &assigned != live || view.assigned_count != live.len() as i64 {
                    last.push(format!(
                        "datastore assigns {assigned:?} (count {}), pods hold {live:?}",
                        view.assigned_count
                    ));
                }
                let cp = self.ipamd.checkpoint()?;
                let entries: Vec<(Ipv4Addr, String)> = cp
                    .allocations
                    .iter()
                    .map(|a| (a.ipv4, a.container_id.clone()))
                    .collect();
                let cp_set: BTreeSet<(Ipv4Addr, String)> = entries.iter().cloned().collect();
                let want: BTreeSet<(Ipv4Addr, String)> = live
                    .iter()
                    .map(|(ip, name)| (*ip, format!("c-{name}")))
                    .collect();
                if cp_set.len() != entries.len() || cp_set != want {
                    last.push(format!("checkpoint holds {entries:?}, pods hold {want:?}"));
                }
                last.extend(leaks(
                    &SimNodeView::of(&self.c.sim, &self.instance_id),
                    &view,
                ));
                Ok(last.is_empty())
            },
        );
        r.map_err(|e| anyhow::anyhow!("{e}: {last:#?}"))
    }

    fn print_report(&self, first_seq: u64) {
        let st = &self.stats;
        eprintln!(
            "soak: {} operations: {} ADDs ({} through the plugin binary, {} abandoned by the \
             client, {} found no free address), {} DELs ({} repeated), {} operations failed \
             at a crash and {} owed DELs paid after restarts",
            self.op,
            st.adds,
            st.adds_via_plugin,
            st.adds_abandoned,
            st.adds_no_address,
            st.dels,
            st.dels_repeated,
            st.failed_at_crash,
            st.owed_retried
        );
        eprintln!(
            "soak: kills: {} SIGKILL from outside, {} at failpoints ({} during start-up), {} \
             failpoints not reached in time (killed from outside); {} ipamd processes",
            st.kills_external,
            st.kills_failpoint,
            st.kills_at_start,
            st.failpoints_not_reached,
            self.segments.len()
        );
        for f in &st.plugin_add_failures {
            eprintln!("soak: plugin ADD failure: {f}");
        }
        let (mut calls, mut throttled, mut server, mut dropped, mut by_action) = (
            0usize,
            0usize,
            0usize,
            0usize,
            BTreeMap::<String, usize>::new(),
        );
        self.c.sim.with(|s| {
            for r in s.calls().iter().filter(|r| r.seq >= first_seq) {
                calls += 1;
                *by_action.entry(r.action.clone()).or_default() += 1;
                if r.outcome == "RequestLimitExceeded" {
                    throttled += 1;
                } else if r.http_status >= 500 {
                    server += 1;
                } else if r.http_status == 0 {
                    dropped += 1;
                }
            }
        });
        eprintln!(
            "soak: EC2: {calls} calls from ipamd, {throttled} throttled, {server} 5xx, \
             {dropped} answers lost; by action {by_action:?}"
        );
        eprintln!("soak: ipamd memory and descriptors, per process (op: VmRSS KiB / fds):");
        for (i, seg) in self.segments.iter().enumerate() {
            let series: Vec<String> = seg
                .samples
                .iter()
                .map(|(op, s)| format!("{op}:{}/{}", s.rss_kib, s.fds))
                .collect();
            eprintln!(
                "soak:  #{i} pid {} from op {} armed {:?}, ended by {}: {}",
                seg.pid,
                seg.first_op,
                seg.armed,
                seg.ended_by,
                series.join(" ")
            );
        }
    }

    /// Every address ipamd's orphan sweep released (its log, over every process) was held
    /// by a pod whose ADD was abandoned or failed: never by a live pod. Prints how many.
    fn orphan_checks(&self) -> anyhow::Result<()> {
        let log = self.ipamd.log();
        let mut released = Vec::new();
        for line in log.lines().filter(|l| l.contains(ORPHAN_RELEASED)) {
            let pod = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("pod=default/"))
                .with_context(|| format!("orphan release without a pod name: {line}"))?;
            ensure!(
                self.may_be_orphaned.contains(pod),
                "the orphan sweep released the address of {pod}, whose ADD was acknowledged: \
                 {line}"
            );
            released.push(pod.to_owned());
        }
        eprintln!(
            "soak: orphan sweep: {} addresses released ({} ADDs abandoned or failed): {released:?}",
            released.len(),
            self.may_be_orphaned.len()
        );
        Ok(())
    }

    /// Descriptors flat in every segment with at least 5 samples; RSS flat over the longest
    /// one.
    fn memory_checks(&self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.samples.len() < 5 {
                continue;
            }
            let warm = (seg.samples.len() / 5).max(1);
            let warm_max = seg.samples[..warm]
                .iter()
                .map(|(_, s)| s.fds)
                .max()
                .unwrap_or(0);
            if let Some((op, s)) = seg.samples[warm..]
                .iter()
                .find(|(_, s)| s.fds > warm_max + FD_SLACK)
            {
                failures.push(format!(
                    "process #{i} (pid {}): {} descriptors at op {op}, warm-up highest \
                     {warm_max} (+{FD_SLACK} allowed)",
                    seg.pid, s.fds
                ));
            }
        }
        let long = self
            .segments
            .iter()
            .max_by_key(|s| s.samples.len())
            .context("no ipamd process sampled")?;
        ensure!(
            long.samples.len() >= 10,
            "the longest segment has only {} samples",
            long.samples.len()
        );
        let warm = long.samples.len() / 5;
        let (op0, s0) = long.samples[warm];
        let (op1, s1) = long.samples[long.samples.len() - 1];
        let growth = s1.rss_kib.saturating_sub(s0.rss_kib);
        eprintln!(
            "soak: long segment (pid {}, {} samples): VmRSS {} KiB at op {op0}, {} KiB at op \
             {op1} (+{growth} KiB over {} operations); descriptors {} then {}",
            long.pid,
            long.samples.len(),
            s0.rss_kib,
            s1.rss_kib,
            op1 - op0,
            s0.fds,
            s1.fds
        );
        if growth >= RSS_SLACK_KIB {
            failures.push(format!(
                "ipamd's VmRSS grew by {growth} KiB between op {op0} and op {op1} of one \
                 process (bound {RSS_SLACK_KIB} KiB)"
            ));
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
