//! The pure VPC model: state, AWS's rules, and one function per EC2 call.
//!
//! No IO and no clock: every call takes `now_ms` (milliseconds on the simulator's clock), and
//! every random choice (ids, MACs, where in a subnet an address lands) comes from a seeded
//! [`SimRng`], so a sequence of calls from a seed always gives the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use subnet_calc::limits::{
    trunk_limits_with, Catalog, InstanceLimits, LimitOverrides, TrunkLimits,
};
use subnet_calc::subnet::{AllocError, Ipv4Cidr, Placement, SubnetAllocator, PREFIX_SIZE};

use crate::api::{
    CreateEni, EniAttribute, Filter, Page, Reply, Request, ReservationView, RunInstances,
    StateChange,
};
use crate::error::{check_id, id_kind, ApiError, IdKind};
use crate::hooks::{AddressSet, BranchAssociated, HookEvent};
use crate::ipv6::Ipv6Block;
use crate::rng::SimRng;

/// Tags of a resource.
pub type Tags = BTreeMap<String, String>;

/// IPv4 addresses an ENI may hold when it is not attached (AWS's largest per-ENI limit).
pub const UNATTACHED_IPV4_LIMIT: u32 = 50;
/// IPv6 addresses an ENI may hold when it is not attached.
pub const UNATTACHED_IPV6_LIMIT: u32 = 50;
/// Tags per resource.
pub const MAX_TAGS: usize = 50;
/// VLAN ids a trunk association may use (802.1Q: 1 to 4094).
pub const VLAN_IDS: std::ops::RangeInclusive<i64> = 1..=4094;

/// Static settings of a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Region name, e.g. `us-west-2`; availability zones are `<region>a` to `<region>d`.
    pub region: String,
    /// Account id reported as owner.
    pub account_id: String,
    /// How long a detached ENI stays `in-use` with attachment status `detaching` before it
    /// becomes `available` (AWS takes a few seconds). 0 = immediately.
    pub detach_delay_ms: u64,
    /// Per-instance-type limit overrides (applied on top of the calculator's table).
    pub limit_overrides: BTreeMap<String, LimitOverrides>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            region: "us-west-2".into(),
            account_id: "123456789012".into(),
            detach_delay_ms: 0,
            limit_overrides: BTreeMap::new(),
        }
    }
}

impl ModelConfig {
    /// The region's availability zones.
    pub fn availability_zones(&self) -> Vec<String> {
        ["a", "b", "c", "d"]
            .iter()
            .map(|s| format!("{}{s}", self.region))
            .collect()
    }
}

/// A VPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vpc {
    /// `vpc-…`.
    pub id: String,
    /// Primary IPv4 CIDR.
    pub cidr: Ipv4Cidr,
    /// Amazon-provided IPv6 /56, if requested.
    pub ipv6_cidr: Option<Ipv6Block>,
    /// The VPC's `default` security group.
    pub default_security_group: String,
    /// Tags.
    pub tags: Tags,
    /// Owner account.
    pub owner_id: String,
}

/// The id of a VPC's Amazon-provided IPv6 block association (stable for the VPC).
pub fn vpc_ipv6_association_id(vpc_id: &str) -> String {
    format!(
        "vpc-cidr-assoc-6{}",
        vpc_id.trim_start_matches("vpc-").trim_start_matches('0')
    )
}

/// The id of a subnet's IPv6 block association (stable for the subnet).
pub fn subnet_ipv6_association_id(subnet_id: &str) -> String {
    format!(
        "subnet-cidr-assoc-6{}",
        subnet_id
            .trim_start_matches("subnet-")
            .trim_start_matches('0')
    )
}

/// A subnet with its address allocator.
#[derive(Debug, Clone, Serialize)]
pub struct Subnet {
    /// `subnet-…`.
    pub id: String,
    /// Owning VPC.
    pub vpc_id: String,
    /// Availability zone.
    pub availability_zone: String,
    /// IPv4 CIDR.
    pub cidr: Ipv4Cidr,
    /// IPv6 /64, if any.
    pub ipv6_cidr: Option<Ipv6Block>,
    /// Tags.
    pub tags: Tags,
    #[serde(skip)]
    alloc: SubnetAllocator,
    #[serde(skip)]
    v6_addrs: BTreeSet<u128>,
    #[serde(skip)]
    v6_prefixes: BTreeSet<u128>,
}

/// What describe calls and the admin view show of a subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubnetView {
    /// `subnet-…`.
    pub id: String,
    /// Owning VPC.
    pub vpc_id: String,
    /// Availability zone.
    pub availability_zone: String,
    /// IPv4 CIDR.
    pub cidr: Ipv4Cidr,
    /// IPv6 /64, if any.
    pub ipv6_cidr: Option<Ipv6Block>,
    /// Free IPv4 addresses (`AvailableIpAddressCount`).
    pub available_ip_address_count: u32,
    /// Aligned /28 blocks that are wholly free.
    pub free_prefix_blocks: u32,
    /// Tags.
    pub tags: Tags,
    /// Owner account.
    pub owner_id: String,
}

/// A security group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityGroup {
    /// `sg-…`.
    pub id: String,
    /// Group name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Owning VPC.
    pub vpc_id: String,
    /// Tags.
    pub tags: Tags,
}

/// Instance lifecycle states the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// `running` (code 16).
    Running,
    /// `terminated` (code 48).
    Terminated,
}

impl InstanceState {
    /// EC2's (code, name).
    pub fn code_name(self) -> (u16, &'static str) {
        match self {
            Self::Running => (16, "running"),
            Self::Terminated => (48, "terminated"),
        }
    }
}

/// An instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    /// `i-…`.
    pub id: String,
    /// Reservation `r-…`.
    pub reservation_id: String,
    /// Instance type.
    pub instance_type: String,
    /// Limits of the type (from the calculator's table plus overrides).
    pub limits: InstanceLimits,
    /// Trunk and branch limits of the type (the calculator's trunk table plus overrides).
    pub trunk: TrunkLimits,
    /// AMI id as given.
    pub image_id: String,
    /// Subnet of the primary ENI.
    pub subnet_id: String,
    /// VPC.
    pub vpc_id: String,
    /// Availability zone.
    pub availability_zone: String,
    /// State.
    pub state: InstanceState,
    /// Launch time (simulator clock).
    pub launch_ms: u64,
    /// Tags.
    pub tags: Tags,
    /// Security groups of the primary ENI at launch.
    pub security_groups: Vec<String>,
    /// Primary ENI id.
    pub primary_eni: String,
}

/// ENI status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EniStatus {
    /// `available`: not attached.
    Available,
    /// `in-use`: attached or detaching.
    InUse,
}

impl EniStatus {
    /// EC2's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::InUse => "in-use",
        }
    }
}

/// Attachment status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachStatus {
    /// `attached`.
    Attached,
    /// `detaching`: detach requested, not yet complete.
    Detaching,
}

impl AttachStatus {
    /// EC2's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Detaching => "detaching",
        }
    }
}

/// An ENI's attachment to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// `eni-attach-…`.
    pub id: String,
    /// Instance.
    pub instance_id: String,
    /// Device index on its network card.
    pub device_index: u32,
    /// Network card.
    pub network_card_index: u32,
    /// Deleted with the instance?
    pub delete_on_termination: bool,
    /// Status.
    pub status: AttachStatus,
    /// Attach time (simulator clock).
    pub attach_ms: u64,
    /// When a detaching attachment completes.
    pub detach_done_ms: Option<u64>,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Eni {
    /// `eni-…`.
    pub id: String,
    /// Subnet.
    pub subnet_id: String,
    /// VPC.
    pub vpc_id: String,
    /// Availability zone.
    pub availability_zone: String,
    /// MAC address, `02:…`.
    pub mac: String,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: Tags,
    /// Status.
    pub status: EniStatus,
    /// Attachment, if attached or detaching.
    pub attachment: Option<Attachment>,
    /// Security group ids.
    pub groups: Vec<String>,
    /// Primary private IPv4.
    pub primary_ip: Ipv4Addr,
    /// Secondary private IPv4s, in assignment order.
    pub secondary_ips: Vec<Ipv4Addr>,
    /// /28 prefixes, in assignment order.
    pub ipv4_prefixes: Vec<Ipv4Cidr>,
    /// IPv6 addresses.
    pub ipv6_addresses: Vec<Ipv6Addr>,
    /// /80 prefixes.
    pub ipv6_prefixes: Vec<Ipv6Block>,
    /// `interface`, `efa`, `efa-only`, `trunk`, `branch` (an associated branch reports
    /// `branch`).
    pub interface_type: String,
    /// The trunk association of a branch ENI (`trunk-assoc-…`); while set the ENI is `in-use`
    /// without an attachment.
    pub trunk_association: Option<String>,
    /// Source/destination check.
    pub source_dest_check: bool,
    /// Owner account.
    pub owner_id: String,
    /// Creation time (simulator clock).
    pub created_ms: u64,
}

impl Eni {
    /// IPv4 slots in use: primary + secondaries + prefixes (each /28 takes one slot).
    pub fn ipv4_slots(&self) -> u32 {
        1 + self.secondary_ips.len() as u32 + self.ipv4_prefixes.len() as u32
    }

    /// IPv6 slots in use: addresses + /80 prefixes.
    pub fn ipv6_slots(&self) -> u32 {
        (self.ipv6_addresses.len() + self.ipv6_prefixes.len()) as u32
    }

    /// Instance it is attached to (also while detaching).
    pub fn instance_id(&self) -> Option<&str> {
        self.attachment.as_ref().map(|a| a.instance_id.as_str())
    }

    fn addresses(&self) -> AddressSet {
        AddressSet {
            ipv4: std::iter::once(self.primary_ip)
                .chain(self.secondary_ips.iter().copied())
                .collect(),
            ipv4_prefixes: self.ipv4_prefixes.clone(),
            ipv6: self.ipv6_addresses.clone(),
            ipv6_prefixes: self.ipv6_prefixes.clone(),
        }
    }
}

/// The protocol of a trunk association.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InterfaceProtocol {
    /// 802.1Q VLAN (what security groups for pods uses).
    #[serde(rename = "VLAN")]
    Vlan,
    /// GRE.
    #[serde(rename = "GRE")]
    Gre,
}

impl InterfaceProtocol {
    /// EC2's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vlan => "VLAN",
            Self::Gre => "GRE",
        }
    }
}

/// A branch ENI associated with a trunk ENI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrunkAssociation {
    /// `trunk-assoc-…`.
    pub id: String,
    /// The branch ENI.
    pub branch_id: String,
    /// The trunk ENI.
    pub trunk_id: String,
    /// VLAN or GRE.
    pub protocol: InterfaceProtocol,
    /// VLAN id (VLAN protocol), unique on its trunk.
    pub vlan_id: Option<u32>,
    /// GRE key (GRE protocol), unique on its trunk.
    pub gre_key: Option<u32>,
    /// Tags.
    pub tags: Tags,
    /// The branch's `InterfaceType` before the association (restored after it).
    pub branch_type_before: String,
}

/// Per-card ENI limit (`NetworkCards[].MaximumNetworkInterfaces`): the table's value for the
/// card ([`InstanceLimits::card_max_enis`]); 0 for a card the type does not have.
pub fn card_max_enis(l: &InstanceLimits, card: u32) -> u32 {
    l.card_max_enis(card)
}

/// The whole simulated account in one region.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// Settings.
    pub config: ModelConfig,
    #[serde(skip)]
    rng: SimRng,
    /// VPCs by id.
    pub vpcs: BTreeMap<String, Vpc>,
    /// Subnets by id.
    pub subnets: BTreeMap<String, Subnet>,
    /// Security groups by id.
    pub security_groups: BTreeMap<String, SecurityGroup>,
    /// Instances by id (terminated ones stay listed, as in EC2 for a while).
    pub instances: BTreeMap<String, Instance>,
    /// ENIs by id.
    pub enis: BTreeMap<String, Eni>,
    /// Trunk associations (branch ENIs on trunk ENIs) by id.
    pub trunk_associations: BTreeMap<String, TrunkAssociation>,
    #[serde(skip)]
    attachments: HashMap<String, String>,
    #[serde(skip)]
    macs: BTreeSet<String>,
    #[serde(skip)]
    client_tokens: HashMap<(String, String), Vec<String>>,
    #[serde(skip)]
    events: Vec<HookEvent>,
    #[serde(skip)]
    dirty: BTreeSet<String>,
}

/// Is the request a mutating one (for throttling categories and state-change checks)?
pub fn is_mutating(action: &str) -> bool {
    !action.starts_with("Describe")
}

impl Model {
    /// An empty account.
    pub fn new(config: ModelConfig) -> Self {
        Self {
            rng: SimRng::new(config.seed),
            config,
            vpcs: BTreeMap::new(),
            subnets: BTreeMap::new(),
            security_groups: BTreeMap::new(),
            instances: BTreeMap::new(),
            enis: BTreeMap::new(),
            trunk_associations: BTreeMap::new(),
            attachments: HashMap::new(),
            macs: BTreeSet::new(),
            client_tokens: HashMap::new(),
            events: Vec::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Executes one call at `now_ms`. On error, the state is unchanged.
    pub fn execute(&mut self, now_ms: u64, req: Request) -> Result<Reply, ApiError> {
        self.settle(now_ms);
        match req {
            Request::CreateVpc {
                cidr,
                amazon_ipv6,
                tags,
            } => self.create_vpc(cidr, amazon_ipv6, tags),
            Request::CreateSubnet {
                vpc_id,
                cidr,
                availability_zone,
                ipv6_cidr,
                tags,
            } => self.create_subnet(&vpc_id, cidr, availability_zone, ipv6_cidr, tags),
            Request::AssociateVpcCidrBlock {
                vpc_id,
                amazon_ipv6,
            } => self.associate_vpc_cidr(&vpc_id, amazon_ipv6),
            Request::AssociateSubnetCidrBlock {
                subnet_id,
                ipv6_cidr,
            } => self.associate_subnet_cidr(&subnet_id, ipv6_cidr),
            Request::DescribeVpcs { ids, filters, page } => {
                self.describe_vpcs(&ids, &filters, &page)
            }
            Request::CreateSecurityGroup {
                vpc_id,
                name,
                description,
                tags,
            } => self.create_security_group(vpc_id, name, description, tags),
            Request::RunInstances(r) => self.run_instances(now_ms, r),
            Request::TerminateInstances { ids } => self.terminate_instances(&ids),
            Request::DescribeInstances { ids, filters, page } => {
                self.describe_instances(&ids, &filters, &page)
            }
            Request::DescribeInstanceTypes {
                types,
                filters,
                page,
            } => self.describe_instance_types(&types, &filters, &page),
            Request::DescribeSubnets { ids, filters, page } => {
                self.describe_subnets(&ids, &filters, &page)
            }
            Request::DescribeNetworkInterfaces { ids, filters, page } => {
                self.describe_enis(&ids, &filters, &page)
            }
            Request::CreateNetworkInterface(c) => self.create_eni(now_ms, c),
            Request::AttachNetworkInterface {
                eni_id,
                instance_id,
                device_index,
                network_card_index,
            } => self.attach(
                now_ms,
                &eni_id,
                &instance_id,
                device_index,
                network_card_index,
            ),
            Request::DetachNetworkInterface {
                attachment_id,
                force,
            } => self.detach(now_ms, &attachment_id, force),
            Request::DeleteNetworkInterface { eni_id } => self.delete_eni(&eni_id),
            Request::ModifyNetworkInterfaceAttribute { eni_id, change } => {
                self.modify_eni(&eni_id, change)
            }
            Request::AssignPrivateIpAddresses {
                eni_id,
                count,
                addresses,
                prefix_count,
                prefixes,
            } => self.assign_private(&eni_id, count, addresses, prefix_count, prefixes),
            Request::UnassignPrivateIpAddresses {
                eni_id,
                addresses,
                prefixes,
            } => self.unassign_private(&eni_id, &addresses, &prefixes),
            Request::AssignIpv6Addresses {
                eni_id,
                count,
                addresses,
                prefix_count,
                prefixes,
            } => self.assign_ipv6(&eni_id, count, addresses, prefix_count, prefixes),
            Request::UnassignIpv6Addresses {
                eni_id,
                addresses,
                prefixes,
            } => self.unassign_ipv6(&eni_id, &addresses, &prefixes),
            Request::AssociateTrunkInterface {
                branch_id,
                trunk_id,
                vlan_id,
                gre_key,
                client_token,
            } => self.associate_trunk(&branch_id, &trunk_id, vlan_id, gre_key, client_token),
            Request::DisassociateTrunkInterface {
                association_id,
                client_token,
            } => self.disassociate_trunk(&association_id, client_token),
            Request::DescribeTrunkInterfaceAssociations { ids, filters, page } => {
                self.describe_trunk_associations(&ids, &filters, &page)
            }
            Request::CreateTags { ids, tags } => self.create_tags(&ids, tags),
            Request::DeleteTags { ids, tags } => self.delete_tags(&ids, &tags),
        }
    }

    /// Completes detaches whose delay has passed.
    pub fn settle(&mut self, now_ms: u64) {
        let done: Vec<String> = self
            .enis
            .values()
            .filter(|e| {
                e.attachment.as_ref().is_some_and(|a| {
                    a.status == AttachStatus::Detaching
                        && a.detach_done_ms.is_some_and(|t| t <= now_ms)
                })
            })
            .map(|e| e.id.clone())
            .collect();
        for id in done {
            if let Some(e) = self.enis.get_mut(&id) {
                if let Some(a) = e.attachment.take() {
                    self.attachments.remove(&a.id);
                }
                e.status = EniStatus::Available;
            }
        }
    }

    /// Hook events produced since the last drain, in order.
    pub fn drain_events(&mut self) -> Vec<HookEvent> {
        std::mem::take(&mut self.events)
    }

    /// Instances whose metadata may have changed since the last drain.
    pub fn drain_dirty(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.dirty)
    }

    /// The subnet view of `id`.
    pub fn subnet_view(&self, id: &str) -> Option<SubnetView> {
        self.subnets.get(id).map(|s| self.view(s))
    }

    fn view(&self, s: &Subnet) -> SubnetView {
        SubnetView {
            id: s.id.clone(),
            vpc_id: s.vpc_id.clone(),
            availability_zone: s.availability_zone.clone(),
            cidr: s.cidr,
            ipv6_cidr: s.ipv6_cidr,
            available_ip_address_count: s.alloc.free_addresses(),
            free_prefix_blocks: s.alloc.free_blocks(),
            tags: s.tags.clone(),
            owner_id: self.config.account_id.clone(),
        }
    }

    /// Trunk and branch limits of an instance type, with the configured overrides.
    pub fn trunk_limits_for(&self, instance_type: &str) -> TrunkLimits {
        let o = self
            .config
            .limit_overrides
            .get(instance_type)
            .cloned()
            .unwrap_or_default();
        trunk_limits_with(instance_type, &o)
    }

    /// Limits of an instance type, with the configured overrides.
    pub fn limits_for(&self, instance_type: &str) -> Result<InstanceLimits, ApiError> {
        let o = self
            .config
            .limit_overrides
            .get(instance_type)
            .cloned()
            .unwrap_or_default();
        Catalog::embedded().lookup(instance_type, &o).map_err(|_| {
            ApiError::invalid(format!("Invalid value '{instance_type}' for InstanceType."))
        })
    }

    // ----- ids and helpers -------------------------------------------------------------------

    fn new_id(&mut self, prefix: &str) -> String {
        loop {
            let id = format!("{prefix}-0{:016x}", self.rng.next_u64());
            let taken = match prefix {
                "vpc" => self.vpcs.contains_key(&id),
                "subnet" => self.subnets.contains_key(&id),
                "sg" => self.security_groups.contains_key(&id),
                "i" => self.instances.contains_key(&id),
                "eni" => self.enis.contains_key(&id),
                "eni-attach" => self.attachments.contains_key(&id),
                "trunk-assoc" => self.trunk_associations.contains_key(&id),
                _ => false,
            };
            if !taken {
                return id;
            }
        }
    }

    fn new_mac(&mut self) -> String {
        loop {
            let r = self.rng.next_u64().to_be_bytes();
            let mac = format!(
                "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                r[0], r[1], r[2], r[3], r[4]
            );
            if self.macs.insert(mac.clone()) {
                return mac;
            }
        }
    }

    fn eni(&self, id: &str) -> Result<&Eni, ApiError> {
        check_id(IdKind::Eni, id)?;
        self.enis.get(id).ok_or_else(|| ApiError::not_found(id))
    }

    fn instance(&self, id: &str) -> Result<&Instance, ApiError> {
        check_id(IdKind::Instance, id)?;
        self.instances
            .get(id)
            .ok_or_else(|| ApiError::not_found(id))
    }

    fn subnet(&self, id: &str) -> Result<&Subnet, ApiError> {
        check_id(IdKind::Subnet, id)?;
        self.subnets.get(id).ok_or_else(|| ApiError::not_found(id))
    }

    fn vpc(&self, id: &str) -> Result<&Vpc, ApiError> {
        check_id(IdKind::Vpc, id)?;
        self.vpcs.get(id).ok_or_else(|| ApiError::not_found(id))
    }

    fn check_groups(&self, groups: &[String], vpc_id: &str) -> Result<(), ApiError> {
        for g in groups {
            check_id(IdKind::SecurityGroup, g)?;
            match self.security_groups.get(g) {
                None => return Err(ApiError::not_found(g)),
                Some(sg) if sg.vpc_id != vpc_id => {
                    return Err(ApiError::invalid(format!(
                        "Security group {g} and subnet belong to different networks."
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// IPv4 slot limit of an ENI where it is now (attached: its instance type's limit).
    fn ipv4_limit(&self, eni: &Eni) -> u32 {
        eni.instance_id()
            .and_then(|i| self.instances.get(i))
            .map_or(UNATTACHED_IPV4_LIMIT, |i| i.limits.ipv4_per_eni)
    }

    fn ipv6_limit(&self, eni: &Eni) -> u32 {
        eni.instance_id()
            .and_then(|i| self.instances.get(i))
            .map_or(UNATTACHED_IPV6_LIMIT, |i| i.limits.ipv6_per_eni)
    }

    fn prefix_delegation_ok(&self, eni: &Eni) -> Result<(), ApiError> {
        if let Some(i) = eni.instance_id().and_then(|i| self.instances.get(i)) {
            if !i.limits.supports_prefix_delegation() {
                return Err(ApiError::invalid(format!(
                    "Prefix delegation is not supported for instance type {}.",
                    i.instance_type
                )));
            }
        }
        Ok(())
    }

    /// Marks the instances of every attached ENI matching `f` (their metadata changed).
    fn mark_dirty_where(&mut self, f: impl Fn(&Eni) -> bool) {
        let ids: Vec<String> = self
            .enis
            .values()
            .filter(|e| f(e))
            .filter_map(|e| e.instance_id().map(str::to_owned))
            .collect();
        self.dirty.extend(ids);
    }

    fn mark_dirty(&mut self, eni_id: &str) {
        if let Some(i) = self.enis.get(eni_id).and_then(|e| e.instance_id()) {
            self.dirty.insert(i.to_owned());
        }
    }

    // ----- address allocation (transactional) ------------------------------------------------

    fn spread(&mut self, s: &Subnet) -> Placement {
        Placement::From(self.rng.below(s.cidr.size()) as u32)
    }

    /// Allocates `count` addresses, `specific` addresses and `prefixes` + `prefix_count`
    /// prefixes in `subnet_id`, all or nothing.
    fn alloc_v4(
        &mut self,
        subnet_id: &str,
        specific: &[Ipv4Addr],
        count: u32,
        prefixes: &[Ipv4Cidr],
        prefix_count: u32,
    ) -> Result<(Vec<Ipv4Addr>, Vec<Ipv4Cidr>), ApiError> {
        let mut s = self
            .subnets
            .get(subnet_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(subnet_id))?;
        let mut ips = Vec::new();
        let mut pfx = Vec::new();
        for a in specific {
            let n = u32::from(*a);
            if !s.cidr.contains(n) {
                return Err(ApiError::invalid(format!(
                    "Address {a} does not fall within the subnet's address range"
                )));
            }
            let off = n - s.cidr.base();
            if off < 4 || u64::from(off) + 1 == s.cidr.size() {
                return Err(ApiError::invalid(format!(
                    "Address {a} is reserved by AWS in subnet {}",
                    s.cidr
                )));
            }
            s.alloc.allocate_specific(n).map_err(|_| {
                ApiError::new("InvalidIPAddress.InUse", format!("Address {a} is in use."))
            })?;
            ips.push(*a);
        }
        if s.alloc.free_addresses() < count {
            return Err(insufficient_addresses(&s));
        }
        for _ in 0..count {
            let p = self.spread(&s);
            let n = s
                .alloc
                .allocate_ip(p)
                .map_err(|_| insufficient_addresses(&s))?;
            ips.push(Ipv4Addr::from(n));
        }
        for p in prefixes {
            if p.prefix_len() != 28 || !s.cidr.contains_cidr(p) {
                return Err(ApiError::invalid(format!(
                    "Prefix {p} is not a /28 within subnet {}",
                    s.cidr
                )));
            }
            s.alloc.allocate_specific_prefix(p.base()).map_err(|_| {
                ApiError::new(
                    "InvalidIPAddress.InUse",
                    format!("Prefix {p} overlaps addresses in use."),
                )
            })?;
            pfx.push(*p);
        }
        for _ in 0..prefix_count {
            let p = self.spread(&s);
            let base = s.alloc.allocate_prefix(p).map_err(|e| match e {
                AllocError::NoFreeBlock(_) => ApiError::new(
                    "InsufficientCidrBlocks",
                    "There are not enough free cidr blocks in the specified subnet to satisfy the request.",
                ),
                _ => insufficient_addresses(&s),
            })?;
            pfx.push(Ipv4Cidr::containing(base, 28));
        }
        self.subnets.insert(subnet_id.to_owned(), s);
        Ok((ips, pfx))
    }

    fn release_v4(&mut self, subnet_id: &str, ips: &[Ipv4Addr], prefixes: &[Ipv4Cidr]) {
        if let Some(s) = self.subnets.get_mut(subnet_id) {
            for a in ips {
                s.alloc.release_ip(u32::from(*a));
            }
            for p in prefixes {
                s.alloc.release_prefix(p.base());
            }
        }
    }

    fn alloc_v6(
        &mut self,
        subnet_id: &str,
        specific: &[Ipv6Addr],
        count: u32,
        prefixes: &[Ipv6Block],
        prefix_count: u32,
    ) -> Result<(Vec<Ipv6Addr>, Vec<Ipv6Block>), ApiError> {
        if specific.is_empty() && count == 0 && prefixes.is_empty() && prefix_count == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut s = self
            .subnets
            .get(subnet_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(subnet_id))?;
        let Some(net) = s.ipv6_cidr else {
            return Err(ApiError::invalid(format!(
                "Subnet {subnet_id} does not have an IPv6 CIDR block associated."
            )));
        };
        let in_prefix =
            |s: &Subnet, a: u128| s.v6_prefixes.iter().any(|p| a & !((1u128 << 48) - 1) == *p);
        let mut addrs = Vec::new();
        let mut pfx = Vec::new();
        for a in specific {
            let n = u128::from(*a);
            if !net.contains(n) {
                return Err(ApiError::invalid(format!(
                    "Address {a} does not fall within the subnet's address range"
                )));
            }
            if s.v6_addrs.contains(&n) || in_prefix(&s, n) {
                return Err(ApiError::new(
                    "InvalidIPAddress.InUse",
                    format!("Address {a} is in use."),
                ));
            }
            s.v6_addrs.insert(n);
            addrs.push(*a);
        }
        for _ in 0..count {
            // EC2 reserves the first four addresses and the last one of the /64.
            let n = loop {
                let host = self.rng.next_u64();
                let n = net.base | u128::from(host);
                if host > 3 && host != u64::MAX && !s.v6_addrs.contains(&n) && !in_prefix(&s, n) {
                    break n;
                }
            };
            s.v6_addrs.insert(n);
            addrs.push(Ipv6Addr::from(n));
        }
        let prefix_free = |s: &Subnet, base: u128| {
            !s.v6_prefixes.contains(&base)
                && !s.v6_addrs.iter().any(|a| a & !((1u128 << 48) - 1) == base)
        };
        for p in prefixes {
            if p.len != 80 || !net.contains_block(p) {
                return Err(ApiError::invalid(format!(
                    "Prefix {p} is not a /80 within the subnet"
                )));
            }
            if !prefix_free(&s, p.base) {
                return Err(ApiError::new(
                    "InvalidIPAddress.InUse",
                    format!("Prefix {p} is in use."),
                ));
            }
            s.v6_prefixes.insert(p.base);
            pfx.push(*p);
        }
        // A /64 has 65,536 aligned /80s; the first and the last hold reserved addresses.
        let last = net.base | (0xffffu128 << 48);
        for _ in 0..prefix_count {
            if s.v6_prefixes.len() >= (1 << 16) - 2 {
                return Err(ApiError::new(
                    "InsufficientCidrBlocks",
                    "There are not enough free cidr blocks in the specified subnet to satisfy the request.",
                ));
            }
            let base = loop {
                let b = net.base | (u128::from(self.rng.next_u64() as u16) << 48);
                if b != net.base && b != last && prefix_free(&s, b) {
                    break b;
                }
            };
            s.v6_prefixes.insert(base);
            pfx.push(Ipv6Block { base, len: 80 });
        }
        self.subnets.insert(subnet_id.to_owned(), s);
        Ok((addrs, pfx))
    }

    fn release_v6(&mut self, subnet_id: &str, addrs: &[Ipv6Addr], prefixes: &[Ipv6Block]) {
        if let Some(s) = self.subnets.get_mut(subnet_id) {
            for a in addrs {
                s.v6_addrs.remove(&u128::from(*a));
            }
            for p in prefixes {
                s.v6_prefixes.remove(&p.base);
            }
        }
    }

    // ----- VPC, subnet, security group -------------------------------------------------------

    fn create_vpc(
        &mut self,
        cidr: Ipv4Cidr,
        amazon_ipv6: bool,
        tags: Tags,
    ) -> Result<Reply, ApiError> {
        if !(16..=28).contains(&cidr.prefix_len()) {
            return Err(ApiError::new(
                "InvalidVpc.Range",
                format!("The CIDR '{cidr}' is invalid."),
            ));
        }
        check_tags(&tags)?;
        let id = self.new_id("vpc");
        let ipv6_cidr = amazon_ipv6.then(|| self.new_amazon_56());
        let sg_id = self.new_id("sg");
        self.security_groups.insert(
            sg_id.clone(),
            SecurityGroup {
                id: sg_id.clone(),
                name: "default".into(),
                description: "default VPC security group".into(),
                vpc_id: id.clone(),
                tags: Tags::new(),
            },
        );
        let vpc = Vpc {
            id: id.clone(),
            cidr,
            ipv6_cidr,
            default_security_group: sg_id,
            tags,
            owner_id: self.config.account_id.clone(),
        };
        self.vpcs.insert(id, vpc.clone());
        Ok(Reply::Vpc(vpc))
    }

    /// A fresh Amazon-provided /56 from the region's pool (`2600:1f14::/32` here), unique in the
    /// account.
    fn new_amazon_56(&mut self) -> Ipv6Block {
        loop {
            let r = u128::from(self.rng.next_u64() as u32 & 0x00ff_ffff);
            let b = Ipv6Block {
                base: (0x2600_1f14u128 << 96) | (r << 72),
                len: 56,
            };
            if !self.vpcs.values().any(|v| v.ipv6_cidr == Some(b)) {
                return b;
            }
        }
    }

    fn associate_vpc_cidr(&mut self, vpc_id: &str, amazon_ipv6: bool) -> Result<Reply, ApiError> {
        let vpc = self.vpc(vpc_id)?.clone();
        if !amazon_ipv6 {
            return Err(ApiError::missing("AmazonProvidedIpv6CidrBlock"));
        }
        if vpc.ipv6_cidr.is_some() {
            return Err(ApiError::new(
                "CidrLimitExceeded",
                format!("This network '{vpc_id}' has met its maximum number of allowed CIDRs: 1"),
            ));
        }
        let block = self.new_amazon_56();
        if let Some(v) = self.vpcs.get_mut(vpc_id) {
            v.ipv6_cidr = Some(block);
        }
        self.mark_dirty_where(|e| e.vpc_id == vpc_id);
        Ok(Reply::VpcCidrAssociated {
            vpc_id: vpc_id.to_owned(),
            association_id: vpc_ipv6_association_id(vpc_id),
            block,
        })
    }

    /// EC2's checks of a subnet IPv6 block: a /64 inside the VPC's /56, overlapping no other
    /// subnet's.
    fn check_subnet_ipv6(&self, vpc: &Vpc, b6: &Ipv6Block) -> Result<(), ApiError> {
        let ok = vpc.ipv6_cidr.is_some_and(|v| v.contains_block(b6)) && b6.len == 64;
        if !ok {
            return Err(ApiError::new(
                "InvalidSubnet.Range",
                format!("The IPv6 CIDR '{b6}' is invalid."),
            ));
        }
        if self
            .subnets
            .values()
            .any(|s| s.ipv6_cidr.is_some_and(|o| o.overlaps(b6)))
        {
            return Err(ApiError::new(
                "InvalidSubnet.Conflict",
                format!("The CIDR '{b6}' conflicts with another subnet"),
            ));
        }
        Ok(())
    }

    fn associate_subnet_cidr(
        &mut self,
        subnet_id: &str,
        block: Ipv6Block,
    ) -> Result<Reply, ApiError> {
        let s = self.subnet(subnet_id)?.clone();
        let vpc = self.vpc(&s.vpc_id)?.clone();
        if s.ipv6_cidr.is_some() {
            return Err(ApiError::new(
                "CidrLimitExceeded",
                format!("This subnet '{subnet_id}' has met its maximum number of allowed CIDRs: 1"),
            ));
        }
        self.check_subnet_ipv6(&vpc, &block)?;
        if let Some(s) = self.subnets.get_mut(subnet_id) {
            s.ipv6_cidr = Some(block);
        }
        self.mark_dirty_where(|e| e.subnet_id == subnet_id);
        Ok(Reply::SubnetCidrAssociated {
            subnet_id: subnet_id.to_owned(),
            association_id: subnet_ipv6_association_id(subnet_id),
            block,
        })
    }

    fn describe_vpcs(
        &self,
        ids: &[String],
        filters: &[Filter],
        page: &Page,
    ) -> Result<Reply, ApiError> {
        check_filters(filters, VPC_FILTERS)?;
        for id in ids {
            self.vpc(id)?;
        }
        let mut out = Vec::new();
        for v in self.vpcs.values() {
            if !ids.is_empty() && !ids.contains(&v.id) {
                continue;
            }
            if matches_all(filters, |f| vpc_filter(v, f))? {
                out.push(v.clone());
            }
        }
        let (vpcs, next_token) = paginate(out, |v| v.id.clone(), page, 5, 1000, None)?;
        Ok(Reply::Vpcs { vpcs, next_token })
    }

    fn create_subnet(
        &mut self,
        vpc_id: &str,
        cidr: Ipv4Cidr,
        az: Option<String>,
        ipv6_cidr: Option<Ipv6Block>,
        tags: Tags,
    ) -> Result<Reply, ApiError> {
        let vpc = self.vpc(vpc_id)?.clone();
        if !(16..=28).contains(&cidr.prefix_len()) || !vpc.cidr.contains_cidr(&cidr) {
            return Err(ApiError::new(
                "InvalidSubnet.Range",
                format!("The CIDR '{cidr}' is invalid."),
            ));
        }
        let overlaps = |a: &Ipv4Cidr, b: &Ipv4Cidr| a.contains_cidr(b) || b.contains_cidr(a);
        if self
            .subnets
            .values()
            .any(|s| s.vpc_id == vpc_id && overlaps(&s.cidr, &cidr))
        {
            return Err(ApiError::new(
                "InvalidSubnet.Conflict",
                format!("The CIDR '{cidr}' conflicts with another subnet"),
            ));
        }
        let zones = self.config.availability_zones();
        let az = match az {
            Some(z) if zones.contains(&z) => z,
            Some(z) => {
                return Err(ApiError::bad_value(
                    "availabilityZone",
                    &z,
                    &format!("Subnets can currently only be created in the following availability zones: {}.", zones.join(", ")),
                ))
            }
            None => zones[self.rng.below(zones.len() as u64) as usize].clone(),
        };
        if let Some(b6) = ipv6_cidr {
            self.check_subnet_ipv6(&vpc, &b6)?;
        }
        check_tags(&tags)?;
        let id = self.new_id("subnet");
        let s = Subnet {
            id: id.clone(),
            vpc_id: vpc_id.to_owned(),
            availability_zone: az,
            cidr,
            ipv6_cidr,
            tags,
            alloc: SubnetAllocator::new(cidr),
            v6_addrs: BTreeSet::new(),
            v6_prefixes: BTreeSet::new(),
        };
        let v = self.view(&s);
        self.subnets.insert(id, s);
        Ok(Reply::Subnet(v))
    }

    fn create_security_group(
        &mut self,
        vpc_id: Option<String>,
        name: String,
        description: String,
        tags: Tags,
    ) -> Result<Reply, ApiError> {
        let Some(vpc_id) = vpc_id else {
            return Err(ApiError::new(
                "VPCIdNotSpecified",
                "No default VPC for this user",
            ));
        };
        self.vpc(&vpc_id)?;
        if name.is_empty() || name.len() > 255 || name.starts_with("sg-") {
            return Err(ApiError::bad_value(
                "GroupName",
                &name,
                "Group names may not be empty, longer than 255 characters or start with sg-.",
            ));
        }
        if self
            .security_groups
            .values()
            .any(|g| g.vpc_id == vpc_id && g.name == name)
        {
            return Err(ApiError::new(
                "InvalidGroup.Duplicate",
                format!("The security group '{name}' already exists for VPC '{vpc_id}'"),
            ));
        }
        check_tags(&tags)?;
        let id = self.new_id("sg");
        let g = SecurityGroup {
            id: id.clone(),
            name,
            description,
            vpc_id,
            tags,
        };
        self.security_groups.insert(id, g.clone());
        Ok(Reply::SecurityGroup(g))
    }

    // ----- instances -------------------------------------------------------------------------

    fn reservation(&self, rid: &str, ids: &[String]) -> ReservationView {
        ReservationView {
            reservation_id: rid.to_owned(),
            owner_id: self.config.account_id.clone(),
            instances: ids
                .iter()
                .filter_map(|i| self.instances.get(i))
                .map(|i| (i.clone(), self.instance_enis(&i.id)))
                .collect(),
        }
    }

    /// ENIs attached to an instance, by card then device index.
    pub fn instance_enis(&self, instance_id: &str) -> Vec<Eni> {
        let mut v: Vec<Eni> = self
            .enis
            .values()
            .filter(|e| e.instance_id() == Some(instance_id))
            .cloned()
            .collect();
        v.sort_by_key(|e| {
            e.attachment
                .as_ref()
                .map(|a| (a.network_card_index, a.device_index))
        });
        v
    }

    fn run_instances(&mut self, now_ms: u64, r: RunInstances) -> Result<Reply, ApiError> {
        if let Some(t) = &r.client_token {
            if let Some(ids) = self.client_tokens.get(&("RunInstances".into(), t.clone())) {
                let rid = self
                    .instances
                    .get(&ids[0])
                    .map(|i| i.reservation_id.clone())
                    .unwrap_or_default();
                return Ok(Reply::Reservation(self.reservation(&rid, &ids.clone())));
            }
        }
        if r.min_count < 1 || r.max_count < r.min_count {
            return Err(ApiError::bad_value(
                "MinCount",
                &r.min_count.to_string(),
                "MinCount must be at least 1 and at most MaxCount.",
            ));
        }
        let limits = self.limits_for(&r.instance_type)?;
        let trunk = self.trunk_limits_for(&r.instance_type);
        let Some(subnet_id) = r.subnet_id.clone() else {
            return Err(ApiError::new(
                "VPCIdNotSpecified",
                "No default VPC for this user",
            ));
        };
        let subnet = self.subnet(&subnet_id)?.clone();
        let groups = if r.security_groups.is_empty() {
            vec![self
                .vpcs
                .get(&subnet.vpc_id)
                .map(|v| v.default_security_group.clone())
                .unwrap_or_default()]
        } else {
            self.check_groups(&r.security_groups, &subnet.vpc_id)?;
            r.security_groups.clone()
        };
        check_tags(&r.tags)?;
        check_tags(&r.eni_tags)?;
        if r.private_ip.is_some() && r.max_count > 1 {
            return Err(ApiError::combination(
                "PrivateIpAddress can only be used when launching a single instance.",
            ));
        }
        let v6_count = match r.ipv6_count {
            None | Some(0) => 0,
            Some(n) if n < 0 => {
                return Err(ApiError::bad_value(
                    "Ipv6AddressCount",
                    &n.to_string(),
                    "Must be a non-negative integer.",
                ))
            }
            Some(_) if subnet.ipv6_cidr.is_none() => {
                return Err(ApiError::invalid(format!(
                    "Subnet {subnet_id} does not have an IPv6 CIDR block associated; Ipv6AddressCount cannot be used."
                )))
            }
            Some(n) if n > i64::from(limits.ipv6_per_eni) => return Err(limit_exceeded()),
            Some(n) => n as u32,
        };
        let free = i64::from(subnet.alloc.free_addresses());
        if free < r.min_count {
            return Err(insufficient_addresses(&subnet));
        }
        let n = r.max_count.min(free);
        let rid = format!("r-0{:016x}", self.rng.next_u64());
        let mut ids = Vec::new();
        for k in 0..n {
            let specific: Vec<Ipv4Addr> = if k == 0 {
                r.private_ip.into_iter().collect()
            } else {
                Vec::new()
            };
            let want = u32::from(specific.is_empty());
            let (ips, _) = self.alloc_v4(&subnet_id, &specific, want, &[], 0)?;
            let (v6, _) = match self.alloc_v6(&subnet_id, &[], v6_count, &[], 0) {
                Ok(x) => x,
                Err(e) => {
                    self.release_v4(&subnet_id, &ips, &[]);
                    return Err(e);
                }
            };
            let iid = self.new_id("i");
            let eid = self.new_id("eni");
            let aid = self.new_id("eni-attach");
            let mac = self.new_mac();
            let eni = Eni {
                id: eid.clone(),
                subnet_id: subnet_id.clone(),
                vpc_id: subnet.vpc_id.clone(),
                availability_zone: subnet.availability_zone.clone(),
                mac,
                description: String::new(),
                tags: r.eni_tags.clone(),
                status: EniStatus::InUse,
                attachment: Some(Attachment {
                    id: aid.clone(),
                    instance_id: iid.clone(),
                    device_index: 0,
                    network_card_index: limits.default_card,
                    delete_on_termination: true,
                    status: AttachStatus::Attached,
                    attach_ms: now_ms,
                    detach_done_ms: None,
                }),
                groups: groups.clone(),
                primary_ip: ips[0],
                secondary_ips: Vec::new(),
                ipv4_prefixes: Vec::new(),
                ipv6_addresses: v6,
                ipv6_prefixes: Vec::new(),
                interface_type: "interface".into(),
                trunk_association: None,
                source_dest_check: true,
                owner_id: self.config.account_id.clone(),
                created_ms: now_ms,
            };
            self.attachments.insert(aid, eid.clone());
            self.instances.insert(
                iid.clone(),
                Instance {
                    id: iid.clone(),
                    reservation_id: rid.clone(),
                    instance_type: r.instance_type.clone(),
                    limits: limits.clone(),
                    trunk: trunk.clone(),
                    image_id: r.image_id.clone(),
                    subnet_id: subnet_id.clone(),
                    vpc_id: subnet.vpc_id.clone(),
                    availability_zone: subnet.availability_zone.clone(),
                    state: InstanceState::Running,
                    launch_ms: now_ms,
                    tags: r.tags.clone(),
                    security_groups: groups.clone(),
                    primary_eni: eid.clone(),
                },
            );
            self.events.push(HookEvent::Attached(attached_event(&eni)));
            self.enis.insert(eid, eni);
            self.dirty.insert(iid.clone());
            ids.push(iid);
        }
        if let Some(t) = r.client_token {
            self.client_tokens
                .insert(("RunInstances".into(), t), ids.clone());
        }
        Ok(Reply::Reservation(self.reservation(&rid, &ids)))
    }

    fn terminate_instances(&mut self, ids: &[String]) -> Result<Reply, ApiError> {
        if ids.is_empty() {
            return Err(ApiError::missing("InstanceId"));
        }
        for id in ids {
            self.instance(id)?;
        }
        let mut changes = Vec::new();
        for id in ids {
            let prev = self
                .instances
                .get(id)
                .map_or(InstanceState::Terminated, |i| i.state);
            if prev == InstanceState::Running {
                for eni in self.instance_enis(id) {
                    if eni.interface_type == "trunk" {
                        self.drop_trunk_associations(&eni.id);
                    }
                }
                for eni in self.instance_enis(id) {
                    let Some(a) = eni.attachment.clone() else {
                        continue;
                    };
                    self.attachments.remove(&a.id);
                    if a.status == AttachStatus::Attached {
                        self.events.push(HookEvent::Detached(detached_event(&eni)));
                    }
                    if a.delete_on_termination {
                        self.remove_eni(&eni.id);
                    } else if let Some(e) = self.enis.get_mut(&eni.id) {
                        e.attachment = None;
                        e.status = EniStatus::Available;
                    }
                }
                if let Some(i) = self.instances.get_mut(id) {
                    i.state = InstanceState::Terminated;
                }
                self.dirty.insert(id.clone());
            }
            changes.push(StateChange {
                instance_id: id.clone(),
                previous: prev.code_name(),
                current: if prev == InstanceState::Running {
                    (32, "shutting-down")
                } else {
                    prev.code_name()
                },
            });
        }
        Ok(Reply::StateChanges(changes))
    }

    fn remove_eni(&mut self, id: &str) {
        if let Some(e) = self.enis.remove(id) {
            self.release_v4(
                &e.subnet_id,
                &std::iter::once(e.primary_ip)
                    .chain(e.secondary_ips.iter().copied())
                    .collect::<Vec<_>>(),
                &e.ipv4_prefixes,
            );
            self.release_v6(&e.subnet_id, &e.ipv6_addresses, &e.ipv6_prefixes);
            self.macs.remove(&e.mac);
            if let Some(a) = &e.attachment {
                self.attachments.remove(&a.id);
            }
        }
    }

    fn describe_instances(
        &self,
        ids: &[String],
        filters: &[Filter],
        page: &Page,
    ) -> Result<Reply, ApiError> {
        check_filters(filters, INSTANCE_FILTERS)?;
        if !ids.is_empty() && page.max_results.is_some() {
            return Err(ApiError::combination(
                "The parameter instancesSet cannot be used with the parameter maxResults",
            ));
        }
        let missing: Vec<&String> = ids
            .iter()
            .filter(|i| !self.instances.contains_key(*i))
            .collect();
        for id in ids {
            check_id(IdKind::Instance, id)?;
        }
        match missing.len() {
            0 => {}
            1 => return Err(ApiError::not_found(missing[0])),
            _ => {
                let list: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
                return Err(ApiError::new(
                    "InvalidInstanceID.NotFound",
                    format!("The instance IDs '{}' do not exist", list.join(", ")),
                ));
            }
        }
        let mut matched = Vec::new();
        for i in self.instances.values() {
            if !ids.is_empty() && !ids.contains(&i.id) {
                continue;
            }
            let enis = self.instance_enis(&i.id);
            if matches_all(filters, |name| instance_filter(i, &enis, name))? {
                matched.push(i.id.clone());
            }
        }
        let (page_ids, next_token) = paginate(matched, |s| s.clone(), page, 5, 1000, None)?;
        let mut reservations: Vec<ReservationView> = Vec::new();
        for id in page_ids {
            let Some(i) = self.instances.get(&id) else {
                continue;
            };
            let entry = (i.clone(), self.instance_enis(&id));
            match reservations
                .iter_mut()
                .find(|r| r.reservation_id == i.reservation_id)
            {
                Some(r) => r.instances.push(entry),
                None => reservations.push(ReservationView {
                    reservation_id: i.reservation_id.clone(),
                    owner_id: self.config.account_id.clone(),
                    instances: vec![entry],
                }),
            }
        }
        Ok(Reply::Reservations {
            reservations,
            next_token,
        })
    }

    fn describe_instance_types(
        &self,
        types: &[String],
        filters: &[Filter],
        page: &Page,
    ) -> Result<Reply, ApiError> {
        check_filters(filters, INSTANCE_TYPE_FILTERS)?;
        let cat = Catalog::embedded();
        let unknown: Vec<&str> = types
            .iter()
            .filter(|t| cat.get(t).is_none() && !self.config.limit_overrides.contains_key(*t))
            .map(|s| s.as_str())
            .collect();
        if !unknown.is_empty() {
            return Err(ApiError::new(
                "InvalidInstanceType",
                format!(
                    "The following supplied instance types do not exist: [{}]",
                    unknown.join(", ")
                ),
            ));
        }
        let mut out = Vec::new();
        let names: Vec<String> = if types.is_empty() {
            cat.iter().map(|l| l.instance_type.clone()).collect()
        } else {
            types.to_vec()
        };
        for n in names {
            let l = self.limits_for(&n)?;
            if matches_all(filters, |f| instance_type_filter(&l, f))? {
                out.push(l);
            }
        }
        let default = types.is_empty().then_some(100);
        let (types, next_token) =
            paginate(out, |l| l.instance_type.clone(), page, 5, 100, default)?;
        Ok(Reply::InstanceTypes { types, next_token })
    }

    fn describe_subnets(
        &self,
        ids: &[String],
        filters: &[Filter],
        page: &Page,
    ) -> Result<Reply, ApiError> {
        check_filters(filters, SUBNET_FILTERS)?;
        for id in ids {
            self.subnet(id)?;
        }
        let mut out = Vec::new();
        for s in self.subnets.values() {
            if !ids.is_empty() && !ids.contains(&s.id) {
                continue;
            }
            if matches_all(filters, |f| subnet_filter(s, f))? {
                out.push(self.view(s));
            }
        }
        let (subnets, next_token) = paginate(out, |s| s.id.clone(), page, 5, 1000, None)?;
        Ok(Reply::Subnets {
            subnets,
            next_token,
        })
    }

    fn describe_enis(
        &self,
        ids: &[String],
        filters: &[Filter],
        page: &Page,
    ) -> Result<Reply, ApiError> {
        check_filters(filters, ENI_FILTERS)?;
        if !ids.is_empty() && page.max_results.is_some() {
            return Err(ApiError::combination(
                "You cannot specify both MaxResults and NetworkInterfaceIds.",
            ));
        }
        for id in ids {
            self.eni(id)?;
        }
        let mut out = Vec::new();
        let candidates: Vec<&Eni> = if ids.is_empty() {
            self.enis.values().collect()
        } else {
            ids.iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter_map(|i| self.enis.get(i))
                .collect()
        };
        for e in candidates {
            if matches_all(filters, |f| eni_filter(e, f))? {
                out.push(e.clone());
            }
        }
        let (enis, next_token) = paginate(out, |e| e.id.clone(), page, 5, 1000, None)?;
        Ok(Reply::NetworkInterfaces { enis, next_token })
    }

    // ----- ENIs --------------------------------------------------------------------------------

    fn create_eni(&mut self, now_ms: u64, c: CreateEni) -> Result<Reply, ApiError> {
        if let Some(t) = &c.client_token {
            if let Some(ids) = self
                .client_tokens
                .get(&("CreateNetworkInterface".into(), t.clone()))
            {
                if let Some(e) = self.enis.get(&ids[0]) {
                    return Ok(Reply::NetworkInterface {
                        eni: e.clone(),
                        client_token: c.client_token.clone(),
                    });
                }
            }
        }
        let subnet = self.subnet(&c.subnet_id)?.clone();
        let groups = if c.groups.is_empty() {
            vec![self
                .vpcs
                .get(&subnet.vpc_id)
                .map(|v| v.default_security_group.clone())
                .unwrap_or_default()]
        } else {
            self.check_groups(&c.groups, &subnet.vpc_id)?;
            c.groups.clone()
        };
        check_tags(&c.tags)?;
        let interface_type = c
            .interface_type
            .clone()
            .unwrap_or_else(|| "interface".into());
        if !["interface", "efa", "efa-only", "trunk", "branch"].contains(&interface_type.as_str()) {
            return Err(ApiError::bad_value(
                "InterfaceType",
                &interface_type,
                "Valid values: interface, efa, efa-only, branch, trunk.",
            ));
        }
        let count = |v: Option<i64>, name: &str| -> Result<u32, ApiError> {
            match v {
                None => Ok(0),
                Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => Ok(n as u32),
                Some(n) => Err(ApiError::bad_value(
                    name,
                    &n.to_string(),
                    "Must be a non-negative integer.",
                )),
            }
        };
        let sec_count = count(c.secondary_count, "SecondaryPrivateIpAddressCount")?;
        let pfx_count = count(c.ipv4_prefix_count, "Ipv4PrefixCount")?;
        let v6_count = count(c.ipv6_count, "Ipv6AddressCount")?;
        let v6p_count = count(c.ipv6_prefix_count, "Ipv6PrefixCount")?;
        let primaries: Vec<Ipv4Addr> = c
            .private_ips
            .iter()
            .filter(|(_, p)| *p)
            .map(|(a, _)| *a)
            .chain(c.private_ip)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if primaries.len() > 1 {
            return Err(ApiError::combination(
                "Only one primary private IP address may be specified.",
            ));
        }
        let secondaries: Vec<Ipv4Addr> = c
            .private_ips
            .iter()
            .filter(|(a, p)| !*p && Some(*a) != c.private_ip)
            .map(|(a, _)| *a)
            .collect();
        let has_v4_secondaries = sec_count > 0 || !secondaries.is_empty();
        let has_v4_prefixes = pfx_count > 0 || !c.ipv4_prefixes.is_empty();
        if has_v4_secondaries && has_v4_prefixes {
            return Err(ApiError::combination(
                "You cannot specify secondary private IPv4 addresses and IPv4 prefixes in the same request.",
            ));
        }
        if pfx_count > 0 && !c.ipv4_prefixes.is_empty() {
            return Err(ApiError::combination(
                "Specify either Ipv4PrefixCount or Ipv4Prefixes, not both.",
            ));
        }
        let v4_slots = 1
            + u64::from(sec_count)
            + secondaries.len() as u64
            + u64::from(pfx_count)
            + c.ipv4_prefixes.len() as u64;
        if v4_slots > u64::from(UNATTACHED_IPV4_LIMIT) {
            return Err(limit_exceeded());
        }
        let v6_slots = u64::from(v6_count)
            + c.ipv6_addresses.len() as u64
            + u64::from(v6p_count)
            + c.ipv6_prefixes.len() as u64;
        if v6_slots > u64::from(UNATTACHED_IPV6_LIMIT) {
            return Err(limit_exceeded());
        }
        // Primary first, then secondaries and prefixes; all or nothing.
        let mut specific = primaries.clone();
        specific.extend(secondaries.iter().copied());
        let want_primary = u32::from(primaries.is_empty());
        let (mut ips, prefixes) = self.alloc_v4(
            &c.subnet_id,
            &specific,
            want_primary + sec_count,
            &c.ipv4_prefixes,
            pfx_count,
        )?;
        let (v6, v6p) = match self.alloc_v6(
            &c.subnet_id,
            &c.ipv6_addresses,
            v6_count,
            &c.ipv6_prefixes,
            v6p_count,
        ) {
            Ok(x) => x,
            Err(e) => {
                self.release_v4(&c.subnet_id, &ips, &prefixes);
                return Err(e);
            }
        };
        // The primary is the specified one or the first drawn.
        let primary = if let Some(p) = primaries.first() {
            ips.retain(|a| a != p);
            *p
        } else {
            let n = specific.len();
            ips.remove(n)
        };
        let id = self.new_id("eni");
        let mac = self.new_mac();
        let eni = Eni {
            id: id.clone(),
            subnet_id: c.subnet_id.clone(),
            vpc_id: subnet.vpc_id.clone(),
            availability_zone: subnet.availability_zone.clone(),
            mac,
            description: c.description.clone(),
            tags: c.tags.clone(),
            status: EniStatus::Available,
            attachment: None,
            groups,
            primary_ip: primary,
            secondary_ips: ips,
            ipv4_prefixes: prefixes,
            ipv6_addresses: v6,
            ipv6_prefixes: v6p,
            interface_type,
            trunk_association: None,
            source_dest_check: true,
            owner_id: self.config.account_id.clone(),
            created_ms: now_ms,
        };
        self.enis.insert(id.clone(), eni.clone());
        if let Some(t) = &c.client_token {
            self.client_tokens
                .insert(("CreateNetworkInterface".into(), t.clone()), vec![id]);
        }
        Ok(Reply::NetworkInterface {
            eni,
            client_token: c.client_token,
        })
    }

    fn attach(
        &mut self,
        now_ms: u64,
        eni_id: &str,
        instance_id: &str,
        device_index: i64,
        card: Option<i64>,
    ) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?.clone();
        let inst = self.instance(instance_id)?.clone();
        if inst.state != InstanceState::Running {
            return Err(ApiError::new(
                "IncorrectInstanceState",
                format!(
                    "The instance '{instance_id}' is not in the 'running' or 'stopped' states."
                ),
            ));
        }
        if eni.status != EniStatus::Available {
            return Err(ApiError::new(
                "InvalidNetworkInterface.InUse",
                format!("Interface: [{eni_id}] in use."),
            ));
        }
        if eni.availability_zone != inst.availability_zone || eni.vpc_id != inst.vpc_id {
            return Err(ApiError::combination(format!(
                "You may not attach a network interface to an instance if they are not in the same availability zone ({} vs {}).",
                eni.availability_zone, inst.availability_zone
            )));
        }
        let l = &inst.limits;
        let card = match card {
            None => l.default_card,
            Some(c) if (0..i64::from(l.network_cards.max(1))).contains(&c) => c as u32,
            Some(c) => {
                return Err(ApiError::bad_value(
                    "NetworkCardIndex",
                    &c.to_string(),
                    &format!(
                        "Instance type {} supports network card indexes 0 to {}.",
                        inst.instance_type,
                        l.network_cards.max(1) - 1
                    ),
                ))
            }
        };
        if !(0..=i64::from(u16::MAX)).contains(&device_index) {
            return Err(ApiError::bad_value(
                "DeviceIndex",
                &device_index.to_string(),
                "Device index must be non-negative.",
            ));
        }
        let device_index = device_index as u32;
        let attached = self.instance_enis(instance_id);
        if attached.iter().any(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| a.network_card_index == card && a.device_index == device_index)
        }) {
            return Err(ApiError::invalid(format!(
                "Instance '{instance_id}' already has an interface attached at device index '{device_index}'."
            )));
        }
        let on_card = attached
            .iter()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| a.network_card_index == card)
            })
            .count() as u32;
        if on_card >= card_max_enis(l, card) || attached.len() as u32 >= l.max_enis_total {
            return Err(ApiError::new(
                "AttachmentLimitExceeded",
                format!(
                    "Interface count {} exceeds the limit for {}",
                    attached.len() + 1,
                    inst.instance_type
                ),
            ));
        }
        if eni.ipv4_slots() > l.ipv4_per_eni || eni.ipv6_slots() > l.ipv6_per_eni {
            return Err(limit_exceeded());
        }
        if (!eni.ipv4_prefixes.is_empty() || !eni.ipv6_prefixes.is_empty())
            && !l.supports_prefix_delegation()
        {
            return Err(ApiError::invalid(format!(
                "Prefix delegation is not supported for instance type {}.",
                inst.instance_type
            )));
        }
        if eni.interface_type == "branch" {
            return Err(ApiError::invalid(format!(
                "Network interface {eni_id} is a branch interface; associate it with a trunk interface (AssociateTrunkInterface) instead of attaching it."
            )));
        }
        if eni.interface_type == "trunk" {
            if !inst.trunk.trunking_compatible {
                return Err(ApiError::new(
                    "UnsupportedOperation",
                    format!(
                        "Instance type {} does not support trunk network interfaces.",
                        inst.instance_type
                    ),
                ));
            }
            if let Some(other) = attached.iter().find(|e| e.interface_type == "trunk") {
                return Err(ApiError::invalid(format!(
                    "Instance '{instance_id}' already has trunk interface {} attached; an instance takes one trunk interface.",
                    other.id
                )));
            }
        }
        let aid = self.new_id("eni-attach");
        let a = Attachment {
            id: aid.clone(),
            instance_id: instance_id.to_owned(),
            device_index,
            network_card_index: card,
            delete_on_termination: false,
            status: AttachStatus::Attached,
            attach_ms: now_ms,
            detach_done_ms: None,
        };
        self.attachments.insert(aid.clone(), eni_id.to_owned());
        let Some(e) = self.enis.get_mut(eni_id) else {
            return Err(ApiError::not_found(eni_id));
        };
        e.attachment = Some(a);
        e.status = EniStatus::InUse;
        let ev = attached_event(e);
        self.events.push(HookEvent::Attached(ev));
        self.dirty.insert(instance_id.to_owned());
        Ok(Reply::Attached {
            attachment_id: aid,
            network_card_index: card,
        })
    }

    fn detach(
        &mut self,
        now_ms: u64,
        attachment_id: &str,
        _force: bool,
    ) -> Result<Reply, ApiError> {
        check_id(IdKind::Attachment, attachment_id)?;
        let eni_id = self
            .attachments
            .get(attachment_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(attachment_id))?;
        let eni = self.eni(&eni_id)?.clone();
        let Some(a) = eni.attachment.clone() else {
            return Err(ApiError::not_found(attachment_id));
        };
        if a.device_index == 0 && a.network_card_index == 0 {
            return Err(ApiError::new(
                "OperationNotPermitted",
                "The network interface at device index 0 and networkCard index 0 cannot be detached.",
            ));
        }
        if a.status == AttachStatus::Detaching {
            return Ok(Reply::Done);
        }
        if eni.interface_type == "trunk" {
            self.drop_trunk_associations(&eni_id);
        }
        self.events.push(HookEvent::Detached(detached_event(&eni)));
        self.dirty.insert(a.instance_id.clone());
        let delay = self.config.detach_delay_ms;
        let Some(e) = self.enis.get_mut(&eni_id) else {
            return Err(ApiError::not_found(&eni_id));
        };
        if delay == 0 {
            e.attachment = None;
            e.status = EniStatus::Available;
            self.attachments.remove(attachment_id);
        } else if let Some(att) = e.attachment.as_mut() {
            att.status = AttachStatus::Detaching;
            att.detach_done_ms = Some(now_ms + delay);
        }
        Ok(Reply::Done)
    }

    fn delete_eni(&mut self, eni_id: &str) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?;
        if eni.status != EniStatus::Available {
            return Err(ApiError::new(
                "InvalidNetworkInterface.InUse",
                format!("Network interface '{eni_id}' is currently in use."),
            ));
        }
        self.remove_eni(eni_id);
        Ok(Reply::Done)
    }

    fn modify_eni(&mut self, eni_id: &str, change: EniAttribute) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?.clone();
        match &change {
            EniAttribute::DeleteOnTermination { attachment_id, .. } => {
                check_id(IdKind::Attachment, attachment_id)?;
                if eni.attachment.as_ref().map(|a| a.id.as_str()) != Some(attachment_id.as_str()) {
                    return Err(ApiError::not_found(attachment_id));
                }
            }
            EniAttribute::Groups(g) => {
                if g.is_empty() {
                    return Err(ApiError::missing("SecurityGroupId"));
                }
                self.check_groups(g, &eni.vpc_id)?;
            }
            EniAttribute::Description(_) | EniAttribute::SourceDestCheck(_) => {}
        }
        let Some(e) = self.enis.get_mut(eni_id) else {
            return Err(ApiError::not_found(eni_id));
        };
        match change {
            EniAttribute::DeleteOnTermination { value, .. } => {
                if let Some(a) = e.attachment.as_mut() {
                    a.delete_on_termination = value;
                }
            }
            EniAttribute::Groups(g) => e.groups = g,
            EniAttribute::Description(d) => e.description = d,
            EniAttribute::SourceDestCheck(v) => e.source_dest_check = v,
        }
        self.mark_dirty(eni_id);
        Ok(Reply::Done)
    }

    fn assign_private(
        &mut self,
        eni_id: &str,
        count: Option<i64>,
        addresses: Vec<Ipv4Addr>,
        prefix_count: Option<i64>,
        prefixes: Vec<Ipv4Cidr>,
    ) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?.clone();
        let kinds = [
            count.is_some(),
            !addresses.is_empty(),
            prefix_count.is_some(),
            !prefixes.is_empty(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            0 => {
                return Err(ApiError::missing(
                    "SecondaryPrivateIpAddressCount, PrivateIpAddress, Ipv4PrefixCount or Ipv4Prefix",
                ))
            }
            1 => {}
            _ => {
                return Err(ApiError::combination(
                    "Specify only one of SecondaryPrivateIpAddressCount, PrivateIpAddresses, Ipv4PrefixCount and Ipv4Prefixes.",
                ))
            }
        }
        let n = match count.or(prefix_count) {
            Some(n) if n >= 1 => n as u64,
            Some(n) => {
                let p = if count.is_some() {
                    "SecondaryPrivateIpAddressCount"
                } else {
                    "Ipv4PrefixCount"
                };
                return Err(ApiError::bad_value(
                    p,
                    &n.to_string(),
                    "Must be at least 1.",
                ));
            }
            None => (addresses.len() + prefixes.len()) as u64,
        };
        if u64::from(eni.ipv4_slots()) + n > u64::from(self.ipv4_limit(&eni)) {
            return Err(limit_exceeded());
        }
        if prefix_count.is_some() || !prefixes.is_empty() {
            self.prefix_delegation_ok(&eni)?;
        }
        let (ips, pfx) = self.alloc_v4(
            &eni.subnet_id,
            &addresses,
            count.map_or(0, |_| n as u32),
            &prefixes,
            prefix_count.map_or(0, |_| n as u32),
        )?;
        let Some(e) = self.enis.get_mut(eni_id) else {
            return Err(ApiError::not_found(eni_id));
        };
        e.secondary_ips.extend(ips.iter().copied());
        e.ipv4_prefixes.extend(pfx.iter().copied());
        let instance_id = e.instance_id().map(str::to_owned);
        self.events
            .push(HookEvent::Assigned(crate::hooks::AddressesChanged {
                eni_id: eni_id.to_owned(),
                instance_id,
                mac: eni.mac.clone(),
                addresses: AddressSet {
                    ipv4: ips.clone(),
                    ipv4_prefixes: pfx.clone(),
                    ..Default::default()
                },
            }));
        self.mark_dirty(eni_id);
        Ok(Reply::AssignedPrivate {
            eni_id: eni_id.to_owned(),
            addresses: ips,
            prefixes: pfx,
        })
    }

    fn unassign_private(
        &mut self,
        eni_id: &str,
        addresses: &[Ipv4Addr],
        prefixes: &[Ipv4Cidr],
    ) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?.clone();
        match (addresses.is_empty(), prefixes.is_empty()) {
            (true, true) => return Err(ApiError::missing("PrivateIpAddress or Ipv4Prefix")),
            (false, false) => {
                return Err(ApiError::combination(
                    "Specify either PrivateIpAddresses or Ipv4Prefixes, not both.",
                ))
            }
            _ => {}
        }
        if addresses.contains(&eni.primary_ip) {
            return Err(ApiError::invalid(format!(
                "The primary private IP address {} of network interface {eni_id} cannot be unassigned.",
                eni.primary_ip
            )));
        }
        let missing_ip = addresses.iter().any(|a| !eni.secondary_ips.contains(a));
        let missing_pfx = prefixes.iter().any(|p| !eni.ipv4_prefixes.contains(p));
        if missing_ip || missing_pfx {
            return Err(ApiError::invalid(format!(
                "Some of the specified addresses are not assigned to interface {eni_id}"
            )));
        }
        let addrs: Vec<Ipv4Addr> = addresses
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let pfx: Vec<Ipv4Cidr> = prefixes
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.release_v4(&eni.subnet_id, &addrs, &pfx);
        let Some(e) = self.enis.get_mut(eni_id) else {
            return Err(ApiError::not_found(eni_id));
        };
        e.secondary_ips.retain(|a| !addrs.contains(a));
        e.ipv4_prefixes.retain(|p| !pfx.contains(p));
        let instance_id = e.instance_id().map(str::to_owned);
        self.events
            .push(HookEvent::Unassigned(crate::hooks::AddressesChanged {
                eni_id: eni_id.to_owned(),
                instance_id,
                mac: eni.mac.clone(),
                addresses: AddressSet {
                    ipv4: addrs,
                    ipv4_prefixes: pfx,
                    ..Default::default()
                },
            }));
        self.mark_dirty(eni_id);
        Ok(Reply::Done)
    }

    fn assign_ipv6(
        &mut self,
        eni_id: &str,
        count: Option<i64>,
        addresses: Vec<Ipv6Addr>,
        prefix_count: Option<i64>,
        prefixes: Vec<Ipv6Block>,
    ) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?.clone();
        let kinds = [
            count.is_some(),
            !addresses.is_empty(),
            prefix_count.is_some(),
            !prefixes.is_empty(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            0 => return Err(ApiError::missing("Ipv6AddressCount, Ipv6Addresses, Ipv6PrefixCount or Ipv6Prefix")),
            1 => {}
            _ => {
                return Err(ApiError::combination(
                    "Specify only one of Ipv6AddressCount, Ipv6Addresses, Ipv6PrefixCount and Ipv6Prefixes.",
                ))
            }
        }
        let n = match count.or(prefix_count) {
            Some(n) if n >= 1 => n as u64,
            Some(n) => {
                let p = if count.is_some() {
                    "Ipv6AddressCount"
                } else {
                    "Ipv6PrefixCount"
                };
                return Err(ApiError::bad_value(
                    p,
                    &n.to_string(),
                    "Must be at least 1.",
                ));
            }
            None => (addresses.len() + prefixes.len()) as u64,
        };
        if prefix_count.is_some() || !prefixes.is_empty() {
            self.prefix_delegation_ok(&eni)?;
        }
        if u64::from(eni.ipv6_slots()) + n > u64::from(self.ipv6_limit(&eni)) {
            return Err(limit_exceeded());
        }
        let (a6, p6) = self.alloc_v6(
            &eni.subnet_id,
            &addresses,
            count.map_or(0, |_| n as u32),
            &prefixes,
            prefix_count.map_or(0, |_| n as u32),
        )?;
        let Some(e) = self.enis.get_mut(eni_id) else {
            return Err(ApiError::not_found(eni_id));
        };
        e.ipv6_addresses.extend(a6.iter().copied());
        e.ipv6_prefixes.extend(p6.iter().copied());
        let instance_id = e.instance_id().map(str::to_owned);
        self.events
            .push(HookEvent::Assigned(crate::hooks::AddressesChanged {
                eni_id: eni_id.to_owned(),
                instance_id,
                mac: eni.mac.clone(),
                addresses: AddressSet {
                    ipv6: a6.clone(),
                    ipv6_prefixes: p6.clone(),
                    ..Default::default()
                },
            }));
        self.mark_dirty(eni_id);
        Ok(Reply::AssignedIpv6 {
            eni_id: eni_id.to_owned(),
            addresses: a6,
            prefixes: p6,
        })
    }

    fn unassign_ipv6(
        &mut self,
        eni_id: &str,
        addresses: &[Ipv6Addr],
        prefixes: &[Ipv6Block],
    ) -> Result<Reply, ApiError> {
        let eni = self.eni(eni_id)?.clone();
        if addresses.is_empty() && prefixes.is_empty() {
            return Err(ApiError::missing("Ipv6Addresses or Ipv6Prefix"));
        }
        if addresses.iter().any(|a| !eni.ipv6_addresses.contains(a))
            || prefixes.iter().any(|p| !eni.ipv6_prefixes.contains(p))
        {
            return Err(ApiError::invalid(format!(
                "Some of the specified addresses are not assigned to interface {eni_id}"
            )));
        }
        let a6: Vec<Ipv6Addr> = addresses
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let p6: Vec<Ipv6Block> = prefixes
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.release_v6(&eni.subnet_id, &a6, &p6);
        let Some(e) = self.enis.get_mut(eni_id) else {
            return Err(ApiError::not_found(eni_id));
        };
        e.ipv6_addresses.retain(|a| !a6.contains(a));
        e.ipv6_prefixes.retain(|p| !p6.contains(p));
        let instance_id = e.instance_id().map(str::to_owned);
        self.events
            .push(HookEvent::Unassigned(crate::hooks::AddressesChanged {
                eni_id: eni_id.to_owned(),
                instance_id,
                mac: eni.mac.clone(),
                addresses: AddressSet {
                    ipv6: a6.clone(),
                    ipv6_prefixes: p6.clone(),
                    ..Default::default()
                },
            }));
        self.mark_dirty(eni_id);
        Ok(Reply::UnassignedIpv6 {
            eni_id: eni_id.to_owned(),
            addresses: a6,
            prefixes: p6,
        })
    }

    // ----- trunk and branch ENIs (security groups for pods) ------------------------------------

    fn branch_event(&self, a: &TrunkAssociation) -> Option<BranchAssociated> {
        let trunk = self.enis.get(&a.trunk_id)?;
        let branch = self.enis.get(&a.branch_id)?;
        Some(BranchAssociated {
            instance_id: trunk.instance_id().unwrap_or_default().to_owned(),
            association_id: a.id.clone(),
            trunk_eni_id: trunk.id.clone(),
            trunk_mac: trunk.mac.clone(),
            branch_eni_id: branch.id.clone(),
            branch_mac: branch.mac.clone(),
            vlan_id: a.vlan_id.unwrap_or(0),
            subnet_id: branch.subnet_id.clone(),
            addresses: branch.addresses(),
        })
    }

    /// Ends association `id`: the branch becomes `available` again with its former type.
    fn end_association(&mut self, id: &str) {
        let Some(a) = self.trunk_associations.get(id).cloned() else {
            return;
        };
        if let Some(ev) = self.branch_event(&a) {
            self.events.push(HookEvent::BranchDisassociated(ev));
        }
        self.trunk_associations.remove(id);
        if let Some(b) = self.enis.get_mut(&a.branch_id) {
            b.trunk_association = None;
            b.status = EniStatus::Available;
            b.interface_type = a.branch_type_before.clone();
        }
        self.mark_dirty(&a.trunk_id);
    }

    /// Ends every association of trunk `trunk_id` (its detach or its instance's termination).
    fn drop_trunk_associations(&mut self, trunk_id: &str) {
        let ids: Vec<String> = self
            .trunk_associations
            .values()
            .filter(|a| a.trunk_id == trunk_id)
            .map(|a| a.id.clone())
            .collect();
        for id in ids {
            self.end_association(&id);
        }
    }

    /// Associations of trunk `trunk_id`.
    pub fn trunk_branches(&self, trunk_id: &str) -> Vec<&TrunkAssociation> {
        self.trunk_associations
            .values()
            .filter(|a| a.trunk_id == trunk_id)
            .collect()
    }

    fn associate_trunk(
        &mut self,
        branch_id: &str,
        trunk_id: &str,
        vlan_id: Option<i64>,
        gre_key: Option<i64>,
        client_token: Option<String>,
    ) -> Result<Reply, ApiError> {
        if let Some(t) = &client_token {
            if let Some(ids) = self
                .client_tokens
                .get(&("AssociateTrunkInterface".into(), t.clone()))
            {
                if let Some(a) = self.trunk_associations.get(&ids[0]) {
                    return Ok(Reply::TrunkAssociated {
                        association: a.clone(),
                        client_token,
                    });
                }
            }
        }
        let (protocol, vlan, gre) = match (vlan_id, gre_key) {
            (Some(_), Some(_)) => {
                return Err(ApiError::combination(
                    "Specify either VlanId (VLAN protocol) or GreKey (GRE protocol), not both.",
                ))
            }
            (None, None) => return Err(ApiError::missing("VlanId")),
            (Some(v), None) if VLAN_IDS.contains(&v) => {
                (InterfaceProtocol::Vlan, Some(v as u32), None)
            }
            (Some(v), None) => {
                return Err(ApiError::bad_value(
                    "VlanId",
                    &v.to_string(),
                    "VLAN ids range from 1 to 4094.",
                ))
            }
            (None, Some(k)) if (0..=i64::from(u32::MAX)).contains(&k) => {
                (InterfaceProtocol::Gre, None, Some(k as u32))
            }
            (None, Some(k)) => {
                return Err(ApiError::bad_value(
                    "GreKey",
                    &k.to_string(),
                    "Must be a non-negative 32-bit integer.",
                ))
            }
        };
        let trunk = self.eni(trunk_id)?.clone();
        let branch = self.eni(branch_id)?.clone();
        if trunk.interface_type != "trunk" {
            return Err(ApiError::bad_value(
                "TrunkInterfaceId",
                trunk_id,
                &format!(
                    "Network interface {trunk_id} is of type '{}', not a trunk interface.",
                    trunk.interface_type
                ),
            ));
        }
        if branch_id == trunk_id
            || !["interface", "branch"].contains(&branch.interface_type.as_str())
        {
            return Err(ApiError::bad_value(
                "BranchInterfaceId",
                branch_id,
                &format!(
                    "Network interface {branch_id} of type '{}' cannot be a branch interface.",
                    branch.interface_type
                ),
            ));
        }
        let Some(att) = trunk
            .attachment
            .as_ref()
            .filter(|a| a.status == AttachStatus::Attached)
        else {
            return Err(ApiError::new(
                "IncorrectState",
                format!("Trunk interface {trunk_id} is not attached to an instance."),
            ));
        };
        let inst = self.instance(&att.instance_id)?.clone();
        if branch.status != EniStatus::Available || branch.trunk_association.is_some() {
            return Err(ApiError::new(
                "InvalidNetworkInterface.InUse",
                format!("Interface: [{branch_id}] in use."),
            ));
        }
        if branch.vpc_id != trunk.vpc_id || branch.availability_zone != trunk.availability_zone {
            return Err(ApiError::combination(format!(
                "Branch interface {branch_id} and trunk interface {trunk_id} must be in the same VPC and availability zone ({} vs {}).",
                branch.availability_zone, trunk.availability_zone
            )));
        }
        let on_trunk = self.trunk_branches(trunk_id);
        if let Some(v) = vlan {
            if let Some(other) = on_trunk.iter().find(|a| a.vlan_id == Some(v)) {
                return Err(ApiError::bad_value(
                    "VlanId",
                    &v.to_string(),
                    &format!(
                        "VLAN id {v} is already in use on trunk interface {trunk_id} by {}.",
                        other.branch_id
                    ),
                ));
            }
        }
        if let Some(k) = gre {
            if on_trunk.iter().any(|a| a.gre_key == Some(k)) {
                return Err(ApiError::bad_value(
                    "GreKey",
                    &k.to_string(),
                    &format!("GRE key {k} is already in use on trunk interface {trunk_id}."),
                ));
            }
        }
        let limit = inst.trunk.usable_branches();
        if on_trunk.len() as u32 >= limit {
            return Err(ApiError::new(
                "InvalidParameterValue",
                format!(
                    "Branch interface limit reached: trunk interface {trunk_id} on instance type {} carries at most {limit} branch interfaces.",
                    inst.instance_type
                ),
            ));
        }
        let id = self.new_id("trunk-assoc");
        let a = TrunkAssociation {
            id: id.clone(),
            branch_id: branch_id.to_owned(),
            trunk_id: trunk_id.to_owned(),
            protocol,
            vlan_id: vlan,
            gre_key: gre,
            tags: Tags::new(),
            branch_type_before: branch.interface_type.clone(),
        };
        if let Some(b) = self.enis.get_mut(branch_id) {
            b.trunk_association = Some(id.clone());
            b.status = EniStatus::InUse;
            b.interface_type = "branch".into();
        }
        self.trunk_associations.insert(id.clone(), a.clone());
        if let Some(ev) = self.branch_event(&a) {
            self.events.push(HookEvent::BranchAssociated(ev));
        }
        self.dirty.insert(inst.id.clone());
        if let Some(t) = &client_token {
            self.client_tokens
                .insert(("AssociateTrunkInterface".into(), t.clone()), vec![id]);
        }
        Ok(Reply::TrunkAssociated {
            association: a,
            client_token,
        })
    }

    fn disassociate_trunk(
        &mut self,
        association_id: &str,
        client_token: Option<String>,
    ) -> Result<Reply, ApiError> {
        if let Some(t) = &client_token {
            if self
                .client_tokens
                .contains_key(&("DisassociateTrunkInterface".into(), t.clone()))
            {
                return Ok(Reply::TrunkDisassociated { client_token });
            }
        }
        check_id(IdKind::TrunkAssociation, association_id)?;
        if !self.trunk_associations.contains_key(association_id) {
            return Err(ApiError::not_found(association_id));
        }
        self.end_association(association_id);
        if let Some(t) = &client_token {
            self.client_tokens.insert(
                ("DisassociateTrunkInterface".into(), t.clone()),
                vec![association_id.to_owned()],
            );
        }
        Ok(Reply::TrunkDisassociated { client_token })
    }

    fn describe_trunk_associations(
        &self,
        ids: &[String],
        filters: &[Filter],
        page: &Page,
    ) -> Result<Reply, ApiError> {
        check_filters(filters, TRUNK_ASSOCIATION_FILTERS)?;
        for id in ids {
            check_id(IdKind::TrunkAssociation, id)?;
            if !self.trunk_associations.contains_key(id) {
                return Err(ApiError::not_found(id));
            }
        }
        let mut out = Vec::new();
        for a in self.trunk_associations.values() {
            if !ids.is_empty() && !ids.contains(&a.id) {
                continue;
            }
            if matches_all(filters, |f| trunk_association_filter(a, f))? {
                out.push(a.clone());
            }
        }
        let (associations, next_token) = paginate(out, |a| a.id.clone(), page, 5, 255, None)?;
        Ok(Reply::TrunkAssociations {
            associations,
            next_token,
        })
    }

    // ----- tags --------------------------------------------------------------------------------

    fn tags_of(&self, id: &str) -> Option<&Tags> {
        match id_kind(id)? {
            IdKind::Vpc => self.vpcs.get(id).map(|r| &r.tags),
            IdKind::Subnet => self.subnets.get(id).map(|r| &r.tags),
            IdKind::SecurityGroup => self.security_groups.get(id).map(|r| &r.tags),
            IdKind::Instance => self.instances.get(id).map(|r| &r.tags),
            IdKind::Eni => self.enis.get(id).map(|r| &r.tags),
            IdKind::TrunkAssociation => self.trunk_associations.get(id).map(|r| &r.tags),
            IdKind::Attachment => None,
        }
    }

    fn tags_mut(&mut self, id: &str) -> Option<&mut Tags> {
        match id_kind(id)? {
            IdKind::Vpc => self.vpcs.get_mut(id).map(|r| &mut r.tags),
            IdKind::Subnet => self.subnets.get_mut(id).map(|r| &mut r.tags),
            IdKind::SecurityGroup => self.security_groups.get_mut(id).map(|r| &mut r.tags),
            IdKind::Instance => self.instances.get_mut(id).map(|r| &mut r.tags),
            IdKind::Eni => self.enis.get_mut(id).map(|r| &mut r.tags),
            IdKind::TrunkAssociation => self.trunk_associations.get_mut(id).map(|r| &mut r.tags),
            IdKind::Attachment => None,
        }
    }

    fn check_resources(&self, ids: &[String]) -> Result<(), ApiError> {
        if ids.is_empty() {
            return Err(ApiError::missing("ResourceId"));
        }
        for id in ids {
            if id_kind(id).is_none() || id_kind(id) == Some(IdKind::Attachment) {
                return Err(ApiError::new(
                    "InvalidID",
                    format!("The ID '{id}' is not valid"),
                ));
            }
            if self.tags_of(id).is_none() {
                return Err(ApiError::not_found(id));
            }
        }
        Ok(())
    }

    fn create_tags(&mut self, ids: &[String], tags: Tags) -> Result<Reply, ApiError> {
        self.check_resources(ids)?;
        if tags.is_empty() {
            return Err(ApiError::missing("Tag"));
        }
        check_tags(&tags)?;
        for id in ids {
            let cur = self.tags_of(id).map_or(0, |t| t.len());
            let new = tags
                .keys()
                .filter(|k| self.tags_of(id).is_some_and(|t| !t.contains_key(*k)))
                .count();
            if cur + new > MAX_TAGS {
                return Err(ApiError::new(
                    "TagLimitExceeded",
                    format!("The maximum number of Tags for a resource has been reached ({id})."),
                ));
            }
        }
        for id in ids {
            if let Some(t) = self.tags_mut(id) {
                t.extend(tags.clone());
            }
        }
        Ok(Reply::Done)
    }

    fn delete_tags(
        &mut self,
        ids: &[String],
        tags: &[(String, Option<String>)],
    ) -> Result<Reply, ApiError> {
        self.check_resources(ids)?;
        for (k, _) in tags {
            if k.starts_with("aws:") {
                return Err(ApiError::invalid(format!(
                    "Tag keys starting with 'aws:' are reserved for internal use ({k})."
                )));
            }
        }
        for id in ids {
            if let Some(t) = self.tags_mut(id) {
                if tags.is_empty() {
                    t.clear();
                }
                for (k, v) in tags {
                    if v.as_ref().is_none_or(|v| t.get(k) == Some(v)) {
                        t.remove(k);
                    }
                }
            }
        }
        Ok(Reply::Done)
    }
}

fn insufficient_addresses(s: &Subnet) -> ApiError {
    ApiError::new(
        "InsufficientFreeAddressesInSubnet",
        format!(
            "The specified subnet {} does not have enough free addresses to satisfy the request.",
            s.id
        ),
    )
}

fn limit_exceeded() -> ApiError {
    ApiError::new(
        "PrivateIpAddressLimitExceeded",
        "Number of private addresses will exceed limit.",
    )
}

fn check_tags(tags: &Tags) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::new(
            "TagLimitExceeded",
            "The maximum number of Tags for a resource has been reached.",
        ));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(ApiError::bad_value(
                "Tag.Key",
                k,
                "Tag keys must be 1 to 128 characters.",
            ));
        }
        if k.starts_with("aws:") {
            return Err(ApiError::invalid(format!(
                "Tag keys starting with 'aws:' are reserved for internal use ({k})."
            )));
        }
        if v.chars().count() > 256 {
            return Err(ApiError::bad_value(
                "Tag.Value",
                v,
                "Tag values may be at most 256 characters.",
            ));
        }
    }
    Ok(())
}

fn attached_event(e: &Eni) -> crate::hooks::EniAttached {
    let a = e.attachment.as_ref();
    crate::hooks::EniAttached {
        instance_id: a.map(|a| a.instance_id.clone()).unwrap_or_default(),
        eni_id: e.id.clone(),
        mac: e.mac.clone(),
        device_index: a.map_or(0, |a| a.device_index),
        network_card_index: a.map_or(0, |a| a.network_card_index),
        subnet_id: e.subnet_id.clone(),
        addresses: e.addresses(),
    }
}

fn detached_event(e: &Eni) -> crate::hooks::EniDetached {
    let a = e.attachment.as_ref();
    crate::hooks::EniDetached {
        instance_id: a.map(|a| a.instance_id.clone()).unwrap_or_default(),
        eni_id: e.id.clone(),
        mac: e.mac.clone(),
        device_index: a.map_or(0, |a| a.device_index),
        network_card_index: a.map_or(0, |a| a.network_card_index),
        addresses: e.addresses(),
    }
}

// ----- filters and pagination ------------------------------------------------------------------

/// Filters `DescribeNetworkInterfaces` accepts (plus `tag:KEY`).
pub const ENI_FILTERS: &[&str] = &[
    "attachment.instance-id",
    "attachment.status",
    "attachment.device-index",
    "attachment.attachment-id",
    "attachment.network-card-index",
    "attachment.delete-on-termination",
    "tag-key",
    "tag-value",
    "status",
    "vpc-id",
    "subnet-id",
    "availability-zone",
    "network-interface-id",
    "description",
    "mac-address",
    "private-ip-address",
    "addresses.private-ip-address",
    "group-id",
    "interface-type",
    "owner-id",
    "ipv6-addresses.ipv6-address",
];
/// Filters `DescribeTrunkInterfaceAssociations` accepts (plus `tag:KEY`).
pub const TRUNK_ASSOCIATION_FILTERS: &[&str] = &[
    "trunk-interface-association.association-id",
    "trunk-interface-association.branch-interface-id",
    "trunk-interface-association.trunk-interface-id",
    "trunk-interface-association.vlan-id",
    "trunk-interface-association.gre-key",
    "trunk-interface-association.interface-protocol",
    "association-id",
    "branch-interface-id",
    "trunk-interface-id",
    "vlan-id",
    "gre-key",
    "interface-protocol",
    "tag-key",
    "tag-value",
];
/// Filters `DescribeVpcs` accepts (plus `tag:KEY`).
pub const VPC_FILTERS: &[&str] = &[
    "vpc-id",
    "cidr",
    "cidr-block-association.cidr-block",
    "ipv6-cidr-block-association.ipv6-cidr-block",
    "ipv6-cidr-block-association.association-id",
    "ipv6-cidr-block-association.state",
    "ipv6-cidr-block-association.ipv6-pool",
    "is-default",
    "owner-id",
    "state",
    "tag-key",
    "tag-value",
];
/// Filters `DescribeSubnets` accepts (plus `tag:KEY`).
pub const SUBNET_FILTERS: &[&str] = &[
    "vpc-id",
    "availability-zone",
    "subnet-id",
    "cidr-block",
    "ipv6-cidr-block-association.ipv6-cidr-block",
    "ipv6-cidr-block-association.association-id",
    "ipv6-cidr-block-association.state",
    "ipv6-native",
    "state",
    "tag-key",
    "tag-value",
    "owner-id",
];
/// Filters `DescribeInstances` accepts (plus `tag:KEY`).
pub const INSTANCE_FILTERS: &[&str] = &[
    "instance-id",
    "instance-type",
    "instance-state-name",
    "instance-state-code",
    "subnet-id",
    "vpc-id",
    "availability-zone",
    "private-ip-address",
    "network-interface.network-interface-id",
    "ipv6-address",
    "network-interface.ipv6-addresses.ipv6-address",
    "tag-key",
    "tag-value",
];
/// Filters `DescribeInstanceTypes` accepts.
pub const INSTANCE_TYPE_FILTERS: &[&str] = &["instance-type", "hypervisor", "bare-metal"];

fn check_filters(filters: &[Filter], known: &[&str]) -> Result<(), ApiError> {
    for f in filters {
        let tag = f.name.strip_prefix("tag:").is_some_and(|k| !k.is_empty());
        if !tag && !known.contains(&f.name.as_str()) {
            return Err(ApiError::new(
                "InvalidParameterValue",
                format!("The filter '{}' is invalid", f.name),
            ));
        }
    }
    Ok(())
}

fn tag_filter(tags: &Tags, name: &str) -> Option<Vec<String>> {
    if let Some(k) = name.strip_prefix("tag:") {
        return Some(tags.get(k).cloned().into_iter().collect());
    }
    match name {
        "tag-key" => Some(tags.keys().cloned().collect()),
        "tag-value" => Some(tags.values().cloned().collect()),
        _ => None,
    }
}

fn eni_filter(e: &Eni, name: &str) -> Vec<String> {
    if let Some(v) = tag_filter(&e.tags, name) {
        return v;
    }
    let a = e.attachment.as_ref();
    let one = |s: String| vec![s];
    match name {
        "attachment.instance-id" => a.map(|a| a.instance_id.clone()).into_iter().collect(),
        "attachment.status" => a
            .map(|a| a.status.as_str().to_owned())
            .into_iter()
            .collect(),
        "attachment.device-index" => a.map(|a| a.device_index.to_string()).into_iter().collect(),
        "attachment.attachment-id" => a.map(|a| a.id.clone()).into_iter().collect(),
        "attachment.network-card-index" => a
            .map(|a| a.network_card_index.to_string())
            .into_iter()
            .collect(),
        "attachment.delete-on-termination" => a
            .map(|a| a.delete_on_termination.to_string())
            .into_iter()
            .collect(),
        "status" => one(e.status.as_str().into()),
        "vpc-id" => one(e.vpc_id.clone()),
        "subnet-id" => one(e.subnet_id.clone()),
        "availability-zone" => one(e.availability_zone.clone()),
        "network-interface-id" => one(e.id.clone()),
        "description" => one(e.description.clone()),
        "mac-address" => one(e.mac.clone()),
        "private-ip-address" | "addresses.private-ip-address" => std::iter::once(e.primary_ip)
            .chain(e.secondary_ips.iter().copied())
            .map(|a| a.to_string())
            .collect(),
        "group-id" => e.groups.clone(),
        "interface-type" => one(e.interface_type.clone()),
        "owner-id" => one(e.owner_id.clone()),
        "ipv6-addresses.ipv6-address" => e.ipv6_addresses.iter().map(|a| a.to_string()).collect(),
        _ => Vec::new(),
    }
}

fn trunk_association_filter(a: &TrunkAssociation, name: &str) -> Vec<String> {
    if let Some(v) = tag_filter(&a.tags, name) {
        return v;
    }
    match name.trim_start_matches("trunk-interface-association.") {
        "association-id" => vec![a.id.clone()],
        "branch-interface-id" => vec![a.branch_id.clone()],
        "trunk-interface-id" => vec![a.trunk_id.clone()],
        "vlan-id" => a.vlan_id.iter().map(|v| v.to_string()).collect(),
        "gre-key" => a.gre_key.iter().map(|v| v.to_string()).collect(),
        "interface-protocol" => vec![a.protocol.as_str().to_owned()],
        _ => Vec::new(),
    }
}

fn subnet_filter(s: &Subnet, name: &str) -> Vec<String> {
    if let Some(v) = tag_filter(&s.tags, name) {
        return v;
    }
    match name {
        "vpc-id" => vec![s.vpc_id.clone()],
        "availability-zone" => vec![s.availability_zone.clone()],
        "subnet-id" => vec![s.id.clone()],
        "cidr-block" => vec![s.cidr.to_string()],
        "state" => vec!["available".into()],
        "ipv6-cidr-block-association.ipv6-cidr-block" => {
            s.ipv6_cidr.iter().map(|b| b.to_string()).collect()
        }
        "ipv6-cidr-block-association.association-id" => s
            .ipv6_cidr
            .iter()
            .map(|_| subnet_ipv6_association_id(&s.id))
            .collect(),
        "ipv6-cidr-block-association.state" => {
            s.ipv6_cidr.iter().map(|_| "associated".into()).collect()
        }
        "ipv6-native" => vec!["false".into()],
        _ => Vec::new(),
    }
}

fn vpc_filter(v: &Vpc, name: &str) -> Vec<String> {
    if let Some(t) = tag_filter(&v.tags, name) {
        return t;
    }
    let v6 = |f: &dyn Fn(&Ipv6Block) -> String| v.ipv6_cidr.iter().map(f).collect::<Vec<_>>();
    match name {
        "vpc-id" => vec![v.id.clone()],
        "cidr" | "cidr-block-association.cidr-block" => vec![v.cidr.to_string()],
        "ipv6-cidr-block-association.ipv6-cidr-block" => v6(&|b| b.to_string()),
        "ipv6-cidr-block-association.association-id" => v6(&|_| vpc_ipv6_association_id(&v.id)),
        "ipv6-cidr-block-association.state" => v6(&|_| "associated".into()),
        "ipv6-cidr-block-association.ipv6-pool" => v6(&|_| "Amazon".into()),
        "is-default" => vec!["false".into()],
        "owner-id" => vec![v.owner_id.clone()],
        "state" => vec!["available".into()],
        _ => Vec::new(),
    }
}

fn instance_filter(i: &Instance, enis: &[Eni], name: &str) -> Vec<String> {
    if let Some(v) = tag_filter(&i.tags, name) {
        return v;
    }
    match name {
        "instance-id" => vec![i.id.clone()],
        "instance-type" => vec![i.instance_type.clone()],
        "instance-state-name" => vec![i.state.code_name().1.into()],
        "instance-state-code" => vec![i.state.code_name().0.to_string()],
        "subnet-id" => vec![i.subnet_id.clone()],
        "vpc-id" => vec![i.vpc_id.clone()],
        "availability-zone" => vec![i.availability_zone.clone()],
        "private-ip-address" => enis
            .iter()
            .filter(|e| e.id == i.primary_eni)
            .map(|e| e.primary_ip.to_string())
            .collect(),
        "network-interface.network-interface-id" => enis.iter().map(|e| e.id.clone()).collect(),
        "ipv6-address" | "network-interface.ipv6-addresses.ipv6-address" => enis
            .iter()
            .filter(|e| name != "ipv6-address" || e.id == i.primary_eni)
            .flat_map(|e| e.ipv6_addresses.iter().map(|a| a.to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

fn instance_type_filter(l: &InstanceLimits, name: &str) -> Vec<String> {
    match name {
        "instance-type" => vec![l.instance_type.clone()],
        "hypervisor" => vec![l.hypervisor.to_string()],
        "bare-metal" => vec![l.bare_metal.to_string()],
        _ => Vec::new(),
    }
}

fn matches_all(filters: &[Filter], values: impl Fn(&str) -> Vec<String>) -> Result<bool, ApiError> {
    for f in filters {
        let have = values(&f.name);
        if !f
            .values
            .iter()
            .any(|want| have.iter().any(|h| glob(want, h)))
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// EC2 filter wildcards: `*` any run, `?` one character, `\` escapes.
pub fn glob(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = s.chars().collect();
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|k| go(&p[1..], &t[k..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some('\\') if p.len() > 1 => t.first() == Some(&p[1]) && go(&p[2..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(&p, &t)
}

fn encode_token(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(tok: &str) -> Option<String> {
    if !tok.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..tok.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(tok.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// One page of `items` (sorted by `key`), with the token of the next page.
fn paginate<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    page: &Page,
    min: i64,
    max: i64,
    default: Option<i64>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    if let Some(m) = page.max_results {
        if !(min..=max).contains(&m) {
            return Err(ApiError::bad_value(
                "maxResults",
                &m.to_string(),
                &format!("Parameter must be between {min} and {max}."),
            ));
        }
    }
    let start_key = match &page.next_token {
        None => None,
        Some(t) => Some(decode_token(t).ok_or_else(|| {
            ApiError::new(
                "InvalidPaginationToken",
                format!("Invalid pagination token: {t}"),
            )
        })?),
    };
    let mut items: Vec<(String, T)> = items.into_iter().map(|t| (key(&t), t)).collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let from = match &start_key {
        None => 0,
        Some(k) => items
            .iter()
            .position(|(ik, _)| ik >= k)
            .unwrap_or(items.len()),
    };
    let size = page
        .max_results
        .or(default)
        .map_or(usize::MAX, |m| m as usize);
    let mut rest: Vec<(String, T)> = items.into_iter().skip(from).collect();
    let next = (rest.len() > size).then(|| encode_token(&rest[size].0));
    rest.truncate(size);
    Ok((rest.into_iter().map(|(_, t)| t).collect(), next))
}

/// Checks the model's invariants; returns a description of the first violation. Used by the
/// property tests and by the admin view's health check.
pub fn check_invariants(m: &Model) -> Result<(), String> {
    let mut seen: HashMap<Ipv4Addr, String> = HashMap::new();
    let mut per_subnet: BTreeMap<&str, u32> = BTreeMap::new();
    for e in m.enis.values() {
        let s = m
            .subnets
            .get(&e.subnet_id)
            .ok_or(format!("{}: unknown subnet", e.id))?;
        let mut mine: Vec<Ipv4Addr> = std::iter::once(e.primary_ip)
            .chain(e.secondary_ips.iter().copied())
            .collect();
        for p in &e.ipv4_prefixes {
            if p.prefix_len() != 28 || (p.base() - s.cidr.base()) % PREFIX_SIZE != 0 {
                return Err(format!("{}: prefix {p} not an aligned /28", e.id));
            }
            mine.extend((p.base()..p.base() + PREFIX_SIZE).map(Ipv4Addr::from));
        }
        for a in &mine {
            if !s.cidr.contains(u32::from(*a)) {
                return Err(format!("{}: {a} outside {}", e.id, s.cidr));
            }
            if let Some(other) = seen.insert(*a, e.id.clone()) {
                return Err(format!("{a} held by {other} and {}", e.id));
            }
        }
        *per_subnet.entry(e.subnet_id.as_str()).or_default() += mine.len() as u32;
        if let Some(a) = &e.attachment {
            let i = m
                .instances
                .get(&a.instance_id)
                .ok_or(format!("{}: unknown instance", e.id))?;
            if e.ipv4_slots() > i.limits.ipv4_per_eni {
                return Err(format!(
                    "{}: {} IPv4 slots > {}",
                    e.id,
                    e.ipv4_slots(),
                    i.limits.ipv4_per_eni
                ));
            }
            if i.state != InstanceState::Running {
                return Err(format!("{} attached to terminated {}", e.id, i.id));
            }
        } else if e.ipv4_slots() > UNATTACHED_IPV4_LIMIT {
            return Err(format!("{}: too many addresses", e.id));
        }
    }
    for i in m
        .instances
        .values()
        .filter(|i| i.state == InstanceState::Running)
    {
        let enis = m.instance_enis(&i.id);
        if enis.len() as u32 > i.limits.max_enis_total {
            return Err(format!("{}: {} ENIs", i.id, enis.len()));
        }
        let mut slots = BTreeSet::new();
        for e in &enis {
            let a = e.attachment.as_ref().ok_or("attachment vanished")?;
            if !slots.insert((a.network_card_index, a.device_index)) {
                return Err(format!(
                    "{}: device index {} used twice",
                    i.id, a.device_index
                ));
            }
        }
        for card in 0..i.limits.network_cards.max(1) {
            let n = enis
                .iter()
                .filter(|e| {
                    e.attachment
                        .as_ref()
                        .is_some_and(|a| a.network_card_index == card)
                })
                .count();
            if n as u32 > card_max_enis(&i.limits, card) {
                return Err(format!("{}: {n} ENIs on card {card}", i.id));
            }
        }
    }
    check_ipv6_invariants(m)?;
    check_trunk_invariants(m)?;
    for s in m.subnets.values() {
        let used = per_subnet.get(s.id.as_str()).copied().unwrap_or(0);
        let expect = s.cidr.size() as u32 - 5 - used;
        if s.alloc.free_addresses() != expect {
            return Err(format!(
                "{}: free {} but {} expected",
                s.id,
                s.alloc.free_addresses(),
                expect
            ));
        }
    }
    Ok(())
}

/// Trunk invariants: every association joins an existing branch (in use, unattached, pointing
/// back at it) to an attached trunk ENI of a running trunking-compatible instance; VLAN ids and
/// GRE keys are unique per trunk; no trunk carries more branches than its instance type allows;
/// an instance has at most one trunk; no ENI points at an association that does not exist.
fn check_trunk_invariants(m: &Model) -> Result<(), String> {
    let mut per_trunk: BTreeMap<&str, (u32, BTreeSet<u32>, BTreeSet<u32>)> = BTreeMap::new();
    for a in m.trunk_associations.values() {
        let b = m
            .enis
            .get(&a.branch_id)
            .ok_or(format!("{}: branch {} gone", a.id, a.branch_id))?;
        if b.trunk_association.as_deref() != Some(a.id.as_str())
            || b.attachment.is_some()
            || b.status != EniStatus::InUse
        {
            return Err(format!("{}: branch {} not held by it", a.id, b.id));
        }
        let t = m
            .enis
            .get(&a.trunk_id)
            .ok_or(format!("{}: trunk {} gone", a.id, a.trunk_id))?;
        let i = t
            .instance_id()
            .and_then(|i| m.instances.get(i))
            .ok_or(format!("{}: trunk {} not attached", a.id, t.id))?;
        if t.interface_type != "trunk" || !i.trunk.trunking_compatible {
            return Err(format!("{}: {} is no trunk of a trunking type", a.id, t.id));
        }
        let e = per_trunk.entry(a.trunk_id.as_str()).or_default();
        e.0 += 1;
        if a.vlan_id.is_some_and(|v| !e.1.insert(v)) || a.gre_key.is_some_and(|k| !e.2.insert(k)) {
            return Err(format!(
                "{}: VLAN id or GRE key used twice on {}",
                a.id, t.id
            ));
        }
        if e.0 > i.trunk.usable_branches() {
            return Err(format!(
                "{}: more than {} branches",
                t.id,
                i.trunk.usable_branches()
            ));
        }
    }
    for e in m.enis.values() {
        if let Some(id) = &e.trunk_association {
            if !m.trunk_associations.contains_key(id) {
                return Err(format!("{}: dangling association {id}", e.id));
            }
        }
    }
    for i in m.instances.values() {
        let trunks = m
            .instance_enis(&i.id)
            .iter()
            .filter(|e| e.interface_type == "trunk")
            .count();
        if trunks > 1 {
            return Err(format!("{}: {trunks} trunk interfaces", i.id));
        }
    }
    Ok(())
}

/// IPv6 invariants: every address and /80 of an ENI lies in its subnet's /64 (prefixes
/// aligned), none is held twice or inside another ENI's prefix, the per-ENI limit holds, and
/// each subnet's bookkeeping matches what its ENIs hold.
fn check_ipv6_invariants(m: &Model) -> Result<(), String> {
    const P80: u128 = !((1u128 << 48) - 1);
    let mut addrs: BTreeMap<&str, BTreeSet<u128>> = BTreeMap::new();
    let mut prefixes: BTreeMap<&str, BTreeSet<u128>> = BTreeMap::new();
    for e in m.enis.values() {
        let s = m
            .subnets
            .get(&e.subnet_id)
            .ok_or(format!("{}: unknown subnet", e.id))?;
        if e.ipv6_slots() == 0 {
            continue;
        }
        let net = s
            .ipv6_cidr
            .ok_or(format!("{}: IPv6 in subnet {} without a /64", e.id, s.id))?;
        let a = addrs.entry(s.id.as_str()).or_default();
        for x in &e.ipv6_addresses {
            let n = u128::from(*x);
            if !net.contains(n) || !a.insert(n) {
                return Err(format!("{}: {x} outside {net} or held twice", e.id));
            }
        }
        let p = prefixes.entry(s.id.as_str()).or_default();
        for x in &e.ipv6_prefixes {
            if x.len != 80 || !net.contains_block(x) || !p.insert(x.base) {
                return Err(format!("{}: {x} not a free aligned /80 of {net}", e.id));
            }
        }
        if let Some(i) = e.instance_id().and_then(|i| m.instances.get(i)) {
            if e.ipv6_slots() > i.limits.ipv6_per_eni {
                return Err(format!(
                    "{}: {} IPv6 slots > {}",
                    e.id,
                    e.ipv6_slots(),
                    i.limits.ipv6_per_eni
                ));
            }
        }
    }
    for s in m.subnets.values() {
        let a = addrs.remove(s.id.as_str()).unwrap_or_default();
        let p = prefixes.remove(s.id.as_str()).unwrap_or_default();
        if let Some(x) = a.iter().find(|x| p.contains(&(**x & P80))) {
            return Err(format!(
                "{}: {} inside an assigned /80",
                s.id,
                Ipv6Addr::from(*x)
            ));
        }
        if a != s.v6_addrs || p != s.v6_prefixes {
            return Err(format!("{}: IPv6 bookkeeping differs from its ENIs", s.id));
        }
    }
    Ok(())
}
