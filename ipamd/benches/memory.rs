//! Resident memory of the real `ipamd` binary: `VmRSS`, `VmHWM`, `RssAnon`, `RssFile` and
//! `Threads` from `/proc/<pid>/status`, when ready on an empty node, with 250 pods assigned,
//! and after those 250 are released.
//!
//! `cargo bench -p ipamd --bench memory` (not run in CI; no root needed). Environment: `RUNS`
//! (daemon starts per backend, default 3), `PODS` (default 250).
//!
//! Two ways of running the binary built by the same `cargo bench` (bench profile):
//! - `ipamd --backend aws` against the VPC simulator served by this bench process on
//!   loopback (static credentials in the environment): the daemon alone;
//! - `ipamd --backend sim`: the simulator embedded in the daemon's process (what a demo
//!   runs), so its model and HTTP servers are counted too.
//!
//! Node: m5.16xlarge (15 ENIs of 50 addresses, 735 pod addresses), every pool setting at its
//! default (`WARM_ENI_TARGET=1`): the pool grows while the pods arrive. Logs go to a file in
//! the temp dir at the default level (one line per assignment, as in production).

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{add_ok, client, del, env_or, loadavg, proc_status};
use ipamd::io::sim_backend::{SIM_CREDENTIALS, SIM_REGION};

/// The daemon binary of this build.
const BIN: &str = env!("CARGO_BIN_EXE_ipamd");
const INSTANCE_TYPE: &str = "m5.16xlarge";
const FIELDS: [&str; 5] = ["VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"];

/// Kills the daemon when dropped (also when the bench panics).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, backend_env: &[(&str, String)], args: &[&str]) -> Daemon {
    let log = File::create(dir.join("ipamd.log")).expect("log file");
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("IPAMD_GRPC_SOCKET", dir.join("ipamd.sock"))
        .env("AWS_VPC_K8S_CNI_BACKING_STORE", dir.join("ipam.json"))
        .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
        .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
        .envs(backend_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    Daemon(cmd.spawn().expect("spawn ipamd"))
}

fn line(what: &str, pid: u32) -> Vec<(String, u64)> {
    let s = proc_status(pid, &FIELDS);
    let text: Vec<String> = s
        .iter()
        .map(|(k, v)| {
            if k == "Threads" {
                format!("{k} {v:>3}")
            } else {
                format!("{k} {:>6.1} MiB", *v as f64 / 1024.0)
            }
        })
        .collect();
    println!("  {what:<26}{}", text.join("  "));
    s
}

/// One daemon run: ready, `pods` assigned, all released. Returns VmRSS at each step (KiB).
async fn one(backend: &str, run: usize, pods: usize) -> [u64; 3] {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut _sim = None;
    let daemon = if backend == "aws" {
        let node = common::sim(INSTANCE_TYPE, run as u64 + 1).await;
        let env = [
            ("AWS_EC2_ENDPOINT", node.ec2_url()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", node.imds_url()),
            ("AWS_REGION", SIM_REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", SIM_CREDENTIALS.0.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SIM_CREDENTIALS.1.to_owned()),
            // The bench runs in the machine's own namespace: the daemon must not wire it (it
            // would set the primary link's MTU and SNAT rules). With host wiring on, it
            // stopped at start because the simulated ENI's MAC is not on this host.
            ("VPC_CNI_HOST_NETWORKING", "false".to_owned()),
        ];
        _sim = Some(node);
        spawn(dir.path(), &env, &["--backend", "aws"])
    } else {
        let env = [("VPC_CNI_SIM_INSTANCE_TYPE", INSTANCE_TYPE.to_owned())];
        spawn(dir.path(), &env, &["--backend", "sim"])
    };
    let pid = daemon.0.id();
    let started = Instant::now();
    let mut c = client(&dir.path().join("ipamd.sock")).await;
    println!(
        "{backend} run {run}: serving after {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let ready = line("ready, 0 pods", pid);
    let t = Instant::now();
    for i in 0..pods {
        add_ok(&mut c, &format!("mem-{i}"), Duration::from_secs(120)).await;
    }
    let took = t.elapsed();
    let full = line(&format!("{pods} pods assigned"), pid);
    for i in 0..pods {
        let r = c
            .del_network(del(&format!("mem-{i}")))
            .await
            .expect("DelNetwork");
        assert!(r.get_ref().success, "DelNetwork mem-{i}");
    }
    let empty = line(&format!("{pods} pods released"), pid);
    println!(
        "  ({pods} AddNetwork while the pool grew: {:.1} s)",
        took.as_secs_f64()
    );
    drop(daemon);
    if let Some(node) = _sim {
        node.running.shutdown();
    }
    [ready[0].1, full[0].1, empty[0].1]
}

fn main() {
    let runs = env_or("RUNS", 3);
    let pods = env_or("PODS", 250);
    println!("loadavg before: {}", loadavg());
    let size = std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0);
    println!(
        "binary {BIN}: {:.1} MiB; node {INSTANCE_TYPE}",
        size as f64 / 1048576.0
    );
    let rt = common::runtime();
    for backend in ["aws", "sim"] {
        let mut steps: [Vec<u64>; 3] = Default::default();
        for run in 0..runs {
            let r = rt.block_on(one(backend, run, pods));
            for (v, s) in steps.iter_mut().zip(r) {
                v.push(s);
            }
        }
        let med = |v: &mut Vec<u64>| {
            v.sort();
            v.get(v.len() / 2).copied().unwrap_or(0) as f64 / 1024.0
        };
        let [a, b, c] = &mut steps;
        let (a, b, c) = (med(a), med(b), med(c));
        println!(
            "--backend {backend}: VmRSS median of {runs}: ready {a:.1} MiB, {pods} pods {b:.1} MiB \
             ({:+.1} KiB/pod), released {c:.1} MiB\n",
            (b - a) * 1024.0 / pods.max(1) as f64
        );
    }
    println!("loadavg after: {}", loadavg());
}
