//! Failpoints: named places on the paths that must survive a crash (the checkpoint write, pool
//! growth), where a crash test can make the daemon kill itself with SIGKILL.
//!
//! `VPC_CNI_FAILPOINTS=name=N[,name=N...]` arms them: the Nth time the daemon reaches `name`
//! it sends itself SIGKILL, exactly as a node's OOM killer or a `kill -9` would stop it (no
//! destructor, no flush). Unset, each point costs one relaxed atomic load. Meant for tests;
//! documented in docs/settings.md so that nobody sets it by accident.

use vpc_cni_net::failpoint::Failpoints;

/// The environment variable that arms failpoints.
pub const ENV: &str = vpc_cni_net::failpoint::ENV;

/// The checkpoint's temporary file is written and synced, not yet renamed over the file.
pub const CHECKPOINT_BEFORE_RENAME: &str = "checkpoint-before-rename";
/// The checkpoint is renamed into place, its directory not yet synced.
pub const CHECKPOINT_BEFORE_DIR_SYNC: &str = "checkpoint-before-dir-sync";
/// A group of assignments is in the datastore, its checkpoint write not yet begun.
pub const CHECKPOINT_BEFORE_WRITE: &str = "checkpoint-before-write";
/// `CreateNetworkInterface` answered; the ENI is not attached yet.
pub const ENI_CREATED: &str = "eni-created";
/// `AssignPrivateIpAddresses` answered; the addresses are not in the datastore yet.
pub const ADDRESSES_ASSIGNED: &str = "addresses-assigned";

/// Every failpoint, for validation of [`ENV`].
pub const ALL: &[&str] = &[
    CHECKPOINT_BEFORE_RENAME,
    CHECKPOINT_BEFORE_DIR_SYNC,
    CHECKPOINT_BEFORE_WRITE,
    ENI_CREATED,
    ADDRESSES_ASSIGNED,
];

/// A malformed [`ENV`] value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ENV}: {0}")]
pub struct FailpointError(String);

static POINTS: Failpoints = Failpoints::new("ipamd");

/// Parses an [`ENV`] value: comma-separated `name=N` with a known name and N >= 1.
pub fn parse(value: &str) -> Result<Vec<(&'static str, u64)>, FailpointError> {
    vpc_cni_net::failpoint::parse(value, ALL).map_err(FailpointError)
}

/// Arms the failpoints named in [`ENV`] (once, at start-up; later calls change nothing).
pub fn init_from_env() -> Result<(), FailpointError> {
    let v = std::env::var(ENV).unwrap_or_default();
    let parsed = parse(&v)?;
    if !parsed.is_empty() {
        tracing::warn!(failpoints = %v, "failpoints armed: the daemon will kill itself (tests only)");
    }
    POINTS.arm(parsed);
    Ok(())
}

/// Marks that the daemon reached failpoint `name`; kills the process if it is armed and this
/// is the time.
pub fn hit(name: &'static str) {
    POINTS.hit(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_with_counts_and_names_what_is_wrong() {
        assert_eq!(
            parse("checkpoint-before-rename=3, eni-created=1").unwrap(),
            vec![(CHECKPOINT_BEFORE_RENAME, 3), (ENI_CREATED, 1)]
        );
        assert!(parse("").unwrap().is_empty());
        let e = parse("nope=1").unwrap_err().to_string();
        assert!(e.contains(ENV) && e.contains("nope"), "{e}");
        assert!(parse("eni-created")
            .unwrap_err()
            .to_string()
            .contains("name=N"));
        assert!(parse("eni-created=0")
            .unwrap_err()
            .to_string()
            .contains(">= 1"));
        assert!(parse("eni-created=x").is_err());
    }
}
