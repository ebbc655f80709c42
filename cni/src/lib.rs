//! The VPC CNI plugin (`aws-cni`): a drop-in replacement for the reference AWS VPC CNI
//! plugin binary.
//!
//! The runtime executes the binary once per pod and command. It reads the CNI environment
//! ([`env`]) and the network configuration on stdin ([`config`]), asks ipamd for the pod's
//! address over gRPC ([`backend`]), wires the pod with netlink through `vpc-cni-net`
//! ([`driver`]), and prints exactly one JSON document, a result or an error, in the JSON of
//! the configuration's `cniVersion` ([`result`]). Logs go to `pluginLogFile` or stderr.
//!
//! Everything but [`run`] is IO-free or behind a trait with an in-memory implementation
//! ([`memory`], `vpc_cni_net::MemoryPodNetwork`).

pub mod backend;
pub mod config;
pub mod driver;
pub mod env;
pub mod error;
pub mod failpoint;
pub mod gc;
pub mod logging;
pub mod memory;
pub mod result;
pub mod timing;
pub mod version;

use std::ffi::OsString;
use std::io::Read;

use serde_json::Value;
use vpc_cni_net::{Netlink, NetlinkPodNetwork, Netns};

use crate::backend::{GrpcIpam, GrpcPolicyAgent};
use crate::config::NetConf;
use crate::driver::Driver;
use crate::env::{Command, EnvOutcome, Invocation};
use crate::error::CniError;
use crate::result::error_json;
use crate::version::CniVersion;

/// The `ClientVersion` this build sends to ipamd (the workspace version; ipamd compares it
/// with its own).
pub const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the process should print and return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The one JSON document for stdout, if any.
    pub stdout: Option<String>,
    /// Text for stderr, if any (only the about text; logs go through `tracing`).
    pub stderr: Option<String>,
    /// Process exit code: 0 on success, 1 on error.
    pub exit_code: u8,
}

fn about() -> String {
    format!(
        "AWS VPC CNI plugin (vpc-cni-rs) {CLIENT_VERSION}\nCNI protocol versions supported: {}\n",
        CniVersion::ALL.map(CniVersion::as_str).join(", ")
    )
}

fn version_hint(stdin: &[u8]) -> CniVersion {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str()?.parse().ok())
        .unwrap_or(CniVersion::CURRENT)
}

fn fail(version: CniVersion, err: &CniError) -> Output {
    tracing::error!(code = err.code(), error = %err, details = %err.details(), "command failed");
    Output {
        stdout: Some(error_json(version, err).to_string()),
        stderr: None,
        exit_code: 1,
    }
}

/// The most stdin the plugin reads as its network config (16 MiB): a config with a GC list
/// of 100,000 attachments is under 10 MiB; past the bound the input is refused unread.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads the network config from `stdin`, at most [`MAX_CONFIG_BYTES`] (more is refused with
/// code 7, naming stdin, without reading the rest).
pub fn read_config(stdin: &mut dyn Read) -> Result<Vec<u8>, CniError> {
    let mut bytes = Vec::new();
    stdin
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| CniError::Io {
            what: "reading the network config from stdin",
            source,
        })?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(CniError::InvalidConfig {
            reason: format!("the network config on stdin is larger than {MAX_CONFIG_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// The whole invocation from the process environment as `get_os` reads it (`std::env::var_os`):
/// a CNI variable that is set but not UTF-8 is refused, naming it; then [`run`].
pub fn run_os(get_os: &dyn Fn(&str) -> Option<OsString>, stdin: &mut dyn Read) -> Output {
    let mut names = env::CNI_VARS.to_vec();
    names.push(failpoint::ENV);
    match env::utf8_vars(get_os, &names) {
        Ok(vars) => run(&|k| vars.get(k).cloned(), stdin),
        Err(e) => fail(CniVersion::CURRENT, &e),
    }
}

/// The whole invocation: environment from `get_env`, configuration from `stdin`.
pub fn run(get_env: &dyn Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Output {
    let inv = match Invocation::from_env(get_env) {
        Ok(EnvOutcome::About) => {
            return Output {
                stdout: None,
                stderr: Some(about()),
                exit_code: 0,
            }
        }
        Ok(EnvOutcome::Run(inv)) => inv,
        Err(e) => return fail(CniVersion::CURRENT, &e),
    };
    if let Err(e) = failpoint::init(&get_env(failpoint::ENV).unwrap_or_default()) {
        return fail(CniVersion::CURRENT, &e);
    }
    if inv.command == Command::Version {
        return Output {
            stdout: Some(version::version_info().to_string()),
            stderr: None,
            exit_code: 0,
        };
    }
    timing::mark("stdin");
    let bytes = match read_config(stdin) {
        Ok(b) => b,
        Err(e) => return fail(CniVersion::CURRENT, &e),
    };
    timing::mark("parse");
    let conf = match NetConf::parse(&bytes) {
        Ok(c) => c,
        Err(e) => return fail(version_hint(&bytes), &e),
    };
    timing::mark("log_init");
    logging::init(&conf.log_target, conf.log_level);
    timing::mark("log_invoked");
    tracing::info!(
        command = %inv.command,
        container_id = %inv.container_id,
        netns = %inv.netns,
        ifname = %inv.ifname,
        args = ?inv.args.pairs,
        cni_path = %inv.path,
        config = %String::from_utf8_lossy(&bytes),
        "invoked"
    );
    let version = conf.cni_version;
    timing::mark("execute");
    match execute(&inv, &conf) {
        Ok(Some(v)) => {
            let stdout = v.to_string();
            if inv.command == Command::Add {
                failpoint::hit(failpoint::BEFORE_RESULT);
            }
            Output {
                stdout: Some(stdout),
                stderr: None,
                exit_code: 0,
            }
        }
        Ok(None) => Output {
            stdout: None,
            stderr: None,
            exit_code: 0,
        },
        Err(e) => fail(version, &e),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CniError::Io {
            what: "starting the async runtime",
            source,
        })
}

fn net_error(what: &str, source: vpc_cni_net::NetError) -> CniError {
    CniError::Net {
        what: what.to_string(),
        source,
    }
}

/// Refuses a `CNI_NETNS` that does not exist or is the plugin's own namespace (skel's rule),
/// before ipamd is asked for anything.
fn validate_netns(inv: &Invocation) -> Result<(), CniError> {
    let pod = Netns::open(&inv.netns).map_err(|e| CniError::UnknownContainer {
        what: format!("network namespace {}", inv.netns),
        source: Some(e),
    })?;
    let own = Netns::current().map_err(|e| net_error("opening the plugin's own netns", e))?;
    let same = pod
        .id()
        .map_err(|e| net_error("reading the pod netns", e))?
        == own
            .id()
            .map_err(|e| net_error("reading the plugin's netns", e))?;
    if same {
        return Err(CniError::InvalidEnvironment {
            var: "CNI_NETNS",
            reason: format!("{} is the plugin's own network namespace", inv.netns),
        });
    }
    Ok(())
}

fn execute(inv: &Invocation, conf: &NetConf) -> Result<Option<Value>, CniError> {
    match inv.command {
        Command::Gc | Command::Status if !conf.cni_version.has_gc_and_status() => {
            return Err(CniError::IncompatibleVersion {
                version: conf.cni_version.to_string(),
                reason: format!("config version does not allow {}", inv.command),
            })
        }
        Command::Add | Command::Check => validate_netns(inv)?,
        _ => {}
    }
    timing::mark("runtime");
    let rt = runtime()?;
    timing::mark("driver");
    let out = rt.block_on(async {
        let ipam = GrpcIpam::new(&conf.ipamd_socket, conf.connect_timeout);
        let policy = GrpcPolicyAgent::new(&conf.np_agent_socket);
        if inv.command == Command::Status {
            let d = Driver::new(
                ipam,
                vpc_cni_net::MemoryPodNetwork::new(),
                policy,
                CLIENT_VERSION,
            );
            return d.status().await.map(|()| None);
        }
        let host = Netns::current().map_err(|e| net_error("opening the host netns", e))?;
        if inv.command == Command::Gc {
            let nl = Netlink::open(&host).map_err(|e| net_error("opening netlink", e))?;
            let n = gc::sweep_stale_rules(&nl)
                .await
                .map_err(|e| net_error("GC of stale pod rules", e))?;
            tracing::info!(
                removed = n,
                valid = conf.valid_attachments.as_ref().map_or(0, Vec::len),
                "GC done"
            );
            return Ok(None);
        }
        timing::mark("host_netlink");
        let net = NetlinkPodNetwork::new(host).map_err(|e| net_error("opening netlink", e))?;
        timing::mark("command");
        let d = Driver::new(ipam, net, policy, CLIENT_VERSION);
        match inv.command {
            Command::Add => {
                let r = d.add(inv, conf).await?;
                Ok(Some(r.render(conf.cni_version)))
            }
            Command::Del => d.del(inv, conf).await.map(|()| None),
            Command::Check => d.check(inv, conf).await.map(|()| None),
            Command::Version | Command::Gc | Command::Status => Ok(None),
        }
    });
    timing::mark("runtime_drop");
    drop(rt);
    timing::mark("render");
    out
}
