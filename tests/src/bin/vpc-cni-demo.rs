//! `vpc-cni-demo`: the quick start's node demo (see [`vpc_cni_e2e::demo`]).
//!
//! Boots a simulated node, lets the real `ipamd` fill its warm pool, creates pods (in network
//! namespaces through the real `aws-cni` plugin when run as root, as gRPC calls otherwise),
//! checks them, prints a short summary and cleans everything up, also on error or Ctrl-C.
//!
//! `--ipv6` (or `VPC_CNI_DEMO_IPV6=1` in the environment) runs it as an IPv6 cluster: ipamd
//! with `ENABLE_IPv6=true` and prefix delegation, pods in the /80 of the node's primary ENI,
//! IPv4 egress through the chained `egress-cni`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vpc_cni_e2e::demo::{self, Family, Mode, Options};

/// Runs ipamd on a simulated node, creates pods, checks them and prints a summary.
#[derive(Debug, Parser)]
#[command(name = "vpc-cni-demo", version)]
struct Args {
    /// Pods to create.
    #[arg(long, default_value_t = 5)]
    pods: usize,
    /// `auto` (namespaces as root, gRPC only otherwise), `netns` or `grpc`.
    #[arg(long, default_value = "auto")]
    mode: Mode,
    /// Directory of the `ipamd` and `aws-cni` binaries (default: this program's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Instance type of the node.
    #[arg(long, default_value = "m5.large")]
    instance_type: String,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run an IPv6 cluster (ipamd with ENABLE_IPv6=true and prefix delegation); also on with
    /// VPC_CNI_DEMO_IPV6=1 (or `true`) in the environment.
    #[arg(long)]
    ipv6: bool,
    /// Directory of the reference CNI plugins (`host-local`, for egress-cni's IPv4 egress in
    /// the IPv6 namespace demo).
    #[arg(long, default_value = demo::CNI_PLUGINS)]
    cni_plugins_dir: PathBuf,
}

/// `VPC_CNI_DEMO_IPV6`: unset, empty, `0` or `false` is off; `1` or `true` is on.
fn ipv6_from_env() -> anyhow::Result<bool> {
    match std::env::var("VPC_CNI_DEMO_IPV6") {
        Err(std::env::VarError::NotPresent) => Ok(false),
        Err(e) => anyhow::bail!("VPC_CNI_DEMO_IPV6: {e}"),
        Ok(v) => match v.to_ascii_lowercase().as_str() {
            "" | "0" | "false" => Ok(false),
            "1" | "true" => Ok(true),
            other => anyhow::bail!("VPC_CNI_DEMO_IPV6: {other:?}: expected 1, true, 0 or false"),
        },
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let family = if args.ipv6 || ipv6_from_env()? {
        Family::V6
    } else {
        Family::V4
    };
    demo::install_interrupt_handler()?;
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("this program has no directory")?
            .to_path_buf(),
    };
    let summary = demo::run(&Options {
        pods: args.pods,
        bin_dir,
        mode: args.mode,
        instance_type: args.instance_type,
        family,
        cni_plugins: args.cni_plugins_dir,
    })?;
    print!("{}", summary.render());
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&summary.to_json())?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpc-cni-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
