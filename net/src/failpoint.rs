//! Kill points shared by the daemon and the plugin: named places on a path that must survive
//! a crash, where a crash test makes the process SIGKILL itself.
//!
//! `VPC_CNI_FAILPOINTS=name=N[,name=N...]` arms them: the Nth time the process reaches
//! `name` it sends itself SIGKILL, as a node's OOM killer or a `kill -9` would stop it (no
//! destructor, no flush). Unarmed, a point costs one load of a `OnceLock`. Each binary names
//! its own points and keeps one [`Failpoints`] in a `static`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms kill points.
pub const ENV: &str = "VPC_CNI_FAILPOINTS";

/// Parses an [`ENV`] value against the points a binary has: comma-separated `name=N`, a
/// known name and N >= 1; empty items are skipped. The error says what is wrong (the caller
/// names the variable in its own error type).
pub fn parse(value: &str, known: &[&'static str]) -> Result<Vec<(&'static str, u64)>, String> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=N"))?;
        let name = known
            .iter()
            .copied()
            .find(|k| *k == name.trim())
            .ok_or_else(|| {
                format!(
                    "unknown failpoint {:?} (known: {})",
                    name.trim(),
                    known.join(", ")
                )
            })?;
        let at = n
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{name}: {n:?} is not a count >= 1"))?;
        out.push((name, at));
    }
    Ok(out)
}

struct Armed {
    name: &'static str,
    at: u64,
    seen: AtomicU64,
}

/// The armed points of one process.
pub struct Failpoints {
    /// The process as it names itself in the line printed before the kill.
    who: &'static str,
    armed: OnceLock<Vec<Armed>>,
}

impl Failpoints {
    /// No point armed yet; `who` names the process in the line printed before a kill.
    pub const fn new(who: &'static str) -> Self {
        Self {
            who,
            armed: OnceLock::new(),
        }
    }

    /// Arms the parsed points (once per process; later calls change nothing).
    pub fn arm(&self, points: Vec<(&'static str, u64)>) {
        let _ = self.armed.set(
            points
                .into_iter()
                .map(|(name, at)| Armed {
                    name,
                    at,
                    seen: AtomicU64::new(0),
                })
                .collect(),
        );
    }

    /// Whether any point is armed.
    pub fn armed(&self) -> bool {
        self.armed.get().is_some_and(|a| !a.is_empty())
    }

    /// Marks that the process reached point `name`; SIGKILLs it when the point is armed and
    /// this is its Nth time.
    pub fn hit(&self, name: &str) {
        let Some(armed) = self.armed.get() else {
            return;
        };
        for a in armed.iter().filter(|a| a.name == name) {
            if a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
                eprintln!("{}: failpoint {name} reached ({}): SIGKILL", self.who, a.at);
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["a-point", "b-point"];

    #[test]
    fn parses_known_names_with_counts_and_says_what_is_wrong() {
        assert_eq!(
            parse(" a-point=3, b-point=1,", KNOWN).expect("valid"),
            vec![("a-point", 3), ("b-point", 1)]
        );
        assert_eq!(parse("", KNOWN).expect("empty"), vec![]);
        for (bad, says) in [
            ("a-point", "not name=N"),
            ("nope=1", "unknown failpoint"),
            ("a-point=0", "count >= 1"),
            ("a-point=x", "count >= 1"),
            ("=1", "unknown failpoint"),
        ] {
            let e = parse(bad, KNOWN).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_unarmed_or_other_point_does_nothing() {
        let f = Failpoints::new("test");
        f.hit("a-point");
        assert!(!f.armed());
        f.arm(vec![("a-point", 2)]);
        assert!(f.armed());
        // Another point, and the first time of the armed one, do not kill.
        f.hit("b-point");
        f.hit("a-point");
    }
}
