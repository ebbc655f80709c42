//! `egress-cni`: the chained egress plugin binary. All logic is in the `vpc_cni_egress`
//! library.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let get_os = |k: &str| std::env::var_os(k);
    let out = vpc_cni_egress::run_os(&get_os, &mut std::io::stdin().lock());
    if let Some(s) = out.stderr {
        let _ = std::io::stderr().write_all(s.as_bytes());
    }
    if let Some(s) = out.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(s.as_bytes());
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    ExitCode::from(out.exit_code)
}
