#!/usr/bin/env bash
# Builds every Capsa container image with podman, on this machine, with no registry:
#
#   deploy/scripts/images.sh      # last stdout line: the tag, e.g. 3f2c1a9b0d1e or 3f2c1a9b0d1e-dirty-<hash>
#
# Images (all localhost/, tagged <tag> and latest): capsa-session-manager, capsa-metering,
# capsa-gateway, capsa-executor, capsa-cli (on the runtime base), capsa-vm-pool (on the node
# base: QEMU, iproute2, nftables), capsa-redis (on the redis base).
#
# How:
# - Bases: `debootstrap --variant=minbase` bookworm trees (one per package set), tarred and
#   `podman import`ed as localhost/capsa-base-<kind>:<hash>, cached by content hash under
#   $CAPSA_CACHE_DIR/container-base/ (hash = suite + packages + the functions that make them).
#   The guest rootfs (deploy/guest/build-rootfs.sh) is not reused: it carries Python, numpy,
#   pandas (hundreds of MB no service needs) and lacks QEMU.
# - Binaries: built once on the host (`cargo build --release --locked`, CARGO_TARGET_DIR
#   honoured) and copied in (deploy/container/Dockerfile). Not a build stage: that would need
#   a Rust toolchain in an image and recompile the whole workspace from nothing in every
#   build (half an hour on 2 cores), where the host's target dir is warm. The host is bookworm
#   too, so the binaries link against the same glibc as the images.
# - One image per service: each holds only its own binary and runs as its own user; only
#   vm-pool's image carries QEMU (~300 MB). Building them is one COPY layer each on a shared
#   base, so the layers below are stored once.
# - podman runs with runc and fixed ulimits from deploy/container/containers.conf (CONTAINERS_CONF):
#   crun fails on these hosts' cgroup v1, and the host's /etc is left alone.
#
# Env: CAPSA_CACHE_DIR (/var/cache/capsa), CARGO_TARGET_DIR, CAPSA_DEBIAN_MIRROR, CAPSA_SUITE,
#      CAPSA_IMAGE_BINARIES (a dir of already built service binaries to use instead of a
#      release build: the test command passes its dev build, which its tests need anyway,
#      where a release build of every service costs it about 8 minutes; tag
#      <rev>-bin-<hash of the binaries>, and no :latest),
#      CAPSA_CLOUD_HYPERVISOR_BIN (a Cloud Hypervisor binary to put in the vm-pool image),
#      CAPSA_SKIP_DEPS=1 (do not run install-deps.sh: the caller already did).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
suite="${CAPSA_SUITE:-bookworm}"
target="${CARGO_TARGET_DIR:-$root/target}"
export CONTAINERS_CONF="$root/deploy/container/containers.conf"
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "[images] $*" >&2; }
die() { echo "[images] ERROR: $*" >&2; exit 1; }

[[ $EUID == 0 ]] || die "must run as root (debootstrap, rootful podman)"
[[ "${CAPSA_SKIP_DEPS:-}" == 1 ]] || "$here/install-deps.sh" >&2

# uid/gid of the non-root service user, the same in every image (and in deploy/k8s).
CAPSA_UID=10001
VMM_UID=10002

# The Debian mirror this machine already uses (as deploy/guest/build-rootfs.sh finds it).
find_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    grep -hE '^\s*(URIs:|deb\s)' "$f" | grep -oE '(https?|file)://[^ ]+' \
      | grep -E '/debian/?$' | grep -v security || true
  done | head -n1
}

# Users and trimming inside a fresh debootstrap tree ($1).
configure_tree() {
  local tree=$1
  chroot "$tree" groupadd --system --gid "$CAPSA_UID" capsa
  chroot "$tree" useradd --system --uid "$CAPSA_UID" --gid "$CAPSA_UID" --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin capsa
  # vm-pool runs every VMM as this user (README "Per-VM limits and the VMM user"), and the
  # executor runs as it too: a VM's dir and vsock socket are its (0700) and root's alone.
  # The same fixed uid in every image, so the two containers agree on the shared state dir.
  chroot "$tree" groupadd --system --gid "$VMM_UID" capsa-vmm
  chroot "$tree" useradd --system --uid "$VMM_UID" --gid "$VMM_UID" --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin capsa-vmm
  : >"$tree/etc/resolv.conf"
  rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/cache/apt/*.bin \
    "$tree"/var/lib/apt/lists/* "$tree"/var/log/* "$tree"/tmp/* "$tree"/debootstrap
  find "$tree/usr/share/doc" -mindepth 1 -delete 2>/dev/null || true
  rm -rf "$tree"/usr/share/man/* "$tree"/usr/share/info/*
  find "$tree/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
    -exec rm -rf {} + 2>/dev/null || true
}

# Ensures localhost/capsa-base-<kind>:<hash> exists; sets $base_ref.
base_image() {
  local kind=$1; shift
  local hash out tree mirror include
  hash="$( { printf '%s\n' "$suite" "$kind" "$CAPSA_UID" "$VMM_UID" "$@"; declare -f configure_tree base_image; } \
    | sha256sum | cut -c1-16)"
  base_ref="localhost/capsa-base-$kind:$hash"
  if podman image exists "$base_ref"; then log "base $kind: cached ($base_ref)"; return; fi
  out="$cache/container-base/$kind-$hash"
  mkdir -p "$cache/container-base"
  exec 8>"$cache/container-base/.lock"
  flock 8
  if [[ ! -f "$out/rootfs.tar" ]]; then
    mirror="${CAPSA_DEBIAN_MIRROR:-$(find_mirror)}"
    [[ -n "$mirror" ]] || die "no Debian mirror in /etc/apt/sources.list{,.d}; set CAPSA_DEBIAN_MIRROR"
    rm -rf "$out.tmp"; mkdir -p "$out.tmp"
    tree="$out.tmp/rootfs"
    include="$(IFS=,; echo "$*")"
    log "base $kind: debootstrap $suite minbase + $include (a few minutes)"
    debootstrap --variant=minbase --include="$include" "$suite" "$tree" "$mirror" \
      >"$out.tmp/debootstrap.log" 2>&1 \
      || { tail -n 20 "$out.tmp/debootstrap.log" >&2; die "debootstrap ($kind) failed"; }
    configure_tree "$tree"
    tar --numeric-owner --xattrs -C "$tree" -cf "$out.tmp/rootfs.tar" .
    rm -rf "$tree"
    rm -rf "$out"; mv "$out.tmp" "$out"
  fi
  log "base $kind: podman import $out/rootfs.tar"
  podman import --quiet "$out/rootfs.tar" "$base_ref" >/dev/null
  exec 8>&-
}

base_image runtime ca-certificates tini
runtime_base=$base_ref
base_image node ca-certificates tini qemu-system-x86 qemu-utils iproute2 nftables
node_base=$base_ref
base_image redis ca-certificates tini redis-server
redis_base=$base_ref

# A caller running under cargo (the containers test) hands down its CARGO_MANIFEST_DIR,
# CARGO_PKG_* and the like; build scripts that track them (ring's) would then rebuild half the
# workspace here, and again in the caller's next build.
for v in $(compgen -e | grep -E '^(CARGO_(MANIFEST_|PKG_|BIN_|CRATE_|PRIMARY_|TARGET_TMPDIR)|OUT_DIR$)' || true); do
  unset "$v"
done
bins="${CAPSA_IMAGE_BINARIES:-}"
if [[ -z "$bins" ]]; then
  log "building release binaries (target dir $target)"
  (cd "$root" && cargo build --release --locked -p capsa-session-manager -p capsa-vm-pool \
    -p capsa-executor -p capsa-metering -p capsa-cli -p capsa-gateway) >&2
  bins="$target/release"
else
  log "binaries from $bins"
fi

# The build context: the binaries and nothing else (the repository, target/ and .capsa/
# never enter an image).
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/bin"
for b in capsa-session-manager capsa-vm-pool capsa-executor capsa-metering capsa capsa-gateway; do
  [[ -x "$bins/$b" ]] || die "no $b in $bins"
  cp "$bins/$b" "$ctx/bin/"
done
# The vm-pool image's optional extra VMM: the operator's Cloud Hypervisor binary (v51.0+).
mkdir "$ctx/vmm"
if [[ -n "${CAPSA_CLOUD_HYPERVISOR_BIN:-}" ]]; then
  install -m 0755 "$CAPSA_CLOUD_HYPERVISOR_BIN" "$ctx/vmm/cloud-hypervisor"
fi

tag="$(git -C "$root" rev-parse --short=12 HEAD)"
ctx_hash() {
  find "$ctx" -type f -print0 | sort -z | xargs -0 cat \
    | cat - "$root/deploy/container/Dockerfile" | sha256sum | cut -c1-8
}
if [[ -n "${CAPSA_IMAGE_BINARIES:-}" ]]; then
  # Binaries built elsewhere: the revision alone does not name them.
  tag="$tag-bin-$(ctx_hash)"
elif [[ -n "$(git -C "$root" status --porcelain --untracked-files=normal 2>/dev/null)" ]]; then
  # A dirty tree: the revision alone does not name what was built.
  tag="$tag-dirty-$(ctx_hash)"
fi

for svc in session-manager metering gateway executor vm-pool cli redis; do
  # :latest names release builds only.
  latest=()
  [[ -n "${CAPSA_IMAGE_BINARIES:-}" ]] || latest=(-t "localhost/capsa-$svc:latest")
  log "image capsa-$svc:$tag"
  podman build --quiet --layers -f "$root/deploy/container/Dockerfile" --target "$svc" \
    --build-arg RUNTIME_BASE="$runtime_base" --build-arg NODE_BASE="$node_base" \
    --build-arg REDIS_BASE="$redis_base" --label "org.opencontainers.image.revision=$tag" \
    -t "localhost/capsa-$svc:$tag" "${latest[@]}" "$ctx" >/dev/null
done
podman images --filter "reference=localhost/capsa-*:$tag" \
  --format '{{.Repository}}:{{.Tag}} {{.Size}}' >&2
echo "$tag"
