//! The container image (`manifests/image/Dockerfile`) and the DaemonSet agree. CI has no
//! container engine, so this is a text-level check of the Dockerfile, not a build: it does not
//! prove the image builds or runs. What it checks:
//!
//! - every `/app/...` program the DaemonSet's containers and probes run is copied into `/app/`
//!   by the Dockerfile, and is built there as a `--bin` of the workspace package that really
//!   has that binary target;
//! - the plugin source directory of the init step (`init --src-dir`) is where the Dockerfile
//!   puts the reference plugins, and it holds every plugin a rendered conflist chains
//!   (`portmap`, `bandwidth`, `tuning`), plus `loopback` and `host-local`;
//! - the conflist template copied into the image is the one built into `vpc-cni-install`;
//! - the image's default command is the daemon container's command;
//! - the runtime stage installs `iptables` and `nftables` (the daemon's SNAT/connmark rules);
//! - the image name in the build instructions is the DaemonSet's;
//! - the build context ignore file keeps `target/` out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vpc_cni_installer::settings::Settings;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Dockerfile instructions (continuation lines joined, comments dropped).
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("manifests/image/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_owned());
                }
                current.clear();
            }
        }
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

fn daemonset() -> Value {
    serde_yaml::from_str(&read("manifests/daemonset.yaml")).expect("YAML")
}

/// Every command line the DaemonSet runs: init, daemon, probes.
fn daemonset_commands() -> Vec<Vec<String>> {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let mut out = vec![strings(&pod["initContainers"][0]["command"])];
    let main = &pod["containers"][0];
    out.push(strings(&main["command"]));
    for probe in ["livenessProbe", "readinessProbe"] {
        out.push(strings(&main[probe]["exec"]["command"]));
    }
    out
}

/// `(package, binary)` of every `cargo build ... -p P --bin B` in the Dockerfile.
fn built_binaries(run: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in run {
        for build in r.split("cargo build").skip(1) {
            let words: Vec<&str> = build.split_whitespace().collect();
            let after = |flag: &str| {
                words
                    .iter()
                    .position(|w| *w == flag)
                    .and_then(|i| words.get(i + 1))
                    .map(|w| (*w).to_owned())
            };
            if let (Some(p), Some(b)) = (after("-p"), after("--bin")) {
                out.push((p, b));
            }
        }
    }
    out
}

/// Binary target names of the workspace member whose package is `package`.
fn bin_targets(package: &str) -> Option<BTreeSet<String>> {
    let root: toml_like::Doc = toml_like::Doc::parse(&read("Cargo.toml"));
    for member in root.array("members") {
        let manifest = read(&format!("{member}/Cargo.toml"));
        let doc = toml_like::Doc::parse(&manifest);
        if doc.package_name() == Some(package) {
            return Some(doc.bin_names().into_iter().collect());
        }
    }
    None
}

/// Just enough TOML reading for Cargo manifests written as this workspace writes them.
mod toml_like {
    pub struct Doc {
        lines: Vec<String>,
    }

    impl Doc {
        pub fn parse(text: &str) -> Doc {
            Doc {
                lines: text.lines().map(|l| l.trim().to_owned()).collect(),
            }
        }

        fn value(line: &str, key: &str) -> Option<String> {
            let rest = line.strip_prefix(key)?.trim_start().strip_prefix('=')?;
            Some(rest.trim().trim_matches('"').to_owned())
        }

        /// `key = ["a", "b"]` on one line.
        pub fn array(&self, key: &str) -> Vec<String> {
            self.lines
                .iter()
                .find_map(|l| Self::value(l, key))
                .map(|v| {
                    v.trim_matches(|c| c == '[' || c == ']')
                        .split(',')
                        .map(|s| s.trim().trim_matches('"').to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        }

        /// `name` of the `[package]` table.
        pub fn package_name(&self) -> Option<&str> {
            let mut in_package = false;
            for l in &self.lines {
                if l.starts_with('[') {
                    in_package = l == "[package]";
                } else if in_package {
                    if let Some(rest) = l.strip_prefix("name") {
                        let v = rest.trim_start().strip_prefix('=')?;
                        return Some(v.trim().trim_matches('"'));
                    }
                }
            }
            None
        }

        /// `name` of every `[[bin]]` table.
        pub fn bin_names(&self) -> Vec<String> {
            let mut out = Vec::new();
            let mut in_bin = false;
            for l in &self.lines {
                if l.starts_with('[') {
                    in_bin = l == "[[bin]]";
                } else if in_bin {
                    if let Some(v) = Self::value(l, "name") {
                        out.push(v);
                        in_bin = false;
                    }
                }
            }
            out
        }
    }
}

/// Files the runtime stage puts in `dir` (`COPY ... <dir>/` and `cp ... <dir>/`), by name.
fn files_in(instr: &[String], dir: &str) -> BTreeSet<String> {
    let runtime = runtime_stage(instr);
    let mut out = BTreeSet::new();
    for i in runtime {
        let words: Vec<&str> = if let Some(rest) = i.strip_prefix("COPY ") {
            rest.split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect()
        } else if let Some(rest) = i.strip_prefix("RUN ") {
            // Each `cp a b ... <dir>/` of a RUN.
            for part in rest.split("&&") {
                if let Some(cp) = part.trim().strip_prefix("cp ") {
                    let args: Vec<&str> = cp.split_whitespace().collect();
                    if let Some((dest, sources)) = args.split_last() {
                        if *dest == format!("{dir}/") {
                            out.extend(sources.iter().map(|a| file_name(a)));
                        }
                    }
                }
            }
            continue;
        } else {
            continue;
        };
        let Some((dest, sources)) = words.split_last() else {
            continue;
        };
        if *dest == format!("{dir}/") {
            out.extend(sources.iter().map(|s| file_name(s)));
        } else if let Some(name) = dest.strip_prefix(&format!("{dir}/")) {
            out.insert(name.to_owned());
        }
    }
    out
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Instructions after the last `FROM`.
fn runtime_stage(instr: &[String]) -> &[String] {
    let last_from = instr
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("a FROM");
    &instr[last_from..]
}

fn exec_form(instr: &[String], keyword: &str) -> Vec<String> {
    let line = runtime_stage(instr)
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix(&format!("{keyword} ")))
        .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{keyword} is not exec form: {e}"))
}

#[test]
fn every_program_the_daemonset_runs_is_built_and_copied_into_the_image() {
    let instr = instructions();
    let app = files_in(&instr, "/app");
    let runs: Vec<String> = instr
        .iter()
        .filter_map(|i| i.strip_prefix("RUN ").map(str::to_owned))
        .collect();
    let built = built_binaries(&runs);
    assert!(built.len() >= 3, "cargo builds found: {built:?}");
    for (package, bin) in &built {
        let bins = bin_targets(package)
            .unwrap_or_else(|| panic!("the Dockerfile builds package {package}, not a member"));
        assert!(
            bins.contains(bin),
            "package {package} has no binary {bin} (it has {bins:?})"
        );
    }
    let built_names: BTreeSet<&str> = built.iter().map(|(_, b)| b.as_str()).collect();
    let mut programs = BTreeSet::new();
    for cmd in daemonset_commands() {
        for word in cmd.iter().filter(|w| w.starts_with("/app/")) {
            programs.insert(word.clone());
        }
    }
    for p in ["/app/vpc-cni-install", "/app/ipamd", "/app/aws-cni"] {
        assert!(programs.contains(p), "the DaemonSet no longer runs {p}?");
    }
    for program in &programs {
        let name = program.trim_start_matches("/app/");
        assert!(
            app.contains(name),
            "the DaemonSet runs {program}; the Dockerfile copies into /app/ only {app:?}"
        );
        assert!(
            built_names.contains(name),
            "{program} is not built by the Dockerfile ({built_names:?})"
        );
    }
    // Build outputs are release binaries of the lock file.
    for r in &runs {
        for build in r.split("cargo build").skip(1) {
            let flags: String = build.split("&&").next().unwrap_or("").to_owned();
            assert!(
                flags.contains("--release") && flags.contains("--locked"),
                "cargo build without --release --locked: {flags}"
            );
        }
    }
}

#[test]
fn the_init_step_finds_every_plugin_a_conflist_chains() {
    let instr = instructions();
    let ds = daemonset();
    let init = strings(&ds["spec"]["template"]["spec"]["initContainers"][0]["command"]);
    let src = init
        .iter()
        .position(|w| w == "--src-dir")
        .and_then(|i| init.get(i + 1))
        .expect("init --src-dir")
        .clone();
    let plugins = files_in(&instr, &src);
    // Every chained plugin type of the fullest conflist the entrypoint renders.
    let settings = Settings::for_test(&[
        ("ENABLE_BANDWIDTH_PLUGIN", "true"),
        ("DISABLE_POD_V6", "true"),
    ])
    .expect("settings");
    let rendered =
        vpc_cni_installer::conflist::render(vpc_cni_installer::conflist::TEMPLATE, &settings)
            .expect("render");
    let v: Value = serde_json::from_str(&rendered).expect("conflist JSON");
    let types: Vec<String> = v["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().expect("type").to_owned())
        .collect();
    assert_eq!(types[0], "aws-cni");
    assert!(types.len() >= 4, "{types:?}");
    // aws-cni and egress-cni are the daemon container's to install (spec 4.4), not the init
    // step's; everything else chained, and host-local (egress-cni's IPAM), comes from init.
    for t in types[1..]
        .iter()
        .map(String::as_str)
        .filter(|t| *t != "egress-cni")
        .chain(["loopback", "host-local"])
    {
        assert!(
            plugins.contains(t),
            "{t} is not in the image's {src}/ ({plugins:?})"
        );
    }
}

#[test]
fn the_image_carries_the_built_in_conflist_template_and_runs_the_daemon_by_default() {
    let instr = instructions();
    let copy = runtime_stage(&instr)
        .iter()
        .find(|i| i.starts_with("COPY ") && i.contains("10-aws.conflist"))
        .expect("COPY of the conflist template");
    let source = copy
        .split_whitespace()
        .nth(1)
        .expect("COPY source")
        .to_owned();
    assert_eq!(
        read(&source),
        vpc_cni_installer::conflist::TEMPLATE,
        "{source} is not the template built into vpc-cni-install"
    );
    assert!(files_in(&instr, "/app").contains("10-aws.conflist"));

    let ds = daemonset();
    let main = strings(&ds["spec"]["template"]["spec"]["containers"][0]["command"]);
    let mut default = exec_form(&instr, "ENTRYPOINT");
    default.extend(exec_form(&instr, "CMD"));
    assert_eq!(
        default, main,
        "the image's ENTRYPOINT + CMD differ from the daemon container's command"
    );
}

#[test]
fn the_runtime_has_the_rule_tools_and_the_build_context_skips_target() {
    let instr = instructions();
    let installs: String = runtime_stage(&instr)
        .iter()
        .filter(|i| i.contains("apt-get install"))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    for tool in ["iptables", "nftables", "ca-certificates"] {
        assert!(
            installs.split_whitespace().any(|w| w == tool),
            "the runtime stage does not install {tool}"
        );
    }
    let ds = daemonset();
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("image")
        .to_owned();
    let text = read("manifests/image/Dockerfile");
    assert!(
        text.contains(&format!("-t {image} ")),
        "the build instructions do not tag the DaemonSet's image {image}"
    );
    let ignore = read("manifests/image/Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}
