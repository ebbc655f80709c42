//! Helpers for tests that need real network namespaces (this crate's and its callers').
//!
//! Every namespace a test makes is a [`TestNetns`]: uniquely named (tag, process id, counter,
//! so parallel test processes never collide) and deleted when dropped, including while a test
//! panics.

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Result;
use crate::netns::{create_named, delete_named, Netns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when this process can create network namespaces (it runs as root). Netns tests call
/// this first and return early, saying so, when it is false.
pub fn can_create_netns() -> bool {
    nix::unistd::Uid::effective().is_root()
        && std::path::Path::new("/proc/thread-self/ns/net").exists()
}

/// Returns `true` (and prints why) when a netns test should be skipped.
pub fn skip_netns_test(test: &str) -> bool {
    if can_create_netns() {
        false
    } else {
        eprintln!("skipping {test}: needs root to create network namespaces");
        true
    }
}

/// A named network namespace that exists for the lifetime of the value.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
    netns: Option<Netns>,
}

impl TestNetns {
    /// Creates `/var/run/netns/<tag>-<pid>-<n>`. Keep `tag` short and descriptive (`host`,
    /// `pod`, `vpc`).
    pub fn new(tag: &str) -> Result<TestNetns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("vcn-{tag}-{}-{n}", std::process::id());
        let netns = create_named(&name)?;
        Ok(TestNetns {
            name,
            netns: Some(netns),
        })
    }

    /// The namespace's name (for `ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace now (what dropping does, but reporting errors).
    pub fn delete(mut self) -> Result<()> {
        self.netns = None;
        delete_named(&self.name)
    }
}

impl Deref for TestNetns {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        match &self.netns {
            Some(ns) => ns,
            None => unreachable!("a TestNetns is only emptied by delete or drop"),
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        self.netns = None;
        if let Err(e) = delete_named(&self.name) {
            eprintln!("TestNetns {}: delete failed: {e}", self.name);
        }
    }
}
