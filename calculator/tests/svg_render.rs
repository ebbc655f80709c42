//! Every chart renders with a real SVG renderer (`rsvg-convert`, Debian package
//! `librsvg2-bin`, installed by `scripts/setup-machine.sh`) to a PNG of the declared size.
//!
//! Without `rsvg-convert` the test is skipped with a message, unless `CI` is set, where it
//! fails. Set `SUBNET_CALC_SVG_OUT=DIR` to keep the SVG and PNG files for a look.

use std::path::{Path, PathBuf};
use std::process::Command;

use subnet_calc::exact;
use subnet_calc::limits::Catalog;
use subnet_calc::plan::PlanInput;
use subnet_calc::svg;
use subnet_calc::timeline::{simulate, TimelineInput, TimelineReport};
use subnet_calc::workbook::{self, Sheet};

const CLUSTER: &str = "subnet: {cidr: 10.0.0.0/23}
config: {warm_eni_target: 1, warm_ip_target: 1}
host_networking_ips: 2
node_groups:
  - {instance_type: m5.12xlarge, count: 2, pods_per_node: 100}
  - {instance_type: c5.2xlarge, count: 1, pods_per_node: 30}
";

const CROWDED: &str = "subnet: {cidr: 10.0.0.0/26}
config: {warm_eni_target: 1}
node_groups:
  - {instance_type: m5.large, count: 4, pods_per_node: 10}
  - {instance_type: \"<big & 'bold'>\", count: 1, pods_per_node: 8, max_enis: 3, ipv4_per_eni: 10, vcpus: 2}
";

const DAILY: &str = "subnets: [{name: app-a, cidr: 10.0.0.0/23}, {name: \"app-b <&>\", cidr: 10.0.4.0/25}]
config: {CONFIG, policy: POLICY}
duration: 1d
seed: 3
node_groups:
  - {instance_type: m5.xlarge, count: 8, subnet: app-a, spread: 0.3, pods: {daily: {min: 4, max: 40, peak: 14h}}}
  - {instance_type: m5.large, count: 4, subnet: \"app-b <&>\", pods: {ramp: {from: 0, to: 25, over: 3h, start: 2h}}}
";

fn exact_of(yaml: &str) -> exact::ExactReport {
    let p = PlanInput::parse(yaml).expect("plan parses");
    let g = p.resolve(Catalog::embedded()).expect("plan resolves");
    exact::plan(&p, &g).expect("exact plan")
}

fn workbook_of(yaml: &str, sheet: Sheet) -> workbook::WorkbookReport {
    workbook::compute(&PlanInput::parse(yaml).expect("plan parses"), sheet).expect("workbook")
}

fn timeline_of(yaml: &str) -> TimelineReport {
    simulate(
        TimelineInput::parse(yaml).expect("timeline parses"),
        Catalog::embedded(),
    )
    .expect("timeline runs")
}

fn charts() -> Vec<(&'static str, String)> {
    let over = "subnet: {prefix_length: 28}
node_groups: [{instance_type: m5.large, count: 3, pods_per_node: 0}]";
    let daily = |config: &str, policy: &str| {
        timeline_of(&DAILY.replace("CONFIG", config).replace("POLICY", policy))
    };
    // The reference flaps with WARM_ENI_TARGET=0; prefixes run a small subnet out.
    let (flapping, settled) = (
        daily("warm_eni_target: 0", "reference"),
        daily("warm_eni_target: 0", "ours"),
    );
    let prefixes = "prefix_delegation: true, warm_prefix_target: 1";
    let (pfx_reference, pfx_ours) = (daily(prefixes, "reference"), daily(prefixes, "ours"));
    vec![
        ("exact", svg::exact_chart(&exact_of(CLUSTER))),
        ("exact-crowded", svg::exact_chart(&exact_of(CROWDED))),
        (
            "workbook-warm-eni",
            svg::workbook_chart(&workbook_of(CLUSTER, Sheet::WarmEni)),
        ),
        (
            "workbook-warm-ip",
            svg::workbook_chart(&workbook_of(CLUSTER, Sheet::WarmIp)),
        ),
        (
            "workbook-over",
            svg::workbook_chart(&workbook_of(over, Sheet::WarmEni)),
        ),
        (
            "compare",
            svg::compare_chart(&workbook_of(CLUSTER, Sheet::WarmEni), &exact_of(CLUSTER)),
        ),
        ("timeline", svg::timeline_chart(&flapping)),
        ("timeline-prefixes", svg::timeline_chart(&pfx_reference)),
        (
            "timeline-compare",
            svg::timeline_compare_chart(&flapping, &settled),
        ),
        (
            "timeline-compare-prefixes",
            svg::timeline_compare_chart(&pfx_reference, &pfx_ours),
        ),
    ]
}

fn rsvg() -> Option<PathBuf> {
    let ok = Command::new("rsvg-convert")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then(|| PathBuf::from("rsvg-convert"))
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 24, "PNG too short");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// The `width` and `height` attributes of the root element.
fn svg_size(text: &str) -> (u32, u32) {
    let doc = roxmltree::Document::parse(text).expect("well-formed SVG");
    let root = doc.root_element();
    let get = |a: &str| -> u32 {
        root.attribute(a)
            .unwrap_or_else(|| panic!("root has no {a}"))
            .parse()
            .unwrap_or_else(|e| panic!("{a}: {e}"))
    };
    (get("width"), get("height"))
}

fn render(tool: &Path, svg_path: &Path, png_path: &Path) {
    let out = Command::new(tool)
        .arg("--format=png")
        .arg("--output")
        .arg(png_path)
        .arg(svg_path)
        .output()
        .expect("rsvg-convert runs");
    assert!(
        out.status.success(),
        "rsvg-convert failed on {}: {}",
        svg_path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "rsvg-convert complained about {}: {}",
        svg_path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_chart_renders_to_a_png_of_its_declared_size() {
    let Some(tool) = rsvg() else {
        if std::env::var_os("CI").is_some() {
            panic!("rsvg-convert is missing: run scripts/setup-machine.sh (librsvg2-bin)");
        }
        eprintln!("skipping: rsvg-convert not found (install librsvg2-bin)");
        return;
    };
    let keep = std::env::var_os("SUBNET_CALC_SVG_OUT").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("subnet-calc-svg-render-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).expect("output dir");
    for (name, chart) in charts() {
        let svg_path = dir.join(format!("{name}.svg"));
        let png_path = dir.join(format!("{name}.png"));
        std::fs::write(&svg_path, &chart).expect("write svg");
        render(&tool, &svg_path, &png_path);
        let png = std::fs::read(&png_path).expect("png written");
        let (w, h) = png_size(&png);
        assert_eq!((w, h), svg_size(&chart), "{name}: PNG size");
        assert!(h >= 300, "{name}: only {h} px tall");
        assert!(
            png.len() > 20_000,
            "{name}: PNG of {} bytes is too small to hold a chart",
            png.len()
        );
    }
    if keep.is_none() {
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
