//! The Grafana dashboard and the reference metric names against a live daemon: the real
//! `ipamd --backend sim` binary (`target/<profile>/ipamd`) is started with its socket and
//! checkpoint in a temporary directory and its metrics on a loopback port it picks itself (the
//! address comes from its "ready" line on stderr). The test drives AddNetwork/DelNetwork over
//! the gRPC socket and a burst of EC2 throttling through the embedded simulator's admin
//! endpoint, so counters and histograms have samples, then scrapes `/metrics` and checks:
//!
//! - every metric name the dashboard queries is a sample of the scrape, and a `_bucket`, `_sum`
//!   or `_count` name belongs to a family of type histogram (or summary for `_sum`/`_count`);
//! - the counters and histograms the dashboard's rate panels read have moved (above 0);
//! - every `awscni_*` family of the reference list (spec/ipamd.md section 6.1) that ipamd claims
//!   in `ipamd::serve::metrics::METRIC_NAMES` is in the scrape, except the ones listed in
//!   [`NOT_SERVED`] with the reason, which must be absent (so the list stays true).
//!
//! ipamd runs inside a test network namespace (removed afterwards, even on failure), so nothing
//! it might do to a host's network reaches the machine's own, and it talks to its simulator on
//! that namespace's loopback. That needs root (ipamd itself needs it too: it reads the host's
//! links from its namespace); without root the live tests say so and skip. The binaries must be
//! built first (`cargo build -p ipamd --bin ipamd`, and `-p vpc-cni-plugin --bin aws-cni` for
//! the entrypoint test; `cargo nextest run --workspace` builds both).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_rpc::{AddNetworkRequest, DelNetworkRequest, ServingStatus};

/// Upper bound of every wait (start-up, pool top-up, a metric moving, exit). Generous: the
/// machine running the tests may be busy; nothing is timed, a wait only fails after this.
const WAIT: Duration = Duration::from_secs(90);

/// The `awscni_*` families of the reference daemon, spec/ipamd.md section 6.1 (in its order).
/// When the spec is found beside the repository (`../shared/spec/ipamd.md`, as on CI) the test
/// checks this list against it.
const REFERENCE_METRICS: &[&str] = &[
    "awscni_ipamd_error_count",
    "awscni_ipamd_action_inprogress",
    "awscni_eni_max",
    "awscni_ip_max",
    "awscni_reconcile_count",
    "awscni_add_ip_req_count",
    "awscni_del_ip_req_count",
    "awscni_pod_eni_error_count",
    "awscni_aws_api_latency_ms",
    "awscni_aws_api_error_count",
    "awscni_aws_utils_error_count",
    "awscni_ec2api_req_count",
    "awscni_ec2api_error_count",
    "awscni_eni_allocated",
    "awscni_total_ip_addresses",
    "awscni_assigned_ip_addresses",
    "awscni_force_removed_enis",
    "awscni_force_removed_ips",
    "awscni_total_ipv4_prefixes",
    "awscni_assigned_ip_per_cidr",
    "awscni_no_available_ip_addresses",
    "awscni_assigned_ip_per_eni",
    "awscni_ipamd_startup_duration_seconds",
    "awscni_ipamd_node_initialization_duration_seconds",
    "awscni_connmark_backend",
    "awscni_connmark_reconcile_total",
    "awscni_build_info",
];

/// Reference families ipamd registers but that get no series in this run, with the reason. A
/// Prometheus family with labels shows only the label values used so far (as in the reference
/// daemon), so these have no line in the scrape. The test checks they are indeed absent: when
/// one starts being recorded, it fails and says to move it out of this list (and to update
/// docs/metrics.md). Every other claimed reference family must be in the scrape.
const NOT_SERVED: &[(&str, &str)] = &[
    (
        "awscni_pod_eni_error_count",
        "recorded only when security groups for pods (ENABLE_POD_ENI) fail to ask for a trunk; \
         this run has them off",
    ),
    (
        "awscni_aws_utils_error_count",
        "not recorded yet: ipamd has no ENI-cleanup error path that reports it",
    ),
    (
        "awscni_reconcile_count",
        "counted only when a reconcile run adopts or evicts something; nothing changes behind \
         the daemon's back here (ipamd/tests/sim_daemon.rs checks the series)",
    ),
    (
        "awscni_connmark_backend",
        "the sim backend runs without host networking, and the daemon does not yet record the \
         connmark backend the net crate picks when it does",
    ),
];

/// A running `ipamd --backend sim`, killed when dropped (its namespace removed after it).
struct LiveIpamd {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
    metrics: SocketAddr,
    admin: SocketAddr,
    ns: Option<TestNetns>,
    _tmp: tempfile::TempDir,
}

impl Drop for LiveIpamd {
    fn drop(&mut self) {
        // No graceful stop to test here: SIGKILL, then reap.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The namespace goes after the process in it.
        self.ns.take();
    }
}

/// `target/<profile>/<name>`, next to the `deps/` directory holding this test executable.
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test executable's directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p ipamd --bin ipamd`; \
         `cargo nextest run --workspace` builds it too)",
        bin.display()
    );
    bin
}

/// A test network namespace with its loopback up.
fn node_netns(tag: &str) -> TestNetns {
    let ns = TestNetns::new(tag).expect("test netns");
    let up = Command::new("ip")
        .args(["-n", ns.name(), "link", "set", "lo", "up"])
        .status()
        .expect("ip link set lo up");
    assert!(up.success(), "ip -n {} link set lo up: {up}", ns.name());
    ns
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// Polls `f` until it answers `Some`, or fails the test after [`WAIT`] naming `what`.
fn wait_for<T>(what: &str, log: &Path, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}\n--- ipamd stderr ---\n{}",
            read_log(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The socket address printed after `marker` in ipamd's stderr (`metrics Some(127.0.0.1:N)`,
/// `admin http://127.0.0.1:N`).
fn address_after(text: &str, marker: &str) -> Option<SocketAddr> {
    let rest = text.split(marker).nth(1)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl LiveIpamd {
    fn start(vars: &[(&str, &str)]) -> LiveIpamd {
        let bin = workspace_bin("ipamd");
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("ipamd.log");
        let socket = tmp.path().join("run/ipamd.sock");
        std::fs::create_dir_all(tmp.path().join("run")).expect("mkdir run");
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .args(["--backend", "sim"])
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("IPAMD_GRPC_SOCKET", &socket)
            .env(
                "AWS_VPC_K8S_CNI_BACKING_STORE",
                tmp.path().join("run/ipam.json"),
            )
            .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
            .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
            .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
            .env("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"));
        let ns = node_netns("ipamd");
        // A child forked from a thread inside the namespace starts in it.
        let child = ns
            .run(move || cmd.spawn())
            .expect("enter the test netns")
            .expect("spawn ipamd");
        let ns = Some(ns);
        let mut d = LiveIpamd {
            child,
            log,
            socket,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            ns,
            _tmp: tmp,
        };
        let log = d.log.clone();
        let (metrics, admin) = wait_for("ipamd's \"ready\" line on stderr", &log, || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!(
                    "ipamd exited before it was ready ({status})\n--- ipamd stderr ---\n{}",
                    read_log(&log)
                );
            }
            let text = read_log(&log);
            let ready = text.lines().find(|l| l.starts_with("ipamd: ready:"))?;
            let metrics = address_after(ready, "metrics Some(")?;
            let admin = address_after(&text, " admin http://")?;
            Some((metrics, admin))
        });
        d.metrics = metrics;
        d.admin = admin;
        let socket = d.socket.clone();
        wait_for("ipamd's gRPC health SERVING", &log, || {
            let status = rt().block_on(vpc_cni_rpc::check_health(
                &socket,
                "",
                Duration::from_secs(5),
            ));
            matches!(status, Ok(ServingStatus::Serving)).then_some(())
        });
        d
    }

    /// One HTTP/1.0 exchange with a loopback server of ipamd's, from inside its namespace.
    fn http(&self, addr: SocketAddr, request: String) -> String {
        let exchange = move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.write_all(request.as_bytes())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        };
        let ns = self.ns.as_ref().expect("the netns lives as long as ipamd");
        let reply = ns.run(exchange).expect("enter the test netns");
        match reply {
            Ok(r) => r,
            Err(e) => panic!(
                "HTTP to {addr}: {e}\n--- ipamd stderr ---\n{}",
                read_log(&self.log)
            ),
        }
    }

    /// `GET /metrics`, parsed.
    fn scrape(&self) -> Exposition {
        let reply = self.http(
            self.metrics,
            "GET /metrics HTTP/1.0\r\nHost: ipamd\r\n\r\n".to_owned(),
        );
        assert!(
            reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
            "/metrics answered: {reply}"
        );
        let body = reply.split("\r\n\r\n").nth(1).expect("an HTTP body");
        Exposition::parse(body)
    }

    /// `PUT` a JSON body to the embedded simulator's admin endpoint.
    fn admin_put(&self, path: &str, body: &str) {
        let reply = self.http(
            self.admin,
            format!(
                "PUT {path} HTTP/1.0\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(reply.contains(" 200 "), "PUT {path}: {reply}");
    }

    /// Polls the scrape until `family` (summed over its label sets) is above 0.
    fn wait_moved(&self, family: &str) -> Exposition {
        wait_for(&format!("{family} above 0 in /metrics"), &self.log, || {
            let e = self.scrape();
            (e.sum(family) > 0.0).then_some(e)
        })
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A Prometheus text exposition: family types and sample values.
#[derive(Debug)]
struct Exposition {
    /// Family name → type (`counter`, `gauge`, `histogram`, `summary`, `untyped`).
    types: BTreeMap<String, String>,
    /// Sample name (with `_bucket`/`_sum`/`_count`) → values of its series.
    samples: BTreeMap<String, Vec<f64>>,
    text: String,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut types = BTreeMap::new();
        let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            // The value follows the label set (labels may contain spaces inside quotes).
            let after_labels = if line[name_end..].starts_with('{') {
                line.rfind('}').map_or("", |i| &line[i + 1..])
            } else {
                &line[name_end..]
            };
            let value = after_labels
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("sample line without a value: {line}"));
            samples.entry(name.to_owned()).or_default().push(value);
        }
        Exposition {
            types,
            samples,
            text: text.to_owned(),
        }
    }

    /// The family a sample name belongs to and whether the name is a valid sample of it:
    /// `x_bucket` of a histogram `x`, `x_sum`/`x_count` of a histogram or summary `x`, or `x`.
    fn family_of(&self, sample: &str) -> Option<&str> {
        for (suffix, kinds) in [
            ("_bucket", &["histogram"][..]),
            ("_sum", &["histogram", "summary"][..]),
            ("_count", &["histogram", "summary"][..]),
        ] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if let Some((name, kind)) = self.types.get_key_value(base) {
                    return kinds.contains(&kind.as_str()).then_some(name.as_str());
                }
            }
        }
        self.types
            .get_key_value(sample)
            .filter(|(_, kind)| !matches!(kind.as_str(), "histogram" | "summary"))
            .map(|(name, _)| name.as_str())
    }

    /// Whether `family` has at least one sample line.
    fn has_family(&self, family: &str) -> bool {
        self.types.contains_key(family)
            && self
                .samples
                .keys()
                .any(|s| s == family || self.family_of(s) == Some(family))
    }

    /// Sum of a sample name's values over its series (0 when absent).
    fn sum(&self, sample: &str) -> f64 {
        self.samples.get(sample).map_or(0.0, |v| v.iter().sum())
    }
}

/// Metric names in a PromQL expression (identifiers starting with `awscni_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("awscni_"))
        .map(str::to_owned)
        .collect()
}

/// Every metric name the dashboard's panels and template variables query.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read"))
        .expect("the dashboard is JSON");
    let mut out = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        for key in ["definition", "query"] {
            if let Some(q) = var[key].as_str() {
                out.extend(metric_names(q));
            }
        }
    }
    out
}

fn add(c: &str) -> AddNetworkRequest {
    AddNetworkRequest {
        client_version: env!("CARGO_PKG_VERSION").into(),
        k8s_pod_name: format!("pod-{c}"),
        k8s_pod_namespace: "default".into(),
        container_id: c.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        ..Default::default()
    }
}

fn del(c: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        client_version: env!("CARGO_PKG_VERSION").into(),
        k8s_pod_name: format!("pod-{c}"),
        k8s_pod_namespace: "default".into(),
        container_id: c.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        reason: vpc_cni_rpc::REASON_POD_DELETED.into(),
        ..Default::default()
    }
}

/// AddNetwork for each id (retried within [`WAIT`] while the pool tops up), then DelNetwork.
fn add_and_delete(d: &LiveIpamd, ids: &[String]) {
    rt().block_on(async {
        let mut c = vpc_cni_rpc::connect_unix(&d.socket, Duration::from_secs(10))
            .await
            .expect("connect to ipamd's socket");
        for id in ids {
            let deadline = Instant::now() + WAIT;
            loop {
                let r = c
                    .add_network(add(id))
                    .await
                    .expect("AddNetwork")
                    .into_inner();
                if r.success {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "AddNetwork {id} kept failing: {r:?}\n--- ipamd stderr ---\n{}",
                    read_log(&d.log)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for id in ids {
            let r = c
                .del_network(del(id))
                .await
                .expect("DelNetwork")
                .into_inner();
            assert!(r.success, "DelNetwork {id}: {r:?}");
        }
    });
}

/// `awscni_*` names in the table of spec/ipamd.md section 6.1, when the spec is beside the
/// repository (`<repo>/../shared`, as CI lays it out).
fn spec_reference_metrics() -> Option<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec/ipamd.md");
    let text = std::fs::read_to_string(&path).ok()?;
    let section = text.split("### 6.1 ").nth(1)?.split("### 6.2 ").next()?;
    Some(
        section
            .lines()
            .filter(|l| l.starts_with("| `awscni_"))
            .filter_map(|l| l.split('`').nth(1))
            .map(str::to_owned)
            .collect(),
    )
}

#[test]
fn the_reference_list_is_the_specs_and_ipamd_claims_all_of_it() {
    match spec_reference_metrics() {
        Some(spec) => assert_eq!(
            spec, REFERENCE_METRICS,
            "spec/ipamd.md 6.1 lists other metrics than REFERENCE_METRICS"
        ),
        None => eprintln!("spec/ipamd.md not beside the repository: list not cross-checked"),
    }
    let claimed: BTreeSet<&str> = ipamd::serve::metrics::METRIC_NAMES
        .iter()
        .copied()
        .collect();
    let unclaimed: Vec<&&str> = REFERENCE_METRICS
        .iter()
        .filter(|n| !claimed.contains(**n))
        .collect();
    assert!(
        unclaimed.is_empty(),
        "reference metrics ipamd no longer registers (say so in docs/metrics.md and here): {unclaimed:?}"
    );
    for (name, _) in NOT_SERVED {
        assert!(
            REFERENCE_METRICS.contains(name),
            "{name} is not a reference metric"
        );
    }
}

#[test]
fn a_live_ipamd_serves_every_metric_the_dashboard_queries_and_every_reference_family() {
    if skip_netns_test("live ipamd /metrics") {
        return;
    }
    let d = LiveIpamd::start(&[
        // A small warm target: every AddNetwork leaves the pool below it, so ipamd tops up
        // (EC2 AssignPrivateIpAddresses) and records a top-up duration.
        ("WARM_IP_TARGET", "2"),
        ("IP_COOLDOWN_PERIOD", "0"),
        ("VPC_CNI_POOL_TICK", "200ms"),
        // Throttled calls are retried quickly and give up soon.
        ("VPC_CNI_EC2_MAX_ATTEMPTS", "2"),
        ("VPC_CNI_EC2_RETRY_BASE", "10ms"),
    ]);

    // Pods come and go: requests, assignments, pool top-ups through EC2.
    let ids: Vec<String> = (0..6).map(|i| format!("live{i}")).collect();
    add_and_delete(&d, &ids);
    d.wait_moved("awscni_pool_topup_duration_seconds_count");

    // EC2 throttles every call while more pods arrive than the pool holds, until a pool change
    // has failed for good (the throttle, EC2 error, ipamd error and no-address counters move).
    // Then the throttling ends and the pool catches up, so the waiting AddNetwork calls succeed.
    d.admin_put(
        "/v1/faults",
        r#"{"*":{"error_rate":1.0,"error_code":"RequestLimitExceeded"}}"#,
    );
    // More pods than the pool holds (at most 9 addresses on the primary ENI of an m5.large
    // here), so some wait for a top-up that EC2 refuses until the throttling ends.
    let burst: Vec<String> = (0..12).map(|i| format!("burst{i}")).collect();
    let add_during_throttle = std::thread::scope(|s| {
        let adds = s.spawn(|| add_and_delete(&d, &burst));
        d.wait_moved("awscni_no_available_ip_addresses");
        d.wait_moved("awscni_ipamd_error_count");
        d.admin_put("/v1/faults", "{}");
        adds.join()
    });
    if let Err(panic) = add_during_throttle {
        std::panic::resume_unwind(panic);
    }
    let e = d.scrape();

    // 1. Every metric the dashboard queries is a sample of the live scrape.
    let queried = dashboard_metrics();
    assert!(queried.len() >= 15, "parsed {queried:?}");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !e.samples.contains_key(*q) || e.family_of(q).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the live ipamd does not serve: {missing:?}\n--- /metrics ---\n{}",
        e.text
    );

    // 2. What the rate and latency panels read has samples.
    for moved in [
        "awscni_add_ip_req_count",
        "awscni_del_ip_req_count",
        "awscni_ec2_calls_total",
        "awscni_ec2_errors_total",
        "awscni_ec2_throttled_total",
        "awscni_ec2_call_duration_seconds_count",
        "awscni_pool_topup_duration_seconds_count",
        "awscni_pool_decisions_total",
        "awscni_ec2api_req_count",
        "awscni_ec2api_error_count",
        "awscni_aws_api_error_count",
        "awscni_aws_api_latency_ms_count",
        "awscni_ipamd_error_count",
        "awscni_no_available_ip_addresses",
        "awscni_ipamd_startup_duration_seconds_count",
        "awscni_ipamd_node_initialization_duration_seconds_count",
    ] {
        assert!(
            e.sum(moved) > 0.0,
            "{moved} did not move\n--- /metrics ---\n{}",
            e.text
        );
    }
    // Every AddNetwork is counted, the ones retried while the pool was empty included.
    let adds = (ids.len() + burst.len()) as f64;
    assert!(
        e.sum("awscni_add_ip_req_count") >= adds,
        "awscni_add_ip_req_count below the {adds} successful AddNetwork calls"
    );
    assert_eq!(
        e.sum("awscni_del_ip_req_count"),
        adds,
        "one awscni_del_ip_req_count per DelNetwork"
    );

    // 3. Every claimed reference family is served, but the ones listed as not served.
    let not_served: BTreeMap<&str, &str> = NOT_SERVED.iter().copied().collect();
    let absent: Vec<&&str> = REFERENCE_METRICS
        .iter()
        .filter(|n| ipamd::serve::metrics::METRIC_NAMES.contains(n))
        .filter(|n| !not_served.contains_key(**n))
        .filter(|n| !e.has_family(n))
        .collect();
    assert!(
        absent.is_empty(),
        "reference metrics ipamd claims but does not serve: {absent:?}\n--- /metrics ---\n{}",
        e.text
    );
    for (name, why) in NOT_SERVED {
        assert!(
            !e.has_family(name),
            "{name} is served now ({why} no longer holds): remove it from NOT_SERVED and \
             update docs/metrics.md"
        );
    }
    // Ours too (all of METRIC_NAMES that are not reference names).
    let ours_absent: Vec<&&str> = ipamd::serve::metrics::METRIC_NAMES
        .iter()
        .filter(|n| !REFERENCE_METRICS.contains(n))
        .filter(|n| !e.has_family(n))
        .collect();
    assert!(
        ours_absent.is_empty(),
        "our metrics missing from the live scrape: {ours_absent:?}"
    );
}

/// The real entrypoint around the real daemon, as the DaemonSet runs them:
/// `vpc-cni-install run --plugin aws-cni -- ipamd --backend sim`, host directories in a
/// temporary directory (in a test network namespace as root). The entrypoint installs the real
/// `aws-cni`, and the conflist appears only with ipamd SERVING; SIGTERM (twice: the first one
/// only stops ipamd's allocation) is forwarded and the entrypoint exits with ipamd's status 0.
#[test]
fn the_entrypoint_runs_the_real_ipamd_and_installs_the_conflist_once_it_serves() {
    if skip_netns_test("entrypoint around the live ipamd") {
        return;
    }
    let installer = PathBuf::from(env!("CARGO_BIN_EXE_vpc-cni-install"));
    let (ipamd, plugin) = (workspace_bin("ipamd"), workspace_bin("aws-cni"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let (bin_dir, conf_dir, run) = (
        tmp.path().join("opt-cni-bin"),
        tmp.path().join("etc-cni-net.d"),
        tmp.path().join("run"),
    );
    for d in [&bin_dir, &conf_dir, &run] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let socket = run.join("ipamd.sock");
    let log = tmp.path().join("entrypoint.log");
    let mut cmd = Command::new(installer);
    cmd.env_clear()
        .arg("run")
        .arg("--plugin")
        .arg(&plugin)
        .args(["--max-probe-interval-ms", "200", "--"])
        .arg(&ipamd)
        .args(["--backend", "sim"])
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOST_CNI_BIN_PATH", &bin_dir)
        .env("HOST_CNI_CONFDIR_PATH", &conf_dir)
        .env("IPAMD_GRPC_SOCKET", &socket)
        .env("AWS_VPC_K8S_CNI_BACKING_STORE", run.join("ipam.json"))
        .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
        .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
        .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
        .env("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO")
        .env("AWS_VPC_K8S_PLUGIN_LOG_FILE", tmp.path().join("plugin.log"))
        .env("AWS_VPC_ENI_MTU", "1500")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"));
    let ns = node_netns("entry");
    let child = ns
        .run(move || cmd.spawn())
        .expect("enter the test netns")
        .expect("spawn vpc-cni-install");
    // Killed (with ipamd, its child, orphaned then) if an assertion fails before the end.
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let mut child = Reap(child);

    let conflist = conf_dir.join("10-aws.conflist");
    wait_for("10-aws.conflist in the host conf dir", &log, || {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "the entrypoint exited ({status})\n--- stderr ---\n{}",
                read_log(&log)
            );
        }
        conflist.exists().then_some(())
    });
    // Once the conflist is there, ipamd serves (the entrypoint wrote it after SERVING).
    let status = rt()
        .block_on(vpc_cni_rpc::check_health(
            &socket,
            "",
            Duration::from_secs(10),
        ))
        .expect("ipamd health");
    assert_eq!(status, ServingStatus::Serving);
    // The entrypoint's events, logged in the order they happen: the conflist is written after
    // a probe answered SERVING, and no earlier.
    let text = wait_for("the entrypoint's ConflistWritten event", &log, || {
        let text = read_log(&log);
        text.contains("ConflistWritten").then_some(text)
    });
    let serving = text
        .find("Probe(Ok(Serving))")
        .unwrap_or_else(|| panic!("no SERVING probe logged:\n{text}"));
    let written = text.find("ConflistWritten").expect("found above");
    assert!(
        serving < written,
        "the conflist was written before a SERVING probe:\n{text}"
    );
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).expect("read"))
        .expect("the conflist is JSON");
    assert_eq!(conf["plugins"][0]["type"], "aws-cni");
    assert_eq!(conf["plugins"][0]["mtu"], "1500");
    assert_eq!(
        std::fs::read(bin_dir.join("aws-cni")).expect("installed aws-cni"),
        std::fs::read(&plugin).expect("built aws-cni"),
        "the installed plugin is the built one"
    );
    assert!(
        !std::fs::read_dir(&conf_dir)
            .expect("conf dir")
            .any(|e| e.expect("entry").file_name() != "10-aws.conflist"),
        "the conf dir holds only the conflist (no temporary file left)"
    );

    // SIGTERM, twice: ipamd stops allocating on the first and exits on the second.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_for("ipamd's terminating line", &log, || {
        read_log(&log).contains("terminating").then_some(())
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("second SIGTERM");
    let exit = wait_for("the entrypoint to exit", &log, || {
        child.0.try_wait().expect("wait")
    });
    assert_eq!(
        exit.code(),
        Some(0),
        "ipamd's clean exit is the entrypoint's\n--- stderr ---\n{}",
        read_log(&log)
    );
    drop(ns);
}
