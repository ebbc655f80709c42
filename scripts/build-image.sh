#!/usr/bin/env bash
# Builds the aws-node image (vpc-cni-rs:0.1.0) without a container engine or a base image:
# the release binaries with cargo, a Debian 12 tree extracted by mmdebstrap from the machine's
# apt sources, the runtime root filesystem assembled from it by manifests/image/rootfs.sh (the
# same step manifests/image/Dockerfile runs), and an OCI image made with umoci.
#
#   scripts/build-image.sh            # needs root, mmdebstrap and umoci (scripts/setup-machine.sh)
#
# Output (under $VPC_CNI_IMAGE_DIR, default target/image):
#   oci/                          OCI image layout, tag 0.1.0 (umoci unpack --image oci:0.1.0 DIR)
#   vpc-cni-rs-0.1.0.oci.tar      the same layout as one tarball (ctr image import, skopeo copy
#                                 oci-archive:...)
# tests/tests/image_boot.rs unpacks oci/ and boots a simulated node from it.
#
# Environment: CARGO (default cargo), CARGO_TARGET_DIR (default target),
# VPC_CNI_IMAGE_MIRROR (apt sources for mmdebstrap; default the machine's own sources files),
# VPC_CNI_IMAGE_PROFILE (cargo profile of the binaries, default release; `dev` reuses a debug
# build for a quick local image), VPC_CNI_IMAGE_SKIP_BUILD=1 (use the binaries already built).
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- The image. installer/tests/image.rs checks every value against the Dockerfile. ----
IMAGE_NAME=vpc-cni-rs
IMAGE_TAG=0.1.0
DEBIAN_SUITE=bookworm
# Debian packages the runtime files come from (rootfs.sh keeps only what the daemon runs).
PACKAGES=(ca-certificates iptables nftables containernetworking-plugins)
# Workspace binaries (package:binary), built with `cargo build --release --locked`, put in /app.
BINARIES=(ipamd:ipamd vpc-cni-plugin:aws-cni vpc-cni-egress:egress-cni vpc-cni-installer:vpc-cni-install vpc-cni-controller:vpc-resource-controller)
# Reference plugins the init step copies to the host (rootfs.sh puts them in /init).
INIT_PLUGINS=(loopback portmap bandwidth tuning host-local)
# Other files of /app: repository path -> image path.
APP_FILES=(manifests/10-aws.conflist:/app/10-aws.conflist)
ENV=(PATH=/usr/sbin:/usr/bin:/sbin:/bin)
WORKDIR=/app
# No USER: the containers run as root, as the reference's do (the daemon needs NET_ADMIN and
# NET_RAW in its own user namespace, the init step writes /proc/sys).
IMAGE_USER=
ENTRYPOINT=(/app/vpc-cni-install run --plugin /app/aws-cni --plugin /app/egress-cni --)
CMD=(/app/ipamd)
# ---------------------------------------------------------------------------------------

die() { echo "build-image: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap's root mode, file ownership in the image)"
for tool in mmdebstrap umoci; do
  command -v "$tool" >/dev/null || die "$tool is not installed (scripts/setup-machine.sh)"
done

cargo=${CARGO:-cargo}
target=${CARGO_TARGET_DIR:-target}
out=${VPC_CNI_IMAGE_DIR:-$target/image}
start=$(date +%s)
profile=${VPC_CNI_IMAGE_PROFILE:-release}
case "$profile" in
  release) pflag=(--release); pdir=release ;;
  dev) pflag=(--profile dev); pdir=debug ;;
  *) pflag=(--profile "$profile"); pdir=$profile ;;
esac

# 1. The binaries.
if [ "${VPC_CNI_IMAGE_SKIP_BUILD:-0}" != 1 ]; then
  args=()
  for b in "${BINARIES[@]}"; do args+=(-p "${b%%:*}" --bin "${b#*:}"); done
  echo "build-image: cargo build ${pflag[*]} --locked ${args[*]}" >&2
  "$cargo" build "${pflag[@]}" --locked "${args[@]}"
fi
build_done=$(date +%s)
elf_args=()
for b in "${BINARIES[@]}"; do
  f=$target/$pdir/${b#*:}
  [ -x "$f" ] || die "$f is missing (cargo build ${pflag[*]})"
  elf_args+=(--elf "$f")
done

work=$(mktemp -d "${TMPDIR:-/tmp}/vpc-cni-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 2. A Debian tree with the packages, from the machine's own apt sources.
mirrors=()
if [ -n "${VPC_CNI_IMAGE_MIRROR:-}" ]; then
  mirrors=("$VPC_CNI_IMAGE_MIRROR")
else
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qv '^[[:space:]]*\(#\|$\)' "$f" && mirrors+=("$f")
  done
fi
[ "${#mirrors[@]}" -gt 0 ] || die "no apt sources found; set VPC_CNI_IMAGE_MIRROR"
include=$(IFS=,; echo "${PACKAGES[*]}")
mmdebstrap --quiet --variant=extract --format=directory --include="$include" \
  "$DEBIAN_SUITE" "$work/debian" "${mirrors[@]}"
# The extract variant runs no maintainer scripts: build the CA bundle as
# update-ca-certificates does (every certificate the package ships).
mkdir -p "$work/debian/etc/ssl/certs"
find "$work/debian/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort \
  | xargs cat > "$work/debian/etc/ssl/certs/ca-certificates.crt"

# 3. The runtime root filesystem, then /app.
plugin_args=()
for p in "${INIT_PLUGINS[@]}"; do plugin_args+=(--plugin "$p"); done
manifests/image/rootfs.sh "$work/debian" "$work/rootfs" "${plugin_args[@]}" "${elf_args[@]}"
for b in "${BINARIES[@]}"; do
  install -m 0755 "$target/$pdir/${b#*:}" "$work/rootfs/app/${b#*:}"
done
for f in "${APP_FILES[@]}"; do
  install -m 0644 "${f%%:*}" "$work/rootfs${f#*:}"
done

# 4. The OCI image: one layer, the config the Dockerfile declares.
rm -rf "$out/oci" "$out/$IMAGE_NAME-$IMAGE_TAG.oci.tar"
mkdir -p "$out"
umoci init --layout "$out/oci"
umoci new --image "$out/oci:$IMAGE_TAG"
umoci unpack --image "$out/oci:$IMAGE_TAG" "$work/bundle" >/dev/null
rm -rf "$work/bundle/rootfs"
mv "$work/rootfs" "$work/bundle/rootfs"
umoci repack --image "$out/oci:$IMAGE_TAG" "$work/bundle"
config=(--clear=config.env --clear=config.entrypoint --clear=config.cmd)
for e in "${ENV[@]}"; do config+=(--config.env "$e"); done
for a in "${ENTRYPOINT[@]}"; do config+=(--config.entrypoint "$a"); done
for a in "${CMD[@]}"; do config+=(--config.cmd "$a"); done
[ -n "$IMAGE_USER" ] && config+=(--config.user "$IMAGE_USER")
umoci config --image "$out/oci:$IMAGE_TAG" "${config[@]}" --config.workingdir "$WORKDIR" \
  --config.label "org.opencontainers.image.title=$IMAGE_NAME" \
  --config.label "org.opencontainers.image.version=$IMAGE_TAG"
umoci gc --layout "$out/oci"
tar -C "$out/oci" -cf "$out/$IMAGE_NAME-$IMAGE_TAG.oci.tar" .

layers=$(find "$out/oci/blobs" -type f -size +100k -printf '%s\n' | awk '{s+=$1} END {print s}')
unpacked=$(du -sb "$work/bundle/rootfs" | cut -f1)
echo "build-image: $IMAGE_NAME:$IMAGE_TAG ($profile binaries) in $out/oci: compressed $((layers / 1024 / 1024)) MiB," \
  "unpacked $((unpacked / 1024 / 1024)) MiB; cargo $((build_done - start)) s, image" \
  "$(( $(date +%s) - build_done )) s" >&2
