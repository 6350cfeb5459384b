#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time; exits non-zero if
# any of them crashed (a panic, a sanitizer report, an allocation over the limit, a hang).
#
#   deploy/scripts/fuzz.sh [--seconds N] [TARGET...]
#
# N is per target (default 600: a long run; the test command runs 20). Without TARGETs, every
# target runs. The corpus a run grows and the inputs that crashed are kept outside the repo,
# under $CAPSA_CACHE_DIR/fuzz/{corpus,artifacts}/<target>, so later runs start from what
# earlier ones found; the committed seeds in fuzz/corpus/<target> and dictionaries in
# fuzz/dict/<target>.dict are only read. A failure prints the command that replays its input.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"

seconds=600
targets=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: --seconds must be a positive integer" >&2; exit 2; }

# Sanitizer builds share nothing with normal ones: their own target dir.
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
out="${CAPSA_CACHE_DIR:-/var/cache/capsa}/fuzz"
# cargo-fuzz passes -Zsanitizer; the machine has one (stable) toolchain, so unlock it there.
export RUSTC_BOOTSTRAP=1

cd fuzz
if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list)
fi
echo "[fuzz] build ${targets[*]}"
start=$SECONDS
cargo fuzz build --target-dir "$target_dir"
echo "[fuzz] built in $((SECONDS - start)) s"
bin_dir="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  dict=()
  [[ -f dict/$t.dict ]] && dict=(-dict="dict/$t.dict")
  echo "[fuzz] $t for $seconds s"
  touch "$out/$t.start"
  # -timeout: one input running 10 s is a hang; -malloc_limit_mb: one allocation of 64 MiB
  # from inputs of a few KiB is unbounded allocation. New inputs go to the first corpus dir.
  if ! cargo fuzz run --target-dir "$target_dir" "$t" "$out/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=64 \
    -artifact_prefix="$out/artifacts/$t/" -print_final_stats=1 "${dict[@]}" 2>"$out/$t.log"; then
    # What failed (a panic's message, a sanitizer's or libFuzzer's verdict), then the end of
    # the log: the input, and where libFuzzer wrote it.
    grep -a -m 5 -E -A 1 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "$out/$t.log" >&2 || true
    tail -n 30 "$out/$t.log" >&2
    find "$out/artifacts/$t" -type f -newer "$out/$t.start" -printf "[fuzz] replay: $bin_dir/$t %p\n" >&2
    failed+=("$t")
    continue
  fi
  # The last status line (corpus, coverage, exec/s) and the run's totals.
  grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$out/$t.log" | tail -n 1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$out/$t.log" || true
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "[fuzz] FAILED: ${failed[*]} (inputs under $out/artifacts/<target>/, logs in $out/<target>.log)" >&2
  exit 1
fi
echo "[fuzz] ok: ${targets[*]} ran $seconds s each without a crash"
