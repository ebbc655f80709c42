//! `--backend sim`: the VPC simulator (`vpc_sim`) served in-process on loopback, with a VPC,
//! a subnet, a security group and one running instance of the configured type. The daemon then
//! talks to it with the same SDK EC2 client and aws-config IMDS client as on AWS.

use std::net::SocketAddr;

use aws_sdk_ec2::types::InstanceType;
use vpc_sim::server::{self, Running, Shared};
use vpc_sim::sim::{SimConfig, Simulator};

use crate::config::SimSettings;

/// Region of the embedded simulator.
pub const SIM_REGION: &str = "us-west-2";
/// Availability zone of the simulated node.
pub const SIM_AZ: &str = "us-west-2a";
/// Static credentials the simulator accepts.
pub const SIM_CREDENTIALS: (&str, &str) = ("AKIDSIMULATOR", "simulator-secret");

/// Start-up failures of the simulator backend.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A listener could not be bound.
    #[error("simulator listeners")]
    Serve(#[source] vpc_sim::server::ServerError),
    /// Creating the node's VPC, subnet, group or instance failed.
    #[error("simulator set-up: {step}: {message}")]
    Setup {
        /// What was being created.
        step: &'static str,
        /// The EC2 answer.
        message: String,
    },
}

/// A running embedded simulator with the node's resources.
pub struct SimNode {
    /// The simulator (admin access: faults, state).
    pub shared: Shared,
    /// Where it listens.
    pub running: Running,
    /// VPC id.
    pub vpc_id: String,
    /// Subnet id.
    pub subnet_id: String,
    /// Security group.
    pub security_group: String,
    /// The node's instance.
    pub instance_id: String,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode")
            .field("running", &self.running)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl SimNode {
    /// The EC2 endpoint URL.
    pub fn ec2_url(&self) -> String {
        self.running.ec2_url()
    }

    /// The node's IMDS endpoint URL.
    pub fn imds_url(&self) -> String {
        self.running.imds_url(&self.instance_id)
    }

    /// The admin endpoint URL (`/v1/state`, `/v1/faults`, ...).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.running.admin)
    }
}

fn setup<E: std::fmt::Display>(step: &'static str) -> impl Fn(E) -> SimError {
    move |e| SimError::Setup {
        step,
        message: e.to_string(),
    }
}

/// Serves a simulator configured by `cfg` on loopback (port 0 everywhere) and creates the node
/// described by `settings` in it through the SDK.
pub async fn start(settings: &SimSettings, cfg: SimConfig) -> Result<SimNode, SimError> {
    let shared = Shared::new(Simulator::new(SimConfig {
        region: Some(cfg.region.clone().unwrap_or_else(|| SIM_REGION.into())),
        ..cfg
    }));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let running = server::start(shared.clone(), any, any, any)
        .await
        .map_err(SimError::Serve)?;
    let client = client(&running.ec2_url());
    let vpc = client
        .create_vpc()
        .cidr_block(settings.vpc_cidr.to_string())
        .amazon_provided_ipv6_cidr_block(settings.ipv6)
        .send()
        .await
        .map_err(setup("CreateVpc"))?;
    let vpc = vpc.vpc().ok_or_else(|| setup("CreateVpc")("no VPC"))?;
    let vpc_id = vpc
        .vpc_id()
        .map(str::to_owned)
        .ok_or_else(|| setup("CreateVpc")("no VPC id"))?;
    // Dual stack: the subnet takes the first /64 of the VPC's /56.
    let subnet_ipv6 = if settings.ipv6 {
        let block = vpc
            .ipv6_cidr_block_association_set()
            .iter()
            .find_map(|a| a.ipv6_cidr_block())
            .ok_or_else(|| setup("CreateVpc")("no IPv6 CIDR block on the VPC"))?;
        let net: crate::types::Ipv6Net = block.parse().map_err(setup("CreateVpc"))?;
        let first = crate::types::Ipv6Net::new(net.network(), 64)
            .ok_or_else(|| setup("CreateVpc")("IPv6 block longer than /64"))?;
        Some(first.to_string())
    } else {
        None
    };
    let subnet_id = client
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block(settings.subnet_cidr.to_string())
        .set_ipv6_cidr_block(subnet_ipv6)
        .availability_zone(SIM_AZ)
        .send()
        .await
        .map_err(setup("CreateSubnet"))?
        .subnet()
        .and_then(|s| s.subnet_id().map(str::to_owned))
        .ok_or_else(|| setup("CreateSubnet")("no subnet id"))?;
    let security_group = client
        .create_security_group()
        .group_name("nodes")
        .description("ipamd simulated node")
        .vpc_id(&vpc_id)
        .send()
        .await
        .map_err(setup("CreateSecurityGroup"))?
        .group_id()
        .map(str::to_owned)
        .ok_or_else(|| setup("CreateSecurityGroup")("no group id"))?;
    let run = client
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::from(settings.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet_id)
        .security_group_ids(&security_group)
        .send()
        .await
        .map_err(setup("RunInstances"))?;
    let instance_id = run
        .instances()
        .first()
        .and_then(|i| i.instance_id().map(str::to_owned))
        .ok_or_else(|| setup("RunInstances")("no instance id"))?;
    Ok(SimNode {
        shared,
        running,
        vpc_id,
        subnet_id,
        security_group,
        instance_id,
    })
}

/// An SDK client for the simulator at `endpoint` (set-up only; the daemon builds its own).
fn client(endpoint: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new(SIM_REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            SIM_CREDENTIALS.0,
            SIM_CREDENTIALS.1,
            None,
            None,
            "vpc-cni-sim",
        ))
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}
