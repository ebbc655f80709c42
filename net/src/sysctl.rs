//! Sysctls under /proc/sys, read and written from inside a given network namespace.
//!
//! `/proc/sys/net` shows the namespace of the thread that opens the file, so each access runs
//! on a dedicated thread that has entered the namespace ([`Netns::run`]).

use crate::error::{NetError, Result};
use crate::netns::Netns;

fn validate(key: &str) -> Result<std::path::PathBuf> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
    if ok {
        Ok(std::path::Path::new("/proc/sys").join(key))
    } else {
        Err(NetError::invalid(format!("sysctl key {key:?}")))
    }
}

/// Reads sysctl `key` (relative to /proc/sys, `/`-separated, e.g.
/// `net/ipv4/conf/eth0/rp_filter`) inside `ns`; the value is trimmed.
pub fn read(ns: &Netns, key: &str) -> Result<String> {
    let path = validate(key)?;
    ns.run(|| std::fs::read_to_string(&path))?
        .map(|s| s.trim().to_string())
        .map_err(|source| NetError::Sysctl {
            op: "read",
            key: key.to_string(),
            source,
        })
}

/// Writes sysctl `key` inside `ns`.
pub fn write(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let path = validate(key)?;
    ns.run(|| std::fs::write(&path, value))?
        .map_err(|source| NetError::Sysctl {
            op: "write",
            key: key.to_string(),
            source,
        })
}

/// Writes several sysctls inside `ns` from one dedicated thread, in order. With
/// `ignore_missing`, keys whose file does not exist (ENOENT, e.g. IPv6 disabled) are skipped.
pub fn write_all(ns: &Netns, pairs: &[(String, String)], ignore_missing: bool) -> Result<()> {
    let mut paths = Vec::with_capacity(pairs.len());
    for (k, _) in pairs {
        paths.push(validate(k)?);
    }
    ns.run(|| {
        for ((k, v), p) in pairs.iter().zip(&paths) {
            match std::fs::write(p, v) {
                Ok(()) => {}
                Err(e) if ignore_missing && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(NetError::Sysctl {
                        op: "write",
                        key: k.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_relative_paths_without_dot_components() {
        assert!(validate("net/ipv4/conf/eth0/rp_filter").is_ok());
        assert!(validate("net/ipv4/conf/vlan.eth.5/rp_filter").is_ok());
        assert!(validate("/net/ipv4").is_err());
        assert!(validate("net/../kernel/x").is_err());
        assert!(validate("net//x").is_err());
        assert!(validate("").is_err());
    }
}
