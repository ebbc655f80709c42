//! `vpc-sim`: serves the VPC simulator (work in progress: see the crate README).

fn main() {}
