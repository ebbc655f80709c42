//! Processes inside a node namespace (ipamd, the plugin binary): the command is spawned from a
//! thread that has entered the namespace, so the child lives there (`ip netns exec` without the
//! mount-namespace side effects). Long-running processes are killed when their handle drops.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use vpc_cni_net::Netns;

use crate::error::{FabricError, Result};

fn perr(what: String) -> impl FnOnce(std::io::Error) -> FabricError {
    move |source| FabricError::Process { what, source }
}

fn program_of(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// A long-running process in a namespace, in its own process group. Dropping the handle kills
/// the group (SIGKILL) and reaps the process.
#[derive(Debug)]
pub struct NsProcess {
    child: Child,
    program: String,
    exited: Option<ExitStatus>,
}

impl NsProcess {
    /// Spawns `cmd` (program, args, env, stdio as configured by the caller) inside `ns`.
    pub fn spawn(ns: &Netns, mut cmd: Command) -> Result<NsProcess> {
        let program = program_of(&cmd);
        cmd.process_group(0);
        let child = ns
            .run(|| cmd.spawn())
            .map_err(FabricError::net(format!(
                "enter {} to start {program}",
                ns.path().display()
            )))?
            .map_err(perr(format!("spawn {program}")))?;
        Ok(NsProcess {
            child,
            program,
            exited: None,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited (does not block).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .map_err(perr(format!("wait for {}", self.program)))?;
        }
        Ok(self.exited)
    }

    /// Waits (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(FabricError::Timeout {
                    what: format!("{} (pid {}) to exit", self.program, self.pid()),
                    waited_ms: timeout.as_millis(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        match killpg(Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(FabricError::Process {
                what: format!("signal {sig} to {}", self.program),
                source: std::io::Error::from_raw_os_error(e as i32),
            }),
        }
    }

    /// SIGKILL to the process group (a crash), then reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(Signal::SIGKILL)?;
        let s = self
            .child
            .wait()
            .map_err(perr(format!("reap {}", self.program)))?;
        self.exited = Some(s);
        Ok(s)
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(grace) {
            Ok(s) => Ok(s),
            Err(FabricError::Timeout { .. }) => self.kill(),
            Err(e) => Err(e),
        }
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("NsProcess {}: {e}", self.program);
        }
    }
}

/// Runs `cmd` to completion inside `ns`, feeding `stdin` (the plugin binary: `CNI_*` env vars,
/// the network config on stdin, the result on stdout). Output is captured.
pub fn output_in(ns: &Netns, mut cmd: Command, stdin: Option<&[u8]>) -> Result<Output> {
    let program = program_of(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = ns
        .run(|| cmd.spawn())
        .map_err(FabricError::net(format!(
            "enter {} to run {program}",
            ns.path().display()
        )))?
        .map_err(perr(format!("spawn {program}")))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that refuses its input before reading stdin exits and closes the pipe:
        // its exit status and output are the answer, not the broken pipe.
        match pipe.write_all(data) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.map_err(perr(format!("write stdin of {program}")))?,
        }
    }
    child
        .wait_with_output()
        .map_err(perr(format!("wait for {program}")))
}
