//! The datastore: ENIs, their CIDRs (IPv4 /32s and /28s, or IPv6 /80s) and which pod holds
//! which address (spec/ipamd.md 3.1-3.4). One datastore holds one card's addresses of one
//! [`Family`]; `DataStore` alone means the IPv4 one. Pure and synchronous: time is a parameter (a [`Duration`] since the
//! Unix epoch), and persistence is the caller's job (see [`crate::store::commit`]), which writes the
//! checkpoint after changes (in groups), confirms releases once they are on disk and undoes
//! the changes of a write that failed.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use subnet_calc::policy::EniView;

use crate::store::checkpoint::{Allocation, CheckpointFile, IpamMetadata};
pub use crate::store::family::{Family, V4, V6};
use crate::types::Ipv4Net;

/// The network name of entries migrated from the CRI checkpoint.
pub const MIGRATED_NETWORK: &str = "_migrated-from-cri";
/// The interface name of entries migrated from the CRI checkpoint.
pub const MIGRATED_IFNAME: &str = "unknown";

/// The assignment key, per the CNI spec: (network name, container id, interface).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpamKey {
    /// CNI network name.
    #[serde(rename = "networkName")]
    pub network_name: String,
    /// Sandbox container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the pod.
    #[serde(rename = "ifName")]
    pub if_name: String,
}

impl IpamKey {
    /// A key.
    pub fn new(network: &str, container: &str, ifname: &str) -> Self {
        Self {
            network_name: network.into(),
            container_id: container.into(),
            if_name: ifname.into(),
        }
    }

    /// The container id as logs show it: its first [`SHORT_ID_LEN`] characters (what
    /// `crictl` and `docker` print). A full sandbox id is what a caller needs to forge a
    /// DelNetwork on the socket, so logs never carry one.
    pub fn short_container(&self) -> &str {
        short_id(&self.container_id)
    }
}

/// How many characters of a container id logs keep ([`short_id`]).
pub const SHORT_ID_LEN: usize = 12;

/// The first [`SHORT_ID_LEN`] characters of a container id (all of a shorter one).
pub fn short_id(id: &str) -> &str {
    match id.char_indices().nth(SHORT_ID_LEN) {
        Some((end, _)) => &id[..end],
        None => id,
    }
}

/// One address's bookkeeping (exists once the address was assigned at least once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    /// The pod holding it.
    pub key: Option<IpamKey>,
    /// Pod metadata.
    pub metadata: IpamMetadata,
    /// When it was assigned.
    pub assigned_at: Duration,
    /// When it was last unassigned (cooldown starts).
    pub unassigned_at: Option<Duration>,
    /// Released by a DEL whose checkpoint write is not on disk yet: not handed out again, and
    /// its CIDR not given back to EC2, until it is (the release may still be undone).
    pub release_pending: bool,
}

/// A secondary address (/32) or prefix (/28, /80) on an ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrInfo<F: Family = V4> {
    /// The network.
    pub cidr: F::Net,
    /// A prefix (else a secondary IP).
    pub is_prefix: bool,
    /// Addresses with bookkeeping.
    pub addresses: BTreeMap<F::Addr, AddressInfo>,
}

impl<F: Family> CidrInfo<F> {
    /// Addresses held by a pod, or whose release is not yet durable.
    fn assigned(&self) -> usize {
        self.addresses
            .values()
            .filter(|a| a.key.is_some() || a.release_pending)
            .count()
    }

    fn cooling(&self, now: Duration, cooldown: Duration) -> usize {
        self.addresses
            .values()
            .filter(|a| is_cooling(a, now, cooldown))
            .count()
    }
}

fn is_cooling(a: &AddressInfo, now: Duration, cooldown: Duration) -> bool {
    a.key.is_none()
        && !a.release_pending
        && a.unassigned_at
            .is_some_and(|t| now.saturating_sub(t) <= cooldown)
}

/// What the datastore knows about one ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eni<F: Family = V4> {
    /// ENI id.
    pub id: String,
    /// MAC address.
    pub mac: String,
    /// The instance's primary ENI.
    pub is_primary: bool,
    /// Trunk ENI (never allocated from).
    pub is_trunk: bool,
    /// EFA ENI (never freed).
    pub is_efa: bool,
    /// Device number.
    pub device_number: u32,
    /// The ENI's primary IP.
    pub primary_ip: Ipv4Addr,
    /// Subnet.
    pub subnet_id: String,
    /// Subnet CIDR.
    pub subnet_cidr: Ipv4Net,
    /// Excluded from pod addresses (subnet tagged `kubernetes.io/role/cni=0`).
    pub excluded: bool,
    /// Route table id (254 for the primary ENI, device number + 1 otherwise).
    pub route_table_id: u32,
    /// When the datastore learnt of the ENI.
    pub created_at: Duration,
    /// Secondary addresses and prefixes of the datastore's family.
    pub cidrs: BTreeMap<F::Net, CidrInfo<F>>,
}

/// A new ENI for [`DataStore::add_eni`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniSpec {
    /// ENI id.
    pub id: String,
    /// MAC.
    pub mac: String,
    /// Primary ENI.
    pub is_primary: bool,
    /// Trunk.
    pub is_trunk: bool,
    /// EFA.
    pub is_efa: bool,
    /// Device number.
    pub device_number: u32,
    /// Primary IP.
    pub primary_ip: Ipv4Addr,
    /// Subnet.
    pub subnet_id: String,
    /// Subnet CIDR.
    pub subnet_cidr: Ipv4Net,
    /// Excluded subnet.
    pub excluded: bool,
}

/// Datastore failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsError {
    /// No free address (`AssignPodIPAddress: no available IP/Prefix addresses`).
    #[error("AssignPodIPAddress: no available IP/Prefix addresses")]
    NoAvailableIp,
    /// DEL of a key that holds nothing. The text is a contract with the CNI plugin.
    #[error("datastore: unknown pod")]
    UnknownPod,
    /// No such ENI.
    #[error("datastore: unknown ENI {0}")]
    UnknownEni(String),
    /// The ENI or CIDR still has pods.
    #[error("datastore: {0} has assigned addresses")]
    InUse(String),
    /// Two checkpoint allocations name the same address.
    #[error("checkpoint: address {0} is allocated twice (field ipv4/ipv6 of two allocations)")]
    DuplicateIp(String),
    /// A checkpoint allocation with an unparsable address.
    #[error("checkpoint: bad address {0:?} (field ipv4/ipv6 of an allocation)")]
    BadAddress(String),
    /// Two checkpoint allocations of the same pod key (networkName, containerID, ifName).
    #[error("checkpoint: key {0} holds two addresses (fields networkName, containerID, ifName of two allocations)")]
    DuplicateKey(String),
}

/// A successful assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment<F: Family = V4> {
    /// The address.
    pub ip: F::Addr,
    /// Its ENI.
    pub eni_id: String,
    /// The ENI's device number.
    pub device_number: u32,
    /// The ENI's route table.
    pub route_table_id: u32,
    /// False when the key already held this address (idempotent repeat; nothing changed).
    pub fresh: bool,
    /// The address's bookkeeping before this assignment (to undo it exactly: a reused
    /// address keeps its history).
    pub previous: Option<AddressInfo>,
}

/// A successful unassignment (enough to undo it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unassignment<F: Family = V4> {
    /// The address.
    pub ip: F::Addr,
    /// Its ENI.
    pub eni_id: String,
    /// The ENI's device number.
    pub device_number: u32,
    /// The ENI's route table.
    pub route_table_id: u32,
    /// The CIDR holding it.
    pub cidr: F::Net,
    /// The key that held it.
    pub key: IpamKey,
    /// Its metadata.
    pub metadata: IpamMetadata,
    /// When it had been assigned.
    pub assigned_at: Duration,
    /// When it was unassigned before (for undo).
    pub previous_unassigned_at: Option<Duration>,
}

/// An assignment as the orphan sweep sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<F: Family = V4> {
    /// The address.
    pub ip: F::Addr,
    /// The key holding it.
    pub key: IpamKey,
    /// Pod metadata (namespace and name; empty when the request had none).
    pub metadata: IpamMetadata,
    /// When it was assigned (the datastore's clock).
    pub assigned_at: Duration,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport<F: Family = V4> {
    /// Allocations restored.
    pub restored: usize,
    /// Allocations dropped because the pod's host veth is gone (their ip rules should go too).
    pub dropped_stale: Vec<(F::Addr, IpamKey)>,
    /// Allocations dropped because no known CIDR holds the address.
    pub dropped_unknown: Vec<(F::Addr, IpamKey)>,
    /// Allocations without an address of this datastore's family (the other family's
    /// entries), left alone.
    pub other_family: usize,
}

impl<F: Family> Default for RestoreReport<F> {
    fn default() -> Self {
        Self {
            restored: 0,
            dropped_stale: Vec::new(),
            dropped_unknown: Vec::new(),
            other_family: 0,
        }
    }
}

/// Totals (for metrics and introspection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Addresses of every CIDR of every ENI (prefixes count 16).
    pub total: u64,
    /// Assigned addresses.
    pub assigned: u64,
    /// /28 prefixes.
    pub prefixes: u64,
    /// ENIs.
    pub enis: u64,
}

/// The datastore of one network card and address family.
#[derive(Debug, Clone)]
pub struct DataStore<F: Family = V4> {
    enis: BTreeMap<String, Eni<F>>,
    by_key: HashMap<IpamKey, (String, F::Net, F::Addr)>,
    prefix_mode: bool,
    both_kinds: bool,
    skip_primary: bool,
    cooldown: Duration,
    /// Each assigned address's checkpoint entry, serialised when it was assigned, in address
    /// order: a checkpoint write joins them instead of rebuilding and serialising every entry.
    image: BTreeMap<F::Addr, Box<[u8]>>,
}

/// The checkpoint's bytes before the first entry (`serde_json` of [`CheckpointFile`]).
const IMAGE_HEAD: &[u8] = br#"{"version":"vpc-cni-ipam/1","allocations":["#;
/// The bytes after the last entry, with the file's trailing newline.
const IMAGE_TAIL: &[u8] = b"]}\n";

impl DataStore<V4> {
    /// An empty datastore. `both_kinds`: addresses of both kinds serve pods (our prefix
    /// fallback); otherwise only the current mode's kind does. `skip_primary`: custom
    /// networking (the primary ENI carries no pods).
    pub fn new(
        prefix_mode: bool,
        both_kinds: bool,
        skip_primary: bool,
        cooldown: Duration,
    ) -> Self {
        Self {
            enis: BTreeMap::new(),
            by_key: HashMap::new(),
            prefix_mode,
            both_kinds,
            skip_primary,
            cooldown,
            image: BTreeMap::new(),
        }
    }
}

impl DataStore<V6> {
    /// An empty IPv6 datastore: /80 prefixes on ENIs, every ENI serving pods unless its
    /// subnet is excluded (the reference's IPv6 mode: prefix delegation, no custom networking).
    pub fn new_v6(cooldown: Duration) -> Self {
        Self {
            enis: BTreeMap::new(),
            by_key: HashMap::new(),
            prefix_mode: true,
            both_kinds: false,
            skip_primary: false,
            cooldown,
            image: BTreeMap::new(),
        }
    }
}

impl<F: Family> DataStore<F> {
    /// Records `ip`'s checkpoint entry (it is now held by `key`).
    fn image_put(&mut self, ip: F::Addr, key: &IpamKey, md: &IpamMetadata, at: Duration) {
        // Strings and integers only: serialising cannot fail.
        let entry = serde_json::to_vec(&F::allocation(ip, key, md, at)).unwrap_or_default();
        self.image.insert(ip, entry.into_boxed_slice());
    }

    /// Forgets `key`'s mapping and its checkpoint entry.
    fn forget_key(&mut self, key: &IpamKey) -> Option<(String, F::Net, F::Addr)> {
        let r = self.by_key.remove(key);
        if let Some((_, _, ip)) = &r {
            self.image.remove(ip);
        }
        r
    }

    /// The checkpoint file's bytes (as `serde_json` writes [`checkpoint`](Self::checkpoint),
    /// plus the trailing newline), from the entries kept since each assignment.
    pub fn checkpoint_bytes(&self) -> Vec<u8> {
        let body: usize = self.image.values().map(|e| e.len() + 1).sum();
        let mut out = Vec::with_capacity(IMAGE_HEAD.len() + body + IMAGE_TAIL.len());
        out.extend_from_slice(IMAGE_HEAD);
        for (i, e) in self.image.values().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(e);
        }
        out.extend_from_slice(IMAGE_TAIL);
        out
    }

    /// Prefix mode.
    pub fn prefix_mode(&self) -> bool {
        self.prefix_mode
    }

    /// The ENIs, by id.
    pub fn enis(&self) -> &BTreeMap<String, Eni<F>> {
        &self.enis
    }

    /// One ENI.
    pub fn eni(&self, id: &str) -> Option<&Eni<F>> {
        self.enis.get(id)
    }

    /// ENI ids in policy order: primary first, then by device number.
    pub fn ordered_ids(&self) -> Vec<String> {
        let mut v: Vec<&Eni<F>> = self.enis.values().collect();
        v.sort_by_key(|e| (!e.is_primary, e.device_number, e.id.clone()));
        v.into_iter().map(|e| e.id.clone()).collect()
    }

    /// Adds an ENI (idempotent: an existing ENI is left as it is).
    pub fn add_eni(&mut self, spec: EniSpec, now: Duration) {
        let route_table_id = if spec.is_primary {
            254
        } else {
            spec.device_number + 1
        };
        self.enis.entry(spec.id.clone()).or_insert(Eni {
            id: spec.id,
            mac: spec.mac,
            is_primary: spec.is_primary,
            is_trunk: spec.is_trunk,
            is_efa: spec.is_efa,
            device_number: spec.device_number,
            primary_ip: spec.primary_ip,
            subnet_id: spec.subnet_id,
            subnet_cidr: spec.subnet_cidr,
            excluded: spec.excluded,
            route_table_id,
            created_at: now,
            cidrs: BTreeMap::new(),
        });
    }

    /// Adds a secondary address or prefix to an ENI (idempotent).
    pub fn add_cidr(&mut self, eni: &str, cidr: F::Net, is_prefix: bool) -> Result<(), DsError> {
        let e = self
            .enis
            .get_mut(eni)
            .ok_or_else(|| DsError::UnknownEni(eni.into()))?;
        let cidr = F::trunc(cidr);
        e.cidrs.entry(cidr).or_insert(CidrInfo {
            cidr,
            is_prefix,
            addresses: BTreeMap::new(),
        });
        Ok(())
    }

    /// Removes a CIDR. Unforced, it fails if an address is assigned; forced, it returns the
    /// keys that lost their address.
    pub fn remove_cidr(
        &mut self,
        eni: &str,
        cidr: F::Net,
        force: bool,
    ) -> Result<Vec<IpamKey>, DsError> {
        let e = self
            .enis
            .get_mut(eni)
            .ok_or_else(|| DsError::UnknownEni(eni.into()))?;
        let Some(c) = e.cidrs.get(&cidr) else {
            return Ok(Vec::new());
        };
        if !force && c.assigned() > 0 {
            return Err(DsError::InUse(cidr.to_string()));
        }
        let lost: Vec<IpamKey> = c.addresses.values().filter_map(|a| a.key.clone()).collect();
        e.cidrs.remove(&cidr);
        for k in &lost {
            self.forget_key(k);
        }
        Ok(lost)
    }

    /// Removes an ENI. Unforced, it fails if an address is assigned.
    pub fn remove_eni(&mut self, eni: &str, force: bool) -> Result<Vec<IpamKey>, DsError> {
        let e = self
            .enis
            .get(eni)
            .ok_or_else(|| DsError::UnknownEni(eni.into()))?;
        let lost: Vec<IpamKey> = e
            .cidrs
            .values()
            .flat_map(|c| c.addresses.values().filter_map(|a| a.key.clone()))
            .collect();
        if !force && e.cidrs.values().any(|c| c.assigned() > 0) {
            return Err(DsError::InUse(eni.into()));
        }
        self.enis.remove(eni);
        for k in &lost {
            self.forget_key(k);
        }
        Ok(lost)
    }

    fn usable(&self, c: &CidrInfo<F>) -> bool {
        self.both_kinds || c.is_prefix == self.prefix_mode
    }

    fn eni_serves_pods(&self, e: &Eni<F>) -> bool {
        !(e.excluded || e.is_trunk || (self.skip_primary && e.is_primary))
    }

    /// The address `key` holds, if any.
    pub fn lookup(&self, key: &IpamKey) -> Option<F::Addr> {
        self.by_key.get(key).map(|(_, _, ip)| *ip)
    }

    /// Assigns an address to `key`, or returns the one it already holds.
    ///
    /// Choice: the first ENI (primary, then by device number) that has a usable address, as
    /// the reference walks its ENIs, so pods pack onto the first ENIs and a later ENI empties
    /// when the node's load falls and can be freed. On that ENI: a never-used address first
    /// (walking each CIDR from its base), else the address whose cooldown ended longest ago;
    /// addresses in cooldown are never chosen.
    pub fn assign(
        &mut self,
        key: &IpamKey,
        metadata: &IpamMetadata,
        now: Duration,
    ) -> Result<Assignment<F>, DsError> {
        if let Some((eni, _, ip)) = self.by_key.get(key) {
            let e = &self.enis[eni];
            return Ok(Assignment {
                ip: *ip,
                eni_id: eni.clone(),
                device_number: e.device_number,
                route_table_id: e.route_table_id,
                fresh: false,
                previous: None,
            });
        }
        let mut order: Vec<&Eni<F>> = self
            .enis
            .values()
            .filter(|e| self.eni_serves_pods(e))
            .collect();
        order.sort_by_key(|e| (!e.is_primary, e.device_number, &e.id));
        let mut chosen: Option<(String, F::Net, F::Addr)> = None;
        for e in order {
            let mut reuse: Option<(Duration, F::Net, F::Addr)> = None;
            let mut fresh: Option<(F::Net, F::Addr)> = None;
            for c in e.cidrs.values().filter(|c| self.usable(c)) {
                if let Some(ip) = F::hosts(&c.cidr).find(|ip| !c.addresses.contains_key(ip)) {
                    fresh = Some((c.cidr, ip));
                    break;
                }
                for (ip, a) in &c.addresses {
                    if a.key.is_none() && !a.release_pending && !is_cooling(a, now, self.cooldown) {
                        let t = a.unassigned_at.unwrap_or_default();
                        if reuse.as_ref().is_none_or(|r| t < r.0) {
                            reuse = Some((t, c.cidr, *ip));
                        }
                    }
                }
            }
            if let Some((cidr, ip)) = fresh.or(reuse.map(|(_, c, i)| (c, i))) {
                chosen = Some((e.id.clone(), cidr, ip));
                break;
            }
        }
        let (eni, cidr, ip) = chosen.ok_or(DsError::NoAvailableIp)?;
        let e = self
            .enis
            .get_mut(&eni)
            .ok_or_else(|| DsError::UnknownEni(eni.clone()))?;
        let c = e
            .cidrs
            .get_mut(&cidr)
            .ok_or_else(|| DsError::UnknownEni(eni.clone()))?;
        let previous = c.addresses.insert(
            ip,
            AddressInfo {
                key: Some(key.clone()),
                metadata: metadata.clone(),
                assigned_at: now,
                unassigned_at: None,
                release_pending: false,
            },
        );
        let out = Assignment {
            ip,
            eni_id: eni.clone(),
            device_number: e.device_number,
            route_table_id: e.route_table_id,
            fresh: true,
            previous,
        };
        self.by_key.insert(key.clone(), (eni, cidr, ip));
        self.image_put(ip, key, metadata, now);
        Ok(out)
    }

    /// Undoes a fresh [`assign`](Self::assign) (the checkpoint write that would have recorded
    /// it failed): the address gets back its previous bookkeeping. Nothing happens when `key`
    /// no longer holds `a.ip` (a later DEL already released it; that release stands).
    pub fn undo_assign(&mut self, key: &IpamKey, a: &Assignment<F>) {
        let Some((eni, cidr, ip)) = self.by_key.get(key).cloned() else {
            return;
        };
        if ip != a.ip || eni != a.eni_id {
            return;
        }
        self.forget_key(key);
        if let Some(c) = self.enis.get_mut(&eni).and_then(|e| e.cidrs.get_mut(&cidr)) {
            match &a.previous {
                Some(p) => {
                    c.addresses.insert(ip, p.clone());
                }
                None => {
                    c.addresses.remove(&ip);
                }
            }
        }
    }

    /// Releases the address `key` holds (with the reference's CRI-migration fallback key).
    pub fn unassign(&mut self, key: &IpamKey, now: Duration) -> Result<Unassignment<F>, DsError> {
        let key = if self.by_key.contains_key(key) {
            key.clone()
        } else {
            let migrated = IpamKey::new(MIGRATED_NETWORK, &key.container_id, MIGRATED_IFNAME);
            if !self.by_key.contains_key(&migrated) {
                return Err(DsError::UnknownPod);
            }
            migrated
        };
        let (eni, cidr, ip) = self.forget_key(&key).ok_or(DsError::UnknownPod)?;
        let e = self
            .enis
            .get_mut(&eni)
            .ok_or_else(|| DsError::UnknownEni(eni.clone()))?;
        let a = e
            .cidrs
            .get_mut(&cidr)
            .and_then(|c| c.addresses.get_mut(&ip))
            .ok_or(DsError::UnknownPod)?;
        let out = Unassignment {
            ip,
            eni_id: eni.clone(),
            device_number: e.device_number,
            route_table_id: e.route_table_id,
            cidr,
            key: key.clone(),
            metadata: std::mem::take(&mut a.metadata),
            assigned_at: a.assigned_at,
            previous_unassigned_at: a.unassigned_at,
        };
        a.key = None;
        a.unassigned_at = Some(now);
        a.release_pending = true;
        Ok(out)
    }

    /// Makes an [`unassign`](Self::unassign) final (its checkpoint write is on disk): the
    /// address may be handed out again once its cooldown ends.
    pub fn confirm_unassign(&mut self, u: &Unassignment<F>) {
        if let Some(a) = self.address_mut(&u.eni_id, u.cidr, u.ip) {
            a.release_pending = false;
        }
    }

    /// Undoes an [`unassign`](Self::unassign) (the checkpoint write failed): the pod holds its
    /// address again. Returns false when that is impossible (the address is gone or held by
    /// another key), which the release-pending rule is there to prevent.
    pub fn undo_unassign(&mut self, u: &Unassignment<F>) -> bool {
        if self.by_key.contains_key(&u.key) {
            // The key got another address after the release (a later ADD): keep that one.
            if let Some(a) = self.address_mut(&u.eni_id, u.cidr, u.ip) {
                a.release_pending = false;
            }
            return false;
        }
        let Some(a) = self.address_mut(&u.eni_id, u.cidr, u.ip) else {
            return false;
        };
        if a.key.is_some() {
            return false;
        }
        a.key = Some(u.key.clone());
        a.metadata = u.metadata.clone();
        a.assigned_at = u.assigned_at;
        a.unassigned_at = u.previous_unassigned_at;
        a.release_pending = false;
        self.by_key
            .insert(u.key.clone(), (u.eni_id.clone(), u.cidr, u.ip));
        self.image_put(u.ip, &u.key, &u.metadata, u.assigned_at);
        true
    }

    fn address_mut(&mut self, eni: &str, cidr: F::Net, ip: F::Addr) -> Option<&mut AddressInfo> {
        self.enis
            .get_mut(eni)
            .and_then(|e| e.cidrs.get_mut(&cidr))
            .and_then(|c| c.addresses.get_mut(&ip))
    }

    /// The checkpoint of the current assignments (sorted by address).
    pub fn checkpoint(&self) -> CheckpointFile {
        let mut allocs: Vec<(F::Addr, Allocation)> = Vec::with_capacity(self.by_key.len());
        for e in self.enis.values() {
            for c in e.cidrs.values() {
                for (ip, a) in &c.addresses {
                    if let Some(k) = &a.key {
                        allocs.push((*ip, F::allocation(*ip, k, &a.metadata, a.assigned_at)));
                    }
                }
            }
        }
        allocs.sort_by_key(|(ip, _)| *ip);
        CheckpointFile::new(allocs.into_iter().map(|(_, a)| a).collect())
    }

    /// Restores a checkpoint over the ENIs and CIDRs already loaded (spec 3.4): drops
    /// allocations whose pod's host veth is gone (`veth_exists(namespace, name)`) and those
    /// in no known CIDR; a duplicate address or key, or an unparsable address, is an error
    /// and leaves the datastore unchanged. Meant for a datastore holding no assignments yet
    /// (start-up).
    pub fn restore(
        &mut self,
        file: &CheckpointFile,
        veth_exists: &dyn Fn(&str, &str) -> bool,
    ) -> Result<RestoreReport<F>, DsError> {
        let mut report = RestoreReport::default();
        // Check the whole file before changing anything: a refused file leaves the datastore
        // as it was.
        let mut seen = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        let mut entries = Vec::with_capacity(file.allocations.len());
        for a in &file.allocations {
            let text = F::entry_address(a);
            if text.is_empty() {
                report.other_family += 1;
                continue;
            }
            let ip: F::Addr = text
                .parse()
                .map_err(|_| DsError::BadAddress(text.to_owned()))?;
            if !seen.insert(ip) {
                return Err(DsError::DuplicateIp(ip.to_string()));
            }
            let key = IpamKey::new(&a.network_name, &a.container_id, &a.if_name);
            if !keys.insert(key.clone()) {
                return Err(DsError::DuplicateKey(format!(
                    "({:?}, {:?}, {:?})",
                    key.network_name, key.container_id, key.if_name
                )));
            }
            entries.push((ip, key, a));
        }
        for (ip, key, a) in entries {
            let md = &a.metadata;
            if !md.pod_namespace.is_empty()
                && !md.pod_name.is_empty()
                && !veth_exists(&md.pod_namespace, &md.pod_name)
            {
                report.dropped_stale.push((ip, key));
                continue;
            }
            let place = self.enis.iter().find_map(|(id, e)| {
                e.cidrs
                    .keys()
                    .find(|c| F::contains(c, ip))
                    .map(|c| (id.clone(), *c))
            });
            let Some((eni, cidr)) = place else {
                report.dropped_unknown.push((ip, key));
                continue;
            };
            if let Some(c) = self.enis.get_mut(&eni).and_then(|e| e.cidrs.get_mut(&cidr)) {
                let at = Duration::from_nanos(a.allocation_timestamp.max(0) as u64);
                c.addresses.insert(
                    ip,
                    AddressInfo {
                        key: Some(key.clone()),
                        metadata: md.clone(),
                        assigned_at: at,
                        unassigned_at: None,
                        release_pending: false,
                    },
                );
                self.image_put(ip, &key, md, at);
                self.by_key.insert(key, (eni, cidr, ip));
                report.restored += 1;
            }
        }
        Ok(report)
    }

    /// The policy's view of every ENI, in [`ordered_ids`](Self::ordered_ids) order. Times are
    /// the datastore's (since the Unix epoch).
    pub fn views(&self, now: Duration) -> (Vec<String>, Vec<EniView>) {
        let ids = self.ordered_ids();
        let views = ids
            .iter()
            .map(|id| {
                let e = &self.enis[id];
                let mut v = EniView {
                    primary: e.is_primary,
                    excluded: e.excluded,
                    trunk: e.is_trunk,
                    efa: e.is_efa,
                    created_at: e.created_at,
                    ..Default::default()
                };
                for c in e.cidrs.values() {
                    let (a, k) = (c.assigned() as u32, c.cooling(now, self.cooldown) as u32);
                    if c.is_prefix {
                        v.prefixes += 1;
                        v.prefix_ips_assigned += a;
                        v.prefix_ips_cooling += k;
                        if a == 0 {
                            v.free_prefixes += 1;
                            if k == 0 {
                                v.cold_free_prefixes += 1;
                            }
                        }
                    } else {
                        v.ips += 1;
                        v.ips_assigned += a;
                        v.ips_cooling += k;
                    }
                }
                v
            })
            .collect();
        (ids, views)
    }

    /// Unassigned CIDRs of one kind on `eni` that may be released (`cold_only`: none of their
    /// addresses in cooldown), up to `n`, highest first.
    pub fn releasable(
        &self,
        eni: &str,
        prefixes: bool,
        n: usize,
        now: Duration,
        cold_only: bool,
    ) -> Vec<F::Net> {
        let Some(e) = self.enis.get(eni) else {
            return Vec::new();
        };
        e.cidrs
            .values()
            .rev()
            .filter(|c| c.is_prefix == prefixes && c.assigned() == 0)
            .filter(|c| !cold_only || c.cooling(now, self.cooldown) == 0)
            .take(n)
            .map(|c| c.cidr)
            .collect()
    }

    /// Totals over every ENI.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            enis: self.enis.len() as u64,
            ..Default::default()
        };
        for e in self.enis.values() {
            for c in e.cidrs.values() {
                t.total = t.total.saturating_add(F::size(&c.cidr));
                t.assigned += c.assigned() as u64;
                if c.is_prefix {
                    t.prefixes += 1;
                }
            }
        }
        t
    }

    /// Every assigned address with its key (for checks and introspection).
    pub fn assignments(&self) -> Vec<(F::Addr, IpamKey)> {
        let mut v: Vec<_> = self
            .by_key
            .iter()
            .map(|(k, (_, _, ip))| (*ip, k.clone()))
            .collect();
        v.sort();
        v
    }

    /// Every assignment with its pod metadata and time (for the orphan sweep), by key.
    pub fn held(&self) -> Vec<Held<F>> {
        let mut v: Vec<Held<F>> = self
            .by_key
            .iter()
            .filter_map(|(k, (eni, cidr, ip))| {
                let a = self.enis.get(eni)?.cidrs.get(cidr)?.addresses.get(ip)?;
                Some(Held {
                    ip: *ip,
                    key: k.clone(),
                    metadata: a.metadata.clone(),
                    assigned_at: a.assigned_at,
                })
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// When `key` got the address it holds (`None`: it holds none).
    pub fn assigned_at(&self, key: &IpamKey) -> Option<Duration> {
        let (eni, cidr, ip) = self.by_key.get(key)?;
        let a = self.enis.get(eni)?.cidrs.get(cidr)?.addresses.get(ip)?;
        Some(a.assigned_at)
    }

    /// Addresses in the pool of usable kinds, for sizing reports.
    pub fn usable_total(&self) -> u64 {
        self.enis
            .values()
            .filter(|e| self.eni_serves_pods(e))
            .flat_map(|e| e.cidrs.values())
            .filter(|c| self.usable(c))
            .map(|c| if c.is_prefix { F::PREFIX_ADDRESSES } else { 1 })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn spec(id: &str, dev: u32) -> EniSpec {
        EniSpec {
            id: id.into(),
            mac: format!("02:00:00:00:00:{dev:02x}"),
            is_primary: dev == 0,
            is_trunk: false,
            is_efa: false,
            device_number: dev,
            primary_ip: Ipv4Addr::new(10, 0, 0, 10 + dev as u8),
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/16".parse().unwrap(),
            excluded: false,
        }
    }

    fn ip(s: &str) -> Ipv4Net {
        Ipv4Net::host(s.parse().unwrap())
    }

    fn key(c: &str) -> IpamKey {
        IpamKey::new("aws-cni", c, "eth0")
    }

    fn sip_store() -> DataStore {
        let mut ds = DataStore::new(false, false, false, s(30));
        ds.add_eni(spec("eni-0", 0), s(0));
        ds.add_eni(spec("eni-1", 1), s(0));
        for a in ["10.0.1.1", "10.0.1.2"] {
            ds.add_cidr("eni-0", ip(a), false).unwrap();
        }
        ds.add_cidr("eni-1", ip("10.0.2.1"), false).unwrap();
        ds
    }

    #[test]
    fn a_trunk_enis_addresses_are_never_assigned() {
        let mut ds = DataStore::new(false, false, false, Duration::from_secs(30));
        ds.add_eni(
            EniSpec {
                is_trunk: true,
                ..spec("eni-t", 1)
            },
            s(0),
        );
        ds.add_cidr("eni-t", ip("10.0.3.1"), false).unwrap();
        let md = IpamMetadata::default();
        assert_eq!(
            ds.assign(&key("c1"), &md, s(1)).map(|a| a.ip),
            Err(DsError::NoAvailableIp),
            "only the trunk holds an address"
        );
        ds.add_eni(spec("eni-2", 2), s(0));
        ds.add_cidr("eni-2", ip("10.0.4.1"), false).unwrap();
        let a = ds.assign(&key("c1"), &md, s(1)).unwrap();
        assert_eq!(a.eni_id, "eni-2");
    }

    #[test]
    fn assign_is_idempotent_per_key_and_prefers_the_primary() {
        let mut ds = sip_store();
        let md = IpamMetadata::default();
        let a = ds.assign(&key("c1"), &md, s(1)).unwrap();
        assert_eq!(
            (a.ip.to_string(), a.eni_id.as_str(), a.route_table_id),
            ("10.0.1.1".into(), "eni-0", 254)
        );
        assert!(a.fresh);
        let again = ds.assign(&key("c1"), &md, s(2)).unwrap();
        assert_eq!(again.ip, a.ip);
        assert!(!again.fresh);
        let other_if = ds
            .assign(&IpamKey::new("aws-cni", "c1", "eth1"), &md, s(2))
            .unwrap();
        assert_ne!(other_if.ip, a.ip);
        let third = ds.assign(&key("c3"), &md, s(2)).unwrap();
        assert_eq!(
            (
                third.eni_id.as_str(),
                third.route_table_id,
                third.device_number
            ),
            ("eni-1", 2, 1)
        );
        assert_eq!(
            ds.assign(&key("c4"), &md, s(2)),
            Err(DsError::NoAvailableIp)
        );
    }

    #[test]
    fn unknown_pod_and_cooldown() {
        let mut ds = sip_store();
        let md = IpamMetadata::default();
        assert_eq!(ds.unassign(&key("nope"), s(0)), Err(DsError::UnknownPod));
        assert_eq!(DsError::UnknownPod.to_string(), "datastore: unknown pod");
        for c in ["a", "b", "c"] {
            ds.assign(&key(c), &md, s(0)).unwrap();
        }
        let u = ds.unassign(&key("b"), s(10)).unwrap();
        assert_eq!(u.ip.to_string(), "10.0.1.2");
        ds.confirm_unassign(&u);
        // In cooldown until 40 s: not handed out.
        assert_eq!(
            ds.assign(&key("d"), &md, s(40)),
            Err(DsError::NoAvailableIp)
        );
        assert_eq!(ds.views(s(40)).1[0].ips_cooling, 1);
        let d = ds.assign(&key("d"), &md, s(41)).unwrap();
        assert_eq!(d.ip, u.ip);
    }

    #[test]
    fn pods_pack_onto_the_first_eni_with_a_usable_address() {
        // A cooled address of the primary is taken before a never-used one of a later ENI,
        // so the later ENI stays empty and can be freed (the planner packs the same way).
        let mut ds = sip_store();
        let md = IpamMetadata::default();
        for c in ["a", "b"] {
            ds.assign(&key(c), &md, s(0)).unwrap();
        }
        let u = ds.unassign(&key("a"), s(1)).unwrap();
        ds.confirm_unassign(&u);
        let c = ds.assign(&key("c"), &md, s(40)).unwrap();
        assert_eq!((c.ip, c.eni_id.as_str()), (u.ip, "eni-0"));
        // While it cools, the next ENI serves.
        let u = ds.unassign(&key("b"), s(41)).unwrap();
        ds.confirm_unassign(&u);
        let d = ds.assign(&key("d"), &md, s(42)).unwrap();
        assert_eq!(d.eni_id, "eni-1");
    }

    #[test]
    fn migrated_keys_are_found_by_container_id() {
        let mut ds = sip_store();
        let k = IpamKey::new(MIGRATED_NETWORK, "c1", MIGRATED_IFNAME);
        ds.assign(&k, &IpamMetadata::default(), s(0)).unwrap();
        let u = ds.unassign(&key("c1"), s(1)).unwrap();
        assert_eq!(u.key, k);
    }

    #[test]
    fn undo_restores_the_previous_state() {
        let mut ds = sip_store();
        let md = IpamMetadata {
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            interfaces_count: 1,
        };
        let before = ds.checkpoint();
        let a = ds.assign(&key("a"), &md, s(0)).unwrap();
        ds.undo_assign(&key("a"), &a);
        assert_eq!(ds.checkpoint(), before);
        ds.assign(&key("a"), &md, s(0)).unwrap();
        let with = ds.checkpoint();
        let u = ds.unassign(&key("a"), s(5)).unwrap();
        assert!(ds.undo_unassign(&u));
        assert_eq!(ds.checkpoint(), with);
        assert_eq!(ds.lookup(&key("a")), Some(u.ip));
    }

    #[test]
    fn a_release_not_yet_on_disk_is_neither_reused_nor_given_back_to_ec2() {
        // Cooldown 0: only the pending flag keeps the address from the next pod.
        let mut ds = DataStore::new(false, false, false, s(0));
        ds.add_eni(spec("eni-0", 0), s(0));
        ds.add_cidr("eni-0", ip("10.0.1.1"), false).unwrap();
        let md = IpamMetadata::default();
        ds.assign(&key("a"), &md, s(0)).unwrap();
        let u = ds.unassign(&key("a"), s(1)).unwrap();
        assert_eq!(ds.assign(&key("b"), &md, s(5)), Err(DsError::NoAvailableIp));
        assert!(ds.releasable("eni-0", false, 5, s(5), false).is_empty());
        assert!(ds.remove_cidr("eni-0", ip("10.0.1.1"), false).is_err());
        assert!(ds.remove_eni("eni-0", false).is_err());
        assert_eq!(ds.totals().assigned, 1, "counted as held");
        assert!(ds.checkpoint().allocations.is_empty(), "not in the file");
        ds.confirm_unassign(&u);
        assert_eq!(ds.assign(&key("b"), &md, s(5)).unwrap().ip, u.ip);
    }

    #[test]
    fn undoing_the_reuse_of_an_address_gives_it_back_its_history() {
        let mut ds = DataStore::new(false, false, false, s(10));
        ds.add_eni(spec("eni-0", 0), s(0));
        ds.add_cidr("eni-0", ip("10.0.1.1"), false).unwrap();
        let md = IpamMetadata::default();
        ds.assign(&key("a"), &md, s(0)).unwrap();
        let u = ds.unassign(&key("a"), s(1)).unwrap();
        ds.confirm_unassign(&u);
        let freed = ds.eni("eni-0").unwrap().cidrs[&ip("10.0.1.1")].clone();
        let b = ds.assign(&key("b"), &md, s(20)).unwrap();
        assert_eq!(b.ip, u.ip);
        ds.undo_assign(&key("b"), &b);
        assert_eq!(ds.eni("eni-0").unwrap().cidrs[&ip("10.0.1.1")], freed);
        assert_eq!(ds.lookup(&key("b")), None);
    }

    #[test]
    fn undoing_an_assignment_that_a_later_release_ended_keeps_the_release() {
        let mut ds = sip_store();
        let md = IpamMetadata::default();
        let a = ds.assign(&key("a"), &md, s(0)).unwrap();
        let u = ds.unassign(&key("a"), s(1)).unwrap();
        ds.undo_assign(&key("a"), &a);
        assert_eq!(ds.lookup(&key("a")), None);
        ds.confirm_unassign(&u);
        // ADD, DEL, ADD again of one key: undoing the first ADD leaves the second alone.
        let a1 = ds.assign(&key("k"), &md, s(2)).unwrap();
        let u1 = ds.unassign(&key("k"), s(3)).unwrap();
        let a2 = ds.assign(&key("k"), &md, s(4)).unwrap();
        assert_ne!(a1.ip, a2.ip, "the pending release is not reused");
        ds.undo_assign(&key("k"), &a1);
        assert_eq!(ds.lookup(&key("k")), Some(a2.ip));
        assert!(!ds.undo_unassign(&u1), "the key holds another address now");
        assert_eq!(ds.lookup(&key("k")), Some(a2.ip));
        assert_eq!(ds.totals().assigned, 1, "the first address is free again");
    }

    #[test]
    fn prefix_mode_uses_only_prefixes_unless_both_kinds() {
        let mut ds = DataStore::new(true, false, false, s(30));
        ds.add_eni(spec("eni-0", 0), s(0));
        ds.add_cidr("eni-0", ip("10.0.1.1"), false).unwrap();
        ds.add_cidr("eni-0", "10.0.3.16/28".parse().unwrap(), true)
            .unwrap();
        let a = ds
            .assign(&key("a"), &IpamMetadata::default(), s(0))
            .unwrap();
        assert_eq!(
            a.ip.to_string(),
            "10.0.3.16",
            "a /28 yields its network address too"
        );
        let v = &ds.views(s(0)).1[0];
        assert_eq!(
            (v.ips, v.prefixes, v.prefix_ips_assigned, v.free_prefixes),
            (1, 1, 1, 0)
        );
        for n in 0..15 {
            ds.assign(&key(&format!("p{n}")), &IpamMetadata::default(), s(0))
                .unwrap();
        }
        assert_eq!(
            ds.assign(&key("x"), &IpamMetadata::default(), s(0)),
            Err(DsError::NoAvailableIp)
        );
        let mut both = ds.clone();
        both.both_kinds = true;
        assert_eq!(
            both.assign(&key("x"), &IpamMetadata::default(), s(0))
                .unwrap()
                .ip
                .to_string(),
            "10.0.1.1"
        );
    }

    #[test]
    fn custom_networking_and_excluded_enis_get_no_pods() {
        let mut ds = DataStore::new(false, false, true, s(30));
        ds.add_eni(spec("eni-0", 0), s(0));
        ds.add_cidr("eni-0", ip("10.0.1.1"), false).unwrap();
        let mut x = spec("eni-1", 1);
        x.excluded = true;
        ds.add_eni(x, s(0));
        ds.add_cidr("eni-1", ip("10.0.2.1"), false).unwrap();
        assert_eq!(
            ds.assign(&key("a"), &IpamMetadata::default(), s(0)),
            Err(DsError::NoAvailableIp)
        );
    }

    #[test]
    fn removal_refuses_in_use_unless_forced() {
        let mut ds = sip_store();
        ds.assign(&key("a"), &IpamMetadata::default(), s(0))
            .unwrap();
        assert!(ds.remove_cidr("eni-0", ip("10.0.1.1"), false).is_err());
        assert!(ds.remove_eni("eni-0", false).is_err());
        assert_eq!(ds.remove_eni("eni-0", true).unwrap(), vec![key("a")]);
        assert_eq!(ds.lookup(&key("a")), None);
        assert_eq!(
            ds.releasable("eni-1", false, 5, s(0), true),
            vec![ip("10.0.2.1")]
        );
    }

    #[test]
    fn restore_normalises() {
        let mut ds = sip_store();
        let alloc = |ip: &str, c: &str, ns: &str, name: &str| Allocation {
            network_name: "aws-cni".into(),
            container_id: c.into(),
            if_name: "eth0".into(),
            ipv4: ip.into(),
            ipv6: String::new(),
            allocation_timestamp: 1_700_000_000_000_000_000,
            metadata: IpamMetadata {
                pod_namespace: ns.into(),
                pod_name: name.into(),
                interfaces_count: 1,
            },
        };
        let file = CheckpointFile::new(vec![
            alloc("10.0.1.1", "live", "default", "web-0"),
            alloc("10.0.1.2", "gone", "default", "dead-0"),
            alloc("10.9.9.9", "elsewhere", "default", "web-1"),
            alloc("10.0.2.1", "nometa", "", ""),
        ]);
        let r = ds.restore(&file, &|_, name| name != "dead-0").unwrap();
        assert_eq!(r.restored, 2);
        assert_eq!(r.dropped_stale.len(), 1);
        assert_eq!(r.dropped_unknown.len(), 1);
        assert_eq!(ds.lookup(&key("live")).unwrap().to_string(), "10.0.1.1");
        let cp = ds.checkpoint();
        assert_eq!(
            cp.allocations[0].allocation_timestamp,
            1_700_000_000_000_000_000
        );
        let dup = CheckpointFile::new(vec![
            alloc("10.0.1.1", "a", "", ""),
            alloc("10.0.1.1", "b", "", ""),
        ]);
        assert_eq!(
            sip_store().restore(&dup, &|_, _| true),
            Err(DsError::DuplicateIp("10.0.1.1".into()))
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, u8),
        Del(u8, u8),
        Tick(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..40, 0u8..2).prop_map(|(c, i)| Op::Add(c, i)),
            (0u8..40, 0u8..2).prop_map(|(c, i)| Op::Del(c, i)),
            (1u8..40).prop_map(Op::Tick),
        ]
    }

    proptest! {
        #[test]
        fn no_address_is_ever_held_twice_and_checkpoints_round_trip(ops in proptest::collection::vec(op(), 1..300)) {
            let mut ds = DataStore::new(true, true, false, s(30));
            ds.add_eni(spec("eni-0", 0), s(0));
            ds.add_eni(spec("eni-1", 1), s(0));
            ds.add_cidr("eni-0", "10.0.3.0/28".parse().unwrap(), true).unwrap();
            ds.add_cidr("eni-1", "10.0.3.16/28".parse().unwrap(), true).unwrap();
            ds.add_cidr("eni-1", ip("10.0.4.1"), false).unwrap();
            let mut now = s(0);
            let mut model: HashMap<IpamKey, Ipv4Addr> = HashMap::new();
            for o in ops {
                match o {
                    Op::Add(c, i) => {
                        let k = IpamKey::new("aws-cni", &format!("c{c}"), &format!("eth{i}"));
                        match ds.assign(&k, &IpamMetadata::default(), now) {
                            Ok(a) => {
                                if let Some(prev) = model.get(&k) { prop_assert_eq!(*prev, a.ip); }
                                model.insert(k, a.ip);
                            }
                            Err(DsError::NoAvailableIp) => prop_assert!(!model.contains_key(&k)),
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Del(c, i) => {
                        let k = IpamKey::new("aws-cni", &format!("c{c}"), &format!("eth{i}"));
                        match ds.unassign(&k, now) {
                            Ok(u) => {
                                ds.confirm_unassign(&u);
                                prop_assert_eq!(model.remove(&k), Some(u.ip));
                            }
                            Err(e) => { prop_assert_eq!(e, DsError::UnknownPod); prop_assert!(!model.contains_key(&k)); }
                        }
                    }
                    Op::Tick(n) => now += s(u64::from(n)),
                }
                let held: Vec<Ipv4Addr> = model.values().copied().collect();
                let mut uniq = held.clone();
                uniq.sort();
                uniq.dedup();
                prop_assert_eq!(uniq.len(), held.len(), "an address held twice");
                let mut want = serde_json::to_vec(&ds.checkpoint()).unwrap();
                want.push(b'\n');
                prop_assert!(ds.checkpoint_bytes() == want, "kept entries differ from the file");
            }
            // The kept entries are the file, byte for byte.
            let mut want = serde_json::to_vec(&ds.checkpoint()).unwrap();
            want.push(b'\n');
            prop_assert_eq!(String::from_utf8(ds.checkpoint_bytes()).unwrap(), String::from_utf8(want).unwrap());
            // Round trip through the file format onto a fresh datastore with the same CIDRs.
            let cp = ds.checkpoint();
            let json = serde_json::to_vec(&cp).unwrap();
            let back = crate::store::checkpoint::parse(std::path::Path::new("x"), &json).unwrap();
            let mut fresh = DataStore::new(true, true, false, s(30));
            fresh.add_eni(spec("eni-0", 0), s(0));
            fresh.add_eni(spec("eni-1", 1), s(0));
            fresh.add_cidr("eni-0", "10.0.3.0/28".parse().unwrap(), true).unwrap();
            fresh.add_cidr("eni-1", "10.0.3.16/28".parse().unwrap(), true).unwrap();
            fresh.add_cidr("eni-1", ip("10.0.4.1"), false).unwrap();
            let r = fresh.restore(&back, &|_, _| true).unwrap();
            prop_assert_eq!(r.restored, model.len());
            prop_assert_eq!(fresh.checkpoint(), cp);
        }
    }

    // IPv6: one /80 on the primary ENI, addresses handed out from its base, the checkpoint's
    // `ipv6` field.

    const V6_PREFIX: &str = "2600:1f14:abc:de01:5c3a::/80";

    fn v6_store() -> DataStore<V6> {
        let mut ds = DataStore::new_v6(s(30));
        ds.add_eni(spec("eni-0", 0), s(0));
        ds.add_cidr("eni-0", V6_PREFIX.parse().unwrap(), true)
            .unwrap();
        ds
    }

    #[test]
    fn ipv6_pods_get_addresses_of_the_80_and_checkpoint_entries_name_them_in_ipv6() {
        let mut ds = v6_store();
        let a = ds
            .assign(&key("a"), &IpamMetadata::default(), s(1))
            .unwrap();
        let b = ds
            .assign(&key("b"), &IpamMetadata::default(), s(1))
            .unwrap();
        let net: crate::types::Ipv6Net = V6_PREFIX.parse().unwrap();
        assert!(net.contains(a.ip) && net.contains(b.ip) && a.ip != b.ip);
        assert_eq!((a.route_table_id, a.device_number), (254, 0));
        assert_eq!(
            ds.assign(&key("a"), &IpamMetadata::default(), s(2))
                .unwrap()
                .ip,
            a.ip
        );
        let cp = ds.checkpoint();
        assert_eq!(cp.allocations.len(), 2);
        assert!(cp
            .allocations
            .iter()
            .all(|e| e.ipv4.is_empty() && !e.ipv6.is_empty()));
        let text = String::from_utf8(ds.checkpoint_bytes()).unwrap();
        assert!(text.contains(&format!("\"ipv6\":\"{}\"", a.ip)), "{text}");
        assert!(!text.contains("\"ipv4\""), "{text}");
        // A released address cools down; the next pod gets a fresh one, not it.
        let u = ds.unassign(&key("a"), s(3)).unwrap();
        ds.confirm_unassign(&u);
        let c = ds
            .assign(&key("c"), &IpamMetadata::default(), s(4))
            .unwrap();
        assert_ne!(c.ip, a.ip);
        let t = ds.totals();
        assert_eq!(
            (t.total, t.assigned, t.prefixes, t.enis),
            (1 << 48, 2, 1, 1)
        );
    }

    #[test]
    fn a_reference_written_ipv6_checkpoint_is_restored_and_ipv4_entries_are_not_ours() {
        // As the reference daemon writes it in IPv6 mode (spec/ipamd.md 3.4).
        let json = br#"{"version":"vpc-cni-ipam/1","allocations":[
            {"networkName":"aws-cni","containerID":"c1","ifName":"eth0","ipv6":"2600:1f14:abc:de01:5c3a::","allocationTimestamp":1700000000000000000,"metadata":{"k8sPodNamespace":"default","k8sPodName":"web-1"}},
            {"networkName":"aws-cni","containerID":"c2","ifName":"eth0","ipv6":"2600:1f14:abc:de01:5c3a::7","allocationTimestamp":1700000000000000001,"metadata":{"k8sPodNamespace":"default","k8sPodName":"gone"}},
            {"networkName":"aws-cni","containerID":"c3","ifName":"eth0","ipv6":"2600:1f14:abc:de02::1","allocationTimestamp":1,"metadata":{}},
            {"networkName":"aws-cni","containerID":"c4","ifName":"eth0","ipv4":"10.0.0.9","allocationTimestamp":1,"metadata":{}}]}"#;
        let file = crate::store::checkpoint::parse(std::path::Path::new("x"), json).unwrap();
        let mut ds = v6_store();
        let r = ds.restore(&file, &|_, pod| pod != "gone").unwrap();
        assert_eq!(r.restored, 1);
        assert_eq!(r.dropped_stale.len(), 1);
        assert_eq!(r.dropped_unknown.len(), 1, "outside every /80: dropped");
        let k = IpamKey::new("aws-cni", "c1", "eth0");
        assert_eq!(
            ds.lookup(&k).map(|a| a.to_string()).as_deref(),
            Some("2600:1f14:abc:de01:5c3a::")
        );
        // The restored pod's address is not handed out again.
        let n = ds
            .assign(&key("new"), &IpamMetadata::default(), s(5))
            .unwrap();
        assert_eq!(n.ip.to_string(), "2600:1f14:abc:de01:5c3a::1");
        // A duplicate IPv6 entry is refused, naming the address.
        let dup = br#"{"version":"vpc-cni-ipam/1","allocations":[
            {"networkName":"aws-cni","containerID":"c1","ifName":"eth0","ipv6":"2600:1f14:abc:de01:5c3a::1"},
            {"networkName":"aws-cni","containerID":"c2","ifName":"eth0","ipv6":"2600:1f14:abc:de01:5c3a::1"}]}"#;
        let file = crate::store::checkpoint::parse(std::path::Path::new("x"), dup).unwrap();
        let e = v6_store().restore(&file, &|_, _| true).unwrap_err();
        assert_eq!(e, DsError::DuplicateIp("2600:1f14:abc:de01:5c3a::1".into()));
        let bad = br#"{"version":"vpc-cni-ipam/1","allocations":[
            {"networkName":"aws-cni","containerID":"c1","ifName":"eth0","ipv6":"2600::zz"}]}"#;
        let file = crate::store::checkpoint::parse(std::path::Path::new("x"), bad).unwrap();
        assert_eq!(
            v6_store().restore(&file, &|_, _| true).unwrap_err(),
            DsError::BadAddress("2600::zz".into())
        );
    }

    proptest! {
        #[test]
        fn ipv6_no_address_is_ever_held_twice_and_checkpoints_round_trip(ops in proptest::collection::vec(op(), 1..300)) {
            let mut ds = v6_store();
            let mut now = s(0);
            let mut model: HashMap<IpamKey, std::net::Ipv6Addr> = HashMap::new();
            for o in ops {
                match o {
                    Op::Add(c, i) => {
                        let k = IpamKey::new("aws-cni", &format!("c{c}"), &format!("eth{i}"));
                        let a = ds.assign(&k, &IpamMetadata::default(), now).unwrap();
                        if let Some(prev) = model.get(&k) { prop_assert_eq!(*prev, a.ip); }
                        model.insert(k, a.ip);
                    }
                    Op::Del(c, i) => {
                        let k = IpamKey::new("aws-cni", &format!("c{c}"), &format!("eth{i}"));
                        match ds.unassign(&k, now) {
                            Ok(u) => {
                                ds.confirm_unassign(&u);
                                prop_assert_eq!(model.remove(&k), Some(u.ip));
                            }
                            Err(e) => { prop_assert_eq!(e, DsError::UnknownPod); prop_assert!(!model.contains_key(&k)); }
                        }
                    }
                    Op::Tick(n) => now += s(u64::from(n)),
                }
                let mut held: Vec<_> = model.values().copied().collect();
                let n = held.len();
                held.sort();
                held.dedup();
                prop_assert_eq!(held.len(), n, "an address held twice");
                let mut want = serde_json::to_vec(&ds.checkpoint()).unwrap();
                want.push(b'\n');
                prop_assert!(ds.checkpoint_bytes() == want, "kept entries differ from the file");
            }
            let cp = ds.checkpoint();
            let json = serde_json::to_vec(&cp).unwrap();
            let back = crate::store::checkpoint::parse(std::path::Path::new("x"), &json).unwrap();
            let mut fresh = v6_store();
            let r = fresh.restore(&back, &|_, _| true).unwrap();
            prop_assert_eq!(r.restored, model.len());
            prop_assert_eq!(fresh.checkpoint(), cp);
        }
    }
}
