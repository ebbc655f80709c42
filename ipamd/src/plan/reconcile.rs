//! The reconcile planner (spec/ipamd.md 3.6, 5.3–5.6): how the datastore follows instance
//! metadata, with EC2 as the judge when they disagree, and which ENIs are leaked. Pure: the
//! inputs are the datastore's view, IMDS's and EC2's answers and the time;
//! [`crate::run::reconcile`] gathers them and carries the plan out.
//!
//! The reference trusts IMDS for ENI membership and compares address *counts*; a stale IMDS
//! answer makes it force-release addresses that pods still use (spec/cni.md 7, pain 14). Here:
//!
//! - an ENI joins or leaves the datastore only when IMDS **and** EC2 agree that it is (or is no
//!   longer) attached to this instance; while they disagree nothing changes;
//! - an ENI's address set is compared by content; when IMDS and the datastore differ, EC2's
//!   `DescribeNetworkInterfaces` answer is the truth, and without an EC2 answer nothing changes;
//! - CIDRs released by the pool less than [`RECONCILE_COOLDOWN`] ago are not re-added (EC2 and
//!   IMDS may still list them);
//! - unmanaged ENIs (spec 5.5) are never adopted, tagged or evicted.
//!
//! [`needs_ec2`] says which ENIs need EC2's answer; [`plan`] decides. Leaked ENIs
//! ([`select_leaked`], spec 5.6, with the unparsable-`createdAt` quirk fixed: re-tagged and
//! *not* deleted in that run) and this instance's own leftovers ([`select_own_leftovers`]) are
//! selected here too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::io::ec2::{
    EniInfo, DESCRIPTION_PREFIX, TAG_CLUSTER_NAME, TAG_CREATED_AT, TAG_INSTANCE_ID, TAG_NO_MANAGE,
};
use crate::store::datastore::{DataStore, IpamKey};
use crate::types::{parse_rfc3339, rfc3339, Ipv4Net};

/// A CIDR released by the pool is not re-added by reconcile for this long (reference: 60 s).
pub const RECONCILE_COOLDOWN: Duration = Duration::from_secs(60);
/// Leaked ENIs younger than this are left alone (reference: 5 min).
pub const LEAKED_ENI_MIN_AGE: Duration = Duration::from_secs(300);
/// Subnet tag prefix scoping a subnet to clusters.
pub const TAG_SUBNET_CLUSTER_PREFIX: &str = "cni.networking.k8s.aws/cluster/";

/// One ENI as the datastore holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownEni {
    /// ENI id.
    pub id: String,
    /// Device number.
    pub device_number: u32,
    /// The ENI's primary IP (never a pod address).
    pub primary_ip: Ipv4Addr,
    /// The instance's primary ENI (never evicted).
    pub is_primary: bool,
    /// /32s and /28s, with the pods holding addresses in them.
    pub cidrs: BTreeMap<Ipv4Net, KnownCidr>,
}

/// One /32 or /28 in the datastore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownCidr {
    /// A /28 prefix.
    pub is_prefix: bool,
    /// Pods holding an address in it.
    pub pods: Vec<IpamKey>,
}

/// One ENI as instance metadata lists it (`network/interfaces/macs/<mac>/...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsEni {
    /// `interface-id`.
    pub id: String,
    /// `mac` (lower case).
    pub mac: String,
    /// `device-number`.
    pub device_number: u32,
    /// `network-card` (0 when absent).
    pub network_card: u32,
    /// `subnet-id`.
    pub subnet_id: String,
    /// `subnet-ipv4-cidr-block`.
    pub subnet_cidr: Option<Ipv4Net>,
    /// First of `local-ipv4s`.
    pub primary_ip: Option<Ipv4Addr>,
    /// The rest of `local-ipv4s`.
    pub secondary_ips: Vec<Ipv4Addr>,
    /// `ipv4-prefix`.
    pub prefixes: Vec<Ipv4Net>,
}

/// Reconcile settings taken from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// This instance.
    pub instance_id: String,
    /// `MANAGE_UNTAGGED_ENI`.
    pub manage_untagged: bool,
    /// `ENABLE_MULTI_NIC` (else network cards > 0 are skipped).
    pub multi_nic: bool,
    /// Tags every managed ENI carries ([`crate::config::Config::eni_tags`]).
    pub tags: BTreeMap<String, String>,
    /// EC2 may be changed (tags); false with `DISABLE_NETWORK_RESOURCE_PROVISIONING`.
    pub provisioning: bool,
    /// The reconcile cooldown for released CIDRs ([`RECONCILE_COOLDOWN`]).
    pub cooldown: Duration,
}

impl ReconcileSettings {
    /// From the daemon's configuration (`DISABLE_NETWORK_RESOURCE_PROVISIONING` and
    /// `ENABLE_IMDS_ONLY_MODE` turn tagging off).
    pub fn from_config(cfg: &crate::config::Config, instance_id: &str) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            manage_untagged: cfg.manage_untagged_eni,
            multi_nic: cfg.enable_multi_nic,
            tags: cfg.eni_tags(instance_id),
            provisioning: !cfg.disable_provisioning,
            cooldown: RECONCILE_COOLDOWN,
        }
    }
}

/// How an attached ENI is treated (spec 5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EniClass {
    /// Allocated from, tagged, freed.
    Managed,
    /// In the datastore, never allocated from, tagged or freed (VPC resource controller's).
    Trunk,
    /// Managed but never freed.
    Efa,
    /// `no_manage=true`, or untagged with `MANAGE_UNTAGGED_ENI=false`, or another instance's.
    Unmanaged,
    /// `efa-only`: skipped.
    EfaOnly,
    /// On a network card > 0 without `ENABLE_MULTI_NIC`: skipped.
    OtherCard,
}

impl EniClass {
    /// Whether the ENI belongs in the datastore.
    pub fn in_datastore(self) -> bool {
        matches!(self, EniClass::Managed | EniClass::Trunk | EniClass::Efa)
    }
}

/// Classifies an attached ENI (spec 5.5). The primary ENI is always managed.
pub fn classify(eni: &EniInfo, is_primary: bool, s: &ReconcileSettings) -> EniClass {
    let card = eni.attachment.as_ref().map_or(0, |a| a.network_card);
    if eni.interface_type == "efa-only" {
        return EniClass::EfaOnly;
    }
    if card > 0 && !s.multi_nic {
        return EniClass::OtherCard;
    }
    if !is_primary {
        if let Some(v) = eni.tags.get(TAG_NO_MANAGE) {
            if v == "true" {
                return EniClass::Unmanaged;
            }
        } else {
            match eni.tags.get(TAG_INSTANCE_ID) {
                Some(id) if *id == s.instance_id => {}
                Some(_) => return EniClass::Unmanaged,
                None if !s.manage_untagged => return EniClass::Unmanaged,
                None => {}
            }
        }
    }
    match eni.interface_type.as_str() {
        "trunk" => EniClass::Trunk,
        "efa" => EniClass::Efa,
        _ => EniClass::Managed,
    }
}

/// The tags of `desired` that `have` lacks or has with another value (`TagENI` sends only these).
pub fn missing_tags(
    have: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    desired
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// An ENI to add to the datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedEni {
    /// ENI id.
    pub id: String,
    /// MAC.
    pub mac: String,
    /// Device number (IMDS).
    pub device_number: u32,
    /// Network card (IMDS).
    pub network_card: u32,
    /// Primary IP.
    pub primary_ip: Ipv4Addr,
    /// Subnet.
    pub subnet_id: String,
    /// Subnet CIDR (IMDS).
    pub subnet_cidr: Ipv4Net,
    /// Trunk ENI.
    pub is_trunk: bool,
    /// EFA ENI.
    pub is_efa: bool,
}

/// One reconcile step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// An attached ENI unknown to the datastore: add it with its addresses (then wire the host).
    AdoptEni {
        /// The ENI.
        eni: AdoptedEni,
        /// Secondary /32s.
        ips: Vec<Ipv4Addr>,
        /// /28 prefixes.
        prefixes: Vec<Ipv4Net>,
    },
    /// Addresses EC2 lists that the datastore lacks.
    AddAddresses {
        /// ENI id.
        eni: String,
        /// Secondary /32s.
        ips: Vec<Ipv4Addr>,
        /// /28 prefixes.
        prefixes: Vec<Ipv4Net>,
    },
    /// Addresses no longer on the ENI: force-removed.
    EvictAddresses {
        /// ENI id.
        eni: String,
        /// The /32s and /28s.
        cidrs: Vec<Ipv4Net>,
        /// Pods that lose their address.
        pods: Vec<IpamKey>,
    },
    /// An ENI no longer attached: force-removed.
    EvictEni {
        /// ENI id.
        eni: String,
        /// Its primary IP (host rules to delete).
        primary_ip: Ipv4Addr,
        /// Pods that lose their address.
        pods: Vec<IpamKey>,
    },
    /// `CreateTags` with the missing tags.
    TagEni {
        /// ENI id.
        eni: String,
        /// Tags to set.
        tags: BTreeMap<String, String>,
    },
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Steps, in order.
    pub actions: Vec<Action>,
    /// Attached ENIs not managed (count for `hasRoomForEni` and metrics).
    pub unmanaged: Vec<String>,
    /// ENIs on which IMDS and EC2 disagree (left unchanged this run).
    pub disputed: Vec<String>,
}

/// The inputs of one reconcile run.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileInput<'a> {
    /// The datastore's ENIs.
    pub known: &'a [KnownEni],
    /// IMDS's attached ENIs.
    pub imds: &'a [ImdsEni],
    /// EC2's description of the ENIs of [`needs_ec2`] (None: not asked or failed).
    pub ec2: Option<&'a [EniInfo]>,
    /// CIDRs the pool released, with when.
    pub released: &'a BTreeMap<Ipv4Net, Duration>,
    /// Now (since the Unix epoch).
    pub now: Duration,
}

/// The datastore's ENIs in reconcile's terms.
pub fn known_enis(ds: &DataStore) -> Vec<KnownEni> {
    ds.enis()
        .values()
        .map(|e| KnownEni {
            id: e.id.clone(),
            device_number: e.device_number,
            primary_ip: e.primary_ip,
            is_primary: e.is_primary,
            cidrs: e
                .cidrs
                .iter()
                .map(|(c, info)| {
                    (
                        *c,
                        KnownCidr {
                            is_prefix: info.is_prefix,
                            pods: info
                                .addresses
                                .values()
                                .filter_map(|a| a.key.clone())
                                .collect(),
                        },
                    )
                })
                .collect(),
        })
        .collect()
}

fn imds_set(i: &ImdsEni, primary_ip: Ipv4Addr) -> BTreeSet<Ipv4Net> {
    i.secondary_ips
        .iter()
        .filter(|ip| **ip != primary_ip)
        .map(|ip| Ipv4Net::host(*ip))
        .chain(i.prefixes.iter().map(Ipv4Net::trunc))
        .collect()
}

fn ec2_set(e: &EniInfo) -> BTreeSet<Ipv4Net> {
    e.secondary_ips
        .iter()
        .filter(|ip| Some(**ip) != e.primary_ip)
        .map(|ip| Ipv4Net::host(*ip))
        .chain(e.prefixes.iter().map(Ipv4Net::trunc))
        .collect()
}

/// The ENIs EC2 must describe: IMDS-listed ENIs unknown to the datastore, datastore ENIs IMDS
/// does not list, and ENIs whose address set differs from IMDS's. Empty: IMDS agrees with the
/// datastore and no EC2 call is needed (pain 5: fewer `DescribeNetworkInterfaces`).
pub fn needs_ec2(known: &[KnownEni], imds: &[ImdsEni]) -> Vec<String> {
    let mut out = BTreeSet::new();
    let by_id: BTreeMap<&str, &KnownEni> = known.iter().map(|k| (k.id.as_str(), k)).collect();
    for i in imds {
        match by_id.get(i.id.as_str()) {
            None => {
                out.insert(i.id.clone());
            }
            Some(k) => {
                let ds: BTreeSet<Ipv4Net> = k.cidrs.keys().copied().collect();
                if ds != imds_set(i, k.primary_ip) {
                    out.insert(i.id.clone());
                }
            }
        }
    }
    for k in known {
        if !imds.iter().any(|i| i.id == k.id) {
            out.insert(k.id.clone());
        }
    }
    out.into_iter().collect()
}

fn fresh(released: &BTreeMap<Ipv4Net, Duration>, c: &Ipv4Net, now: Duration, cd: Duration) -> bool {
    released.get(c).is_some_and(|t| now.saturating_sub(*t) < cd)
}

/// Plans one reconcile run (pure). See the module docs for the rules.
pub fn plan(input: &ReconcileInput<'_>, s: &ReconcileSettings) -> Plan {
    let mut p = Plan::default();
    let ec2: BTreeMap<&str, &EniInfo> = input
        .ec2
        .unwrap_or(&[])
        .iter()
        .map(|e| (e.id.as_str(), e))
        .collect();
    let ec2_ok = input.ec2.is_some();
    let attached_here = |e: &EniInfo| {
        e.attachment
            .as_ref()
            .is_some_and(|a| a.instance_id == s.instance_id)
    };
    let known: BTreeMap<&str, &KnownEni> = input.known.iter().map(|k| (k.id.as_str(), k)).collect();
    let imds: BTreeMap<&str, &ImdsEni> = input.imds.iter().map(|i| (i.id.as_str(), i)).collect();

    // ENIs IMDS lists.
    for i in input.imds {
        let e = ec2.get(i.id.as_str()).copied();
        match known.get(i.id.as_str()) {
            None => {
                let Some(e) = e else {
                    if ec2_ok {
                        p.disputed.push(i.id.clone());
                    }
                    continue;
                };
                if !attached_here(e) {
                    p.disputed.push(i.id.clone());
                    continue;
                }
                let class = classify(e, i.device_number == 0 && i.network_card == 0, s);
                if !class.in_datastore() {
                    p.unmanaged.push(i.id.clone());
                    continue;
                }
                let (Some(primary_ip), Some(subnet_cidr)) =
                    (e.primary_ip.or(i.primary_ip), i.subnet_cidr)
                else {
                    p.disputed.push(i.id.clone());
                    continue;
                };
                let set = ec2_set(e);
                let ips = set
                    .iter()
                    .filter(|c| c.prefix_len() == 32)
                    .filter(|c| !fresh(input.released, c, input.now, s.cooldown))
                    .map(Ipv4Net::addr)
                    .collect();
                let prefixes = set
                    .iter()
                    .filter(|c| c.prefix_len() != 32)
                    .filter(|c| !fresh(input.released, c, input.now, s.cooldown))
                    .copied()
                    .collect();
                p.actions.push(Action::AdoptEni {
                    eni: AdoptedEni {
                        id: i.id.clone(),
                        mac: i.mac.clone(),
                        device_number: i.device_number,
                        network_card: i.network_card,
                        primary_ip,
                        subnet_id: e.subnet_id.clone(),
                        subnet_cidr,
                        is_trunk: class == EniClass::Trunk,
                        is_efa: class == EniClass::Efa,
                    },
                    ips,
                    prefixes,
                });
                if class != EniClass::Trunk && s.provisioning {
                    let tags = missing_tags(&e.tags, &s.tags);
                    if !tags.is_empty() {
                        p.actions.push(Action::TagEni {
                            eni: i.id.clone(),
                            tags,
                        });
                    }
                }
            }
            Some(k) => {
                let ds: BTreeSet<Ipv4Net> = k.cidrs.keys().copied().collect();
                if ds == imds_set(i, k.primary_ip) {
                    continue; // IMDS agrees with the datastore.
                }
                let Some(e) = e else {
                    if ec2_ok {
                        p.disputed.push(i.id.clone());
                    }
                    continue;
                };
                if !attached_here(e) {
                    // IMDS says attached, EC2 says not: wait until they agree.
                    p.disputed.push(i.id.clone());
                    continue;
                }
                reconcile_addresses(&mut p, k, &ec2_set(e), input, s);
            }
        }
    }

    // Datastore ENIs IMDS does not list: evicted only when EC2 agrees they are gone.
    for k in input.known {
        if imds.contains_key(k.id.as_str()) || k.is_primary {
            continue;
        }
        if !ec2_ok {
            continue;
        }
        match ec2.get(k.id.as_str()) {
            Some(e) if attached_here(e) => {
                // Stale IMDS: EC2 still has it here. Keep it, and its addresses as EC2 says.
                p.disputed.push(k.id.clone());
                reconcile_addresses(&mut p, k, &ec2_set(e), input, s);
            }
            _ => p.actions.push(Action::EvictEni {
                eni: k.id.clone(),
                primary_ip: k.primary_ip,
                pods: k.cidrs.values().flat_map(|c| c.pods.clone()).collect(),
            }),
        }
    }
    p
}

fn reconcile_addresses(
    p: &mut Plan,
    k: &KnownEni,
    truth: &BTreeSet<Ipv4Net>,
    input: &ReconcileInput<'_>,
    s: &ReconcileSettings,
) {
    let mut ips = Vec::new();
    let mut prefixes = Vec::new();
    for c in truth {
        if k.cidrs.contains_key(c) || fresh(input.released, c, input.now, s.cooldown) {
            continue;
        }
        if c.prefix_len() == 32 {
            ips.push(c.addr());
        } else {
            prefixes.push(*c);
        }
    }
    if !ips.is_empty() || !prefixes.is_empty() {
        p.actions.push(Action::AddAddresses {
            eni: k.id.clone(),
            ips,
            prefixes,
        });
    }
    let gone: Vec<Ipv4Net> = k
        .cidrs
        .keys()
        .filter(|c| !truth.contains(c))
        .copied()
        .collect();
    if !gone.is_empty() {
        let pods = gone.iter().flat_map(|c| k.cidrs[c].pods.clone()).collect();
        p.actions.push(Action::EvictAddresses {
            eni: k.id.clone(),
            cidrs: gone,
            pods,
        });
    }
}

/// What leaked-ENI cleanup does with one candidate (spec 5.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeakedAction {
    /// No or unparsable `createdAt`: tag it with now, delete in a later run.
    Tag {
        /// ENI id.
        eni: String,
        /// The `createdAt` value to set.
        created_at: String,
    },
    /// Old enough: delete.
    Delete {
        /// ENI id.
        eni: String,
    },
}

/// Chooses what to do with leaked-ENI candidates: ours by description (`aws-K8S-`) and the
/// instance-id tag key, `available` and unattached, and (when a cluster is set) tagged with
/// it. Younger than `min_age` → left; without a parsable `createdAt` → tagged, not deleted.
pub fn select_leaked(
    candidates: &[EniInfo],
    cluster: Option<&str>,
    now: Duration,
    min_age: Duration,
) -> Vec<LeakedAction> {
    let mut out = Vec::new();
    for e in candidates {
        if !e.description.starts_with(DESCRIPTION_PREFIX)
            || e.status != "available"
            || e.attachment.is_some()
            || !e.tags.contains_key(TAG_INSTANCE_ID)
        {
            continue;
        }
        if let Some(c) = cluster.filter(|c| !c.is_empty()) {
            if e.tags.get(TAG_CLUSTER_NAME).map(String::as_str) != Some(c) {
                continue;
            }
        }
        match e.tags.get(TAG_CREATED_AT).and_then(|t| parse_rfc3339(t)) {
            None => out.push(LeakedAction::Tag {
                eni: e.id.clone(),
                created_at: rfc3339(now),
            }),
            Some(t) if now.saturating_sub(t) >= min_age && now >= t => {
                out.push(LeakedAction::Delete { eni: e.id.clone() })
            }
            Some(_) => {}
        }
    }
    out
}

/// This instance's own leftovers among leaked-ENI candidates: ENIs it created (description
/// `aws-K8S-`, tagged with its instance id) that are `available` and unattached. Only a crash
/// between `CreateNetworkInterface` and `AttachNetworkInterface`, or between a detach and the
/// delete that follows, leaves such an ENI: the daemon deletes them at start, whatever their
/// age, instead of leaving them for the hourly cleanup (which waits five minutes).
pub fn select_own_leftovers(candidates: &[EniInfo], instance_id: &str) -> Vec<String> {
    candidates
        .iter()
        .filter(|e| {
            e.description.starts_with(DESCRIPTION_PREFIX)
                && e.status == "available"
                && e.attachment.is_none()
                && !instance_id.is_empty()
                && e.tags.get(TAG_INSTANCE_ID).map(String::as_str) == Some(instance_id)
        })
        .map(|e| e.id.clone())
        .collect()
}
