//! An in-memory EC2 for unit tests: one VPC, one subnet, one instance; enforces the instance's
//! ENI and per-ENI address limits and the subnet's free addresses; errors can be queued per
//! action.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    Addresses, Assigned, Attachment, CreateEni, Ec2Api, Ec2Error, Ec2Result, EniInfo,
    InstanceTypeInfo, SubnetInfo,
};
use crate::types::{Ipv4Net, Ipv6Net};

/// The fake's state (public so tests can inspect and change it).
#[derive(Debug, Clone)]
pub struct FakeState {
    /// VPC id.
    pub vpc_id: String,
    /// The subnet.
    pub subnet: SubnetInfo,
    /// Instance id.
    pub instance_id: String,
    /// Instance type limits.
    pub limits: InstanceTypeInfo,
    /// ENIs by id.
    pub enis: BTreeMap<String, EniInfo>,
    /// Addresses handed out in the subnet (including reserved ones).
    pub used: BTreeSet<Ipv4Addr>,
    /// Errors to answer, per action, in order.
    pub queued_errors: BTreeMap<String, VecDeque<String>>,
    /// Calls made, in order.
    pub calls: Vec<String>,
    /// The subnet's IPv6 /64, when it has one (/80s are handed out from it in order).
    pub subnet_ipv6: Option<Ipv6Net>,
    next_v6_prefix: u128,
    next_id: u32,
}

/// The fake EC2 (cheap to clone; clones share state).
#[derive(Debug, Clone)]
pub struct FakeEc2 {
    state: Arc<Mutex<FakeState>>,
}

impl FakeEc2 {
    /// A node of `limits` in `subnet`, with its primary ENI attached at device 0.
    pub fn new(subnet: Ipv4Net, limits: InstanceTypeInfo) -> Self {
        let mut used = BTreeSet::new();
        let net = u32::from(subnet.network());
        // AWS reserves the first four addresses and the last one.
        for i in 0..4 {
            used.insert(Ipv4Addr::from(net + i));
        }
        used.insert(Ipv4Addr::from(net + subnet.size() as u32 - 1));
        let available = subnet.size() - 5;
        let mut st = FakeState {
            vpc_id: "vpc-1".into(),
            subnet: SubnetInfo {
                id: "subnet-1".into(),
                cidr: subnet,
                available,
                tags: BTreeMap::new(),
            },
            instance_id: "i-0000000000000001".into(),
            limits,
            enis: BTreeMap::new(),
            used,
            queued_errors: BTreeMap::new(),
            calls: Vec::new(),
            subnet_ipv6: None,
            next_v6_prefix: 0,
            next_id: 0,
        };
        let primary = st.new_eni("primary", BTreeMap::new());
        let mut primary = primary;
        primary.attachment = Some(Attachment {
            id: "attach-primary".into(),
            instance_id: st.instance_id.clone(),
            device_index: 0,
            network_card: 0,
        });
        primary.status = "in-use".into();
        st.enis.insert(primary.id.clone(), primary);
        Self {
            state: Arc::new(Mutex::new(st)),
        }
    }

    /// Locks the state.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Answers the next `n` calls of `action` with `code`.
    pub fn fail(&self, action: &str, code: &str, n: usize) {
        let mut st = self.state();
        let q = st.queued_errors.entry(action.to_owned()).or_default();
        for _ in 0..n {
            q.push_back(code.to_owned());
        }
    }

    /// The primary ENI's id.
    pub fn primary_eni(&self) -> String {
        let st = self.state();
        st.enis
            .values()
            .find(|e| e.attachment.as_ref().is_some_and(|a| a.device_index == 0))
            .map(|e| e.id.clone())
            .unwrap_or_default()
    }

    /// Number of calls of `action` so far.
    pub fn count(&self, action: &str) -> usize {
        self.state().calls.iter().filter(|c| *c == action).count()
    }

    fn enter(&self, action: &'static str) -> Result<MutexGuard<'_, FakeState>, Ec2Error> {
        let mut st = self.state();
        st.calls.push(action.to_owned());
        if let Some(code) = st
            .queued_errors
            .get_mut(action)
            .and_then(VecDeque::pop_front)
        {
            return Err(Ec2Error::coded(action, &code, "injected"));
        }
        Ok(st)
    }
}

impl FakeState {
    fn take_ip(&mut self) -> Option<Ipv4Addr> {
        let ip = self
            .subnet
            .cidr
            .hosts()
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        self.subnet.available -= 1;
        Some(ip)
    }

    fn take_prefix(&mut self) -> Option<Ipv4Net> {
        let base = u32::from(self.subnet.cidr.network());
        let blocks = (self.subnet.cidr.size() / 16) as u32;
        for b in 0..blocks {
            let start = base + b * 16;
            if (0..16).all(|i| !self.used.contains(&Ipv4Addr::from(start + i))) {
                for i in 0..16 {
                    self.used.insert(Ipv4Addr::from(start + i));
                }
                self.subnet.available -= 16;
                return Ipv4Net::new(Ipv4Addr::from(start), 28);
            }
        }
        None
    }

    fn release_ip(&mut self, ip: Ipv4Addr) {
        if self.used.remove(&ip) {
            self.subnet.available += 1;
        }
    }

    fn new_eni(&mut self, description: &str, tags: BTreeMap<String, String>) -> EniInfo {
        self.next_id += 1;
        let n = self.next_id;
        let primary_ip = self.take_ip();
        EniInfo {
            id: format!("eni-{n:017x}"),
            mac: format!("02:00:00:00:{:02x}:{:02x}", n >> 8, n & 0xff),
            subnet_id: self.subnet.id.clone(),
            vpc_id: self.vpc_id.clone(),
            status: "available".into(),
            description: description.to_owned(),
            interface_type: "interface".into(),
            primary_ip,
            secondary_ips: Vec::new(),
            prefixes: Vec::new(),
            ipv6_prefixes: Vec::new(),
            tags,
            security_groups: vec!["sg-1".into()],
            attachment: None,
        }
    }

    fn add(&mut self, eni_id: &str, what: Addresses, action: &'static str) -> Ec2Result<Assigned> {
        let slots = self.limits.ipv4_per_eni - 1;
        let eni = self.enis.get(eni_id).ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        let used = (eni.secondary_ips.len() + eni.prefixes.len()) as u32;
        let want = match what {
            Addresses::Ips(n) | Addresses::Prefixes(n) => n,
        };
        if used + want > slots {
            return Err(Ec2Error::coded(
                action,
                "PrivateIpAddressLimitExceeded",
                eni_id.to_owned(),
            ));
        }
        let mut out = Assigned::default();
        for _ in 0..want {
            match what {
                Addresses::Ips(_) => match self.take_ip() {
                    Some(ip) => out.ips.push(ip),
                    None => {
                        for ip in out.ips {
                            self.release_ip(ip);
                        }
                        return Err(Ec2Error::coded(
                            action,
                            "InsufficientFreeAddressesInSubnet",
                            "subnet full",
                        ));
                    }
                },
                Addresses::Prefixes(_) => match self.take_prefix() {
                    Some(p) => out.prefixes.push(p),
                    None => {
                        for p in out.prefixes {
                            for ip in p.hosts() {
                                self.release_ip(ip);
                            }
                        }
                        return Err(Ec2Error::coded(action, "InsufficientCidrBlocks", "no /28"));
                    }
                },
            }
        }
        if let Some(eni) = self.enis.get_mut(eni_id) {
            eni.secondary_ips.extend(&out.ips);
            eni.prefixes.extend(&out.prefixes);
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Ec2Api for FakeEc2 {
    async fn describe_enis(&self, ids: &[String]) -> Ec2Result<Vec<EniInfo>> {
        let st = self.enter("DescribeNetworkInterfaces")?;
        ids.iter()
            .map(|id| {
                st.enis.get(id).cloned().ok_or_else(|| {
                    Ec2Error::coded(
                        "DescribeNetworkInterfaces",
                        "InvalidNetworkInterfaceID.NotFound",
                        format!("The networkInterface ID '{id}' does not exist"),
                    )
                })
            })
            .collect()
    }

    async fn describe_leaked_candidates(
        &self,
        vpc_id: &str,
        cluster: Option<&str>,
    ) -> Ec2Result<Vec<EniInfo>> {
        let st = self.enter("DescribeNetworkInterfaces")?;
        Ok(st
            .enis
            .values()
            .filter(|e| e.status == "available" && e.vpc_id == vpc_id)
            .filter(|e| e.tags.contains_key(super::TAG_INSTANCE_ID))
            .filter(|e| {
                cluster.is_none_or(|c| {
                    e.tags.get(super::TAG_CLUSTER_NAME).map(String::as_str) == Some(c)
                })
            })
            .cloned()
            .collect())
    }

    async fn used_device_indexes(&self, instance_id: &str) -> Ec2Result<Vec<(u32, u32)>> {
        let st = self.enter("DescribeInstances")?;
        Ok(st
            .enis
            .values()
            .filter_map(|e| e.attachment.as_ref())
            .filter(|a| a.instance_id == instance_id)
            .map(|a| (a.network_card, a.device_index))
            .collect())
    }

    async fn describe_instance_type(&self, _instance_type: &str) -> Ec2Result<InstanceTypeInfo> {
        let st = self.enter("DescribeInstanceTypes")?;
        Ok(st.limits.clone())
    }

    async fn describe_subnets(&self, vpc_id: &str, _az: &str) -> Ec2Result<Vec<SubnetInfo>> {
        let st = self.enter("DescribeSubnets")?;
        Ok(if vpc_id == st.vpc_id {
            vec![st.subnet.clone()]
        } else {
            Vec::new()
        })
    }

    async fn create_eni(&self, req: &CreateEni) -> Ec2Result<EniInfo> {
        let action = "CreateNetworkInterface";
        let mut st = self.enter(action)?;
        if req.subnet_id != st.subnet.id {
            return Err(Ec2Error::coded(
                action,
                "InvalidSubnetID.NotFound",
                req.subnet_id.clone(),
            ));
        }
        if st.subnet.available == 0 {
            return Err(Ec2Error::coded(
                action,
                "InsufficientFreeAddressesInSubnet",
                "subnet full",
            ));
        }
        let mut eni = st.new_eni(&req.description, req.tags.clone());
        eni.security_groups = req.security_groups.clone();
        let id = eni.id.clone();
        st.enis.insert(id.clone(), eni);
        if let Err(e) = st.add(&id, req.addresses, action) {
            if let Some(eni) = st.enis.remove(&id) {
                if let Some(ip) = eni.primary_ip {
                    st.release_ip(ip);
                }
            }
            return Err(e);
        }
        Ok(st.enis.get(&id).cloned().unwrap_or_else(|| unreachable!()))
    }

    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> Ec2Result<String> {
        let action = "AttachNetworkInterface";
        let mut st = self.enter(action)?;
        let attached = st
            .enis
            .values()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| a.instance_id == instance_id)
            })
            .count() as u32;
        if attached >= st.limits.max_enis {
            return Err(Ec2Error::coded(
                action,
                "AttachmentLimitExceeded",
                "too many ENIs",
            ));
        }
        if st.enis.values().any(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| a.instance_id == instance_id && a.device_index == device_index)
        }) {
            return Err(Ec2Error::coded(
                action,
                "InvalidParameterValue",
                "device index in use",
            ));
        }
        let eni = st.enis.get_mut(eni_id).ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        let id = format!("eni-attach-{}", &eni_id[4..]);
        eni.attachment = Some(Attachment {
            id: id.clone(),
            instance_id: instance_id.to_owned(),
            device_index,
            network_card,
        });
        eni.status = "in-use".into();
        Ok(id)
    }

    async fn set_delete_on_termination(
        &self,
        _eni_id: &str,
        _attachment_id: &str,
    ) -> Ec2Result<()> {
        let _st = self.enter("ModifyNetworkInterfaceAttribute")?;
        Ok(())
    }

    async fn detach_eni(&self, attachment_id: &str) -> Ec2Result<()> {
        let action = "DetachNetworkInterface";
        let mut st = self.enter(action)?;
        let eni = st
            .enis
            .values_mut()
            .find(|e| e.attachment.as_ref().is_some_and(|a| a.id == attachment_id))
            .ok_or_else(|| {
                Ec2Error::coded(
                    action,
                    "InvalidAttachmentID.NotFound",
                    attachment_id.to_owned(),
                )
            })?;
        eni.attachment = None;
        eni.status = "available".into();
        Ok(())
    }

    async fn delete_eni(&self, eni_id: &str) -> Ec2Result<()> {
        let action = "DeleteNetworkInterface";
        let mut st = self.enter(action)?;
        let eni = st.enis.get(eni_id).cloned().ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        if eni.attachment.is_some() {
            return Err(Ec2Error::coded(
                action,
                "InvalidNetworkInterface.InUse",
                eni_id.to_owned(),
            ));
        }
        st.enis.remove(eni_id);
        for ip in eni.primary_ip.iter().chain(&eni.secondary_ips) {
            st.release_ip(*ip);
        }
        for p in &eni.prefixes {
            for ip in p.hosts() {
                st.release_ip(ip);
            }
        }
        Ok(())
    }

    async fn assign(&self, eni_id: &str, what: Addresses) -> Ec2Result<Assigned> {
        let mut st = self.enter("AssignPrivateIpAddresses")?;
        st.add(eni_id, what, "AssignPrivateIpAddresses")
    }

    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Ec2Result<()> {
        let action = "UnassignPrivateIpAddresses";
        let mut st = self.enter(action)?;
        let eni = st.enis.get_mut(eni_id).ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        eni.secondary_ips.retain(|ip| !ips.contains(ip));
        for ip in ips {
            st.release_ip(*ip);
        }
        Ok(())
    }

    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> Ec2Result<()> {
        let action = "UnassignPrivateIpAddresses";
        let mut st = self.enter(action)?;
        let eni = st.enis.get_mut(eni_id).ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        eni.prefixes.retain(|p| !prefixes.contains(p));
        for p in prefixes {
            for ip in p.hosts() {
                st.release_ip(ip);
            }
        }
        Ok(())
    }

    async fn assign_ipv6_prefixes(&self, eni_id: &str, n: u32) -> Ec2Result<Vec<Ipv6Net>> {
        let action = "AssignIpv6Addresses";
        let mut st = self.enter(action)?;
        let Some(block) = st.subnet_ipv6 else {
            return Err(Ec2Error::coded(
                action,
                "InvalidParameterValue",
                "the subnet has no IPv6 CIDR block",
            ));
        };
        let mut out = Vec::new();
        for _ in 0..n {
            let i = st.next_v6_prefix;
            st.next_v6_prefix += 1;
            let base = u128::from(block.network()) | (i << 48);
            let p = Ipv6Net::new(base.into(), 80)
                .ok_or_else(|| Ec2Error::coded(action, "InsufficientCidrBlocks", "no /80 left"))?;
            out.push(p);
        }
        let eni = st.enis.get_mut(eni_id).ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        eni.ipv6_prefixes.extend(out.iter().copied());
        Ok(out)
    }

    async fn unassign_ipv6_prefixes(&self, eni_id: &str, prefixes: &[Ipv6Net]) -> Ec2Result<()> {
        let action = "UnassignIpv6Addresses";
        let mut st = self.enter(action)?;
        let eni = st.enis.get_mut(eni_id).ok_or_else(|| {
            Ec2Error::coded(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                eni_id.to_owned(),
            )
        })?;
        eni.ipv6_prefixes.retain(|p| !prefixes.contains(p));
        Ok(())
    }

    async fn create_tags(&self, resource: &str, tags: &BTreeMap<String, String>) -> Ec2Result<()> {
        let mut st = self.enter("CreateTags")?;
        if let Some(e) = st.enis.get_mut(resource) {
            e.tags.extend(tags.clone());
        }
        Ok(())
    }
}
