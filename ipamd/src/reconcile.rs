//! Reconcile by content (spec/ipamd.md 3.6, 5.3–5.6), with EC2 as the judge when instance
//! metadata disagrees.
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
//! [`needs_ec2`] and [`plan`] are pure; [`reconcile_once`] gathers EC2's answer, plans and
//! [`apply`]s the plan to the datastore (checkpoint written) and EC2 (tags).
//!
//! The module also holds the pure selection of leaked ENIs ([`select_leaked`], spec 5.6, with
//! the unparsable-`createdAt` quirk fixed: re-tagged and *not* deleted in that run) and subnet
//! discovery and exclusion ([`eligible_subnets`], [`subnet_excluded`], spec 5.3).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::datastore::{DataStore, EniSpec, IpamKey};
use crate::ec2::{
    Ec2Api, Ec2Error, EniInfo, SubnetInfo, DESCRIPTION_PREFIX, TAG_CLUSTER_NAME, TAG_CREATED_AT,
    TAG_INSTANCE_ID, TAG_NO_MANAGE, TAG_SUBNET_ROLE,
};
use crate::pool::{rfc3339, Pacer};
use crate::state::PoolState;
use crate::types::Ipv4Net;

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

/// Reconcile failures.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The checkpoint could not be written after a forced change.
    #[error("reconcile: checkpoint")]
    Checkpoint(#[from] crate::state::StateError),
    /// An EC2 call failed.
    #[error("reconcile: EC2 {op}")]
    Ec2 {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Ec2Error,
    },
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// ENIs added to the datastore: the daemon wires their host side ([`crate::host`]).
    pub adopted: Vec<AdoptedEni>,
    /// ENIs removed: the daemon deletes their host rules (by primary IP).
    pub evicted_enis: Vec<(String, Ipv4Addr)>,
    /// /32s and /28s added.
    pub added_cidrs: usize,
    /// /32s and /28s force-removed (`awscni_force_removed_ips`).
    pub evicted_cidrs: usize,
    /// Pods that lost their address.
    pub lost_pods: Vec<IpamKey>,
    /// ENIs tagged.
    pub tagged: Vec<String>,
    /// Tagging failures (kept going).
    pub tag_errors: Vec<Ec2Error>,
    /// ENIs left unchanged because IMDS and EC2 disagree.
    pub disputed: Vec<String>,
    /// Attached unmanaged ENIs.
    pub unmanaged: Vec<String>,
}

/// Applies a plan: datastore changes in one checkpointed step, then tags through EC2 (a tag
/// failure is reported, not fatal).
pub async fn apply(
    plan: Plan,
    state: &PoolState,
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
) -> Result<ApplyReport, ReconcileError> {
    let now = state.now();
    let mut report = ApplyReport {
        disputed: plan.disputed.clone(),
        unmanaged: plan.unmanaged.clone(),
        ..ApplyReport::default()
    };
    let ds_actions: Vec<&Action> = plan
        .actions
        .iter()
        .filter(|a| !matches!(a, Action::TagEni { .. }))
        .collect();
    if !ds_actions.is_empty() {
        let r = state
            .mutate_and_save(|ds| {
                let mut r = ApplyReport::default();
                for a in &ds_actions {
                    apply_one(ds, a, now, &mut r);
                }
                r
            })
            .await?;
        report.adopted = r.adopted;
        report.evicted_enis = r.evicted_enis;
        report.added_cidrs = r.added_cidrs;
        report.evicted_cidrs = r.evicted_cidrs;
        report.lost_pods = r.lost_pods;
    }
    for a in &plan.actions {
        if let Action::TagEni { eni, tags } = a {
            let res = pacer
                .call("CreateTags", || ec2.create_tags(eni, tags))
                .await;
            match res {
                Ok(()) => report.tagged.push(eni.clone()),
                Err(e) => {
                    tracing::warn!(eni, error = %e, "ENI not tagged");
                    report.tag_errors.push(e);
                }
            }
        }
    }
    for k in &report.lost_pods {
        tracing::warn!(container = %k.container_id, "pod lost its address: no longer on the ENI");
    }
    Ok(report)
}

fn apply_one(ds: &mut DataStore, a: &Action, now: Duration, r: &mut ApplyReport) {
    match a {
        Action::AdoptEni { eni, ips, prefixes } => {
            ds.add_eni(
                EniSpec {
                    id: eni.id.clone(),
                    mac: eni.mac.clone(),
                    is_primary: eni.device_number == 0 && eni.network_card == 0,
                    is_trunk: eni.is_trunk,
                    is_efa: eni.is_efa,
                    device_number: eni.device_number,
                    primary_ip: eni.primary_ip,
                    subnet_id: eni.subnet_id.clone(),
                    subnet_cidr: eni.subnet_cidr,
                    excluded: false,
                },
                now,
            );
            r.added_cidrs += add(ds, &eni.id, ips, prefixes);
            tracing::info!(eni = %eni.id, "ENI adopted by reconcile");
            r.adopted.push(eni.clone());
        }
        Action::AddAddresses { eni, ips, prefixes } => {
            r.added_cidrs += add(ds, eni, ips, prefixes);
        }
        Action::EvictAddresses { eni, cidrs, .. } => {
            for c in cidrs {
                if let Ok(lost) = ds.remove_cidr(eni, *c, true) {
                    r.evicted_cidrs += 1;
                    r.lost_pods.extend(lost);
                }
            }
        }
        Action::EvictEni {
            eni, primary_ip, ..
        } => {
            let n = ds.eni(eni).map_or(0, |e| e.cidrs.len());
            if let Ok(lost) = ds.remove_eni(eni, true) {
                tracing::warn!(eni, "ENI no longer attached: removed");
                r.evicted_cidrs += n;
                r.lost_pods.extend(lost);
                r.evicted_enis.push((eni.clone(), *primary_ip));
            }
        }
        Action::TagEni { .. } => {}
    }
}

fn add(ds: &mut DataStore, eni: &str, ips: &[Ipv4Addr], prefixes: &[Ipv4Net]) -> usize {
    let mut n = 0;
    for ip in ips {
        if ds.add_cidr(eni, Ipv4Net::host(*ip), false).is_ok() {
            n += 1;
        }
    }
    for p in prefixes {
        if ds.add_cidr(eni, *p, true).is_ok() {
            n += 1;
        }
    }
    n
}

/// One reconcile run: compares the datastore with IMDS, asks EC2 about the ENIs that differ
/// (one `DescribeNetworkInterfaces`, none when IMDS agrees), plans and applies. An EC2 failure
/// changes nothing (the next run tries again).
pub async fn reconcile_once(
    state: &PoolState,
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    imds: &[ImdsEni],
    released: &BTreeMap<Ipv4Net, Duration>,
    s: &ReconcileSettings,
) -> Result<ApplyReport, ReconcileError> {
    let known = known_enis(&state.lock());
    let ask = needs_ec2(&known, imds);
    if ask.is_empty() {
        return Ok(ApplyReport::default());
    }
    let described = describe_dropping_missing(ec2, pacer, ask).await;
    let described = match described {
        Ok(d) => d,
        Err(source) => {
            tracing::warn!(error = %source, "reconcile: EC2 unavailable, nothing changed");
            return Err(ReconcileError::Ec2 {
                op: "describe ENIs",
                source,
            });
        }
    };
    // The datastore may have changed during the EC2 call: plan on a fresh view.
    let known = known_enis(&state.lock());
    let p = plan(
        &ReconcileInput {
            known: &known,
            imds,
            ec2: Some(&described),
            released,
            now: state.now(),
        },
        s,
    );
    apply(p, state, ec2, pacer).await
}

/// `DescribeNetworkInterfaces` of `ids`; an id EC2 reports as not found is dropped from the
/// batch and the call repeated (reference `DescribeAllENIs`), so a missing ENI is simply
/// absent from the answer.
pub async fn describe_dropping_missing(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    mut ids: Vec<String>,
) -> Result<Vec<EniInfo>, Ec2Error> {
    loop {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let batch = ids.clone();
        match pacer
            .call("DescribeNetworkInterfaces", || ec2.describe_enis(&batch))
            .await
        {
            Ok(v) => return Ok(v),
            Err(e) if e.is_not_found() => {
                let bad = ids.iter().position(|id| e.message.contains(id.as_str()));
                match bad {
                    Some(i) => {
                        ids.remove(i);
                    }
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
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

/// Deletes this instance's own leftover ENIs ([`select_own_leftovers`]); returns those deleted.
pub async fn cleanup_own_leftovers(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    vpc_id: &str,
    cluster: Option<&str>,
    instance_id: &str,
) -> Result<LeakedReport, Ec2Error> {
    let cluster = cluster.filter(|c| !c.is_empty());
    let cands = leaked_candidates(ec2, pacer, vpc_id, cluster).await?;
    let mut report = LeakedReport::default();
    for eni in select_own_leftovers(&cands, instance_id) {
        delete_into(
            ec2,
            pacer,
            eni,
            "own ENI left unattached by an earlier run deleted",
            &mut report,
        )
        .await;
    }
    Ok(report)
}

/// The VPC's available ENIs tagged with an instance id (and the cluster, when set).
async fn leaked_candidates(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    vpc_id: &str,
    cluster: Option<&str>,
) -> Result<Vec<EniInfo>, Ec2Error> {
    pacer
        .call("DescribeNetworkInterfaces", || {
            ec2.describe_leaked_candidates(vpc_id, cluster)
        })
        .await
}

/// Deletes `eni` ("already gone" counts as deleted) and records the outcome in `report`.
async fn delete_into(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    eni: String,
    deleted: &'static str,
    report: &mut LeakedReport,
) {
    let r = pacer
        .call("DeleteNetworkInterface", || async {
            match ec2.delete_eni(&eni).await {
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            }
        })
        .await;
    match r {
        Ok(()) => {
            tracing::info!(eni, "{deleted}");
            report.deleted.push(eni);
        }
        Err(e) => report.errors.push(e),
    }
}

/// What [`cleanup_leaked`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakedReport {
    /// ENIs deleted.
    pub deleted: Vec<String>,
    /// ENIs tagged with `createdAt`.
    pub tagged: Vec<String>,
    /// Failures (kept going).
    pub errors: Vec<Ec2Error>,
}

/// One leaked-ENI cleanup run (the daemon calls it hourly after a random 0–300 s delay, unless
/// `DISABLE_LEAKED_ENI_CLEANUP`).
pub async fn cleanup_leaked(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    vpc_id: &str,
    cluster: Option<&str>,
    now: Duration,
) -> Result<LeakedReport, Ec2Error> {
    let cluster = cluster.filter(|c| !c.is_empty());
    let cands = leaked_candidates(ec2, pacer, vpc_id, cluster).await?;
    let mut report = LeakedReport::default();
    for a in select_leaked(&cands, cluster, now, LEAKED_ENI_MIN_AGE) {
        match a {
            LeakedAction::Tag { eni, created_at } => {
                let tags = BTreeMap::from([(TAG_CREATED_AT.to_owned(), created_at)]);
                match pacer
                    .call("CreateTags", || ec2.create_tags(&eni, &tags))
                    .await
                {
                    Ok(()) => report.tagged.push(eni),
                    Err(e) => report.errors.push(e),
                }
            }
            LeakedAction::Delete { eni } => {
                delete_into(ec2, pacer, eni, "leaked ENI deleted", &mut report).await
            }
        }
    }
    Ok(report)
}

/// Parses RFC 3339 (`2024-01-02T03:04:05Z`, optional fraction, `Z` or `±hh:mm`) to time
/// since the Unix epoch. `None` when unparsable or before 1970.
pub fn parse_rfc3339(s: &str) -> Option<Duration> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let digits = &f[..n.min(9)];
        nanos = digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32);
        rest = &f[n..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || rb[3] != b':' {
                return None;
            }
            let sign = match rb[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(secs).ok().map(|s| Duration::new(s, nanos))
}

/// `IsSubnetExcluded`: tag `kubernetes.io/role/cni=0` → excluded; cluster-scoped
/// (`cni.networking.k8s.aws/cluster/*`) without this cluster's tag → excluded; untagged or
/// unknown (`None`) → not excluded.
pub fn subnet_excluded(subnet: Option<&SubnetInfo>, cluster: &str) -> bool {
    let Some(s) = subnet else { return false };
    if s.tags.get(TAG_SUBNET_ROLE).map(String::as_str) == Some("0") {
        return true;
    }
    !cluster_tags_match(s, cluster)
}

fn cluster_tags_match(s: &SubnetInfo, cluster: &str) -> bool {
    if cluster.is_empty() {
        return true;
    }
    let scoped = s
        .tags
        .keys()
        .any(|k| k.starts_with(TAG_SUBNET_CLUSTER_PREFIX));
    !scoped
        || s.tags
            .contains_key(&format!("{TAG_SUBNET_CLUSTER_PREFIX}{cluster}"))
}

/// Subnet discovery: the subnets in which to try `CreateNetworkInterface`, most free addresses
/// first (ties by id). Eligible: role tag not `0`, and tagged or the node's primary subnet; with
/// a cluster name, cluster-scoped subnets must name it.
pub fn eligible_subnets(
    subnets: &[SubnetInfo],
    primary_subnet: &str,
    cluster: &str,
) -> Vec<SubnetInfo> {
    let mut v: Vec<SubnetInfo> = subnets
        .iter()
        .filter(|s| match s.tags.get(TAG_SUBNET_ROLE) {
            Some(v) => v != "0",
            None => s.id == primary_subnet,
        })
        .filter(|s| cluster_tags_match(s, cluster))
        .cloned()
        .collect();
    v.sort_by(|a, b| b.available.cmp(&a.available).then_with(|| a.id.cmp(&b.id)));
    v
}

/// The subnets for a new ENI: with discovery, [`eligible_subnets`] (on a `DescribeSubnets`
/// failure, `subnets` is `None`: the primary subnet unless excluded); without, the primary
/// subnet unless it is tagged `0`. Empty: no subnet may be used.
pub fn subnets_for_new_eni(
    discovery: bool,
    subnets: Option<&[SubnetInfo]>,
    primary_subnet: &str,
    cluster: &str,
) -> Vec<String> {
    let primary = subnets.and_then(|v| v.iter().find(|s| s.id == primary_subnet));
    if discovery {
        if let Some(all) = subnets {
            return eligible_subnets(all, primary_subnet, cluster)
                .into_iter()
                .map(|s| s.id)
                .collect();
        }
        if subnet_excluded(primary, cluster) {
            return Vec::new();
        }
        return vec![primary_subnet.to_owned()];
    }
    let tagged_off =
        primary.is_some_and(|s| s.tags.get(TAG_SUBNET_ROLE).map(String::as_str) == Some("0"));
    if tagged_off {
        Vec::new()
    } else {
        vec![primary_subnet.to_owned()]
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
