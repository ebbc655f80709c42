//! The `ipamd` binary: parse configuration, build the real dependencies, run the daemon.

fn main() -> std::process::ExitCode {
    eprintln!("ipamd: not wired yet");
    std::process::ExitCode::FAILURE
}
