//! The VPC CNI node installer (`vpc-cni-install`).
//!
//! Three modes of one small binary, so the deployment needs neither shell scripts nor
//! `grpc-health-probe`:
//! - `init` (the DaemonSet's init container, spec/cni.md 3.1): copies every plugin binary from
//!   a source directory into the host CNI bin dir atomically and sets the node sysctls
//!   ([`node`]);
//! - `run -- <ipamd ...>` (the daemon container's entrypoint, spec/cni.md 4.4): validates the
//!   environment ([`settings`]), installs `aws-cni`, starts ipamd, and installs the conflist
//!   ([`conflist`]) only once ipamd's gRPC health reports SERVING ([`supervise`]);
//! - `health` (the liveness and readiness probes): exits 0 only when ipamd reports SERVING.
//!
//! Every file lands in a host directory atomically ([`install`]).

pub mod conflist;
pub mod error;
pub mod install;
pub mod node;
pub mod settings;
pub mod supervise;

pub use error::InstallerError;
