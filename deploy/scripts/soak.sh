#!/usr/bin/env bash
# The chaos soak: create / execute / end cycles on the whole stack with random kill -9 of
# VMMs and crashes + restarts of the executor, vm-pool and Redis (append-only file), then
# checks that every session ended with the right reason and that nothing leaked (VMM
# processes, vsock sockets, overlays, taps, Redis keys). Builds what it needs like test.sh
# (release guest agent, guest image cached by content hash, the services), runs only the
# soak test, and prints its summary table. The test suite runs the same test with 30 cycles.
#
#   deploy/scripts/soak.sh [CYCLES]        # default 300 (1407 s here, on TCG, with nothing else running)
#   CAPSA_SOAK_SEED=N deploy/scripts/soak.sh 300   # replay a run (its seed is printed)
#
# The full output (services' logs included) goes to $CAPSA_SOAK_LOG (default
# ${TMPDIR:-/tmp}/capsa-soak.log). Exit status: the test's.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
export CAPSA_CACHE_DIR="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
cycles="${1:-300}"
case "$cycles" in
  '' | *[!0-9]* | 0) echo "usage: $0 [CYCLES > 0]" >&2; exit 2 ;;
esac
log="${CAPSA_SOAK_LOG:-${TMPDIR:-/tmp}/capsa-soak.log}"

deploy/scripts/install-deps.sh

echo "[soak] guest image"
cargo build --release --locked -p capsa-guest-agent --bin capsa-agent
CAPSA_IMAGE_DIR="$(deploy/guest/build-image.sh --agent "$target/release/capsa-agent" | tail -n 1)"
export CAPSA_IMAGE_DIR

echo "[soak] services"
# The stack starts these from the target dir; `nextest run -p capsa-e2e` alone builds none.
cargo build --locked -p capsa-session-manager -p capsa-vm-pool -p capsa-executor -p capsa-metering

echo "[soak] $cycles cycles (full output: $log)"
started=$(date +%s)
# Progress: one line per cycle; everything else only in the log.
set +e
CAPSA_SOAK_CYCLES="$cycles" cargo nextest run --locked --profile soak -p capsa-e2e \
  --test soak --no-capture 2>&1 | tee "$log" | grep --line-buffered -E '^soak: (seed|cycle)'
rc=${PIPESTATUS[0]}
set -e
elapsed=$(($(date +%s) - started))

echo "[soak] finished in ${elapsed}s with exit status $rc"
if grep -q '^soak: ---- summary ----' "$log"; then
  sed -n '/^soak: ---- summary ----/,$p' "$log" | grep '^soak: ' | sed 's/^soak: //'
else
  echo "[soak] no summary: the test did not get to its end; last lines:"
  grep '^soak: ' "$log" | tail -n 5 || true
  tail -n 30 "$log"
fi
exit "$rc"
