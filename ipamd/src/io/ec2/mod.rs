//! EC2 behind a narrow trait in our own nouns. No SDK type crosses it: the real implementation
//! is in [`crate::io::ec2::aws`], an in-memory one in [`fake`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::types::{Ipv4Net, Ipv6Net};

pub mod aws;
pub mod fake;
pub mod pacer;

/// Tag naming the instance that owns an ENI.
pub const TAG_INSTANCE_ID: &str = "node.k8s.amazonaws.com/instance_id";
/// Tag naming the cluster.
pub const TAG_CLUSTER_NAME: &str = "cluster.k8s.amazonaws.com/name";
/// Tag with the ENI's creation time (RFC 3339).
pub const TAG_CREATED_AT: &str = "node.k8s.amazonaws.com/createdAt";
/// User tag: `true` makes an attached ENI unmanaged.
pub const TAG_NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";
/// Subnet tag for subnet discovery (`0` excludes the subnet).
pub const TAG_SUBNET_ROLE: &str = "kubernetes.io/role/cni";
/// Description prefix of ENIs this daemon creates.
pub const DESCRIPTION_PREFIX: &str = "aws-K8S-";

/// The broad kind of an EC2 failure, which decides retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `RequestLimitExceeded` and friends: retry with backoff.
    Throttled,
    /// HTTP 5xx (`InternalError`, `Unavailable`): retry with backoff.
    Server,
    /// No answer (connection, timeout): retry with backoff.
    Transport,
    /// The request was refused (4xx): do not retry.
    Client,
}

/// An EC2 call that failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("EC2 {action}: {code}: {message}")]
pub struct Ec2Error {
    /// The EC2 action.
    pub action: &'static str,
    /// The AWS error code (or a transport description).
    pub code: String,
    /// The message.
    pub message: String,
    /// Kind.
    pub kind: ErrorKind,
}

impl Ec2Error {
    /// An error with `code` of the kind EC2 gives it.
    pub fn coded(action: &'static str, code: &str, message: impl Into<String>) -> Self {
        let kind = match code {
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => ErrorKind::Throttled,
            "InternalError" | "InternalFailure" | "Unavailable" | "ServiceUnavailable" => {
                ErrorKind::Server
            }
            _ => ErrorKind::Client,
        };
        Self {
            action,
            code: code.to_owned(),
            message: message.into(),
            kind,
        }
    }

    /// Worth retrying.
    pub fn retryable(&self) -> bool {
        self.kind != ErrorKind::Client
    }

    /// `InsufficientFreeAddressesInSubnet`.
    pub fn is_insufficient_addresses(&self) -> bool {
        self.code == "InsufficientFreeAddressesInSubnet"
    }

    /// `InsufficientCidrBlocks` (no aligned free /28).
    pub fn is_insufficient_cidr(&self) -> bool {
        self.code == "InsufficientCidrBlocks"
    }

    /// `InvalidNetworkInterfaceID.NotFound`.
    pub fn is_not_found(&self) -> bool {
        self.code.ends_with(".NotFound")
    }

    /// `PrivateIpAddressLimitExceeded`.
    pub fn is_limit_exceeded(&self) -> bool {
        self.code == "PrivateIpAddressLimitExceeded"
    }

    /// `UnauthorizedOperation`.
    pub fn is_unauthorized(&self) -> bool {
        self.code == "UnauthorizedOperation"
    }
}

/// Result of an EC2 call.
pub type Ec2Result<T> = Result<T, Ec2Error>;

/// An ENI's attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Attachment id.
    pub id: String,
    /// Instance.
    pub instance_id: String,
    /// Device index.
    pub device_index: u32,
    /// Network card.
    pub network_card: u32,
}

/// One ENI as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniInfo {
    /// ENI id.
    pub id: String,
    /// MAC address (lower case).
    pub mac: String,
    /// Subnet.
    pub subnet_id: String,
    /// VPC.
    pub vpc_id: String,
    /// `available`, `in-use`, ...
    pub status: String,
    /// Description.
    pub description: String,
    /// `interface`, `trunk`, `efa`, `efa-only`, ...
    pub interface_type: String,
    /// The primary private IP.
    pub primary_ip: Option<Ipv4Addr>,
    /// Secondary private IPs.
    pub secondary_ips: Vec<Ipv4Addr>,
    /// /28 prefixes.
    pub prefixes: Vec<Ipv4Net>,
    /// IPv6 prefixes (/80s).
    pub ipv6_prefixes: Vec<Ipv6Net>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Attachment, when attached.
    pub attachment: Option<Attachment>,
}

/// One subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    /// Subnet id.
    pub id: String,
    /// CIDR.
    pub cidr: Ipv4Net,
    /// Free addresses.
    pub available: u64,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

/// What to pre-load on a new ENI or assign to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// `n` secondary /32s.
    Ips(u32),
    /// `n` /28 prefixes.
    Prefixes(u32),
}

/// `CreateNetworkInterface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateEni {
    /// Subnet.
    pub subnet_id: String,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Addresses to pre-load.
    pub addresses: Addresses,
}

/// Addresses added to an ENI by an assign call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assigned {
    /// New /32s.
    pub ips: Vec<Ipv4Addr>,
    /// New /28s.
    pub prefixes: Vec<Ipv4Net>,
}

/// An instance type's network limits, from `DescribeInstanceTypes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTypeInfo {
    /// Maximum ENIs on the default card.
    pub max_enis: u32,
    /// IPv4 addresses per ENI.
    pub ipv4_per_eni: u32,
    /// `nitro`, `xen`, ...
    pub hypervisor: String,
    /// Bare metal.
    pub bare_metal: bool,
}

/// The EC2 calls ipamd makes.
#[async_trait::async_trait]
pub trait Ec2Api: Send + Sync {
    /// `DescribeNetworkInterfaces` by id.
    async fn describe_enis(&self, ids: &[String]) -> Ec2Result<Vec<EniInfo>>;
    /// `DescribeNetworkInterfaces` with `status=available`, our instance-id tag key, the VPC
    /// and (when set) the cluster tag: candidates for leaked-ENI cleanup.
    async fn describe_leaked_candidates(
        &self,
        vpc_id: &str,
        cluster: Option<&str>,
    ) -> Ec2Result<Vec<EniInfo>>;
    /// Device indexes in use on `instance_id` (`DescribeInstances`).
    async fn used_device_indexes(&self, instance_id: &str) -> Ec2Result<Vec<(u32, u32)>>;
    /// `DescribeInstanceTypes` for one type.
    async fn describe_instance_type(&self, instance_type: &str) -> Ec2Result<InstanceTypeInfo>;
    /// `DescribeSubnets` in a VPC and availability zone.
    async fn describe_subnets(&self, vpc_id: &str, az: &str) -> Ec2Result<Vec<SubnetInfo>>;
    /// `CreateNetworkInterface`.
    async fn create_eni(&self, req: &CreateEni) -> Ec2Result<EniInfo>;
    /// `AttachNetworkInterface`; returns the attachment id.
    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> Ec2Result<String>;
    /// `ModifyNetworkInterfaceAttribute` with `DeleteOnTermination=true`.
    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Ec2Result<()>;
    /// `DetachNetworkInterface`.
    async fn detach_eni(&self, attachment_id: &str) -> Ec2Result<()>;
    /// `DeleteNetworkInterface`.
    async fn delete_eni(&self, eni_id: &str) -> Ec2Result<()>;
    /// `AssignPrivateIpAddresses`.
    async fn assign(&self, eni_id: &str, what: Addresses) -> Ec2Result<Assigned>;
    /// `UnassignPrivateIpAddresses` with `PrivateIpAddresses`.
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Ec2Result<()>;
    /// `UnassignPrivateIpAddresses` with `Ipv4Prefixes`.
    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> Ec2Result<()>;
    /// `AssignIpv6Addresses` with `Ipv6PrefixCount=n`: the /80s assigned.
    async fn assign_ipv6_prefixes(&self, eni_id: &str, n: u32) -> Ec2Result<Vec<Ipv6Net>>;
    /// `UnassignIpv6Addresses` of these /80s.
    async fn unassign_ipv6_prefixes(&self, eni_id: &str, prefixes: &[Ipv6Net]) -> Ec2Result<()>;
    /// `CreateTags` on one resource.
    async fn create_tags(&self, resource: &str, tags: &BTreeMap<String, String>) -> Ec2Result<()>;
}

/// The EC2 call class an action belongs to, for rate limiting.
pub fn is_mutating(action: &str) -> bool {
    !action.starts_with("Describe")
}
