#!/usr/bin/env bash
# Build the benchmark "floor" initramfs: busybox only; /init prints
# "capsa-floor-ready" on the console and sleeps forever. Boot it with the same
# kernel (-kernel bzImage -initrd <this> -append "console=ttyS0 panic=-1") to
# measure the VMM + kernel floor without any rootfs or agent.
#
# Output: ${CAPSA_CACHE_DIR:-/var/cache/capsa}/floor/<hash>/initramfs.cpio.gz
# <hash> = sha256(busybox binary + this script). Progress on stderr; the last
# stdout line is the initramfs path.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
cache="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
busybox="${CAPSA_BUSYBOX:-/bin/busybox}"

log() { echo "[floor] $*" >&2; }
die() { echo "[floor] ERROR: $*" >&2; exit 1; }

[[ -x "$busybox" ]] || die "static busybox not found at $busybox (apt-get install busybox-static)"
file -L "$busybox" 2>/dev/null | grep -q 'dynamically linked' && die "$busybox is dynamically linked; need busybox-static"
command -v cpio >/dev/null || die "cpio not installed"

hash="$( { sha256sum "$busybox" | cut -d' ' -f1; cat "$self"; } | sha256sum | cut -c1-16)"
out="$cache/floor/$hash"
if [[ -f "$out/initramfs.cpio.gz" ]]; then
  log "cached: $out/initramfs.cpio.gz"; echo "$out/initramfs.cpio.gz"; exit 0
fi

mkdir -p "$cache/floor"
tmp="$cache/floor/.tmp-$hash.$$"
rm -rf "$tmp"; mkdir -p "$tmp/root"/{bin,dev,proc,sys}
trap 'rm -rf "$tmp"' EXIT
log "assembling busybox initramfs"
cp "$busybox" "$tmp/root/bin/busybox"
ln -s busybox "$tmp/root/bin/sh"
cat >"$tmp/root/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc 2>/dev/null
echo "capsa-floor-ready" >/dev/console
while :; do /bin/busybox sleep 3600; done
INIT
chmod 0755 "$tmp/root/init"
mknod -m 0600 "$tmp/root/dev/console" c 5 1
mknod -m 0666 "$tmp/root/dev/null" c 1 3
mkdir -p "$tmp/out"
( cd "$tmp/root" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --quiet ) | gzip -9n >"$tmp/out/initramfs.cpio.gz"
rm -rf "$out"; mv "$tmp/out" "$out"
log "done: $(du -h "$out/initramfs.cpio.gz" | cut -f1)"
echo "$out/initramfs.cpio.gz"
