//! Helpers shared by the HTTP-level tests: a served simulator and SDK clients.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use vpc_sim::server::{self, Running, Shared};
use vpc_sim::sim::{SimConfig, Simulator};

/// A simulator served on ephemeral loopback ports.
pub async fn serve(cfg: SimConfig) -> (Shared, Running) {
    let shared = Shared::new(Simulator::new(cfg));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let running = server::start(shared.clone(), any, any, any).await.unwrap();
    (shared, running)
}

/// An SDK client for `endpoint` with static credentials and no retries (so errors show).
pub fn client(endpoint: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "static"))
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// The EC2 error code of an SDK error.
pub fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> String {
    e.as_service_error()
        .and_then(|s| s.code())
        .unwrap_or("<no code>")
        .to_owned()
}

/// The HTTP status of an SDK error.
pub fn status<E>(e: &SdkError<E, aws_sdk_ec2::config::http::HttpResponse>) -> u16 {
    e.raw_response().map_or(0, |r| r.status().as_u16())
}

/// A raw form POST, for requests the SDK cannot make. Returns (status, body).
pub fn post(addr: SocketAddr, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A VPC (with IPv6), a subnet in us-west-2a, a security group and one running instance.
pub struct Fixture {
    pub vpc: String,
    pub subnet: String,
    pub sg: String,
    pub instance: String,
}

pub async fn fixture(c: &aws_sdk_ec2::Client, subnet_cidr: &str, itype: &str) -> Fixture {
    use aws_sdk_ec2::types::InstanceType;
    let vpc = c
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .amazon_provided_ipv6_cidr_block(true)
        .send()
        .await
        .unwrap();
    let vpc = vpc.vpc().unwrap();
    let vpc_id = vpc.vpc_id().unwrap().to_owned();
    let v6 = vpc
        .ipv6_cidr_block_association_set()
        .first()
        .and_then(|a| a.ipv6_cidr_block())
        .and_then(|b| {
            b.split('/')
                .next()
                .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
        })
        .map(|a| {
            format!(
                "{}/64",
                std::net::Ipv6Addr::from(u128::from(a) | (1u128 << 64))
            )
        });
    let mut req = c
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block(subnet_cidr)
        .availability_zone("us-west-2a");
    if let Some(b) = v6 {
        req = req.ipv6_cidr_block(b);
    }
    let subnet = req
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_owned();
    let sg = c
        .create_security_group()
        .group_name("nodes")
        .description("node group")
        .vpc_id(&vpc_id)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    let r = c
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::from(itype))
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .security_group_ids(&sg)
        .send()
        .await
        .unwrap();
    let instance = r.instances()[0].instance_id().unwrap().to_owned();
    Fixture {
        vpc: vpc_id,
        subnet,
        sg,
        instance,
    }
}
