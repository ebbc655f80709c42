//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS`, `CNI_PATH`. Pure: variables come from a lookup function.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;

use crate::error::CniError;

/// The CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Add the container to the network.
    Add,
    /// Remove it.
    Del,
    /// Verify it.
    Check,
    /// Report supported versions.
    Version,
    /// Garbage-collect attachments that are not in the valid list (1.1).
    Gc,
    /// Report readiness (1.1).
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        })
    }
}

/// `CNI_ARGS`: `K=V;K=V`, in any order. The Kubernetes keys are kept; others are kept too so
/// that they can be logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// Every pair, by key.
    pub pairs: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`. Empty segments are skipped; a segment without `=` is an error
    /// (code 4), as in libcni's `LoadArgs`.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut pairs = BTreeMap::new();
        for seg in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = seg.split_once('=') else {
                return Err(CniError::InvalidEnvironment {
                    var: "CNI_ARGS",
                    reason: format!("{seg:?} is not KEY=VALUE"),
                });
            };
            pairs.insert(k.to_string(), v.to_string());
        }
        Ok(CniArgs { pairs })
    }

    fn get(&self, k: &str) -> &str {
        self.pairs.get(k).map(String::as_str).unwrap_or("")
    }

    /// `K8S_POD_NAMESPACE` (empty when absent).
    pub fn pod_namespace(&self) -> &str {
        self.get("K8S_POD_NAMESPACE")
    }

    /// `K8S_POD_NAME` (empty when absent).
    pub fn pod_name(&self) -> &str {
        self.get("K8S_POD_NAME")
    }

    /// `K8S_POD_INFRA_CONTAINER_ID` (empty when absent).
    pub fn infra_container_id(&self) -> &str {
        self.get("K8S_POD_INFRA_CONTAINER_ID")
    }

    /// `K8S_POD_UID` (empty when absent; kubelet sends it on DEL).
    pub fn pod_uid(&self) -> &str {
        self.get("K8S_POD_UID")
    }

    /// `IgnoreUnknown` set to a true value (`1`, `true`, case-insensitive).
    pub fn ignore_unknown(&self) -> bool {
        let v = self.get("IgnoreUnknown");
        v == "1" || v.eq_ignore_ascii_case("true")
    }
}

/// One plugin invocation's environment, validated for its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for VERSION, GC, STATUS).
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: CniArgs,
    /// `CNI_PATH` (only logged).
    pub path: String,
}

/// What [`Invocation::from_env`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvOutcome {
    /// `CNI_COMMAND` is unset: print the about text on stderr and exit 0, as skel does.
    About,
    /// A command to run.
    Run(Invocation),
}

/// The container id rule of libcni: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`. Network names follow
/// the same rule.
pub fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// libcni's interface name rule: 1..=15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Every CNI variable [`Invocation::from_env`] reads.
pub const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// The process environment's values of `vars`, refusing one that is set but not UTF-8 (code
/// 4, naming it): read as a `String`, such a value would look unset, so a `CNI_NETNS` or
/// `CNI_ARGS` of the wrong bytes would be taken for a missing one.
pub fn utf8_vars(
    get_os: &dyn Fn(&str) -> Option<OsString>,
    vars: &[&'static str],
) -> Result<BTreeMap<&'static str, String>, CniError> {
    let mut out = BTreeMap::new();
    for &var in vars {
        if let Some(v) = get_os(var) {
            let v = v
                .into_string()
                .map_err(|raw| CniError::InvalidEnvironment {
                    var,
                    reason: format!("{} is not UTF-8", raw.to_string_lossy()),
                })?;
            out.insert(var, v);
        }
    }
    Ok(out)
}

impl Invocation {
    /// Reads and validates the environment through `get`, with skel's rules: container id,
    /// interface name and `CNI_PATH` are required for ADD, DEL and CHECK; `CNI_NETNS` for ADD
    /// and CHECK only.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<EnvOutcome, CniError> {
        let var = |k: &str| get(k).unwrap_or_default();
        let command = match get("CNI_COMMAND") {
            None => return Ok(EnvOutcome::About),
            Some(c) if c.is_empty() => return Ok(EnvOutcome::About),
            Some(c) => Command::parse(&c).ok_or_else(|| CniError::InvalidEnvironment {
                var: "CNI_COMMAND",
                reason: format!("unknown command {c:?}"),
            })?,
        };
        let inv = Invocation {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: CniArgs::parse(&var("CNI_ARGS"))?,
            path: var("CNI_PATH"),
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        if per_container {
            let missing = |v: &'static str| CniError::InvalidEnvironment {
                var: v,
                reason: "required but not set".into(),
            };
            if inv.container_id.is_empty() {
                return Err(missing("CNI_CONTAINERID"));
            }
            if !valid_id(&inv.container_id) {
                return Err(CniError::InvalidEnvironment {
                    var: "CNI_CONTAINERID",
                    reason: format!("{:?} has invalid characters", inv.container_id),
                });
            }
            if inv.ifname.is_empty() {
                return Err(missing("CNI_IFNAME"));
            }
            if !valid_ifname(&inv.ifname) {
                return Err(CniError::InvalidEnvironment {
                    var: "CNI_IFNAME",
                    reason: format!("{:?} is not a valid interface name", inv.ifname),
                });
            }
            if inv.path.is_empty() {
                return Err(missing("CNI_PATH"));
            }
            if matches!(command, Command::Add | Command::Check) && inv.netns.is_empty() {
                return Err(missing("CNI_NETNS"));
            }
        }
        Ok(EnvOutcome::Run(inv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/p1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123",
        ),
    ];

    fn run(pairs: &[(&str, &str)]) -> Result<Invocation, CniError> {
        match Invocation::from_env(&env(pairs))? {
            EnvOutcome::Run(i) => Ok(i),
            EnvOutcome::About => panic!("expected a command"),
        }
    }

    #[test]
    fn cni_args_are_a_set_whatever_their_order() {
        let a = CniArgs::parse("K8S_POD_NAME=web-0;IgnoreUnknown=1;K8S_POD_NAMESPACE=default")
            .expect("parse");
        let b = CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;;IgnoreUnknown=1")
            .expect("parse");
        assert_eq!(a, b);
        assert_eq!(a.pod_name(), "web-0");
        assert_eq!(a.pod_namespace(), "default");
        assert!(a.ignore_unknown());
        assert_eq!(a.pod_uid(), "");
        let uid =
            CniArgs::parse("K8S_POD_UID=1234-abcd;K8S_POD_INFRA_CONTAINER_ID=c1").expect("parse");
        assert_eq!(uid.pod_uid(), "1234-abcd");
        assert_eq!(uid.infra_container_id(), "c1");
        assert!(!uid.ignore_unknown());
    }

    #[test]
    fn a_cni_args_segment_without_equals_is_code_4() {
        let e = CniArgs::parse("K8S_POD_NAME").expect_err("bad");
        assert_eq!(e.code(), 4);
        assert_eq!(CniArgs::parse("").expect("empty"), CniArgs::default());
        // Values may contain '='.
        let a = CniArgs::parse("X=a=b").expect("parse");
        assert_eq!(a.pairs["X"], "a=b");
    }

    #[test]
    fn add_needs_container_id_ifname_netns_and_path() {
        let inv = run(ADD).expect("valid");
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.netns, "/var/run/netns/p1");
        assert_eq!(inv.args.pod_name(), "web-0");
        for drop in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_PATH"] {
            let pairs: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != drop).collect();
            let e = run(&pairs).expect_err(drop);
            assert_eq!(e.code(), 4, "{drop}");
            assert!(e.to_string().contains(drop));
        }
    }

    #[test]
    fn del_accepts_an_empty_netns() {
        let mut pairs: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        pairs[0] = ("CNI_COMMAND", "DEL");
        pairs.push(("CNI_NETNS", ""));
        let inv = run(&pairs).expect("valid DEL");
        assert_eq!(inv.command, Command::Del);
        assert_eq!(inv.netns, "");
    }

    #[test]
    fn version_gc_status_need_nothing_else() {
        for c in ["VERSION", "GC", "STATUS"] {
            let inv = run(&[("CNI_COMMAND", c)]).expect(c);
            assert_eq!(inv.command.to_string(), c);
        }
    }

    #[test]
    fn unset_command_means_about_and_unknown_command_is_code_4() {
        assert_eq!(
            Invocation::from_env(&env(&[])).expect("about"),
            EnvOutcome::About
        );
        let e = run(&[("CNI_COMMAND", "FROB")]).expect_err("unknown");
        assert_eq!(e.code(), 4);
    }

    #[test]
    fn container_ids_and_ifnames_follow_libcni_rules() {
        assert!(valid_id("a1_b.c-d"));
        assert!(!valid_id("-abc"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(""));
        assert!(valid_ifname("eth0"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("0123456789abcdef"));
        assert!(!valid_ifname(".."));
        let mut pairs = ADD.to_vec();
        pairs[1] = ("CNI_CONTAINERID", "bad id");
        assert_eq!(run(&pairs).expect_err("bad id").code(), 4);
        let mut pairs = ADD.to_vec();
        pairs[3] = ("CNI_IFNAME", "eth:0");
        assert_eq!(run(&pairs).expect_err("bad ifname").code(), 4);
    }
}
