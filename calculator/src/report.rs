//! Text renderings of the reports: aligned tables for people, JSON and CSV for tools.

use std::fmt::Write as _;

use serde::Serialize;

use crate::exact::ExactReport;
use crate::maxpods::{AllCards, MaxPods};
use crate::node::Ec2Action;
use crate::timeline::TimelineReport;
use crate::workbook::{Rows, WorkbookReport};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned text table.
    Table,
    /// JSON (pretty).
    Json,
    /// CSV with a header row.
    Csv,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            _ => Err(format!(
                "unknown format `{s}` (expected table, json or csv)"
            )),
        }
    }
}

/// Pretty JSON with a trailing newline.
pub fn json<T: Serialize>(v: &T) -> String {
    match serde_json::to_string_pretty(v) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        // The report types serialize infallibly (no maps with non-string keys).
        Err(e) => format!("{{\"error\": \"{e}\"}}\n"),
    }
}

/// A simple aligned table: first column left-aligned, the rest right-aligned.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Self {
        Self {
            head: head.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let n = self.head.len();
        let mut w = vec![0; n];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (k, r) in std::iter::once(&self.head).chain(&self.rows).enumerate() {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                if i == 0 {
                    let _ = write!(line, "{c:<width$}", width = w[0]);
                } else {
                    let _ = write!(line, "  {c:>width$}", width = w[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
            if k == 0 {
                let total: usize = w.iter().sum::<usize>() + 2 * (n - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }

    fn csv(&self) -> String {
        let mut out = String::new();
        for r in std::iter::once(&self.head).chain(&self.rows) {
            let cells: Vec<String> = r.iter().map(|c| csv_cell(c)).collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }
}

fn csv_cell(c: &str) -> String {
    if c.contains([',', '"', '\n']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_owned()
    }
}

fn exact_table(r: &ExactReport) -> Table {
    let mut t = Table::new(&[
        "instance_type",
        "nodes",
        "pods_per_node",
        "max_pods",
        "enis_per_node",
        "pod_ips_per_node",
        "unused_pod_ips_per_node",
        "subnet_ips_per_node",
        "pods_without_ip_per_node",
        "subnet_ips_total",
        "pods_without_ip_total",
    ]);
    for g in &r.node_groups {
        t.row(vec![
            g.instance_type.clone(),
            g.count.to_string(),
            g.pods_per_node.to_string(),
            g.max_pods.to_string(),
            g.enis_per_node.to_string(),
            g.pod_ips_per_node.to_string(),
            g.unused_pod_ips_per_node.to_string(),
            g.subnet_ips_per_node.to_string(),
            g.pods_without_ip_per_node.to_string(),
            g.subnet_ips_total.to_string(),
            g.pods_without_ip_total.to_string(),
        ]);
    }
    t
}

/// Renders an exact-mode report.
pub fn exact(r: &ExactReport, f: Format) -> String {
    match f {
        Format::Json => json(r),
        Format::Csv => exact_table(r).csv(),
        Format::Table => {
            let mut out = format!(
                "Exact mode ({} policy): steady state after pods arrive one by one, every timer elapsed\n\n",
                policy_name(r)
            );
            out.push_str(&exact_table(r).render());
            let s = &r.subnet;
            let _ = writeln!(
                out,
                "\nsubnet {}: {} usable, {} used, {} remaining; pods hosted: {}",
                s.cidr, s.usable_ips, s.ips_used, s.ips_remaining, r.pods_hosted
            );
            if let Some(p) = s.prefix_capacity {
                let _ = writeln!(
                    out,
                    "/28 prefixes still obtainable: {} if the other addresses are packed, {} if scattered",
                    p.best, p.worst
                );
            }
            for g in &r.node_groups {
                for w in &g.warnings {
                    let _ = writeln!(out, "warning: {}: {w}", g.instance_type);
                }
            }
            for w in &r.warnings {
                let _ = writeln!(out, "warning: {w}");
            }
            out
        }
    }
}

fn policy_name(r: &ExactReport) -> &'static str {
    r.policy.name()
}

const BASIS_HEAD: [&str; 9] = [
    "A instance type",
    "B instances",
    "C pods/node",
    "D max ENIs",
    "E IPs/ENI",
    "F max pods",
    "G max IPv4",
    "H raw ENIs",
    "I in-use ENIs",
];

fn basis_cells(b: &crate::workbook::RowBasis) -> Vec<String> {
    vec![
        b.instance_type.clone(),
        b.instances.to_string(),
        b.pods_per_node.to_string(),
        b.max_enis_per_instance.to_string(),
        b.ips_per_eni.to_string(),
        b.max_pods.to_string(),
        b.max_ipv4.to_string(),
        format!("{:.4}", b.raw_enis_needed),
        b.in_use_enis.to_string(),
    ]
}

fn workbook_table(r: &WorkbookReport) -> Table {
    let (rest_head, rows): (&[&str], Vec<Vec<String>>) = match &r.rows {
        Rows::WarmEni(rows) => (
            &[
                "J with warm ENI",
                "K actual IPs",
                "L used IPs",
                "M total pods",
                "N IPs total",
                "O pods total",
            ],
            rows.iter()
                .map(|x| {
                    let mut cells = basis_cells(&x.basis);
                    cells.extend([
                        x.with_warm_eni.to_string(),
                        x.actual_ips.to_string(),
                        x.used_ips.to_string(),
                        x.total_pods.to_string(),
                        x.ips_total.to_string(),
                        x.pods_total.to_string(),
                    ]);
                    cells
                })
                .collect(),
        ),
        Rows::WarmIp(rows) => (
            &[
                "J actual IPs*",
                "K used IPs*",
                "L warm ENIs",
                "M in-use ENIs -",
                "N actual IPs -",
                "O used IPs -",
                "P total pods",
                "Q IPs total",
            ],
            rows.iter()
                .map(|x| {
                    let mut cells = basis_cells(&x.basis);
                    cells.extend([
                        x.actual_ips.to_string(),
                        x.used_ips.to_string(),
                        x.warm_enis_needed.to_string(),
                        x.in_use_enis_with_warm.to_string(),
                        x.actual_ips_shown.to_string(),
                        x.used_ips_shown.to_string(),
                        x.total_pods.to_string(),
                        x.ips_total.to_string(),
                    ]);
                    cells
                })
                .collect(),
        ),
    };
    let head: Vec<&str> = BASIS_HEAD.iter().chain(rest_head).copied().collect();
    let mut t = Table::new(&head);
    for row in rows {
        t.row(row);
    }
    t
}

/// Renders a workbook-mode report.
pub fn workbook(r: &WorkbookReport, f: Format) -> String {
    match f {
        Format::Json => json(r),
        Format::Csv => workbook_table(r).csv(),
        Format::Table => {
            let sheet = match r.rows {
                Rows::WarmEni(_) => "WarmENI (B13 = WARM_ENI_TARGET)",
                Rows::WarmIp(_) => "WarmIP (B13 = WARM_IP_TARGET; * hidden columns)",
            };
            let mut out = format!(
                "Workbook mode, sheet {sheet}: B4 = /{}, B13 = {}, B14 host networking IPs = {}\n\n",
                r.cidr_size, r.target, r.host_networking_ips
            );
            out.push_str(&workbook_table(r).render());
            let _ = writeln!(
                out,
                "\nB5 total available IPs: {}\nB8 number of IPs used: {}\nB9 number of pods hosted: {}\nB10 subnet IPs remaining: {}",
                r.total_available_ips, r.ips_used, r.pods_hosted, r.ips_remaining
            );
            out
        }
    }
}

/// Both modes for the same plan.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison<'a> {
    /// The workbook's answer.
    pub workbook: &'a WorkbookReport,
    /// What real nodes do.
    pub exact: &'a ExactReport,
}

/// Renders the workbook and exact results side by side.
pub fn compare(w: &WorkbookReport, e: &ExactReport, f: Format) -> String {
    let mut t = Table::new(&["", "workbook", "exact", "difference"]);
    let diff = |a: i64, b: i64| format!("{:+}", b - a);
    let row = |t: &mut Table, name: &str, a: i64, b: i64| {
        t.row(vec![
            name.to_owned(),
            a.to_string(),
            b.to_string(),
            diff(a, b),
        ]);
    };
    row(
        &mut t,
        "subnet capacity",
        w.total_available_ips as i64,
        i64::from(e.subnet.usable_ips),
    );
    row(
        &mut t,
        "subnet IPs used",
        w.ips_used as i64,
        e.subnet.ips_used as i64,
    );
    row(
        &mut t,
        "subnet IPs remaining",
        w.ips_remaining,
        e.subnet.ips_remaining,
    );
    row(
        &mut t,
        "pods hosted",
        w.pods_hosted as i64,
        e.pods_hosted as i64,
    );
    let per_node: Vec<i64> = match &w.rows {
        Rows::WarmEni(r) => r.iter().map(|x| i64::from(x.used_ips)).collect(),
        Rows::WarmIp(r) => r.iter().map(|x| i64::from(x.used_ips)).collect(),
    };
    for (g, wb) in e.node_groups.iter().zip(per_node) {
        row(
            &mut t,
            &format!("subnet IPs per {} node", g.instance_type),
            wb,
            i64::from(g.subnet_ips_per_node),
        );
    }
    match f {
        Format::Json => json(&Comparison {
            workbook: w,
            exact: e,
        }),
        Format::Csv => t.csv(),
        Format::Table => {
            let mut out = String::from("Workbook vs exact (what real nodes do)\n\n");
            out.push_str(&t.render());
            out.push('\n');
            out.push_str(&workbook(w, Format::Table));
            out.push('\n');
            out.push_str(&exact(e, Format::Table));
            out
        }
    }
}

/// Renders a max-pods answer. The table format is just the number, like the EKS AMI script.
pub fn max_pods(m: &MaxPods, f: Format, explain: bool) -> String {
    match f {
        Format::Json => json(m),
        Format::Csv => {
            let mut t = Table::new(&[
                "instance_type",
                "max_pods",
                "max_allowed",
                "enis",
                "ipv4_per_eni",
                "prefix_delegation",
                "vcpus",
                "branch_pods",
                "default_card_only",
                "max_pods_all_cards",
                "enis_all_cards",
            ]);
            let all = m.all_cards.as_ref();
            t.row(vec![
                m.instance_type.clone(),
                m.max_pods.to_string(),
                m.max_allowed.to_string(),
                m.enis.to_string(),
                m.ipv4_per_eni.to_string(),
                m.prefix_delegation_applied.to_string(),
                m.vcpus.to_string(),
                m.security_groups_for_pods
                    .as_ref()
                    .map_or(0, |b| b.branch_pods)
                    .to_string(),
                m.default_card_only.to_string(),
                all.map_or(m.max_pods, |a| a.max_pods).to_string(),
                all.map_or(m.enis, |a| a.enis).to_string(),
            ]);
            t.csv()
        }
        Format::Table if !explain => format!("{}\n", m.max_pods),
        Format::Table if m.ipv6 => {
            let mut out = format!(
                "{}\n{}: IPv6, no per-ENI address limit: the ceiling for {} vCPUs ({} 30)\n",
                m.max_pods,
                m.instance_type,
                m.vcpus,
                if m.vcpus > 30 { ">" } else { "<=" }
            );
            for n in &m.notes {
                let _ = writeln!(out, "note: {n}");
            }
            out
        }
        Format::Table => {
            let per = if m.prefix_delegation_applied {
                format!("({} - 1) x 16", m.ipv4_per_eni)
            } else {
                format!("({} - 1)", m.ipv4_per_eni)
            };
            let branch = match &m.security_groups_for_pods {
                Some(b) if b.trunk_attached => format!(
                    " + {} branch pods (trunk ENI in one slot, {} branches at most)",
                    b.branch_pods, b.branch_limit
                ),
                _ => String::new(),
            };
            let mut out = format!(
                "{}\n{}: {} ENIs x {per} + 2{branch} = {}",
                m.max_pods, m.instance_type, m.enis, m.max_allowed
            );
            if let Some(c) = m.ceiling {
                let _ = write!(
                    out,
                    ", capped at {c} ({} vCPUs {} 30)",
                    m.vcpus,
                    if m.vcpus > 30 { ">" } else { "<=" }
                );
            }
            out.push('\n');
            if let Some(all) = &m.all_cards {
                out.push_str(&all_cards_text(m, all));
            }
            for n in &m.notes {
                let _ = writeln!(out, "note: {n}");
            }
            out
        }
    }
}

/// The line that flags a default-card-only answer on a multi-card type.
pub fn default_card_flag(m: &MaxPods) -> Option<String> {
    let all = m.all_cards.as_ref().filter(|_| m.default_card_only)?;
    Some(format!(
        "{} counts the default network card only (script-compatible); {} has {} cards: {} over every card with ENABLE_MULTI_NIC (--all-cards), {} when every pod is multi-NIC",
        m.max_pods,
        m.instance_type,
        all.cards.len(),
        all.max_pods,
        all.multi_nic_max_pods
    ))
}

fn all_cards_text(m: &MaxPods, all: &AllCards) -> String {
    let mut out = String::new();
    if let Some(flag) = default_card_flag(m) {
        let _ = writeln!(out, "{flag}");
    }
    let _ = writeln!(
        out,
        "every card (ENABLE_MULTI_NIC): {} ENIs, {} = {} pod addresses + 2{}{}; multi-NIC pods: {}; subnet addresses when full: {}",
        all.enis,
        all.max_allowed,
        all.cards.iter().map(|c| c.pod_addresses).sum::<u32>(),
        m.security_groups_for_pods
            .as_ref()
            .filter(|b| b.trunk_attached)
            .map_or(String::new(), |b| format!(" + {} branch pods", b.branch_pods)),
        if all.max_pods < all.max_allowed {
            format!(", capped at {}", all.max_pods)
        } else {
            String::new()
        },
        all.multi_nic_max_pods,
        all.subnet_addresses_full
    );
    let mut t = Table::new(&[
        "card",
        "max_enis",
        "pod_enis",
        "pod_addresses",
        "subnet_full",
        "subnet_idle",
    ]);
    for c in &all.cards {
        t.row(vec![
            c.network_card.to_string(),
            c.max_enis.to_string(),
            c.enis.to_string(),
            c.pod_addresses.to_string(),
            c.subnet_addresses_full.to_string(),
            c.subnet_addresses_idle
                .map_or_else(|| "warm targets".to_owned(), |v| v.to_string()),
        ]);
    }
    out.push_str(&t.render());
    out
}

fn hms(t: u64) -> String {
    format!("{:02}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60)
}

fn timeline_table(r: &TimelineReport) -> Table {
    let mut head = vec![
        "time",
        "pods_wanted",
        "pods_pending",
        "allocated_ips",
        "assigned_ips",
        "warm_ips",
        "cooling_ips",
        "enis",
        "ec2_calls",
        "ec2_mutating_calls",
    ];
    let names: Vec<String> = r
        .subnets
        .iter()
        .map(|s| format!("free_{}", s.name))
        .collect();
    head.extend(names.iter().map(String::as_str));
    let mut t = Table::new(&head);
    for s in &r.samples {
        let mut row = vec![
            hms(s.t),
            s.pods_wanted.to_string(),
            s.pods_pending.to_string(),
            s.allocated_ips.to_string(),
            s.assigned_ips.to_string(),
            s.warm_ips.to_string(),
            s.cooling_ips.to_string(),
            s.enis.to_string(),
            s.ec2_calls.to_string(),
            s.ec2_mutating_calls.to_string(),
        ];
        row.extend(s.subnet_free.iter().map(u32::to_string));
        t.row(row);
    }
    t
}

/// Renders a timeline report. The table shows the summary and at most `max_rows` samples.
pub fn timeline(r: &TimelineReport, f: Format, max_rows: usize) -> String {
    match f {
        Format::Json => json(r),
        Format::Csv => {
            let mut t = timeline_table(r);
            t.head[0] = "t_seconds".into();
            for (row, s) in t.rows.iter_mut().zip(&r.samples) {
                row[0] = s.t.to_string();
            }
            t.csv()
        }
        Format::Table => {
            let policy = r.policy.name();
            let mut out = format!(
                "Timeline ({policy} policy): {} nodes over {}, tick {} s\n\n",
                r.nodes,
                hms(r.duration),
                r.tick
            );
            let mut t = timeline_table(r);
            if t.rows.len() > max_rows && max_rows > 1 {
                let step = t.rows.len().div_ceil(max_rows - 1);
                let last = t.rows.len() - 1;
                t.rows = t
                    .rows
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % step == 0 || *i == last)
                    .map(|(_, r)| r)
                    .collect();
            }
            out.push_str(&t.render());
            let _ = writeln!(
                out,
                "\nEC2 calls: {} ({} mutating)",
                r.ec2_calls.total(),
                r.ec2_calls.mutating()
            );
            for a in Ec2Action::ALL {
                let n = r.ec2_calls.get(a);
                if n > 0 {
                    let _ = writeln!(out, "  {:<34}{n:>10}", a.name());
                }
            }
            let _ = writeln!(
                out,
                "most pods waiting for an address at once: {}; pod-seconds waiting: {}",
                r.max_pods_pending, r.pending_pod_seconds
            );
            let _ = writeln!(
                out,
                "idle pod addresses (allocated - assigned): {:.1} on average, {} at most; most allocated {}",
                r.idle_ips_avg, r.idle_ips_peak, r.allocated_ips_peak
            );
            for s in &r.subnets {
                let _ = writeln!(
                    out,
                    "subnet {} ({}): {} usable, fewest free {}",
                    s.name, s.cidr, s.usable_ips, s.min_free
                );
            }
            if r.exhaustion.is_empty() {
                out.push_str("no subnet ran out\n");
            }
            for x in &r.exhaustion {
                let _ = writeln!(
                    out,
                    "subnet {} ran out at {} (node group {}: {})",
                    x.subnet,
                    hms(x.at),
                    x.node_group,
                    match x.error {
                        crate::node::CapacityError::NoAddresses =>
                            "InsufficientFreeAddressesInSubnet",
                        crate::node::CapacityError::NoCidrBlocks => "InsufficientCidrBlocks",
                    }
                );
            }
            out
        }
    }
}

/// One policy's run in a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySummary {
    /// Policy.
    pub policy: crate::policy::Flavour,
    /// Idle pod addresses (allocated minus assigned) over the fleet, time-averaged.
    pub idle_ips_avg: f64,
    /// Most idle pod addresses at once.
    pub idle_ips_peak: u64,
    /// Most pod addresses allocated at once.
    pub allocated_ips_peak: u64,
    /// Mutating EC2 calls.
    pub mutating_calls: u64,
    /// All EC2 calls.
    pub ec2_calls: u64,
    /// Pod-seconds spent waiting for an address.
    pub pending_pod_seconds: u64,
    /// Most pods waiting at once.
    pub max_pods_pending: u64,
}

/// The summary line of each report.
pub fn policy_summaries(reports: &[&TimelineReport]) -> Vec<PolicySummary> {
    reports
        .iter()
        .map(|r| PolicySummary {
            policy: r.policy,
            idle_ips_avg: r.idle_ips_avg,
            idle_ips_peak: r.idle_ips_peak,
            allocated_ips_peak: r.allocated_ips_peak,
            mutating_calls: r.ec2_calls.mutating(),
            ec2_calls: r.ec2_calls.total(),
            pending_pod_seconds: r.pending_pod_seconds,
            max_pods_pending: r.max_pods_pending,
        })
        .collect()
}

/// The policies side by side: one row per measure, one column per policy, and each
/// policy's value against the first (the reference) in parentheses.
pub fn policy_comparison(reports: &[&TimelineReport], f: Format) -> String {
    let sums = policy_summaries(reports);
    let mut head = vec!["measure".to_owned()];
    head.extend(sums.iter().map(|s| s.policy.name().to_owned()));
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    let mut t = Table::new(&head_refs);
    let rel = |v: f64, base: f64, i: usize| {
        if i == 0 || f == Format::Csv {
            String::new()
        } else if base > 0.0 {
            format!(" ({:.2}x)", v / base)
        } else {
            String::new()
        }
    };
    type Get = fn(&PolicySummary) -> f64;
    let rows: [(&str, Get, bool); 6] = [
        ("idle_ips_avg", |s| s.idle_ips_avg, true),
        ("idle_ips_peak", |s| s.idle_ips_peak as f64, false),
        ("allocated_ips_peak", |s| s.allocated_ips_peak as f64, false),
        ("ec2_mutating_calls", |s| s.mutating_calls as f64, false),
        (
            "pod_seconds_waiting",
            |s| s.pending_pod_seconds as f64,
            false,
        ),
        ("max_pods_waiting", |s| s.max_pods_pending as f64, false),
    ];
    for (name, get, decimal) in rows {
        let base = sums.first().map(get).unwrap_or(0.0);
        let mut row = vec![name.to_owned()];
        for (i, s) in sums.iter().enumerate() {
            let v = get(s);
            let text = if decimal {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            };
            row.push(format!("{text}{}", rel(v, base, i)));
        }
        t.row(row);
    }
    match f {
        Format::Json => json(&sums),
        Format::Csv => t.csv(),
        Format::Table => {
            let mut out = format!(
                "Policies compared: {} nodes over {}, idle = allocated - assigned (cooling included)\n\n",
                reports.first().map_or(0, |r| r.nodes),
                hms(reports.first().map_or(0, |r| r.duration))
            );
            out.push_str(&t.render());
            out
        }
    }
}

/// Renders an IPv6 subnet plan.
pub fn ipv6_plan(p: &crate::ipv6::Ipv6Plan, f: Format) -> String {
    let mut t = Table::new(&[
        "instance_type",
        "nodes",
        "pods_per_node",
        "max_pods",
        "ipv6_prefixes_80",
    ]);
    for g in &p.node_groups {
        t.row(vec![
            g.instance_type.clone(),
            g.nodes.to_string(),
            g.pods_per_node.to_string(),
            g.max_pods.to_string(),
            g.prefixes.to_string(),
        ]);
    }
    match f {
        Format::Json => json(p),
        Format::Csv => t.csv(),
        Format::Table => {
            let mut out = format!(
                "IPv6 plan{}: one /80 per node on the primary ENI\n\n",
                p.ipv6_cidr
                    .as_deref()
                    .map(|c| format!(" for {c}"))
                    .unwrap_or_default()
            );
            out.push_str(&t.render());
            let _ = writeln!(
                out,
                "\n{} nodes, {} pods: {} /80s needed ({} in the worst case, when each node's own IPv6 address spoils one), {} assignable in the /64: {}",
                p.nodes,
                p.pods,
                p.prefixes_needed,
                p.prefixes_worst_case,
                p.prefixes_assignable,
                if p.fits { "fits" } else { "does not fit" }
            );
            let _ = writeln!(
                out,
                "IPv4 addresses from the node subnet: {} (one per node; pods reach IPv4 through it)",
                p.ipv4_addresses
            );
            for w in &p.warnings {
                let _ = writeln!(out, "warning: {w}");
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_csv_quotes() {
        let mut t = Table::new(&["name", "n"]);
        t.row(vec!["a,b".into(), "10".into()]);
        t.row(vec!["long name".into(), "7".into()]);
        let text = t.render();
        assert!(text.contains("long name   7"), "{text}");
        assert!(t.csv().contains("\"a,b\",10"));
    }

    #[test]
    fn durations_print_as_clock_time() {
        assert_eq!(hms(3725), "01:02:05");
    }
}
