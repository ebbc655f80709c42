//! SNAT, connmark and mangle rules of ipamd (spec cni.md 3.5–3.7): the desired state as pure
//! data (iptables argument lists, an nftables script, the fwmark rule), and its application
//! inside a namespace with the `iptables`, `iptables-restore`, `iptables-save` and `nft`
//! binaries.
//!
//! Chains we own (`AWS-SNAT-CHAIN-0`, `AWS-CONNMARK-CHAIN-0`) are rewritten whole and atomically
//! with `iptables-restore --noflush`, which also drops stale rules; rules in the built-in chains
//! (jumps, mangle marks) are checked with `-C` and appended or deleted one by one.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::error::{NetError, Result};
use crate::netlink::Rule;
use crate::netns::Netns;
use crate::types::{Family, IpCidr, MAIN_TABLE};

/// The SNAT chain.
pub const SNAT_CHAIN: &str = "AWS-SNAT-CHAIN-0";
/// The connmark chain (iptables backend).
pub const CONNMARK_CHAIN: &str = "AWS-CONNMARK-CHAIN-0";
/// The nftables table of the nft connmark backend (family `ip`).
pub const NFT_TABLE: &str = "aws-cni";
/// Priority of the fwmark rule that sends marked pod traffic through main.
pub const CONNMARK_RULE_PRIORITY: u32 = 1024;
/// The default connection mark (`AWS_VPC_K8S_CNI_CONNMARK`).
pub const DEFAULT_CONNMARK: u32 = 0x80;

/// `AWS_VPC_K8S_CNI_RANDOMIZESNAT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RandomizeSnat {
    /// `prng` (default): `--random-fully`.
    #[default]
    Prng,
    /// `hashrandom`: `--random`.
    HashRandom,
    /// `none`: no port flag.
    None,
}

impl RandomizeSnat {
    /// Parses the env value; anything unknown means `prng`, as in the reference.
    pub fn from_env_value(v: &str) -> RandomizeSnat {
        match v {
            "hashrandom" => RandomizeSnat::HashRandom,
            "none" => RandomizeSnat::None,
            _ => RandomizeSnat::Prng,
        }
    }

    fn flag(self) -> Option<&'static str> {
        match self {
            RandomizeSnat::Prng => Some("--random-fully"),
            RandomizeSnat::HashRandom => Some("--random"),
            RandomizeSnat::None => None,
        }
    }
}

/// Inputs of the host SNAT/connmark state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatConfig {
    /// The primary ENI's primary IPv4 address (SNAT source).
    pub primary_ip: Ipv4Addr,
    /// The primary interface's name (`eth0`), for the node-port mangle rule.
    pub primary_if: String,
    /// VPC CIDRs (traffic to them is not SNATed).
    pub vpc_cidrs: Vec<IpCidr>,
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS` (IPv6 entries are skipped).
    pub exclude_cidrs: Vec<IpCidr>,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`.
    pub external_snat: bool,
    /// `AWS_VPC_K8S_CNI_RANDOMIZESNAT`.
    pub randomize: RandomizeSnat,
    /// `AWS_VPC_CNI_NODE_PORT_SUPPORT`.
    pub node_port_support: bool,
    /// Host veth prefix (`eni`).
    pub veth_prefix: String,
    /// `AWS_VPC_K8S_CNI_CONNMARK` (0x80).
    pub connmark: u32,
}

impl SnatConfig {
    /// Checks the mark and names before anything is applied.
    pub fn validate(&self) -> Result<()> {
        if self.connmark == 0 {
            return Err(NetError::invalid("connmark 0"));
        }
        if self.veth_prefix.is_empty() || self.veth_prefix.contains([' ', '"', '\'', '\n']) {
            return Err(NetError::invalid(format!(
                "veth prefix {:?}",
                self.veth_prefix
            )));
        }
        if self.primary_if.is_empty() || self.primary_if.contains([' ', '"', '\'', '\n']) {
            return Err(NetError::invalid(format!(
                "primary interface {:?}",
                self.primary_if
            )));
        }
        Ok(())
    }

    fn exclusions_v4(&self) -> impl Iterator<Item = &IpCidr> {
        self.exclude_cidrs
            .iter()
            .filter(|c| c.family() == Family::V4)
    }

    /// VPC CIDRs plus SNAT exclusions (empty with external SNAT, as `GetExcludeSNATCIDRs`).
    pub fn exempt_cidrs(&self) -> Vec<IpCidr> {
        let mut v: Vec<IpCidr> = self
            .vpc_cidrs
            .iter()
            .filter(|c| c.family() == Family::V4)
            .copied()
            .collect();
        if !self.external_snat {
            v.extend(self.exclusions_v4().copied());
        }
        v
    }

    fn mark(&self) -> String {
        format!("{:#x}", self.connmark)
    }
}

/// One iptables rule: table, chain and the match/target arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptRule {
    /// Table (`nat`, `mangle`).
    pub table: String,
    /// Chain.
    pub chain: String,
    /// Arguments after the chain name.
    pub args: Vec<String>,
}

impl IptRule {
    fn new(table: &str, chain: &str, args: &[&str]) -> IptRule {
        IptRule {
            table: table.into(),
            chain: chain.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The rule as `iptables-save` prints it (`-A CHAIN args`, arguments with spaces quoted).
    pub fn to_save_line(&self) -> String {
        let mut s = format!("-A {}", self.chain);
        for a in &self.args {
            s.push(' ');
            if a.contains(' ') {
                s.push('"');
                s.push_str(a);
                s.push('"');
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// A chain we own: its full desired contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedChain {
    /// Table.
    pub table: String,
    /// Chain name.
    pub name: String,
    /// Rules in order (chain name is `name`).
    pub rules: Vec<IptRule>,
}

/// Desired iptables state: owned chains (rewritten whole), rules that must be present in
/// built-in chains, rules that must be absent, and chains to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesPlan {
    /// Chains created if missing and rewritten to exactly these rules.
    pub chains: Vec<OwnedChain>,
    /// Rules that must exist (appended if missing).
    pub present: Vec<IptRule>,
    /// Rules that must exist and sit after the `present` ones: deleted and re-appended.
    pub reappend: Vec<IptRule>,
    /// Rules that must not exist (deleted while present).
    pub absent: Vec<IptRule>,
    /// Chains flushed and deleted if they exist: `(table, chain)`.
    pub remove_chains: Vec<(String, String)>,
}

impl IptablesPlan {
    /// Appends another plan's parts to this one.
    pub fn extend(&mut self, other: IptablesPlan) {
        self.chains.extend(other.chains);
        self.present.extend(other.present);
        self.reappend.extend(other.reappend);
        self.absent.extend(other.absent);
        self.remove_chains.extend(other.remove_chains);
    }
}

fn return_rule(chain: &str, cidr: &IpCidr, comment: &str) -> IptRule {
    if cidr.prefix_len == 0 {
        // The kernel strips `-d 0/0`, so the reference's rule is a bare RETURN.
        IptRule::new(
            "nat",
            chain,
            &["-m", "comment", "--comment", comment, "-j", "RETURN"],
        )
    } else {
        let d = cidr.trunc().to_string();
        IptRule::new(
            "nat",
            chain,
            &[
                "-d",
                &d,
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                "RETURN",
            ],
        )
    }
}

/// The SNAT part (spec 3.5): POSTROUTING jump and `AWS-SNAT-CHAIN-0`, or their removal with
/// external SNAT.
pub fn snat_plan(cfg: &SnatConfig) -> IptablesPlan {
    let jump = IptRule::new(
        "nat",
        "POSTROUTING",
        &[
            "-m",
            "comment",
            "--comment",
            "AWS SNAT CHAIN",
            "-j",
            SNAT_CHAIN,
        ],
    );
    let mut plan = IptablesPlan::default();
    if cfg.external_snat {
        plan.absent.push(jump);
        plan.remove_chains.push(("nat".into(), SNAT_CHAIN.into()));
        return plan;
    }
    let mut rules: Vec<IptRule> = Vec::new();
    for c in cfg.vpc_cidrs.iter().filter(|c| c.family() == Family::V4) {
        rules.push(return_rule(SNAT_CHAIN, c, "AWS SNAT CHAIN"));
    }
    for c in cfg.exclusions_v4() {
        rules.push(return_rule(SNAT_CHAIN, c, "AWS SNAT CHAIN EXCLUSION"));
    }
    let ip = cfg.primary_ip.to_string();
    let mut snat = vec![
        "!",
        "-o",
        "vlan+",
        "-m",
        "comment",
        "--comment",
        "AWS, SNAT",
        "-m",
        "addrtype",
        "!",
        "--dst-type",
        "LOCAL",
        "-j",
        "SNAT",
        "--to-source",
        &ip,
    ];
    if let Some(f) = cfg.randomize.flag() {
        snat.push(f);
    }
    rules.push(IptRule::new("nat", SNAT_CHAIN, &snat));
    plan.chains.push(OwnedChain {
        table: "nat".into(),
        name: SNAT_CHAIN.into(),
        rules,
    });
    plan.present.push(jump);
    plan
}

/// The mangle PREROUTING rules (spec 3.6), each present or absent per the config.
pub fn mangle_plan(cfg: &SnatConfig) -> IptablesPlan {
    let mark = cfg.mark();
    let set = format!("{mark}/{mark}");
    let veths = format!("{}+", cfg.veth_prefix);
    let c = "AWS, primary ENI";
    let wanted = [
        (
            cfg.node_port_support,
            IptRule::new(
                "mangle",
                "PREROUTING",
                &[
                    "-i",
                    &cfg.primary_if,
                    "-m",
                    "comment",
                    "--comment",
                    c,
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    "--limit-iface-in",
                    "-j",
                    "CONNMARK",
                    "--set-xmark",
                    &set,
                ],
            ),
        ),
        (
            cfg.node_port_support || !cfg.external_snat,
            IptRule::new(
                "mangle",
                "PREROUTING",
                &[
                    "-i",
                    &veths,
                    "-m",
                    "comment",
                    "--comment",
                    c,
                    "-j",
                    "CONNMARK",
                    "--restore-mark",
                    "--nfmask",
                    &mark,
                    "--ctmask",
                    &mark,
                ],
            ),
        ),
        (
            cfg.node_port_support,
            IptRule::new(
                "mangle",
                "PREROUTING",
                &[
                    "-i",
                    "vlan+",
                    "-m",
                    "comment",
                    "--comment",
                    c,
                    "-j",
                    "CONNMARK",
                    "--restore-mark",
                    "--nfmask",
                    &mark,
                    "--ctmask",
                    &mark,
                ],
            ),
        ),
    ];
    let mut plan = IptablesPlan::default();
    for (want, rule) in wanted {
        if want {
            plan.present.push(rule);
        } else {
            plan.absent.push(rule);
        }
    }
    plan
}

/// The iptables connmark backend (spec 3.7): PREROUTING jump, the restore rule after it, and
/// `AWS-CONNMARK-CHAIN-0`; all removed with external SNAT.
pub fn connmark_iptables_plan(cfg: &SnatConfig) -> IptablesPlan {
    let mark = cfg.mark();
    let veths = format!("{}+", cfg.veth_prefix);
    let jump = IptRule::new(
        "nat",
        "PREROUTING",
        &[
            "-i",
            &veths,
            "-m",
            "comment",
            "--comment",
            "AWS, outbound connections",
            "-j",
            CONNMARK_CHAIN,
        ],
    );
    let old_jump = IptRule::new(
        "nat",
        "PREROUTING",
        &[
            "-i",
            &veths,
            "-m",
            "comment",
            "--comment",
            "AWS, outbound connections",
            "-m",
            "state",
            "--state",
            "NEW",
            "-j",
            CONNMARK_CHAIN,
        ],
    );
    let restore = IptRule::new(
        "nat",
        "PREROUTING",
        &[
            "-m",
            "comment",
            "--comment",
            "AWS, CONNMARK",
            "-j",
            "CONNMARK",
            "--restore-mark",
            "--nfmask",
            &mark,
            "--ctmask",
            &mark,
        ],
    );
    let mut plan = IptablesPlan {
        absent: vec![old_jump],
        ..IptablesPlan::default()
    };
    if cfg.external_snat {
        plan.absent.push(jump);
        plan.absent.push(restore);
        plan.remove_chains
            .push(("nat".into(), CONNMARK_CHAIN.into()));
        return plan;
    }
    let mut rules: Vec<IptRule> = cfg
        .exempt_cidrs()
        .iter()
        .map(|c| return_rule(CONNMARK_CHAIN, c, "AWS CONNMARK CHAIN"))
        .collect();
    let set = format!("{mark}/{mark}");
    rules.push(IptRule::new(
        "nat",
        CONNMARK_CHAIN,
        &[
            "-m",
            "comment",
            "--comment",
            "AWS, CONNMARK",
            "-j",
            "CONNMARK",
            "--set-xmark",
            &set,
        ],
    ));
    plan.chains.push(OwnedChain {
        table: "nat".into(),
        name: CONNMARK_CHAIN.into(),
        rules,
    });
    plan.present.push(jump);
    plan.reappend.push(restore);
    plan
}

/// The nftables connmark backend (spec 3.7): the whole `ip aws-cni` table, or `None` when it
/// must not exist (external SNAT).
pub fn connmark_nft_script(cfg: &SnatConfig) -> Option<String> {
    if cfg.external_snat {
        return None;
    }
    let mark = cfg.mark();
    let mut s = format!("table ip {NFT_TABLE} {{\n");
    s.push_str("\tchain nat-prerouting {\n");
    s.push_str("\t\ttype nat hook prerouting priority -90; policy accept;\n");
    s.push_str("\t\tfib daddr type local return\n");
    s.push_str(&format!(
        "\t\tiifname \"{}*\" counter jump snat-mark\n",
        cfg.veth_prefix
    ));
    s.push_str(&format!("\t\tcounter meta mark set ct mark and {mark}\n"));
    s.push_str("\t}\n");
    s.push_str("\tchain snat-mark {\n");
    for c in cfg.exempt_cidrs() {
        s.push_str(&format!("\t\tip daddr {} return\n", c.trunc()));
    }
    s.push_str(&format!("\t\tct mark set ct mark or {mark}\n"));
    s.push_str("\t}\n}\n");
    Some(s)
}

/// The fwmark rule `fwmark <mark>/<mark> lookup main` at 1024: wanted when node-port support
/// is on or external SNAT is off.
pub fn connmark_rule(cfg: &SnatConfig) -> (Rule, bool) {
    let rule = Rule::new(Family::V4, CONNMARK_RULE_PRIORITY, MAIN_TABLE)
        .fwmark(cfg.connmark, cfg.connmark);
    (rule, cfg.node_port_support || !cfg.external_snat)
}

/// Which program implements the connmark rules (spec 3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnmarkBackend {
    /// iptables-legacy: `AWS-CONNMARK-CHAIN-0`.
    Iptables,
    /// Native nftables: table `ip aws-cni`.
    Nftables,
}

impl ConnmarkBackend {
    /// The reference's choice from `iptables --version` output: `legacy` selects iptables,
    /// anything else nftables.
    pub fn from_version_output(v: &str) -> ConnmarkBackend {
        if v.contains("legacy") {
            ConnmarkBackend::Iptables
        } else {
            ConnmarkBackend::Nftables
        }
    }
}

/// The iptables-restore input that rewrites the owned chains of `table`.
pub fn restore_input(table: &str, chains: &[&OwnedChain]) -> String {
    let mut s = format!("*{table}\n");
    for c in chains {
        s.push_str(&format!(":{} - [0:0]\n", c.name));
    }
    for c in chains {
        s.push_str(&format!("-F {}\n", c.name));
        for r in &c.rules {
            s.push_str(&r.to_save_line());
            s.push('\n');
        }
    }
    s.push_str("COMMIT\n");
    s
}

// ---- application (inside a namespace) ----

fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<(bool, String)> {
    use std::io::Write;
    let cmdline = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| NetError::Command {
        command: cmdline.clone(),
        status: format!("spawn: {e}"),
        stderr: String::new(),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| NetError::Command {
                command: cmdline.clone(),
                status: format!("stdin: {e}"),
                stderr: String::new(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| NetError::Command {
        command: cmdline.clone(),
        status: format!("wait: {e}"),
        stderr: String::new(),
    })?;
    if out.status.success() {
        Ok((true, String::from_utf8_lossy(&out.stdout).into_owned()))
    } else if out.status.code() == Some(1) {
        // iptables -C answers 1 for "no such rule"; callers that care look at `false`.
        Ok((
            false,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    } else {
        Err(NetError::Command {
            command: cmdline,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn must(program: &str, args: &[String], stdin: Option<&str>) -> Result<String> {
    match run(program, args, stdin)? {
        (true, out) => Ok(out),
        (false, err) => Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: "exit status: 1".into(),
            stderr: err,
        }),
    }
}

/// `iptables -C`: whether `r` exists. A rule whose chain or jump target does not exist does not
/// exist either (iptables exits 2 for that, not 1).
fn rule_exists(r: &IptRule) -> Result<bool> {
    match run("iptables", &ipt_args("-C", r), None) {
        Ok((found, _)) => Ok(found),
        Err(NetError::Command { stderr, .. })
            if stderr.contains("does not exist") || stderr.contains("No chain/target/match") =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn ipt_args(op: &str, r: &IptRule) -> Vec<String> {
    let mut v = vec![
        "-w".to_string(),
        "5".into(),
        "-t".into(),
        r.table.clone(),
        op.into(),
        r.chain.clone(),
    ];
    v.extend(r.args.iter().cloned());
    v
}

fn apply_plan_here(plan: &IptablesPlan) -> Result<()> {
    let mut tables: Vec<&str> = plan.chains.iter().map(|c| c.table.as_str()).collect();
    tables.dedup();
    for t in tables {
        let chains: Vec<&OwnedChain> = plan.chains.iter().filter(|c| c.table == t).collect();
        let input = restore_input(t, &chains);
        must(
            "iptables-restore",
            &["-w".into(), "5".into(), "--noflush".into()],
            Some(&input),
        )?;
    }
    for r in &plan.present {
        if !rule_exists(r)? {
            must("iptables", &ipt_args("-A", r), None)?;
        }
    }
    for r in &plan.reappend {
        while rule_exists(r)? {
            must("iptables", &ipt_args("-D", r), None)?;
        }
        must("iptables", &ipt_args("-A", r), None)?;
    }
    for r in &plan.absent {
        while rule_exists(r)? {
            must("iptables", &ipt_args("-D", r), None)?;
        }
    }
    for (t, c) in &plan.remove_chains {
        let base = vec!["-w".to_string(), "5".into(), "-t".into(), t.clone()];
        let mut list = base.clone();
        list.extend(["-S".to_string(), c.clone()]);
        if run("iptables", &list, None)?.0 {
            let mut f = base.clone();
            f.extend(["-F".to_string(), c.clone()]);
            must("iptables", &f, None)?;
            let mut x = base.clone();
            x.extend(["-X".to_string(), c.clone()]);
            must("iptables", &x, None)?;
        }
    }
    Ok(())
}

/// Applies `plan` with the iptables binaries inside `ns` (one dedicated thread for all of it).
pub fn apply_iptables(ns: &Netns, plan: &IptablesPlan) -> Result<()> {
    ns.run(|| apply_plan_here(plan))?
}

/// Makes the nftables connmark table match `script` inside `ns` (`None` removes it), in one
/// `nft -f` transaction.
pub fn apply_nft(ns: &Netns, script: Option<&str>) -> Result<()> {
    // Declaring the table first makes the delete valid whether or not it exists.
    let mut input = format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n");
    if let Some(s) = script {
        input.push_str(s);
    }
    ns.run(|| must("nft", &["-f".into(), "-".into()], Some(&input)).map(drop))?
}

/// `iptables-save -t <table>` inside `ns`.
pub fn iptables_save(ns: &Netns, table: &str) -> Result<String> {
    ns.run(|| must("iptables-save", &["-t".into(), table.into()], None))?
}

/// `nft list table ip aws-cni` inside `ns`; `None` when the table does not exist.
pub fn nft_list(ns: &Netns) -> Result<Option<String>> {
    let args = [
        "list".to_string(),
        "table".into(),
        "ip".into(),
        NFT_TABLE.into(),
    ];
    ns.run(|| run("nft", &args, None))?
        .map(|(ok, out)| ok.then_some(out))
}

/// Addresses the chained egress plugin gives pods in an IPv6 cluster (spec 2.7).
pub const EGRESS_V4_RANGE: &str = "169.254.172.0/22";
/// Addresses the chained egress plugin gives pods in an IPv4 cluster (spec 2.7).
pub const EGRESS_V6_RANGE: &str = "fd00::ac:00/118";
/// The comment on the egress guard rule.
pub const EGRESS_GUARD_COMMENT: &str =
    "aws-cni: egress-only pod addresses accept no new connections";

/// The filter `FORWARD` rule that refuses new connections to the egress-only addresses of
/// `family` (spec 2.7: ipamd inserts it at position 1), as `-C`/`-I` arguments after the chain.
pub fn egress_guard_args(family: crate::types::Family) -> Vec<String> {
    let range = match family {
        crate::types::Family::V4 => EGRESS_V4_RANGE,
        crate::types::Family::V6 => EGRESS_V6_RANGE,
    };
    [
        "-d",
        range,
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        EGRESS_GUARD_COMMENT,
        "-j",
        "REJECT",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// Inserts the egress guard of `family` at the top of `FORWARD` in `ns` unless it is there
/// already; `true` when it was added.
pub fn apply_egress_guard(ns: &Netns, family: crate::types::Family) -> Result<bool> {
    let rule = egress_guard_args(family);
    let mut check = vec![
        "-t".to_string(),
        "filter".into(),
        "-C".into(),
        "FORWARD".into(),
    ];
    check.extend(rule.iter().cloned());
    if iptables_in(ns, family, &check)?.0 {
        return Ok(false);
    }
    let mut insert = vec![
        "-t".to_string(),
        "filter".into(),
        "-I".into(),
        "FORWARD".into(),
        "1".into(),
    ];
    insert.extend(rule);
    let (ok, err) = iptables_in(ns, family, &insert)?;
    if !ok {
        return Err(crate::NetError::invalid(format!(
            "{} -I FORWARD 1 (egress guard): {err}",
            iptables_bin(family)
        )));
    }
    Ok(true)
}

/// The iptables binary of `family` (`iptables` or `ip6tables`).
pub fn iptables_bin(family: crate::types::Family) -> &'static str {
    match family {
        crate::types::Family::V4 => "iptables",
        crate::types::Family::V6 => "ip6tables",
    }
}

/// Runs `iptables`/`ip6tables -w 5 <args>` inside `ns`, the way the plans above are applied:
/// `Ok((true, stdout))` on success, `Ok((false, stderr))` on exit status 1 (`-C` finding no
/// rule, `-N` of an existing chain, ...), an error for anything else.
pub fn iptables_in(
    ns: &Netns,
    family: crate::types::Family,
    args: &[String],
) -> Result<(bool, String)> {
    let mut v = vec!["-w".to_string(), "5".into()];
    v.extend(args.iter().cloned());
    let bin = iptables_bin(family);
    ns.run(|| run(bin, &v, None))?
}

/// The connmark backend the reference would pick inside `ns` (`iptables --version`).
pub fn detect_connmark_backend(ns: &Netns) -> Result<ConnmarkBackend> {
    let out = ns.run(|| must("iptables", &["--version".into()], None))??;
    Ok(ConnmarkBackend::from_version_output(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SnatConfig {
        SnatConfig {
            primary_ip: Ipv4Addr::new(10, 0, 0, 10),
            primary_if: "eth0".into(),
            vpc_cidrs: vec![
                "10.0.0.0/16".parse().expect("c"),
                "100.64.0.0/16".parse().expect("c"),
            ],
            exclude_cidrs: vec![
                "192.168.0.0/16".parse().expect("c"),
                "fd00::/8".parse().expect("c"),
            ],
            external_snat: false,
            randomize: RandomizeSnat::Prng,
            node_port_support: true,
            veth_prefix: "eni".into(),
            connmark: DEFAULT_CONNMARK,
        }
    }

    fn lines(rules: &[IptRule]) -> Vec<String> {
        rules.iter().map(IptRule::to_save_line).collect()
    }

    #[test]
    fn snat_chain_returns_for_vpc_and_excluded_cidrs_then_snats_to_the_primary_ip() {
        let p = snat_plan(&cfg());
        assert_eq!(p.chains.len(), 1);
        assert_eq!(
            lines(&p.chains[0].rules),
            vec![
                "-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
                "-A AWS-SNAT-CHAIN-0 -d 100.64.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
                "-A AWS-SNAT-CHAIN-0 -d 192.168.0.0/16 -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN",
                "-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10 --random-fully",
            ]
        );
        assert_eq!(
            lines(&p.present),
            vec!["-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0"]
        );
        assert!(p.absent.is_empty() && p.remove_chains.is_empty());
    }

    #[test]
    fn port_flag_follows_randomizesnat_and_invalid_means_prng() {
        for (v, flag) in [
            ("prng", Some("--random-fully")),
            ("hashrandom", Some("--random")),
            ("none", None),
            ("bogus", Some("--random-fully")),
        ] {
            let mut c = cfg();
            c.randomize = RandomizeSnat::from_env_value(v);
            let p = snat_plan(&c);
            let last = p.chains[0]
                .rules
                .last()
                .expect("snat")
                .args
                .last()
                .cloned()
                .expect("arg");
            match flag {
                Some(f) => assert_eq!(last, f, "{v}"),
                None => assert_eq!(last, "10.0.0.10", "{v}"),
            }
        }
    }

    #[test]
    fn an_all_addresses_exclusion_is_a_bare_return() {
        let mut c = cfg();
        c.exclude_cidrs = vec!["0.0.0.0/0".parse().expect("c")];
        let p = snat_plan(&c);
        assert!(lines(&p.chains[0].rules).contains(
            &"-A AWS-SNAT-CHAIN-0 -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN"
                .to_string()
        ));
    }

    #[test]
    fn external_snat_removes_jump_chain_connmark_and_keeps_1024_only_with_node_port() {
        let mut c = cfg();
        c.external_snat = true;
        let p = snat_plan(&c);
        assert!(p.chains.is_empty() && p.present.is_empty());
        assert_eq!(p.absent.len(), 1);
        assert_eq!(
            p.remove_chains,
            vec![("nat".to_string(), SNAT_CHAIN.to_string())]
        );
        assert!(connmark_nft_script(&c).is_none());
        let cm = connmark_iptables_plan(&c);
        assert!(cm.chains.is_empty() && cm.present.is_empty() && cm.reappend.is_empty());
        assert_eq!(
            cm.remove_chains,
            vec![("nat".to_string(), CONNMARK_CHAIN.to_string())]
        );
        assert!(connmark_rule(&c).1);
        c.node_port_support = false;
        assert!(!connmark_rule(&c).1);
        let m = mangle_plan(&c);
        assert!(m.present.is_empty());
        assert_eq!(m.absent.len(), 3);
        assert!(c
            .exempt_cidrs()
            .iter()
            .all(|x| x.to_string() != "192.168.0.0/16"));
    }

    #[test]
    fn mangle_rules_mark_node_port_traffic_and_restore_for_pods() {
        let p = mangle_plan(&cfg());
        assert_eq!(
            lines(&p.present),
            vec![
                "-A PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80",
                "-A PREROUTING -i eni+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
                "-A PREROUTING -i vlan+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
            ]
        );
    }

    #[test]
    fn connmark_chain_returns_for_exempt_cidrs_then_sets_the_mark() {
        let p = connmark_iptables_plan(&cfg());
        assert_eq!(
            lines(&p.chains[0].rules),
            vec![
                "-A AWS-CONNMARK-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN",
                "-A AWS-CONNMARK-CHAIN-0 -d 100.64.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN",
                "-A AWS-CONNMARK-CHAIN-0 -d 192.168.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN",
                "-A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80",
            ]
        );
        assert_eq!(
            lines(&p.present),
            vec!["-A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0"]
        );
        assert_eq!(p.reappend.len(), 1);
        assert!(p.absent[0].args.contains(&"NEW".to_string()));
    }

    #[test]
    fn nft_script_has_the_reference_chains_in_order() {
        let s = connmark_nft_script(&cfg()).expect("script");
        let body: Vec<&str> = s.lines().map(str::trim).collect();
        assert_eq!(
            body,
            vec![
                "table ip aws-cni {",
                "chain nat-prerouting {",
                "type nat hook prerouting priority -90; policy accept;",
                "fib daddr type local return",
                "iifname \"eni*\" counter jump snat-mark",
                "counter meta mark set ct mark and 0x80",
                "}",
                "chain snat-mark {",
                "ip daddr 10.0.0.0/16 return",
                "ip daddr 100.64.0.0/16 return",
                "ip daddr 192.168.0.0/16 return",
                "ct mark set ct mark or 0x80",
                "}",
                "}",
            ]
        );
    }

    #[test]
    fn restore_input_declares_flushes_and_fills_owned_chains() {
        let p = snat_plan(&cfg());
        let chains: Vec<&OwnedChain> = p.chains.iter().collect();
        let s = restore_input("nat", &chains);
        assert!(s.starts_with("*nat\n:AWS-SNAT-CHAIN-0 - [0:0]\n-F AWS-SNAT-CHAIN-0\n"));
        assert!(s.ends_with("--random-fully\nCOMMIT\n"));
    }

    #[test]
    fn backend_choice_follows_iptables_version() {
        assert_eq!(
            ConnmarkBackend::from_version_output("iptables v1.8.9 (legacy)"),
            ConnmarkBackend::Iptables
        );
        assert_eq!(
            ConnmarkBackend::from_version_output("iptables v1.8.9 (nf_tables)"),
            ConnmarkBackend::Nftables
        );
    }

    #[test]
    fn bad_configs_are_rejected() {
        let mut c = cfg();
        c.connmark = 0;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.veth_prefix = "en i".into();
        assert!(c.validate().is_err());
        assert!(cfg().validate().is_ok());
    }
}
