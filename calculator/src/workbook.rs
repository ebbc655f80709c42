//! Workbook mode: the EKS Best Practices `subnet-calc.xlsx`, formula for formula.
//!
//! Both calculator sheets are reproduced with their quirks, so a planner gets the numbers the
//! spreadsheet shows: pods divided by addresses per ENI *including* the primary, "Host
//! Networking IPs" added to every node's usage, zero pods meaning zero ENIs, no ENI or max-pods
//! cap, subnet capacity `2^(32-n) - 2`, and on the WarmIP sheet totals that ignore the target
//! (column Q uses the hidden column K). Instance data are the workbook's 2022 table
//! ([`crate::limits::workbook_instance`]). See `exact` for what a real node does.

use serde::Serialize;

use crate::limits::workbook_instance;
use crate::plan::{InputError, NodeGroupSpec, PlanInput};

/// Which calculator sheet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sheet {
    /// Sheet `WarmENI` (target in B13 = `WARM_ENI_TARGET`).
    WarmEni,
    /// Sheet `WarmIP` (target in B13 = `WARM_IP_TARGET`).
    WarmIp,
}

impl std::str::FromStr for Sheet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "warm-eni" => Ok(Self::WarmEni),
            "warm-ip" => Ok(Self::WarmIp),
            _ => Err(format!(
                "unknown sheet `{s}` (expected warm-eni or warm-ip)"
            )),
        }
    }
}

/// Columns A to I of an instance row: the inputs, the instance lookups and the in-use ENIs,
/// identical on both sheets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowBasis {
    /// A: instance type.
    pub instance_type: String,
    /// B: # of Instances.
    pub instances: u32,
    /// C: Target Workload Pods per Node.
    pub pods_per_node: u32,
    /// D: Max ENIs per Instance (PI).
    pub max_enis_per_instance: u32,
    /// E: IPs per ENI PI.
    pub ips_per_eni: u32,
    /// F: Max Pods PI.
    pub max_pods: u32,
    /// G: Max IPv4 PI.
    pub max_ipv4: u32,
    /// H: Raw ENIs needed PI (a real number).
    pub raw_enis_needed: f64,
    /// I: in use ENIs PI.
    pub in_use_enis: u32,
}

impl RowBasis {
    fn compute(i: usize, g: &NodeGroupSpec) -> Result<Self, InputError> {
        let w = workbook_instance(&g.instance_type).map_err(|e| {
            InputError::new(format!("node_groups[{i}].instance_type"), e.to_string())
        })?;
        let (d, e, c) = (w.max_eni, w.ipv4_addr, g.pods_per_node);
        Ok(Self {
            instance_type: g.instance_type.clone(),
            instances: g.count,
            pods_per_node: c,
            max_enis_per_instance: d,
            ips_per_eni: e,
            max_pods: w.max_pods,
            max_ipv4: d * e,
            raw_enis_needed: f64::from(c) / f64::from(e),
            in_use_enis: c.div_ceil(e),
        })
    }
}

/// One row of sheet `WarmENI` (table `Table3`, columns A..O).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarmEniRow {
    /// Columns A to I, shared by both sheets.
    #[serde(flatten)]
    pub basis: RowBasis,
    /// J: with warm ENI PI.
    pub with_warm_eni: u32,
    /// K: Actual IPs PI.
    pub actual_ips: u32,
    /// L: Used IPs PI.
    pub used_ips: u32,
    /// M: Total Pods PI.
    pub total_pods: u64,
    /// N: IPs Total.
    pub ips_total: u64,
    /// O: Pods Total.
    pub pods_total: u64,
}

/// One row of sheet `WarmIP` (table `Table36`, columns A..Q; I, J, K hidden in the sheet).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarmIpRow {
    /// Columns A to I, shared by both sheets.
    #[serde(flatten)]
    pub basis: RowBasis,
    /// J (hidden): Actual IPs PI.
    pub actual_ips: u32,
    /// K (hidden): Used IPs PI.
    pub used_ips: u32,
    /// L: Warm ENIs Needed.
    pub warm_enis_needed: u32,
    /// M: in use ENIs PI -.
    pub in_use_enis_with_warm: u32,
    /// N: Actual IPs PI -.
    pub actual_ips_shown: u32,
    /// O: Used IPs PI -.
    pub used_ips_shown: u32,
    /// P: Total Pods.
    pub total_pods: u64,
    /// Q: IPs Total (from the hidden K, not O).
    pub ips_total: u64,
}

/// Rows of one sheet.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Rows {
    /// WarmENI rows.
    WarmEni(Vec<WarmEniRow>),
    /// WarmIP rows.
    WarmIp(Vec<WarmIpRow>),
}

/// The sheet's summary cells and rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkbookReport {
    /// Sheet computed.
    pub sheet: Sheet,
    /// B4: subnet prefix length.
    pub cidr_size: u8,
    /// B13: the sheet's target.
    pub target: u32,
    /// B14: Host Networking IPs.
    pub host_networking_ips: u32,
    /// B5: total available IPs (`2^(32-n) - 2`).
    pub total_available_ips: u64,
    /// B8: Number of IPs Used.
    pub ips_used: u64,
    /// B9: Number of Pods Hosted.
    pub pods_hosted: u64,
    /// B10: # of Subnet IPs Remaining (may be negative).
    pub ips_remaining: i64,
    /// The instance rows.
    pub rows: Rows,
}

/// Computes `sheet` for the plan. Node groups must have been validated by
/// [`PlanInput::resolve`] (known types, sane counts).
pub fn compute(input: &PlanInput, sheet: Sheet) -> Result<WorkbookReport, InputError> {
    let n = input.subnet.prefix_len()?;
    if !(1..=30).contains(&n) {
        return Err(InputError::new(
            "subnet",
            format!("/{n}: the workbook knows /1 to /30"),
        ));
    }
    let total = (1u64 << (32 - u32::from(n))) - 2;
    let host = input.host_networking_ips;
    let mut pods_hosted = 0u64;
    let mut ips_used = 0u64;
    let (target, rows) = match sheet {
        Sheet::WarmEni => {
            let t = input.config.warm_eni_target;
            let mut rows = Vec::new();
            for (i, g) in input.node_groups.iter().enumerate() {
                let basis = RowBasis::compute(i, g)?;
                let (e, c, b) = (basis.ips_per_eni, basis.pods_per_node, u64::from(g.count));
                let j = basis.in_use_enis + t;
                let l = j * e + host;
                let row = WarmEniRow {
                    basis,
                    with_warm_eni: j,
                    actual_ips: c + host,
                    used_ips: l,
                    total_pods: u64::from(c) * b,
                    ips_total: u64::from(l) * b,
                    pods_total: u64::from(c) * b,
                };
                pods_hosted += row.pods_total;
                ips_used += row.ips_total;
                rows.push(row);
            }
            (t, Rows::WarmEni(rows))
        }
        Sheet::WarmIp => {
            let t = input.config.warm_ip_target;
            let mut rows = Vec::new();
            for (i, g) in input.node_groups.iter().enumerate() {
                let basis = RowBasis::compute(i, g)?;
                let (e, c, b) = (basis.ips_per_eni, basis.pods_per_node, u64::from(g.count));
                let in_use = basis.in_use_enis;
                let actual = c + host;
                let used = in_use * e + host;
                let warm = u32::from(i64::from(used) - i64::from(actual) < i64::from(t));
                let m = in_use + warm;
                let row = WarmIpRow {
                    basis,
                    actual_ips: actual,
                    used_ips: used,
                    warm_enis_needed: warm,
                    in_use_enis_with_warm: m,
                    actual_ips_shown: actual,
                    used_ips_shown: m * e,
                    total_pods: u64::from(c) * b,
                    ips_total: u64::from(used) * b,
                };
                pods_hosted += row.total_pods;
                ips_used += row.ips_total;
                rows.push(row);
            }
            (t, Rows::WarmIp(rows))
        }
    };
    Ok(WorkbookReport {
        sheet,
        cidr_size: n,
        target,
        host_networking_ips: host,
        total_available_ips: total,
        ips_used,
        pods_hosted,
        ips_remaining: total as i64 - ips_used as i64,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "subnet: {prefix_length: 23}
config: {warm_eni_target: 1, warm_ip_target: 1}
host_networking_ips: 2
daemonset_pods: 2
node_groups:
  - {instance_type: m5.12xlarge, count: 2, pods_per_node: 100}
  - {instance_type: c5.2xlarge, count: 1, pods_per_node: 30}
";

    fn example(sheet: Sheet) -> WorkbookReport {
        compute(&PlanInput::parse(EXAMPLE).expect("parse"), sheet).expect("compute")
    }

    /// The workbook's own example rows and summary cells (spec/calculator.md 1.4).
    #[test]
    fn warm_eni_sheet_matches_the_workbook_cells() {
        let r = example(Sheet::WarmEni);
        assert_eq!(
            (
                r.total_available_ips,
                r.ips_used,
                r.pods_hosted,
                r.ips_remaining
            ),
            (510, 351, 230, 159)
        );
        let Rows::WarmEni(rows) = r.rows else {
            panic!("sheet")
        };
        let a = &rows[0];
        assert_eq!(
            (
                a.basis.max_enis_per_instance,
                a.basis.ips_per_eni,
                a.basis.max_pods,
                a.basis.max_ipv4
            ),
            (8, 30, 234, 240)
        );
        assert!((a.basis.raw_enis_needed - 3.333_333_333_333_333_5).abs() < 1e-12);
        assert_eq!(
            (
                a.basis.in_use_enis,
                a.with_warm_eni,
                a.actual_ips,
                a.used_ips
            ),
            (4, 5, 102, 152)
        );
        assert_eq!((a.total_pods, a.ips_total, a.pods_total), (200, 304, 200));
        let b = &rows[1];
        assert_eq!(
            (
                b.basis.max_enis_per_instance,
                b.basis.ips_per_eni,
                b.basis.max_pods,
                b.basis.max_ipv4
            ),
            (4, 15, 58, 60)
        );
        assert!((b.basis.raw_enis_needed - 2.0).abs() < 1e-12);
        assert_eq!(
            (
                b.basis.in_use_enis,
                b.with_warm_eni,
                b.actual_ips,
                b.used_ips
            ),
            (2, 3, 32, 47)
        );
        assert_eq!((b.total_pods, b.ips_total, b.pods_total), (30, 47, 30));
    }

    /// spec/calculator.md 1.5.
    #[test]
    fn warm_ip_sheet_matches_the_workbook_cells_quirks_included() {
        let r = example(Sheet::WarmIp);
        assert_eq!(
            (
                r.total_available_ips,
                r.ips_used,
                r.pods_hosted,
                r.ips_remaining
            ),
            (510, 276, 230, 234)
        );
        let Rows::WarmIp(rows) = r.rows else {
            panic!("sheet")
        };
        let a = &rows[0];
        assert_eq!(
            (a.basis.in_use_enis, a.actual_ips, a.used_ips),
            (4, 102, 122)
        );
        assert_eq!(
            (
                a.warm_enis_needed,
                a.in_use_enis_with_warm,
                a.actual_ips_shown,
                a.used_ips_shown
            ),
            (0, 4, 102, 120)
        );
        assert_eq!((a.total_pods, a.ips_total), (200, 244));
        let b = &rows[1];
        assert_eq!((b.basis.in_use_enis, b.actual_ips, b.used_ips), (2, 32, 32));
        assert_eq!(
            (
                b.warm_enis_needed,
                b.in_use_enis_with_warm,
                b.actual_ips_shown,
                b.used_ips_shown
            ),
            (1, 3, 32, 45)
        );
        assert_eq!((b.total_pods, b.ips_total), (30, 32));
    }

    #[test]
    fn warm_ip_totals_ignore_the_target() {
        let big = EXAMPLE.replace("warm_ip_target: 1", "warm_ip_target: 100");
        let r = compute(&PlanInput::parse(&big).expect("parse"), Sheet::WarmIp).expect("ok");
        assert_eq!(r.ips_used, 276);
        let Rows::WarmIp(rows) = r.rows else {
            panic!("sheet")
        };
        assert_eq!(
            rows[0].warm_enis_needed, 1,
            "at most one warm ENI whatever the target"
        );
    }

    #[test]
    fn zero_pods_means_zero_enis_and_remaining_may_go_negative() {
        let text = "subnet: {prefix_length: 28}
node_groups: [{instance_type: m5.large, count: 3, pods_per_node: 0}]";
        let r = compute(&PlanInput::parse(text).expect("parse"), Sheet::WarmEni).expect("ok");
        let Rows::WarmEni(rows) = &r.rows else {
            panic!("sheet")
        };
        assert_eq!(rows[0].basis.in_use_enis, 0);
        assert_eq!(r.total_available_ips, 14);
        assert_eq!(r.ips_used, 3 * 12);
        assert_eq!(r.ips_remaining, 14 - 36);
    }
}
