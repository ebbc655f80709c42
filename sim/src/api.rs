//! Typed EC2 requests and replies: what the query parser produces and the model consumes, and
//! what the model returns for the XML renderer. Our own nouns; no SDK types.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use subnet_calc::limits::InstanceLimits;
use subnet_calc::subnet::Ipv4Cidr;

use crate::ipv6::Ipv6Block;
use crate::model::{Eni, Instance, SecurityGroup, SubnetView, Tags, TrunkAssociation, Vpc};

/// A describe filter: `Filter.N.Name` with its `Filter.N.Value.M` values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filter {
    /// Filter name, e.g. `attachment.instance-id` or `tag:Name`.
    pub name: String,
    /// Accepted values (EC2 wildcards `*` and `?` allowed).
    pub values: Vec<String>,
}

/// Pagination input of a describe call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Page {
    /// `MaxResults`.
    pub max_results: Option<i64>,
    /// `NextToken` from a previous page.
    pub next_token: Option<String>,
}

/// Parameters of `CreateNetworkInterface`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CreateEni {
    /// `SubnetId`.
    pub subnet_id: String,
    /// `Description`.
    pub description: String,
    /// `PrivateIpAddress` (the primary).
    pub private_ip: Option<Ipv4Addr>,
    /// `PrivateIpAddresses.N` (address, primary flag).
    pub private_ips: Vec<(Ipv4Addr, bool)>,
    /// `SecondaryPrivateIpAddressCount`.
    pub secondary_count: Option<i64>,
    /// `Ipv4PrefixCount`.
    pub ipv4_prefix_count: Option<i64>,
    /// `Ipv4Prefix.N.Ipv4Prefix`.
    pub ipv4_prefixes: Vec<Ipv4Cidr>,
    /// `Ipv6AddressCount`.
    pub ipv6_count: Option<i64>,
    /// `Ipv6Addresses.N.Ipv6Address`.
    pub ipv6_addresses: Vec<Ipv6Addr>,
    /// `Ipv6PrefixCount`.
    pub ipv6_prefix_count: Option<i64>,
    /// `Ipv6Prefix.N.Ipv6Prefix`.
    pub ipv6_prefixes: Vec<Ipv6Block>,
    /// `SecurityGroupId.N`.
    pub groups: Vec<String>,
    /// Tags from `TagSpecification` of resource type `network-interface`.
    pub tags: Tags,
    /// `InterfaceType`.
    pub interface_type: Option<String>,
    /// `ClientToken` (idempotency).
    pub client_token: Option<String>,
}

/// Parameters of `RunInstances`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunInstances {
    /// `ImageId`.
    pub image_id: String,
    /// `InstanceType` (EC2's default `m1.small` when absent).
    pub instance_type: String,
    /// `MinCount`.
    pub min_count: i64,
    /// `MaxCount`.
    pub max_count: i64,
    /// `SubnetId`.
    pub subnet_id: Option<String>,
    /// `SecurityGroupId.N`.
    pub security_groups: Vec<String>,
    /// `PrivateIpAddress`.
    pub private_ip: Option<Ipv4Addr>,
    /// `Ipv6AddressCount`: IPv6 addresses for the primary ENI from the subnet's /64.
    pub ipv6_count: Option<i64>,
    /// Tags from `TagSpecification` of resource type `instance`.
    pub tags: Tags,
    /// Tags from `TagSpecification` of resource type `network-interface`.
    pub eni_tags: Tags,
    /// `ClientToken` (idempotency).
    pub client_token: Option<String>,
}

/// One attribute change of `ModifyNetworkInterfaceAttribute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum EniAttribute {
    /// `Attachment.AttachmentId` + `Attachment.DeleteOnTermination`.
    DeleteOnTermination {
        /// The attachment.
        attachment_id: String,
        /// New value.
        value: bool,
    },
    /// `SecurityGroupId.N`.
    Groups(Vec<String>),
    /// `Description.Value`.
    Description(String),
    /// `SourceDestCheck.Value`.
    SourceDestCheck(bool),
}

/// An EC2 request the simulator implements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[allow(missing_docs)] // field names are EC2's parameter names
pub enum Request {
    /// `CreateVpc`.
    CreateVpc {
        cidr: Ipv4Cidr,
        amazon_ipv6: bool,
        tags: Tags,
    },
    /// `CreateSubnet`.
    CreateSubnet {
        vpc_id: String,
        cidr: Ipv4Cidr,
        availability_zone: Option<String>,
        ipv6_cidr: Option<Ipv6Block>,
        tags: Tags,
    },
    /// `AssociateVpcCidrBlock` with `AmazonProvidedIpv6CidrBlock=true`: an Amazon /56.
    AssociateVpcCidrBlock { vpc_id: String, amazon_ipv6: bool },
    /// `AssociateSubnetCidrBlock`: a /64 of the VPC's /56.
    AssociateSubnetCidrBlock {
        subnet_id: String,
        ipv6_cidr: Ipv6Block,
    },
    /// `DescribeVpcs`.
    DescribeVpcs {
        ids: Vec<String>,
        filters: Vec<Filter>,
        page: Page,
    },
    /// `CreateSecurityGroup`.
    CreateSecurityGroup {
        vpc_id: Option<String>,
        name: String,
        description: String,
        tags: Tags,
    },
    /// `RunInstances`.
    RunInstances(RunInstances),
    /// `TerminateInstances`.
    TerminateInstances { ids: Vec<String> },
    /// `DescribeInstances`.
    DescribeInstances {
        ids: Vec<String>,
        filters: Vec<Filter>,
        page: Page,
    },
    /// `DescribeInstanceTypes`.
    DescribeInstanceTypes {
        types: Vec<String>,
        filters: Vec<Filter>,
        page: Page,
    },
    /// `DescribeSubnets`.
    DescribeSubnets {
        ids: Vec<String>,
        filters: Vec<Filter>,
        page: Page,
    },
    /// `DescribeNetworkInterfaces`.
    DescribeNetworkInterfaces {
        ids: Vec<String>,
        filters: Vec<Filter>,
        page: Page,
    },
    /// `CreateNetworkInterface`.
    CreateNetworkInterface(CreateEni),
    /// `AttachNetworkInterface`.
    AttachNetworkInterface {
        eni_id: String,
        instance_id: String,
        device_index: i64,
        network_card_index: Option<i64>,
    },
    /// `DetachNetworkInterface`.
    DetachNetworkInterface { attachment_id: String, force: bool },
    /// `DeleteNetworkInterface`.
    DeleteNetworkInterface { eni_id: String },
    /// `ModifyNetworkInterfaceAttribute`.
    ModifyNetworkInterfaceAttribute {
        eni_id: String,
        change: EniAttribute,
    },
    /// `AssignPrivateIpAddresses`.
    AssignPrivateIpAddresses {
        eni_id: String,
        count: Option<i64>,
        addresses: Vec<Ipv4Addr>,
        prefix_count: Option<i64>,
        prefixes: Vec<Ipv4Cidr>,
    },
    /// `UnassignPrivateIpAddresses`.
    UnassignPrivateIpAddresses {
        eni_id: String,
        addresses: Vec<Ipv4Addr>,
        prefixes: Vec<Ipv4Cidr>,
    },
    /// `AssignIpv6Addresses`.
    AssignIpv6Addresses {
        eni_id: String,
        count: Option<i64>,
        addresses: Vec<Ipv6Addr>,
        prefix_count: Option<i64>,
        prefixes: Vec<Ipv6Block>,
    },
    /// `UnassignIpv6Addresses`.
    UnassignIpv6Addresses {
        eni_id: String,
        addresses: Vec<Ipv6Addr>,
        prefixes: Vec<Ipv6Block>,
    },
    /// `AssociateTrunkInterface`: a branch ENI onto a trunk ENI with a VLAN id (or GRE key).
    AssociateTrunkInterface {
        branch_id: String,
        trunk_id: String,
        vlan_id: Option<i64>,
        gre_key: Option<i64>,
        client_token: Option<String>,
    },
    /// `DisassociateTrunkInterface`.
    DisassociateTrunkInterface {
        association_id: String,
        client_token: Option<String>,
    },
    /// `DescribeTrunkInterfaceAssociations`.
    DescribeTrunkInterfaceAssociations {
        ids: Vec<String>,
        filters: Vec<Filter>,
        page: Page,
    },
    /// `CreateTags`.
    CreateTags { ids: Vec<String>, tags: Tags },
    /// `DeleteTags` (a `None` value deletes the key whatever its value).
    DeleteTags {
        ids: Vec<String>,
        tags: Vec<(String, Option<String>)>,
    },
}

impl Request {
    /// The EC2 action name.
    pub fn action(&self) -> &'static str {
        match self {
            Self::CreateVpc { .. } => "CreateVpc",
            Self::CreateSubnet { .. } => "CreateSubnet",
            Self::AssociateVpcCidrBlock { .. } => "AssociateVpcCidrBlock",
            Self::AssociateSubnetCidrBlock { .. } => "AssociateSubnetCidrBlock",
            Self::DescribeVpcs { .. } => "DescribeVpcs",
            Self::CreateSecurityGroup { .. } => "CreateSecurityGroup",
            Self::RunInstances(_) => "RunInstances",
            Self::TerminateInstances { .. } => "TerminateInstances",
            Self::DescribeInstances { .. } => "DescribeInstances",
            Self::DescribeInstanceTypes { .. } => "DescribeInstanceTypes",
            Self::DescribeSubnets { .. } => "DescribeSubnets",
            Self::DescribeNetworkInterfaces { .. } => "DescribeNetworkInterfaces",
            Self::CreateNetworkInterface(_) => "CreateNetworkInterface",
            Self::AttachNetworkInterface { .. } => "AttachNetworkInterface",
            Self::DetachNetworkInterface { .. } => "DetachNetworkInterface",
            Self::DeleteNetworkInterface { .. } => "DeleteNetworkInterface",
            Self::ModifyNetworkInterfaceAttribute { .. } => "ModifyNetworkInterfaceAttribute",
            Self::AssignPrivateIpAddresses { .. } => "AssignPrivateIpAddresses",
            Self::UnassignPrivateIpAddresses { .. } => "UnassignPrivateIpAddresses",
            Self::AssignIpv6Addresses { .. } => "AssignIpv6Addresses",
            Self::UnassignIpv6Addresses { .. } => "UnassignIpv6Addresses",
            Self::AssociateTrunkInterface { .. } => "AssociateTrunkInterface",
            Self::DisassociateTrunkInterface { .. } => "DisassociateTrunkInterface",
            Self::DescribeTrunkInterfaceAssociations { .. } => "DescribeTrunkInterfaceAssociations",
            Self::CreateTags { .. } => "CreateTags",
            Self::DeleteTags { .. } => "DeleteTags",
        }
    }
}

/// Every action the simulator serves.
pub const ACTIONS: &[&str] = &[
    "CreateVpc",
    "CreateSubnet",
    "AssociateVpcCidrBlock",
    "AssociateSubnetCidrBlock",
    "DescribeVpcs",
    "CreateSecurityGroup",
    "RunInstances",
    "TerminateInstances",
    "DescribeInstances",
    "DescribeInstanceTypes",
    "DescribeSubnets",
    "DescribeNetworkInterfaces",
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "DetachNetworkInterface",
    "DeleteNetworkInterface",
    "ModifyNetworkInterfaceAttribute",
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "AssignIpv6Addresses",
    "UnassignIpv6Addresses",
    "AssociateTrunkInterface",
    "DisassociateTrunkInterface",
    "DescribeTrunkInterfaceAssociations",
    "CreateTags",
    "DeleteTags",
];

/// One instance's state change in a `TerminateInstances` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateChange {
    /// Instance id.
    pub instance_id: String,
    /// State before, as (code, name).
    pub previous: (u16, &'static str),
    /// State after, as (code, name).
    pub current: (u16, &'static str),
}

/// A reservation of `RunInstances` / `DescribeInstances`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReservationView {
    /// `r-…`.
    pub reservation_id: String,
    /// Account.
    pub owner_id: String,
    /// The instances with their network interfaces.
    pub instances: Vec<(Instance, Vec<Eni>)>,
}

/// What a successful call returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[allow(missing_docs, clippy::large_enum_variant)] // variant fields mirror the EC2 response members
pub enum Reply {
    /// `CreateVpc`.
    Vpc(Vpc),
    /// `CreateSubnet`.
    Subnet(SubnetView),
    /// `AssociateVpcCidrBlock`.
    VpcCidrAssociated {
        vpc_id: String,
        association_id: String,
        block: Ipv6Block,
    },
    /// `AssociateSubnetCidrBlock`.
    SubnetCidrAssociated {
        subnet_id: String,
        association_id: String,
        block: Ipv6Block,
    },
    /// `DescribeVpcs`.
    Vpcs {
        vpcs: Vec<Vpc>,
        next_token: Option<String>,
    },
    /// `CreateSecurityGroup`.
    SecurityGroup(SecurityGroup),
    /// `RunInstances`.
    Reservation(ReservationView),
    /// `TerminateInstances`.
    StateChanges(Vec<StateChange>),
    /// `DescribeInstances`.
    Reservations {
        reservations: Vec<ReservationView>,
        next_token: Option<String>,
    },
    /// `DescribeInstanceTypes`.
    InstanceTypes {
        types: Vec<InstanceLimits>,
        next_token: Option<String>,
    },
    /// `DescribeSubnets`.
    Subnets {
        subnets: Vec<SubnetView>,
        next_token: Option<String>,
    },
    /// `DescribeNetworkInterfaces`.
    NetworkInterfaces {
        enis: Vec<Eni>,
        next_token: Option<String>,
    },
    /// `CreateNetworkInterface`.
    NetworkInterface {
        eni: Eni,
        client_token: Option<String>,
    },
    /// `AttachNetworkInterface`.
    Attached {
        attachment_id: String,
        network_card_index: u32,
    },
    /// Calls answering `<return>true</return>`.
    Done,
    /// `AssignPrivateIpAddresses`.
    AssignedPrivate {
        eni_id: String,
        addresses: Vec<Ipv4Addr>,
        prefixes: Vec<Ipv4Cidr>,
    },
    /// `AssignIpv6Addresses`.
    AssignedIpv6 {
        eni_id: String,
        addresses: Vec<Ipv6Addr>,
        prefixes: Vec<Ipv6Block>,
    },
    /// `UnassignIpv6Addresses`.
    UnassignedIpv6 {
        eni_id: String,
        addresses: Vec<Ipv6Addr>,
        prefixes: Vec<Ipv6Block>,
    },
    /// `AssociateTrunkInterface`.
    TrunkAssociated {
        association: TrunkAssociation,
        client_token: Option<String>,
    },
    /// `DisassociateTrunkInterface`: `<return>true</return>` and the client token.
    TrunkDisassociated { client_token: Option<String> },
    /// `DescribeTrunkInterfaceAssociations`.
    TrunkAssociations {
        associations: Vec<TrunkAssociation>,
        next_token: Option<String>,
    },
}
