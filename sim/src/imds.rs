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
                    "iam/",
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

/// The instance role's credentials as IMDS serves them
/// (`meta-data/iam/security-credentials/` and `.../<role>`), and the opt-in check that EC2
/// requests are signed with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CredentialSettings {
    /// The role's name (the listing under `iam/security-credentials/`).
    pub role: String,
    /// How long each issued set is valid, in ms.
    pub lifetime_ms: u64,
    /// A new set is issued when the current one has less than this left, in ms (real IMDS
    /// rotates well before the expiration; the SDK refreshes 10-15 s before it).
    pub rotate_before_ms: u64,
    /// EC2 answers `AuthFailure` unless a request is signed (SigV4 `Credential=`) with an
    /// access key id issued here, not expired, and carries its `X-Amz-Security-Token`.
    pub check_signatures: bool,
    /// Serve a malformed credentials document (tests of the client's error handling).
    pub malformed: bool,
}

impl Default for CredentialSettings {
    fn default() -> Self {
        Self {
            role: "vpc-sim-node-role".into(),
            lifetime_ms: 6 * 3_600_000,
            rotate_before_ms: 3_600_000,
            check_signatures: false,
            malformed: false,
        }
    }
}

/// One issued credential set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCredentials {
    /// `AccessKeyId` (`ASIA...`).
    pub access_key_id: String,
    /// `SecretAccessKey`.
    pub secret_access_key: String,
    /// `Token` (the session token).
    pub token: String,
    /// Issued at (Unix ms).
    pub issued_ms: u64,
    /// `Expiration` (Unix ms).
    pub expires_ms: u64,
}

/// The role's credentials: what was issued, and which key signed each EC2 request.
#[derive(Debug, Clone, Default)]
pub struct RoleCredentials {
    settings: CredentialSettings,
    issued: Vec<IssuedCredentials>,
    signed_by: BTreeMap<String, u64>,
    refused: u64,
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn random_text(rng: &mut crate::rng::SimRng, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char)
        .collect()
}

impl RoleCredentials {
    /// A store with `settings` and nothing issued yet.
    pub fn new(settings: CredentialSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// The settings.
    pub fn settings(&self) -> &CredentialSettings {
        &self.settings
    }

    /// Every set issued so far, oldest first.
    pub fn issued(&self) -> &[IssuedCredentials] {
        &self.issued
    }

    /// EC2 requests accepted per access key id (only counted while signatures are checked).
    pub fn signed_by(&self) -> &BTreeMap<String, u64> {
        &self.signed_by
    }

    /// EC2 requests refused with `AuthFailure`.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The set valid at `now_ms` (Unix), a new one when the current has less than
    /// `rotate_before_ms` left.
    fn current(&mut self, now_ms: u64, rng: &mut crate::rng::SimRng) -> IssuedCredentials {
        let fresh = self
            .issued
            .last()
            .filter(|c| c.expires_ms.saturating_sub(now_ms) >= self.settings.rotate_before_ms)
            .cloned();
        if let Some(c) = fresh {
            return c;
        }
        let c = IssuedCredentials {
            access_key_id: format!("ASIA{}", random_text(rng, ALNUM, 16)),
            secret_access_key: random_text(rng, B64, 40),
            token: format!("IQoJb3JpZ2luX2Vj{}", random_text(rng, B64, 120)),
            issued_ms: now_ms,
            expires_ms: now_ms + self.settings.lifetime_ms,
        };
        self.issued.push(c.clone());
        // Expired sets are forgotten (bounded however long the run).
        self.issued
            .retain(|i| i.expires_ms > now_ms || i.access_key_id == c.access_key_id);
        c
    }

    /// The answer for `meta_path` (relative to `meta-data/`) at Unix time `now_ms`, or `None`
    /// when it is not a credentials path (`Some(None)`: a credentials path that is a 404).
    pub fn get(
        &mut self,
        now_ms: u64,
        rng: &mut crate::rng::SimRng,
        meta_path: &str,
    ) -> Option<Option<String>> {
        let p = meta_path.trim_start_matches('/');
        let rest = p.strip_prefix("iam")?;
        let rest = rest.trim_start_matches('/');
        if rest.trim_end_matches('/').is_empty() {
            return Some(Some("security-credentials/".into()));
        }
        let rest = rest.strip_prefix("security-credentials")?;
        let role = rest.trim_start_matches('/').trim_end_matches('/');
        if role.is_empty() {
            return Some(Some(self.settings.role.clone()));
        }
        if role != self.settings.role {
            return Some(None);
        }
        let c = self.current(now_ms, rng);
        if self.settings.malformed {
            // Truncated mid-document, the expiration not a date.
            return Some(Some(format!(
                "{{\n  \"Code\" : \"Success\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"{}\",\n  \"Expiration\" : \"tomorrow\",\n  \"SecretAccessKey\" : ",
                c.access_key_id
            )));
        }
        let doc = serde_json::json!({
            "Code": "Success",
            "LastUpdated": crate::xml::iso8601(c.issued_ms),
            "Type": "AWS-HMAC",
            "AccessKeyId": c.access_key_id,
            "SecretAccessKey": c.secret_access_key,
            "Token": c.token,
            "Expiration": crate::xml::iso8601(c.expires_ms),
        });
        Some(serde_json::to_string_pretty(&doc).ok())
    }

    /// With `check_signatures`: whether an EC2 request with these `Authorization` and
    /// `X-Amz-Security-Token` headers, at Unix time `now_ms`, is signed with an issued,
    /// unexpired set (`Err`: the `AuthFailure` message). Always `Ok` otherwise.
    pub fn check(
        &mut self,
        now_ms: u64,
        authorization: Option<&str>,
        token: Option<&str>,
    ) -> Result<(), String> {
        if !self.settings.check_signatures {
            return Ok(());
        }
        let r = self.verdict(now_ms, authorization, token);
        match &r {
            Ok(akid) => *self.signed_by.entry(akid.clone()).or_default() += 1,
            Err(_) => self.refused += 1,
        }
        r.map(|_| ())
    }

    fn verdict(
        &self,
        now_ms: u64,
        authorization: Option<&str>,
        token: Option<&str>,
    ) -> Result<String, String> {
        let auth = authorization.ok_or("AWS was not able to validate the provided access credentials (no Authorization header)")?;
        let akid = auth
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .and_then(|rest| {
                rest.split(',')
                    .map(str::trim)
                    .find_map(|f| f.strip_prefix("Credential="))
            })
            .and_then(|c| c.split('/').next())
            .filter(|k| !k.is_empty())
            .ok_or("AWS was not able to validate the provided access credentials (not a SigV4 Authorization header)")?;
        let c = self
            .issued
            .iter()
            .find(|c| c.access_key_id == akid)
            .ok_or_else(|| format!("AWS was not able to validate the provided access credentials (unknown access key id {akid})"))?;
        if c.expires_ms <= now_ms {
            return Err(format!(
                "AWS was not able to validate the provided access credentials (the credentials of {akid} expired)"
            ));
        }
        if token != Some(c.token.as_str()) {
            return Err(format!(
                "AWS was not able to validate the provided access credentials (missing or wrong X-Amz-Security-Token for {akid})"
            ));
        }
        Ok(akid.to_owned())
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;
    use crate::rng::SimRng;

    fn sign(c: &IssuedCredentials) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential={}/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
            c.access_key_id
        )
    }

    fn doc(r: &mut RoleCredentials, rng: &mut SimRng, now: u64) -> serde_json::Value {
        let body = r
            .get(now, rng, "iam/security-credentials/vpc-sim-node-role")
            .flatten()
            .expect("a document");
        serde_json::from_str(&body).expect("JSON")
    }

    #[test]
    fn the_role_is_listed_and_its_document_rotates_before_expiry() {
        let mut rng = SimRng::new(1);
        let mut r = RoleCredentials::new(CredentialSettings {
            lifetime_ms: 30_000,
            rotate_before_ms: 15_000,
            ..CredentialSettings::default()
        });
        assert_eq!(
            r.get(0, &mut rng, "iam/security-credentials/"),
            Some(Some("vpc-sim-node-role".into()))
        );
        assert_eq!(
            r.get(0, &mut rng, "iam/security-credentials/other"),
            Some(None)
        );
        assert_eq!(r.get(0, &mut rng, "instance-id"), None);
        let t0 = 1_700_000_000_000;
        let a = doc(&mut r, &mut rng, t0);
        for f in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
            assert!(a[f].as_str().is_some_and(|v| !v.is_empty()), "{f}: {a}");
        }
        assert_eq!(a["Expiration"], crate::xml::iso8601(t0 + 30_000));
        // Same set until less than 15 s are left, then a new one.
        assert_eq!(
            doc(&mut r, &mut rng, t0 + 15_000)["AccessKeyId"],
            a["AccessKeyId"]
        );
        let b = doc(&mut r, &mut rng, t0 + 15_001);
        assert_ne!(b["AccessKeyId"], a["AccessKeyId"]);
        assert_eq!(r.issued().len(), 2);
    }

    #[test]
    fn only_issued_unexpired_keys_with_their_token_pass_the_check() {
        let mut rng = SimRng::new(2);
        let mut r = RoleCredentials::new(CredentialSettings {
            lifetime_ms: 30_000,
            rotate_before_ms: 15_000,
            check_signatures: true,
            ..CredentialSettings::default()
        });
        let t0 = 1_700_000_000_000;
        doc(&mut r, &mut rng, t0);
        let c = r.issued()[0].clone();
        assert_eq!(r.check(t0, Some(&sign(&c)), Some(&c.token)), Ok(()));
        assert!(r.check(t0, Some(&sign(&c)), None).is_err());
        assert!(r.check(t0, Some(&sign(&c)), Some("other")).is_err());
        assert!(r.check(t0, None, Some(&c.token)).is_err());
        let mut forged = c.clone();
        forged.access_key_id = "AKIDEXAMPLE".into();
        let e = r
            .check(t0, Some(&sign(&forged)), Some(&c.token))
            .unwrap_err();
        assert!(e.contains("AKIDEXAMPLE"), "{e}");
        assert!(!e.contains(&c.secret_access_key) && !e.contains(&c.token));
        let e = r
            .check(t0 + 30_000, Some(&sign(&c)), Some(&c.token))
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        assert_eq!(r.signed_by().get(&c.access_key_id), Some(&1));
        assert_eq!(r.refused(), 5);
        // Off: nothing checked.
        let mut off = RoleCredentials::new(CredentialSettings::default());
        assert_eq!(off.check(t0, None, None), Ok(()));
    }

    #[test]
    fn a_malformed_document_is_not_json() {
        let mut rng = SimRng::new(3);
        let mut r = RoleCredentials::new(CredentialSettings {
            malformed: true,
            ..CredentialSettings::default()
        });
        let body = r
            .get(0, &mut rng, "iam/security-credentials/vpc-sim-node-role")
            .flatten()
            .unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_err());
    }
}
