//! Capacity model for VPC CNI clusters: EC2 instance limits, subnet arithmetic with AWS's
//! rules, the warm-pool policy that ipamd runs, max pods, and the planner and simulator built
//! on them.
//!
//! Everything here is pure: no IO beyond parsing inputs handed in by the caller, and time is
//! always a parameter.

pub mod demand;
pub mod exact;
pub mod ipv6;
pub mod limits;
pub mod maxpods;
pub mod node;
pub mod plan;
pub mod policy;
pub mod report;
pub mod subnet;
pub mod svg;
pub mod timeline;
pub mod workbook;
