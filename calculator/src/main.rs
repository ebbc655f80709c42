//! `subnet-calc`: plan how many subnet addresses a VPC CNI cluster consumes.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use subnet_calc::limits::{trunk_limits_with, Catalog, Hypervisor, LimitOverrides};
use subnet_calc::maxpods::{self, CniVersion, Formula, MaxPodsOptions};
use subnet_calc::plan::{InputError, PlanInput};
use subnet_calc::policy::Flavour;
use subnet_calc::report::{self, Format};
use subnet_calc::timeline::{self, TimelineInput};
use subnet_calc::workbook::{self, Sheet};
use subnet_calc::{exact, svg};

#[derive(Parser)]
#[command(
    name = "subnet-calc",
    version,
    about = "Subnet and max-pods planner for VPC CNI clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Max pods for an instance type (the EKS AMI's max-pods-calculator.sh, or eni-max-pods).
    MaxPods(MaxPodsArgs),
    /// Subnet usage of node groups at steady state (exact) or as the workbook computes it.
    Plan(PlanArgs),
    /// Pods over time through the pool policy, tick by tick, for a fleet sharing subnets.
    Simulate(SimulateArgs),
    /// Lists instance types and their network limits.
    InstanceTypes(TypesArgs),
}

#[derive(clap::Args)]
struct MaxPodsArgs {
    /// EC2 instance type, e.g. m5.large.
    #[arg(long)]
    instance_type: String,
    /// Prefix delegation is enabled (ENABLE_PREFIX_DELEGATION).
    #[arg(long, alias = "cni-prefix-delegation-enabled")]
    prefix_delegation: bool,
    /// Custom networking is enabled (one ENI fewer for pods).
    #[arg(long, alias = "cni-custom-networking-enabled")]
    custom_networking: bool,
    /// MAX_ENI.
    #[arg(long, alias = "cni-max-eni")]
    max_eni: Option<u32>,
    /// VPC CNI version (prefix delegation needs 1.9.0 or later).
    #[arg(long, default_value_t = maxpods::DEFAULT_CNI_VERSION)]
    cni_version: CniVersion,
    /// No 110/250 ceiling.
    #[arg(long)]
    show_max_allowed: bool,
    /// `calculator` (EKS AMI script) or `eni-max-pods` (eni-max-pods.txt / nodeadm).
    #[arg(long, default_value = "calculator", value_parser = parse_formula)]
    formula: Formula,
    /// Override a value of the instance type: max_enis, ipv4_per_eni, vcpus, hypervisor,
    /// bare_metal (repeatable, e.g. --set vcpus=48).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Explain the number.
    #[arg(long)]
    explain: bool,
    /// IPv6 cluster (ENABLE_IPv6): no per-ENI address limit, the 110/250 ceiling.
    #[arg(long)]
    ipv6: bool,
    /// Security groups for pods (ENABLE_POD_ENI=true): the trunk ENI takes one ENI slot,
    /// branch-ENI pods are added up to the type's branch limit.
    #[arg(long, alias = "pod-eni")]
    security_groups_for_pods: bool,
    /// With --security-groups-for-pods: how many of the node's pods are branch-ENI pods
    /// (default: the type's branch limit).
    #[arg(long, value_name = "N", requires = "security_groups_for_pods")]
    branch_pods: Option<u32>,
    /// Count every network card (ipamd with ENABLE_MULTI_NIC=true) instead of the default card
    /// only, as the EKS script does. On a multi-card type without it, a note on standard error
    /// says the number counts the default card only.
    #[arg(long)]
    all_cards: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Plan file (YAML or JSON; `-` reads standard input).
    file: PathBuf,
    /// `exact` (what real nodes do) or `workbook` (the EKS Best Practices spreadsheet).
    #[arg(long, default_value = "exact", value_parser = ["exact", "workbook"])]
    mode: String,
    /// Workbook sheet.
    #[arg(long, default_value = "warm-eni")]
    sheet: Sheet,
    /// Show workbook and exact results side by side.
    #[arg(long)]
    compare: bool,
    /// Policy the nodes run in exact mode (overrides the file's config.policy).
    #[arg(long)]
    policy: Option<Flavour>,
    /// table, json or csv.
    #[arg(long, default_value = "table")]
    format: Format,
    /// Also write a chart to this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    svg: Option<PathBuf>,
    /// IPv6 cluster (ENABLE_IPv6): /80 prefixes per node instead of IPv4 addresses.
    #[arg(long)]
    ipv6: bool,
    /// The subnet's IPv6 block (a /64), with --ipv6.
    #[arg(long, value_name = "CIDR", requires = "ipv6")]
    ipv6_cidr: Option<String>,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Timeline file (YAML or JSON; `-` reads standard input).
    file: PathBuf,
    /// Run the reference, ours and the demand-driven policy on the same input and compare
    /// (the SVG shows the reference against demand).
    #[arg(long)]
    compare_policies: bool,
    /// Policy (overrides the file's config.policy).
    #[arg(long)]
    policy: Option<Flavour>,
    /// table, json or csv.
    #[arg(long, default_value = "table")]
    format: Format,
    /// Rows of samples in the table format.
    #[arg(long, default_value_t = 25)]
    rows: usize,
    /// Also write a chart to this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    svg: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TypesArgs {
    /// Only names containing this text.
    filter: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_formula(s: &str) -> Result<Formula, String> {
    match s {
        "calculator" => Ok(Formula::Calculator),
        "eni-max-pods" => Ok(Formula::EniMaxPods),
        _ => Err(format!(
            "unknown formula `{s}` (expected calculator or eni-max-pods)"
        )),
    }
}

/// An input problem: reported without a backtrace, exit code 2.
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn bad(source: &Path, e: InputError) -> anyhow::Error {
    BadInput(format!("{}: {e}", source.display())).into()
}

fn read_input(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        return Ok(s);
    }
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `text` to `path` through a temporary file renamed into place.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("the SVG path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn overrides(set: &[String]) -> Result<LimitOverrides> {
    let mut o = LimitOverrides::default();
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| BadInput(format!("--set {kv}: expected KEY=VALUE")))?;
        let num = || {
            v.parse::<u32>()
                .map_err(|_| BadInput(format!("--set {k}: `{v}` is not a whole number")))
        };
        match k {
            "max_enis" => o.max_enis = Some(num()?),
            "ipv4_per_eni" => o.ipv4_per_eni = Some(num()?),
            "ipv6_per_eni" => o.ipv6_per_eni = Some(num()?),
            "vcpus" => o.vcpus = Some(num()?),
            "network_cards" => o.network_cards = Some(num()?),
            "branch_interfaces" => o.branch_interfaces = Some(num()?),
            "trunking_compatible" => {
                o.trunking_compatible = Some(v.parse().map_err(|_| {
                    BadInput(format!(
                        "--set trunking_compatible: `{v}` is not true or false"
                    ))
                })?)
            }
            "bare_metal" => {
                o.bare_metal = Some(v.parse().map_err(|_| {
                    BadInput(format!("--set bare_metal: `{v}` is not true or false"))
                })?)
            }
            "hypervisor" => {
                o.hypervisor = Some(match v {
                    "nitro" => Hypervisor::Nitro,
                    "xen" => Hypervisor::Xen,
                    "none" => Hypervisor::None,
                    _ => bail!(BadInput(format!(
                        "--set hypervisor: `{v}` is not nitro, xen or none"
                    ))),
                })
            }
            _ => bail!(BadInput(format!(
                "--set {k}: unknown key (max_enis, ipv4_per_eni, ipv6_per_eni, vcpus, network_cards, hypervisor, bare_metal, branch_interfaces, trunking_compatible)"
            ))),
        }
    }
    Ok(o)
}

fn run_max_pods(a: MaxPodsArgs) -> Result<String> {
    let o = overrides(&a.set)?;
    let limits = Catalog::embedded()
        .lookup(&a.instance_type, &o)
        .map_err(|e| BadInput(format!("--instance-type: {e}")))?;
    let trunk = trunk_limits_with(&a.instance_type, &o);
    if let Some(n) = a.branch_pods {
        if n > trunk.usable_branches() {
            bail!(BadInput(format!(
                "--branch-pods {n}: {} carries at most {} branch ENIs",
                a.instance_type,
                trunk.usable_branches()
            )));
        }
    }
    if a.max_eni == Some(0) {
        bail!(BadInput("--max-eni: must be at least 1".into()));
    }
    let opts = MaxPodsOptions {
        formula: a.formula,
        prefix_delegation: a.prefix_delegation,
        custom_networking: a.custom_networking,
        max_eni: a.max_eni,
        cni_version: a.cni_version,
        show_max_allowed: a.show_max_allowed,
        security_groups_for_pods: a.security_groups_for_pods,
        branch_pods: a.branch_pods,
    };
    let m = if a.ipv6 {
        if a.security_groups_for_pods {
            bail!(BadInput(
                "--security-groups-for-pods: only IPv4 max pods are modelled".into()
            ));
        }
        subnet_calc::ipv6::max_pods(&limits, &opts).map_err(BadInput)?
    } else {
        maxpods::max_pods_with_trunk(&limits, &trunk, &opts)
    };
    let f = if a.json { Format::Json } else { Format::Table };
    if a.all_cards {
        if a.ipv6 {
            bail!(BadInput(
                "--all-cards: IPv6 max pods do not depend on network cards".into()
            ));
        }
        if let Some(all) = &m.all_cards {
            if f == Format::Table && !a.explain {
                return Ok(format!("{}\n", all.max_pods));
            }
        }
    } else if f == Format::Table {
        if let Some(flag) = report::default_card_flag(&m).filter(|_| !a.explain) {
            // Standard output stays the script's bare number; the flag goes beside it.
            eprintln!("note: {flag}");
        }
    }
    Ok(report::max_pods(&m, f, a.explain))
}

fn run_plan(a: PlanArgs) -> Result<String> {
    let text = read_input(&a.file)?;
    let mut input = PlanInput::parse(&text).map_err(|e| bad(&a.file, e))?;
    if let Some(p) = a.policy {
        input.config.policy = p;
    }
    if a.ipv6 {
        if a.compare || a.mode == "workbook" || a.svg.is_some() {
            bail!(BadInput(
                "--ipv6: the workbook, --compare and --svg are IPv4 plans".into()
            ));
        }
        let p = subnet_calc::ipv6::plan(&input, Catalog::embedded(), a.ipv6_cidr.as_deref())
            .map_err(|e| bad(&a.file, e))?;
        return Ok(report::ipv6_plan(&p, a.format));
    }
    let groups = input
        .resolve(Catalog::embedded())
        .map_err(|e| bad(&a.file, e))?;
    let (out, chart) = if a.compare {
        let w = workbook::compute(&input, a.sheet).map_err(|e| bad(&a.file, e))?;
        let e = exact::plan(&input, &groups).map_err(|e| bad(&a.file, e))?;
        (
            report::compare(&w, &e, a.format),
            a.svg.as_ref().map(|_| svg::compare_chart(&w, &e)),
        )
    } else if a.mode == "workbook" {
        let w = workbook::compute(&input, a.sheet).map_err(|e| bad(&a.file, e))?;
        (
            report::workbook(&w, a.format),
            a.svg.as_ref().map(|_| svg::workbook_chart(&w)),
        )
    } else {
        let e = exact::plan(&input, &groups).map_err(|e| bad(&a.file, e))?;
        (
            report::exact(&e, a.format),
            a.svg.as_ref().map(|_| svg::exact_chart(&e)),
        )
    };
    if let (Some(path), Some(chart)) = (&a.svg, chart) {
        write_atomic(path, &chart)?;
    }
    Ok(out)
}

fn run_simulate(a: SimulateArgs) -> Result<String> {
    let text = read_input(&a.file)?;
    let mut input = TimelineInput::parse(&text).map_err(|e| bad(&a.file, e))?;
    let base = a.file.parent().map(Path::to_path_buf).unwrap_or_default();
    input
        .load_trace_files(|name| {
            let p = base.join(name);
            fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        })
        .map_err(|e| bad(&a.file, e))?;
    if let Some(p) = a.policy {
        input.config.policy = p;
    }
    let run = |policy: Flavour| {
        let mut i = input.clone();
        i.config.policy = policy;
        timeline::simulate(i, Catalog::embedded()).map_err(|e| bad(&a.file, e))
    };
    if a.compare_policies {
        let r = run(Flavour::Reference)?;
        let o = run(Flavour::Ours)?;
        let d = run(Flavour::Demand)?;
        if let Some(path) = &a.svg {
            write_atomic(path, &svg::timeline_compare_chart(&r, &d))?;
        }
        let all = [&r, &o, &d];
        return Ok(match a.format {
            Format::Json => report::json(&serde_json::json!({
                "reference": r,
                "ours": o,
                "demand": d,
                "comparison": report::policy_summaries(&all),
            })),
            f => format!(
                "{}\n{}\n{}\n{}",
                report::policy_comparison(&all, f),
                report::timeline(&r, f, a.rows),
                report::timeline(&o, f, a.rows),
                report::timeline(&d, f, a.rows)
            ),
        });
    }
    let r = run(input.config.policy)?;
    if let Some(path) = &a.svg {
        write_atomic(path, &svg::timeline_chart(&r))?;
    }
    Ok(report::timeline(&r, a.format, a.rows))
}

fn run_types(a: TypesArgs) -> Result<String> {
    let f = a.filter.unwrap_or_default();
    let types: Vec<_> = Catalog::embedded()
        .iter()
        .filter(|t| t.instance_type.contains(&f))
        .collect();
    if a.json {
        return Ok(report::json(&types));
    }
    let mut out = format!(
        "{:<24}{:>6}{:>8}{:>8}{:>10}{:>7}{:>10}\n",
        "instance_type", "vcpus", "enis", "ipv4", "eni-max", "cards", "hypervisor"
    );
    for t in types {
        out.push_str(&format!(
            "{:<24}{:>6}{:>8}{:>8}{:>10}{:>7}{:>10}\n",
            t.instance_type,
            t.vcpus,
            t.max_enis,
            t.ipv4_per_eni,
            maxpods::eni_max_pods(t),
            t.network_cards,
            t.hypervisor.to_string()
        ));
    }
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::MaxPods(a) => run_max_pods(a),
        Command::Plan(a) => run_plan(a),
        Command::Simulate(a) => run_simulate(a),
        Command::InstanceTypes(a) => run_types(a),
    };
    match result {
        Ok(out) => {
            let mut stdout = io::stdout().lock();
            if let Err(e) = stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    eprintln!("error: writing output: {e}");
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.is::<BadInput>() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
