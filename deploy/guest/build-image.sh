#!/usr/bin/env bash
# Build a bootable Capsa guest image.
#
#   build-image.sh --agent PATH_TO_AGENT_BINARY [--kernel-dir DIR]
#
# Ensures the kernel (build-kernel.sh, unless --kernel-dir is given) and the
# base rootfs (build-rootfs.sh), then builds
#   ${CAPSA_CACHE_DIR:-/var/cache/capsa}/images/<hash>/
#     rootfs.ext4    raw ext4 (mkfs.ext4 -d, no loop mount), content + 2 GiB free, sparse, read-only
#     vmlinux        ELF kernel (Cloud Hypervisor)
#     bzImage        compressed kernel (QEMU)
#     manifest.json  kernel cmdline and file names
# and points ${CAPSA_CACHE_DIR}/images/current at it.
# <hash> = sha256(base rootfs hash + kernel + agent + capsa-init + fstab + CA bundle + this script).
# VMs use rootfs.ext4 as a shared read-only base under a per-VM qcow2 overlay:
#   qemu-img create -f qcow2 -F raw -b .../rootfs.ext4 overlay.qcow2
# Progress goes to stderr; the last stdout line is the image directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
cache="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
export CAPSA_CACHE_DIR="$cache"
init_src="$here/capsa-init"
fstab_src="$here/fstab"
free_mib="${CAPSA_ROOTFS_FREE_MIB:-2048}"
# QEMU microvm finds virtio-mmio devices through ACPI (or appends
# virtio_mmio.device= itself when acpi=off); Cloud Hypervisor uses virtio-pci.
cmdline="${CAPSA_KERNEL_CMDLINE:-console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/capsa-init quiet panic=-1 reboot=t}"
# Under QEMU TCG there is no kvm-clock, no HPET/PM timer and the PIT cannot
# calibrate the TSC on microvm: without this the kernel hangs at boot. TCG's
# guest TSC runs at the host TSC rate, so the driver appends the host's TSC
# frequency in kHz (see README.md). Not needed (and not wanted) under KVM.
# tsc=reliable keeps the TSC as the clocksource: otherwise the watchdog drops it for
# jiffies (which lag on a busy host) and an idle guest never stops its tick (README.md).
tcg_append='tsc_early_khz={host_tsc_khz} tsc=reliable'
# The guest trusts the CAs this host trusts: behind a TLS-inspecting proxy the operator's CA
# is in the host's bundle, and `pip install` in a session needs it as much as the host does.
# CAPSA_GUEST_CA_BUNDLE names another bundle; set it empty to keep Debian's own.
ca_bundle="${CAPSA_GUEST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
[[ -z "$ca_bundle" || -f "$ca_bundle" ]] || ca_bundle=""

log() { echo "[image] $*" >&2; }
die() { echo "[image] ERROR: $*" >&2; exit 1; }
usage() { echo "usage: $0 --agent PATH_TO_AGENT_BINARY [--kernel-dir DIR]" >&2; exit 2; }

agent="" kdir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --agent) agent="${2:-}"; shift 2 || usage ;;
    --agent=*) agent="${1#*=}"; shift ;;
    --kernel-dir) kdir="${2:-}"; shift 2 || usage ;;
    --kernel-dir=*) kdir="${1#*=}"; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n "$agent" ]] || usage
[[ -f "$agent" ]] || die "agent binary not found: $agent"
[[ $EUID == 0 ]] || die "must run as root (root-owned rootfs tree)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not installed (e2fsprogs)"

if [[ -z "$kdir" ]]; then
  log "ensuring kernel"
  kdir="$("$here/build-kernel.sh" | tail -n1)"
fi
[[ -f "$kdir/bzImage" && -f "$kdir/vmlinux" ]] || die "kernel dir lacks bzImage/vmlinux: $kdir"
log "ensuring base rootfs"
base="$("$here/build-rootfs.sh" | tail -n1)"
[[ -d "$base/rootfs" ]] || die "base rootfs missing: $base"

hash="$( { echo "base=$(basename "$base")"
           sha256sum "$kdir/bzImage" "$kdir/vmlinux" | cut -d' ' -f1
           sha256sum "$agent" "$init_src" "$fstab_src" | cut -d' ' -f1
           [[ -z "$ca_bundle" ]] || sha256sum "$ca_bundle" | cut -d' ' -f1
           echo "cmdline=$cmdline free=$free_mib"
           cat "$self"; } | sha256sum | cut -c1-16)"
images="$cache/images"
out="$images/$hash"
mkdir -p "$images"

set_current() { ln -sfn "$hash" "$images/.current.tmp" && mv -T "$images/.current.tmp" "$images/current"; }

if [[ -f "$out/manifest.json" ]]; then
  set_current
  log "cached: $out"; echo "$out"; exit 0
fi

exec 9>"$images/.lock"
flock 9
if [[ -f "$out/manifest.json" ]]; then set_current; log "cached: $out"; echo "$out"; exit 0; fi

# Under the lock no other build is running: any .tmp-* left is from a build that was killed.
rm -rf "$images"/.tmp-*
tmp="$images/.tmp-$hash"
mkdir -p "$tmp"
stage="$tmp/stage"
log "staging root tree (hardlinked from $base/rootfs)"
# Hardlink copy: cheap. Only NEW files are added below (never modify a linked file).
cp -al "$base/rootfs" "$stage"
install -D -m 0755 "$agent" "$stage/usr/local/bin/capsa-agent.new"
mv -f "$stage/usr/local/bin/capsa-agent.new" "$stage/usr/local/bin/capsa-agent"
install -m 0755 "$init_src" "$stage/sbin/capsa-init.new"
mv -f "$stage/sbin/capsa-init.new" "$stage/sbin/capsa-init"
install -m 0644 "$fstab_src" "$stage/etc/fstab.new"
mv -f "$stage/etc/fstab.new" "$stage/etc/fstab"
# The /dev links devtmpfs lacks, which capsa-init copies into /dev with one `cp -a`.
mkdir -p "$stage/usr/lib/capsa/dev"
ln -s /proc/self/fd "$stage/usr/lib/capsa/dev/fd"
ln -s /proc/self/fd/0 "$stage/usr/lib/capsa/dev/stdin"
ln -s /proc/self/fd/1 "$stage/usr/lib/capsa/dev/stdout"
ln -s /proc/self/fd/2 "$stage/usr/lib/capsa/dev/stderr"
if [[ -n "$ca_bundle" ]]; then
  install -m 0644 "$ca_bundle" "$stage/etc/ssl/certs/ca-certificates.crt.new"
  mv -f "$stage/etc/ssl/certs/ca-certificates.crt.new" "$stage/etc/ssl/certs/ca-certificates.crt"
fi

content_kib="$(du -sk --apparent-size "$stage" | cut -f1)"
inodes="$(find "$stage" | wc -l)"
# content + 10% + inode tables (256 B/inode, 2x headroom) + journal + requested free space
size_mib=$(( content_kib * 11 / 10 / 1024 + inodes * 2 * 256 / 1048576 + 128 + free_mib ))
log "making rootfs.ext4: ${size_mib} MiB (content $((content_kib / 1024)) MiB, $inodes files, ${free_mib} MiB free)"
truncate -s "${size_mib}M" "$tmp/rootfs.ext4"
mkfs.ext4 -q -F -L capsa-root -m 0 -N $(( inodes * 2 + 65536 )) \
  -E lazy_itable_init=0,lazy_journal_init=0 -d "$stage" "$tmp/rootfs.ext4" \
  || die "mkfs.ext4 failed"
chmod 0444 "$tmp/rootfs.ext4"
rm -rf "$stage"

ln -f "$kdir/bzImage" "$tmp/bzImage" 2>/dev/null || cp "$kdir/bzImage" "$tmp/bzImage"
ln -f "$kdir/vmlinux" "$tmp/vmlinux" 2>/dev/null || cp "$kdir/vmlinux" "$tmp/vmlinux"
release="$(cat "$kdir/release" 2>/dev/null || echo unknown)"
agent_sha="$(sha256sum "$agent" | cut -d' ' -f1)"
cat >"$tmp/manifest.json" <<JSON
{
  "hash": "$hash",
  "kernel_cmdline": "$cmdline",
  "kernel_cmdline_tcg_append": "$tcg_append",
  "rootfs": "rootfs.ext4",
  "rootfs_format": "raw",
  "bzimage": "bzImage",
  "vmlinux": "vmlinux",
  "kernel_release": "$release",
  "kernel_dir": "$kdir",
  "rootfs_base": "$base",
  "agent_sha256": "$agent_sha",
  "agent_vsock_port": 1024,
  "created_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
rm -rf "$out"; mv "$tmp" "$out"
set_current
# Each agent build makes a new 1.4 GiB image: keep the newest few (a running vm-pool may
# still boot from a recent one), drop the rest.
keep="${CAPSA_IMAGES_KEEP:-3}"
# (find -type d lists real directories only: never the `current` symlink or .tmp-* dirs.)
find "$images" -mindepth 1 -maxdepth 1 -type d -not -name '.*' -printf '%T@ %p\n' \
  | sort -rn | tail -n +"$((keep + 1))" | cut -d' ' -f2- | while read -r old; do
  [[ "$old" == "$out" ]] && continue
  log "pruning old image $(basename "$old")"; rm -rf -- "$old"
done
log "done: rootfs.ext4 $(du -h --apparent-size "$out/rootfs.ext4" | cut -f1) apparent, $(du -h "$out/rootfs.ext4" | cut -f1) on disk"
echo "$out"
