#!/usr/bin/env bash
# Build the Capsa base guest root filesystem (Debian bookworm, minbase + Python).
#
# Output: ${CAPSA_CACHE_DIR:-/var/cache/capsa}/rootfs-base/<hash>/
#   rootfs/        the root tree (owned by root; feed it to `mkfs.ext4 -d`)
#   packages.txt   installed packages (dpkg -l)
# <hash> = sha256(package list + suite + this script). Cached: if the output
# exists nothing is done. Progress goes to stderr; the last (and only) stdout
# line is the output directory. Needs root and debootstrap.
#
# Env: CAPSA_CACHE_DIR, CAPSA_DEBIAN_MIRROR (default: the Debian mirror from
#      this machine's /etc/apt/sources.list{,.d}), CAPSA_SUITE (bookworm).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
cache="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
suite="${CAPSA_SUITE:-bookworm}"

# Packages on top of minbase. tini is PID 1's child-reaper (see capsa-init).
PACKAGES=(
  bash coreutils procps iproute2 ca-certificates tini
  python3 python3-pip python3-venv
  python3-numpy python3-pandas python3-matplotlib
)

log() { echo "[rootfs] $*" >&2; }
die() { echo "[rootfs] ERROR: $*" >&2; exit 1; }

[[ $EUID == 0 ]] || die "must run as root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap not installed"

hash="$( { printf '%s\n' "$suite" "${PACKAGES[@]}"; cat "$self"; } | sha256sum | cut -c1-16)"
out="$cache/rootfs-base/$hash"
if [[ -f "$out/.done" ]]; then
  log "cached: $out"; echo "$out"; exit 0
fi

# The Debian mirror this machine already uses (deb822 "URIs:" or one-line "deb").
find_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    grep -hE '^\s*(URIs:|deb\s)' "$f" | grep -oE '(https?|file)://[^ ]+' \
      | grep -E '/debian/?$' | grep -v security || true
  done | head -n1
}
mirror="${CAPSA_DEBIAN_MIRROR:-$(find_mirror)}"
[[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}; set CAPSA_DEBIAN_MIRROR"

mkdir -p "$cache/rootfs-base"
exec 9>"$cache/rootfs-base/.lock"
flock 9
if [[ -f "$out/.done" ]]; then log "cached (built concurrently): $out"; echo "$out"; exit 0; fi

tmp="$cache/rootfs-base/.tmp-$hash"
rm -rf "$tmp"; mkdir -p "$tmp"
root="$tmp/rootfs"
include="$(IFS=,; echo "${PACKAGES[*]}")"
log "debootstrap $suite (minbase) from $mirror"
log "packages: $include"
log "downloading and installing (takes a few minutes)..."
start=$(date +%s)
set +e
debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" 2>&1 \
  | tee "$tmp/debootstrap.log" \
  | awk '/^I: (Retrieving|Validating|Extracting|Unpacking|Configuring)/ { split($0,a," "); if (a[2] != last) { print "[rootfs] ... " a[2] " packages" > "/dev/stderr"; last = a[2] } }
         /^I: Base system installed/ { print "[rootfs] ... base system installed" > "/dev/stderr" }'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc != 0 ]]; then
  tail -n 20 "$tmp/debootstrap.log" >&2
  [[ -f "$root/debootstrap/debootstrap.log" ]] && tail -n 20 "$root/debootstrap/debootstrap.log" >&2
  die "debootstrap failed"
fi
log "debootstrap done in $(( $(date +%s) - start ))s"

log "configuring"
echo capsa >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost capsa
::1		localhost ip6-localhost ip6-loopback
HOSTS
: >"$root/etc/resolv.conf"
# No fstab entries: capsa-init mounts everything; root comes from root= on the cmdline.
echo "# managed by capsa-init" >"$root/etc/fstab"
# matplotlib: headless backend. Debian's matplotlib reads /etc/matplotlibrc.
if [[ -f "$root/etc/matplotlibrc" ]]; then
  sed -i -E '/^\s*#?\s*backend\s*:/d' "$root/etc/matplotlibrc"
fi
echo "backend: Agg" >>"$root/etc/matplotlibrc"
# Keep later apt/pip installs inside the VM small as well.
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
cat >"$root/etc/dpkg/dpkg.cfg.d/01-capsa-nodoc" <<'NODOC'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
NODOC
# pip: allow `pip install` as root in the sandbox (PEP 668 would refuse otherwise).
mkdir -p "$root/etc/pip.conf.d" 
cat >"$root/etc/pip.conf" <<'PIP'
[global]
break-system-packages = true
root-user-action = ignore
disable-pip-version-check = true
PIP
chroot "$root" dpkg -l >"$tmp/packages.txt"

log "trimming apt caches, docs, man pages, locales"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
       "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
       "$root"/var/log/* "$root"/tmp/* "$root"/debootstrap
find "$root/usr/share/doc" -mindepth 1 -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true

rm -rf "$out"; mv "$tmp" "$out"
touch "$out/.done"
log "done: $(du -sh "$out/rootfs" | cut -f1) in $out/rootfs"
echo "$out"
