#!/usr/bin/env bash
# Brings the whole Capsa stack up on this machine and runs a demo session:
# installs what is missing, builds release binaries and the guest image (cached by content
# hash), starts Redis and every service on localhost, writes .capsa/dev.env, runs the demo
# with the `capsa` CLI, then keeps everything up until Ctrl-C / SIGTERM and stops it all.
#
#   deploy/scripts/up.sh            # stack + demo, stays up
#   deploy/scripts/up.sh --no-wait  # stack + demo, then stop (scripts, smoke tests)
#
# Environment: CAPSA_PORT (public port, default 50051), CAPSA_HTTP_PORT (the InstaVM-compatible
# HTTP gateway, default 8080), CAPSA_WARM (warm VMs, default 1), CAPSA_CACHE_DIR
# (kernel/rootfs/image cache, default /var/cache/capsa).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
export CAPSA_CACHE_DIR="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release"
state="$root/.capsa"
public_port="${CAPSA_PORT:-50051}"
http_port="${CAPSA_HTTP_PORT:-8080}"
wait_for_signal=1
[ "${1:-}" = "--no-wait" ] && wait_for_signal=0

deploy/scripts/install-deps.sh

echo "[up] building release binaries"
cargo build --release --locked -p capsa-session-manager -p capsa-vm-pool -p capsa-executor \
  -p capsa-metering -p capsa-guest-agent -p capsa-cli -p capsa-gateway
image_dir="$(deploy/guest/build-image.sh --agent "$bin/capsa-agent" | tail -n 1)"

mkdir -p "$state/logs" "$state/redis" "$state/vm-state"
# The internal plane is mTLS: a dev CA and one certificate per service (kept across runs).
tls_dir="$(deploy/scripts/certs.sh "$state/tls")"
pids=()
stop_all() {
  trap - INT TERM EXIT
  echo "[up] stopping"
  # Reverse start order: the public API first, Redis last; vm-pool destroys its VMs on TERM.
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    # Give each process 15 s to finish (vm-pool destroys its VMs), then kill it.
    ( sleep 15; kill -KILL "$pid" 2>/dev/null ) &
    local killer=$!
    wait "$pid" 2>/dev/null || true
    kill "$killer" 2>/dev/null || true
  done
  echo "[up] stopped"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a service with --listen 127.0.0.1:<port> and its certificate (capsa-NAME: NAME.pem)
# and sets $addr to the address it printed.
# (Not called as $(...): a subshell would lose the pid it records for stop_all.)
start_service() {
  local name=$1 port=$2; shift 2
  local out="$state/logs/$name.out"
  : >"$out"
  local cert="$tls_dir/${name#capsa-}"
  "$bin/$name" --listen "127.0.0.1:$port" --tls-cert "$cert.pem" --tls-key "$cert.key" \
    --tls-ca "$tls_dir/ca.pem" "$@" >"$out" 2>"$state/logs/$name.log" &
  pids+=("$!")
  for _ in $(seq 1 600); do
    if grep -q '^CAPSA_LISTENING=' "$out"; then
      addr="$(sed -n 's/^CAPSA_LISTENING=//p' "$out" | head -n 1)"
      return 0
    fi
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "[up] $name did not start; see $state/logs/$name.log" >&2
  tail -n 20 "$state/logs/$name.log" >&2
  return 1
}

redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# A memory limit, and never evict: evicting would silently drop session state; at the
# limit writes fail (and are logged), which is the signal to give Redis more room.
# Redis asks for a password (kept in .capsa/redis.pw, 0600). It is never on a command line
# (ps shows those): redis-server reads it from a 0600 config file, redis-cli from
# REDISCLI_AUTH, the services from CAPSA_REDIS_URL.
[ -s "$state/redis.pw" ] || (umask 077; openssl rand -hex 24 >"$state/redis.pw")
export REDISCLI_AUTH="$(cat "$state/redis.pw")"
(umask 077; printf 'requirepass %s\n' "$REDISCLI_AUTH" >"$state/redis.conf")
redis-server "$state/redis.conf" --port "$redis_port" --bind 127.0.0.1 --dir "$state/redis" --save 60 1 \
  --appendonly yes --protected-mode no --maxmemory "${CAPSA_REDIS_MAXMEMORY:-1gb}" \
  --maxmemory-policy noeviction >"$state/logs/redis.log" 2>&1 &
pids+=("$!")
export CAPSA_REDIS_URL="redis://:$REDISCLI_AUTH@127.0.0.1:$redis_port/"
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "[up] redis on 127.0.0.1:$redis_port (password in $state/redis.pw)"

start_service capsa-executor 0 --vm-state-dir "$state/vm-state"
executor_addr=$addr
echo "[up] executor on $executor_addr"
start_service capsa-vm-pool 0 --state-dir "$state/vm-state" \
  --image-dir "$image_dir" --warm "${CAPSA_WARM:-1}" \
  --node-id "$(hostname)" --executor-url "https://$executor_addr"
echo "[up] vm-pool on $addr"
start_service capsa-metering 0
metering_addr=$addr
echo "[up] metering on $metering_addr"
# The dev stack's default egress lets sessions reach the package registries (the demo's
# `pip install`); CAPSA_DEFAULT_EGRESS overrides it (`{"deny_all": true}`: no egress).
dev_egress='{"allow_package_managers": true}'
start_service capsa-session-manager "$public_port" \
  --metering-url "https://$metering_addr" --default-egress "${CAPSA_DEFAULT_EGRESS:-$dev_egress}"
session_addr=$addr
# Sessions need a registered node: wait for vm-pool's first heartbeat.
for _ in $(seq 1 100); do
  [ "$(redis-cli -p "$redis_port" EXISTS "{capsa}:node:$(hostname)")" = 1 ] && break
  sleep 0.1
done

start_service capsa-gateway "$http_port" --session-manager-url "http://$session_addr"
http_addr=$addr

api_key="$("$bin/capsa-session-manager" create-api-key --tenant dev --name dev)"
# The key is a secret: the file is the owner's alone (0600), created so from the start.
rm -f "$state/dev.env"
(umask 077 && cat >"$state/dev.env") <<ENV
CAPSA_ENDPOINT=http://$session_addr
CAPSA_HTTP_ENDPOINT=http://$http_addr
CAPSA_API_KEY=$api_key
ENV
echo
echo "Capsa is up."
echo "  endpoint: http://$session_addr"
echo "  http:     http://$http_addr (InstaVM-compatible; InstaVM(key, base_url=...))"
echo "  api key:  $api_key"
echo "  (all written to $state/dev.env; logs in $state/logs/)"
echo

echo "[demo] creating a session (the first VM may still be booting under software emulation)"
capsa="$bin/capsa"
sid="$("$capsa" create --lifetime 10m --label demo=readme --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
echo "[demo] session $sid"
echo "[demo] \$ capsa exec $sid 'x = 42'";        "$capsa" exec "$sid" 'x = 42'
echo "[demo] \$ capsa exec $sid 'print(x)'";      "$capsa" exec "$sid" 'print(x)'
echo "[demo] \$ capsa exec $sid 'x * 2'";         "$capsa" exec "$sid" 'x * 2'
echo "[demo] \$ capsa exec $sid --lang shell 'uname -r; echo hello > /tmp/f; cat /tmp/f'"
"$capsa" exec "$sid" --lang shell 'uname -r; echo hello > /tmp/f; cat /tmp/f'
echo "[demo] \$ capsa egress $sid";                "$capsa" egress "$sid"
echo "[demo] \$ capsa exec $sid --lang shell 'pip install -q tabulate'  # not in the image"
"$capsa" exec "$sid" --lang shell 'pip install -q --disable-pip-version-check tabulate'
echo "[demo] \$ capsa exec $sid 'import tabulate; print(tabulate.tabulate([[1, 2]]))'"
"$capsa" exec "$sid" 'import tabulate; print(tabulate.tabulate([[1, 2]]))'
echo "[demo] \$ capsa info $sid";                 "$capsa" info "$sid"
echo "[demo] \$ capsa usage $sid";                "$capsa" usage "$sid"
echo "[demo] POST http://$http_addr/execute {\"session_id\": \"$sid\", \"command\": \"print(x + 1)\"}"
echo "[demo]   (the same session through the InstaVM-compatible HTTP API)"
CAPSA_DEMO_KEY="$api_key" python3 - "http://$http_addr/execute" "$sid" <<'PY'
import json, os, sys, urllib.request
url, sid = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, json.dumps({"session_id": sid, "command": "print(x + 1)"}).encode(),
                             {"X-API-Key": os.environ["CAPSA_DEMO_KEY"], "Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=120))
print(out["stdout"], end="")
assert out["stdout"] == "43\n", out
PY
echo "[demo] \$ capsa process start $sid -- python3 -m http.server 8000 --directory /tmp"
server="$("$capsa" process start "$sid" -- python3 -m http.server 8000 --directory /tmp)"
echo "[demo] \$ capsa port-forward $sid 0:8000 &   # a local port tunnelled to the guest's 8000"
"$capsa" port-forward "$sid" 0:8000 >"$state/logs/port-forward.log" 2>&1 &
pids+=($!)   # stopped with the stack, whatever happens below
python3 - "$state/logs/port-forward.log" <<'PY'
import re, sys, time, urllib.request
deadline = time.time() + 120
while True:  # the forwarder prints its address; the guest's server takes a moment to start
    try:
        addr = re.search(r"Forwarding from (\S+) ->", open(sys.argv[1]).read()).group(1)
        body = urllib.request.urlopen(f"http://{addr}/f", timeout=30).read()
        break
    except Exception as e:
        if time.time() > deadline:
            raise SystemExit(f"[demo] GET through the tunnel failed: {e}")
        time.sleep(1)
print(f"[demo] GET http://{addr}/f -> {body!r}  (the file written by the shell above)")
assert body == b"hello\n", body
PY
echo "[demo] \$ capsa process list $sid";        "$capsa" process list "$sid"
echo "[demo] \$ capsa process kill $sid $server"; "$capsa" process kill "$sid" "$server"
echo "[demo] \$ capsa kill $sid";                 "$capsa" kill "$sid"
echo "[demo] done"

if [ "$wait_for_signal" = 1 ]; then
  echo "Stack is running; Ctrl-C to stop."
  wait
fi
