#!/usr/bin/env bash
# The README's first command: sets the machine up, builds, and runs the main job on its
# embedded defaults (no AWS account needed):
#   1. the node demo: the real ipamd boots on a simulated node and fills its warm pool from the
#      VPC simulator, pods are created (in network namespaces through the real aws-cni plugin
#      when run as root; as gRPC calls otherwise), connectivity is checked, a summary is
#      printed and everything is cleaned up;
#   2. the subnet calculator: max pods, the workbook's example cluster against what real nodes
#      do, a day of a fleet under the reference policy, ours and demand, with SVG charts.
# VPC_CNI_DEMO_IPV6=1 runs the demo as an IPv6 cluster (ipamd with ENABLE_IPv6=true and prefix
# delegation, pods in the node's /80, IPv4 egress through egress-cni); the demo reads it from
# the environment, as `vpc-cni-demo --ipv6`.
# Builds the debug profile: on a fresh 2-core machine it is ready in about ten minutes, where
# the release profile (QUICKSTART_PROFILE=release) takes about twice as long; the demo and the
# calculator examples run in seconds either way.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-machine.sh
profile=${QUICKSTART_PROFILE:-dev}
case "$profile" in
  release) dir=release ;;
  dev) dir=debug ;;
  *) echo "quickstart: QUICKSTART_PROFILE must be release or dev" >&2; exit 2 ;;
esac
target=${CARGO_TARGET_DIR:-target}
bin="$target/$dir"
cargo build --profile "$profile" --locked \
  -p subnet-calc -p ipamd -p vpc-cni-plugin -p vpc-cni-egress -p vpc-cni-e2e --bins

echo
VPC_CNI_DEMO_IPV6=${VPC_CNI_DEMO_IPV6:-} "$bin/vpc-cni-demo" --bin-dir "$bin"

out=target/quickstart
mkdir -p "$out"
calc="$bin/subnet-calc"
echo
echo "== subnet calculator: max pods of an m5.large, without and with prefix delegation"
"$calc" max-pods --instance-type m5.large
"$calc" max-pods --instance-type m5.large --prefix-delegation
echo
echo "== the workbook's example cluster: workbook vs what real nodes do"
"$calc" plan calculator/examples/workbook-cluster.yaml --compare --svg "$out/plan-compare.svg"
echo
echo "== a day of a 60-node fleet: reference policy, ours and demand"
"$calc" simulate calculator/examples/daily-cycle.yaml --compare-policies --rows 8 --svg "$out/day.svg"
echo
echo "charts: $out/plan-compare.svg $out/day.svg"
