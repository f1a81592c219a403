#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets) for a bounded time, starting
# from and growing its corpus in fuzz/corpus/<target>. A crash fails the
# run and leaves the input under fuzz/artifacts/<target>/.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]       (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-${FUZZ_SECONDS:-20}}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
# cargo fuzz wants a nightly compiler; the machine's stable one serves as
# one when told to (no other toolchain is fetched).
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in xmlrpc jsonrpc http_head; do
  mkdir -p "fuzz/corpus/$t"
  if ! cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed" >&2
    exit 1
  fi
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
  echo "fuzz $t: ${runs:-?} inputs in ${secs} s, corpus $(ls "fuzz/corpus/$t" | wc -l) files"
done
