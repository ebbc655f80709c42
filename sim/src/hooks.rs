//! Hooks: what the simulator tells a test harness when an ENI is attached or detached or
//! addresses are assigned or unassigned, so the harness can mirror it (hot-plug a veth carrying
//! the ENI's MAC into a node's namespace, program the "VPC fabric" routes).
//!
//! The model records [`HookEvent`]s as it changes state; the [`crate::sim::Simulator`] hands
//! them to the installed [`Hooks`] after each successful call, in order.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use subnet_calc::subnet::Ipv4Cidr;

use crate::ipv6::Ipv6Block;

/// A set of addresses on one ENI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AddressSet {
    /// IPv4 addresses (on attach/detach: the primary first).
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv4 /28 prefixes.
    pub ipv4_prefixes: Vec<Ipv4Cidr>,
    /// IPv6 addresses.
    pub ipv6: Vec<Ipv6Addr>,
    /// IPv6 /80 prefixes.
    pub ipv6_prefixes: Vec<Ipv6Block>,
}

/// An ENI was attached to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EniAttached {
    /// Instance.
    pub instance_id: String,
    /// ENI.
    pub eni_id: String,
    /// The ENI's MAC (give the veth this address).
    pub mac: String,
    /// Device index.
    pub device_index: u32,
    /// Network card.
    pub network_card_index: u32,
    /// Subnet.
    pub subnet_id: String,
    /// Every address the ENI holds.
    pub addresses: AddressSet,
}

/// An ENI was detached from an instance (or its instance terminated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EniDetached {
    /// Instance.
    pub instance_id: String,
    /// ENI.
    pub eni_id: String,
    /// The ENI's MAC.
    pub mac: String,
    /// Device index it had.
    pub device_index: u32,
    /// Network card it was on.
    pub network_card_index: u32,
    /// Every address the ENI held.
    pub addresses: AddressSet,
}

/// Addresses were assigned to or unassigned from an ENI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressesChanged {
    /// ENI.
    pub eni_id: String,
    /// Instance it is attached to, if any.
    pub instance_id: Option<String>,
    /// The ENI's MAC.
    pub mac: String,
    /// Only the addresses that changed.
    pub addresses: AddressSet,
}

/// A branch ENI was associated with a trunk ENI (security groups for pods): the harness can
/// plug the branch into the trunk's node as its own link (or a VLAN on the trunk's link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BranchAssociated {
    /// The instance the trunk is attached to.
    pub instance_id: String,
    /// `trunk-assoc-…`.
    pub association_id: String,
    /// Trunk ENI.
    pub trunk_eni_id: String,
    /// The trunk's MAC.
    pub trunk_mac: String,
    /// Branch ENI.
    pub branch_eni_id: String,
    /// The branch's MAC.
    pub branch_mac: String,
    /// VLAN id (0 for a GRE association).
    pub vlan_id: u32,
    /// The branch's subnet.
    pub subnet_id: String,
    /// Every address the branch holds.
    pub addresses: AddressSet,
}

/// A branch ENI's association ended (disassociated, or its trunk detached or terminated).
/// Same fields as [`BranchAssociated`].
pub type BranchDisassociated = BranchAssociated;

/// One hook event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HookEvent {
    /// See [`EniAttached`].
    Attached(EniAttached),
    /// See [`EniDetached`].
    Detached(EniDetached),
    /// See [`AddressesChanged`].
    Assigned(AddressesChanged),
    /// See [`AddressesChanged`].
    Unassigned(AddressesChanged),
    /// See [`BranchAssociated`].
    BranchAssociated(BranchAssociated),
    /// See [`BranchDisassociated`].
    BranchDisassociated(BranchDisassociated),
}

impl HookEvent {
    /// Calls the matching method of `hooks`.
    pub fn dispatch(&self, hooks: &mut dyn Hooks) {
        match self {
            Self::Attached(e) => hooks.on_attach(e),
            Self::Detached(e) => hooks.on_detach(e),
            Self::Assigned(e) => hooks.on_assign(e),
            Self::Unassigned(e) => hooks.on_unassign(e),
            Self::BranchAssociated(e) => hooks.on_branch_associated(e),
            Self::BranchDisassociated(e) => hooks.on_branch_disassociated(e),
        }
    }
}

/// Receives the simulator's state changes. Called with the simulator locked: do quick work or
/// hand off to another thread.
pub trait Hooks: Send {
    /// An ENI was attached (including an instance's primary ENI at launch).
    fn on_attach(&mut self, ev: &EniAttached);
    /// An ENI was detached (including by instance termination).
    fn on_detach(&mut self, ev: &EniDetached);
    /// Addresses or prefixes were assigned.
    fn on_assign(&mut self, ev: &AddressesChanged);
    /// Addresses or prefixes were unassigned.
    fn on_unassign(&mut self, ev: &AddressesChanged);
    /// A branch ENI was associated with a trunk (default: ignored).
    fn on_branch_associated(&mut self, _ev: &BranchAssociated) {}
    /// A branch ENI's association ended (default: ignored).
    fn on_branch_disassociated(&mut self, _ev: &BranchDisassociated) {}
}

/// Hooks that do nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn on_attach(&mut self, _: &EniAttached) {}
    fn on_detach(&mut self, _: &EniDetached) {}
    fn on_assign(&mut self, _: &AddressesChanged) {}
    fn on_unassign(&mut self, _: &AddressesChanged) {}
}

/// Hooks that record every event in memory; clones share the record.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    events: Arc<Mutex<Vec<HookEvent>>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far, in order.
    pub fn events(&self) -> Vec<HookEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn push(&self, e: HookEvent) {
        if let Ok(mut v) = self.events.lock() {
            v.push(e);
        }
    }
}

impl Hooks for Recorder {
    fn on_attach(&mut self, ev: &EniAttached) {
        self.push(HookEvent::Attached(ev.clone()));
    }
    fn on_detach(&mut self, ev: &EniDetached) {
        self.push(HookEvent::Detached(ev.clone()));
    }
    fn on_assign(&mut self, ev: &AddressesChanged) {
        self.push(HookEvent::Assigned(ev.clone()));
    }
    fn on_unassign(&mut self, ev: &AddressesChanged) {
        self.push(HookEvent::Unassigned(ev.clone()));
    }
    fn on_branch_associated(&mut self, ev: &BranchAssociated) {
        self.push(HookEvent::BranchAssociated(ev.clone()));
    }
    fn on_branch_disassociated(&mut self, ev: &BranchDisassociated) {
        self.push(HookEvent::BranchDisassociated(ev.clone()));
    }
}
