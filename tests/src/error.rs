//! The harness's error type.

/// What can go wrong while building or driving the fabric.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A namespace, sysctl or netlink operation of `vpc-cni-net` failed.
    #[error("{op}")]
    Net {
        /// What the fabric was doing.
        op: String,
        /// Cause.
        #[source]
        source: vpc_cni_net::NetError,
    },
    /// An external command (`ip`, `nft`) failed inside a namespace.
    #[error("`{command}` in namespace {ns} failed ({status}): {stderr}")]
    Command {
        /// Command line (stdin batches are summarised by their first line).
        command: String,
        /// Namespace name.
        ns: String,
        /// Exit status or spawn error.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A hook event named something the fabric was never told about.
    #[error("unknown {what} {id}")]
    Unknown {
        /// `subnet`, `instance`, `ENI`.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The simulator refused a call made through the harness helpers.
    #[error("simulator {action}: {message}")]
    Sim {
        /// EC2 action.
        action: &'static str,
        /// Its error code and message.
        message: String,
    },
    /// A process could not be started, signalled or waited for.
    #[error("process {what}")]
    Process {
        /// What was being done, with the program name.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A bounded wait ran out.
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited_ms: u128,
    },
    /// The fabric was already shut down when a hook arrived.
    #[error("the fabric is shut down")]
    Closed,
}

impl FabricError {
    pub(crate) fn net(op: impl Into<String>) -> impl FnOnce(vpc_cni_net::NetError) -> FabricError {
        let op = op.into();
        move |source| FabricError::Net { op, source }
    }
}

/// The harness's result type.
pub type Result<T, E = FabricError> = std::result::Result<T, E>;
