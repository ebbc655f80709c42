//! The IO shell: everything that talks to the world outside the process. Each part is a
//! narrow trait or function set in our own nouns, with a real implementation and, where
//! useful, an in-memory one for unit tests.
//!
//! - [`ec2`]: EC2 behind [`ec2::Ec2Api`] (the `aws-sdk-ec2` client, a fake) and the pacer
//!   that rate-limits and retries every call.
//! - [`imds`]: instance metadata.
//! - [`host`]: the node's own wiring (MTU, ENI route tables and rules, SNAT) over netlink and
//!   iptables.
//! - [`k8s`]: the Node, ENIConfig, pod annotation and events.
//! - [`sim_backend`]: the embedded VPC simulator for `--backend sim`.

pub mod ec2;
pub mod host;
pub mod imds;
pub mod k8s;
pub mod sim_backend;
