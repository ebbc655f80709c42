//! A VPC simulator with AWS's semantics for the EC2 calls and instance metadata that ipamd
//! uses, usable in-process ([`sim::Simulator`], [`model::Model`]) or served over HTTP as the EC2
//! Query API, IMDSv2 and an admin JSON view ([`server`]).
//!
//! Layers, pure to impure: [`model`] (state and AWS's rules, time as a parameter, seeded
//! randomness) → [`sim`] (throttling, faults, latency, call log, hooks, metadata lag) →
//! [`query`]/[`xml`] (wire format) → [`server`] (tokio + hyper).

pub mod api;
pub mod control;
pub mod error;
pub mod hooks;
pub mod imds;
pub mod ipv6;
pub mod model;
pub mod moto;
pub mod query;
pub mod rng;
pub mod server;
pub mod sim;
pub mod xml;
