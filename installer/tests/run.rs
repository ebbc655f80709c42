//! The daemon entrypoint against a fake ipamd: a gRPC health server from `vpc_cni_rpc` on a
//! unix socket in a temporary directory, and a child process standing in for the daemon.
//! Waits are bounded and driven by events or file checks, never by timing assertions.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use vpc_cni_installer::conflist::TEMPLATE;
use vpc_cni_installer::settings::Settings;
use vpc_cni_installer::supervise::{self, Backoff, Event, RunOptions};
use vpc_cni_rpc::{health_service, serve_unix, HealthHandle, ServingStatus};

const BOUND: Duration = Duration::from_secs(30);

struct FakeIpamd {
    health: HealthHandle,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for FakeIpamd {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves gRPC health (NOT_SERVING at first) on `socket` from the current runtime.
async fn fake_ipamd(socket: &Path) -> FakeIpamd {
    let (health, server) = health_service().await;
    let routes = tonic::service::Routes::new(server);
    let (stop, stopped) = oneshot::channel::<()>();
    let socket = socket.to_path_buf();
    tokio::spawn(async move {
        serve_unix(&socket, routes, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve health");
    });
    FakeIpamd {
        health,
        stop: Some(stop),
    }
}

struct Dirs {
    _tmp: tempfile::TempDir,
    plugin: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    socket: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    for d in ["app", "bin", "conf"] {
        std::fs::create_dir(root.join(d)).expect("mkdir");
    }
    let plugin = root.join("app/aws-cni");
    std::fs::write(&plugin, b"#!/bin/sh\nexit 0\n").expect("plugin");
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    Dirs {
        plugin,
        bin: root.join("bin"),
        conf: root.join("conf"),
        socket: root.join("run/ipamd.sock"),
        _tmp: tmp,
    }
}

fn options(d: &Dirs, vars: &[(&str, &str)], command: &[&str]) -> RunOptions {
    let bin = d.bin.to_string_lossy().into_owned();
    let conf = d.conf.to_string_lossy().into_owned();
    let mut all = vec![
        ("HOST_CNI_BIN_PATH", bin.as_str()),
        ("HOST_CNI_CONFDIR_PATH", conf.as_str()),
    ];
    all.extend_from_slice(vars);
    RunOptions {
        settings: Settings::for_test(&all).expect("settings"),
        plugins: vec![d.plugin.clone()],
        command: command.iter().map(Into::into).collect(),
        socket: d.socket.clone(),
        template: TEMPLATE.to_owned(),
        probe_timeout: Duration::from_secs(5),
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
    }
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(BOUND, rx.recv())
        .await
        .expect("an event within the bound")
        .expect("the entrypoint is still running")
}

/// A daemon that exits 7 on SIGTERM.
const TRAPPING_DAEMON: &[&str] = &[
    "sh",
    "-c",
    "trap 'exit 7' TERM; while :; do sleep 0.05; done",
];

#[tokio::test]
async fn conflist_is_written_only_after_serving_and_sigterm_is_forwarded() {
    let d = dirs();
    let ipamd = fake_ipamd(&d.socket).await;
    let opts = options(
        &d,
        &[
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "abc"),
            ("POD_MTU", "1500"),
            ("ENABLE_BANDWIDTH_PLUGIN", "true"),
        ],
        TRAPPING_DAEMON,
    );
    let (sig_tx, sig_rx) = mpsc::channel(1);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(supervise::run(opts, sig_rx, Some(ev_tx)));

    assert_eq!(
        next_event(&mut ev_rx).await,
        Event::Installed(vec![d.bin.join("aws-cni")])
    );
    assert_eq!(
        std::fs::read(d.bin.join("aws-cni")).expect("installed"),
        std::fs::read(&d.plugin).expect("source")
    );
    assert!(matches!(next_event(&mut ev_rx).await, Event::Started(pid) if pid > 0));

    // Several NOT_SERVING answers: the conflist must not exist meanwhile.
    let mut not_serving = 0;
    while not_serving < 3 {
        match next_event(&mut ev_rx).await {
            Event::Probe(Ok(ServingStatus::NotServing)) => not_serving += 1,
            Event::Probe(Err(_)) => {} // the server may not be bound yet
            other => panic!("unexpected {other:?}"),
        }
        assert!(!d.conf.join("10-aws.conflist").exists());
    }

    ipamd.health.set_serving().await;
    let written = loop {
        match next_event(&mut ev_rx).await {
            Event::Probe(_) => {}
            Event::ConflistWritten(path) => break path,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(written, d.conf.join("10-aws.conflist"));
    let conf: Value =
        serde_json::from_slice(&std::fs::read(&written).expect("conflist")).expect("json");
    assert_eq!(conf["cniVersion"], "0.4.0");
    assert_eq!(conf["plugins"][0]["vethPrefix"], "abc");
    assert_eq!(conf["plugins"][0]["mtu"], "1500");
    // The egress-cni entry (disabled: an IPv4 cluster without ENABLE_V6_EGRESS) follows
    // aws-cni, as in the reference conflist.
    assert_eq!(conf["plugins"][1]["type"], "egress-cni");
    assert_eq!(conf["plugins"][1]["enabled"], "false");
    assert_eq!(conf["plugins"][2]["type"], "portmap");
    assert_eq!(conf["plugins"][3]["type"], "bandwidth");

    sig_tx.send(Signal::SIGTERM).await.expect("send");
    assert_eq!(
        next_event(&mut ev_rx).await,
        Event::Forwarded(Signal::SIGTERM)
    );
    assert_eq!(next_event(&mut ev_rx).await, Event::Exited(7));
    let code = tokio::time::timeout(BOUND, task)
        .await
        .expect("returns")
        .expect("join")
        .expect("run");
    assert_eq!(code, 7);
    // The conflist stays after the daemon exits (as the reference).
    assert!(d.conf.join("10-aws.conflist").exists());
}

#[tokio::test]
async fn a_daemon_that_exits_before_serving_leaves_no_conflist() {
    let d = dirs();
    let _ipamd = fake_ipamd(&d.socket).await;
    let opts = options(&d, &[], &["sh", "-c", "sleep 0.3; exit 3"]);
    let (_sig_tx, sig_rx) = mpsc::channel(1);
    let code = tokio::time::timeout(BOUND, supervise::run(opts, sig_rx, None))
        .await
        .expect("returns")
        .expect("run");
    assert_eq!(code, 3);
    assert!(!d.conf.join("10-aws.conflist").exists());
}

#[tokio::test]
async fn invalid_settings_or_template_act_on_nothing() {
    let d = dirs();
    let marker = d.bin.join("daemon-ran");
    let script = format!("touch {}", marker.display());
    let mut opts = options(&d, &[], &["sh", "-c", &script]);
    opts.template =
        r#"{"cniVersion":"0.3.1","name":"aws-cni","plugins":[{"type":"aws-cni"}]}"#.to_owned();
    let (_sig_tx, sig_rx) = mpsc::channel(1);
    let err = supervise::run(opts, sig_rx, None).await.unwrap_err();
    assert!(err.to_string().contains("0.4.0"), "{err}");
    assert!(!marker.exists(), "the daemon was not started");
    assert!(!d.bin.join("aws-cni").exists(), "nothing was installed");
}

// ---- the binary ----

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpc-cni-install"))
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + BOUND;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_binary(d: &Dirs, daemon: &[&str], extra_env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = bin();
    cmd.arg("run")
        .arg("--plugin")
        .arg(&d.plugin)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--max-probe-interval-ms")
        .arg("100")
        .arg("--")
        .args(daemon)
        .env("HOST_CNI_BIN_PATH", &d.bin)
        .env("HOST_CNI_CONFDIR_PATH", &d.conf);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn vpc-cni-install")
}

fn wait_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the installer did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &std::process::Child) {
    kill(
        Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_forwards_sigterm_and_exits_with_the_daemons_status() {
    let d = dirs();
    let ipamd = fake_ipamd(&d.socket).await;
    ipamd.health.set_serving().await;
    let mut child = run_binary(&d, TRAPPING_DAEMON, &[("DISABLE_POD_V6", "true")]);
    let conflist = d.conf.join("10-aws.conflist");
    tokio::task::block_in_place(|| wait_for_file(&conflist));
    let conf: Value =
        serde_json::from_slice(&std::fs::read(&conflist).expect("read")).expect("json");
    assert_eq!(conf["plugins"][3]["type"], "tuning");
    sigterm(&child);
    let status = tokio::task::block_in_place(|| wait_child(&mut child));
    assert_eq!(status.code(), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_by_the_signal_gives_128_plus_the_signal() {
    let d = dirs();
    let ipamd = fake_ipamd(&d.socket).await;
    ipamd.health.set_serving().await;
    // `exec` so that the shell is the daemon and dies of the default SIGTERM disposition.
    let mut child = run_binary(&d, &["sh", "-c", "exec sleep 600"], &[]);
    tokio::task::block_in_place(|| wait_for_file(&d.conf.join("10-aws.conflist")));
    sigterm(&child);
    let status = tokio::task::block_in_place(|| wait_child(&mut child));
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "{status:?} {:?}",
        status.signal()
    );
}

#[test]
fn the_binary_refuses_bad_settings_before_installing_anything() {
    let d = dirs();
    let marker = d.bin.join("daemon-ran");
    let script = format!("touch {}", marker.display());
    let out = bin()
        .args(["run", "--plugin"])
        .arg(&d.plugin)
        .arg("--socket")
        .arg(&d.socket)
        .args(["--", "sh", "-c", &script])
        .env("HOST_CNI_BIN_PATH", &d.bin)
        .env("HOST_CNI_CONFDIR_PATH", &d.conf)
        .env("AWS_VPC_K8S_CNI_VETHPREFIX", "eth")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AWS_VPC_K8S_CNI_VETHPREFIX"), "{stderr}");
    assert!(!marker.exists());
    assert!(!d.bin.join("aws-cni").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probe_exits_zero_only_when_serving() {
    let d = dirs();
    let probe = |socket: &Path| {
        let socket = socket.to_path_buf();
        tokio::task::block_in_place(move || {
            bin()
                .args(["health", "--timeout", "5", "--socket"])
                .arg(&socket)
                .output()
                .expect("health")
        })
    };
    let out = probe(&d.socket);
    assert_eq!(out.status.code(), Some(1), "no daemon: unhealthy");
    let ipamd = fake_ipamd(&d.socket).await;
    // Bounded wait for the socket to be bound; NOT_SERVING then.
    tokio::task::block_in_place(|| wait_for_file(&d.socket));
    let out = probe(&d.socket);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_SERVING"));
    ipamd.health.set_serving().await;
    assert_eq!(probe(&d.socket).status.code(), Some(0));
}
