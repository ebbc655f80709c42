//! `subnet-calc`: placeholder replaced by the CLI module.
fn main() {}
