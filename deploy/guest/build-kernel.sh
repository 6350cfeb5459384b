#!/usr/bin/env bash
# Build the Capsa microVM guest kernel from Debian's linux-source package.
#
# Output: ${CAPSA_CACHE_DIR:-/var/cache/capsa}/kernel/<hash>/{vmlinux,bzImage,config}
#   vmlinux  - uncompressed ELF with a PVH entry note (Cloud Hypervisor)
#   bzImage  - compressed boot image (QEMU -kernel)
#   config   - the final .config
# <hash> = sha256(fragment + linux-source package version + this script).
# If the output already exists nothing is built. Progress goes to stderr;
# the last (and only) stdout line is the output directory.
#
# Env: CAPSA_CACHE_DIR, CAPSA_KERNEL_FRAGMENT (override fragment),
#      CAPSA_KERNEL_SOURCE (tarball), CAPSA_KEEP_BUILD=1 (keep build tree),
#      CAPSA_JOBS (default nproc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
cache="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
fragment="${CAPSA_KERNEL_FRAGMENT:-$here/kernel/capsa-microvm.config}"
jobs="${CAPSA_JOBS:-$(nproc)}"

log() { echo "[kernel] $*" >&2; }
die() { echo "[kernel] ERROR: $*" >&2; exit 1; }

[[ -f "$fragment" ]] || die "fragment not found: $fragment"

# Locate the source tarball and its package version.
src_tar="${CAPSA_KERNEL_SOURCE:-}"
if [[ -z "$src_tar" ]]; then
  src_tar="$(ls -1 /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n1 || true)"
fi
[[ -n "$src_tar" && -f "$src_tar" ]] || die "no linux-source tarball in /usr/src (apt-get install linux-source)"
src_pkg="$(basename "$src_tar" .tar.xz)"            # e.g. linux-source-6.1
src_ver="$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null || true)"
[[ -n "$src_ver" ]] || src_ver="$(sha256sum "$src_tar" | cut -d' ' -f1)"

hash="$( { cat "$fragment"; echo "$src_pkg=$src_ver"; cat "$self"; } | sha256sum | cut -c1-16)"
out="$cache/kernel/$hash"

if [[ -f "$out/bzImage" && -f "$out/vmlinux" && -f "$out/config" ]]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.lock"
log "waiting for build lock" ; flock 9
if [[ -f "$out/bzImage" && -f "$out/vmlinux" && -f "$out/config" ]]; then
  log "cached (built concurrently): $out"; echo "$out"; exit 0
fi

build="$cache/kernel/build-$hash"
rm -rf "$build"
mkdir -p "$build"
log "source $src_pkg $src_ver -> $out"
log "extracting $src_tar ..."
tar -xJf "$src_tar" -C "$build"
srcdir="$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n1)"
[[ -f "$srcdir/Makefile" ]] || die "unexpected tarball layout"

export ARCH=x86_64
mk() { make -C "$srcdir" ARCH=x86_64 "$@"; }

log "configuring (allnoconfig + $(basename "$fragment"))..."
cp "$fragment" "$build/fragment.config"
( cd "$srcdir" && ./scripts/kconfig/merge_config.sh -n "$build/fragment.config" ) >"$build/config.log" 2>&1 \
  || { tail -n 30 "$build/config.log" >&2; die "merge_config failed"; }

# merge_config silently drops options whose dependencies are unmet: check every
# line of the fragment against the final .config.
missing=0
while IFS= read -r line; do
  if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF "$line" "$srcdir/.config" || {
      log "MISSING: $line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$srcdir/.config" || echo unset))"
      missing=1; }
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    if grep -qE "^${BASH_REMATCH[1]}=" "$srcdir/.config"; then
      log "SHOULD BE UNSET: ${BASH_REMATCH[1]}"; missing=1
    fi
  fi
done <"$fragment"
[[ $missing == 0 ]] || die "fragment not fully applied (see above); fix $fragment"
log "config verified: all $(grep -cE '^CONFIG_' "$fragment") fragment options applied"

log "building vmlinux + bzImage with -j$jobs (this takes several minutes)..."
start=$(date +%s)
set +e
mk -j"$jobs" vmlinux bzImage 2>&1 | tee "$build/build.log" | awk '
  / (CC|AS|LD|AR)  / { n++; if (n % 250 == 0) { printf("[kernel] ... %d objects built\n", n) > "/dev/stderr"; fflush("/dev/stderr") } }'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc != 0 ]]; then
  grep -E 'error|Error' "$build/build.log" | tail -n 20 >&2 || true
  die "kernel build failed (log: $build/build.log)"
fi
log "built in $(( $(date +%s) - start ))s"

tmp="$cache/kernel/.tmp-$hash"
rm -rf "$tmp"; mkdir -p "$tmp"
cp "$srcdir/vmlinux" "$tmp/vmlinux"
cp "$srcdir/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$srcdir/.config" "$tmp/config"
echo "$(make -s -C "$srcdir" ARCH=x86_64 kernelrelease 2>/dev/null)" >"$tmp/release"
rm -rf "$out"; mv "$tmp" "$out"

if [[ "${CAPSA_KEEP_BUILD:-0}" != 1 ]]; then
  log "removing build tree"
  rm -rf "$build"
fi
log "done: $(du -h "$out/bzImage" | cut -f1) bzImage, $(du -h "$out/vmlinux" | cut -f1) vmlinux"
echo "$out"
