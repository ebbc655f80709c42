//! The CNI commands over three narrow dependencies: ipamd ([`Ipam`]), the pod network
//! ([`PodNetwork`] from `vpc-cni-net`) and the network policy agent ([`PolicyAgent`]).
//!
//! - ADD asks ipamd for the address (waiting a bounded time while the pool is empty), wires
//!   every interface, and on any failure undoes what it did and releases the address with
//!   reason `SetupNSFailed`.
//! - DEL is idempotent and best-effort: an unknown pod is success; an unreachable ipamd still
//!   gets the host rules and routes removed, from `prevResult`.
//! - CHECK rebuilds what ADD built from `prevResult` and compares it with the namespaces.
//!
//! Each address ipamd hands out is IPv4 (an IPv4 cluster) or IPv6 (`ENABLE_IPv6`: a /128 from
//! the node's /80 prefix, `IPv4Addr` empty); the interface is wired for its family (spec 2.2
//! or 2.5), and DEL and CHECK follow the family of each address.

use std::net::{IpAddr, Ipv4Addr};

use tokio::time::{sleep, Instant};
use vpc_cni_net::names::{
    container_ifname, dummy_interface_name, host_veth_name, vlan_route_table_id,
    STRICT_BRANCH_VETH_PREFIX,
};
use vpc_cni_net::pod::{PodDrift, Side};
use vpc_cni_net::{
    BranchLinkKind, BranchSpec, BranchTeardown, MacAddr, NetError, PodIfSpec, PodNetwork,
    PodTeardown, SgMode,
};
use vpc_cni_rpc::{
    is_unknown_pod, AddNetworkReply, AddNetworkRequest, DelNetworkRequest, DeleteNpRequest,
    EnforceNpRequest, IpAllocationMetadata, REASON_POD_DELETED, REASON_SETUP_NS_FAILED,
};

use crate::backend::{BackendError, Ipam, PolicyAgent};
use crate::config::{NetConf, SgEnforcingMode};
use crate::env::Invocation;
use crate::error::CniError;
use crate::result::{AddResult, DummyInfo, PodAttachment, PrevResult, MAX_VLAN_ID};

/// What DEL does for a branch-ENI pod known from its prevResult (spec 2.3 step 2), decided
/// before anything is touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BranchDel {
    /// `CNI_NETNS` is empty: success without teardown (the kubelet double-DEL race would
    /// otherwise delete a newer pod's VLAN).
    EmptyNetns {
        /// The VLAN id.
        vlan_id: u16,
    },
    /// Tear these down locally, without ipamd.
    Teardown(Vec<BranchTeardown>),
}

/// The DEL decision of spec 2.3 step 2: `Some` when prevResult's dummy entry carries a VLAN
/// id (a branch-ENI pod), `None` when DEL goes on to ipamd (no prevResult, a normal pod, or a
/// branch prevResult without a readable address).
pub fn branch_del_plan(
    prev: Option<&PrevResult>,
    netns: &str,
    link: BranchLinkKind,
) -> Option<BranchDel> {
    let prev = prev?;
    let Some(DummyInfo::Branch { vlan_id }) = prev.dummy() else {
        return None;
    };
    let vlan_id = u16::try_from(vlan_id).ok()?;
    if netns.is_empty() {
        return Some(BranchDel::EmptyNetns { vlan_id });
    }
    let items: Vec<BranchTeardown> = prev
        .attachments()
        .iter()
        .map(|a| BranchTeardown {
            ip: a.ip,
            vlan_id,
            link,
        })
        .collect();
    if items.is_empty() {
        return None;
    }
    Some(BranchDel::Teardown(items))
}

fn sg_mode(m: SgEnforcingMode) -> SgMode {
    match m {
        SgEnforcingMode::Strict => SgMode::Strict,
        SgEnforcingMode::Standard => SgMode::Standard,
    }
}

/// The plugin's logic, generic over its side effects.
#[derive(Debug)]
pub struct Driver<I, N, P> {
    ipam: I,
    net: N,
    policy: P,
    client_version: String,
}

fn ipam_error(op: &'static str, e: BackendError) -> CniError {
    match e {
        BackendError::Unreachable { socket, source } => {
            CniError::IpamdUnreachable { socket, source }
        }
        BackendError::Rpc { source, .. } => CniError::Ipamd { op, source },
    }
}

fn route_table(meta: &IpAllocationMetadata) -> u32 {
    u32::try_from(meta.route_table_id).unwrap_or(0)
}

/// The address of one allocation: `IPv4Addr` when set (an IPv4 cluster), else `IPv6Addr`
/// (an IPv6 cluster), as the reference reads them. `Ok(None)` when both are empty.
fn allocation_ip(meta: &IpAllocationMetadata) -> Result<Option<IpAddr>, String> {
    if !meta.i_pv4_addr.is_empty() {
        return meta
            .i_pv4_addr
            .parse::<Ipv4Addr>()
            .map(|a| Some(IpAddr::V4(a)))
            .map_err(|_| format!("the invalid IPv4Addr {:?}", meta.i_pv4_addr));
    }
    if !meta.i_pv6_addr.is_empty() {
        return meta
            .i_pv6_addr
            .parse::<std::net::Ipv6Addr>()
            .map(|a| Some(IpAddr::V6(a)))
            .map_err(|_| format!("the invalid IPv6Addr {:?}", meta.i_pv6_addr));
    }
    Ok(None)
}

impl<I: Ipam, N: PodNetwork, P: PolicyAgent> Driver<I, N, P> {
    /// A driver sending `client_version` as `ClientVersion` (the workspace version in the
    /// binary; ipamd must have the same).
    pub fn new(ipam: I, net: N, policy: P, client_version: impl Into<String>) -> Self {
        Driver {
            ipam,
            net,
            policy,
            client_version: client_version.into(),
        }
    }

    /// The ipamd client.
    pub fn ipam(&self) -> &I {
        &self.ipam
    }

    /// The pod network.
    pub fn net(&self) -> &N {
        &self.net
    }

    /// The policy agent.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// AddNetwork, retried every `pool_retry` while ipamd has no free address (or cannot be
    /// reached) until `pool_wait` has passed.
    async fn assign(
        &self,
        req: &AddNetworkRequest,
        conf: &NetConf,
    ) -> Result<AddNetworkReply, CniError> {
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match self.ipam.add_network(req.clone()).await {
                Ok(r) if r.success => {
                    if attempts > 1 {
                        tracing::info!(attempts, waited = ?start.elapsed(), "ipamd assigned an address after waiting");
                    }
                    return Ok(r);
                }
                Ok(_) if conf.pool_wait.is_zero() => {
                    return Err(CniError::AssignFailed { op: "add cmd" })
                }
                Ok(_) => "ipamd answered Success=false (no free address)".to_string(),
                Err(BackendError::Rpc { source, .. })
                    if source.code() == tonic::Code::ResourceExhausted
                        && !conf.pool_wait.is_zero() =>
                {
                    format!("ipamd: {}", source.message())
                }
                Err(e @ BackendError::Unreachable { .. }) if !conf.pool_wait.is_zero() => {
                    crate::error::CniError::details(&ipam_error("AddNetwork", e))
                }
                Err(e) => return Err(ipam_error("AddNetwork", e)),
            };
            let waited = start.elapsed();
            if waited + conf.pool_retry > conf.pool_wait {
                tracing::warn!(attempts, ?waited, %last, "giving up waiting for ipamd");
                return Err(CniError::TryAgainLater { waited, last });
            }
            tracing::debug!(attempts, %last, "no address yet; retrying");
            sleep(conf.pool_retry).await;
        }
    }

    async fn release(&self, inv: &Invocation, conf: &NetConf, reason: &str) {
        let req = self.del_request(inv, conf, reason);
        match self.ipam.del_network(req).await {
            Ok(r) if r.success => tracing::info!(reason, "address released"),
            Ok(_) => tracing::warn!(reason, "ipamd answered Success=false to the release"),
            Err(e) => {
                tracing::warn!(reason, error = %CniError::details(&ipam_error("DelNetwork", e)), "release failed")
            }
        }
    }

    fn del_request(&self, inv: &Invocation, conf: &NetConf, reason: &str) -> DelNetworkRequest {
        DelNetworkRequest {
            client_version: self.client_version.clone(),
            k8s_pod_name: inv.args.pod_name().to_string(),
            k8s_pod_namespace: inv.args.pod_namespace().to_string(),
            k8s_pod_infra_container_id: inv.args.infra_container_id().to_string(),
            reason: reason.to_string(),
            container_id: inv.container_id.clone(),
            if_name: inv.ifname.clone(),
            network_name: conf.name.clone(),
            k8s_pod_uid: inv.args.pod_uid().to_string(),
        }
    }

    fn spec(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        index: u32,
        ip: IpAddr,
        table: u32,
    ) -> PodIfSpec {
        let (ns, name) = (inv.args.pod_namespace(), inv.args.pod_name());
        PodIfSpec {
            netns: inv.netns.clone().into(),
            host_veth: host_veth_name(&conf.veth_prefix, ns, name, index),
            container_ifname: container_ifname(&inv.ifname, index),
            index,
            ip,
            mtu: conf.mtu,
            route_table: table,
        }
    }

    /// Validates ipamd's reply and turns it into one spec per interface.
    fn specs(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        reply: &AddNetworkReply,
    ) -> Result<Vec<PodIfSpec>, CniError> {
        if reply.ip_allocation_metadata.is_empty() {
            return Err(CniError::AssignFailed { op: "add cmd" });
        }
        let mut specs = Vec::new();
        for (i, meta) in reply.ip_allocation_metadata.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let bad = |what: String| CniError::Ipamd {
                op: "AddNetwork",
                source: tonic::Status::internal(format!("ipamd returned {what}")),
            };
            let ip = allocation_ip(meta)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("allocation {i} without IPv4Addr or IPv6Addr")))?;
            let spec = self.spec(inv, conf, index, ip, route_table(meta));
            spec.validate().map_err(|source| CniError::Setup {
                interface: spec.container_ifname.clone(),
                source,
            })?;
            specs.push(spec);
        }
        Ok(specs)
    }

    /// Validates a branch-ENI reply (`PodVlanId` ≠ 0) and turns it into the pod's spec: the
    /// host veth prefixed `vlan` in strict mode, `vethPrefix` in standard mode; table
    /// `vlanId+100`.
    fn branch_spec(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        reply: &AddNetworkReply,
    ) -> Result<BranchSpec, CniError> {
        let bad = |what: String| CniError::Ipamd {
            op: "AddNetwork",
            source: tonic::Status::internal(format!("ipamd returned {what}")),
        };
        let vlan_id = u16::try_from(reply.pod_vlan_id)
            .ok()
            .filter(|v| (1..=MAX_VLAN_ID).contains(&u32::from(*v)))
            .ok_or_else(|| bad(format!("the invalid PodVlanId {}", reply.pod_vlan_id)))?;
        let meta = reply
            .ip_allocation_metadata
            .first()
            .ok_or(CniError::AssignFailed { op: "add cmd" })?;
        if reply.ip_allocation_metadata.len() > 1 {
            tracing::warn!(
                count = reply.ip_allocation_metadata.len(),
                "a branch-ENI pod has one interface; using the first address only"
            );
        }
        let ip = allocation_ip(meta)
            .map_err(bad)?
            .ok_or_else(|| bad("a branch allocation without IPv4Addr or IPv6Addr".into()))?;
        let eni_mac: MacAddr = reply
            .pod_enimac
            .parse()
            .map_err(|_| bad(format!("the invalid PodENIMAC {:?}", reply.pod_enimac)))?;
        let subnet_gw: IpAddr = reply.pod_eni_subnet_gw.parse().map_err(|_| {
            bad(format!(
                "the invalid PodENISubnetGW {:?}",
                reply.pod_eni_subnet_gw
            ))
        })?;
        let parent_ifindex = u32::try_from(reply.parent_if_index).map_err(|_| {
            bad(format!(
                "the invalid ParentIfIndex {}",
                reply.parent_if_index
            ))
        })?;
        let mode = sg_mode(conf.sg_mode);
        let mut pod = self.spec(inv, conf, 0, ip, vlan_route_table_id(vlan_id));
        if mode == SgMode::Strict {
            pod.host_veth = host_veth_name(
                STRICT_BRANCH_VETH_PREFIX,
                inv.args.pod_namespace(),
                inv.args.pod_name(),
                0,
            );
        }
        let spec = BranchSpec {
            pod,
            vlan_id,
            eni_mac,
            subnet_gw,
            parent_ifindex,
            mode,
            link: conf.branch_link,
        };
        spec.validate().map_err(|source| CniError::Setup {
            interface: spec.pod.container_ifname.clone(),
            source,
        })?;
        Ok(spec)
    }

    /// The network policy agent's part of ADD (when ipamd names a mode).
    async fn enforce_policy(
        &self,
        inv: &Invocation,
        reply: &AddNetworkReply,
        interfaces: usize,
    ) -> Result<(), CniError> {
        if reply.network_policy_mode.is_empty() {
            return Ok(());
        }
        let req = EnforceNpRequest {
            k8s_pod_name: inv.args.pod_name().to_string(),
            k8s_pod_namespace: inv.args.pod_namespace().to_string(),
            network_policy_mode: reply.network_policy_mode.clone(),
            interface_count: i32::try_from(interfaces).unwrap_or(i32::MAX),
        };
        // As the reference: no cleanup here; the runtime follows a failed ADD with DEL.
        self.policy
            .enforce(req)
            .await
            .map_err(|e| CniError::NetworkPolicy {
                op: "setup",
                source: Box::new(e),
            })
    }

    /// ADD of a branch-ENI pod once ipamd has answered with a VLAN (spec 2.6).
    async fn add_branch(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        reply: &AddNetworkReply,
    ) -> Result<AddResult, CniError> {
        let spec = match self.branch_spec(inv, conf, reply) {
            Ok(s) => s,
            Err(e) => {
                self.release(inv, conf, REASON_SETUP_NS_FAILED).await;
                return Err(e);
            }
        };
        crate::timing::mark("setup_branch");
        if let Err(source) = self.net.setup_branch(&spec).await {
            self.release(inv, conf, REASON_SETUP_NS_FAILED).await;
            return Err(CniError::Setup {
                interface: spec.pod.container_ifname.clone(),
                source,
            });
        }
        crate::failpoint::hit(crate::failpoint::RULES);
        self.enforce_policy(inv, reply, 1).await?;
        let attachment = PodAttachment {
            host_veth: Some(spec.pod.host_veth.clone()),
            container_ifname: spec.pod.container_ifname.clone(),
            sandbox: inv.netns.clone(),
            ip: spec.pod.ip,
            // As the reference: the container entry's `mac` is ipamd's RouteTableId (0 for a
            // branch address); the dummy's `mac` is the VLAN id.
            route_table: reply
                .ip_allocation_metadata
                .first()
                .map(route_table)
                .unwrap_or(0),
        };
        let dummy = dummy_interface_name(inv.args.pod_namespace(), inv.args.pod_name());
        let mut result = AddResult::build(
            &[attachment],
            &dummy,
            DummyInfo::Branch {
                vlan_id: u32::from(spec.vlan_id),
            },
        );
        for ip in &mut result.ips {
            ip.gateway = Some(spec.subnet_gw.to_string());
        }
        tracing::info!(ip = %spec.pod.ip, veth = %spec.pod.host_veth, vlan = spec.vlan_id, mode = ?spec.mode, "branch-ENI pod added");
        Ok(result)
    }

    /// ADD.
    pub async fn add(&self, inv: &Invocation, conf: &NetConf) -> Result<AddResult, CniError> {
        let req = AddNetworkRequest {
            client_version: self.client_version.clone(),
            k8s_pod_name: inv.args.pod_name().to_string(),
            k8s_pod_namespace: inv.args.pod_namespace().to_string(),
            k8s_pod_infra_container_id: inv.args.infra_container_id().to_string(),
            container_id: inv.container_id.clone(),
            if_name: inv.ifname.clone(),
            network_name: conf.name.clone(),
            netns: inv.netns.clone(),
            requires_multi_nic_attachment: conf.requires_multi_nic,
        };
        // The veth pair does not depend on the address: build it while ipamd answers (both are
        // waits on sockets, so they overlap on the one-thread runtime). Interface 0 only; any
        // further interfaces of a multi-NIC pod are built after the reply.
        let first = self
            .spec(inv, conf, 0, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
            .link();
        let (assigned, prepared) =
            tokio::join!(self.assign(&req, conf), self.net.prepare_link(&first));
        if let Err(e) = &prepared {
            tracing::debug!(error = %e, "building the veth ahead of ipamd failed; setup redoes it");
        }
        let out = match assigned {
            Ok(reply) => {
                crate::failpoint::hit(crate::failpoint::IPAMD_ANSWERED);
                self.add_assigned(inv, conf, &reply).await
            }
            Err(e) => Err(e),
        };
        if out.is_err() {
            // Undoes the early veth unless a setup took it over (and undid it itself).
            self.net.discard_link(&first).await;
        }
        out
    }

    /// ADD once ipamd has answered.
    async fn add_assigned(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        reply: &AddNetworkReply,
    ) -> Result<AddResult, CniError> {
        if reply.pod_vlan_id != 0 {
            return self.add_branch(inv, conf, reply).await;
        }
        crate::timing::mark("specs");
        let specs = match self.specs(inv, conf, reply) {
            Ok(s) => s,
            Err(e) => {
                self.release(inv, conf, REASON_SETUP_NS_FAILED).await;
                return Err(e);
            }
        };
        let mut done: Vec<&PodIfSpec> = Vec::with_capacity(specs.len());
        for spec in &specs {
            crate::timing::mark("setup_pod");
            if let Err(source) = self.net.setup_interface(spec).await {
                // setup_pod undid its own steps; undo the interfaces wired before it.
                for d in done.iter().rev() {
                    if let Err(e) = self.net.teardown_pod(&d.teardown()).await {
                        tracing::warn!(error = %e, veth = %d.host_veth, "undoing an earlier interface failed");
                    }
                }
                self.release(inv, conf, REASON_SETUP_NS_FAILED).await;
                return Err(CniError::Setup {
                    interface: spec.container_ifname.clone(),
                    source,
                });
            }
            done.push(spec);
            crate::failpoint::hit(crate::failpoint::RULES);
        }
        self.enforce_policy(inv, reply, specs.len()).await?;
        let attachments: Vec<PodAttachment> = specs
            .iter()
            .map(|s| PodAttachment {
                host_veth: Some(s.host_veth.clone()),
                container_ifname: s.container_ifname.clone(),
                sandbox: inv.netns.clone(),
                ip: s.ip,
                route_table: s.route_table,
            })
            .collect();
        let device_number = reply
            .ip_allocation_metadata
            .first()
            .map(|m| m.device_number)
            .unwrap_or(0);
        crate::timing::mark("result");
        let dummy = dummy_interface_name(inv.args.pod_namespace(), inv.args.pod_name());
        for s in &specs {
            tracing::info!(ip = %s.ip, veth = %s.host_veth, table = s.route_table, "pod added");
        }
        Ok(AddResult::build(
            &attachments,
            &dummy,
            DummyInfo::Normal { device_number },
        ))
    }

    async fn teardown_all(&self, items: &[PodTeardown]) -> Result<(), NetError> {
        let mut first_err = None;
        for t in items {
            if let Err(e) = self.net.teardown_pod(t).await {
                tracing::warn!(error = %e, ip = %t.ip, "host teardown failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The best-effort DelNetwork after a branch DEL from prevResult: a datastore allocation
    /// (no `PodVlanId` in the reply) is released and its host wiring removed; anything else
    /// (unknown pod, ipamd down, a branch reply) is only logged.
    async fn release_after_branch_del(&self, inv: &Invocation, conf: &NetConf) {
        let req = self.del_request(inv, conf, REASON_POD_DELETED);
        match self.ipam.del_network(req).await {
            Ok(r) if r.success && r.pod_vlan_id == 0 && !r.ip_allocation_metadata.is_empty() => {
                tracing::warn!(
                    "ipamd held a datastore address for a branch-ENI prevResult; released"
                );
                let items: Vec<PodTeardown> = r
                    .ip_allocation_metadata
                    .iter()
                    .filter_map(|m| {
                        Some(PodTeardown {
                            ip: allocation_ip(m).ok().flatten()?,
                            route_table: route_table(m),
                        })
                    })
                    .collect();
                if let Err(e) = self.teardown_all(&items).await {
                    tracing::warn!(error = %e, "teardown of ipamd's allocation incomplete");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %CniError::details(&ipam_error("DelNetwork", e)), "ipamd has nothing to release for the branch-ENI pod")
            }
        }
    }

    async fn teardown_branches(&self, items: &[BranchTeardown]) -> Result<(), NetError> {
        let mut first_err = None;
        for t in items {
            match self.net.teardown_branch(t).await {
                Ok(r) => {
                    tracing::info!(ip = %t.ip, vlan = t.vlan_id, rules = r.rules_deleted, "branch-ENI pod deleted")
                }
                Err(e) => {
                    tracing::warn!(error = %e, ip = %t.ip, vlan = t.vlan_id, "branch teardown failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// DEL.
    pub async fn del(&self, inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
        let prev = match conf.prev_result.as_ref().map(PrevResult::parse) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring an unreadable prevResult");
                None
            }
            None => None,
        };
        let prev_teardown: Vec<PodTeardown> = prev
            .as_ref()
            .map(|p| {
                p.attachments()
                    .iter()
                    .map(|a| PodTeardown {
                        ip: a.ip,
                        route_table: a.route_table,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(plan) = branch_del_plan(prev.as_ref(), &inv.netns, conf.branch_link) {
            // The reference's shortcut: a branch pod is torn down from prevResult alone, and
            // ipamd is not needed for it.
            let torn = match plan {
                BranchDel::EmptyNetns { vlan_id } => {
                    tracing::info!(
                        vlan_id,
                        "branch-ENI pod DEL with empty netns: nothing torn down"
                    );
                    Ok(())
                }
                BranchDel::Teardown(items) => self
                    .teardown_branches(&items)
                    .await
                    .map_err(|source| CniError::Teardown { source }),
            };
            // Unlike the reference, ipamd is still asked to release (best effort, after the
            // teardown): a prevResult that wrongly claims a branch pod must not keep an
            // address ipamd assigned to this container from its datastore.
            self.release_after_branch_del(inv, conf).await;
            return torn;
        }
        let req = self.del_request(inv, conf, REASON_POD_DELETED);
        let reply = match self.ipam.del_network(req).await {
            Ok(r) => r,
            Err(BackendError::Rpc { source, .. }) if is_unknown_pod(&source) => {
                tracing::info!("ipamd does not know the pod: already released");
                return Ok(());
            }
            Err(e) => {
                let err = ipam_error("DelNetwork", e);
                tracing::warn!(error = %err, details = %err.details(), rules = prev_teardown.len(), "ipamd unavailable for DEL; removing host wiring from prevResult");
                if let Err(e) = self.teardown_all(&prev_teardown).await {
                    tracing::warn!(error = %e, "prevResult teardown incomplete");
                }
                return Ok(());
            }
        };
        if !reply.success {
            return Err(CniError::ReleaseFailed);
        }
        if reply.pod_vlan_id != 0 {
            // A branch pod ipamd rebuilt from the pod's annotation (spec 2.3 step 4).
            if inv.netns.is_empty() {
                tracing::info!(
                    vlan_id = reply.pod_vlan_id,
                    "branch-ENI pod DEL with empty netns: nothing torn down"
                );
                return Ok(());
            }
            let vlan_id = u16::try_from(reply.pod_vlan_id)
                .ok()
                .filter(|v| (1..=MAX_VLAN_ID).contains(&u32::from(*v)))
                .ok_or_else(|| CniError::Ipamd {
                    op: "DelNetwork",
                    source: tonic::Status::internal(format!(
                        "ipamd returned the invalid PodVlanId {}",
                        reply.pod_vlan_id
                    )),
                })?;
            let items: Vec<BranchTeardown> = reply
                .ip_allocation_metadata
                .iter()
                .filter_map(|m| {
                    Some(BranchTeardown {
                        ip: allocation_ip(m).ok().flatten()?,
                        vlan_id,
                        link: conf.branch_link,
                    })
                })
                .collect();
            self.teardown_branches(&items)
                .await
                .map_err(|source| CniError::Teardown { source })?;
        }
        let items: Vec<PodTeardown> = if reply.pod_vlan_id != 0 {
            Vec::new()
        } else {
            reply
                .ip_allocation_metadata
                .iter()
                .filter_map(|m| {
                    Some(PodTeardown {
                        ip: allocation_ip(m).ok().flatten()?,
                        route_table: route_table(m),
                    })
                })
                .collect()
        };
        crate::timing::mark("teardown");
        self.teardown_all(&items)
            .await
            .map_err(|source| CniError::Teardown { source })?;
        if !reply.network_policy_mode.is_empty() {
            let req = DeleteNpRequest {
                k8s_pod_name: inv.args.pod_name().to_string(),
                k8s_pod_namespace: inv.args.pod_namespace().to_string(),
            };
            match self.policy.delete(req).await {
                Ok(()) => {}
                Err(e @ BackendError::Unreachable { .. }) => {
                    return Err(CniError::NetworkPolicy {
                        op: "delete",
                        source: Box::new(e),
                    })
                }
                Err(e) => tracing::warn!(error = %e, "DeletePodNp failed"),
            }
        }
        for t in &items {
            tracing::info!(ip = %t.ip, table = t.route_table, "pod deleted");
        }
        Ok(())
    }

    /// CHECK: the wiring described by `prevResult` must be there, as ADD built it.
    pub async fn check(&self, inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
        if !conf.cni_version.has_check() {
            return Err(CniError::IncompatibleVersion {
                version: conf.cni_version.to_string(),
                reason: "config version does not allow CHECK".into(),
            });
        }
        let prev = conf
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::config("CHECK needs prevResult"))?;
        let prev = PrevResult::parse(prev)?;
        let ours: Vec<PodAttachment> = prev
            .attachments()
            .into_iter()
            .filter(|a| a.sandbox == inv.netns)
            .collect();
        if ours.is_empty() {
            return Err(CniError::config(format!(
                "prevResult has no interface in sandbox {}",
                inv.netns
            )));
        }
        let mut drift_lines = Vec::new();
        let mut missing = Vec::new();
        if let Some(DummyInfo::Branch { vlan_id }) = prev.dummy() {
            let a = &ours[0];
            let vlan_id = u16::try_from(vlan_id).unwrap_or(0);
            let mut pod = self.spec(inv, conf, 0, a.ip, vlan_route_table_id(vlan_id));
            pod.container_ifname = a.container_ifname.clone();
            if let Some(h) = &a.host_veth {
                pod.host_veth = h.clone();
            }
            let gw = prev
                .ips
                .iter()
                .find_map(|c| c.gateway.as_deref()?.parse::<IpAddr>().ok())
                .ok_or_else(|| {
                    CniError::config("prevResult of a branch-ENI pod has no gateway in ips")
                })?;
            // What ADD built follows the veth's name: `vlan…` is strict (vethPrefix can never
            // be `vlan`), anything else standard.
            let mode = if pod.host_veth.starts_with(STRICT_BRANCH_VETH_PREFIX) {
                SgMode::Strict
            } else {
                SgMode::Standard
            };
            let spec = BranchSpec {
                pod,
                vlan_id,
                eni_mac: MacAddr::default(),
                subnet_gw: gw,
                parent_ifindex: 0,
                mode,
                link: conf.branch_link,
            };
            let drift = self
                .net
                .check_branch(&spec)
                .await
                .map_err(|e| check_error(inv, e))?;
            sort_drift(drift, &mut drift_lines, &mut missing);
        } else {
            for (i, a) in ours.iter().enumerate() {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut spec = self.spec(inv, conf, index, a.ip, a.route_table);
                spec.container_ifname = a.container_ifname.clone();
                if let Some(h) = &a.host_veth {
                    spec.host_veth = h.clone();
                }
                let drift = self
                    .net
                    .check_interface(&spec)
                    .await
                    .map_err(|e| check_error(inv, e))?;
                sort_drift(drift, &mut drift_lines, &mut missing);
            }
        }
        if !missing.is_empty() {
            return Err(CniError::UnknownContainer {
                what: missing.join(", "),
                source: None,
            });
        }
        if !drift_lines.is_empty() {
            return Err(CniError::Drift { drift: drift_lines });
        }
        Ok(())
    }

    /// STATUS: ready when ipamd's health service says SERVING.
    pub async fn status(&self) -> Result<(), CniError> {
        self.ipam.ready().await.map_err(|e| CniError::NotAvailable {
            reason: crate::error::CniError::details(&ipam_error("health", e)),
        })
    }
}

fn check_error(inv: &Invocation, e: NetError) -> CniError {
    match e {
        e @ NetError::Netns { .. } => CniError::UnknownContainer {
            what: format!("network namespace {}", inv.netns),
            source: Some(e),
        },
        e => CniError::Net {
            what: "reading the pod's network state".into(),
            source: e,
        },
    }
}

/// A missing pod interface means an unknown container; the rest is drift.
fn sort_drift(drift: Vec<PodDrift>, lines: &mut Vec<String>, missing: &mut Vec<String>) {
    for d in drift {
        match &d {
            PodDrift::MissingLink {
                side: Side::Pod,
                name,
            } => missing.push(format!("interface {name}")),
            _ => lines.push(describe(&d)),
        }
    }
}

/// One line of text for a drift.
pub fn describe(d: &PodDrift) -> String {
    let side = |s: &Side| match s {
        Side::Host => "host",
        Side::Pod => "pod",
    };
    match d {
        PodDrift::MissingLink { side: s, name } => format!("{} link {name} missing", side(s)),
        PodDrift::LinkDown { side: s, name } => format!("{} link {name} is down", side(s)),
        PodDrift::WrongMtu {
            side: s,
            name,
            expected,
            actual,
        } => format!(
            "{} link {name} has MTU {actual}, expected {expected}",
            side(s)
        ),
        PodDrift::MissingAddress(a) => format!("pod address {a} missing"),
        PodDrift::MissingRoute { side: s, route } => format!("{} route {route} missing", side(s)),
        PodDrift::MissingRule { side: s, rule } => format!("{} rule {rule} missing", side(s)),
        PodDrift::WrongMac {
            side: s,
            name,
            expected,
            actual,
        } => match actual {
            Some(a) => format!("{} link {name} has MAC {a}, expected {expected}", side(s)),
            None => format!("{} link {name} has no MAC, expected {expected}", side(s)),
        },
        PodDrift::WrongNeighbour { expected, actual } => match actual {
            Some(a) => format!("gateway neighbour is {a}, expected {expected}"),
            None => format!("permanent gateway neighbour {expected} missing"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{CniArgs, Command};
    use crate::error::code;
    use crate::memory::{IpamCall, MemoryIpam, MemoryPolicyAgent, PolicyCall};
    use crate::version::CniVersion;
    use std::time::Duration;
    use vpc_cni_net::pod::SetupStep;
    use vpc_cni_net::MemoryPodNetwork;

    type TestDriver = Driver<MemoryIpam, MemoryPodNetwork, MemoryPolicyAgent>;

    const NETNS: &str = "/var/run/netns/pod-1";

    fn driver(n: u32, table: i32) -> TestDriver {
        let ipam = MemoryIpam::new(
            CLIENT,
            MemoryIpam::pool(Ipv4Addr::new(10, 0, 1, 10), n, 2, table),
        );
        let net = MemoryPodNetwork::new();
        net.add_netns(NETNS);
        Driver::new(ipam, net, MemoryPolicyAgent::default(), CLIENT)
    }

    const CLIENT: &str = "test-1.0";

    fn inv(command: Command, container: &str, netns: &str) -> Invocation {
        Invocation {
            command,
            container_id: container.into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            // Key order differs from what ADD used; CNI_ARGS is a set.
            args: CniArgs::parse(&format!(
                "K8S_POD_UID=uid-{container};K8S_POD_NAME=web-{container};IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_INFRA_CONTAINER_ID={container}"
            ))
            .expect("args"),
            path: "/opt/cni/bin".into(),
        }
    }

    fn conf() -> NetConf {
        let mut c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"aws-cni","type":"aws-cni","mtu":"1500","pluginLogFile":"stderr"}"#,
        )
        .expect("conf");
        c.pool_wait = Duration::from_secs(2);
        c.pool_retry = Duration::from_millis(100);
        c
    }

    fn with_prev(mut c: NetConf, r: &AddResult) -> NetConf {
        c.prev_result = Some(r.render(c.cni_version));
        c
    }

    fn dels(d: &TestDriver) -> Vec<DelNetworkRequest> {
        d.ipam()
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                IpamCall::Del(r) => Some(r),
                IpamCall::Add(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn add_wires_the_pod_and_answers_the_reference_layout() {
        let d = driver(4, 3);
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        let veth = host_veth_name("eni", "default", "web-c1", 0);
        let j = r.render(CniVersion::V1_0_0);
        assert_eq!(j["interfaces"][0]["name"], veth.as_str());
        assert_eq!(j["interfaces"][1]["name"], "eth0");
        assert_eq!(j["interfaces"][1]["mac"], "3");
        assert_eq!(j["interfaces"][1]["sandbox"], NETNS);
        assert_eq!(j["interfaces"][2]["sandbox"], "2");
        assert_eq!(j["ips"][0]["address"], "10.0.1.10/32");
        let st = d.net().state();
        let prios: Vec<u32> = st.host.rules.iter().map(|r| r.priority).collect();
        assert_eq!(prios, vec![512, 1536]);
        assert_eq!(st.host.link(&veth).expect("host veth").mtu, 1500);
        let IpamCall::Add(req) = &d.ipam().calls()[0] else {
            panic!("first call is AddNetwork")
        };
        assert_eq!(req.client_version, CLIENT);
        assert_eq!(req.k8s_pod_name, "web-c1");
        assert_eq!(req.k8s_pod_namespace, "default");
        assert_eq!(req.network_name, "aws-cni");
        assert_eq!(req.netns, NETNS);
        assert!(!req.requires_multi_nic_attachment);
    }

    #[tokio::test]
    async fn a_pod_on_the_primary_eni_gets_no_from_pod_rule() {
        let d = driver(1, 254);
        d.add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        let prios: Vec<u32> = d
            .net()
            .state()
            .host
            .rules
            .iter()
            .map(|r| r.priority)
            .collect();
        assert_eq!(prios, vec![512]);
    }

    #[tokio::test]
    async fn a_failure_at_any_step_undoes_everything_and_releases_with_setup_ns_failed() {
        for step in SetupStep::for_family(vpc_cni_net::Family::V4) {
            let d = driver(1, 3);
            d.net().fail_at(Some(step));
            let before = d.net().state();
            let e = d
                .add(&inv(Command::Add, "c1", NETNS), &conf())
                .await
                .expect_err("must fail");
            assert_eq!(e.code(), code::SETUP_FAILED, "{step}");
            assert_eq!(d.net().state().host.rules, before.host.rules, "{step}");
            assert_eq!(d.net().state().host.links, before.host.links, "{step}");
            assert_eq!(d.ipam().assigned(), 0, "{step}: address released");
            let del = dels(&d);
            assert_eq!(del.len(), 1);
            assert_eq!(del[0].reason, "SetupNSFailed");
            assert_eq!(del[0].container_id, "c1");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn add_waits_for_a_warming_pool_within_the_bound() {
        let d = driver(1, 3);
        d.ipam().set_warming(5);
        let start = Instant::now();
        d.add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add after waiting");
        assert_eq!(d.ipam().calls().len(), 6);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_pool_fails_with_try_again_later_after_the_bound() {
        let d = driver(0, 3);
        let start = Instant::now();
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect_err("empty pool");
        assert_eq!(e.code(), code::TRY_AGAIN_LATER);
        assert!(start.elapsed() <= Duration::from_secs(2));
        assert!(start.elapsed() >= Duration::from_millis(1900));
        assert!(e.details().contains("Success=false"), "{}", e.details());
        assert!(d.net().state().host.links.is_empty());
    }

    #[tokio::test]
    async fn without_a_wait_an_empty_pool_fails_at_once_as_the_reference() {
        let d = driver(0, 3);
        let mut c = conf();
        c.pool_wait = Duration::ZERO;
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &c)
            .await
            .expect_err("empty");
        assert_eq!(e.code(), code::ASSIGN_FAILED);
        assert_eq!(
            e.to_string(),
            "add cmd: failed to assign an IP address to container"
        );
        assert_eq!(d.ipam().calls().len(), 1);
        d.ipam().set_unreachable(true);
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &c)
            .await
            .expect_err("down");
        assert_eq!(e.code(), code::IPAMD_UNREACHABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_ipamd_is_waited_for_too() {
        let d = driver(1, 3);
        d.ipam().set_unreachable(true);
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect_err("down");
        assert_eq!(e.code(), code::TRY_AGAIN_LATER);
        assert!(
            e.details().contains("connection refused"),
            "{}",
            e.details()
        );
    }

    #[tokio::test]
    async fn a_version_mismatch_is_not_retried() {
        let d = driver(1, 3);
        let d = Driver::new(
            MemoryIpam::new(
                "other",
                MemoryIpam::pool(Ipv4Addr::new(10, 0, 0, 1), 1, 0, 254),
            ),
            d.net,
            MemoryPolicyAgent::default(),
            CLIENT,
        );
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect_err("mismatch");
        assert_eq!(e.code(), code::IPAMD_ERROR);
        assert!(e.details().contains("wrong client version"));
        assert_eq!(d.ipam().calls().len(), 1);
    }

    #[tokio::test]
    async fn del_releases_and_removes_host_wiring_and_is_idempotent() {
        let d = driver(2, 3);
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        let c = with_prev(conf(), &r);
        d.del(&inv(Command::Del, "c1", NETNS), &c)
            .await
            .expect("del");
        assert!(d.net().state().host.rules.is_empty());
        assert!(d.net().state().host.routes.is_empty());
        assert_eq!(d.ipam().assigned(), 0);
        let del = &dels(&d)[0];
        assert_eq!(del.reason, "PodDeleted");
        assert_eq!(del.k8s_pod_uid, "uid-c1");
        // Second DEL, as containerd sends, with an empty netns: unknown pod -> success.
        d.del(&inv(Command::Del, "c1", ""), &c)
            .await
            .expect("del twice");
        // And with the netns gone.
        d.net().remove_netns(std::path::Path::new(NETNS));
        d.del(&inv(Command::Del, "c1", NETNS), &c)
            .await
            .expect("del thrice");
    }

    #[tokio::test]
    async fn del_with_ipamd_down_tears_down_from_prev_result_and_succeeds() {
        let d = driver(1, 3);
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        assert_eq!(d.net().state().host.rules.len(), 2);
        d.ipam().set_unreachable(true);
        for v in [CniVersion::V0_4_0, CniVersion::V1_1_0] {
            let mut c = conf();
            c.cni_version = v;
            let c = with_prev(c, &r);
            d.del(&inv(Command::Del, "c1", NETNS), &c)
                .await
                .expect("del");
            assert!(d.net().state().host.rules.is_empty(), "{v}");
            assert!(d.net().state().host.routes.is_empty(), "{v}");
        }
        // Without prevResult there is nothing to go on, but DEL still succeeds.
        d.del(&inv(Command::Del, "c1", NETNS), &conf())
            .await
            .expect("del");
    }

    #[tokio::test]
    async fn check_passes_after_add_and_reports_drift_and_missing_containers() {
        let d = driver(1, 3);
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        let c = with_prev(conf(), &r);
        d.check(&inv(Command::Check, "c1", NETNS), &c)
            .await
            .expect("check");
        // Host rules and route flushed behind our back (NetworkManager, systemd-networkd).
        let ip = Ipv4Addr::new(10, 0, 1, 10);
        d.net()
            .teardown_pod(&PodTeardown {
                ip: IpAddr::V4(ip),
                route_table: 3,
            })
            .await
            .expect("flush");
        let e = d
            .check(&inv(Command::Check, "c1", NETNS), &c)
            .await
            .expect_err("drift");
        assert_eq!(e.code(), code::DRIFT);
        let msg = e.to_string();
        assert!(msg.contains("512") && msg.contains("1536"), "{msg}");
        d.net().remove_netns(std::path::Path::new(NETNS));
        let e = d
            .check(&inv(Command::Check, "c1", NETNS), &c)
            .await
            .expect_err("gone");
        assert_eq!(e.code(), code::UNKNOWN_CONTAINER);
    }

    #[tokio::test]
    async fn check_needs_0_4_0_and_a_prev_result() {
        let d = driver(1, 3);
        let mut c = conf();
        c.cni_version = CniVersion::V0_3_1;
        let e = d
            .check(&inv(Command::Check, "c1", NETNS), &c)
            .await
            .expect_err("0.3.1");
        assert_eq!(e.code(), code::INCOMPATIBLE_VERSION);
        let e = d
            .check(&inv(Command::Check, "c1", NETNS), &conf())
            .await
            .expect_err("no prev");
        assert_eq!(e.code(), code::INVALID_NETWORK_CONFIG);
    }

    #[tokio::test]
    async fn many_pods_get_distinct_addresses_and_veths_and_leave_nothing_behind() {
        let d = driver(20, 3);
        let mut results = Vec::new();
        for i in 0..20 {
            let ns = format!("/var/run/netns/p{i}");
            d.net().add_netns(&ns);
            let inv = inv(Command::Add, &format!("c{i}"), &ns);
            results.push((inv.clone(), d.add(&inv, &conf()).await.expect("add")));
        }
        assert_eq!(d.ipam().assigned(), 20);
        assert_eq!(d.net().state().host.rules.len(), 40);
        let mut no_wait = conf();
        no_wait.pool_wait = Duration::ZERO;
        let e = d.add(&inv(Command::Add, "c99", NETNS), &no_wait).await;
        assert_eq!(e.expect_err("pool exhausted").code(), code::ASSIGN_FAILED);
        for (mut inv, r) in results {
            inv.command = Command::Del;
            d.del(&inv, &with_prev(conf(), &r)).await.expect("del");
        }
        assert!(d.net().state().host.rules.is_empty());
        assert!(d.net().state().host.routes.is_empty());
        assert_eq!(d.ipam().free(), 20);
    }

    #[tokio::test]
    async fn multi_nic_pods_get_one_interface_per_card() {
        let d = driver(4, 3);
        d.ipam().set_cards(2);
        let mut c = conf();
        c.requires_multi_nic = true;
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &c)
            .await
            .expect("add");
        let j = r.render(CniVersion::V1_1_0);
        assert_eq!(j["interfaces"][3]["name"], "mNicIf1");
        assert_eq!(j["ips"][1]["interface"], 3);
        assert_eq!(
            j["interfaces"][2]["name"],
            host_veth_name("eni", "default", "web-c1", 1).as_str()
        );
        d.check(&inv(Command::Check, "c1", NETNS), &with_prev(c.clone(), &r))
            .await
            .expect("check");
        d.del(&inv(Command::Del, "c1", NETNS), &with_prev(c, &r))
            .await
            .expect("del");
        assert!(d.net().state().host.rules.is_empty());
    }

    #[tokio::test]
    async fn the_policy_agent_is_called_when_ipamd_names_a_mode() {
        let d = driver(2, 3);
        d.ipam().set_policy_mode("standard");
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        d.del(&inv(Command::Del, "c1", NETNS), &with_prev(conf(), &r))
            .await
            .expect("del");
        let calls = d.policy().calls();
        assert!(
            matches!(&calls[0], PolicyCall::Enforce(e) if e.network_policy_mode == "standard" && e.interface_count == 1 && e.k8s_pod_name == "web-c1")
        );
        assert!(matches!(&calls[1], PolicyCall::Delete(x) if x.k8s_pod_namespace == "default"));
        d.policy().set_unreachable(true);
        d.net().add_netns("/var/run/netns/pod-2");
        let e = d
            .add(&inv(Command::Add, "c2", "/var/run/netns/pod-2"), &conf())
            .await;
        assert_eq!(e.expect_err("agent down").code(), code::NETWORK_POLICY);
    }

    fn driver_v6(n: u32) -> TestDriver {
        let ipam = MemoryIpam::new(
            CLIENT,
            MemoryIpam::pool_v6("2001:db8:7:8:9::10".parse().expect("base"), n),
        );
        let net = MemoryPodNetwork::new();
        net.add_netns(NETNS);
        Driver::new(ipam, net, MemoryPolicyAgent::default(), CLIENT)
    }

    #[tokio::test]
    async fn an_ipv6_pod_is_wired_in_inet6_and_answers_a_128_with_version_6() {
        let d = driver_v6(4);
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        let j = r.render(CniVersion::V0_4_0);
        assert_eq!(j["ips"][0]["address"], "2001:db8:7:8:9::10/128");
        assert_eq!(j["ips"][0]["version"], "6");
        assert_eq!(j["interfaces"][1]["name"], "eth0");
        assert_eq!(j["interfaces"][1]["mac"], "254");
        assert_eq!(j["interfaces"][2]["sandbox"], "0");
        let st = d.net().state();
        assert_eq!(
            st.host.rules.len(),
            1,
            "512 only: the /80 is on the primary ENI"
        );
        assert_eq!(st.host.rules[0].family, vpc_cni_net::Family::V6);
        assert_eq!(st.host.rules[0].priority, 512);
        assert_eq!(
            d.net().steps(),
            SetupStep::for_family(vpc_cni_net::Family::V6),
            "pod sysctls and the DAD wait ran"
        );
        let pod = &st.pods[std::path::Path::new(NETNS)];
        let gw: IpAddr = "fe80::1".parse().expect("gw");
        assert!(pod.neighbours.iter().any(|n| n.ip == gw && n.permanent));
        assert!(pod.routes.iter().any(|r| r.gateway == Some(gw)));

        let c = with_prev(conf(), &r);
        d.check(&inv(Command::Check, "c1", NETNS), &c)
            .await
            .expect("check");
        d.del(&inv(Command::Del, "c1", NETNS), &c)
            .await
            .expect("del");
        assert!(d.net().state().host.rules.is_empty());
        assert!(d.net().state().host.routes.is_empty());
        assert_eq!(d.ipam().assigned(), 0);
        d.del(&inv(Command::Del, "c1", ""), &c)
            .await
            .expect("del twice");
    }

    #[tokio::test]
    async fn an_ipv6_failure_at_any_step_undoes_everything_and_releases() {
        for step in SetupStep::for_family(vpc_cni_net::Family::V6) {
            let d = driver_v6(1);
            d.net().fail_at(Some(step));
            let before = d.net().state();
            let e = d
                .add(&inv(Command::Add, "c1", NETNS), &conf())
                .await
                .expect_err("must fail");
            assert_eq!(e.code(), code::SETUP_FAILED, "{step}");
            assert_eq!(d.net().state().host, before.host, "{step}");
            assert_eq!(d.ipam().assigned(), 0, "{step}");
            assert_eq!(dels(&d)[0].reason, "SetupNSFailed", "{step}");
        }
    }

    #[tokio::test]
    async fn ipv6_del_without_ipamd_and_check_drift_use_the_prev_result() {
        let d = driver_v6(3);
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("add");
        let c = with_prev(conf(), &r);
        let ip: IpAddr = "2001:db8:7:8:9::10".parse().expect("ip");
        d.net()
            .teardown_pod(&PodTeardown {
                ip,
                route_table: 254,
            })
            .await
            .expect("flush");
        let e = d
            .check(&inv(Command::Check, "c1", NETNS), &c)
            .await
            .expect_err("drift");
        assert_eq!(e.code(), code::DRIFT);
        assert!(e.to_string().contains("512"), "{e}");
        // Re-add (idempotent in ipamd: same address), then DEL with ipamd down.
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect("re-add");
        d.ipam().set_unreachable(true);
        d.del(&inv(Command::Del, "c1", NETNS), &with_prev(conf(), &r))
            .await
            .expect("del");
        assert!(d.net().state().host.rules.is_empty());
        assert!(d.net().state().host.routes.is_empty());
    }

    #[tokio::test]
    async fn an_allocation_without_any_address_is_refused_and_released() {
        struct EmptyIpam;
        impl Ipam for EmptyIpam {
            async fn add_network(
                &self,
                _: AddNetworkRequest,
            ) -> Result<AddNetworkReply, BackendError> {
                Ok(AddNetworkReply {
                    success: true,
                    ip_allocation_metadata: vec![IpAllocationMetadata {
                        i_pv6_addr: "not-an-address".into(),
                        ..IpAllocationMetadata::default()
                    }],
                    ..AddNetworkReply::default()
                })
            }
            async fn del_network(
                &self,
                _: DelNetworkRequest,
            ) -> Result<vpc_cni_rpc::DelNetworkReply, BackendError> {
                Ok(vpc_cni_rpc::DelNetworkReply {
                    success: true,
                    ..Default::default()
                })
            }
            async fn ready(&self) -> Result<(), BackendError> {
                Ok(())
            }
        }
        let net = MemoryPodNetwork::new();
        net.add_netns(NETNS);
        let d = Driver::new(EmptyIpam, net, MemoryPolicyAgent::default(), CLIENT);
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &conf())
            .await
            .expect_err("bad address");
        assert_eq!(e.code(), code::IPAMD_ERROR);
        assert!(e.details().contains("IPv6Addr"), "{}", e.details());
        assert!(d.net().state().host.links.is_empty());
    }

    const BRANCH_MAC: &str = "0a:00:00:00:00:05";

    fn branch_driver() -> TestDriver {
        let d = driver(2, 0);
        d.ipam().set_branch(Some(crate::memory::BranchReply {
            vlan_id: 5,
            eni_mac: BRANCH_MAC.into(),
            subnet_gw: "10.0.1.1".into(),
            parent_if_index: 3,
        }));
        d.net()
            .add_host_link("eni-br5", BRANCH_MAC.parse().expect("mac"));
        d
    }

    fn branch_conf(mode: &str) -> NetConf {
        let mut c = conf();
        c.sg_mode = if mode == "strict" {
            SgEnforcingMode::Strict
        } else {
            SgEnforcingMode::Standard
        };
        c.branch_link = BranchLinkKind::Hotplug;
        c
    }

    #[tokio::test]
    async fn a_branch_pod_answers_the_vlan_in_the_dummy_and_the_gateway_in_ips() {
        for mode in ["strict", "standard"] {
            let d = branch_driver();
            let c = branch_conf(mode);
            let r = d
                .add(&inv(Command::Add, "c1", NETNS), &c)
                .await
                .expect("add");
            let j = r.render(CniVersion::V1_0_0);
            let prefix = if mode == "strict" { "vlan" } else { "eni" };
            assert_eq!(
                j["interfaces"],
                serde_json::json!([
                    {"name": host_veth_name(prefix, "default", "web-c1", 0)},
                    {"name": "eth0", "mac": "0", "sandbox": NETNS},
                    {"name": dummy_interface_name("default", "web-c1"), "mac": "5"}
                ]),
                "{mode}"
            );
            assert_eq!(
                j["ips"],
                serde_json::json!([{"interface": 1, "address": "10.0.1.10/32", "gateway": "10.0.1.1"}])
            );
            let host = d.net().state().host;
            let rules: Vec<String> = host.rules.iter().map(ToString::to_string).collect();
            if mode == "strict" {
                assert!(rules.iter().all(|r| r.starts_with("10: ")), "{rules:?}");
            } else {
                assert_eq!(
                    rules,
                    [
                        "512: from all to 10.0.1.10/32 lookup 254",
                        "1536: from 10.0.1.10/32 lookup 105"
                    ]
                );
            }
            assert!(host.link("vlan.eth.5").is_some() && host.link("eni-br5").is_none());
            d.check(&inv(Command::Check, "c1", NETNS), &with_prev(c.clone(), &r))
                .await
                .expect("check");
        }
    }

    #[tokio::test]
    async fn branch_del_uses_prev_result_without_ipamd_and_skips_an_empty_netns() {
        let d = branch_driver();
        let c = branch_conf("strict");
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &c)
            .await
            .expect("add");
        let wired = d.net().state().host;
        d.del(&inv(Command::Del, "c1", ""), &with_prev(c.clone(), &r))
            .await
            .expect("empty netns");
        assert_eq!(d.net().state().host, wired, "nothing torn down");
        d.ipam().set_unreachable(true);
        d.del(
            &inv(Command::Del, "c1", NETNS),
            &with_prev(branch_conf("standard"), &r),
        )
        .await
        .expect("del");
        let host = d.net().state().host;
        assert!(host.rules.is_empty(), "{:?}", host.rules);
        assert!(host.routes.is_empty(), "{:?}", host.routes);
        assert!(host.link("vlan.eth.5").is_none());
        assert_eq!(
            dels(&d).len(),
            1,
            "only the empty-netns DEL reached ipamd (best-effort release); then it was down"
        );
        assert_eq!(d.ipam().assigned(), 0);
    }

    #[tokio::test]
    async fn branch_del_without_prev_result_follows_ipamds_vlan() {
        let d = branch_driver();
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &branch_conf("standard"))
            .await
            .expect("add");
        assert_eq!(d.net().state().host.rules.len(), 2);
        d.del(&inv(Command::Del, "c1", NETNS), &branch_conf("strict"))
            .await
            .expect("del");
        let host = d.net().state().host;
        assert!(host.rules.is_empty() && host.routes.is_empty(), "{host:?}");
        assert!(host.link("vlan.eth.5").is_none());
        assert_eq!(dels(&d).len(), 1);
        drop(r);
    }

    #[tokio::test]
    async fn a_bad_branch_reply_is_refused_naming_the_field_and_released() {
        let d = branch_driver();
        d.ipam().set_branch(Some(crate::memory::BranchReply {
            vlan_id: 5,
            eni_mac: "not-a-mac".into(),
            subnet_gw: "10.0.1.1".into(),
            parent_if_index: 3,
        }));
        let e = d
            .add(&inv(Command::Add, "c1", NETNS), &branch_conf("strict"))
            .await
            .expect_err("bad mac");
        assert!(e.details().contains("PodENIMAC"), "{}", e.details());
        assert_eq!(d.ipam().assigned(), 0);
        assert_eq!(dels(&d)[0].reason, "SetupNSFailed");
        assert!(d.net().state().host.link("eni-br5").is_some(), "untouched");
    }

    #[tokio::test]
    async fn an_ipv6_branch_pod_gets_inet6_iif_rules_and_the_ec2_gateway() {
        let d = driver_v6(1);
        d.ipam().set_branch(Some(crate::memory::BranchReply {
            vlan_id: 7,
            eni_mac: BRANCH_MAC.into(),
            subnet_gw: "fe80:ec2::1".into(),
            parent_if_index: 3,
        }));
        d.net()
            .add_host_link("eni-br7", BRANCH_MAC.parse().expect("mac"));
        let c = branch_conf("strict");
        let r = d
            .add(&inv(Command::Add, "c1", NETNS), &c)
            .await
            .expect("add");
        let j = r.render(CniVersion::V1_0_0);
        assert_eq!(j["ips"][0]["address"], "2001:db8:7:8:9::10/128");
        assert_eq!(j["ips"][0]["gateway"], "fe80:ec2::1");
        assert_eq!(j["interfaces"][2]["mac"], "7");
        let host = d.net().state().host;
        assert_eq!(host.rules.len(), 2);
        assert!(host
            .rules
            .iter()
            .all(|r| r.family == vpc_cni_net::Family::V6 && r.priority == 10 && r.table == 107));
        let gw: IpAddr = "fe80:ec2::1".parse().expect("gw");
        assert!(host
            .routes
            .iter()
            .any(|r| r.table == 107 && r.gateway == Some(gw)));
        let c2 = with_prev(c, &r);
        d.check(&inv(Command::Check, "c1", NETNS), &c2)
            .await
            .expect("check");
        d.del(&inv(Command::Del, "c1", NETNS), &c2)
            .await
            .expect("del");
        let host = d.net().state().host;
        assert!(host.rules.is_empty() && host.routes.is_empty(), "{host:?}");
    }

    #[test]
    fn the_branch_del_decision_follows_the_dummy_and_the_netns() {
        let att = PodAttachment {
            host_veth: Some("vlanx".into()),
            container_ifname: "eth0".into(),
            sandbox: NETNS.into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 10)),
            route_table: 0,
        };
        let prev = |dummy| {
            PrevResult::parse(
                &AddResult::build(std::slice::from_ref(&att), "dummyx", dummy)
                    .render(CniVersion::V1_0_0),
            )
            .expect("parse")
        };
        let branch = prev(DummyInfo::Branch { vlan_id: 7 });
        let normal = prev(DummyInfo::Normal { device_number: 2 });
        let hp = BranchLinkKind::Hotplug;
        assert_eq!(branch_del_plan(None, NETNS, hp), None);
        assert_eq!(branch_del_plan(Some(&normal), NETNS, hp), None);
        assert_eq!(
            branch_del_plan(Some(&branch), "", hp),
            Some(BranchDel::EmptyNetns { vlan_id: 7 })
        );
        assert_eq!(
            branch_del_plan(Some(&branch), NETNS, hp),
            Some(BranchDel::Teardown(vec![BranchTeardown {
                ip: att.ip,
                vlan_id: 7,
                link: hp,
            }]))
        );
        let no_ips = PrevResult {
            ips: vec![],
            ..branch.clone()
        };
        assert_eq!(
            branch_del_plan(Some(&no_ips), NETNS, hp),
            None,
            "ipamd decides"
        );
    }

    #[tokio::test]
    async fn status_follows_ipamd_health() {
        let d = driver(1, 3);
        d.status().await.expect("ready");
        d.ipam().set_ready(false);
        assert_eq!(d.status().await.expect_err("not ready").code(), 50);
    }
}
