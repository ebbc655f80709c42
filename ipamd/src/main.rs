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
use ipamd::config::{Backend, Config, Flags};
use ipamd::daemon::{self, Deps};
use ipamd::io::ec2::aws::{AwsEc2, AwsSettings};
use ipamd::io::imds::{AwsImds, Imds, ImdsSettings};
use tokio::signal::unix::{signal, SignalKind};

/// How long the daemon keeps serving after the first SIGTERM: under the DaemonSet's
/// `terminationGracePeriodSeconds` (10, as the reference's), so the process ends itself,
/// cleanly, before the kubelet's SIGKILL.
const GRACE: Duration = Duration::from_secs(8);

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

/// The Kubernetes API, when an enabled feature needs it or the daemon runs in a cluster
/// (`KUBERNETES_SERVICE_HOST` or `CLUSTER_ENDPOINT` set). `None`: run without it.
async fn kubernetes(cfg: &Config) -> anyhow::Result<Option<ipamd::io::k8s::K8s>> {
    use ipamd::io::k8s::{self, ApiServerStatus, ConnectPolicy};
    let needed_by = k8s::api_server_needed_by(
        cfg.custom_networking,
        cfg.annotate_pod_ip,
        cfg.enable_pod_eni,
    );
    let in_cluster =
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() || cfg.cluster_endpoint.is_some();
    if needed_by.is_empty() && !in_cluster {
        return Ok(None);
    }
    let client = match k8s::client_from_env(cfg.cluster_endpoint.as_deref()).await {
        Ok(c) => c,
        Err(e) if needed_by.is_empty() => {
            tracing::warn!(error = %e, "no Kubernetes client configuration: running without the API server");
            return Ok(None);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("Kubernetes client needed by {}", needed_by.join(", ")))
        }
    };
    match k8s::connect_api_server(&client, &needed_by, &ConnectPolicy::default()).await? {
        ApiServerStatus::Connected { .. } => {}
        ApiServerStatus::Unavailable => return Ok(None),
    }
    if cfg.node_name.is_empty() {
        anyhow::bail!("MY_NODE_NAME is not set: the daemon cannot read its own Node");
    }
    let pod = if cfg.pod_name.is_empty() {
        "aws-node".to_owned()
    } else {
        cfg.pod_name.clone()
    };
    Ok(Some(
        k8s::K8s::new(client, &cfg.node_name, pod, "kube-system")
            .with_eni_config_keys(&cfg.eni_config_annotation, &cfg.eni_config_label),
    ))
}

async fn run(mut cfg: Config, process_start: std::time::Instant) -> anyhow::Result<()> {
    // The embedded simulator is kept alive for the whole run.
    let mut _sim = None;
    let mut static_credentials = None;
    if cfg.backend == Backend::Sim {
        let node = ipamd::io::sim_backend::start(&cfg.sim, vpc_sim::sim::SimConfig::default())
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
            ipamd::io::sim_backend::SIM_CREDENTIALS.0.to_owned(),
            ipamd::io::sim_backend::SIM_CREDENTIALS.1.to_owned(),
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
    let veths: Arc<dyn daemon::VethProbe> = Arc::new(
        daemon::HostVeths::current()
            .context("netlink in the host namespace (checkpoint normalisation, orphan sweep)")?,
    );
    let host: Option<Arc<dyn ipamd::io::host::NodeHost>> = if cfg.host_networking {
        let ns = vpc_cni_net::Netns::current().context("opening the host's network namespace")?;
        let h = vpc_cni_net::NetlinkHostNetwork::new(ns).context("host netlink")?;
        Some(Arc::new(ipamd::io::host::Host(Arc::new(h))))
    } else {
        tracing::info!("host networking off (VPC_CNI_HOST_NETWORKING=false or the sim backend): ENI routes, rules and SNAT are not touched");
        None
    };
    // Signal handlers before anything is served: a SIGTERM right after "ready" is honoured.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let k8s = kubernetes(&cfg).await?;
    let deps = Deps {
        ec2: Arc::new(ec2),
        imds,
        veths,
    };
    // Security groups for pods: the trunk ENI's link is looked up in this namespace.
    let pod_eni_host: Option<Arc<dyn ipamd::io::host::PodEniHost>> = if cfg.enable_pod_eni {
        let nl = vpc_cni_net::Netlink::current()
            .context("netlink in the host namespace (security groups for pods)")?;
        Some(Arc::new(ipamd::io::host::NetlinkPodEniHost(nl)))
    } else {
        None
    };
    let parts = daemon::NodeParts {
        host,
        k8s,
        pod_eni_host,
        process_start: Some(process_start),
    };
    let d = if cfg.enable_ipv6 {
        Running::V6(
            daemon::start_v6(&cfg, deps, parts)
                .await
                .context("start-up (IPv6 mode)")?,
        )
    } else {
        Running::V4(
            daemon::start_node(&cfg, deps, parts)
                .await
                .context("start-up")?,
        )
    };
    let (metrics_addr, introspection_addr) = match &d {
        Running::V4(d) => (d.metrics_addr(), d.introspection_addr()),
        Running::V6(d) => (d.metrics_addr(), d.introspection_addr()),
    };
    eprintln!(
        "ipamd: ready: gRPC {} metrics {:?} introspection {:?}",
        cfg.grpc_socket.display(),
        metrics_addr,
        introspection_addr
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    match &d {
        Running::V4(d) => d.terminate(),
        Running::V6(d) => d.terminate(),
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(GRACE) => {}
    }
    match d {
        Running::V4(d) => d.stop().await,
        Running::V6(d) => d.stop().await,
    }
    Ok(())
}

/// The daemon of the configured address family.
enum Running {
    V4(daemon::Daemon),
    V6(daemon::DaemonV6),
}

fn main() -> ExitCode {
    let process_start = std::time::Instant::now();
    let flags = Flags::parse();
    let cfg = match Config::from_env(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    if let Err(e) = ipamd::failpoint::init_from_env() {
        eprintln!("ipamd: configuration: {e}");
        return ExitCode::from(2);
    }
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
    match rt.block_on(run(cfg, process_start)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ipamd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
