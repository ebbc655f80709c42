//! The crate's error type.

use std::path::PathBuf;

/// A boxed error from a lower layer (netlink, nix), kept as a `#[source]` so that no netlink type
/// crosses this crate's API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in a network-namespace or netlink operation.
///
/// Variants carry the operation and its subject; the cause, when there is one, is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening, entering, creating or deleting a network namespace failed.
    #[error("netns {op} {path}")]
    Netns {
        /// What was being done (`open`, `enter`, `restore`, `create`, `delete`).
        op: &'static str,
        /// The namespace's path.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op}")]
    Netlink {
        /// The request, with its subject (for example `add rule 512 to 10.0.0.5/32`).
        op: String,
        /// The kernel's errno when the kernel answered with an error (positive, e.g. 17 for EEXIST).
        errno: Option<i32>,
        /// The netlink library's error.
        #[source]
        source: BoxError,
    },
    /// A link that an operation needs does not exist.
    #[error("link {what} not found")]
    LinkNotFound {
        /// How the link was looked up (`name eni1234`, `mac 02:..`, `index 7`).
        what: String,
    },
    /// Reading or writing a sysctl under /proc/sys failed.
    #[error("sysctl {op} {key}")]
    Sysctl {
        /// `read` or `write`.
        op: &'static str,
        /// The key, relative to /proc/sys (for example `net/ipv4/conf/eth0/rp_filter`).
        key: String,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external command (iptables, nft) could not be run or exited non-zero.
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the log.
        command: String,
        /// Exit status, or the spawn failure.
        status: String,
        /// What the command printed on stderr (trimmed).
        stderr: String,
    },
    /// An input was rejected before anything was touched.
    #[error("invalid {what}")]
    Invalid {
        /// What was wrong.
        what: String,
    },
    /// A dedicated namespace thread panicked or could not be spawned.
    #[error("namespace worker thread: {what}")]
    Thread {
        /// What happened.
        what: String,
    },
    /// An IPv6 address did not pass duplicate address detection (DADFAILED), or was still
    /// tentative when the wait ended.
    #[error("IPv6 duplicate address detection on link {index}: {what}")]
    Dad {
        /// The interface index.
        index: u32,
        /// Which addresses, and what state they are in.
        what: String,
    },
    /// The kernel refused to create an 802.1Q VLAN link: it has no VLAN support (the
    /// `8021q` module is neither built in nor loadable).
    #[error("creating VLAN link {name}: the kernel has no 802.1Q VLAN support (module 8021q missing); branch-ENI pods need it, or branchLink \"hotplug\" on a simulated fabric")]
    NoVlanSupport {
        /// The VLAN link's name.
        name: String,
        /// The kernel's answer (EOPNOTSUPP).
        #[source]
        source: Box<NetError>,
    },
    /// A failure injected by the in-memory implementation at a chosen step (tests only).
    #[error("injected failure at step {step}")]
    Injected {
        /// The step's name.
        step: String,
    },
}

impl NetError {
    /// The kernel errno carried by this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Netlink { errno, .. } => *errno,
            NetError::Netns { source, .. } | NetError::Sysctl { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    /// True when the error means "it already exists" (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(nix::libc::EEXIST)
    }

    /// True when the error means "it is not there" (ENOENT, ESRCH, ENODEV, EADDRNOTAVAIL or a
    /// missing link).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetError::LinkNotFound { .. })
            || matches!(
                self.errno(),
                Some(nix::libc::ENOENT)
                    | Some(nix::libc::ESRCH)
                    | Some(nix::libc::ENODEV)
                    | Some(nix::libc::EADDRNOTAVAIL)
            )
    }

    pub(crate) fn netlink(op: impl Into<String>, err: rtnetlink::Error) -> NetError {
        let errno = match &err {
            rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
            _ => None,
        };
        NetError::Netlink {
            op: op.into(),
            errno,
            source: Box::new(err),
        }
    }

    /// An [`NetError::Invalid`] naming what was wrong.
    pub fn invalid(what: impl Into<String>) -> NetError {
        NetError::Invalid { what: what.into() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = NetError> = std::result::Result<T, E>;
