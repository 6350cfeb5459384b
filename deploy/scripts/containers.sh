#!/usr/bin/env bash
# The whole Capsa stack in containers (podman, deploy/container/pod.yaml), on one host:
#
#   deploy/scripts/containers.sh up     # images (images.sh), guest image, pod, first API key
#   deploy/scripts/containers.sh down   # stops the pod (vm-pool destroys its VMs), removes it
#   deploy/scripts/containers.sh logs   # the last lines of every container's log
#
# `up` prints, as its last lines, what a client needs (also written, 0600, to $dir/env):
#   CAPSA_ENDPOINT=http://127.0.0.1:<port>  CAPSA_ENDPOINT_B=<replica b>  CAPSA_HTTP_ENDPOINT=...
#   CAPSA_API_KEY=...
# Env: CAPSA_STACK_NAME (pod name, default capsa), CAPSA_CONTAINERS_DIR (state, default
#   .capsa/containers/<name>), CAPSA_IMAGE_TAG (skip images.sh and use these images),
#   CAPSA_IMAGE_DIR (skip the guest image build), CAPSA_PORT / CAPSA_HTTP_PORT (public ports,
#   default 50051 / 8080; 0 = free ports), CAPSA_WARM (warm VMs, default 1), CAPSA_CACHE_DIR,
#   CAPSA_OTLP_ENDPOINT (an OTLP/gRPC collector every service exports to, e.g.
#   http://127.0.0.1:4317; none by default), CAPSA_OTLP_INTERVAL_MS (metric export period,
#   default 60000).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export CONTAINERS_CONF="$root/deploy/container/containers.conf"
export CAPSA_CACHE_DIR="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
export PATH="$HOME/.cargo/bin:$PATH"
name="${CAPSA_STACK_NAME:-capsa}"
dir="${CAPSA_CONTAINERS_DIR:-$root/.capsa/containers/$name}"

log() { echo "[containers] $*" >&2; }
die() { echo "[containers] ERROR: $*" >&2; exit 1; }
[[ $EUID == 0 ]] || die "must run as root (rootful podman: vm-pool needs a privileged container)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

down() {
  if podman pod exists "$name"; then
    # vm-pool destroys its VMs and network objects on SIGTERM: give it time before SIGKILL.
    log "stopping pod $name"
    podman pod stop -t 60 "$name" >/dev/null || true
    podman pod rm -f "$name" >/dev/null
  fi
  rm -rf "$dir"
  log "down: pod $name removed"
}

logs() {
  local c
  for c in $(podman ps -a --filter "pod=$name" --format '{{.Names}}'); do
    echo "--- $c"; podman logs --tail 40 "$c" 2>&1 || true
  done
}

up() {
  podman pod exists "$name" && die "pod $name already exists (run: $0 down)"
  local tag="${CAPSA_IMAGE_TAG:-}" image_dir="${CAPSA_IMAGE_DIR:-}" target
  target="${CARGO_TARGET_DIR:-$root/target}"
  if [[ -z "$tag" ]]; then tag="$("$here/images.sh" | tail -n 1)"; fi
  if [[ -z "$image_dir" ]]; then
    (cd "$root" && cargo build --release --locked -p capsa-guest-agent --bin capsa-agent) >&2
    image_dir="$("$root/deploy/guest/build-image.sh" --agent "$target/release/capsa-agent" | tail -n 1)"
  fi
  # A symlink (images/current) would dangle inside the container: mount the real directory.
  image_dir="$(readlink -f "$image_dir")"
  [[ -f "$image_dir/manifest.json" ]] || die "no guest image in $image_dir"

  local api="${CAPSA_PORT:-50051}" http="${CAPSA_HTTP_PORT:-8080}"
  [[ "$api" != 0 ]] || api="$(free_port)"
  [[ "$http" != 0 ]] || http="$(free_port)"
  local redis api2 metering executor vmpool node
  redis="$(free_port)"; api2="$(free_port)"; metering="$(free_port)"
  executor="$(free_port)"; vmpool="$(free_port)"
  # Names the node, its network namespace and its cgroup: unique per stack.
  node="ctr-$name"; node="${node:0:32}"

  rm -rf "$dir"; mkdir -p "$dir/vm-state"
  # The executor (uid 10002, capsa-vmm) lists the VM dirs vm-pool (root) makes here.
  chmod 0755 "$dir/vm-state"
  sed -e "s|@POD@|$name|g; s|@TAG@|$tag|g; s|@REDIS_PORT@|$redis|g; s|@API_PORT@|$api|g" \
      -e "s|@API2_PORT@|$api2|g; s|@HTTP_PORT@|$http|g; s|@METERING_PORT@|$metering|g" \
      -e "s|@EXECUTOR_PORT@|$executor|g; s|@VMPOOL_PORT@|$vmpool|g; s|@NODE_ID@|$node|g" \
      -e "s|@WARM@|${CAPSA_WARM:-1}|g; s|@STATE_DIR@|$dir/vm-state|g; s|@IMAGE_DIR@|$image_dir|g" \
      -e "s|@OTLP_ENDPOINT@|${CAPSA_OTLP_ENDPOINT:-}|g; s|@OTLP_INTERVAL_MS@|${CAPSA_OTLP_INTERVAL_MS:-60000}|g" \
      "$root/deploy/container/pod.yaml" >"$dir/pod.yaml"
  log "podman kube play (images :$tag, guest image $image_dir)"
  podman kube play "$dir/pod.yaml" >&2 || { logs >&2; die "podman kube play failed"; }

  # Ready when the node has registered (its heartbeat key) and both replicas and the gateway
  # accept connections; a container that exits meanwhile fails `up` at once.
  local deadline=$((SECONDS + 180)) ready=0
  while ((SECONDS < deadline)); do
    if podman ps -a --filter "pod=$name" --filter status=exited --format '{{.Names}}' | grep -q .; then
      logs >&2; die "a container exited during start-up"
    fi
    if [[ "$(podman exec "$name-redis" redis-cli -p "$redis" EXISTS "{capsa}:node:$node" 2>/dev/null)" == 1 ]] \
      && python3 - "$api" "$api2" "$http" <<'PY' 2>/dev/null
import socket, sys
for p in sys.argv[1:]:
    socket.create_connection(("127.0.0.1", int(p)), timeout=1).close()
PY
    then ready=1; break; fi
    sleep 1
  done
  [[ $ready == 1 ]] || { logs >&2; die "stack not ready within 180 s"; }

  # The first API key, minted by session-manager's own binary inside its container.
  local key
  key="$(podman exec "$name-session-manager-a" capsa-session-manager create-api-key \
    --redis-url "redis://127.0.0.1:$redis/" --tenant "${CAPSA_TENANT:-dev}" --name containers)"
  (umask 077 && cat >"$dir/env") <<ENV
CAPSA_ENDPOINT=http://127.0.0.1:$api
CAPSA_ENDPOINT_B=http://127.0.0.1:$api2
CAPSA_HTTP_ENDPOINT=http://127.0.0.1:$http
CAPSA_API_KEY=$key
ENV
  log "up: pod $name (node $node); client settings in $dir/env"
  cat "$dir/env"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  logs) logs ;;
  *) echo "usage: $0 up|down|logs" >&2; exit 2 ;;
esac
