//! ADD and DEL latency of our plugin against the reference `ptp` + `host-local` plugins,
//! interleaved in the same run, on a node that already has 0, 110 and 250 pods; binary size
//! and peak RSS of one ADD at each level.
//!
//! `cargo build --release -p ipamd && cargo bench -p vpc-cni-plugin --bench latency` (root;
//! not run in CI). Environment: `PODS` (pods measured per round, default 200), `LEVELS` (pods
//! already on the node, comma-separated, default `0,110,250`), `PARALLEL` (widths of the
//! parallel rounds, comma-separated, default `2,8`; empty for none), `BREAKDOWN` (ADDs traced
//! with `AWS_CNI_TIMING=1` for the phase breakdown at each level, ours and the baseline's,
//! default 50),
//! `BASELINE_BIN` (another build of the plugin, e.g. the previous commit's, interleaved too),
//! `FILL=1` (a round ADDs all its pods before DELing them, so the node also fills up with the
//! round's own pods; by default each pod is DELed right after its ADDs),
//! `BENCH_IPAMD=memory` for the in-process ipamd instead of the real one, `IPAMD_BIN` for
//! another ipamd binary. Everything runs in test namespaces: our "host" side and ptp's host
//! side (ptp turns `net.ipv4.ip_forward` on, in the test namespace only), all deleted at the
//! end.
//!
//! The pods already on the node ("bystanders") are real pods: each its own namespace, wired
//! into the host test namespace in-process by `vpc-cni-net` exactly as an ADD wires one (veth
//! pair, /32, routes, neighbour, host route, rules 512 and 1536), so the host's links, routes
//! and rules grow as on a node. Levels are cumulative; the measured pods come and go on top.
//! `/proc/loadavg` is printed at the start and end of every level.
//!
//! Our plugin talks to the real ipamd (`target/release/ipamd --backend sim`, the embedded VPC
//! simulator, an m5.24xlarge node with the pool pre-filled) running in the host namespace, its
//! socket and checkpoint on tmpfs (`/dev/shm`) as `/var/run/aws-node` is on a node. The binary
//! measured is a stripped copy of the bench build, i.e. what `--release` ships.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ipamd::RealIpamd;
use common::{cni_env, conf, TestIpamd, BIN};
use serde_json::{json, Value};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;

const PTP: &str = "/usr/lib/cni/ptp";

/// Runs `bin` inside `ns` and returns (wall time of spawn..exit, stdout).
fn timed(ns: &Netns, bin: &str, env: &[(&str, String)], stdin: &Value) -> (Duration, String) {
    let (took, stdout, _) = timed_full(ns, bin, env, stdin, false);
    (took, stdout)
}

/// [`timed`], also returning stderr when `stderr` is set.
fn timed_full(
    ns: &Netns,
    bin: &str,
    env: &[(&str, String)],
    stdin: &Value,
    stderr: bool,
) -> (Duration, String, String) {
    let input = stdin.to_string();
    ns.run(|| {
        let start = Instant::now();
        let mut child = Command::new(bin)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn");
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes());
        let out = child.wait_with_output().expect("wait");
        let took = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{bin} failed: {stdout} {err}");
        (took, stdout, err)
    })
    .expect("enter netns")
}

#[derive(Default)]
struct Samples {
    ours_add: Vec<Duration>,
    ours_del: Vec<Duration>,
    ptp_add: Vec<Duration>,
    ptp_del: Vec<Duration>,
    base_add: Vec<Duration>,
    base_del: Vec<Duration>,
}

impl Samples {
    fn extend(&mut self, o: Samples) {
        self.ours_add.extend(o.ours_add);
        self.ours_del.extend(o.ours_del);
        self.ptp_add.extend(o.ptp_add);
        self.ptp_del.extend(o.ptp_del);
        self.base_add.extend(o.base_add);
        self.base_del.extend(o.base_del);
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn report(title: &str, s: &mut Samples) {
    println!("\n{title}");
    println!(
        "{:<10}{:>12}{:>12}{:>12}{:>12}",
        "", "ours p50", "ours p99", "ptp p50", "ptp p99"
    );
    for (op, ours, ptp) in [
        ("ADD", &mut s.ours_add, &mut s.ptp_add),
        ("DEL", &mut s.ours_del, &mut s.ptp_del),
    ] {
        let (o50, o99, p50, p99) = (
            pct(ours, 0.5),
            pct(ours, 0.99),
            pct(ptp, 0.5),
            pct(ptp, 0.99),
        );
        println!(
            "{op:<10}{:>12}{:>12}{:>12}{:>12}   ours/ptp median = {:.2}",
            ms(o50),
            ms(o99),
            ms(p50),
            ms(p99),
            o50.as_secs_f64() / p50.as_secs_f64()
        );
    }
    if !s.base_add.is_empty() {
        for (op, ours, base) in [
            ("ADD", &mut s.ours_add, &mut s.base_add),
            ("DEL", &mut s.ours_del, &mut s.base_del),
        ] {
            let (o50, b50, b99) = (pct(ours, 0.5), pct(base, 0.5), pct(base, 0.99));
            println!(
                "{op:<10}baseline p50 {} p99 {}   ours/baseline median = {:.2}",
                ms(b50),
                ms(b99),
                o50.as_secs_f64() / b50.as_secs_f64()
            );
        }
    }
}

impl Pod {
    fn path(&self) -> String {
        self.ns
            .as_ref()
            .map(|n| n.path().display().to_string())
            .unwrap_or_default()
    }
}

struct Pod {
    /// The pod's namespace (`None` once deleted after its DEL, as a runtime does).
    ns: Option<TestNetns>,
    /// The namespace the baseline build wires (when `BASELINE_BIN` is set).
    base_ns: Option<TestNetns>,
    name: String,
    container: String,
    ours: Option<Value>,
    base: Option<Value>,
}

/// One worker: for each pod, ADD with every contender (ours, ptp, and the baseline build of ours
/// when given), rotating which goes first, and DEL each pod with every contender (right after
/// its ADDs, or after all ADDs with `FILL=1`).
fn worker(
    host: &Netns,
    bin: &str,
    base: Option<&str>,
    ours_conf: &Value,
    ptp_conf: &Value,
    pods: &mut [Pod],
    s: &mut Samples,
) {
    if fill() {
        add_then_del(host, bin, base, ours_conf, ptp_conf, pods, 0, s);
    } else {
        for i in 0..pods.len() {
            add_then_del(host, bin, base, ours_conf, ptp_conf, &mut pods[i..=i], i, s);
            // The runtime deletes the sandbox after DEL; its veths go with it, so the
            // node's link count stays at its level.
            pods[i].ns = None;
            pods[i].base_ns = None;
        }
    }
}

/// `FILL=1`: a round ADDs all its pods before it DELs them (the node fills up by the round's
/// own pods, PODS per contender, on top of the level). Default: each pod is ADDed and DELed
/// by every contender and its namespaces deleted before the next, so the node stays at its
/// level.
fn fill() -> bool {
    std::env::var("FILL").as_deref() == Ok("1")
}

/// ADD every pod of `pods` with every contender, then DEL them; `offset` rotates who goes
/// first.
#[allow(clippy::too_many_arguments)]
fn add_then_del(
    host: &Netns,
    bin: &str,
    base: Option<&str>,
    ours_conf: &Value,
    ptp_conf: &Value,
    pods: &mut [Pod],
    offset: usize,
    s: &mut Samples,
) {
    let contenders: Vec<u8> = if base.is_some() {
        vec![0, 1, 2]
    } else {
        vec![0, 1]
    };
    let ptp_env = |cmd: &str, p: &Pod, path: &str| {
        let mut e = cni_env(cmd, &format!("ptp{}", p.container), path, &p.name);
        e.iter_mut().for_each(|(k, v)| {
            if *k == "CNI_IFNAME" {
                *v = "ptp0".into();
            }
        });
        e
    };
    for (i, p) in pods.iter_mut().enumerate() {
        let path = p.path();
        let mut order = contenders.clone();
        order.rotate_left((i + offset) % contenders.len());
        for k in order {
            match k {
                0 => {
                    let env = cni_env("ADD", &p.container, &path, &p.name);
                    let (t, out) = timed(host, bin, &env, ours_conf);
                    s.ours_add.push(t);
                    p.ours = Some(serde_json::from_str(&out).expect("result"));
                }
                1 => s
                    .ptp_add
                    .push(timed(host, PTP, &ptp_env("ADD", p, &path), ptp_conf).0),
                _ => {
                    let (Some(b), Some(ns)) = (base, p.base_ns.as_ref()) else {
                        continue;
                    };
                    let bpath = ns.path().display().to_string();
                    let env = cni_env(
                        "ADD",
                        &format!("b{}", p.container),
                        &bpath,
                        &format!("b{}", p.name),
                    );
                    let (t, out) = timed(host, b, &env, ours_conf);
                    s.base_add.push(t);
                    p.base = Some(serde_json::from_str(&out).expect("result"));
                }
            }
        }
    }
    for (i, p) in pods.iter().enumerate() {
        let path = p.path();
        let mut order = contenders.clone();
        order.rotate_left((i + offset) % contenders.len());
        for k in order {
            match k {
                0 => {
                    let mut c = ours_conf.clone();
                    c["prevResult"] = p.ours.clone().expect("added");
                    let env = cni_env("DEL", &p.container, &path, &p.name);
                    s.ours_del.push(timed(host, bin, &env, &c).0);
                }
                1 => s
                    .ptp_del
                    .push(timed(host, PTP, &ptp_env("DEL", p, &path), ptp_conf).0),
                _ => {
                    let (Some(b), Some(ns)) = (base, p.base_ns.as_ref()) else {
                        continue;
                    };
                    let mut c = ours_conf.clone();
                    c["prevResult"] = p.base.clone().expect("added");
                    let bpath = ns.path().display().to_string();
                    let env = cni_env(
                        "DEL",
                        &format!("b{}", p.container),
                        &bpath,
                        &format!("b{}", p.name),
                    );
                    s.base_del.push(timed(host, b, &env, &c).0);
                }
            }
        }
    }
}

fn make_pods(n: usize, round: &str, base: bool) -> Vec<Pod> {
    (0..n)
        .map(|i| Pod {
            ns: Some(TestNetns::new("bpod").expect("pod ns")),
            base_ns: base.then(|| TestNetns::new("bpod").expect("pod ns")),
            name: format!("bench-{round}-{i}"),
            container: format!("{round}c{i}"),
            ours: None,
            base: None,
        })
        .collect()
}

fn peak_rss_kib(host: &Netns, bin: &str, env: &[(&str, String)], stdin: &Value) -> Option<u64> {
    if !Path::new("/usr/bin/time").exists() {
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let out = dir.path().join("rss");
    let input = stdin.to_string();
    host.run(|| {
        let mut child = Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&out)
            .arg(bin)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let _ = child.stdin.take()?.write_all(input.as_bytes());
        child.wait().ok()
    })
    .ok()??;
    std::fs::read_to_string(&out).ok()?.trim().parse().ok()
}

/// A stripped copy of the bench build of the plugin (the bench profile keeps symbols; release
/// strips them), in `dir`. Falls back to the unstripped binary when `strip` is missing.
fn shipped_binary(dir: &Path) -> String {
    let copy = dir.join("aws-cni");
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(BIN)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        copy.display().to_string()
    } else {
        eprintln!("strip failed or missing: measuring the unstripped {BIN}");
        BIN.to_string()
    }
}

/// ADD then DEL of `n` pods with `AWS_CNI_TIMING=1`; prints each phase's median and p99 (ms),
/// and the process overhead (wall time minus the plugin's own total).
fn breakdown(host: &Netns, who: &str, bin: &str, conf: &Value, n: usize, round: &str) {
    use std::collections::BTreeMap;
    let mut phases: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    let mut del_phases: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    let mut overhead = (Vec::new(), Vec::new());
    let record = |line: &str,
                  wall: Duration,
                  into: &mut BTreeMap<String, (usize, Vec<f64>)>,
                  ov: &mut Vec<f64>| {
        let Some(rest) = line.lines().find_map(|l| l.strip_prefix("timing: ")) else {
            panic!("no timing line in stderr: {line}");
        };
        for (order, kv) in rest.split(' ').enumerate() {
            if let Some((k, v)) = kv.split_once('=') {
                let v: f64 = v.parse().expect("ms");
                if k == "total" {
                    ov.push(wall.as_secs_f64() * 1e3 - v);
                }
                into.entry(k.to_string())
                    .or_insert((order, Vec::new()))
                    .1
                    .push(v);
            }
        }
    };
    let pods = make_pods(n, round, false);
    let mut results = Vec::new();
    for p in &pods {
        let path = p.path();
        let mut env = cni_env("ADD", &p.container, &path, &p.name);
        env.push(("AWS_CNI_TIMING", "1".into()));
        let (wall, out, err) = timed_full(host, bin, &env, conf, true);
        record(&err, wall, &mut phases, &mut overhead.0);
        results.push(serde_json::from_str::<Value>(&out).expect("result"));
    }
    for (p, r) in pods.iter().zip(&results) {
        let path = p.path();
        let mut env = cni_env("DEL", &p.container, &path, &p.name);
        env.push(("AWS_CNI_TIMING", "1".into()));
        let mut c = conf.clone();
        c["prevResult"] = r.clone();
        let (wall, _, err) = timed_full(host, bin, &env, &c, true);
        record(&err, wall, &mut del_phases, &mut overhead.1);
    }
    for (title, map, ov) in [("ADD", phases, overhead.0), ("DEL", del_phases, overhead.1)] {
        println!("\n{who}: {title} breakdown ({n} runs with AWS_CNI_TIMING=1; ms, median / p99)");
        let mut rows: Vec<(usize, String, Vec<f64>)> =
            map.into_iter().map(|(k, (o, v))| (o, k, v)).collect();
        rows.sort_by_key(|r| r.0);
        rows.push((usize::MAX, "exec+exit (wall - total)".into(), ov));
        for (_, k, mut v) in rows {
            v.sort_by(f64::total_cmp);
            let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
            println!("  {k:<28}{:>8.3}{:>8.3}", q(0.5), q(0.99));
        }
    }
}

enum Ipamd {
    Real(RealIpamd),
    Memory(TestIpamd),
}

impl Ipamd {
    fn socket(&self) -> &Path {
        match self {
            Ipamd::Real(r) => &r.socket,
            Ipamd::Memory(m) => &m.socket,
        }
    }
}

fn main() {
    if skip_netns_test("latency bench") {
        return;
    }
    if !Path::new(PTP).exists() {
        eprintln!("skipping: {PTP} missing (apt-get install containernetworking-plugins)");
        return;
    }
    let env_n = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env_n("PODS", 200);
    let traced = env_n("BREAKDOWN", 50);
    println!(
        "loadavg before: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let host = TestNetns::new("bhost").expect("host ns");
    assert!(
        common::sh_in(host.name(), &["ip", "link", "set", "lo", "up"])
            .status
            .success()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let bin = shipped_binary(data.path());
    // Another build of ours (e.g. the previous commit's), measured in the same interleaved run.
    let base = std::env::var("BASELINE_BIN").ok();
    if let Some(b) = &base {
        println!("baseline: {b}");
    }
    let ipamd = if std::env::var("BENCH_IPAMD").as_deref() == Ok("memory") {
        println!("ipamd: in-process (MemoryIpam over gRPC)");
        Ipamd::Memory(TestIpamd::with_pool(
            Ipv4Addr::new(10, 1, 0, 10),
            (2 * n.max(traced) + 16) as u32,
            1,
            2,
        ))
    } else {
        let shm = Path::new("/dev/shm");
        let spare = 2 * n.max(traced) + 16;
        let r = RealIpamd::start(
            &host,
            &[
                ("VPC_CNI_SIM_INSTANCE_TYPE", "m5.24xlarge".into()),
                ("MINIMUM_IP_TARGET", spare.to_string()),
                ("WARM_IP_TARGET", "1".into()),
                ("VPC_CNI_POOL_TICK", "5s".into()),
                ("AWS_VPC_K8S_CNI_LOGLEVEL", "info".into()),
            ],
            shm.is_dir().then_some(shm),
        );
        r.wait_for_free(spare as i64);
        println!(
            "ipamd: real ({}), {} addresses",
            common::ipamd::workspace_bin("ipamd", "IPAMD_BIN").display(),
            r.enis().total
        );
        Ipamd::Real(r)
    };
    let mut ours_conf = conf("1.0.0", ipamd.socket());
    ours_conf["pluginLogFile"] = json!(data.path().join("plugin.log"));
    ours_conf["pluginLogLevel"] = json!("info");
    let ptp_conf = json!({
        "cniVersion": "1.0.0",
        "name": "ptpnet",
        "type": "ptp",
        "ipMasq": false,
        "mtu": 9001,
        "ipam": {
            "type": "host-local",
            "subnet": "10.200.0.0/16",
            "dataDir": data.path().join("host-local"),
        }
    });
    // Warm-up (page cache, first exec).
    {
        let mut pods = make_pods(4, "w", base.is_some());
        worker(
            &host,
            &bin,
            base.as_deref(),
            &ours_conf,
            &ptp_conf,
            &mut pods,
            &mut Samples::default(),
        );
    }
    let levels = env_list("LEVELS", &[0, 110, 250]);
    let widths = env_list("PARALLEL", &[2, 8]);
    let mut bystanders: Vec<TestNetns> = Vec::new();
    let mut summary = Vec::new();
    for (li, &level) in levels.iter().enumerate() {
        add_bystanders(&host, &mut bystanders, level);
        let load0 = loadavg();
        println!(
            "\n=== {level} pods already on the node ({} links in the host namespace); loadavg {load0} ===",
            host_link_count(&host)
        );
        let mut seq = Samples::default();
        {
            let mut pods = make_pods(n, &format!("s{li}"), base.is_some());
            worker(
                &host,
                &bin,
                base.as_deref(),
                &ours_conf,
                &ptp_conf,
                &mut pods,
                &mut seq,
            );
        }
        report(
            &format!("{level} existing pods: sequential, {n} pods, interleaved"),
            &mut seq,
        );
        summary.push((level, "seq".to_string(), row(&mut seq)));
        for &k in &widths {
            let mut par = Samples::default();
            {
                let mut pods = make_pods(n, &format!("p{li}w{k}"), base.is_some());
                let chunk = n.div_ceil(k.max(1)).max(1);
                let parts = std::thread::scope(|sc| {
                    let h = &host;
                    let (oc, pc, bin, base) =
                        (&ours_conf, &ptp_conf, bin.as_str(), base.as_deref());
                    let handles: Vec<_> = pods
                        .chunks_mut(chunk)
                        .map(|part| {
                            sc.spawn(move || {
                                let mut s = Samples::default();
                                worker(h, bin, base, oc, pc, part, &mut s);
                                s
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|t| t.join().expect("parallel worker"))
                        .collect::<Vec<_>>()
                });
                for s in parts {
                    par.extend(s);
                }
            }
            report(
                &format!("{level} existing pods: {k}-way parallel, {n} pods, interleaved"),
                &mut par,
            );
            summary.push((level, format!("{k}-par"), row(&mut par)));
        }
        if traced > 0 {
            breakdown(&host, "ours", &bin, &ours_conf, traced, &format!("b{li}"));
            if let Some(b) = base.as_deref() {
                // The baseline build's phases, for before/after (its timing line has the same
                // format when it has the same timing module).
                breakdown(&host, "baseline", b, &ours_conf, traced, &format!("bb{li}"));
            }
        }
        // Peak memory of one ADD at this level.
        let pod = TestNetns::new("bpod").expect("pod");
        let path = pod.path().display().to_string();
        let ours_rss = peak_rss_kib(
            &host,
            &bin,
            &cni_env("ADD", &format!("rss{li}a"), &path, &format!("rss{li}")),
            &ours_conf,
        );
        let base_rss = base.as_deref().and_then(|b| {
            let bpod = TestNetns::new("bpod").ok()?;
            let bpath = bpod.path().display().to_string();
            peak_rss_kib(
                &host,
                b,
                &cni_env("ADD", &format!("rss{li}b"), &bpath, &format!("rss{li}b")),
                &ours_conf,
            )
        });
        let mut ptp_env = cni_env("ADD", &format!("rss{li}p"), &path, "rss");
        ptp_env[3].1 = "ptp0".into();
        let ptp_rss = peak_rss_kib(&host, PTP, &ptp_env, &ptp_conf);
        println!(
            "peak RSS (VmHWM) of one ADD at {level} existing pods: ours {ours_rss:?} KiB, \
             baseline {base_rss:?} KiB, ptp (+host-local child not counted) {ptp_rss:?} KiB"
        );
        println!("loadavg at the end of the level: {}", loadavg());
    }
    println!("\nsummary (ms: p50/p99; ours/ptp and ours/baseline medians)");
    println!(
        "{:>8} {:>7} {:>15} {:>15} {:>15} {:>15} {:>6} {:>6}{}",
        "existing",
        "round",
        "ours ADD",
        "ptp ADD",
        "ours DEL",
        "ptp DEL",
        "ADD x",
        "DEL x",
        if base.is_some() {
            "   baseline ADD     baseline DEL  ADD x  DEL x"
        } else {
            ""
        }
    );
    for (level, round, r) in &summary {
        let f = |(a, b): (Duration, Duration)| {
            format!("{:.2}/{:.2}", a.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3)
        };
        let x = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        print!(
            "{level:>8} {round:>7} {:>15} {:>15} {:>15} {:>15} {:>6.2} {:>6.2}",
            f(r.ours_add),
            f(r.ptp_add),
            f(r.ours_del),
            f(r.ptp_del),
            x(r.ours_add.0, r.ptp_add.0),
            x(r.ours_del.0, r.ptp_del.0),
        );
        if let (Some(ba), Some(bd)) = (r.base_add, r.base_del) {
            print!(
                " {:>15} {:>15} {:>6.2} {:>6.2}",
                f(ba),
                f(bd),
                x(r.ours_add.0, ba.0),
                x(r.ours_del.0, bd.0)
            );
        }
        println!();
    }
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let ptp_size = std::fs::metadata(PTP).map(|m| m.len()).unwrap_or(0);
    println!(
        "\nbinary size: ours {:.2} MiB ({bin}, stripped copy of {BIN}), ptp {:.2} MiB",
        size as f64 / 1048576.0,
        ptp_size as f64 / 1048576.0
    );
    if let Ipamd::Real(r) = &ipamd {
        let e = r.enis();
        println!(
            "ipamd after the run: {} assigned of {}",
            e.assigned, e.total
        );
    }
    drop(bystanders);
    println!("loadavg after: {}", loadavg());
}

/// p50 and p99 of each contender's ADD and DEL in one round.
struct Row {
    ours_add: (Duration, Duration),
    ours_del: (Duration, Duration),
    ptp_add: (Duration, Duration),
    ptp_del: (Duration, Duration),
    base_add: Option<(Duration, Duration)>,
    base_del: Option<(Duration, Duration)>,
}

fn row(s: &mut Samples) -> Row {
    let q = |v: &mut Vec<Duration>| (pct(v, 0.5), pct(v, 0.99));
    let qo = |v: &mut Vec<Duration>| (!v.is_empty()).then(|| (pct(v, 0.5), pct(v, 0.99)));
    Row {
        ours_add: q(&mut s.ours_add),
        ours_del: q(&mut s.ours_del),
        ptp_add: q(&mut s.ptp_add),
        ptp_del: q(&mut s.ptp_del),
        base_add: qo(&mut s.base_add),
        base_del: qo(&mut s.base_del),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A comma-separated list of numbers from the environment (`default` when unset; empty when
/// set to the empty string).
fn env_list(key: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(key) {
        Ok(v) => v
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse().expect("a comma-separated list of numbers"))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn host_link_count(host: &Netns) -> usize {
    common::rt().block_on(async {
        vpc_cni_net::Netlink::open(host)
            .expect("netlink")
            .links()
            .await
            .expect("links")
            .len()
    })
}

/// Wires pods into `host` in-process, as an ADD does, until `bystanders` holds `level` of
/// them (addresses 10.128.0.0/16, ENI table 2, so each has rules 512 and 1536).
fn add_bystanders(host: &TestNetns, bystanders: &mut Vec<TestNetns>, level: usize) {
    use vpc_cni_net::{NetlinkPodNetwork, PodNetwork, PodSpec};
    if bystanders.len() >= level {
        return;
    }
    common::rt().block_on(async {
        let net = NetlinkPodNetwork::new(host.try_clone().expect("dup")).expect("netlink");
        while bystanders.len() < level {
            let i = bystanders.len();
            let ns = TestNetns::new("bby").expect("bystander ns");
            let spec = PodSpec {
                netns: ns.path().to_path_buf(),
                host_veth: vpc_cni_net::names::host_veth_name(
                    "eni",
                    "bystanders",
                    &format!("pod-{i}"),
                    0,
                ),
                container_ifname: "eth0".into(),
                index: 0,
                ipv4: Ipv4Addr::new(10, 128, (i / 250) as u8, (i % 250) as u8 + 1),
                mtu: 9001,
                route_table: 2,
            };
            net.setup_pod(&spec).await.expect("wire a bystander pod");
            bystanders.push(ns);
        }
    });
}
