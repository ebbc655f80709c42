//! The `ipamd` binary: parse configuration, build the real dependencies (AWS or the embedded
//! simulator), run the daemon until signalled.
//!
//! Signals: the first SIGTERM/SIGINT stops allocation and freeing and keeps serving (as the
//! reference); a second signal, or [`GRACE`] after the first, stops the process cleanly.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ipamd::aws::{AwsEc2, AwsSettings};
use ipamd::config::{Backend, Config, Flags};
use ipamd::daemon::{self, Deps};
use ipamd::imds::{AwsImds, Imds, ImdsSettings};
use tokio::signal::unix::{signal, SignalKind};

/// How long the daemon keeps serving after the first SIGTERM.
const GRACE: Duration = Duration::from_secs(30);

fn init_logging(cfg: &Config) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::prelude::*;
    let level = match cfg.log_level.to_ascii_lowercase().as_str() {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "warn" | "warning" => LevelFilter::WARN,
        "error" => LevelFilter::ERROR,
        _ => LevelFilter::INFO,
    };
    // Our crates at the configured level; the SDK, hyper and friends at most at info.
    let targets = Targets::new()
        .with_default(level.min(LevelFilter::INFO))
        .with_target("ipamd", level)
        .with_target("vpc_sim", level)
        .with_target("vpc_cni_rpc", level)
        .with_target("vpc_cni_net", level);
    let writer = if cfg.log_file.is_empty() || cfg.log_file == "stderr" || cfg.log_file == "stdout"
    {
        BoxMakeWriter::new(std::io::stderr)
    } else {
        let path = std::path::Path::new(&cfg.log_file);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => BoxMakeWriter::new(Arc::new(file)),
            Err(e) => {
                eprintln!(
                    "ipamd: AWS_VPC_K8S_CNI_LOG_FILE={}: {e}; logging to stderr",
                    cfg.log_file
                );
                BoxMakeWriter::new(std::io::stderr)
            }
        }
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                .with_filter(targets),
        )
        .init();
}

async fn run(mut cfg: Config) -> anyhow::Result<()> {
    // The embedded simulator is kept alive for the whole run.
    let mut _sim = None;
    let mut static_credentials = None;
    if cfg.backend == Backend::Sim {
        let node = ipamd::sim_backend::start(&cfg.sim, vpc_sim::sim::SimConfig::default())
            .await
            .context("starting the embedded VPC simulator")?;
        eprintln!(
            "ipamd: embedded VPC simulator: EC2 {} IMDS {} admin {} (instance {} {})",
            node.ec2_url(),
            node.imds_url(),
            node.admin_url(),
            node.instance_id,
            cfg.sim.instance_type
        );
        cfg.ec2_endpoint = Some(node.ec2_url());
        cfg.imds_endpoint = Some(node.imds_url());
        static_credentials = Some((
            ipamd::sim_backend::SIM_CREDENTIALS.0.to_owned(),
            ipamd::sim_backend::SIM_CREDENTIALS.1.to_owned(),
        ));
        _sim = Some(node);
    }
    let imds = Arc::new(
        AwsImds::new(&ImdsSettings {
            endpoint: cfg.imds_endpoint.clone(),
            http_timeout: cfg.http_timeout,
        })
        .context("instance metadata client")?,
    );
    let region = match std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()) {
        Some(r) if cfg.backend == Backend::Aws => r,
        _ => {
            imds.identity()
                .await
                .context("region from instance metadata")?
                .region
        }
    };
    let ec2 = AwsEc2::new(&AwsSettings {
        region,
        endpoint: cfg.ec2_endpoint.clone(),
        http_timeout: cfg.http_timeout,
        version: cfg.vpc_cni_version.clone(),
        static_credentials,
    })
    .await;
    let veth_exists = daemon::host_veth_check()
        .await
        .context("listing host links for checkpoint normalisation")?;
    let d = daemon::start(
        &cfg,
        Deps {
            ec2: Arc::new(ec2),
            imds,
            veth_exists,
        },
    )
    .await
    .context("start-up")?;
    eprintln!(
        "ipamd: ready: gRPC {} metrics {:?} introspection {:?}",
        cfg.grpc_socket.display(),
        d.metrics_addr(),
        d.introspection_addr()
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    d.terminate();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(GRACE) => {}
    }
    d.stop().await;
    Ok(())
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let cfg = match Config::from_env(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipamd: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ipamd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
