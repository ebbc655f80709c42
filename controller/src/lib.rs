//! The cluster-side half of security groups for pods, the job EKS's VPC resource controller
//! does for the reference CNI: it attaches a trunk ENI to every node that asks for one, and
//! gives each pod selected by a `SecurityGroupPolicy` its own branch ENI (with the policy's
//! security groups, associated with the node's trunk under a VLAN id), which it writes on the
//! pod as the `vpc.amazonaws.com/pod-eni` annotation that ipamd reads.
//!
//! The logic is one pure function, [`reconcile::plan`]: what Kubernetes says (nodes, pods,
//! policies, service accounts: [`model::Cluster`]) against what EC2 says (the trunk and branch
//! ENIs the controller tagged, their associations: [`model::Fleet`]) gives a list of
//! [`reconcile::Action`]s. The IO is a thin shell around it: [`k8s`] reads and patches the
//! API server, [`ec2`] calls EC2 through a paced, retrying client, and [`run`] runs
//! observe–plan–execute passes. Nothing is remembered between passes except when an orphaned
//! branch was first seen (its cool-down), so a restarted controller rebuilds everything from
//! EC2 tags and pod annotations.

pub mod ec2;
pub mod k8s;
pub mod model;
pub mod policy;
pub mod reconcile;
pub mod run;
