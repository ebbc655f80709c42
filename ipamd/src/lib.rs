//! ipamd: the node IP address management daemon.
//!
//! It keeps a warm pool of VPC secondary IPs or /28 prefixes on the node's ENIs, hands
//! addresses to the CNI plugin over gRPC on a unix socket, and records every assignment in a
//! checkpoint compatible with the reference daemon (`vpc-cni-ipam/1`).

pub mod aws;
pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod datastore;
pub mod ec2;
pub mod failpoint;
pub mod host;
pub mod imds;
pub mod introspect;
pub mod k8s;
pub mod metrics;
pub mod pool;
pub mod reconcile;
pub mod server;
pub mod sim_backend;
pub mod state;
pub mod types;
