//! `vpc-cni-install`: the VPC CNI's init step, daemon entrypoint and health probe.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use vpc_cni_installer::node::{self, SysctlOptions};
use vpc_cni_installer::settings::{self, parse_bool, Settings};
use vpc_cni_installer::supervise::{self, Backoff, RunOptions};
use vpc_cni_installer::{conflist, install, InstallerError};
use vpc_cni_net::netns::Netns;
use vpc_cni_net::MacAddr;
use vpc_cni_rpc::{check_health, ServingStatus};

/// Default ipamd socket (the reference's fixed path).
const DEFAULT_SOCKET: &str = "/var/run/aws-node/ipamd.sock";

#[derive(Parser, Debug)]
#[command(name = "vpc-cni-install", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Init container: copy the plugin binaries into the host and set the node sysctls.
    Init {
        /// Directory whose regular files are installed (the installer itself is skipped).
        #[arg(long, default_value = "/init")]
        src_dir: PathBuf,
        /// Host CNI bin dir [default: $HOST_CNI_BIN_PATH or /host/opt/cni/bin].
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The primary ENI's MAC address [default: read from the instance metadata `mac`].
        #[arg(long)]
        primary_mac: Option<MacAddr>,
        /// Instance metadata endpoint [default: $AWS_EC2_METADATA_SERVICE_ENDPOINT or
        /// http://169.254.169.254].
        #[arg(long)]
        imds_endpoint: Option<String>,
        /// Root of the sysctl tree.
        #[arg(long, default_value = "/proc/sys")]
        proc_sys: PathBuf,
        /// Network namespace whose interfaces and sysctls are set.
        #[arg(long, default_value = "/proc/self/ns/net")]
        netns: PathBuf,
        /// Only copy the binaries.
        #[arg(long)]
        skip_sysctls: bool,
    },
    /// Daemon container entrypoint: install aws-cni and egress-cni, start ipamd, install the
    /// conflist once ipamd serves, forward SIGTERM, exit with ipamd's status.
    Run {
        /// Plugin binaries to install into the host CNI bin dir.
        #[arg(long = "plugin", default_values = ["/app/aws-cni", "/app/egress-cni"])]
        plugins: Vec<PathBuf>,
        /// ipamd's gRPC socket [default: $IPAMD_GRPC_SOCKET or /var/run/aws-node/ipamd.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Conflist template replacing the built-in one.
        #[arg(long)]
        conflist_template: Option<PathBuf>,
        /// Largest delay between health probes, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        max_probe_interval_ms: u64,
        /// The daemon's command line.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Probe: exit 0 only when ipamd's gRPC health reports SERVING.
    Health {
        /// ipamd's gRPC socket [default: $IPAMD_GRPC_SOCKET or /var/run/aws-node/ipamd.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Bound on connecting and on the call, in seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("IPAMD_GRPC_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

fn env_bool(var: &'static str) -> Result<bool, InstallerError> {
    match std::env::var(var).ok().filter(|v| !v.is_empty()) {
        None => Ok(false),
        Some(v) => parse_bool(&v).ok_or(InstallerError::Setting {
            var,
            value: v,
            why: "expected a boolean".into(),
        }),
    }
}

fn report(err: &dyn std::error::Error) {
    let mut msg = format!("vpc-cni-install: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
}

fn runtime() -> Result<tokio::runtime::Runtime, InstallerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| InstallerError::Spawn {
            program: "the async runtime".into(),
            source,
        })
}

#[allow(clippy::too_many_arguments)]
fn init(
    src_dir: PathBuf,
    bin_dir: Option<PathBuf>,
    primary_mac: Option<MacAddr>,
    imds_endpoint: Option<String>,
    proc_sys: PathBuf,
    netns: PathBuf,
    skip_sysctls: bool,
) -> Result<(), InstallerError> {
    let opts = SysctlOptions {
        disable_tcp_early_demux: env_bool("DISABLE_TCP_EARLY_DEMUX")?,
        enable_ipv6: env_bool("ENABLE_IPv6")?,
        enable_v6_egress: env_bool("ENABLE_V6_EGRESS")?,
    };
    let bin_dir = bin_dir
        .or_else(|| std::env::var_os("HOST_CNI_BIN_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(settings::DEFAULT_HOST_CNI_BIN_PATH));
    let me = std::env::current_exe().ok();
    for path in install::copy_dir_files(&src_dir, &bin_dir, me.as_deref())? {
        eprintln!("vpc-cni-install: installed {}", path.display());
    }
    if skip_sysctls {
        return Ok(());
    }
    let mac = match primary_mac {
        Some(mac) => mac,
        None => {
            let endpoint = imds_endpoint
                .or_else(|| std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").ok())
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| node::DEFAULT_IMDS_ENDPOINT.to_owned());
            let mut attempt = 0;
            loop {
                attempt += 1;
                match node::imds_mac(&endpoint, Duration::from_secs(5)) {
                    Ok(mac) => break mac,
                    Err(e) if attempt < 5 => {
                        eprintln!("vpc-cni-install: {e}; retrying");
                        std::thread::sleep(Duration::from_secs(attempt));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    };
    let ns = Netns::open(&netns).map_err(|source| InstallerError::Net {
        what: format!("open {}", netns.display()),
        source,
    })?;
    let (primary, pairs) = node::set_node_sysctls(&ns, &proc_sys, mac, opts)?;
    eprintln!("vpc-cni-install: primary interface {primary} ({mac})");
    for (key, value) in pairs {
        eprintln!("vpc-cni-install: {key} = {value}");
    }
    Ok(())
}

/// The node address egress-cni SNATs to, when its conflist entry will be enabled: the
/// instance metadata's `local-ipv4` in an IPv6 cluster (`ENABLE_V4_EGRESS`), `ipv6` in an
/// IPv4 cluster (`ENABLE_V6_EGRESS`; none there forces the plugin off, as the reference does).
fn egress_node_ip(settings: &Settings) -> Result<Option<std::net::IpAddr>, InstallerError> {
    let (wanted, key) = if settings.enable_ipv6 {
        (settings.enable_v4_egress, "local-ipv4")
    } else {
        (settings.enable_v6_egress, "ipv6")
    };
    if !wanted {
        return Ok(None);
    }
    let endpoint = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| node::DEFAULT_IMDS_ENDPOINT.to_owned());
    let mut attempt = 0;
    let value = loop {
        attempt += 1;
        match node::imds_meta(&endpoint, key, Duration::from_secs(5)) {
            Ok(v) => break v,
            Err(e) if attempt < 5 => {
                eprintln!("vpc-cni-install: {e}; retrying");
                std::thread::sleep(Duration::from_secs(attempt));
            }
            Err(e) if !settings.enable_ipv6 => {
                eprintln!("vpc-cni-install: {e}; IPv6 egress stays off");
                break None;
            }
            Err(e) => return Err(e),
        }
    };
    // `ipv6` may list several addresses, one a line: the first is the primary.
    let ip = value
        .as_deref()
        .and_then(|v| v.lines().next())
        .and_then(|l| l.trim().parse::<std::net::IpAddr>().ok());
    if ip.is_none() {
        eprintln!("vpc-cni-install: instance metadata has no usable {key}; egress-cni is written disabled");
    }
    Ok(ip)
}

fn run(
    plugins: Vec<PathBuf>,
    socket: Option<PathBuf>,
    conflist_template: Option<PathBuf>,
    max_probe_interval_ms: u64,
    command: Vec<OsString>,
) -> Result<i32, InstallerError> {
    let mut settings = Settings::from_env()?;
    settings.egress_node_ip = egress_node_ip(&settings)?;
    let template = match conflist_template {
        Some(path) => std::fs::read_to_string(&path).map_err(|source| InstallerError::Io {
            op: "read",
            path,
            source,
        })?,
        None => conflist::TEMPLATE.to_owned(),
    };
    let opts = RunOptions {
        settings,
        plugins,
        command,
        socket: socket_path(socket),
        template,
        probe_timeout: Duration::from_secs(5),
        backoff: Backoff {
            max: Duration::from_millis(max_probe_interval_ms.max(100)),
            ..Backoff::default()
        },
    };
    runtime()?.block_on(async move {
        let (tx, rx) = mpsc::channel(4);
        let sig_err = |source| InstallerError::Spawn {
            program: "signal handler".into(),
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
        let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
        tokio::spawn(async move {
            loop {
                let sig = tokio::select! {
                    Some(()) = term.recv() => Signal::SIGTERM,
                    Some(()) = int.recv() => Signal::SIGINT,
                    else => return,
                };
                if tx.send(sig).await.is_err() {
                    return;
                }
            }
        });
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = ev_rx.recv().await {
                eprintln!("vpc-cni-install: {event:?}");
            }
        });
        supervise::run(opts, rx, Some(ev_tx)).await
    })
}

fn health(socket: Option<PathBuf>, timeout: u64) -> Result<bool, InstallerError> {
    let socket = socket_path(socket);
    runtime()?.block_on(async {
        match check_health(&socket, "", Duration::from_secs(timeout)).await {
            Ok(ServingStatus::Serving) => Ok(true),
            Ok(status) => {
                eprintln!("vpc-cni-install: ipamd reports {}", status.as_str_name());
                Ok(false)
            }
            Err(e) => {
                report(&e);
                Ok(false)
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Init {
            src_dir,
            bin_dir,
            primary_mac,
            imds_endpoint,
            proc_sys,
            netns,
            skip_sysctls,
        } => init(
            src_dir,
            bin_dir,
            primary_mac,
            imds_endpoint,
            proc_sys,
            netns,
            skip_sysctls,
        )
        .map(|()| 0),
        Command::Run {
            plugins,
            socket,
            conflist_template,
            max_probe_interval_ms,
            command,
        } => run(
            plugins,
            socket,
            conflist_template,
            max_probe_interval_ms,
            command,
        ),
        Command::Health { socket, timeout } => {
            health(socket, timeout).map(|ok| if ok { 0 } else { 1 })
        }
    };
    match outcome {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}
