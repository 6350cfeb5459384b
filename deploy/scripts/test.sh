#!/usr/bin/env bash
# The full test suite, from a fresh Debian 12 machine: installs what it needs, lints the
# contracts, builds the guest image (cached by content hash), fuzzes the parsers of untrusted
# input for a bounded time, then runs every test, including the ones that boot real VMs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
export CAPSA_CACHE_DIR="${CAPSA_CACHE_DIR:-/var/cache/capsa}"
target="${CARGO_TARGET_DIR:-$PWD/target}"

deploy/scripts/install-deps.sh

echo "[test] buf lint"
buf lint
if git rev-parse --verify -q main >/dev/null && [ "$(git rev-parse main)" != "$(git rev-parse HEAD)" ]; then
  echo "[test] buf breaking against main"
  buf breaking --against '.git#branch=main'
fi

echo "[test] guest image"
cargo build --release --locked -p capsa-guest-agent --bin capsa-agent
CAPSA_IMAGE_DIR="$(deploy/guest/build-image.sh --agent "$target/release/capsa-agent" | tail -n 1)"
export CAPSA_IMAGE_DIR

# The Python client's tests and the InstaVM SDK's run from the e2e tests with this interpreter.
echo "[test] python env"
CAPSA_PYTHON="$(deploy/scripts/python-env.sh | tail -n 1)"
export CAPSA_PYTHON

# Bounded: the parsers of untrusted input, 20 s each (deploy/scripts/fuzz.sh for long runs).
echo "[test] fuzz"
deploy/scripts/fuzz.sh --seconds 20

# Everything the tests run, built once; then the container images the containerized-stack
# test runs, from cached bases and the dev binaries just built (a release build of every
# service would add about 8 minutes).
echo "[test] build"
cargo nextest run --locked --workspace --no-run
# Every service binary too: nextest builds a package's binaries only for its own Rust
# integration tests, and the gateway has none (its tests are Python, run by the e2e suite),
# so on a fresh machine its binary existed only if something else had built it.
cargo build --locked --workspace --bins
echo "[test] container images"
export CAPSA_IMAGE_BINARIES="$target/debug"
CAPSA_SKIP_DEPS=1 deploy/scripts/images.sh | tail -n 1

echo "[test] cargo nextest"
cargo nextest run --locked --workspace

# nextest does not run doc tests: the client crate's documented examples must compile.
echo "[test] doc examples"
cargo test --locked --doc -p capsa-client
