//! Helpers for tests that need real network namespaces (this crate's and its callers').
//!
//! Every namespace a test makes is a [`TestNetns`]: uniquely named (tag, process id, counter,
//! so parallel test processes never collide) and deleted when dropped, including while a test
//! panics.

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Result;
use crate::netns::{create_named, delete_named, list_named, Netns};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: std::sync::Once = std::sync::Once::new();

/// The owner process id of a [`TestNetns`] name (`vcn-<tag>-<pid>-<n>`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("vcn-")?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    (!tag.is_empty() && n.parse::<u32>().is_ok())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Deletes the test namespaces whose owner process is gone: a test process killed (SIGKILL, a
/// harness timeout, Ctrl-C) never runs its `Drop`s, and its namespaces would stay until the
/// machine reboots. Only names of our pattern are touched, and only when no process with the
/// owner's id exists (a reused id keeps its namespaces: the sweep errs on the side of leaving
/// them). Returns the names deleted. Runs once per process, before its first namespace.
pub fn sweep_orphaned() -> Vec<String> {
    let Ok(names) = list_named() else {
        return Vec::new();
    };
    let mut deleted = Vec::new();
    for name in names {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if delete_named(&name).is_ok() {
            eprintln!("TestNetns: deleted {name}, left by process {pid} which is gone");
            deleted.push(name);
        }
    }
    deleted
}

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
        SWEEP.call_once(|| {
            sweep_orphaned();
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_are_read_from_our_names_only() {
        assert_eq!(owner_pid("vcn-pod-23445-3"), Some(23445));
        assert_eq!(owner_pid("vcn-node-a-17-0"), Some(17));
        assert_eq!(owner_pid("vcn--17-0"), None);
        assert_eq!(owner_pid("vcn-pod-x-3"), None);
        assert_eq!(owner_pid("cni-1234-5678"), None);
    }

    #[test]
    fn a_namespace_of_a_gone_process_is_swept_and_ours_are_kept() {
        if skip_netns_test("sweep of orphaned test namespaces") {
            return;
        }
        // No process can have an id above pid_max.
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("pid_max")
            .trim()
            .parse()
            .expect("number");
        // Ours first, so this process's once-only sweep has run before the orphan exists.
        let ours = TestNetns::new("sweep").expect("ours");
        let orphan = format!("vcn-sweep-{}-0", pid_max + 1);
        drop(create_named(&orphan).expect("create the orphan"));
        let deleted = sweep_orphaned();
        let left = list_named().expect("list");
        assert!(deleted.contains(&orphan), "{deleted:?}");
        assert!(!left.contains(&orphan), "{left:?}");
        assert!(left.contains(&ours.name().to_owned()), "{left:?}");
    }
}
