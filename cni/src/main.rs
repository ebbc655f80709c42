//! `aws-cni`: the CNI plugin binary. All logic is in the `vpc_cni_plugin` library.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let get_env = |k: &str| std::env::var(k).ok();
    vpc_cni_plugin::timing::init(&get_env);
    let get_os = |k: &str| std::env::var_os(k);
    let out = vpc_cni_plugin::run_os(&get_os, &mut std::io::stdin().lock());
    vpc_cni_plugin::timing::mark("output");
    if let Some(s) = out.stderr {
        let _ = std::io::stderr().write_all(s.as_bytes());
    }
    if let Some(s) = out.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(s.as_bytes());
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    vpc_cni_plugin::timing::mark("end");
    if let Some(line) = vpc_cni_plugin::timing::report() {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    ExitCode::from(out.exit_code)
}
