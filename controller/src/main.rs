//! The `vpc-resource-controller` binary: trunk ENIs for nodes that ask for one, a branch ENI
//! for every pod a SecurityGroupPolicy selects. One replica per cluster (the Deployment's
//! `Recreate` strategy keeps it so); it keeps no state, a restarted controller rebuilds
//! everything from EC2 tags and pod annotations.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use vpc_cni_controller::ec2::{default_pacing, SdkEc2, SdkSettings};
use vpc_cni_controller::k8s::Kube;
use vpc_cni_controller::reconcile::{Settings, DEFAULT_MAX_VLAN};
use vpc_cni_controller::run::{error_chain, Controller};

/// A duration: `500ms`, `30s`, `2m`, or plain seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m)")),
    };
    if d > Duration::from_secs(86_400) {
        return Err(format!("{s:?} is more than a day"));
    }
    Ok(d)
}

/// Environment variables standing in for flags not given on the command line.
const FLAG_ENV: &[(&str, &str)] = &[
    ("--cluster-name", "CLUSTER_NAME"),
    ("--region", "AWS_REGION"),
    ("--ec2-endpoint", "AWS_EC2_ENDPOINT"),
    ("--cluster-endpoint", "CLUSTER_ENDPOINT"),
    ("--interval", "RECONCILE_INTERVAL"),
    ("--branch-cooldown", "BRANCH_ENI_COOLDOWN"),
    ("--max-vlan", "MAX_VLAN_ID"),
    ("--http-timeout", "EC2_HTTP_TIMEOUT"),
    ("--log-level", "LOG_LEVEL"),
];

/// The command line with `--flag=value` appended for every [`FLAG_ENV`] variable that is set
/// (non-empty) and whose flag is not given.
fn args_with_env(
    args: Vec<std::ffi::OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Vec<std::ffi::OsString> {
    let mut out = args;
    for (flag, var) in FLAG_ENV {
        let given = out.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == *flag || a.starts_with(&format!("{flag}=")))
        });
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            if !given {
                out.push(format!("{flag}={v}").into());
            }
        }
    }
    out
}

/// Flags; each can also come from the environment variable [`FLAG_ENV`] names for it.
#[derive(Debug, Parser)]
#[command(name = "vpc-resource-controller", version, about)]
struct Flags {
    /// Cluster name: ENIs are tagged `kubernetes.io/cluster/<name>=owned` and only those are
    /// managed (and cleaned up).
    #[arg(long)]
    cluster_name: String,
    /// AWS region.
    #[arg(long)]
    region: String,
    /// EC2 endpoint override (e.g. the VPC simulator, `http://127.0.0.1:5010`).
    #[arg(long)]
    ec2_endpoint: Option<String>,
    /// Kubernetes API server URL (default: in-cluster service account, or the kubeconfig).
    #[arg(long)]
    cluster_endpoint: Option<String>,
    /// Time between passes.
    #[arg(long, default_value = "5s", value_parser = duration)]
    interval: Duration,
    /// How long the branch of a deleted pod is kept before it is deleted.
    #[arg(long, default_value = "30s", value_parser = duration)]
    branch_cooldown: Duration,
    /// Highest VLAN id handed out on a trunk.
    #[arg(long, default_value_t = DEFAULT_MAX_VLAN,
          value_parser = clap::value_parser!(u16).range(1..=4094))]
    max_vlan: u16,
    /// Per-attempt EC2 HTTP timeout.
    #[arg(long, default_value = "10s", value_parser = duration)]
    http_timeout: Duration,
    /// Run one pass and exit (non-zero if anything failed).
    #[arg(long)]
    once: bool,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn init_logging(level: &str) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let level = match level.to_ascii_lowercase().as_str() {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "warn" | "warning" => LevelFilter::WARN,
        "error" => LevelFilter::ERROR,
        _ => LevelFilter::INFO,
    };
    let targets = Targets::new()
        .with_default(level.min(LevelFilter::INFO))
        .with_target("vpc_cni_controller", level)
        .with_target("vpc_resource_controller", level);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .with_filter(targets),
        )
        .init();
}

async fn main_inner(flags: Flags) -> anyhow::Result<bool> {
    if flags.cluster_name.is_empty() {
        anyhow::bail!("CLUSTER_NAME: empty");
    }
    let client = ipamd::io::k8s::client_from_env(flags.cluster_endpoint.as_deref())
        .await
        .context("Kubernetes client")?;
    let kube = Kube::new(client, &flags.cluster_name);
    let ec2 = SdkEc2::new(
        &SdkSettings {
            region: flags.region.clone(),
            endpoint: flags.ec2_endpoint.clone(),
            static_credentials: None,
            http_timeout: flags.http_timeout,
            cluster: flags.cluster_name.clone(),
        },
        default_pacing(),
    )
    .await;
    let settings = Settings {
        max_vlan: flags.max_vlan,
        cooldown: flags.branch_cooldown,
    };
    let mut controller = Controller::new(kube, Arc::new(ec2), settings);
    if flags.once {
        let report = controller
            .pass()
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        return Ok(report.failed.is_empty());
    }
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tracing::info!(cluster = %flags.cluster_name, interval = ?flags.interval, "controller running");
    controller.run(flags.interval, stop).await;
    tracing::info!("stopped");
    Ok(true)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = args_with_env(std::env::args_os().collect(), |v| std::env::var(v).ok());
    let flags = Flags::parse_from(args);
    init_logging(&flags.log_level);
    match main_inner(flags).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vpc-resource-controller: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_name_the_problem() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("5h").expect_err("unit").contains("unknown unit"));
        assert!(duration("x").is_err());
        assert!(duration("99999999m").is_err());
    }

    #[test]
    fn environment_fills_flags_not_given() {
        let env = |v: &str| match v {
            "CLUSTER_NAME" => Some("c1".to_owned()),
            "AWS_REGION" => Some("us-west-2".to_owned()),
            "MAX_VLAN_ID" => Some(String::new()),
            _ => None,
        };
        let args = args_with_env(vec!["x".into(), "--region=eu-west-1".into()], env);
        let flags = Flags::parse_from(args);
        assert_eq!(flags.cluster_name, "c1");
        assert_eq!(flags.region, "eu-west-1");
        assert_eq!(flags.max_vlan, DEFAULT_MAX_VLAN);
        assert_eq!(flags.interval, Duration::from_secs(5));
    }
}
