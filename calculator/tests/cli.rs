//! The `subnet-calc` binary as a user runs it: outputs, exit codes, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_subnet-calc"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run subnet-calc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("subnet-calc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

#[test]
fn max_pods_prints_the_number_like_the_eks_script() {
    let o = run(&["max-pods", "--instance-type", "m5.large"]);
    assert_eq!(stdout(&o), "29\n");
    let o = run(&[
        "max-pods",
        "--instance-type",
        "m5.large",
        "--cni-prefix-delegation-enabled",
    ]);
    assert_eq!(stdout(&o), "110\n");
    let v = json(&run(&[
        "max-pods",
        "--instance-type",
        "m5.large",
        "--prefix-delegation",
        "--show-max-allowed",
        "--json",
    ]));
    assert_eq!(v["instance_type"], "m5.large");
    assert_eq!(v["max_pods"], 434);
    let v = json(&run(&[
        "max-pods",
        "--instance-type",
        "m5.xlarge",
        "--custom-networking",
        "--json",
    ]));
    assert_eq!(v["max_pods"], 44);
    let v = json(&run(&[
        "max-pods",
        "--instance-type",
        "m5.large",
        "--set",
        "max_enis=2",
        "--json",
    ]));
    assert_eq!(v["max_pods"], 20);
}

#[test]
fn max_pods_with_security_groups_for_pods() {
    // m5.xlarge: 4 ENIs, 15 IPv4 per ENI, 18 branch ENIs: (4-1)*14 + 2 + 18 = 62.
    let sgp = [
        "max-pods",
        "--instance-type",
        "m5.xlarge",
        "--security-groups-for-pods",
    ];
    assert_eq!(stdout(&run(&sgp)), "62\n");
    let o = run(&[&sgp[..], &["--explain"]].concat());
    let out = stdout(&o);
    assert!(
        out.contains("3 ENIs x (15 - 1) + 2 + 18 branch pods") && out.contains("= 62"),
        "{out}"
    );
    let v = json(&run(&[&sgp[..], &["--branch-pods", "4", "--json"]].concat()));
    assert_eq!(v["max_pods"], 48);
    assert_eq!(v["security_groups_for_pods"]["branch_limit"], 18);
    // A branch limit set by hand, and more branch pods than the type carries.
    let v = json(&run(&[
        &sgp[..],
        &["--set", "branch_interfaces=5", "--json"],
    ]
    .concat()));
    assert_eq!(v["max_pods"], 49);
    let o = run(&[&sgp[..], &["--branch-pods", "19"]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--branch-pods 19"), "{}", stderr(&o));
    // Not trunking compatible: t3.medium stays at 3*5 + 2 = 17.
    let o = run(&[
        "max-pods",
        "--instance-type",
        "t3.medium",
        "--security-groups-for-pods",
        "--explain",
    ]);
    assert!(stdout(&o).starts_with("17\n"), "{}", stdout(&o));
    assert!(stdout(&o).contains("not trunking compatible"));
    // --branch-pods needs the flag; a bad --set value is named.
    let o = run(&[
        "max-pods",
        "--instance-type",
        "m5.large",
        "--branch-pods",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&[&sgp[..], &["--set", "trunking_compatible=maybe"]].concat());
    assert!(stderr(&o).contains("trunking_compatible"), "{}", stderr(&o));
}

#[test]
fn unknown_instance_type_fails_with_suggestions_and_no_stdout() {
    let o = run(&["max-pods", "--instance-type", "m5.lage"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
    let e = stderr(&o);
    assert!(e.contains("m5.lage") && e.contains("m5.large"), "{e}");
}

#[test]
fn plan_exact_json_has_the_documented_fields() {
    let f = examples().join("workbook-cluster.yaml");
    let v = json(&run(&[
        "plan",
        f.to_str().expect("path"),
        "--format",
        "json",
    ]));
    assert_eq!(v["subnet"]["usable_ips"], 507);
    assert_eq!(v["subnet"]["ips_used"], 360);
    assert_eq!(v["subnet"]["ips_remaining"], 147);
    assert_eq!(v["pods_hosted"], 230);
    let g = &v["node_groups"][0];
    for k in [
        "instance_type",
        "count",
        "pods_per_node",
        "enis_per_node",
        "pod_ips_per_node",
        "unused_pod_ips_per_node",
        "subnet_ips_per_node",
        "pods_without_ip_per_node",
        "warnings",
    ] {
        assert!(g.get(k).is_some(), "missing {k}");
    }
    assert_eq!(g["enis_per_node"], 5);
}

#[test]
fn plan_workbook_json_has_the_summary_cells() {
    let f = examples().join("workbook-cluster.yaml");
    let path = f.to_str().expect("path");
    let v = json(&run(&[
        "plan", path, "--mode", "workbook", "--format", "json",
    ]));
    assert_eq!(
        (
            v["total_available_ips"].as_u64(),
            v["ips_used"].as_u64(),
            v["pods_hosted"].as_u64(),
            v["ips_remaining"].as_i64()
        ),
        (Some(510), Some(351), Some(230), Some(159))
    );
    assert_eq!(v["rows"][0]["used_ips"], 152);
    let v = json(&run(&[
        "plan", path, "--mode", "workbook", "--sheet", "warm-ip", "--format", "json",
    ]));
    assert_eq!(v["ips_used"], 276);
    let csv = stdout(&run(&[
        "plan", path, "--mode", "workbook", "--format", "csv",
    ]));
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        csv.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("m5.12xlarge,2,100,8,30,234,240")),
        "{csv}"
    );
}

#[test]
fn compare_shows_both_and_writes_a_chart() {
    let f = examples().join("workbook-cluster.yaml");
    let svg = tmp("compare.svg");
    let o = run(&[
        "plan",
        f.to_str().expect("path"),
        "--compare",
        "--svg",
        svg.to_str().expect("p"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("workbook") && text.contains("exact"),
        "{text}"
    );
    assert!(text.contains("351") && text.contains("360"), "{text}");
    let chart = std::fs::read_to_string(&svg).expect("svg written");
    assert!(chart.contains("<svg"));
}

#[test]
fn bad_plans_name_the_field_and_print_nothing() {
    let cases = [
        ("subnet: {cidr: 10.0.0.0/23}\nconfig: {warm_ip_target: -2}\nnode_groups: []", "config.warm_ip_target"),
        ("subnet: {cidr: 10.0.0.0/23}\nconfg: {}\nnode_groups: []", "confg"),
        ("subnet: {cidr: 10.0.0/23}\nnode_groups: []", "subnet.cidr"),
        (
            "subnet: {cidr: 10.0.0.0/23}\nnode_groups: [{instance_type: t3.small, count: 1, pods_per_node: 30}]",
            "node_groups[0].pods_per_node",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let f = tmp(&format!("bad{i}.yaml"));
        std::fs::write(&f, text).expect("write");
        let o = run(&["plan", f.to_str().expect("path")]);
        assert_eq!(o.status.code(), Some(2), "{text}");
        assert!(o.stdout.is_empty(), "{text}: partial output");
        assert!(stderr(&o).contains(field), "{text}: {}", stderr(&o));
    }
}

#[test]
fn simulate_runs_a_trace_and_compares_policies() {
    let f = examples().join("burst-trace.yaml");
    let v = json(&run(&[
        "simulate",
        f.to_str().expect("path"),
        "--compare-policies",
        "--format",
        "json",
    ]));
    for p in ["reference", "ours"] {
        let r = &v[p];
        assert_eq!(r["nodes"], 8);
        assert!(r["samples"].as_array().is_some_and(|s| s.len() > 10));
        assert!(r["ec2_calls"]["AssignPrivateIpAddresses"]
            .as_u64()
            .is_some_and(|n| n > 0));
    }
    let o = run(&["simulate", f.to_str().expect("path"), "--format", "csv"]);
    assert!(stdout(&o).starts_with("t_seconds,"), "{}", stdout(&o));
}

#[test]
fn a_missing_trace_file_is_named() {
    let f = tmp("missing-trace.yaml");
    std::fs::write(
        &f,
        "subnet: {cidr: 10.0.0.0/24}\nduration: 1h\nnode_groups: [{instance_type: m5.large, count: 1, pods: {trace_file: nope.csv}}]",
    )
    .expect("write");
    let o = run(&["simulate", f.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("node_groups[0].pods.trace_file"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("nope.csv"));
}

#[test]
fn instance_types_lists_the_table() {
    let o = run(&["instance-types", "m5.l"]);
    assert!(stdout(&o).contains("m5.large"));
}

#[test]
fn ipv6_max_pods_and_plan() {
    // t3.small: 11 pods in IPv4 mode, the ceiling in IPv6 mode.
    assert_eq!(
        stdout(&run(&["max-pods", "--instance-type", "t3.small", "--ipv6"])),
        "110\n"
    );
    let v = json(&run(&[
        "max-pods",
        "--instance-type",
        "m5.8xlarge",
        "--ipv6",
        "--json",
    ]));
    assert_eq!(
        (v["max_pods"].as_u64(), v["ipv6"].as_bool()),
        (Some(250), Some(true))
    );
    // A Xen type cannot run IPv6 (no prefix delegation): exit 2, the option named.
    let o = run(&["max-pods", "--instance-type", "m4.large", "--ipv6"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--instance-type"), "{}", stderr(&o));
    let plan = examples().join("workbook-cluster.yaml");
    let plan = plan.to_str().expect("utf-8 path");
    let v = json(&run(&[
        "plan",
        plan,
        "--ipv6",
        "--ipv6-cidr",
        "2600:1f14:a:b00::/64",
        "--format",
        "json",
    ]));
    assert_eq!(v["prefixes_needed"], v["nodes"]);
    assert_eq!(v["prefixes_assignable"], 65534);
    assert_eq!(v["fits"], true);
    let o = run(&[
        "plan",
        plan,
        "--ipv6",
        "--ipv6-cidr",
        "2600:1f14:a:b00::/56",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ipv6_cidr"), "{}", stderr(&o));
    let t = stdout(&run(&["plan", plan, "--ipv6"]));
    assert!(t.contains("/80s needed"), "{t}");
}

#[test]
fn max_pods_on_a_multi_card_type_flags_the_default_card_answer() {
    // p5.48xlarge: 32 cards x 2 ENIs, 50 IPv4 per ENI. The script's answer stays the bare
    // number on standard output; standard error says it counts the default card only.
    let o = run(&[
        "max-pods",
        "--instance-type",
        "p5.48xlarge",
        "--show-max-allowed",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "100\n");
    let err = stderr(&o);
    assert!(err.contains("default network card only"), "{err}");
    assert!(err.contains("3138 over every card"), "{err}");
    // --all-cards prints the number over every card: 64 * 49 + 2.
    let o = run(&[
        "max-pods",
        "--instance-type",
        "p5.48xlarge",
        "--show-max-allowed",
        "--all-cards",
    ]);
    assert_eq!(stdout(&o), "3138\n");
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    // A one-card type has nothing to flag.
    let o = run(&["max-pods", "--instance-type", "m5.large"]);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    // JSON carries the flag and every card.
    let v = json(&run(&[
        "max-pods",
        "--instance-type",
        "trn1.32xlarge",
        "--show-max-allowed",
        "--json",
    ]));
    assert_eq!(v["max_pods"], 247);
    assert_eq!(v["default_card_only"], true);
    assert_eq!(v["all_cards"]["max_pods"], 1962);
    assert_eq!(v["all_cards"]["enis"], 40);
    assert_eq!(v["all_cards"]["cards"].as_array().map(Vec::len), Some(8));
    let v = json(&run(&["max-pods", "--instance-type", "m5.large", "--json"]));
    assert_eq!(v["default_card_only"], false);
    assert!(v["all_cards"].is_null());
    // --explain shows the flag and a row per card.
    let o = run(&[
        "max-pods",
        "--instance-type",
        "c6in.32xlarge",
        "--show-max-allowed",
        "--explain",
    ]);
    let out = stdout(&o);
    assert!(out.starts_with("394\n"), "{out}");
    assert!(out.contains("default network card only"), "{out}");
    assert!(
        out.contains("every card (ENABLE_MULTI_NIC): 16 ENIs, 786"),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("0 ") || l.starts_with("1 "))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    // Multi-NIC pods: one address on each card, the fuller card bounds them.
    let o = run(&[
        "max-pods",
        "--instance-type",
        "c6in.32xlarge",
        "--show-max-allowed",
        "--json",
    ]);
    assert_eq!(json(&o)["all_cards"]["multi_nic_max_pods"], 394);
    let o = run(&[
        "max-pods",
        "--instance-type",
        "c6in.32xlarge",
        "--ipv6",
        "--all-cards",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--all-cards"), "{}", stderr(&o));
}
