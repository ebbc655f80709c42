//! SDK calls per second against the served simulator on loopback: describes and assigns, with
//! 1 and 8 concurrent clients. Prints calls/s, median and p99 latency per scenario.
//! Run with `cargo bench -p vpc-sim --bench sdk_throughput`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::Region;
use vpc_sim::server::{self, Shared};
use vpc_sim::sim::{SimConfig, Simulator};

fn client(endpoint: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            "AKIDBENCH",
            "secret",
            None,
            None,
            "static",
        ))
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

#[derive(Clone, Copy)]
enum Call {
    DescribeEni,
    DescribeInstances,
    AssignUnassign,
}

async fn one(c: &aws_sdk_ec2::Client, call: Call, eni: &str, instance: &str) {
    match call {
        Call::DescribeEni => {
            c.describe_network_interfaces()
                .network_interface_ids(eni)
                .send()
                .await
                .unwrap();
        }
        Call::DescribeInstances => {
            c.describe_instances()
                .instance_ids(instance)
                .send()
                .await
                .unwrap();
        }
        Call::AssignUnassign => {
            let r = c
                .assign_private_ip_addresses()
                .network_interface_id(eni)
                .secondary_private_ip_address_count(1)
                .send()
                .await
                .unwrap();
            let ip = r.assigned_private_ip_addresses()[0]
                .private_ip_address()
                .unwrap()
                .to_owned();
            c.unassign_private_ip_addresses()
                .network_interface_id(eni)
                .private_ip_addresses(ip)
                .send()
                .await
                .unwrap();
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let shared = Shared::new(Simulator::new(SimConfig {
        seed: 1,
        call_log_limit: 10_000,
        ..Default::default()
    }));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let srv = server::start(shared, any, any, any).await.unwrap();
    let url = srv.ec2_url();
    let setup = client(&url);
    let vpc = setup
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc()
        .unwrap()
        .vpc_id()
        .unwrap()
        .to_owned();
    let subnet = setup
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.0.0/18")
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_owned();
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    println!(
        "loadavg: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10}",
        "scenario", "clients", "calls/s", "median", "p99"
    );
    for (name, call) in [
        ("DescribeNetworkInterfaces (1 id)", Call::DescribeEni),
        ("DescribeInstances (1 id)", Call::DescribeInstances),
        ("Assign+Unassign 1 IP (2 calls)", Call::AssignUnassign),
    ] {
        for clients in [1usize, 8] {
            // One instance and ENI per client, so assigns never hit the per-ENI limit.
            let mut ready = Vec::new();
            for _ in 0..clients {
                let c = client(&url);
                let r = c
                    .run_instances()
                    .image_id("ami-1")
                    .instance_type("m5.large".into())
                    .min_count(1)
                    .max_count(1)
                    .subnet_id(&subnet)
                    .send()
                    .await
                    .unwrap();
                let inst = r.instances()[0].instance_id().unwrap().to_owned();
                let eni = c
                    .create_network_interface()
                    .subnet_id(&subnet)
                    .send()
                    .await
                    .unwrap();
                let eni = eni
                    .network_interface()
                    .unwrap()
                    .network_interface_id()
                    .unwrap()
                    .to_owned();
                // Warm the connection pool.
                one(&c, call, &eni, &inst).await;
                ready.push((c, eni, inst));
            }
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(secs);
            let mut tasks = Vec::new();
            for (c, eni, inst) in ready {
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        one(&c, call, &eni, &inst).await;
                        lat.push(t.elapsed());
                    }
                    lat
                }));
            }
            let mut lat: Vec<Duration> = Vec::new();
            for t in tasks {
                lat.extend(t.await.unwrap());
            }
            let elapsed = start.elapsed().as_secs_f64();
            lat.sort();
            let calls_per_op = if matches!(call, Call::AssignUnassign) {
                2.0
            } else {
                1.0
            };
            let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
            println!(
                "{name:<34} {clients:>8} {:>10.0} {:>8.2}ms {:>8.2}ms",
                lat.len() as f64 * calls_per_op / elapsed,
                q(0.5).as_secs_f64() * 1e3,
                q(0.99).as_secs_f64() * 1e3
            );
        }
    }
    srv.shutdown();
}
