//! ADD and DEL latency of our plugin against the reference `ptp` + `host-local` plugins,
//! interleaved in the same run; binary size and peak RSS of one ADD.
//!
//! `cargo bench -p vpc-cni-plugin --bench latency` (root; not run in CI). Environment:
//! `PODS` (default 200). Everything runs in test namespaces: our "host" side and ptp's host
//! side (ptp turns `net.ipv4.ip_forward` on, in the test namespace only).
//!
//! Our plugin talks to an in-process ipamd (the `MemoryIpam` behind a real gRPC server on a
//! unix socket), not to the real ipamd daemon, which is not ready yet.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cni_env, conf, TestIpamd, BIN};
use serde_json::{json, Value};
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;

const PTP: &str = "/usr/lib/cni/ptp";

/// Runs `bin` inside `ns` and returns (wall time of spawn..exit, stdout).
fn timed(ns: &Netns, bin: &str, env: &[(&str, String)], stdin: &Value) -> (Duration, String) {
    let input = stdin.to_string();
    ns.run(|| {
        let start = Instant::now();
        let mut child = Command::new(bin)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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
        assert!(out.status.success(), "{bin} failed: {stdout}");
        (took, stdout)
    })
    .expect("enter netns")
}

#[derive(Default)]
struct Samples {
    ours_add: Vec<Duration>,
    ours_del: Vec<Duration>,
    ptp_add: Vec<Duration>,
    ptp_del: Vec<Duration>,
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
}

struct Pod {
    ns: TestNetns,
    name: String,
    container: String,
    ours: Option<Value>,
}

/// One worker: for each pod, ADD with both plugins (alternating which goes first), then DEL
/// each pod with both.
fn worker(host: &Netns, ours_conf: &Value, ptp_conf: &Value, pods: &mut [Pod], s: &mut Samples) {
    for (i, p) in pods.iter_mut().enumerate() {
        let path = p.ns.path().display().to_string();
        let ours_env = cni_env("ADD", &p.container, &path, &p.name);
        let mut ptp_env = cni_env("ADD", &format!("ptp{}", p.container), &path, &p.name);
        ptp_env.iter_mut().for_each(|(k, v)| {
            if *k == "CNI_IFNAME" {
                *v = "ptp0".into();
            }
        });
        let run_ours = |s: &mut Samples| {
            let (t, out) = timed(host, BIN, &ours_env, ours_conf);
            s.ours_add.push(t);
            serde_json::from_str::<Value>(&out).expect("result")
        };
        let run_ptp = |s: &mut Samples| s.ptp_add.push(timed(host, PTP, &ptp_env, ptp_conf).0);
        if i % 2 == 0 {
            p.ours = Some(run_ours(s));
            run_ptp(s);
        } else {
            run_ptp(s);
            p.ours = Some(run_ours(s));
        }
    }
    for (i, p) in pods.iter().enumerate() {
        let path = p.ns.path().display().to_string();
        let mut c = ours_conf.clone();
        c["prevResult"] = p.ours.clone().expect("added");
        let ours_env = cni_env("DEL", &p.container, &path, &p.name);
        let mut ptp_env = cni_env("DEL", &format!("ptp{}", p.container), &path, &p.name);
        ptp_env.iter_mut().for_each(|(k, v)| {
            if *k == "CNI_IFNAME" {
                *v = "ptp0".into();
            }
        });
        let mut ours = || s.ours_del.push(timed(host, BIN, &ours_env, &c).0);
        if i % 2 == 0 {
            ours();
            s.ptp_del.push(timed(host, PTP, &ptp_env, ptp_conf).0);
        } else {
            s.ptp_del.push(timed(host, PTP, &ptp_env, ptp_conf).0);
            ours();
        }
    }
}

fn make_pods(n: usize, round: &str) -> Vec<Pod> {
    (0..n)
        .map(|i| Pod {
            ns: TestNetns::new("bpod").expect("pod ns"),
            name: format!("bench-{round}-{i}"),
            container: format!("{round}c{i}"),
            ours: None,
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

fn main() {
    if skip_netns_test("latency bench") {
        return;
    }
    if !Path::new(PTP).exists() {
        eprintln!("skipping: {PTP} missing (apt-get install containernetworking-plugins)");
        return;
    }
    let n: usize = std::env::var("PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!(
        "loadavg before: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let host = TestNetns::new("bhost").expect("host ns");
    let ipamd = TestIpamd::with_pool(Ipv4Addr::new(10, 1, 0, 10), (n as u32) * 2 + 8, 1, 2);
    let data = tempfile::tempdir().expect("tempdir");
    let mut ours_conf = conf("1.0.0", &ipamd.socket);
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
        let mut pods = make_pods(4, "w");
        worker(
            &host,
            &ours_conf,
            &ptp_conf,
            &mut pods,
            &mut Samples::default(),
        );
    }
    let mut seq = Samples::default();
    {
        let mut pods = make_pods(n, "s");
        worker(&host, &ours_conf, &ptp_conf, &mut pods, &mut seq);
    }
    report(&format!("sequential, {n} pods, interleaved"), &mut seq);
    let mut par = Samples::default();
    {
        let mut pods = make_pods(n, "p");
        let (a, b) = pods.split_at_mut(n / 2);
        let (sa, sb) = std::thread::scope(|sc| {
            let h = &host;
            let (oc, pc) = (&ours_conf, &ptp_conf);
            let ta = sc.spawn(move || {
                let mut s = Samples::default();
                worker(h, oc, pc, a, &mut s);
                s
            });
            let tb = sc.spawn(move || {
                let mut s = Samples::default();
                worker(h, oc, pc, b, &mut s);
                s
            });
            (ta.join().expect("a"), tb.join().expect("b"))
        });
        for s in [sa, sb] {
            par.ours_add.extend(s.ours_add);
            par.ours_del.extend(s.ours_del);
            par.ptp_add.extend(s.ptp_add);
            par.ptp_del.extend(s.ptp_del);
        }
    }
    report(&format!("2-way parallel, {n} pods, interleaved"), &mut par);
    // Size and peak memory of one ADD.
    let size = std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0);
    let ptp_size = std::fs::metadata(PTP).map(|m| m.len()).unwrap_or(0);
    let pod = TestNetns::new("bpod").expect("pod");
    let path = pod.path().display().to_string();
    let ours_rss = peak_rss_kib(
        &host,
        BIN,
        &cni_env("ADD", "rss1", &path, "rss"),
        &ours_conf,
    );
    let mut ptp_env = cni_env("ADD", "rss2", &path, "rss");
    ptp_env[3].1 = "ptp0".into();
    let ptp_rss = peak_rss_kib(&host, PTP, &ptp_env, &ptp_conf);
    println!(
        "\nbinary size: ours {:.2} MiB ({BIN}), ptp {:.2} MiB",
        size as f64 / 1048576.0,
        ptp_size as f64 / 1048576.0
    );
    println!("peak RSS of one ADD: ours {ours_rss:?} KiB, ptp (+host-local child not counted) {ptp_rss:?} KiB");
    println!(
        "loadavg after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
