#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md on this machine, from a fresh Debian 12 machine: installs
# what it needs, builds the release binaries and the guest image (cached by content hash), then
# runs each bench in turn and prints its table. Real VMs, on the engine this host offers; about
# 15 minutes under TCG on two cores once built. Root (VM networking, cgroups).
#
#   deploy/scripts/bench.sh            # all of them
#   CAPSA_BENCH_QUICK=1 deploy/scripts/bench.sh   # fewer samples: a smoke run, not figures
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
export CAPSA_CACHE_DIR="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
target="${CARGO_TARGET_DIR:-$PWD/target}"

deploy/scripts/install-deps.sh
cargo build --release --locked --workspace --bins
CAPSA_IMAGE_DIR="$(deploy/guest/build-image.sh --agent "$target/release/capsa-agent" | tail -n 1)"
export CAPSA_IMAGE_DIR
# The native exec bench runs the agent's Python kernel with this interpreter.
CAPSA_PYTHON="$(deploy/scripts/python-env.sh | tail -n 1)"
export CAPSA_PYTHON

if [[ -n "${CAPSA_BENCH_QUICK:-}" ]]; then
  samples=1 exec_samples=20 creates=4 arrivals=4 warm=2
else
  samples=5 exec_samples=200 creates=20 arrivals=30 warm=4
fi
bin="$target/release"
run() { echo; echo "\$ ${*#"$bin/"}"; "$@"; }
run "$bin/capsa-vm-pool-bench" --samples "$samples" --concurrency 8 --net-samples 3
run "$bin/capsa-exec-bench" --native --samples "$exec_samples"
run "$bin/capsa-exec-bench" --samples "$exec_samples"
run "$bin/capsa-exec-bench" --creates "$creates"
run "$bin/capsa-exec-bench" --arrivals "$arrivals" --warm "$warm"
