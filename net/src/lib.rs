//! Netlink and network-namespace operations shared by the VPC CNI plugin and ipamd.
//!
//! - [`netns`]: open, enter (RAII guard) and run-inside network namespaces; named namespaces.
//! - [`netlink`]: rtnetlink verbs in our own nouns (links, veth pairs, addresses, routes,
//!   rules, neighbours), one socket per namespace.
//! - [`sysctl`]: /proc/sys reads and writes inside a namespace.
//! - [`names`]: the reference's veth names, table ids and gateways.
//! - [`branch`]: the branch-ENI (security groups for pods) wiring's nouns and its branch
//!   link verb ([`branch::BranchLink`]: a real VLAN, or a hot-plugged link).
//! - [`pod`]: the per-pod wiring ([`PodNetwork`]) with its netlink implementation; [`memory`]
//!   has the in-memory one.
//! - [`host`]: ipamd's host verbs ([`HostNetwork`]: ENI setup, SNAT) with netlink and in-memory
//!   implementations; [`snat`] has the pure SNAT/connmark desired state and its application.
//! - [`testing`]: self-deleting test namespaces.
//!
//! No netlink or SDK type crosses this crate's API.

pub mod branch;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod memory;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod pod;
pub mod snat;
pub mod sysctl;
pub mod testing;
pub mod types;

pub use branch::{BranchLinkKind, BranchSpec, BranchTeardown, SgMode};
pub use error::{NetError, Result};
pub use host::{EniSpec, HostNetwork, MemoryHostNetwork, NetlinkHostNetwork};
pub use memory::MemoryPodNetwork;
pub use netlink::{Address, Link, Neighbour, Netlink, Route, Rule, RuleFilter, VethEnd};
pub use netns::{Netns, NetnsGuard};
pub use pod::{
    NetlinkPodNetwork, PodIfSpec, PodLinkSpec, PodNetwork, PodSpec, PodTeardown, PodWiring,
};
pub use snat::{RandomizeSnat, SnatConfig};
pub use types::{Family, IpCidr, MacAddr, Scope, MAIN_TABLE};
