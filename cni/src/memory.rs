//! In-memory ipamd and policy agent, for the driver's unit tests and for the in-process
//! `CNIBackend` server of the integration tests (which wraps [`MemoryIpam::add`] and
//! [`MemoryIpam::del`]).
//!
//! [`MemoryIpam`] behaves like ipamd on the wire: the version handshake, AddNetwork
//! idempotent per (network name, container id, interface), `Success = false` when the pool is
//! empty, DelNetwork of an unknown pod answering `datastore: unknown pod`. Tests can make the
//! pool "warm up" (answer `Success = false` a few times), make the socket unreachable, and read
//! back every request.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};

use tonic::Status;
use vpc_cni_rpc::{
    check_client_version, AddNetworkReply, AddNetworkRequest, DelNetworkReply, DelNetworkRequest,
    DeleteNpRequest, EnforceNpRequest, IpAllocationMetadata, UNKNOWN_POD,
};

use crate::backend::{BackendError, Ipam, PolicyAgent};

/// One address of the pool, with the ENI it lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolAddress {
    /// The address: IPv4, or IPv6 as ipamd's IPv6 mode hands out (answered in `IPv6Addr`
    /// with `IPv4Addr` empty).
    pub ip: IpAddr,
    /// The ENI's device number.
    pub device_number: i32,
    /// The ENI's host route table (254 for the primary ENI).
    pub route_table: i32,
}

/// A request the memory ipamd received.
#[derive(Clone, Debug, PartialEq)]
pub enum IpamCall {
    /// AddNetwork.
    Add(AddNetworkRequest),
    /// DelNetwork.
    Del(DelNetworkRequest),
}

/// What a branch-ENI (security groups for pods) reply carries: set with
/// [`MemoryIpam::set_branch`], every AddNetwork answers as for a pod with the
/// `vpc.amazonaws.com/pod-eni` annotation (its address with `DeviceNumber` -1 and
/// `RouteTableId` 0), and DelNetwork answers with `PodVlanId`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchReply {
    /// `PodVlanId`.
    pub vlan_id: i32,
    /// `PodENIMAC`.
    pub eni_mac: String,
    /// `PodENISubnetGW`.
    pub subnet_gw: String,
    /// `ParentIfIndex` (the trunk's host interface).
    pub parent_if_index: i32,
}

type Key = (String, String, String);

#[derive(Debug, Default)]
struct State {
    free: Vec<PoolAddress>,
    assigned: BTreeMap<Key, Vec<PoolAddress>>,
    warming: u32,
    unreachable: bool,
    ready: bool,
    policy_mode: String,
    cards: u32,
    calls: Vec<IpamCall>,
    branch: Option<BranchReply>,
}

/// An in-memory ipamd.
#[derive(Debug)]
pub struct MemoryIpam {
    version: String,
    state: Mutex<State>,
}

impl MemoryIpam {
    /// A pool holding `free` addresses, accepting clients of `version`.
    pub fn new(version: impl Into<String>, free: Vec<PoolAddress>) -> MemoryIpam {
        MemoryIpam {
            version: version.into(),
            state: Mutex::new(State {
                free,
                ready: true,
                cards: 1,
                ..State::default()
            }),
        }
    }

    /// `n` addresses `base+0 .. base+n-1` on one ENI.
    pub fn pool(base: Ipv4Addr, n: u32, device_number: i32, route_table: i32) -> Vec<PoolAddress> {
        (0..n)
            .map(|i| PoolAddress {
                ip: IpAddr::V4(Ipv4Addr::from(u32::from(base) + i)),
                device_number,
                route_table,
            })
            .collect()
    }

    /// `n` IPv6 addresses `base+0 .. base+n-1` (a node's /80 prefix on the primary ENI, as
    /// ipamd's IPv6 mode assigns them: device 0, table main).
    pub fn pool_v6(base: Ipv6Addr, n: u32) -> Vec<PoolAddress> {
        (0..n)
            .map(|i| PoolAddress {
                ip: IpAddr::V6(Ipv6Addr::from(u128::from(base) + u128::from(i))),
                device_number: 0,
                route_table: 254,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `n` AddNetwork calls answer `Success = false`, as a pool that is warming up.
    pub fn set_warming(&self, n: u32) {
        self.lock().warming = n;
    }

    /// Makes the socket unreachable (or reachable again).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// What the health check reports.
    pub fn set_ready(&self, ready: bool) {
        self.lock().ready = ready;
    }

    /// The `NetworkPolicyMode` put in replies (empty: no policy agent call).
    pub fn set_policy_mode(&self, mode: &str) {
        self.lock().policy_mode = mode.to_string();
    }

    /// How many addresses a multi-NIC request gets.
    pub fn set_cards(&self, cards: u32) {
        self.lock().cards = cards.max(1);
    }

    /// Answers later AddNetwork and DelNetwork calls as for a branch-ENI pod (`None`: as for
    /// an ordinary pod).
    pub fn set_branch(&self, branch: Option<BranchReply>) {
        self.lock().branch = branch;
    }

    /// Adds addresses to the pool.
    pub fn refill(&self, more: Vec<PoolAddress>) {
        self.lock().free.extend(more);
    }

    /// Every request received, in order.
    pub fn calls(&self) -> Vec<IpamCall> {
        self.lock().calls.clone()
    }

    /// Number of addresses assigned.
    pub fn assigned(&self) -> usize {
        self.lock().assigned.values().map(Vec::len).sum()
    }

    /// Number of free addresses.
    pub fn free(&self) -> usize {
        self.lock().free.len()
    }

    fn meta(a: &PoolAddress) -> IpAllocationMetadata {
        let (v4, v6) = match a.ip {
            IpAddr::V4(ip) => (ip.to_string(), String::new()),
            IpAddr::V6(ip) => (String::new(), ip.to_string()),
        };
        IpAllocationMetadata {
            i_pv4_addr: v4,
            i_pv6_addr: v6,
            device_number: a.device_number,
            route_table_id: a.route_table,
        }
    }

    /// The AddNetwork handler.
    pub fn add(&self, req: &AddNetworkRequest) -> Result<AddNetworkReply, Status> {
        let mut s = self.lock();
        s.calls.push(IpamCall::Add(req.clone()));
        check_client_version(&req.client_version, &self.version)?;
        let key = (
            req.network_name.clone(),
            req.container_id.clone(),
            req.if_name.clone(),
        );
        let reply = |s: &State, addrs: &[PoolAddress]| match &s.branch {
            None => AddNetworkReply {
                success: true,
                ip_allocation_metadata: addrs.iter().map(Self::meta).collect(),
                network_policy_mode: s.policy_mode.clone(),
                ..AddNetworkReply::default()
            },
            Some(b) => AddNetworkReply {
                success: true,
                ip_allocation_metadata: addrs
                    .iter()
                    .map(|a| IpAllocationMetadata {
                        device_number: -1,
                        route_table_id: 0,
                        ..Self::meta(a)
                    })
                    .collect(),
                network_policy_mode: s.policy_mode.clone(),
                pod_vlan_id: b.vlan_id,
                pod_enimac: b.eni_mac.clone(),
                pod_eni_subnet_gw: b.subnet_gw.clone(),
                parent_if_index: b.parent_if_index,
                ..AddNetworkReply::default()
            },
        };
        if let Some(existing) = s.assigned.get(&key) {
            return Ok(reply(&s, existing));
        }
        if s.warming > 0 {
            s.warming -= 1;
            return Ok(AddNetworkReply::default());
        }
        let want = if req.requires_multi_nic_attachment {
            s.cards as usize
        } else {
            1
        };
        if s.free.len() < want {
            return Ok(AddNetworkReply::default());
        }
        let addrs: Vec<PoolAddress> = s.free.drain(..want).collect();
        s.assigned.insert(key, addrs.clone());
        Ok(reply(&s, &addrs))
    }

    /// The DelNetwork handler.
    pub fn del(&self, req: &DelNetworkRequest) -> Result<DelNetworkReply, Status> {
        let mut s = self.lock();
        s.calls.push(IpamCall::Del(req.clone()));
        check_client_version(&req.client_version, &self.version)?;
        let key = (
            req.network_name.clone(),
            req.container_id.clone(),
            req.if_name.clone(),
        );
        let Some(addrs) = s.assigned.remove(&key) else {
            return Err(Status::unknown(format!(
                "1 error occurred:\n\t* {UNKNOWN_POD}\n\n"
            )));
        };
        s.free.extend(addrs.iter().copied());
        Ok(DelNetworkReply {
            success: true,
            ip_allocation_metadata: addrs.iter().map(Self::meta).collect(),
            pod_vlan_id: s.branch.as_ref().map_or(0, |b| b.vlan_id),
            network_policy_mode: s.policy_mode.clone(),
        })
    }

    fn reachable(&self) -> Result<(), BackendError> {
        if self.lock().unreachable {
            Err(BackendError::Unreachable {
                socket: "memory".into(),
                source: "connection refused".into(),
            })
        } else {
            Ok(())
        }
    }
}

impl Ipam for MemoryIpam {
    async fn add_network(&self, req: AddNetworkRequest) -> Result<AddNetworkReply, BackendError> {
        self.reachable()?;
        self.add(&req).map_err(|source| BackendError::Rpc {
            op: "AddNetwork",
            source,
        })
    }

    async fn del_network(&self, req: DelNetworkRequest) -> Result<DelNetworkReply, BackendError> {
        self.reachable()?;
        self.del(&req).map_err(|source| BackendError::Rpc {
            op: "DelNetwork",
            source,
        })
    }

    async fn ready(&self) -> Result<(), BackendError> {
        self.reachable()?;
        if self.lock().ready {
            Ok(())
        } else {
            Err(BackendError::Unreachable {
                socket: "memory".into(),
                source: "NOT_SERVING".into(),
            })
        }
    }
}

/// A policy agent call.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyCall {
    /// EnforceNpToPod.
    Enforce(EnforceNpRequest),
    /// DeletePodNp.
    Delete(DeleteNpRequest),
}

/// An in-memory network policy agent that records calls and can be made unreachable.
#[derive(Debug, Default)]
pub struct MemoryPolicyAgent {
    calls: Mutex<Vec<PolicyCall>>,
    unreachable: Mutex<bool>,
}

impl MemoryPolicyAgent {
    /// Makes the agent unreachable (or reachable again).
    pub fn set_unreachable(&self, v: bool) {
        *self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    /// Every call, in order.
    pub fn calls(&self) -> Vec<PolicyCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, c: PolicyCall) -> Result<(), BackendError> {
        if *self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(BackendError::Unreachable {
                socket: "memory-npa".into(),
                source: "connection refused".into(),
            });
        }
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        Ok(())
    }
}

impl PolicyAgent for MemoryPolicyAgent {
    async fn enforce(&self, req: EnforceNpRequest) -> Result<(), BackendError> {
        self.record(PolicyCall::Enforce(req))
    }

    async fn delete(&self, req: DeleteNpRequest) -> Result<(), BackendError> {
        self.record(PolicyCall::Delete(req))
    }
}
