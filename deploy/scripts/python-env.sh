#!/usr/bin/env bash
# Prints the path of a Python interpreter whose venv holds the pinned test tools
# (clients/python/requirements-test.txt) and the `capsa` package from clients/python.
#
# The venv is built from Debian's python3 (not whatever `python3` is first on PATH) under
# $CAPSA_CACHE_DIR/python/<hash of the requirements>, so it is built once per pin set; the
# `capsa` package is reinstalled from the working tree on every run, offline: its runtime
# dependencies and its build backend (hatchling) are pinned in the requirements, so neither
# `--no-deps` nor `--no-build-isolation` needs the index. Output: the interpreter path, last
# line.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${CAPSA_CACHE_DIR:-/var/cache/capsa}/python"
reqs=clients/python/requirements-test.txt
key="$(cat "$reqs" | sha256sum | cut -c1-16)"
venv="$cache/venv-$key"
log="${TMPDIR:-/tmp}/capsa-python-env.log"

if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
  echo "[python] building $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  /usr/bin/python3 -m venv "$venv" >>"$log" 2>&1
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs" >>"$log" 2>&1 \
    || { echo "[python] pip install -r $reqs failed (see $log)" >&2; tail -n 20 "$log" >&2; exit 1; }
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
  --force-reinstall ./clients/python >>"$log" 2>&1 \
  || { echo "[python] pip install ./clients/python failed (see $log)" >&2; tail -n 20 "$log" >&2; exit 1; }
echo "$venv/bin/python"
