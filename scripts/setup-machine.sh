#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine (run as root).
# Idempotent: installs only what is missing. Used by the README's quick start and by .ci/run.
set -euo pipefail

apt_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || apt_pkgs+=("$2"); }
need rsvg-convert librsvg2-bin   # renders the calculator's SVG charts in tests
need ip iproute2
# The CNI plugin's real-client tests: reference plugins, containerd + runc, a busybox rootfs.
[ -x /usr/lib/cni/portmap ] || apt_pkgs+=(containernetworking-plugins)
need containerd containerd
need runc runc
[ -x /bin/busybox ] || apt_pkgs+=(busybox-static)
need ping iputils-ping         # net/ tests ping through pod wiring inside test namespaces
need iptables iptables          # net/ SNAT/connmark rules (iptables, iptables-save, iptables-restore)
need nft nftables               # net/ nftables connmark backend
need kubectl kubernetes-client  # installer/tests/manifests.rs: kubectl kustomize manifests/
# scripts/build-image.sh: a Debian tree without a base image, the OCI image without a daemon;
# tests/tests/image_boot.rs unpacks it with umoci.
need mmdebstrap mmdebstrap
need umoci umoci
# ipamd/tests/grpc_clients.rs: a grpc-go client built offline in GOPATH mode from Debian's
# sources, dialling ipamd like the reference plugin (protobuf 1.5 of github.com/golang/protobuf,
# not 1.3: grpc-go needs the APIv2-backed one).
need go golang-go
need protoc protobuf-compiler
need protoc-gen-go-grpc protoc-gen-go-grpc
[ -f /usr/share/gocode/src/google.golang.org/grpc/clientconn.go ] || apt_pkgs+=(golang-google-grpc-dev)
[ -f /usr/share/gocode/src/google.golang.org/protobuf/cmd/protoc-gen-go/main.go ] || apt_pkgs+=(golang-google-protobuf-dev)
dpkg -s golang-github-golang-protobuf-1-5-dev >/dev/null 2>&1 || apt_pkgs+=(golang-github-golang-protobuf-1-5-dev)

if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-machine: need root to install: ${apt_pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

# moto_server: the EC2 emulator the simulator's wire format is cross-checked against (sim/tests/moto.rs).
command -v moto_server >/dev/null 2>&1 || python3 -m pip install --quiet 'moto[server]' \
  || python3 -m pip install --quiet --break-system-packages 'moto[server]'
# kubernetes-validate: offline schema validation of manifests/ (installer/tests/manifests.rs).
command -v kubernetes-validate >/dev/null 2>&1 || python3 -m pip install --quiet 'kubernetes-validate==1.37.0' \
  || python3 -m pip install --quiet --break-system-packages 'kubernetes-validate==1.37.0'
# grpcio + grpcio-tools: ipamd/tests/grpc_clients.rs talks to ipamd with Python's gRPC client.
python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1 || python3 -m pip install --quiet grpcio grpcio-tools \
  || python3 -m pip install --quiet --break-system-packages grpcio grpcio-tools
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true

command -v cargo >/dev/null || { echo "setup-machine: cargo (Rust) is required" >&2; exit 1; }
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
