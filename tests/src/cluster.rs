//! A simulator wired to a fabric, with helpers for the EC2 calls a scenario makes itself (VPC,
//! subnets, instances) and the ones ipamd will make later (ENIs, addresses), in-process.

use std::net::{Ipv4Addr, Ipv6Addr};

use subnet_calc::subnet::Ipv4Cidr;
use vpc_sim::api::{CreateEni, Reply, Request, RunInstances};
use vpc_sim::ipv6::Ipv6Block;
use vpc_sim::server::Shared;
use vpc_sim::sim::{SimConfig, Simulator};

use crate::error::{FabricError, Result};
use crate::fabric::{Fabric, Node};

/// An ENI created and attached by [`SimCluster::attach_new_eni`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEni {
    /// ENI id.
    pub eni_id: String,
    /// Attachment id (for detaching).
    pub attachment_id: String,
    /// MAC.
    pub mac: String,
    /// Primary private address.
    pub primary_ip: Ipv4Addr,
}

/// A simulated account whose every ENI and address change is mirrored by a [`Fabric`].
///
/// `sim` is the same [`Shared`] handle the HTTP server takes ([`crate::serve`]), so in-process
/// calls and ipamd's calls over HTTP see one state.
pub struct SimCluster {
    /// The simulator (its clock starts now).
    pub sim: Shared,
    /// The namespaces.
    pub fabric: Fabric,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("fabric", &self.fabric)
            .finish_non_exhaustive()
    }
}

fn parse_cidr(s: &str) -> Result<Ipv4Cidr> {
    s.parse().map_err(|e| FabricError::Sim {
        action: "parse CIDR",
        message: format!("{s}: {e}"),
    })
}

/// The `index`th /64 of a /56.
fn nth_64(v56: Ipv6Block, index: u8) -> Result<Ipv6Block> {
    Ipv6Block::new(v56.base | (u128::from(index) << 64), 64)
        .filter(|b| v56.contains_block(b))
        .ok_or_else(|| FabricError::Sim {
            action: "pick a /64",
            message: format!("/64 number {index} of {v56}"),
        })
}

impl SimCluster {
    /// A fabric and a simulator configured by `cfg`, with the fabric's hooks installed.
    pub fn new(cfg: SimConfig) -> Result<SimCluster> {
        let fabric = Fabric::new()?;
        let mut sim = Simulator::new(cfg);
        sim.set_hooks(Box::new(fabric.hooks()));
        Ok(SimCluster {
            sim: Shared::new(sim),
            fabric,
        })
    }

    /// One in-process call at the simulator's current time.
    pub fn call(&self, req: Request) -> Result<Reply> {
        let action = req.action();
        let now = self.sim.now_ms();
        self.sim
            .with(|s| s.call(now, req))
            .map_err(|e| FabricError::Sim {
                action,
                message: e.to_string(),
            })
    }

    fn unexpected(action: &'static str, r: &Reply) -> FabricError {
        FabricError::Sim {
            action,
            message: format!("unexpected reply {r:?}"),
        }
    }

    /// `CreateVpc`; registers the CIDR with the fabric. Returns the VPC id.
    pub fn create_vpc(&self, cidr: &str) -> Result<String> {
        let cidr = parse_cidr(cidr)?;
        let r = self.call(Request::CreateVpc {
            cidr,
            amazon_ipv6: false,
            tags: Default::default(),
        })?;
        let Reply::Vpc(v) = r else {
            return Err(Self::unexpected("CreateVpc", &r));
        };
        self.fabric.add_vpc_cidr(cidr)?;
        Ok(v.id)
    }

    /// `CreateVpc` with an Amazon-provided IPv6 /56 (`AmazonProvidedIpv6CidrBlock=true`, as an
    /// EKS IPv6 cluster's VPC has); registers the IPv4 CIDR and the /56 with the fabric.
    /// Returns the VPC id and its /56.
    pub fn create_vpc_ipv6(&self, cidr: &str) -> Result<(String, Ipv6Block)> {
        let cidr = parse_cidr(cidr)?;
        let r = self.call(Request::CreateVpc {
            cidr,
            amazon_ipv6: true,
            tags: Default::default(),
        })?;
        let Reply::Vpc(v) = &r else {
            return Err(Self::unexpected("CreateVpc", &r));
        };
        let Some(block) = v.ipv6_cidr else {
            return Err(Self::unexpected("CreateVpc", &r));
        };
        self.fabric.add_vpc_cidr(cidr)?;
        self.fabric.add_vpc_cidr6(block)?;
        Ok((v.id.clone(), block))
    }

    /// `AssociateVpcCidrBlock` with `AmazonProvidedIpv6CidrBlock=true` on an existing VPC (an
    /// IPv4 cluster's VPC turning dual-stack); registers the /56 with the fabric. Returns it.
    pub fn associate_vpc_ipv6(&self, vpc_id: &str) -> Result<Ipv6Block> {
        let r = self.call(Request::AssociateVpcCidrBlock {
            vpc_id: vpc_id.to_owned(),
            amazon_ipv6: true,
        })?;
        let Reply::VpcCidrAssociated { block, .. } = r else {
            return Err(Self::unexpected("AssociateVpcCidrBlock", &r));
        };
        self.fabric.add_vpc_cidr6(block)?;
        Ok(block)
    }

    /// `AssociateSubnetCidrBlock` of the `index`th /64 of the VPC's /56 on an existing subnet;
    /// registers it with the fabric. Only nodes booted afterwards get an IPv6 default route
    /// (an ENI attached before knows no /64). Returns the /64.
    pub fn associate_subnet_ipv6(&self, subnet_id: &str, index: u8) -> Result<Ipv6Block> {
        let v56 = self
            .sim
            .with(|s| {
                let vpc = &s.model().subnets.get(subnet_id)?.vpc_id;
                s.model().vpcs.get(vpc)?.ipv6_cidr
            })
            .ok_or_else(|| FabricError::Unknown {
                what: "subnet in a VPC with an IPv6 /56",
                id: subnet_id.to_owned(),
            })?;
        let block = nth_64(v56, index)?;
        let r = self.call(Request::AssociateSubnetCidrBlock {
            subnet_id: subnet_id.to_owned(),
            ipv6_cidr: block,
        })?;
        let Reply::SubnetCidrAssociated { block, .. } = r else {
            return Err(Self::unexpected("AssociateSubnetCidrBlock", &r));
        };
        self.fabric.add_subnet6(subnet_id, block)?;
        Ok(block)
    }

    /// `CreateSubnet` with IPv4 `cidr` and the `index`th /64 of the VPC's /56 (index 0 is the
    /// /56's first /64), in the region's first availability zone; registers both with the
    /// fabric. Returns the subnet id and its /64.
    pub fn create_subnet_ipv6(
        &self,
        vpc_id: &str,
        cidr: &str,
        index: u8,
    ) -> Result<(String, Ipv6Block)> {
        let v56 = self
            .sim
            .with(|s| s.model().vpcs.get(vpc_id).and_then(|v| v.ipv6_cidr))
            .ok_or_else(|| FabricError::Unknown {
                what: "VPC with an IPv6 /56",
                id: vpc_id.to_owned(),
            })?;
        let block = nth_64(v56, index)?;
        let cidr = parse_cidr(cidr)?;
        let az = self
            .sim
            .with(|s| s.model().config.availability_zones().into_iter().next());
        let r = self.call(Request::CreateSubnet {
            vpc_id: vpc_id.to_owned(),
            cidr,
            availability_zone: az,
            ipv6_cidr: Some(block),
            tags: Default::default(),
        })?;
        let Reply::Subnet(s) = r else {
            return Err(Self::unexpected("CreateSubnet", &r));
        };
        self.fabric.add_subnet(&s.id, cidr)?;
        self.fabric.add_subnet6(&s.id, block)?;
        Ok((s.id, block))
    }

    /// `CreateSubnet` in the region's first availability zone (so that any ENI of it can
    /// attach to any instance of the others); registers it with the fabric. Returns its id.
    pub fn create_subnet(&self, vpc_id: &str, cidr: &str) -> Result<String> {
        let az = self
            .sim
            .with(|s| s.model().config.availability_zones().into_iter().next());
        self.create_subnet_in(vpc_id, cidr, az)
    }

    /// `CreateSubnet` in `availability_zone` (the simulator picks one when `None`); registers
    /// it with the fabric. Returns its id.
    pub fn create_subnet_in(
        &self,
        vpc_id: &str,
        cidr: &str,
        availability_zone: Option<String>,
    ) -> Result<String> {
        let cidr = parse_cidr(cidr)?;
        let r = self.call(Request::CreateSubnet {
            vpc_id: vpc_id.to_owned(),
            cidr,
            availability_zone,
            ipv6_cidr: None,
            tags: Default::default(),
        })?;
        let Reply::Subnet(s) = r else {
            return Err(Self::unexpected("CreateSubnet", &r));
        };
        self.fabric.add_subnet(&s.id, cidr)?;
        Ok(s.id)
    }

    /// `RunInstances` of one instance: the fabric boots its node. Returns the node.
    pub fn run_instance(&self, subnet_id: &str, instance_type: &str) -> Result<Node> {
        self.launch(subnet_id, instance_type, None)
    }

    /// `RunInstances` of one instance with `Ipv6AddressCount=1` in an IPv6 subnet, as the
    /// nodes of an EKS IPv6 cluster are launched: the node's eth0 has its IPv6 address
    /// ([`Node::primary_ipv6`]) and IMDS its `ipv6` key. Returns the node.
    pub fn run_instance_ipv6(&self, subnet_id: &str, instance_type: &str) -> Result<Node> {
        self.launch(subnet_id, instance_type, Some(1))
    }

    fn launch(&self, subnet_id: &str, instance_type: &str, ipv6: Option<i64>) -> Result<Node> {
        let r = self.call(Request::RunInstances(RunInstances {
            image_id: "ami-e2e".into(),
            instance_type: instance_type.into(),
            min_count: 1,
            max_count: 1,
            subnet_id: Some(subnet_id.to_owned()),
            ipv6_count: ipv6,
            ..RunInstances::default()
        }))?;
        let Reply::Reservation(res) = &r else {
            return Err(Self::unexpected("RunInstances", &r));
        };
        let Some((inst, _)) = res.instances.first() else {
            return Err(Self::unexpected("RunInstances", &r));
        };
        self.fabric.node(&inst.id)
    }

    /// `TerminateInstances` of one instance.
    pub fn terminate(&self, instance_id: &str) -> Result<()> {
        self.call(Request::TerminateInstances {
            ids: vec![instance_id.to_owned()],
        })
        .map(|_| ())
    }

    /// `CreateNetworkInterface` in `subnet_id` then `AttachNetworkInterface` at `device_index`
    /// (card 0), as ipamd does to grow a node.
    pub fn attach_new_eni(
        &self,
        subnet_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<NewEni> {
        let r = self.call(Request::CreateNetworkInterface(CreateEni {
            subnet_id: subnet_id.to_owned(),
            description: "e2e".into(),
            ..CreateEni::default()
        }))?;
        let Reply::NetworkInterface { eni, .. } = r else {
            return Err(Self::unexpected("CreateNetworkInterface", &r));
        };
        let r = self.call(Request::AttachNetworkInterface {
            eni_id: eni.id.clone(),
            instance_id: instance_id.to_owned(),
            device_index: i64::from(device_index),
            network_card_index: None,
        })?;
        let Reply::Attached { attachment_id, .. } = r else {
            return Err(Self::unexpected("AttachNetworkInterface", &r));
        };
        Ok(NewEni {
            eni_id: eni.id,
            attachment_id,
            mac: eni.mac,
            primary_ip: eni.primary_ip,
        })
    }

    /// `DetachNetworkInterface`.
    pub fn detach(&self, attachment_id: &str) -> Result<()> {
        self.call(Request::DetachNetworkInterface {
            attachment_id: attachment_id.to_owned(),
            force: false,
        })
        .map(|_| ())
    }

    /// `AssignPrivateIpAddresses` of `count` secondary addresses, then (a second call, as EC2
    /// takes one kind per call) of `prefixes` /28 prefixes. Returns what was assigned.
    pub fn assign(
        &self,
        eni_id: &str,
        count: u32,
        prefixes: u32,
    ) -> Result<(Vec<Ipv4Addr>, Vec<Ipv4Cidr>)> {
        let mut out = (Vec::new(), Vec::new());
        for (n, is_prefix) in [(count, false), (prefixes, true)] {
            if n == 0 {
                continue;
            }
            let r = self.call(Request::AssignPrivateIpAddresses {
                eni_id: eni_id.to_owned(),
                count: (!is_prefix).then_some(i64::from(n)),
                addresses: vec![],
                prefix_count: is_prefix.then_some(i64::from(n)),
                prefixes: vec![],
            })?;
            let Reply::AssignedPrivate {
                addresses,
                prefixes,
                ..
            } = r
            else {
                return Err(Self::unexpected("AssignPrivateIpAddresses", &r));
            };
            out.0.extend(addresses);
            out.1.extend(prefixes);
        }
        Ok(out)
    }

    /// `UnassignPrivateIpAddresses`.
    pub fn unassign(
        &self,
        eni_id: &str,
        addresses: &[Ipv4Addr],
        prefixes: &[Ipv4Cidr],
    ) -> Result<()> {
        self.call(Request::UnassignPrivateIpAddresses {
            eni_id: eni_id.to_owned(),
            addresses: addresses.to_vec(),
            prefixes: prefixes.to_vec(),
        })
        .map(|_| ())
    }

    /// `AssignIpv6Addresses` of `count` addresses, then (a second call, as EC2 takes one kind
    /// per call) of `prefixes` /80 prefixes (`Ipv6PrefixCount`, as ipamd's IPv6 mode asks for
    /// one on the primary ENI). Returns what was assigned.
    pub fn assign_ipv6(
        &self,
        eni_id: &str,
        count: u32,
        prefixes: u32,
    ) -> Result<(Vec<Ipv6Addr>, Vec<Ipv6Block>)> {
        let mut out = (Vec::new(), Vec::new());
        for (n, is_prefix) in [(count, false), (prefixes, true)] {
            if n == 0 {
                continue;
            }
            let r = self.call(Request::AssignIpv6Addresses {
                eni_id: eni_id.to_owned(),
                count: (!is_prefix).then_some(i64::from(n)),
                addresses: vec![],
                prefix_count: is_prefix.then_some(i64::from(n)),
                prefixes: vec![],
            })?;
            let Reply::AssignedIpv6 {
                addresses,
                prefixes,
                ..
            } = r
            else {
                return Err(Self::unexpected("AssignIpv6Addresses", &r));
            };
            out.0.extend(addresses);
            out.1.extend(prefixes);
        }
        Ok(out)
    }

    /// `UnassignIpv6Addresses` (`Ipv6Addresses.N` and `Ipv6Prefix.N`).
    pub fn unassign_ipv6(
        &self,
        eni_id: &str,
        addresses: &[Ipv6Addr],
        prefixes: &[Ipv6Block],
    ) -> Result<()> {
        self.call(Request::UnassignIpv6Addresses {
            eni_id: eni_id.to_owned(),
            addresses: addresses.to_vec(),
            prefixes: prefixes.to_vec(),
        })
        .map(|_| ())
    }

    /// Fails with every hook error recorded so far, if any.
    pub fn check_hooks(&self) -> Result<()> {
        let errors = self.fabric.errors();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FabricError::Sim {
                action: "hooks",
                message: errors.join("; "),
            })
        }
    }
}
