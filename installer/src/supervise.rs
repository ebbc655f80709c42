//! The daemon container's entrypoint (spec/cni.md 4.4): install the plugin, start ipamd, wait
//! until its gRPC health reports SERVING, only then install the conflist, then wait for ipamd,
//! forwarding termination signals to it, and exit with its status.
//!
//! Kubelet reports the node's network ready as soon as a conflist exists in its CNI conf dir,
//! so writing it only once ipamd serves keeps pods off a node whose pool is still empty. If
//! ipamd exits before it ever serves, the conflist is not written at all.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use vpc_cni_rpc::{check_health, ServingStatus};

use crate::conflist::{self, CONFLIST_NAME};
use crate::error::InstallerError;
use crate::install;
use crate::settings::Settings;

/// Delays between health probes: `initial`, doubled after each failed probe up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first probe.
    pub initial: Duration,
    /// Largest delay between probes.
    pub max: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 2 s.
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}

/// Everything the entrypoint needs, validated.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The validated environment (host directories, conflist values).
    pub settings: Settings,
    /// Plugin binaries to install into the host CNI bin dir (`/app/aws-cni`).
    pub plugins: Vec<PathBuf>,
    /// The daemon's command line (program first).
    pub command: Vec<OsString>,
    /// ipamd's gRPC socket.
    pub socket: PathBuf,
    /// The conflist template.
    pub template: String,
    /// Bound on connecting and on each health call (the reference probe's 5 s).
    pub probe_timeout: Duration,
    /// Delays between health probes.
    pub backoff: Backoff,
}

/// What the entrypoint did, in order, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Plugins installed into the host bin dir.
    Installed(Vec<PathBuf>),
    /// The daemon was started with this process id.
    Started(u32),
    /// One health probe and its outcome (the status, or the error text).
    Probe(Result<ServingStatus, String>),
    /// The conflist was written.
    ConflistWritten(PathBuf),
    /// A signal was forwarded to the daemon.
    Forwarded(Signal),
    /// The daemon exited; the entrypoint exits with this code.
    Exited(i32),
}

/// The exit code a shell would report: the code, or 128 + the signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn emit(events: Option<&mpsc::UnboundedSender<Event>>, event: Event) {
    if let Some(tx) = events {
        // A test that stopped listening is not an error of the entrypoint.
        let _ = tx.send(event);
    }
}

fn forward(child: &tokio::process::Child, sig: Signal) -> bool {
    match child.id() {
        Some(pid) => i32::try_from(pid)
            .ok()
            .is_some_and(|pid| kill(Pid::from_raw(pid), sig).is_ok()),
        None => false,
    }
}

/// The daemon exited: reports it and returns the code to exit with.
fn exited(
    status: std::io::Result<ExitStatus>,
    program: &std::ffi::OsStr,
    events: Option<&mpsc::UnboundedSender<Event>>,
) -> Result<i32, InstallerError> {
    let code = exit_code(status.map_err(|source| InstallerError::Spawn {
        program: program.to_string_lossy().into_owned(),
        source,
    })?);
    emit(events, Event::Exited(code));
    Ok(code)
}

/// A termination signal for the daemon: forwarded (and reported). Returns whether the signal
/// channel is still open.
fn relay(
    child: &tokio::process::Child,
    sig: Option<Signal>,
    events: Option<&mpsc::UnboundedSender<Event>>,
) -> bool {
    match sig {
        Some(sig) => {
            if forward(child, sig) {
                emit(events, Event::Forwarded(sig));
            }
            true
        }
        None => false,
    }
}

/// Runs the entrypoint until the daemon exits; returns the exit code to exit with.
///
/// `signals` delivers the termination signals the entrypoint receives (the binary feeds it
/// SIGTERM and SIGINT); each is forwarded to the daemon. `events` (optional) reports progress.
pub async fn run(
    opts: RunOptions,
    mut signals: mpsc::Receiver<Signal>,
    events: Option<mpsc::UnboundedSender<Event>>,
) -> Result<i32, InstallerError> {
    let events = events.as_ref();
    // Parse and validate everything before acting.
    let conflist = conflist::render(&opts.template, &opts.settings)?;
    let Some((program, args)) = opts.command.split_first() else {
        return Err(InstallerError::Combination(
            "no daemon command given after `--`".into(),
        ));
    };

    let bin_dir = &opts.settings.host_cni_bin_path;
    let installed = opts
        .plugins
        .iter()
        .map(|p| install::copy_atomic(p, bin_dir))
        .collect::<Result<Vec<_>, _>>()?;
    emit(events, Event::Installed(installed));

    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| InstallerError::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })?;
    emit(events, Event::Started(child.id().unwrap_or(0)));

    let mut delay = opts.backoff.initial;
    let mut signals_open = true;
    loop {
        tokio::select! {
            status = child.wait() => return exited(status, program, events),
            sig = signals.recv(), if signals_open => {
                signals_open = relay(&child, sig, events);
            }
            () = tokio::time::sleep(delay) => {
                let status = check_health(&opts.socket, "", opts.probe_timeout).await;
                let serving = matches!(status, Ok(ServingStatus::Serving));
                emit(events, Event::Probe(status.map_err(|e| e.to_string())));
                if serving {
                    break;
                }
                delay = (delay * 2).min(opts.backoff.max);
            }
        }
    }

    let path = install::write_atomic(
        &opts.settings.host_cni_confdir_path,
        CONFLIST_NAME,
        &mut conflist.as_bytes(),
        0o644,
    )?;
    emit(events, Event::ConflistWritten(path));

    loop {
        tokio::select! {
            status = child.wait() => return exited(status, program, events),
            sig = signals.recv(), if signals_open => {
                signals_open = relay(&child, sig, events);
            }
        }
    }
}
