//! The node's state: which addresses its ENIs hold and which pod holds each, made durable in
//! the reference daemon's checkpoint before a change is acknowledged.
//!
//! - [`datastore`]: ENIs, their CIDRs and assignments (pure, synchronous, time a parameter).
//! - [`checkpoint`]: the `vpc-cni-ipam/1` file and its stores (a file, or memory in tests).
//! - [`commit`]: the datastore shared by the gRPC handlers and the pool manager, with its
//!   checkpoint written by group commit.

pub mod checkpoint;
pub mod commit;
pub mod datastore;
pub mod family;
