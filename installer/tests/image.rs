//! The container image's two recipes and the DaemonSet agree.
//!
//! The image has two recipes: `manifests/image/Dockerfile` (for users with a container engine
//! and a registry) and `scripts/build-image.sh` (what CI builds, with mmdebstrap and umoci;
//! `tests/tests/image_boot.rs` boots a node from its output). Both assemble the root filesystem
//! with `manifests/image/rootfs.sh`. What this file checks, from the text of both:
//!
//! - the two recipes describe the same image: Debian suite and packages, the workspace binaries
//!   built (package and binary) and put in `/app`, the other `/app` files and their sources,
//!   the init plugins, the libraries resolved for every `/app` binary, environment, working
//!   directory, user, entrypoint, default command, name and tag, and a runtime holding only
//!   rootfs.sh's tree and `/app`;
//! - every `/app/...` program the DaemonSet's containers and probes run is built and copied,
//!   as a `--bin` of the workspace package that really has that binary target;
//! - the init step's plugin directory (`init --src-dir`) is where the recipes put the
//!   reference plugins, and it holds every plugin a rendered conflist chains;
//! - the conflist template copied into the image is the one built into `vpc-cni-install`;
//! - the image's default command is the daemon container's command;
//! - the packages include `iptables`, `nftables` and `ca-certificates`;
//! - the Dockerfile's build context ignore file keeps `target/` out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use vpc_cni_installer::settings::Settings;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---- the Dockerfile ----

/// One build stage: its `FROM` line and its other instructions.
#[derive(Debug)]
struct Stage {
    from: String,
    name: Option<String>,
    instructions: Vec<String>,
}

/// Dockerfile instructions (continuation lines joined, comments dropped).
fn instructions_of(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
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

fn stages_of(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for i in instructions_of(text) {
        if let Some(rest) = i.strip_prefix("FROM ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = words
                .iter()
                .position(|w| w.eq_ignore_ascii_case("AS"))
                .and_then(|p| words.get(p + 1))
                .map(|w| (*w).to_owned());
            stages.push(Stage {
                from: words.first().map(|w| (*w).to_owned()).unwrap_or_default(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before the first FROM")
                .instructions
                .push(i);
        }
    }
    stages
}

fn runtime(stages: &[Stage]) -> &Stage {
    stages.last().expect("a FROM")
}

fn stage<'a>(stages: &'a [Stage], name: &str) -> &'a Stage {
    stages
        .iter()
        .find(|s| s.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no stage {name}"))
}

/// The RUN commands of a stage, each split at `&&`.
fn run_commands(s: &Stage) -> Vec<Vec<String>> {
    s.instructions
        .iter()
        .filter_map(|i| i.strip_prefix("RUN "))
        .flat_map(|r| r.split("&&"))
        .map(|c| c.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Values of every `flag VALUE` pair in `words`.
fn flag_values(words: &[String], flag: &str) -> Vec<String> {
    words
        .windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

/// `(package, binary)` pairs of a `cargo build ... -p P --bin B ...` command, in order: each
/// `--bin` belongs to the `-p` before it.
fn cargo_pairs(words: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut package = None;
    for w in words.windows(2) {
        match w[0].as_str() {
            "-p" | "--package" => package = Some(w[1].clone()),
            "--bin" => out.push((package.clone().expect("--bin before any -p"), w[1].clone())),
            _ => {}
        }
    }
    out
}

/// The Dockerfile's description of the image.
#[derive(Debug, PartialEq, Eq)]
struct Recipe {
    suite: String,
    packages: BTreeSet<String>,
    binaries: Vec<(String, String)>,
    cargo_flags: BTreeSet<String>,
    init_plugins: Vec<String>,
    /// Binaries whose libraries rootfs.sh resolves (file names).
    elf: BTreeSet<String>,
    /// Image path -> repository path of the non-binary `/app` files.
    app_files: BTreeMap<String, String>,
    /// Names of the binaries copied into `/app`.
    app_binaries: BTreeSet<String>,
    env: Vec<String>,
    workdir: String,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    image: String,
}

fn exec_form(s: &Stage, keyword: &str) -> Vec<String> {
    let line = s
        .instructions
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix(&format!("{keyword} ")))
        .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{keyword} is not exec form: {e}"))
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn docker_recipe() -> Recipe {
    let text = read("manifests/image/Dockerfile");
    let stages = stages_of(&text);
    let build = stage(&stages, "build");
    let rootfs = stage(&stages, "rootfs");
    let rt = runtime(&stages);

    let cargo: Vec<Vec<String>> = run_commands(build)
        .into_iter()
        .filter(|c| c.starts_with(&["cargo".to_owned(), "build".to_owned()]))
        .collect();
    assert_eq!(
        cargo.len(),
        1,
        "one cargo build in the build stage: {cargo:?}"
    );
    let cargo_flags = cargo[0]
        .iter()
        .filter(|w| w.starts_with("--") && *w != "--bin" && *w != "--package")
        .cloned()
        .collect();

    let suite = rootfs
        .from
        .strip_prefix("debian:")
        .and_then(|t| t.strip_suffix("-slim"))
        .unwrap_or_else(|| {
            panic!(
                "the rootfs stage is not debian:<suite>-slim: {}",
                rootfs.from
            )
        })
        .to_owned();
    let mut packages = BTreeSet::new();
    for c in run_commands(rootfs) {
        if c.get(..2) == Some(&["apt-get".to_owned(), "install".to_owned()]) {
            packages.extend(c[2..].iter().filter(|w| !w.starts_with('-')).cloned());
        }
    }
    let rootfs_run: Vec<String> = run_commands(rootfs)
        .into_iter()
        .find(|c| c.first().is_some_and(|w| w.ends_with("/rootfs.sh")))
        .expect("the rootfs stage runs rootfs.sh");
    assert!(
        rootfs.instructions.iter().any(|i| i.starts_with("COPY ")
            && i.contains("manifests/image/rootfs.sh")
            && i.ends_with(rootfs_run[0].as_str())),
        "the rootfs stage runs a rootfs.sh it did not copy from manifests/image/"
    );
    assert_eq!(
        rootfs_run.get(1..3),
        Some(&["/".to_owned(), "/rootfs".to_owned()][..]),
        "rootfs.sh / /rootfs expected: {rootfs_run:?}"
    );

    assert_eq!(rt.from, "scratch", "the runtime stage starts from scratch");
    let mut app_files = BTreeMap::new();
    let mut app_binaries = BTreeSet::new();
    let mut copied_rootfs = false;
    for i in &rt.instructions {
        let Some(rest) = i.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let from = words.iter().find_map(|w| w.strip_prefix("--from="));
        let paths: Vec<&str> = words
            .iter()
            .filter(|w| !w.starts_with("--"))
            .copied()
            .collect();
        let (dest, sources) = paths.split_last().expect("COPY with a destination");
        match (from, *dest) {
            (Some("rootfs"), "/") => {
                assert_eq!(sources, ["/rootfs/"]);
                copied_rootfs = true;
            }
            (Some("build"), "/app/") => {
                app_binaries.extend(sources.iter().map(|s| file_name(s)));
            }
            (None, d) if d.starts_with("/app/") => {
                assert_eq!(sources.len(), 1, "{i}");
                app_files.insert(d.to_owned(), sources[0].to_owned());
            }
            _ => panic!("the runtime stage copies something else: {i}"),
        }
    }
    assert!(
        copied_rootfs,
        "the runtime stage does not copy /rootfs/ to /"
    );
    let env = rt
        .instructions
        .iter()
        .filter_map(|i| i.strip_prefix("ENV "))
        .map(str::to_owned)
        .collect();
    let workdir = rt
        .instructions
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("WORKDIR "))
        .unwrap_or("")
        .to_owned();
    let user = rt
        .instructions
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER "))
        .unwrap_or("")
        .to_owned();
    let image = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[0] == "-t")
        .map(|w| w[1].to_owned())
        .expect("docker build -t NAME:TAG in the Dockerfile's comment");
    Recipe {
        suite,
        packages,
        binaries: cargo_pairs(&cargo[0]),
        cargo_flags,
        init_plugins: flag_values(&rootfs_run, "--plugin"),
        elf: flag_values(&rootfs_run, "--elf")
            .iter()
            .map(|f| file_name(f))
            .collect(),
        app_files,
        app_binaries,
        env,
        workdir,
        user,
        entrypoint: exec_form(rt, "ENTRYPOINT"),
        cmd: exec_form(rt, "CMD"),
        image,
    }
}

// ---- scripts/build-image.sh ----

/// The assignments of the script's declaration block (`NAME=word` and `NAME=(words)` between
/// the `# ---- The image` line and the next `# ----` line).
fn script_vars(text: &str) -> BTreeMap<String, Vec<String>> {
    let start = text
        .find("# ---- The image")
        .expect("build-image.sh has no '# ---- The image' block");
    let block = &text[start..];
    let block = &block[block.find('\n').expect("newline")..];
    let end = block.find("# ----").expect("end of the block");
    let mut out = BTreeMap::new();
    for line in block[..end].lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not an assignment: {line}"));
        assert!(
            name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "not a variable: {line}"
        );
        let words: Vec<String> = match value.strip_prefix('(') {
            Some(list) => list
                .strip_suffix(')')
                .unwrap_or_else(|| panic!("an array on one line: {line}"))
                .split_whitespace()
                .map(|w| w.trim_matches('"').to_owned())
                .collect(),
            None if value.is_empty() => Vec::new(),
            None => vec![value.trim_matches('"').to_owned()],
        };
        assert!(
            out.insert(name.to_owned(), words).is_none(),
            "{name} set twice"
        );
    }
    out
}

fn script_recipe() -> Recipe {
    let text = read("scripts/build-image.sh");
    let vars = script_vars(&text);
    let get = |name: &str| -> Vec<String> {
        vars.get(name)
            .unwrap_or_else(|| panic!("build-image.sh does not set {name}"))
            .clone()
    };
    let one = |name: &str| -> String { get(name).join(" ") };
    let binaries: Vec<(String, String)> = get("BINARIES")
        .iter()
        .map(|b| {
            let (p, n) = b.split_once(':').expect("package:binary");
            (p.to_owned(), n.to_owned())
        })
        .collect();
    // The script's own steps use the declarations: cargo flags, rootfs.sh, /app.
    assert!(
        text.contains("profile=${VPC_CNI_IMAGE_PROFILE:-release}")
            && text.contains("release) pflag=(--release); pdir=release ;;")
            && text.contains("\"$cargo\" build \"${pflag[@]}\" --locked \"${args[@]}\""),
        "build-image.sh no longer builds with --release --locked by default"
    );
    assert!(
        text.contains("manifests/image/rootfs.sh \"$work/debian\" \"$work/rootfs\" \"${plugin_args[@]}\" \"${elf_args[@]}\""),
        "build-image.sh no longer assembles the tree with rootfs.sh, the plugins and every binary"
    );
    assert!(
        text.contains("install -m 0755 \"$target/$pdir/${b#*:}\" \"$work/rootfs/app/${b#*:}\""),
        "build-image.sh no longer puts every binary in /app"
    );
    Recipe {
        suite: one("DEBIAN_SUITE"),
        packages: get("PACKAGES").into_iter().collect(),
        cargo_flags: ["--release", "--locked"].map(str::to_owned).into(),
        init_plugins: get("INIT_PLUGINS"),
        elf: binaries.iter().map(|(_, b)| b.clone()).collect(),
        app_binaries: binaries.iter().map(|(_, b)| b.clone()).collect(),
        binaries,
        app_files: get("APP_FILES")
            .iter()
            .map(|f| {
                let (src, dest) = f.split_once(':').expect("source:destination");
                (dest.to_owned(), src.to_owned())
            })
            .collect(),
        env: get("ENV"),
        workdir: one("WORKDIR"),
        user: one("IMAGE_USER"),
        entrypoint: get("ENTRYPOINT"),
        cmd: get("CMD"),
        image: format!("{}:{}", one("IMAGE_NAME"), one("IMAGE_TAG")),
    }
}

// ---- the DaemonSet ----

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

// ---- the checks ----

#[test]
fn the_dockerfile_and_build_image_sh_describe_the_same_image() {
    let docker = docker_recipe();
    let script = script_recipe();
    assert_eq!(
        docker, script,
        "manifests/image/Dockerfile (left) and scripts/build-image.sh (right) differ"
    );
}

#[test]
fn the_recipe_comparison_sees_a_drift_in_either_recipe() {
    // The parsers read what the files say: a changed word on either side is a difference.
    let original = read("manifests/image/Dockerfile");
    let drifted = original.replace("--plugin tuning ", "");
    assert_ne!(drifted, original);
    let stages = stages_of(&drifted);
    let run = run_commands(stage(&stages, "rootfs"))
        .into_iter()
        .find(|c| c.first().is_some_and(|w| w.ends_with("/rootfs.sh")))
        .expect("rootfs.sh");
    assert_ne!(flag_values(&run, "--plugin"), script_recipe().init_plugins);

    let text = read("scripts/build-image.sh");
    let vars = script_vars(&text.replace("CMD=(/app/ipamd)", "CMD=(/app/ipamd --backend sim)"));
    assert_ne!(vars["CMD"], docker_recipe().cmd);
    let vars = script_vars(&text.replace("IMAGE_USER=\n", "IMAGE_USER=1000\n"));
    assert_ne!(vars["IMAGE_USER"].join(" "), docker_recipe().user);
}

#[test]
fn every_program_the_daemonset_runs_is_built_and_copied_into_the_image() {
    let recipe = docker_recipe();
    assert!(recipe.binaries.len() >= 3, "{:?}", recipe.binaries);
    for (package, bin) in &recipe.binaries {
        let bins = bin_targets(package)
            .unwrap_or_else(|| panic!("the image builds package {package}, not a member"));
        assert!(
            bins.contains(bin),
            "package {package} has no binary {bin} (it has {bins:?})"
        );
    }
    let built: BTreeSet<&str> = recipe.binaries.iter().map(|(_, b)| b.as_str()).collect();
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
            recipe.app_binaries.contains(name),
            "the DaemonSet runs {program}; the image's /app has {:?}",
            recipe.app_binaries
        );
        assert!(built.contains(name), "{program} is not built ({built:?})");
    }
    // The libraries of every /app binary are in the tree.
    assert_eq!(recipe.elf, recipe.app_binaries);
    assert!(
        recipe.cargo_flags.contains("--release") && recipe.cargo_flags.contains("--locked"),
        "cargo build without --release --locked: {:?}",
        recipe.cargo_flags
    );
}

#[test]
fn the_init_step_finds_every_plugin_a_conflist_chains() {
    let recipe = docker_recipe();
    let ds = daemonset();
    let init = strings(&ds["spec"]["template"]["spec"]["initContainers"][0]["command"]);
    let src = init
        .iter()
        .position(|w| w == "--src-dir")
        .and_then(|i| init.get(i + 1))
        .expect("init --src-dir")
        .clone();
    // rootfs.sh puts the --plugin files in /init.
    assert_eq!(src, "/init", "rootfs.sh installs the plugins in /init");
    assert!(read("manifests/image/rootfs.sh").contains("\"$dest/init/$p\""));
    let plugins: BTreeSet<&str> = recipe.init_plugins.iter().map(String::as_str).collect();
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
    let recipe = docker_recipe();
    let source = recipe
        .app_files
        .get("/app/10-aws.conflist")
        .expect("a COPY of the conflist template to /app/10-aws.conflist");
    assert_eq!(
        read(source),
        vpc_cni_installer::conflist::TEMPLATE,
        "{source} is not the template built into vpc-cni-install"
    );
    let ds = daemonset();
    let main = strings(&ds["spec"]["template"]["spec"]["containers"][0]["command"]);
    let mut default = recipe.entrypoint.clone();
    default.extend(recipe.cmd.clone());
    assert_eq!(
        default, main,
        "the image's ENTRYPOINT + CMD differ from the daemon container's command"
    );
}

#[test]
fn the_image_has_the_rule_tools_and_the_build_context_skips_target() {
    let recipe = docker_recipe();
    for p in ["iptables", "nftables", "ca-certificates"] {
        assert!(recipe.packages.contains(p), "the image lacks {p}");
    }
    let rootfs = read("manifests/image/rootfs.sh");
    for program in ["xtables-nft-multi", "nft", "ca-certificates.crt"] {
        assert!(
            rootfs.contains(program),
            "rootfs.sh does not keep {program}"
        );
    }
    let ds = daemonset();
    for c in [
        &ds["spec"]["template"]["spec"]["containers"][0],
        &ds["spec"]["template"]["spec"]["initContainers"][0],
    ] {
        assert_eq!(c["image"].as_str(), Some(recipe.image.as_str()));
    }
    let ignore = read("manifests/image/Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}
