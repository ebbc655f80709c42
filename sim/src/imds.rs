//! Instance metadata: a per-instance snapshot of what IMDS shows, built from the model, and the
//! path lookup (`/latest/meta-data/...`, `/latest/dynamic/instance-identity/document`).

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::model::{AttachStatus, InstanceState, Model};

/// One interface as IMDS shows it under `network/interfaces/macs/<mac>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfaceMeta {
    /// ENI id.
    pub interface_id: String,
    /// MAC.
    pub mac: String,
    /// Device index.
    pub device_number: u32,
    /// Network card.
    pub network_card: u32,
    /// Subnet.
    pub subnet_id: String,
    /// VPC.
    pub vpc_id: String,
    /// Security group ids.
    pub security_group_ids: Vec<String>,
    /// Primary first, then secondaries.
    pub local_ipv4s: Vec<String>,
    /// IPv6 addresses.
    pub ipv6s: Vec<String>,
    /// /28 prefixes.
    pub ipv4_prefixes: Vec<String>,
    /// /80 prefixes.
    pub ipv6_prefixes: Vec<String>,
    /// Subnet CIDR.
    pub subnet_ipv4_cidr_block: String,
    /// Subnet IPv6 CIDRs.
    pub subnet_ipv6_cidr_blocks: Vec<String>,
    /// VPC CIDRs.
    pub vpc_ipv4_cidr_blocks: Vec<String>,
    /// VPC IPv6 CIDRs.
    pub vpc_ipv6_cidr_blocks: Vec<String>,
    /// Owner account.
    pub owner_id: String,
}

/// What IMDS shows for one instance at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceMeta {
    /// Instance id.
    pub instance_id: String,
    /// Instance type.
    pub instance_type: String,
    /// AMI.
    pub image_id: String,
    /// Availability zone.
    pub availability_zone: String,
    /// Region.
    pub region: String,
    /// Account.
    pub account_id: String,
    /// Primary MAC.
    pub mac: String,
    /// Primary private IPv4.
    pub local_ipv4: String,
    /// Launch time on the simulator clock.
    pub launch_ms: u64,
    /// Attached interfaces, by MAC.
    pub interfaces: BTreeMap<String, InterfaceMeta>,
}

impl InstanceMeta {
    /// The snapshot of `instance_id` in `m`; `None` for unknown or terminated instances.
    pub fn of(m: &Model, instance_id: &str) -> Option<Self> {
        let i = m.instances.get(instance_id)?;
        if i.state != InstanceState::Running {
            return None;
        }
        let mut interfaces = BTreeMap::new();
        let mut primary = None;
        for e in m.instance_enis(instance_id) {
            let Some(a) = e.attachment.as_ref() else {
                continue;
            };
            if a.status != AttachStatus::Attached {
                continue;
            }
            let s = m.subnets.get(&e.subnet_id)?;
            let vpc = m.vpcs.get(&e.vpc_id)?;
            if e.id == i.primary_eni {
                primary = Some((e.mac.clone(), e.primary_ip.to_string()));
            }
            interfaces.insert(
                e.mac.clone(),
                InterfaceMeta {
                    interface_id: e.id.clone(),
                    mac: e.mac.clone(),
                    device_number: a.device_index,
                    network_card: a.network_card_index,
                    subnet_id: e.subnet_id.clone(),
                    vpc_id: e.vpc_id.clone(),
                    security_group_ids: e.groups.clone(),
                    local_ipv4s: std::iter::once(e.primary_ip)
                        .chain(e.secondary_ips.iter().copied())
                        .map(|a| a.to_string())
                        .collect(),
                    ipv6s: e.ipv6_addresses.iter().map(|a| a.to_string()).collect(),
                    ipv4_prefixes: e.ipv4_prefixes.iter().map(|p| p.to_string()).collect(),
                    ipv6_prefixes: e.ipv6_prefixes.iter().map(|p| p.to_string()).collect(),
                    subnet_ipv4_cidr_block: s.cidr.to_string(),
                    subnet_ipv6_cidr_blocks: s.ipv6_cidr.iter().map(|c| c.to_string()).collect(),
                    vpc_ipv4_cidr_blocks: vec![vpc.cidr.to_string()],
                    vpc_ipv6_cidr_blocks: vpc.ipv6_cidr.iter().map(|c| c.to_string()).collect(),
                    owner_id: e.owner_id.clone(),
                },
            );
        }
        let (mac, local_ipv4) = primary?;
        Some(Self {
            instance_id: i.id.clone(),
            instance_type: i.instance_type.clone(),
            image_id: i.image_id.clone(),
            availability_zone: i.availability_zone.clone(),
            region: m.config.region.clone(),
            account_id: m.config.account_id.clone(),
            mac,
            local_ipv4,
            launch_ms: i.launch_ms,
            interfaces,
        })
    }

    /// The body IMDS returns for `path` (relative to `/latest/`), or `None` for a 404.
    pub fn get(&self, path: &str) -> Option<String> {
        let path = path.trim_start_matches('/');
        if path == "dynamic/instance-identity/document" {
            let doc = serde_json::json!({
                "accountId": self.account_id,
                "architecture": "x86_64",
                "availabilityZone": self.availability_zone,
                "imageId": self.image_id,
                "instanceId": self.instance_id,
                "instanceType": self.instance_type,
                "pendingTime": format!("1970-01-01T00:00:{:02}Z", (self.launch_ms / 1000) % 60),
                "privateIp": self.local_ipv4,
                "region": self.region,
                "version": "2017-09-30",
            });
            return serde_json::to_string_pretty(&doc).ok();
        }
        let md = path.strip_prefix("meta-data")?.trim_start_matches('/');
        let primary = self.interfaces.get(&self.mac);
        let ipv6 = primary.and_then(|p| p.ipv6s.first().cloned());
        match md.trim_end_matches('/') {
            "" => {
                let mut keys = vec![
                    "ami-id",
                    "instance-id",
                    "instance-type",
                    "local-ipv4",
                    "mac",
                    "network/",
                    "placement/",
                ];
                if ipv6.is_some() {
                    keys.push("ipv6");
                }
                keys.sort_unstable();
                return Some(keys.join("\n"));
            }
            "ami-id" => return Some(self.image_id.clone()),
            "instance-id" => return Some(self.instance_id.clone()),
            "instance-type" => return Some(self.instance_type.clone()),
            "local-ipv4" => return Some(self.local_ipv4.clone()),
            "mac" => return Some(self.mac.clone()),
            "ipv6" => return ipv6,
            "placement" => return Some("availability-zone\nregion".into()),
            "placement/availability-zone" => return Some(self.availability_zone.clone()),
            "placement/region" => return Some(self.region.clone()),
            "network" => return Some("interfaces/".into()),
            "network/interfaces" => return Some("macs/".into()),
            "network/interfaces/macs" => {
                return Some(
                    self.interfaces
                        .keys()
                        .map(|m| format!("{m}/"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            }
            _ => {}
        }
        let rest = md.strip_prefix("network/interfaces/macs/")?;
        let (mac, field) = rest.split_once('/').unwrap_or((rest, ""));
        let i = self.interfaces.get(mac)?;
        let lines = |v: &[String]| (!v.is_empty()).then(|| v.join("\n"));
        match field.trim_end_matches('/') {
            "" => {
                let mut f = vec![
                    "device-number",
                    "interface-id",
                    "local-ipv4s",
                    "mac",
                    "network-card",
                    "owner-id",
                    "security-group-ids",
                    "subnet-id",
                    "subnet-ipv4-cidr-block",
                    "vpc-id",
                    "vpc-ipv4-cidr-block",
                    "vpc-ipv4-cidr-blocks",
                ];
                if !i.ipv6s.is_empty() {
                    f.push("ipv6s");
                }
                if !i.ipv4_prefixes.is_empty() {
                    f.push("ipv4-prefix");
                }
                if !i.ipv6_prefixes.is_empty() {
                    f.push("ipv6-prefix");
                }
                if !i.subnet_ipv6_cidr_blocks.is_empty() {
                    f.push("subnet-ipv6-cidr-blocks");
                }
                if !i.vpc_ipv6_cidr_blocks.is_empty() {
                    f.push("vpc-ipv6-cidr-blocks");
                }
                f.sort_unstable();
                Some(f.join("\n"))
            }
            "device-number" => Some(i.device_number.to_string()),
            "network-card" => Some(i.network_card.to_string()),
            "interface-id" => Some(i.interface_id.clone()),
            "mac" => Some(i.mac.clone()),
            "owner-id" => Some(i.owner_id.clone()),
            "subnet-id" => Some(i.subnet_id.clone()),
            "vpc-id" => Some(i.vpc_id.clone()),
            "security-group-ids" => lines(&i.security_group_ids),
            "local-ipv4s" => lines(&i.local_ipv4s),
            "ipv6s" => lines(&i.ipv6s),
            "ipv4-prefix" => lines(&i.ipv4_prefixes),
            "ipv6-prefix" => lines(&i.ipv6_prefixes),
            "subnet-ipv4-cidr-block" => Some(i.subnet_ipv4_cidr_block.clone()),
            "subnet-ipv6-cidr-blocks" => lines(&i.subnet_ipv6_cidr_blocks),
            "vpc-ipv4-cidr-block" => i.vpc_ipv4_cidr_blocks.first().cloned(),
            "vpc-ipv4-cidr-blocks" => lines(&i.vpc_ipv4_cidr_blocks),
            "vpc-ipv6-cidr-blocks" => lines(&i.vpc_ipv6_cidr_blocks),
            _ => None,
        }
    }
}

/// The history of one instance's metadata, so that IMDS can lag EC2 by a propagation delay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetaHistory {
    entries: VecDeque<(u64, Option<InstanceMeta>)>,
}

impl MetaHistory {
    /// Records the snapshot taken at `now_ms` (if it differs from the latest) and forgets
    /// entries older than `delay_ms` that a newer visible entry supersedes.
    pub fn record(&mut self, now_ms: u64, meta: Option<InstanceMeta>, delay_ms: u64) {
        if self.entries.back().map(|(_, m)| m) != Some(&meta) {
            self.entries.push_back((now_ms, meta));
        }
        let horizon = now_ms.saturating_sub(delay_ms);
        while self.entries.len() > 1 && self.entries.get(1).is_some_and(|(t, _)| *t <= horizon) {
            self.entries.pop_front();
        }
    }

    /// What IMDS shows at `now_ms` with a propagation delay of `delay_ms`: the newest snapshot
    /// at least `delay_ms` old, or the first one while the instance is younger than that (an
    /// instance's metadata exists from boot).
    pub fn visible(&self, now_ms: u64, delay_ms: u64) -> Option<&InstanceMeta> {
        let horizon = now_ms.saturating_sub(delay_ms);
        let entry = self
            .entries
            .iter()
            .rev()
            .find(|(t, _)| *t <= horizon)
            .or_else(|| self.entries.front())?;
        entry.1.as_ref()
    }
}
