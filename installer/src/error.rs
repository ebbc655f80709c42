//! The installer's error type.

use std::path::PathBuf;

/// Everything that can stop the installer; each variant names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// A filesystem operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done (`create`, `write`, `rename into place`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file name that is not a plain name inside the target directory.
    #[error("not a plain file name: {0:?}")]
    BadName(String),
    /// A source that is not a regular file.
    #[error("not a regular file: {}", .0.display())]
    NotAFile(PathBuf),
    /// An environment variable with a value the entrypoint refuses.
    #[error("{var}={value:?}: {why}")]
    Setting {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A combination of settings the entrypoint refuses.
    #[error("{0}")]
    Combination(String),
    /// The conflist template, once rendered, is not a valid conflist.
    #[error("the rendered conflist is invalid: {0}")]
    Conflist(String),
    /// A netlink or namespace operation failed.
    #[error("cannot {what}")]
    Net {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: vpc_cni_net::NetError,
    },
    /// No link has the primary ENI's MAC address.
    #[error("no network interface has the primary ENI's MAC address {0}")]
    NoPrimaryInterface(String),
    /// The instance metadata service did not answer the MAC address.
    #[error("instance metadata: {0}")]
    Imds(String),
    /// The daemon could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
