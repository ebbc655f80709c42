#!/usr/bin/env bash
# The README's first command: sets the machine up, builds, and runs the main job on its
# embedded defaults (no AWS account needed): the subnet calculator plans the workbook's example
# cluster, compares it with what real nodes do, simulates a day of a fleet under the reference
# policy and ours, and writes the charts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-machine.sh
cargo build --release --locked -p subnet-calc
out=target/quickstart
mkdir -p "$out"
calc=target/release/subnet-calc
echo "== max pods of an m5.large, with and without prefix delegation"
"$calc" max-pods --instance-type m5.large --explain
"$calc" max-pods --instance-type m5.large --prefix-delegation --explain
echo
echo "== the workbook's example cluster: workbook vs what real nodes do"
"$calc" plan calculator/examples/workbook-cluster.yaml --compare --svg "$out/plan-compare.svg"
echo
echo "== a day of a 60-node fleet: reference policy vs ours"
"$calc" simulate calculator/examples/daily-cycle.yaml --compare-policies --rows 8 --svg "$out/day.svg"
echo
echo "charts: $out/plan-compare.svg $out/day.svg"
