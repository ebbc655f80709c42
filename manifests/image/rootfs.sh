#!/usr/bin/env bash
# Assembles the runtime root filesystem of the aws-node image (vpc-cni-rs) into DEST from an
# installed Debian 12 tree SRC, distroless-style: only the programs the daemon runs, the shared
# libraries they and the image's own binaries load, the CA bundle and a few /etc files.
#
#   rootfs.sh SRC DEST [--plugin NAME]... [--elf FILE]...
#
#   --plugin NAME  a reference CNI plugin copied from SRC/usr/lib/cni into DEST/init
#                  (the init step installs /init/* into the host's /opt/cni/bin)
#   --elf FILE     a binary that will be added to the image later (the /app binaries): its
#                  shared libraries are resolved from SRC and copied too; FILE itself is not
#
# Both recipes of the image call it: manifests/image/Dockerfile (SRC=/ of a debian:bookworm-slim
# stage) and scripts/build-image.sh (SRC=a tree extracted by mmdebstrap).
# installer/tests/image.rs checks the two agree.
#
# The programs (net/src/snat.rs): iptables, iptables-save, iptables-restore, ip6tables* (the
# nft flavour, Debian's default; the legacy ones stay reachable as iptables-legacy*), nft.
set -euo pipefail

die() { echo "rootfs.sh: $*" >&2; exit 1; }

[ "$#" -ge 2 ] || die "usage: rootfs.sh SRC DEST [--plugin NAME]... [--elf FILE]..."
src=$(cd "$1" && pwd)
src=${src%/}  # "" for /
dest=$2
shift 2
plugins=()
elfs=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --plugin) [ "$#" -ge 2 ] || die "--plugin needs a name"; plugins+=("$2"); shift 2 ;;
    --elf) [ "$#" -ge 2 ] || die "--elf needs a file"; elfs+=("$2"); shift 2 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ -e "$dest" ] && [ -n "$(ls -A "$dest")" ] && die "$dest is not empty"
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# Merged /usr, as Debian 12 installs it.
mkdir -p "$dest"/usr/bin "$dest"/usr/sbin "$dest"/usr/lib "$dest"/usr/lib64 \
  "$dest"/etc "$dest"/run "$dest"/var "$dest"/init "$dest"/app "$dest"/tmp
for d in bin sbin lib lib64; do ln -s "usr/$d" "$dest/$d"; done
ln -s ../run "$dest"/var/run
chmod 1777 "$dest"/tmp

# SRC path -> DEST path, with /lib, /lib64, /bin, /sbin folded into /usr.
target_of() {
  local rel=${1#"$src"}
  rel=/${rel#/}
  case "$rel" in
    /lib/* | /lib64/* | /bin/* | /sbin/*) rel=/usr$rel ;;
  esac
  printf '%s%s' "$dest" "$rel"
}

# Copies SRC file $1 (following symlinks) to its DEST path.
put() {
  local to
  to=$(target_of "$1")
  mkdir -p "$(dirname "$to")"
  cp -L --preserve=mode "$1" "$to"
}

# The dynamic loader of SRC and its library directories.
loader=$(ls "$src"/lib64/ld-linux-*.so.* "$src"/lib/ld-linux-*.so.* 2>/dev/null | head -n 1 || true)
[ -n "$loader" ] || die "no dynamic loader in $src/lib64 or $src/lib"
libdirs=()
for d in "$src"/usr/lib/*-linux-gnu "$src"/lib/*-linux-gnu; do
  [ -d "$d" ] && [ ! -L "$d" ] && libdirs+=("$d")
done
[ "${#libdirs[@]}" -gt 0 ] || die "no multiarch library directory in $src"
libpath=$(IFS=:; echo "${libdirs[*]}")

# Shared libraries of ELF file $1, resolved inside SRC only.
libs_of() {
  local out
  out=$("$loader" --inhibit-cache --library-path "$libpath" --list "$1") \
    || die "cannot list the libraries of $1: $out"
  # "\tlibc.so.6 => /x/libc.so.6 (0x...)" and "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
  printf '%s\n' "$out" | sed -n 's/.*=> \(\/[^ ]*\) (0x.*/\1/p'
  printf '%s\n' "$out" | grep -q 'not found' && die "$1 needs a library SRC lacks: $out"
  return 0
}

elf_files=()
# The rule programs: the two multi-call binaries and nft.
for p in xtables-nft-multi xtables-legacy-multi nft; do
  f=$src/usr/sbin/$p
  [ -x "$f" ] || die "$f is missing (install iptables and nftables in SRC)"
  put "$f"
  elf_files+=("$f")
done
for flavour in nft legacy; do
  for fam in iptables ip6tables; do
    for suffix in "" -save -restore; do
      ln -s "xtables-$flavour-multi" "$dest/usr/sbin/$fam-$flavour$suffix"
    done
  done
done
for fam in iptables ip6tables; do
  for suffix in "" -save -restore; do
    ln -s "$fam-nft$suffix" "$dest/usr/sbin/$fam$suffix"
  done
done
# iptables' match and target extensions (loaded at run time).
xt=$(ls -d "$src"/usr/lib/*-linux-gnu/xtables 2>/dev/null | head -n 1 || true)
[ -n "$xt" ] || die "no xtables extension directory in $src"
mkdir -p "$(target_of "$xt")"
cp -a "$xt"/. "$(target_of "$xt")"/
for f in "$xt"/*.so; do elf_files+=("$f"); done

for p in "${plugins[@]}"; do
  f=$src/usr/lib/cni/$p
  [ -x "$f" ] || die "$f is missing (install containernetworking-plugins in SRC)"
  cp -L --preserve=mode "$f" "$dest/init/$p"
  elf_files+=("$f")
done
for f in "${elfs[@]}"; do
  [ -f "$f" ] || die "--elf $f: no such file"
  elf_files+=("$f")
done

# The library closure (the loader lists transitive dependencies).
declare -A seen=()
for f in "${elf_files[@]}"; do
  # Statically linked programs (Go plugins may be) have no libraries to list.
  if "$loader" --verify "$f" >/dev/null 2>&1; then
    while IFS= read -r lib; do
      [ -n "$lib" ] || continue
      case "$lib" in "$src"/*) ;; *) die "$f resolved $lib outside $src" ;; esac
      [ -n "${seen[$lib]:-}" ] && continue
      seen[$lib]=1
      put "$lib"
    done < <(libs_of "$f")
  fi
done
put "$loader"
# The loader's canonical path (PT_INTERP) is /lib64/<name>; it must be a file or a link to one.
[ -e "$dest/usr/lib64/$(basename "$loader")" ] || die "loader not installed"

# /etc: TLS roots (EC2, the API server), protocol and ethertype names (iptables), users.
[ -s "$src/etc/ssl/certs/ca-certificates.crt" ] || die "$src/etc/ssl/certs/ca-certificates.crt is missing"
put "$src/etc/ssl/certs/ca-certificates.crt"
for f in protocols services ethertypes; do
  [ -f "$src/etc/$f" ] && put "$src/etc/$f"
done
os_release=$src/usr/lib/os-release
[ -f "$os_release" ] || os_release=$src/etc/os-release
[ -f "$os_release" ] && put "$os_release"
[ -f "$dest/usr/lib/os-release" ] && ln -sf ../usr/lib/os-release "$dest/etc/os-release"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$dest/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$dest/etc/group"
printf 'hosts: files dns\n' > "$dest/etc/nsswitch.conf"
echo "rootfs.sh: $(du -sh "$dest" | cut -f1) in $dest (${#seen[@]} libraries)" >&2
