//! The real daemon and the real plugin on one simulated node: `ipamd --backend aws` runs in the
//! node namespace against the simulator served in the fabric (EC2 + IMDS over HTTP), and the
//! `aws-cni` binary wires pods in their own namespaces. Root only; skipped otherwise.
//!
//! The binaries are the workspace's (`target/<profile>/ipamd` and `aws-cni`), built by
//! `cargo test --workspace` / `cargo nextest run --workspace` before tests run.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vpc_cni_e2e::probe::{udp_probe, UdpListener};
use vpc_cni_e2e::process::{output_in, NsProcess};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::netns::list_named;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;
use vpc_cni_rpc::ServingStatus;
use vpc_sim::sim::SimConfig;

/// Generous on a busy 2-core machine; a healthy node answers in milliseconds.
const WAIT: Duration = Duration::from_secs(20);
/// ipamd start-up: IMDS, EC2 describes, the first pool fill.
const START_WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 7100;
const PODS: usize = 5;

/// ipamd's gRPC health, from a runtime of its own: dropping it closes the connection, so no
/// idle client of the test holds ipamd's graceful gRPC shutdown open.
fn health(socket: &Path, timeout: Duration) -> Result<ServingStatus, vpc_cni_rpc::ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(vpc_cni_rpc::check_health(socket, "", timeout))
}

/// `target/<profile>/<name>`, next to the `deps/` directory holding this test executable.
fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("test executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let bin = dir.join(name);
    ensure!(
        bin.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`, or run the tests \
         with `cargo test --workspace` / `cargo nextest run --workspace`)",
        bin.display()
    );
    Ok(bin)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// Addresses ipamd says are assigned to pods: `AssignedIPs` summed over the cards of its
/// introspection `GET /v1/enis` (address from its "ready" line), fetched from inside `ns`.
fn ipamd_assigned(ns: &Netns, log: &Path) -> anyhow::Result<i64> {
    let text = read_log(log);
    let addr: std::net::SocketAddr = text
        .split("introspection Some(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .with_context(|| format!("introspection address in ipamd's ready line:\n{text}"))?
        .parse()?;
    let mut stream = ns.run(move || std::net::TcpStream::connect_timeout(&addr, WAIT))??;
    stream.set_read_timeout(Some(WAIT))?;
    use std::io::{Read, Write};
    stream.write_all(b"GET /v1/enis HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    ensure!(reply.starts_with("HTTP/1."), "introspection reply: {reply}");
    ensure!(reply.contains(" 200 "), "introspection reply: {reply}");
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .context("introspection body")?;
    let cards: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("introspection body: {body}"))?;
    let cards = cards
        .as_object()
        .context("introspection: an object per card")?;
    ensure!(!cards.is_empty(), "introspection: no card");
    cards
        .values()
        .map(|c| c["AssignedIPs"].as_i64().context("AssignedIPs"))
        .sum()
}

/// Polls `f` until it returns true or `wait` passes.
fn wait_until(
    what: &str,
    wait: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {wait:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The plugin, run once in the node namespace.
struct Plugin<'a> {
    bin: PathBuf,
    node_ns: &'a Netns,
    socket: PathBuf,
}

impl Plugin<'_> {
    fn run(
        &self,
        command: &str,
        pod: &str,
        netns: &Path,
        prev: Option<&serde_json::Value>,
    ) -> anyhow::Result<Output> {
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "aws-cni",
            "type": "aws-cni",
            "vethPrefix": "eni",
            "mtu": "9001",
            "pluginLogFile": "stderr",
            "pluginLogLevel": "Debug",
            "ipamdSocket": self.socket,
            "poolWaitSeconds": 30,
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("c-{pod}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.bin.parent().context("plugin directory")?)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};\
                     K8S_POD_INFRA_CONTAINER_ID=c-{pod};K8S_POD_UID=uid-{pod}"
                ),
            );
        let out = output_in(self.node_ns, cmd, Some(conf.to_string().as_bytes()))?;
        Ok(out)
    }

    /// ADD; returns the result document and the pod's IPv4 address.
    fn add(&self, pod: &str, netns: &Path) -> anyhow::Result<(serde_json::Value, Ipv4Addr)> {
        let out = self.run("ADD", pod, netns, None)?;
        ensure!(
            out.status.success(),
            "ADD {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("ADD {pod} result: {}", String::from_utf8_lossy(&out.stdout))
        })?;
        let ips = result["ips"].as_array().context("result has no ips")?;
        ensure!(ips.len() == 1, "ADD {pod}: one address expected: {result}");
        let addr = ips[0]["address"].as_str().context("ips[0].address")?;
        let (ip, len) = addr.split_once('/').context("address without a length")?;
        ensure!(len == "32", "ADD {pod}: a /32 expected, got {addr}");
        Ok((result.clone(), ip.parse()?))
    }

    fn del(&self, pod: &str, netns: &Path, prev: &serde_json::Value) -> anyhow::Result<()> {
        let out = self.run("DEL", pod, netns, Some(prev))?;
        ensure!(
            out.status.success() && out.stdout.is_empty(),
            "DEL {pod} failed ({}): stdout {} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// `ip` in the node namespace, stdout as text.
fn ip_in(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = output_in(ns, cmd, None)?;
    ensure!(out.status.success(), "ip {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn ipamd_and_plugin_on_a_simulated_node() -> anyhow::Result<()> {
    if skip_netns_test("node e2e (ipamd + aws-cni)") {
        return Ok(());
    }
    let ipamd_bin = workspace_bin("ipamd")?;
    let cni_bin = workspace_bin("aws-cni")?;
    let tmp = tempfile::Builder::new().prefix("vcn-node-e2e-").tempdir()?;
    let socket = tmp.path().join("ipamd.sock");
    let ipamd_log = tmp.path().join("ipamd.log");

    // 1. A VPC, one subnet, the node under test and a second node for cross-node traffic.
    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.3.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.3.0.0/20")?;
    let node = c.run_instance(&s, "m5.large")?;
    let other = c.run_instance(&s, "m5.large")?;
    let subnet_cidr = node.subnet;
    let ns = node.netns()?;
    let other_ns = other.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;

    // 2. ipamd in the node namespace, talking to the served simulator.
    let mut cmd = Command::new(&ipamd_bin);
    cmd.env_clear()
        .arg("--backend")
        .arg("aws")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AWS_EC2_ENDPOINT", server.ec2_url())
        .env("AWS_ENDPOINT_URL_EC2", server.ec2_url())
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            server.imds_url(&node.instance_id),
        )
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env("IPAMD_GRPC_SOCKET", &socket)
        .env(
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            tmp.path().join("ipam.json"),
        )
        .env("METRICS_BIND_ADDRESS", "127.0.0.1:0")
        .env("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:0")
        .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
        .env("VPC_CNI_POOL_TICK", "500ms")
        .env("IP_COOLDOWN_PERIOD", "0")
        .stdin(Stdio::null())
        .stdout(File::create(tmp.path().join("ipamd.out"))?)
        .stderr(File::create(&ipamd_log)?);
    let mut ipamd = NsProcess::spawn(&ns, cmd)?;

    let started = wait_until("ipamd health SERVING", START_WAIT, || {
        if let Some(status) = ipamd.try_wait()? {
            bail!("ipamd exited early ({status})");
        }
        let health = health(&socket, Duration::from_secs(2));
        Ok(matches!(health, Ok(ServingStatus::Serving)))
    });
    if let Err(e) = started {
        bail!("{e}\n--- ipamd stderr ---\n{}", read_log(&ipamd_log));
    }

    // 3. ADD for every pod, each in its own namespace.
    let plugin = Plugin {
        bin: cni_bin,
        node_ns: &ns,
        socket: socket.clone(),
    };
    let mut pods = Vec::new();
    for i in 0..PODS {
        let name = format!("pod-{i}");
        let pod_ns = TestNetns::new("pod")?;
        let (result, ip) = plugin
            .add(&name, pod_ns.path())
            .with_context(|| format!("--- ipamd stderr ---\n{}", read_log(&ipamd_log)))?;
        pods.push((name, pod_ns, result, ip));
    }
    let addrs: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.3).collect();
    ensure!(addrs.len() == PODS, "pod addresses are distinct: {addrs:?}");
    let node_enis: Vec<_> = c
        .fabric
        .enis()
        .into_iter()
        .filter(|e| e.instance_id == node.instance_id)
        .collect();
    for &ip in &addrs {
        ensure!(
            subnet_cidr.contains(u32::from(ip)),
            "{ip} is inside the subnet {subnet_cidr}"
        );
        ensure!(
            ip != node.primary_ip,
            "a pod never gets the node's primary address"
        );
        ensure!(
            node_enis.iter().any(|e| e.ipv4.contains(&ip)),
            "{ip} is assigned to one of the node's ENIs in the simulator: {node_enis:?}"
        );
    }
    c.check_hooks()?;
    let assigned = ipamd_assigned(&ns, &ipamd_log)?;
    ensure!(
        assigned == PODS as i64,
        "ipamd's introspection counts {assigned} assigned addresses, {PODS} expected"
    );

    // 4. Node → pod and other node → pod, sources preserved.
    for (name, pod_ns, _, ip) in &pods {
        let listener = UdpListener::start(pod_ns, SocketAddrV4::new(*ip, PORT))?;
        let seen = udp_probe(&ns, None, SocketAddrV4::new(*ip, PORT), WAIT)?
            .seen_as(&format!("node → {name} ({ip})"))?;
        ensure!(
            seen.ip() != IpAddr::V4(*ip),
            "the node reaches {name} from its own side, saw {seen}"
        );
        let seen = udp_probe(
            &other_ns,
            Some(other.primary_ip),
            SocketAddrV4::new(*ip, PORT),
            WAIT,
        )?
        .seen_as(&format!("other node → {name} ({ip})"))?;
        ensure!(
            seen.ip() == IpAddr::V4(other.primary_ip),
            "{name} sees the other node as itself ({}), saw {seen}",
            other.primary_ip
        );
        drop(listener);
    }

    // 5. DEL every pod; nothing of theirs is left in the node namespace.
    for (name, pod_ns, result, _) in &pods {
        plugin.del(name, pod_ns.path(), result)?;
    }
    let routes = ip_in(&ns, &["-4", "route", "show", "table", "all"])?;
    let rules = ip_in(&ns, &["-4", "rule", "show"])?;
    for ip in &addrs {
        let needle = format!("{ip} ");
        ensure!(
            !routes.contains(&needle),
            "host route for {ip} left after DEL:\n{routes}"
        );
        ensure!(
            !rules.contains(&format!("{ip}")),
            "rule for {ip} left after DEL:\n{rules}"
        );
    }
    let assigned = ipamd_assigned(&ns, &ipamd_log)?;
    ensure!(
        assigned == 0,
        "ipamd still counts {assigned} assigned addresses after every DEL"
    );
    // The runtime deletes the pod namespaces; their veths go with them.
    let pod_names: Vec<String> = pods.iter().map(|p| p.1.name().to_owned()).collect();
    drop(pods);
    wait_until("pod veths gone from the node", WAIT, || {
        Ok(!ip_in(&ns, &["-o", "link", "show"])?.contains(" eni"))
    })?;

    // The released addresses are free again in ipamd (cooldown 0): as many new pods as before
    // get addresses.
    let mut again = Vec::new();
    for i in 0..PODS {
        let name = format!("again-{i}");
        let pod_ns = TestNetns::new("pod")?;
        let (result, ip) = plugin
            .add(&name, pod_ns.path())
            .with_context(|| format!("--- ipamd stderr ---\n{}", read_log(&ipamd_log)))?;
        ensure!(
            subnet_cidr.contains(u32::from(ip)),
            "{ip} is a subnet address"
        );
        again.push((name, pod_ns, result));
    }
    for (name, pod_ns, result) in &again {
        plugin.del(name, pod_ns.path(), result)?;
    }
    drop(again);

    // SIGTERM (ipamd/src/main.rs): the first one stops allocation and keeps serving, a second
    // one stops the process cleanly.
    let sigterm = |what: &str| -> anyhow::Result<()> {
        let pid = i32::try_from(ipamd.pid())?;
        kill(Pid::from_raw(pid), Signal::SIGTERM).with_context(|| format!("{what} SIGTERM"))?;
        Ok(())
    };
    sigterm("first")?;
    let terminating = wait_until("ipamd to log that it is terminating", WAIT, || {
        Ok(read_log(&ipamd_log).contains("terminating:"))
    });
    if let Err(e) = terminating {
        bail!("{e}\n--- ipamd stderr ---\n{}", read_log(&ipamd_log));
    }
    let health = health(&socket, WAIT);
    ensure!(
        matches!(health, Ok(ServingStatus::Serving)),
        "ipamd keeps serving after the first SIGTERM: {health:?}"
    );
    sigterm("second")?;
    let exited = ipamd.wait_exit(WAIT);
    let status = match exited {
        Ok(s) => s,
        Err(e) => bail!(
            "{e}: ipamd did not exit after a second SIGTERM\n--- ipamd stderr ---\n{}",
            read_log(&ipamd_log)
        ),
    };
    ensure!(
        status.success(),
        "ipamd exits cleanly on SIGTERM ({status})\n--- ipamd stderr ---\n{}",
        read_log(&ipamd_log)
    );
    drop(server);
    c.check_hooks()?;
    drop(c);

    let left: Vec<String> = list_named()?
        .into_iter()
        .filter(|n| {
            pod_names.contains(n) || n.starts_with(&format!("vcn-node-{}-", std::process::id()))
        })
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}
