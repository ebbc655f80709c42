//! Running `ip` and `nft` inside a namespace: the command is spawned from a thread that has
//! entered the namespace, so the child process inherits it (no `ip netns exec`, no mount
//! namespace games). Used by the hooks, which run synchronously with the simulator locked and
//! possibly on an async runtime's worker thread, where a nested runtime cannot be started.

use std::io::Write;
use std::process::{Command, Stdio};

use vpc_cni_net::Netns;

use crate::error::{FabricError, Result};

/// Runs `program args...` inside `ns` (named `ns_name` for messages), feeding `stdin`; returns
/// stdout.
pub fn run_in(
    ns: &Netns,
    ns_name: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let summary = match stdin.and_then(|s| s.lines().next()) {
        Some(first) => format!("{program} {} <<< {first} ...", args.join(" ")),
        None => format!("{program} {}", args.join(" ")),
    };
    let fail = |status: String, stderr: String| FabricError::Command {
        command: summary.clone(),
        ns: ns_name.to_owned(),
        status,
        stderr,
    };
    let out = ns
        .run(|| -> std::io::Result<std::process::Output> {
            let mut child = Command::new(program)
                .args(args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                // A program that exits before reading stdin closes the pipe; its status
                // and output are the answer.
                match pipe.write_all(text.as_bytes()) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    r => r?,
                }
            }
            child.wait_with_output()
        })
        .map_err(FabricError::net(format!(
            "enter {ns_name} to run {program}"
        )))?
        .map_err(|e| fail(format!("spawn: {e}"), String::new()))?;
    if !out.status.success() {
        return Err(fail(
            out.status.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs an `ip -batch` script inside `ns`; does nothing for an empty script.
pub fn ip_batch(ns: &Netns, ns_name: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut script = lines.join("\n");
    script.push('\n');
    run_in(ns, ns_name, "ip", &["-batch", "-"], Some(&script)).map(|_| ())
}

/// Applies an nft script (one transaction) inside `ns`; does nothing for an empty script.
pub fn nft(ns: &Netns, ns_name: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut script = lines.join("\n");
    script.push('\n');
    run_in(ns, ns_name, "nft", &["-f", "-"], Some(&script)).map(|_| ())
}
