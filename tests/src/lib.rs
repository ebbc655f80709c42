//! End-to-end harness: a simulated VPC in network namespaces, driven by the VPC simulator.
//!
//! - [`fabric`]: the VPC router/mapping-service namespace, node namespaces booted per instance,
//!   the outside namespace, and [`fabric::FabricHooks`] that mirror the simulator's attach,
//!   detach, assign and unassign events (veth hot-plug, routes, source/destination check).
//! - [`cluster`]: [`cluster::SimCluster`], a simulator with the fabric's hooks installed, and the
//!   EC2 calls a scenario makes in-process.
//! - [`serve`]: the simulator's EC2/IMDS server inside the VPC namespace, reachable from nodes.
//! - [`kube_api`]: a small stateful Kubernetes API stand-in served in the fabric, for ipamd and
//!   the resource controller as real binaries.
//! - [`process`]: ipamd or the plugin run inside a node namespace, killed on drop.
//! - [`node`]: the real `ipamd` (restartable, killable) and `aws-cni` binaries on a node,
//!   ipamd's introspection and checkpoint read back, and the simulator's view of the node's
//!   ENIs to compare them with.
//! - [`demo`]: the quick-start demo (`vpc-cni-demo`): ipamd on a simulated node, pods, checks,
//!   a short summary.
//! - [`probe`]: a UDP echo listener that records the peer address it sees, and bounded probes.
//!
//! Every namespace is a `vpc_cni_net::testing::TestNetns` (`vcn-<tag>-<pid>-<n>`), deleted on
//! drop, also when a test panics. Nothing touches the root namespace. Needs root; tests skip
//! otherwise (`vpc_cni_net::testing::skip_netns_test`).

pub mod cluster;
pub(crate) mod cmd;
pub mod demo;
pub mod error;
pub mod fabric;
pub mod kube_api;
pub mod node;
pub mod probe;
pub mod process;
pub mod serve;

pub use cluster::{NewEni, SimCluster};
pub use error::{FabricError, Result};
pub use fabric::{EniPort, Fabric, FabricHooks, Node};
