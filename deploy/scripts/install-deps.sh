#!/usr/bin/env bash
# Idempotent host dependency installer for Capsa on Debian 12 (bookworm).
# Installs only what is missing; prints one line per step. Run as root.
set -euo pipefail

APT_PACKAGES=(
  redis-server qemu-system-x86 qemu-utils debootstrap linux-source
  bc bison flex libelf-dev libssl-dev protobuf-compiler
  busybox-static cpio xz-utils e2fsprogs
)
export DEBIAN_FRONTEND=noninteractive
log="${TMPDIR:-/tmp}/capsa-install-deps.log"
: >"$log"

step() { printf '[deps] %-40s %s\n' "$1" "$2"; }
fail() { step "$1" "FAILED (see $log)"; tail -n 20 "$log" >&2; exit 1; }

[[ $EUID == 0 ]] || { echo "[deps] must run as root" >&2; exit 1; }

# --- apt --------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  step "apt packages (${#APT_PACKAGES[@]})" "already installed"
else
  step "apt-get update" "..."
  apt-get update -qq >>"$log" 2>&1 || fail "apt-get update"
  step "apt-get install ${#missing[@]} package(s)" "${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1 || fail "apt-get install"
  step "apt packages" "installed"
fi

# --- buf (protobuf lint/breaking) ----------------------------------------------
if command -v buf >/dev/null 2>&1; then
  step "buf" "present ($(buf --version 2>/dev/null))"
elif command -v npm >/dev/null 2>&1; then
  npm install -g --silent @bufbuild/buf >>"$log" 2>&1 || fail "npm install -g @bufbuild/buf"
  step "buf" "installed via npm"
else
  step "buf" "SKIPPED: npm not found (install nodejs/npm, then rerun)"
fi

# --- vhost-device-vsock (vsock backend for QEMU) ---------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if command -v vhost-device-vsock >/dev/null 2>&1; then
  step "vhost-device-vsock" "present ($(command -v vhost-device-vsock))"
elif command -v cargo >/dev/null 2>&1; then
  step "vhost-device-vsock" "building with cargo (a few minutes)..."
  cargo install vhost-device-vsock --locked >>"$log" 2>&1 || fail "cargo install vhost-device-vsock"
  step "vhost-device-vsock" "installed ($(command -v vhost-device-vsock))"
else
  step "vhost-device-vsock" "SKIPPED: cargo not found (install rustup, then rerun)"
fi

# --- sanity ----------------------------------------------------------------
if [[ -e /dev/kvm && -w /dev/kvm ]]; then
  step "/dev/kvm" "present (KVM may be usable; QEMU TCG is the fallback)"
else
  step "/dev/kvm" "absent: VMs will run under QEMU TCG (slow)"
fi
step "done" ""
