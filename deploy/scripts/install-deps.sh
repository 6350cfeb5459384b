#!/usr/bin/env bash
# Idempotent host dependency installer for Capsa on Debian 12 (bookworm).
# Installs only what is missing; prints one line per step. Run as root.
#
# Everything the build, the scripts and the tests run is named here: Debian packages by name,
# tools from crates.io and npm at pinned versions. Nothing may be there "by chance" (the
# protobuf compiler was, once). The one prerequisite is a Rust toolchain (rustup, Rust >= the
# workspace's rust-version): Debian's own cargo is too old for this workspace.
set -euo pipefail

APT_PACKAGES=(
  # build: C toolchain for -sys crates and the guest kernel (C++: libFuzzer, for the fuzz
  # targets), kernel build tools
  gcc g++ make libc6-dev pkg-config bc bison flex libelf-dev libssl-dev linux-source
  # guest image: rootfs, ext4 image, floor initramfs, compression
  debootstrap e2fsprogs busybox-static cpio xz-utils
  # run: VMs, state, the scripts' helpers (python3: free ports and JSON in up.sh; git: buf breaking)
  qemu-system-x86 qemu-utils redis-server redis-tools python3 git ca-certificates
  # the Python client and its tests (deploy/scripts/python-env.sh builds a venv from these)
  python3-venv python3-pip
  # VM networking: vm-pool's namespace, veth, taps (iproute2) and firewall (nftables, JSON)
  iproute2 nftables
  # container images and the containerized stack (deploy/scripts/images.sh, containers.sh): podman
  # with runc (crun fails on cgroup v1 hosts), netavark, catatonit (the pods' local pause image)
  podman runc netavark aardvark-dns catatonit
  # the dev CA and per-service certificates of the internal plane (deploy/scripts/certs.sh)
  openssl
  # the terminal the `capsa shell` e2e test (tests/tests/processes.rs) drives with send-keys
  tmux
)
# Pinned so every machine lints, tests and boots with the same tools.
BUF_VERSION=1.75.0
NEXTEST_VERSION=0.9.143
CARGO_FUZZ_VERSION=0.13.2

export DEBIAN_FRONTEND=noninteractive
log="${TMPDIR:-/tmp}/capsa-install-deps.log"
: >"$log"

step() { printf '[deps] %-40s %s\n' "$1" "$2"; }
fail() { step "$1" "FAILED (see $log)"; tail -n 20 "$log" >&2; exit 1; }

[[ $EUID == 0 ]] || { echo "[deps] must run as root" >&2; exit 1; }

apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then
    step "apt-get update" "..."
    apt-get update -qq >>"$log" 2>&1 || fail "apt-get update"
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1 || fail "apt-get install $*"
}

# --- apt --------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  step "apt packages (${#APT_PACKAGES[@]})" "already installed"
else
  step "apt-get install ${#missing[@]} package(s)" "${missing[*]}"
  # The whole list in one transaction, not just the missing ones, so apt picks versions that
  # fit together. QEMU comes from bookworm itself, named by suite: some images ship a newer
  # qemu-utils from bookworm-backports, which Breaks bookworm's qemu-system-common, and apt
  # will not downgrade it unless told which suite to take (it then gives up with "held broken
  # packages"). The agent channel and snapshots are tested against this QEMU.
  args=()
  for p in "${APT_PACKAGES[@]}"; do
    case $p in qemu-system-x86 | qemu-utils) args+=("$p/bookworm") ;; *) args+=("$p") ;; esac
  done
  apt_install --allow-downgrades "${args[@]}"
  step "apt packages" "installed"
fi
# What the scripts and tests run, checked by command so a removed package is caught here.
for cmd in gcc g++ make qemu-system-x86_64 qemu-img redis-server redis-cli debootstrap mkfs.ext4 \
  busybox cpio xz python3 git flock sha256sum ip nft podman runc tmux; do
  command -v "$cmd" >/dev/null 2>&1 || { step "$cmd" "MISSING after apt install"; exit 1; }
done

# --- Rust toolchain (prerequisite) -----------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 \
  || { step "cargo" "MISSING: install Rust with rustup (https://rustup.rs), then rerun"; exit 1; }
step "cargo" "present ($(cargo --version))"

# --- buf (protobuf lint/breaking), from npm ----------------------------------------
if command -v buf >/dev/null 2>&1 && [[ "$(buf --version 2>/dev/null)" == "$BUF_VERSION" ]]; then
  step "buf" "present ($BUF_VERSION)"
else
  if ! command -v npm >/dev/null 2>&1; then
    step "npm (for buf)" "installing Debian's npm"
    apt_install npm
  fi
  npm install -g --silent "@bufbuild/buf@$BUF_VERSION" >>"$log" 2>&1 \
    || fail "npm install -g @bufbuild/buf@$BUF_VERSION"
  hash -r
  step "buf" "installed $BUF_VERSION via npm ($(command -v buf))"
fi

# --- cargo-nextest (the test runner) ------------------------------------------------
if cargo nextest --version 2>/dev/null | grep -q "^cargo-nextest $NEXTEST_VERSION"; then
  step "cargo-nextest" "present ($NEXTEST_VERSION)"
else
  step "cargo-nextest" "building $NEXTEST_VERSION with cargo (a few minutes)..."
  cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked >>"$log" 2>&1 \
    || fail "cargo install cargo-nextest"
  step "cargo-nextest" "installed ($(command -v cargo-nextest))"
fi

# --- cargo-fuzz (the fuzz targets in fuzz/, run by deploy/scripts/fuzz.sh) -----------------
if cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz $CARGO_FUZZ_VERSION\$"; then
  step "cargo-fuzz" "present ($CARGO_FUZZ_VERSION)"
else
  step "cargo-fuzz" "building $CARGO_FUZZ_VERSION with cargo (a few minutes)..."
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked >>"$log" 2>&1 \
    || fail "cargo install cargo-fuzz"
  step "cargo-fuzz" "installed ($(command -v cargo-fuzz))"
fi

# --- sanity ----------------------------------------------------------------
if [[ -e /dev/kvm && -w /dev/kvm ]]; then
  step "/dev/kvm" "present (KVM may be usable; QEMU TCG is the fallback)"
else
  step "/dev/kvm" "absent: VMs will run under QEMU TCG (slow)"
fi
# --- the VMM user: vm-pool runs QEMU / Cloud Hypervisor as it -----------------------------
# (README "Per-VM limits and the VMM user"); in group kvm where that group exists.
if id -u capsa-vmm >/dev/null 2>&1; then
  step "user capsa-vmm" "present (uid $(id -u capsa-vmm))"
else
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --user-group capsa-vmm >>"$log" 2>&1 || fail "useradd capsa-vmm"
  step "user capsa-vmm" "created (uid $(id -u capsa-vmm))"
fi
if getent group kvm >/dev/null 2>&1 && ! id -nG capsa-vmm | grep -qw kvm; then
  usermod -a -G kvm capsa-vmm >>"$log" 2>&1 || fail "usermod -a -G kvm capsa-vmm"
  step "user capsa-vmm" "added to group kvm"
fi

step "done" ""
