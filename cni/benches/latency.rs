//! ADD and DEL latency of our plugin against the reference `ptp` + `host-local` plugins,
//! interleaved in the same run; binary size and peak RSS of one ADD.
//!
//! `cargo build --release -p ipamd && cargo bench -p vpc-cni-plugin --bench latency` (root;
//! not run in CI). Environment: `PODS` (default 200), `BREAKDOWN` (ADDs traced with
//! `AWS_CNI_TIMING=1` for the phase breakdown, default 50), `BASELINE_BIN` (another build of
//! the plugin, e.g. the previous commit's, interleaved too), `BENCH_IPAMD=memory` for the
//! in-process ipamd instead of the real one, `IPAMD_BIN` for another ipamd binary. Everything
//! runs in test namespaces: our "host" side and ptp's host side (ptp turns
//! `net.ipv4.ip_forward` on, in the test namespace only).
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

struct Pod {
    ns: TestNetns,
    /// The namespace the baseline build wires (when `BASELINE_BIN` is set).
    base_ns: Option<TestNetns>,
    name: String,
    container: String,
    ours: Option<Value>,
    base: Option<Value>,
}

/// One worker: for each pod, ADD with every contender (ours, ptp, and the baseline build of ours
/// when given), rotating which goes first, then DEL each pod with every contender.
fn worker(
    host: &Netns,
    bin: &str,
    base: Option<&str>,
    ours_conf: &Value,
    ptp_conf: &Value,
    pods: &mut [Pod],
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
        let path = p.ns.path().display().to_string();
        let mut order = contenders.clone();
        order.rotate_left(i % contenders.len());
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
        let path = p.ns.path().display().to_string();
        let mut order = contenders.clone();
        order.rotate_left(i % contenders.len());
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
            ns: TestNetns::new("bpod").expect("pod ns"),
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
fn breakdown(host: &Netns, bin: &str, conf: &Value, n: usize) {
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
    let pods = make_pods(n, "t", false);
    let mut results = Vec::new();
    for p in &pods {
        let path = p.ns.path().display().to_string();
        let mut env = cni_env("ADD", &p.container, &path, &p.name);
        env.push(("AWS_CNI_TIMING", "1".into()));
        let (wall, out, err) = timed_full(host, bin, &env, conf, true);
        record(&err, wall, &mut phases, &mut overhead.0);
        results.push(serde_json::from_str::<Value>(&out).expect("result"));
    }
    for (p, r) in pods.iter().zip(&results) {
        let path = p.ns.path().display().to_string();
        let mut env = cni_env("DEL", &p.container, &path, &p.name);
        env.push(("AWS_CNI_TIMING", "1".into()));
        let mut c = conf.clone();
        c["prevResult"] = r.clone();
        let (wall, _, err) = timed_full(host, bin, &env, &c, true);
        record(&err, wall, &mut del_phases, &mut overhead.1);
    }
    for (title, map, ov) in [("ADD", phases, overhead.0), ("DEL", del_phases, overhead.1)] {
        println!("\n{title} breakdown ({n} runs with AWS_CNI_TIMING=1; ms, median / p99)");
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
            (n as u32) * 2 + 8,
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
    let mut seq = Samples::default();
    {
        let mut pods = make_pods(n, "s", base.is_some());
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
    report(&format!("sequential, {n} pods, interleaved"), &mut seq);
    let mut par = Samples::default();
    {
        let mut pods = make_pods(n, "p", base.is_some());
        let (a, b) = pods.split_at_mut(n / 2);
        let (sa, sb) = std::thread::scope(|sc| {
            let h = &host;
            let (oc, pc, bin, base) = (&ours_conf, &ptp_conf, bin.as_str(), base.as_deref());
            let ta = sc.spawn(move || {
                let mut s = Samples::default();
                worker(h, bin, base, oc, pc, a, &mut s);
                s
            });
            let tb = sc.spawn(move || {
                let mut s = Samples::default();
                worker(h, bin, base, oc, pc, b, &mut s);
                s
            });
            (ta.join().expect("a"), tb.join().expect("b"))
        });
        for s in [sa, sb] {
            par.ours_add.extend(s.ours_add);
            par.ours_del.extend(s.ours_del);
            par.ptp_add.extend(s.ptp_add);
            par.ptp_del.extend(s.ptp_del);
            par.base_add.extend(s.base_add);
            par.base_del.extend(s.base_del);
        }
    }
    report(&format!("2-way parallel, {n} pods, interleaved"), &mut par);
    if traced > 0 {
        breakdown(&host, &bin, &ours_conf, traced);
    }
    // Size and peak memory of one ADD.
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let ptp_size = std::fs::metadata(PTP).map(|m| m.len()).unwrap_or(0);
    let pod = TestNetns::new("bpod").expect("pod");
    let path = pod.path().display().to_string();
    let ours_rss = peak_rss_kib(
        &host,
        &bin,
        &cni_env("ADD", "rss1", &path, "rss"),
        &ours_conf,
    );
    let mut ptp_env = cni_env("ADD", "rss2", &path, "rss");
    ptp_env[3].1 = "ptp0".into();
    let ptp_rss = peak_rss_kib(&host, PTP, &ptp_env, &ptp_conf);
    println!(
        "\nbinary size: ours {:.2} MiB ({bin}, stripped copy of {BIN}), ptp {:.2} MiB",
        size as f64 / 1048576.0,
        ptp_size as f64 / 1048576.0
    );
    println!("peak RSS (VmHWM) of one ADD: ours {ours_rss:?} KiB, ptp (+host-local child not counted) {ptp_rss:?} KiB");
    if let Ipamd::Real(r) = &ipamd {
        let e = r.enis();
        println!(
            "ipamd after the run: {} assigned of {}",
            e.assigned, e.total
        );
    }
    println!(
        "loadavg after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
