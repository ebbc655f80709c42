//! AddNetwork + DelNetwork over the daemon's unix socket, each acknowledged only after the
//! checkpoint is durable (temp file, fsync, rename, fsync of the directory): operations per
//! second, p50 and p99, with 1, 2, 8 and 32 concurrent clients, on an empty node and with 250
//! other pods held (the checkpoint is rewritten whole on every write; requests that arrive
//! while a write is in flight share the next one: group commit). `calls/write` is how many
//! AddNetwork/DelNetwork acknowledgements each checkpoint write carried.
//!
//! `cargo bench -p ipamd --bench rpc` (not run in CI; no root needed). Environment: `OPS`
//! (AddNetwork+DelNetwork pairs per client count, default 1000), `BENCH_DIR` (where the socket
//! and checkpoint live, default a temp dir under the target directory: put it on the disk
//! whose fsync you want to measure; a tmpfs makes fsync free).
//!
//! The daemon runs in-process (`daemon::start`, the same start-up as the binary) against the
//! VPC simulator served on loopback without added latency, through the real SDK EC2 and IMDS
//! clients. Node: m5.16xlarge with `MINIMUM_IP_TARGET=300` and `IP_COOLDOWN_PERIOD=0`, so the
//! pool never runs low during the measurement and no EC2 call overlaps it. Each client keeps
//! one connection (the plugin connects once per invocation; connection set-up is not
//! measured here, see `cni/benches/latency.rs` for the whole plugin).
//!
//! Breakdown printed after the main table:
//! - a repeated AddNetwork of a held sandbox (idempotent: same path, no checkpoint write),
//!   i.e. the gRPC round trip plus datastore work without the fsync;
//! - `PoolState::assign`+`unassign` called directly (no gRPC);
//! - `FileStore::write` alone with 0 and 250 allocations.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{add, add_ok, client, del, env_or, loadavg, ms, pct};
use ipamd::store::checkpoint::{
    Allocation, CheckpointFile, CheckpointStore, FileStore, IpamMetadata,
};
use ipamd::store::commit::PoolState;
use ipamd::store::datastore::IpamKey;

/// Samples of one client count.
#[derive(Default)]
struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    pair: Vec<Duration>,
    wall: Duration,
    writes: u64,
}

/// `clients` clients, each doing `ops` AddNetwork+DelNetwork pairs of fresh sandboxes.
async fn run(
    st: &PoolState,
    sock: &std::path::Path,
    clients: usize,
    ops: usize,
    tag: &str,
) -> Samples {
    let before = st.commit_stats().writes;
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(client(sock).await);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, mut c) in conns.into_iter().enumerate() {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut s = Samples::default();
            for i in 0..ops {
                let id = format!("{tag}-{k}-{i}");
                let t0 = Instant::now();
                let r = c.add_network(add(&id)).await.expect("AddNetwork");
                let t1 = Instant::now();
                assert!(r.get_ref().success, "AddNetwork {id}: {:?}", r.get_ref());
                let r = c.del_network(del(&id)).await.expect("DelNetwork");
                let t2 = Instant::now();
                assert!(r.get_ref().success, "DelNetwork {id}");
                s.add.push(t1 - t0);
                s.del.push(t2 - t1);
                s.pair.push(t2 - t0);
            }
            s
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        let s = t.await.expect("client task");
        all.add.extend(s.add);
        all.del.extend(s.del);
        all.pair.extend(s.pair);
    }
    all.wall = start.elapsed();
    all.writes = st.commit_stats().writes - before;
    all
}

/// One table row per client count (1, 2, 8, 32), `ops` pairs in all per row.
async fn sweep(st: &PoolState, sock: &std::path::Path, ops: usize, title: &str, tag: &str) {
    for clients in [1, 2, 8, 32] {
        let tag = format!("{tag}{clients}");
        let mut s = run(st, sock, clients, ops / clients.max(1), &tag).await;
        report(title, clients, &mut s);
    }
}

fn report(title: &str, clients: usize, s: &mut Samples) {
    let pairs = s.pair.len() as f64;
    let secs = s.wall.as_secs_f64();
    println!(
        "{title:<34}{clients:>3} {:>10.0} {:>10.0} {:>11.1} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        pairs / secs,
        2.0 * pairs / secs,
        2.0 * pairs / (s.writes.max(1) as f64),
        ms(pct(&mut s.add, 0.5)),
        ms(pct(&mut s.add, 0.99)),
        ms(pct(&mut s.del, 0.5)),
        ms(pct(&mut s.del, 0.99)),
        ms(pct(&mut s.pair, 0.5)),
        ms(pct(&mut s.pair, 0.99)),
    );
}

fn header() {
    println!(
        "\n{:<34}{:>3} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "",
        "cl",
        "pairs/s",
        "calls/s",
        "calls/write",
        "ADD p50",
        "ADD p99",
        "DEL p50",
        "DEL p99",
        "pair p50",
        "pair p99"
    );
}

fn one_line(title: &str, v: &mut [Duration]) {
    println!(
        "{title:<58} p50 {:>10}  p99 {:>10}  ({} runs)",
        ms(pct(v, 0.5)),
        ms(pct(v, 0.99)),
        v.len()
    );
}

fn allocations(n: usize) -> CheckpointFile {
    CheckpointFile::new(
        (0..n)
            .map(|i| Allocation {
                network_name: "aws-cni".into(),
                container_id: format!("{i:064x}"),
                if_name: "eth0".into(),
                ipv4: format!("10.0.{}.{}", i / 250, i % 250 + 1),
                ipv6: String::new(),
                allocation_timestamp: 1_700_000_000_000_000_000 + i as i64,
                metadata: IpamMetadata {
                    pod_namespace: "default".into(),
                    pod_name: format!("web-{i}"),
                    interfaces_count: 1,
                },
            })
            .collect(),
    )
}

/// Direct calls on the pool state, bypassing gRPC (blocking; run on a blocking thread).
fn direct(st: &Arc<PoolState>, ops: usize) -> Vec<Duration> {
    let md = IpamMetadata {
        pod_namespace: "default".into(),
        pod_name: "direct".into(),
        interfaces_count: 1,
    };
    (0..ops)
        .map(|i| {
            let key = IpamKey::new("aws-cni", &format!("direct-{i}"), "eth0");
            let t = Instant::now();
            st.assign(&key, &md)
                .expect("assign")
                .wait()
                .expect("durable");
            st.unassign(&key)
                .expect("unassign")
                .wait()
                .expect("durable");
            t.elapsed()
        })
        .collect()
}

fn main() {
    let ops = env_or("OPS", 1000);
    let base = std::env::var("BENCH_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_TARGET_TMPDIR"), "/ipamd-bench").to_owned());
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(&base).expect("temp dir");
    println!("loadavg before: {}", loadavg());
    println!(
        "socket and checkpoint in {} ({} pairs per client count)",
        dir.path().display(),
        ops
    );
    let rt = common::runtime();
    rt.block_on(async {
        let node = common::sim("m5.16xlarge", 7).await;
        let cfg = common::config(
            dir.path(),
            &node,
            &[
                ("MINIMUM_IP_TARGET", "300"),
                ("WARM_IP_TARGET", "16"),
                ("IP_COOLDOWN_PERIOD", "0"),
            ],
        );
        let d = common::start(&cfg).await;
        let pool = d.pool().clone();
        common::wait_until(
            "the pool to reach 300 addresses",
            Duration::from_secs(120),
            || {
                let p = pool.clone();
                async move { !p.is_low() }
            },
        )
        .await;
        let sock = cfg.grpc_socket.clone();
        // Warm-up: connections, page cache, allocator.
        let st = d.state().clone();
        run(&st, &sock, 2, 50, "warm").await;

        header();
        sweep(&st, &sock, ops, "empty node", "e").await;
        let mut bg = client(&sock).await;
        for i in 0..250 {
            add_ok(&mut bg, &format!("held-{i}"), Duration::from_secs(60)).await;
        }
        sweep(&st, &sock, ops, "250 pods held", "h").await;

        println!("\nbreakdown (250 pods held, 1 client)");
        let mut repeat = Vec::with_capacity(ops);
        for i in 0..ops {
            let id = format!("held-{}", i % 250);
            let t = Instant::now();
            let r = bg.add_network(add(&id)).await.expect("AddNetwork");
            repeat.push(t.elapsed());
            assert!(r.get_ref().success);
        }
        one_line(
            "repeated AddNetwork (gRPC + datastore, no checkpoint write)",
            &mut repeat,
        );
        let st = st.clone();
        let n = ops;
        let mut dir_calls = tokio::task::spawn_blocking(move || direct(&st, n))
            .await
            .expect("direct");
        one_line(
            "PoolState::assign + unassign, durable (2 writes, no gRPC)",
            &mut dir_calls,
        );
        for held in [0usize, 250] {
            let path = dir.path().join(format!("alone-{held}.json"));
            let file = allocations(held);
            let n = ops;
            let mut w = tokio::task::spawn_blocking(move || {
                let store = FileStore::new(&path);
                (0..n)
                    .map(|_| {
                        let t = Instant::now();
                        store.write(&file).expect("checkpoint write");
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .expect("writes");
            one_line(
                &format!("FileStore::write alone, {held} allocations"),
                &mut w,
            );
        }
        d.stop().await;
        node.running.shutdown();
    });
    println!("loadavg after: {}", loadavg());
}
