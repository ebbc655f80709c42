//! ipamd: the node IP address management daemon.
//!
//! It keeps a warm pool of VPC secondary IPs or /28 prefixes on the node's ENIs, hands
//! addresses to the CNI plugin over gRPC on a unix socket, and records every assignment in a
//! checkpoint compatible with the reference daemon (`vpc-cni-ipam/1`).
//!
//! The crate is layered; each layer uses only those listed before it:
//!
//! - [`types`], [`config`], [`failpoint`]: values, settings, crash-test hooks.
//! - [`store`]: what the node holds and who holds it (the datastore of a card and address
//!   family), the checkpoint file, and the group commit that makes every change durable
//!   before it is acknowledged. Pure, apart from the checkpoint's disk IO.
//! - [`plan`]: pure decisions over the store: how the pool should change (the calculator's
//!   policy with the daemon's memory of past decisions), how the datastore should follow
//!   instance metadata and EC2, which ENIs are leaked, which subnet a new ENI goes to.
//! - [`io`]: the shell to the outside: EC2 (the SDK client, the pacer, an in-memory fake),
//!   instance metadata, the host's netlink and iptables, Kubernetes, the embedded simulator.
//! - [`run`]: the loops that carry plans out through the shell: the pool manager and the
//!   reconciler.
//! - [`serve`]: what clients reach: gRPC on the unix socket, introspection, metrics.
//! - [`daemon`]: start-up in the reference's order, wiring all of the above.

pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod io;
pub mod plan;
pub mod run;
pub mod serve;
pub mod store;
pub mod types;
