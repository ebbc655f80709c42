//! A node boots from the built image (issue 13): the OCI image `scripts/build-image.sh` wrote
//! is unpacked with `umoci`, and the DaemonSet's init container and main container commands
//! run from its root filesystem against a simulated node, the way a container runtime runs
//! them on a `hostNetwork` pod:
//!
//! - each container is a process in the node's network namespace, in a private mount
//!   namespace of its own whose root is the image's tree (`unshare --root`, working directory
//!   the image's), with `/proc`, `/sys` and `/dev` mounted, and every `volumeMount` of the
//!   DaemonSet bound from the node's "host" directory of its `hostPath` volume (a directory of
//!   the test's, `<tmp>/host/<hostPath>`);
//! - its environment is the image's (`config.json` of the unpacked bundle), the ConfigMap's
//!   (`envFrom`), the downward API's (`MY_NODE_NAME`, `MY_POD_NAME`), and what an EKS node
//!   provides differently here: the simulator's EC2 and IMDS endpoints and static credentials.
//!
//! Then, in the order of the manifests' start sequence (spec 4.4):
//!
//! 1. the init step installs the reference plugins of the image's `/init` into the host's CNI
//!    bin dir and sets the sysctls it reports inside the node's namespace (never the root
//!    namespace's: those are read before and after);
//! 2. the main step installs `aws-cni` and `egress-cni` (the image's bytes), starts ipamd on
//!    the simulator, and writes `10-aws.conflist` only once ipamd's health is SERVING (polled
//!    throughout: the file never exists while the daemon is not serving);
//! 3. the readiness/liveness probe command of the DaemonSet, run from the image, passes;
//! 4. a pod is added through the installed plugin chain as kubelet's libcni runs the written
//!    conflist (host paths in it mapped to the node's directories), is reachable from the node,
//!    and ipamd's SNAT rules (made with the image's iptables) are in the node's namespace;
//! 5. the pod is deleted through the chain; its address is released in ipamd's checkpoint;
//! 6. SIGTERM to the container's process: ipamd keeps serving while terminating (the
//!    reference's behaviour), then the entrypoint exits 0; the probe then fails.
//!
//! The image must have been built first (`scripts/build-image.sh`; CI does it before the test
//! command): without it the test fails saying so. Root only (network namespaces); skipped
//! otherwise. Everything lives in namespaces and temporary directories the test creates,
//! removed on drop, also on failure.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use vpc_cni_e2e::node::{health, read_log, wait_until, Checkpoint, START_WAIT, WAIT};
use vpc_cni_e2e::probe::{udp_probe, UdpListener};
use vpc_cni_e2e::process::{output_in, NsProcess};
use vpc_cni_e2e::serve::{serve, SimServer};
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::testing::{skip_netns_test, TestNetns};
use vpc_cni_net::Netns;
use vpc_cni_rpc::ServingStatus;
use vpc_sim::sim::SimConfig;

/// The tag `scripts/build-image.sh` writes (the DaemonSet's image tag).
const TAG: &str = "0.1.0";
/// How long the entrypoint may take to exit after SIGTERM: ipamd keeps serving for its
/// 8 s grace, then stops.
const STOP_WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 7300;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$VPC_CNI_IMAGE_DIR`, else `image/` of the target directory holding this test executable
/// (`target/<profile>/deps/…` → `target/image`), where `scripts/build-image.sh` writes.
fn image_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("VPC_CNI_IMAGE_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("test executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    Ok(dir
        .parent()
        .context("profile dir has no parent")?
        .join("image"))
}

fn yaml(name: &str) -> anyhow::Result<Value> {
    let path = repo().join("manifests").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    serde_yaml::from_str(&text).with_context(|| format!("{}: YAML", path.display()))
}

fn strings(v: &Value, what: &str) -> anyhow::Result<Vec<String>> {
    v.as_array()
        .with_context(|| format!("{what} is not a list"))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .with_context(|| format!("{what}: not a string: {s}"))
        })
        .collect()
}

/// `path` (absolute, as a process in the container sees it) inside `root`, following symlinks
/// as the container would: an absolute link target restarts from `root`, never from `/`.
fn in_root(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(str::to_owned)
        .collect();
    let mut cur = root.to_owned();
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                if cur != root {
                    cur.pop();
                }
                continue;
            }
            _ => {}
        }
        let next = cur.join(&comp);
        match std::fs::read_link(&next) {
            Ok(target) => {
                hops += 1;
                ensure!(hops < 40, "{path}: too many symlinks in the image");
                if target.is_absolute() {
                    cur = root.to_owned();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_string_lossy().into_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Err(_) => cur = next,
        }
    }
    Ok(cur)
}

/// The node's "host": one directory per `hostPath` volume of the DaemonSet, under `base`.
struct HostFs {
    /// Volume name → (hostPath, directory standing in for it).
    volumes: BTreeMap<String, (String, PathBuf)>,
}

impl HostFs {
    fn new(base: &Path, pod: &Value) -> anyhow::Result<HostFs> {
        let mut volumes = BTreeMap::new();
        for v in pod["volumes"].as_array().context("volumes")? {
            let name = v["name"].as_str().context("volume name")?.to_owned();
            let host = &v["hostPath"];
            let path = host["path"]
                .as_str()
                .with_context(|| format!("volume {name}: only hostPath volumes are modelled"))?;
            let dir = base.join(path.trim_start_matches('/'));
            match host["type"].as_str() {
                Some("FileOrCreate") => {
                    std::fs::create_dir_all(dir.parent().context("parent")?)?;
                    std::fs::File::create(&dir)?;
                }
                // The node's provisioning made /opt/cni/bin and /etc/cni/net.d.
                _ => std::fs::create_dir_all(&dir)?,
            }
            volumes.insert(name, (path.to_owned(), dir));
        }
        Ok(HostFs { volumes })
    }

    /// The directory standing in for host path `p` (a path under a volume's hostPath).
    fn map(&self, p: &str) -> Option<PathBuf> {
        self.volumes.values().find_map(|(host, dir)| {
            let rest = p.strip_prefix(host.as_str())?;
            (rest.is_empty() || rest.starts_with('/'))
                .then(|| dir.join(rest.trim_start_matches('/')))
        })
    }

    fn dir(&self, volume: &str) -> anyhow::Result<&Path> {
        Ok(&self
            .volumes
            .get(volume)
            .with_context(|| format!("no volume {volume} in the DaemonSet"))?
            .1)
    }
}

/// One container of the DaemonSet, ready to run from the image's tree.
struct Container {
    name: String,
    root: PathBuf,
    workdir: String,
    env: BTreeMap<String, String>,
    /// (source on the node, mount point inside `root`).
    mounts: Vec<(PathBuf, PathBuf)>,
    /// The container's `command`.
    argv: Vec<String>,
}

impl Container {
    fn new(
        spec: &Value,
        image: &ImageConfig,
        host: &HostFs,
        configmap: &BTreeMap<String, String>,
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Container> {
        let name = spec["name"].as_str().context("container name")?.to_owned();
        let mut env: BTreeMap<String, String> = image.env.clone();
        for from in spec["envFrom"].as_array().into_iter().flatten() {
            ensure!(
                from["configMapRef"]["name"].as_str().is_some(),
                "{name}: only configMapRef envFrom is modelled"
            );
            env.extend(configmap.clone());
        }
        for e in spec["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().context("env name")?.to_owned();
            let value = match (
                e["value"].as_str(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => v.to_owned(),
                (None, Some("spec.nodeName")) => "ip-node.ec2.internal".to_owned(),
                (None, Some("metadata.name")) => "aws-node-boot".to_owned(),
                (None, other) => bail!("{name}: env {key} from {other:?} is not modelled"),
            };
            env.insert(key, value);
        }
        for (k, v) in overrides {
            env.insert((*k).to_owned(), v.clone());
        }
        let mut mounts = Vec::new();
        for m in spec["volumeMounts"].as_array().into_iter().flatten() {
            let volume = m["name"].as_str().context("volumeMount name")?;
            let at = m["mountPath"].as_str().context("mountPath")?;
            let source = host.dir(volume)?.to_owned();
            let target = in_root(&image.root, at)?;
            if source.is_dir() {
                std::fs::create_dir_all(&target)?;
            } else {
                std::fs::create_dir_all(target.parent().context("parent")?)?;
                std::fs::File::create(&target)?;
            }
            mounts.push((source, target));
        }
        Ok(Container {
            name,
            root: image.root.clone(),
            workdir: image.workdir.clone(),
            env,
            mounts,
            argv: strings(&spec["command"], "command")?,
        })
    }

    /// `argv` run in this container: `unshare --mount` (a private mount namespace), the
    /// runtime's mounts, then `unshare --root` into the image's tree.
    fn command(&self, argv: &[String]) -> Command {
        let mut script = String::from("set -e\n");
        script.push_str("root=$1; shift\n");
        script.push_str("mount -t proc proc \"$root/proc\"\n");
        script.push_str("mount -t sysfs sysfs \"$root/sys\"\n");
        script.push_str("mount --bind /dev \"$root/dev\"\n");
        script.push_str("while [ \"$1\" != -- ]; do mount --bind \"$1\" \"$2\"; shift 2; done\n");
        script.push_str("shift\n");
        script.push_str(
            "exec /usr/bin/unshare --root=\"$root\" --wd=\"$WORKDIR_IN_IMAGE\" -- \"$@\"\n",
        );
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(script)
            .arg("container")
            .arg(&self.root);
        for (source, target) in &self.mounts {
            cmd.arg(source).arg(target);
        }
        cmd.arg("--").args(argv);
        // The shell reads its mount helpers from the image's PATH, which is the host's too;
        // `unshare --root` hands the environment to the container's process.
        cmd.env_clear()
            .envs(&self.env)
            .env("WORKDIR_IN_IMAGE", &self.workdir)
            .current_dir("/");
        cmd
    }
}

/// What the unpacked image's `config.json` says the process gets.
struct ImageConfig {
    root: PathBuf,
    env: BTreeMap<String, String>,
    workdir: String,
    args: Vec<String>,
    uid: u64,
}

fn unpack(dir: &Path) -> anyhow::Result<ImageConfig> {
    let oci = image_dir()?.join("oci");
    ensure!(
        oci.join("index.json").is_file(),
        "the image is missing: no OCI layout at {} (build it first: scripts/build-image.sh; \
         CI builds it before the test command)",
        oci.display()
    );
    let bundle = dir.join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{TAG}", oci.display()))
        .arg(&bundle)
        .output()
        .context("umoci (scripts/setup-machine.sh installs it)")?;
    ensure!(
        out.status.success(),
        "umoci unpack {}:{TAG}: {}",
        oci.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)
        .context("config.json")?;
    let process = &config["process"];
    let mut env = BTreeMap::new();
    for e in strings(&process["env"], "process.env")? {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("env entry {e}"))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let root = bundle.join("rootfs");
    // What a runtime provides: mount points for /proc, /sys, /dev.
    for d in ["proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    Ok(ImageConfig {
        root,
        env,
        workdir: process["cwd"].as_str().unwrap_or("/").to_owned(),
        args: strings(&process["args"], "process.args")?,
        uid: process["user"]["uid"].as_u64().unwrap_or(0),
    })
}

/// A sysctl (`net/ipv4/...`) as a process in `ns` reads it (`/proc/sys/net` follows the reader's namespace).
fn sysctl_in(ns: &Netns, key: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new("cat");
    cmd.arg(format!("/proc/sys/{key}"));
    let out = output_in(ns, cmd, None)?;
    ensure!(out.status.success(), "read {key}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn root_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{key}"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn text(out: &Output) -> String {
    format!(
        "status {}; stdout {}; stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the written conflist's plugin chain for one pod as libcni does: each plugin from the
/// host's CNI bin dir with the entry's settings plus `name` and `cniVersion`, the previous
/// result as `prevResult` (ADD forward, DEL in reverse). Host paths in the entries are mapped to
/// the node's directories; `ipamdSocket`, when the conflist leaves it to the plugin's default
/// (`/var/run/aws-node/ipamd.sock` on the host), likewise.
struct Chain {
    conflist: Value,
    bin_dir: PathBuf,
    ns: Netns,
}

impl Chain {
    fn entry(&self, plugin: &Value, host: &HostFs) -> anyhow::Result<Value> {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        let obj = conf.as_object_mut().context("plugin entry")?;
        for v in obj.values_mut() {
            if let Some(mapped) = v.as_str().and_then(|s| host.map(s)) {
                *v = Value::String(mapped.display().to_string());
            }
        }
        if conf["type"] == "aws-cni" && conf.get("ipamdSocket").is_none() {
            let sock = host
                .map("/var/run/aws-node/ipamd.sock")
                .context("no volume for /var/run/aws-node")?;
            conf["ipamdSocket"] = Value::String(sock.display().to_string());
        }
        Ok(conf)
    }

    fn run(&self, command: &str, pod: &str, netns: &Path, conf: &Value) -> anyhow::Result<Output> {
        let ty = conf["type"].as_str().context("plugin type")?;
        let mut cmd = Command::new(self.bin_dir.join(ty));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("c-{pod}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin_dir)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};\
                     K8S_POD_INFRA_CONTAINER_ID=c-{pod};K8S_POD_UID=uid-{pod}"
                ),
            );
        Ok(output_in(&self.ns, cmd, Some(conf.to_string().as_bytes()))?)
    }

    fn plugins(&self) -> anyhow::Result<&Vec<Value>> {
        self.conflist["plugins"]
            .as_array()
            .context("conflist plugins")
    }

    fn add(&self, pod: &str, netns: &Path, host: &HostFs) -> anyhow::Result<Value> {
        let mut prev: Option<Value> = None;
        for p in self.plugins()? {
            let mut conf = self.entry(p, host)?;
            if let Some(prev) = &prev {
                conf["prevResult"] = prev.clone();
            }
            let out = self.run("ADD", pod, netns, &conf)?;
            ensure!(
                out.status.success(),
                "ADD {pod} via {}: {}",
                conf["type"],
                text(&out)
            );
            prev = Some(serde_json::from_slice(&out.stdout).with_context(|| {
                format!("ADD {pod} via {}: result: {}", conf["type"], text(&out))
            })?);
        }
        prev.context("empty plugin chain")
    }

    fn del(&self, pod: &str, netns: &Path, prev: &Value, host: &HostFs) -> anyhow::Result<()> {
        for p in self.plugins()?.iter().rev() {
            let mut conf = self.entry(p, host)?;
            conf["prevResult"] = prev.clone();
            let out = self.run("DEL", pod, netns, &conf)?;
            ensure!(
                out.status.success(),
                "DEL {pod} via {}: {}",
                conf["type"],
                text(&out)
            );
        }
        Ok(())
    }
}

/// Everything a failure message wants: the entrypoint's output and ipamd's log file.
fn evidence(main_out: &Path, host: &HostFs) -> String {
    let ipamd_log = host
        .map("/var/log/aws-routed-eni/ipamd.log")
        .map(|p| read_log(&p))
        .unwrap_or_default();
    let tail: Vec<&str> = ipamd_log.lines().collect();
    format!(
        "--- container output ---\n{}\n--- ipamd.log (tail) ---\n{}",
        read_log(main_out),
        tail[tail.len().saturating_sub(60)..].join("\n")
    )
}

#[test]
fn a_node_boots_from_the_built_image() -> anyhow::Result<()> {
    if skip_netns_test("image boot (init + aws-node from the built image)") {
        return Ok(());
    }
    let tmp = tempfile::Builder::new()
        .prefix("vcn-image-boot-")
        .tempdir()?;
    let image = unpack(tmp.path())?;
    let ds = yaml("daemonset.yaml")?;
    let pod = &ds["spec"]["template"]["spec"];
    let configmap: BTreeMap<String, String> = yaml("configmap.yaml")?["data"]
        .as_object()
        .context("ConfigMap data")?
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_str().context("ConfigMap value")?.to_owned())))
        .collect::<anyhow::Result<_>>()?;
    let init_spec = &pod["initContainers"][0];
    let main_spec = &pod["containers"][0];
    // The image's own default process is the daemon container's command, as root.
    ensure!(
        image.args == strings(&main_spec["command"], "command")?,
        "the image's entrypoint+cmd {:?} is not the DaemonSet's command",
        image.args
    );
    ensure!(image.uid == 0, "the image runs as uid {}", image.uid);
    ensure!(image.env.contains_key("PATH"), "the image sets no PATH");

    // The simulated node and its "host" directories.
    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.7.0.0/16")?;
    let subnet = c.create_subnet(&vpc, "10.7.0.0/20")?;
    let node = c.run_instance(&subnet, "m5.large")?;
    let ns = node.netns()?;
    let server: SimServer = serve(&c.fabric, c.sim.clone())?;
    let host = HostFs::new(&tmp.path().join("host"), pod)?;
    let sim_env = [
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            server.imds_url(&node.instance_id),
        ),
        ("AWS_EC2_ENDPOINT", server.ec2_url()),
        ("AWS_ENDPOINT_URL_EC2", server.ec2_url()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
    ];

    // 1. The init container.
    let init = Container::new(init_spec, &image, &host, &configmap, &sim_env[..1])?;
    let root_before: Vec<(String, Option<String>)> = [
        "net/ipv4/tcp_early_demux",
        "net/ipv4/conf/all/rp_filter",
        "net/ipv4/conf/eth0/rp_filter",
    ]
    .iter()
    .map(|k| ((*k).to_owned(), root_sysctl(k)))
    .collect();
    let out = output_in(&ns, init.command(&init.argv), None)?;
    ensure!(out.status.success(), "{} failed: {}", init.name, text(&out));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let bin_dir = host.dir("cni-bin-dir")?.to_owned();
    let image_init = in_root(&image.root, "/init")?;
    let mut installed = 0;
    for e in std::fs::read_dir(&image_init)? {
        let e = e?;
        let name = e.file_name();
        let on_host = std::fs::read(bin_dir.join(&name))
            .with_context(|| format!("init did not install {name:?}:\n{log}"))?;
        ensure!(
            on_host == std::fs::read(e.path())?,
            "{name:?} differs from the image's"
        );
        installed += 1;
    }
    for p in ["loopback", "portmap", "host-local"] {
        ensure!(
            bin_dir.join(p).is_file(),
            "{p} is not in the host's CNI bin dir"
        );
    }
    ensure!(
        installed >= 5,
        "only {installed} plugins in the image's /init"
    );
    let mut set = 0;
    for line in log.lines() {
        let Some((key, value)) = line
            .strip_prefix("vpc-cni-install: ")
            .and_then(|l| l.split_once(" = "))
        else {
            continue;
        };
        let key = key.trim_start_matches("/proc/sys/");
        let got = sysctl_in(&ns, key)?;
        ensure!(
            got == value.trim(),
            "{key} is {got} in the node, init said {value}"
        );
        set += 1;
    }
    ensure!(set >= 2, "init reported {set} sysctls:\n{log}");
    ensure!(
        sysctl_in(&ns, "net/ipv4/conf/eth0/rp_filter")? == "2",
        "rp_filter of the primary interface (eth0, MAC {}) is not 2:\n{log}",
        node.primary_mac
    );
    for (key, before) in &root_before {
        ensure!(
            root_sysctl(key) == *before,
            "the root namespace's {key} changed ({before:?} -> {:?})",
            root_sysctl(key)
        );
    }

    // 2. The main container: the conflist appears only once ipamd serves.
    let main = Container::new(main_spec, &image, &host, &configmap, &sim_env)?;
    let conflist_path = host.dir("cni-net-dir")?.join("10-aws.conflist");
    let socket = host
        .map(&main.env["IPAMD_GRPC_SOCKET"])
        .context("the gRPC socket is not on a host volume")?;
    let main_out = tmp.path().join("aws-node.out");
    let mut cmd = main.command(&main.argv);
    let out_file = std::fs::File::create(&main_out)?;
    cmd.stdin(Stdio::null())
        .stdout(out_file.try_clone()?)
        .stderr(out_file);
    let mut aws_node = NsProcess::spawn(&ns, cmd)?;
    let started = Instant::now();
    let mut polls_without_conflist = 0;
    let waited = wait_until("10-aws.conflist", START_WAIT, || {
        if let Some(status) = aws_node.try_wait()? {
            bail!("the aws-node container exited ({status})");
        }
        let written = conflist_path.exists();
        let serving = matches!(
            health(&socket, Duration::from_secs(2)),
            Ok(ServingStatus::Serving)
        );
        ensure!(
            !written || serving,
            "10-aws.conflist exists while ipamd is not SERVING"
        );
        if !written {
            polls_without_conflist += 1;
        }
        Ok(written)
    });
    waited.with_context(|| evidence(&main_out, &host))?;
    ensure!(
        polls_without_conflist > 0,
        "the conflist was there before the first poll"
    );
    eprintln!(
        "image boot: conflist written {:?} after start",
        started.elapsed()
    );
    for p in ["aws-cni", "egress-cni"] {
        let ours = std::fs::read(in_root(&image.root, &format!("/app/{p}"))?)?;
        ensure!(
            std::fs::read(bin_dir.join(p)).ok() == Some(ours),
            "{p} in the host's CNI bin dir is not the image's"
        );
    }
    let conflist: Value = serde_json::from_slice(&std::fs::read(&conflist_path)?)?;
    ensure!(conflist["plugins"][0]["type"] == "aws-cni", "{conflist}");
    ensure!(
        conflist["plugins"][0]["vethPrefix"] == configmap["AWS_VPC_K8S_CNI_VETHPREFIX"].as_str(),
        "{conflist}"
    );

    // 3. The probes of the DaemonSet, run from the image.
    for probe in ["readinessProbe", "livenessProbe"] {
        let argv = strings(&main_spec[probe]["exec"]["command"], probe)?;
        let out = output_in(&ns, main.command(&argv), None)?;
        ensure!(
            out.status.success(),
            "{probe} fails while serving: {}",
            text(&out)
        );
    }

    // 4. A pod through the installed plugin chain.
    let chain = Chain {
        conflist,
        bin_dir: bin_dir.clone(),
        ns: ns.try_clone()?,
    };
    let pod_ns = TestNetns::new("pod")?;
    let result = chain
        .add("boot-0", pod_ns.path(), &host)
        .with_context(|| evidence(&main_out, &host))?;
    let addr = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no address in {result}"))?;
    let ip: Ipv4Addr = addr.split('/').next().unwrap_or_default().parse()?;
    ensure!(
        node.subnet.contains(u32::from(ip)),
        "{ip} not in {}",
        node.subnet
    );
    let listener = UdpListener::start(&pod_ns, SocketAddrV4::new(ip, PORT))?;
    udp_probe(&ns, None, SocketAddrV4::new(ip, PORT), WAIT)?.seen_as("node → pod")?;
    drop(listener);
    let checkpoint = host
        .map(&main.env["AWS_VPC_K8S_CNI_BACKING_STORE"])
        .context("the checkpoint is not on a host volume")?;
    let held = Checkpoint::read(&checkpoint)?;
    ensure!(
        held.allocations
            .iter()
            .any(|a| a.container_id == "c-boot-0"),
        "the checkpoint does not hold the pod: {held:?}"
    );
    let mut save = Command::new("iptables-save");
    save.args(["-t", "nat"]);
    let nat = output_in(&ns, save, None)?;
    ensure!(
        String::from_utf8_lossy(&nat.stdout).contains("AWS-SNAT-CHAIN-0"),
        "no SNAT chain in the node's nat table: {}",
        text(&nat)
    );

    // 5. DEL through the chain.
    chain.del("boot-0", pod_ns.path(), &result, &host)?;
    let held = Checkpoint::read(&checkpoint)?;
    ensure!(
        !held
            .allocations
            .iter()
            .any(|a| a.container_id == "c-boot-0"),
        "the pod is still in the checkpoint after DEL: {held:?}"
    );

    // 6. SIGTERM, as the runtime sends it to the container's process.
    let pid = Pid::from_raw(i32::try_from(aws_node.pid())?);
    let term = Instant::now();
    kill(pid, Signal::SIGTERM).context("SIGTERM")?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        aws_node.try_wait()?.is_none(),
        "the container exited at once on SIGTERM:\n{}",
        evidence(&main_out, &host)
    );
    ensure!(
        matches!(
            health(&socket, Duration::from_secs(2)),
            Ok(ServingStatus::Serving)
        ),
        "ipamd stopped serving at once on SIGTERM"
    );
    let status = aws_node
        .wait_exit(STOP_WAIT)
        .with_context(|| evidence(&main_out, &host))?;
    let took = term.elapsed();
    ensure!(
        status.success(),
        "the container exited with {status} after SIGTERM:\n{}",
        evidence(&main_out, &host)
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    eprintln!(
        "image boot: exited 0 {took:?} after SIGTERM (the pod's terminationGracePeriodSeconds: {grace})"
    );
    let argv = strings(&main_spec["readinessProbe"]["exec"]["command"], "probe")?;
    let out = output_in(&ns, main.command(&argv), None)?;
    ensure!(!out.status.success(), "the probe passes with ipamd gone");
    drop(server);
    Ok(())
}
