//! The real `ipamd --backend sim` binary, talked to by gRPC clients other than ours:
//! Python's grpcio with its default channel options (which puts the percent-encoded socket
//! path in `:authority`), and grpc-go built offline from Debian's `golang-google-grpc-dev`
//! in GOPATH mode, dialling `unix://<path>` as the reference plugin does. Plus the security
//! settings a node operator relies on: the socket's and its directory's modes, introspection on
//! loopback by default, and no credentials or full container ids in logs or introspection.
//!
//! The foreign-client tests skip with a loud message when their toolchain is missing locally,
//! and fail when `CI=true` (`scripts/setup-machine.sh` installs both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vpc_cni_rpc::{AddNetworkRequest, DelNetworkRequest};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const RPC_PROTO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../rpc/proto");
const CLIENTS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");

/// A 64-hex sandbox id, as containerd makes them; logs may show only its first 12.
const CONTAINER: &str = "4f2b9c1d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

/// Credentials put in ipamd's environment; none may reach a log line or an answer.
const SECRETS: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIASENTINELKEY00001"),
    (
        "AWS_SECRET_ACCESS_KEY",
        "sentinelSecretKey/0123456789abcdefABCDEF",
    ),
    (
        "AWS_SESSION_TOKEN",
        "sentinelSessionTokenIQoJb3JpZ2luX2VjEOz",
    ),
];

/// A running `ipamd --backend sim`, killed when dropped.
struct Ipamd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    introspection: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Ipamd {
    /// Starts ipamd with its socket at `<tmp>/<socket_rel>` (directories not created) and
    /// debug logging to a file, and waits until it says it is ready (at most 60 s).
    fn start(socket_rel: &str, extra: &[(&str, &str)]) -> Ipamd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(socket_rel);
        let log = dir.path().join("ipamd.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipamd"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("IPAMD_BACKEND", "sim")
            .env("IPAMD_GRPC_SOCKET", &socket)
            .env(
                "AWS_VPC_K8S_CNI_BACKING_STORE",
                dir.path().join("ipam.json"),
            )
            .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
            .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
            .env("AWS_VPC_K8S_CNI_LOGLEVEL", "debug")
            .env("AWS_VPC_K8S_CNI_LOG_FILE", &log)
            .env("VPC_CNI_POOL_TICK", "100ms")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ipamd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let introspection = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("introspection Some(").nth(1) {
                        let addr = rest.trim_end_matches(')');
                        break addr.parse().expect("introspection address");
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("ipamd never became ready; stderr:\n{}", seen.join("\n"));
                }
            }
        };
        Ipamd {
            child,
            socket,
            log,
            introspection,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ipamd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A missing toolchain: a loud skip locally, a failure in CI.
fn toolchain_missing(what: &str) {
    let msg = format!(
        "TOOLCHAIN MISSING: {what}. This test did NOT run. scripts/setup-machine.sh installs it."
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: failing instead of skipping)");
    }
    // Written to the stderr handle, not with eprintln!, which the test harness captures.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "\n*** {msg} ***\n");
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The lines a client prints for AddNetwork, DelNetwork, (grpc-go only) the network policy
/// agent's GetNetworkPolicyConfigs, and the health check.
fn assert_client_lines(client: &str, stdout: &str, np_mode: Option<&str>) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3 + usize::from(np_mode.is_some()),
        "{client}: {stdout}"
    );
    assert!(
        lines[0].starts_with("add ok true 10.0."),
        "{client}: AddNetwork served with an address: {stdout}"
    );
    assert_eq!(lines[1], "del ok true", "{client}: {stdout}");
    if let Some(mode) = np_mode {
        assert!(
            lines[2].starts_with(&format!("npconfig ok \"{mode}\" 10.0.")),
            "{client}: {stdout}"
        );
    }
    assert_eq!(
        lines[lines.len() - 1],
        "health SERVING",
        "{client}: {stdout}"
    );
}

#[test]
fn grpcio_with_default_options_is_served() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        toolchain_missing("python3 with grpcio and grpcio-tools");
        return;
    }
    let stubs = tempfile::tempdir().unwrap();
    let out = stubs.path().display().to_string();
    run(Command::new("python3").args([
        "-m",
        "grpc_tools.protoc",
        &format!("-I{RPC_PROTO_DIR}"),
        &format!("-I{CLIENTS_DIR}"),
        &format!("--python_out={out}"),
        &format!("--grpc_python_out={out}"),
        "rpc.proto",
        "health.proto",
    ]));
    let ipamd = Ipamd::start("ipamd.sock", &[]);
    let result = run(Command::new("python3").args([
        &format!("{CLIENTS_DIR}/grpcio_client.py"),
        &out,
        &ipamd.socket.display().to_string(),
        VERSION,
        CONTAINER,
    ]));
    assert_client_lines("grpcio", &String::from_utf8_lossy(&result.stdout), None);
}

/// Where Debian's Go packages put their sources (GOPATH mode).
const GOCODE: &str = "/usr/share/gocode";

#[test]
fn grpc_go_dialling_like_the_reference_plugin_is_served() {
    let have = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let sources = [
        "src/google.golang.org/grpc/clientconn.go",
        "src/google.golang.org/protobuf/cmd/protoc-gen-go/main.go",
        "src/github.com/golang/protobuf/proto/proto.go",
    ];
    let missing: Vec<String> = ["go", "protoc", "protoc-gen-go-grpc"]
        .into_iter()
        .filter(|b| !have(b))
        .map(str::to_owned)
        .chain(
            sources
                .iter()
                .filter(|s| !Path::new(GOCODE).join(s).exists())
                .map(|s| format!("{GOCODE}/{s}")),
        )
        .collect();
    if !missing.is_empty() {
        toolchain_missing(&format!(
            "Go gRPC toolchain (golang-go, golang-google-grpc-dev, golang-google-protobuf-dev, \
             golang-github-golang-protobuf-1-5-dev, protoc-gen-go-grpc, protobuf-compiler): \
             missing {missing:?}"
        ));
        return;
    }
    let gopath = tempfile::tempdir().unwrap();
    let pkg = gopath.path().join("src/vpccnitest");
    std::fs::create_dir_all(pkg.join("rpc")).unwrap();
    std::fs::create_dir_all(pkg.join("client")).unwrap();
    std::fs::copy(
        format!("{CLIENTS_DIR}/go_client.go"),
        pkg.join("client/main.go"),
    )
    .unwrap();
    // A build cache kept in the target dir across runs (the first build compiles grpc-go).
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build-cache");
    let go = |args: &[&str]| {
        let mut cmd = Command::new("go");
        cmd.args(args)
            .current_dir(gopath.path())
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env("GOPATH", format!("{}:{GOCODE}", gopath.path().display()))
            .env("GOCACHE", &cache);
        cmd
    };
    let protoc_gen_go = gopath.path().join("protoc-gen-go");
    run(&mut go(&[
        "build",
        "-o",
        &protoc_gen_go.display().to_string(),
        "google.golang.org/protobuf/cmd/protoc-gen-go",
    ]));
    let out = pkg.join("rpc").display().to_string();
    run(Command::new("protoc").args([
        &format!("-I{RPC_PROTO_DIR}"),
        &format!("--plugin=protoc-gen-go={}", protoc_gen_go.display()),
        &format!("--go_out={out}"),
        "--go_opt=paths=source_relative,Mrpc.proto=vpccnitest/rpc",
        &format!("--go-grpc_out={out}"),
        "--go-grpc_opt=paths=source_relative,Mrpc.proto=vpccnitest/rpc",
        "rpc.proto",
    ]));
    let client = gopath.path().join("go_client");
    run(&mut go(&[
        "build",
        "-o",
        &client.display().to_string(),
        "vpccnitest/client",
    ]));
    let ipamd = Ipamd::start(
        "ipamd.sock",
        &[("NETWORK_POLICY_ENFORCING_MODE", "standard")],
    );
    let result =
        run(Command::new(&client).args([&ipamd.socket.display().to_string(), VERSION, CONTAINER]));
    assert_client_lines(
        "grpc-go",
        &String::from_utf8_lossy(&result.stdout),
        Some("standard"),
    );
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn socket_modes_loopback_introspection_and_nothing_secret_in_logs_or_answers() {
    // The socket's directories do not exist yet: ipamd creates them as the reference does.
    let mut extra: Vec<(&str, &str)> = SECRETS.to_vec();
    extra.push(("NETWORK_POLICY_ENFORCING_MODE", "standard"));
    let ipamd = Ipamd::start("run/aws-node/ipamd.sock", &extra);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&ipamd.socket), 0o660, "socket mode");
    let dir = ipamd.socket.parent().unwrap();
    assert_eq!(mode(dir), 0o755, "socket directory mode");
    assert_eq!(mode(dir.parent().unwrap()), 0o755, "created parent mode");

    // An ADD and a DEL with a full-length sandbox id, through our own client.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ip = rt.block_on(async {
        let mut c = vpc_cni_rpc::connect_unix(&ipamd.socket, Duration::from_secs(5))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ip = loop {
            let r = c
                .add_network(AddNetworkRequest {
                    client_version: VERSION.into(),
                    k8s_pod_name: "secret-pod".into(),
                    k8s_pod_namespace: "default".into(),
                    k8s_pod_infra_container_id: CONTAINER.into(),
                    container_id: CONTAINER.into(),
                    netns: "/var/run/netns/x".into(),
                    if_name: "eth0".into(),
                    network_name: "aws-cni".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if r.success {
                break r.ip_allocation_metadata[0].i_pv4_addr.clone();
            }
            assert!(Instant::now() < deadline, "no address within 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ip
    });
    let enis = http_get(ipamd.introspection, "/v1/enis");
    assert!(enis.contains(&ip), "the assignment shows: {enis}");
    let mut answers = enis;
    for path in [
        "/v1/ipamd-env-settings",
        "/v1/networkutils-env-settings",
        "/v1/eni-configs",
        "/",
    ] {
        answers.push_str(&http_get(ipamd.introspection, path));
    }
    rt.block_on(async {
        let mut c = vpc_cni_rpc::connect_unix(&ipamd.socket, Duration::from_secs(5))
            .await
            .unwrap();
        let r = c
            .del_network(DelNetworkRequest {
                client_version: VERSION.into(),
                k8s_pod_name: "secret-pod".into(),
                k8s_pod_namespace: "default".into(),
                container_id: CONTAINER.into(),
                if_name: "eth0".into(),
                network_name: "aws-cni".into(),
                reason: "PodDeleted".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.into_inner().success);
    });
    let log = ipamd.log_text();
    assert!(log.contains("assigned"), "debug log written: {log}");
    assert!(log.contains("released"), "debug log written: {log}");
    for (what, text) in [("log", &log), ("introspection", &answers)] {
        assert!(
            !text.contains(CONTAINER),
            "{what} holds the full container id"
        );
        for (var, secret) in SECRETS {
            assert!(!text.contains(secret), "{what} holds {var}");
        }
        let (key, secret) = ipamd::io::sim_backend::SIM_CREDENTIALS;
        assert!(!text.contains(secret), "{what} holds the sim's secret key");
        assert!(!text.contains(key), "{what} holds the sim's access key");
    }

    // Introspection binds loopback only unless told otherwise.
    let cfg = ipamd::config::Config::for_test(&[]).unwrap();
    let bind: SocketAddr = cfg.introspection_bind.parse().unwrap();
    assert!(bind.ip().is_loopback(), "{bind}");
    assert_eq!(
        cfg.introspection_bind,
        ipamd::serve::introspect::DEFAULT_INTROSPECTION_BIND
    );
}

#[test]
fn logs_shorten_container_ids_to_twelve_characters() {
    use ipamd::store::datastore::{short_id, IpamKey, SHORT_ID_LEN};
    assert_eq!(SHORT_ID_LEN, 12);
    assert_eq!(short_id(CONTAINER), &CONTAINER[..12]);
    assert_eq!(short_id("abc"), "abc");
    assert_eq!(short_id(""), "");
    // Counted in characters, never splitting one.
    assert_eq!(short_id("ééééééééééééé"), "éééééééééééé");
    let key = IpamKey::new("aws-cni", CONTAINER, "eth0");
    assert_eq!(key.short_container(), "4f2b9c1d8e7a");
}

#[test]
fn the_grpc_limit_variables_are_checked_and_applied_by_the_binary() {
    use ipamd::config::Config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (var, bad) in [
        ("VPC_CNI_GRPC_MAX_CONNECTIONS", "0"),
        ("VPC_CNI_GRPC_MAX_STREAMS", "-1"),
        ("VPC_CNI_GRPC_MAX_MESSAGE_BYTES", "lots"),
    ] {
        let err = Config::for_test(&[(var, bad)]).expect_err("refused");
        assert!(err.to_string().contains(var), "{var}={bad}: {err}");
    }
    let cfg = Config::for_test(&[
        ("VPC_CNI_GRPC_MAX_CONNECTIONS", "2"),
        ("VPC_CNI_GRPC_MAX_STREAMS", "3"),
        ("VPC_CNI_GRPC_MAX_MESSAGE_BYTES", "2048"),
    ])
    .unwrap();
    assert_eq!(
        (
            cfg.grpc_limits.max_connections,
            cfg.grpc_limits.max_concurrent_streams,
            cfg.grpc_limits.max_message_bytes
        ),
        (2, 3, 2048)
    );
    assert_eq!(
        Config::for_test(&[]).unwrap().grpc_limits,
        vpc_cni_rpc::ServeLimits::default()
    );

    let ipamd = Ipamd::start(
        "ipamd.sock",
        &[
            ("VPC_CNI_GRPC_MAX_CONNECTIONS", "2"),
            ("VPC_CNI_GRPC_MAX_MESSAGE_BYTES", "2048"),
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let timeout = Duration::from_secs(5);
        let mut first = vpc_cni_rpc::connect_unix(&ipamd.socket, timeout)
            .await
            .unwrap();
        let request = |pod: String| AddNetworkRequest {
            client_version: VERSION.into(),
            k8s_pod_name: pod,
            k8s_pod_namespace: "default".into(),
            container_id: "limits".into(),
            if_name: "eth0".into(),
            network_name: "aws-cni".into(),
            ..Default::default()
        };
        let status = first
            .add_network(request("p".repeat(4096)))
            .await
            .expect_err("over VPC_CNI_GRPC_MAX_MESSAGE_BYTES");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("2048"), "{status:?}");
        // A second connection fits; a third is refused with the reason.
        let _second = vpc_cni_rpc::connect_unix(&ipamd.socket, timeout)
            .await
            .unwrap();
        let third = async {
            let mut c = vpc_cni_rpc::connect_unix(&ipamd.socket, timeout)
                .await
                .map_err(|e| format!("{e:?}"))?;
            c.add_network(request("third".into()))
                .await
                .map_err(|s| format!("{s:?}"))
        };
        let err = third.await.expect_err("over VPC_CNI_GRPC_MAX_CONNECTIONS");
        // A tonic client sees the reason when its stream was opened before the GOAWAY
        // arrived; otherwise hyper drops the queued request as "connection closed". Either
        // way it is refused; the reason itself is checked on the wire below.
        assert!(
            err.contains(vpc_cni_rpc::TOO_MANY_CONNECTIONS) || err.contains("connection closed"),
            "{err}"
        );
        // The refusal on the wire: the server preface, then GOAWAY (type 7) with
        // ENHANCE_YOUR_CALM (0xb) and the reason as debug data, then the close.
        let mut raw = tokio::net::UnixStream::connect(&ipamd.socket)
            .await
            .unwrap();
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut wire = Vec::new();
        tokio::time::timeout(timeout, raw.read_to_end(&mut wire))
            .await
            .expect("the refused connection is closed within the bound")
            .unwrap();
        let reason = vpc_cni_rpc::TOO_MANY_CONNECTIONS.as_bytes();
        let mut frames = Vec::new();
        let mut at = 0;
        while at + 9 <= wire.len() {
            let len = u32::from_be_bytes([0, wire[at], wire[at + 1], wire[at + 2]]) as usize;
            let end = (at + 9 + len).min(wire.len());
            frames.push((wire[at + 3], wire[at + 9..end].to_vec()));
            at = end;
        }
        let goaway = frames
            .iter()
            .find(|(kind, _)| *kind == 7)
            .map(|(_, payload)| payload.clone())
            .unwrap_or_else(|| panic!("a GOAWAY frame: {frames:?}"));
        assert_eq!(&goaway[..8], &[0, 0, 0, 0, 0, 0, 0, 0x0b], "{frames:?}");
        assert_eq!(&goaway[8..], reason, "GOAWAY debug data is the reason");
        // The held connection is still served.
        let ok = first.add_network(request("first".into())).await;
        assert!(ok.is_ok(), "{ok:?}");
    });
}
