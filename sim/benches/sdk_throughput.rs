//! SDK calls per second against the served simulator (filled in by the next commit).

fn main() {}
