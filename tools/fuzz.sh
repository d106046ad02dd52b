#!/usr/bin/env bash
# Longer fuzz pass: runs the property-test targets below again and again, each time
# with STAMPEDE_FUZZ_CASES cases and a fresh random seed, until DURATION is used up.
# CI runs the same targets once with the default (short) case count, in `cargo test`.
#
#   tools/fuzz.sh DURATION        DURATION: seconds, or 90s, 10m, 1h
#   STAMPEDE_FUZZ_CASES=5000 tools/fuzz.sh 10m
#
# A failing target is reported (proptest prints the minimal input and stores its seed
# beside the test file, under proptest-regressions/) and the others go on; the exit
# code is 1 if any target failed. Debug build on purpose: overflow checks are on.
# One target runs at a time (one core), so the machine stays usable.
set -euo pipefail
cd "$(dirname "$0")/.."

# One target a line: PACKAGE TEST NAME, where TEST is a file under PACKAGE's tests/
# (without .rs) or "lib" for a unit test; NAME is the test's full name.
TARGETS=(
  "stampede fuzz_plans fuzz_plan_bytes"
  "stampede fuzz_plans fuzz_plan_mutations"
  "stampede fuzz_plans fuzz_templates"
  "stampede fuzz_plans fuzz_json_templates"
  "stampede fuzz_plans fuzz_csv_bytes"
  "stampede fuzz_plans fuzz_jsonl_bytes"
  "stampede fuzz_plans fuzz_csv_round_trip"
  "stampede-protocol fuzz_wire fuzz_wire_bytes"
  "stampede-protocol fuzz_wire fuzz_wire_mutations"
  "stampede-protocol fuzz_wire fuzz_striping_sequences"
  "stampede lib control::tests::fuzz_control_requests"
  "stampede fuzz_http fuzz_http_response_bytes"
  "stampede fuzz_http fuzz_http_response_mutations"
  "stampede fuzz_http fuzz_set_cookie"
)

usage() { echo "usage: tools/fuzz.sh DURATION   (seconds, or e.g. 90s, 10m, 1h)" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in
  *[!0-9smh]* | "") usage ;;
  *h) secs=$(( ${1%h} * 3600 )) ;;
  *m) secs=$(( ${1%m} * 60 )) ;;
  *s) secs=${1%s} ;;
  *) secs=$1 ;;
esac
export STAMPEDE_FUZZ_CASES=${STAMPEDE_FUZZ_CASES:-2000}

selector() { # PACKAGE TEST -> cargo test arguments
  if [ "$2" = lib ]; then echo "-p $1 --lib"; else echo "-p $1 --test $2"; fi
}

echo "building the fuzz targets..."
for t in "${TARGETS[@]}"; do
  read -r pkg test _ <<<"$t"
  # shellcheck disable=SC2046
  cargo test -q $(selector "$pkg" "$test") --no-run 2>&1 | grep -v '^$' || true
done

deadline=$(( $(date +%s) + secs ))
declare -A runs=() failed=()
round=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  round=$((round + 1))
  for t in "${TARGETS[@]}"; do
    [ "$(date +%s)" -lt "$deadline" ] || break
    read -r pkg test name <<<"$t"
    [ -z "${failed[$name]:-}" ] || continue
    log=$(mktemp)
    # shellcheck disable=SC2046
    if RUST_BACKTRACE=0 cargo test -q $(selector "$pkg" "$test") -- --exact "$name" >"$log" 2>&1; then
      runs[$name]=$(( ${runs[$name]:-0} + 1 ))
    else
      failed[$name]=1
      echo "FAILED: $name (round $round)"
      { grep -m1 -A1 "panicked" "$log"; grep -A20 "minimal failing input" "$log"; } | head -40 || tail -40 "$log"
    fi
    rm -f "$log"
  done
done

echo "fuzz pass of ${secs}s, $STAMPEDE_FUZZ_CASES cases a run:"
for t in "${TARGETS[@]}"; do
  read -r _ _ name <<<"$t"
  n=${runs[$name]:-0}
  if [ -n "${failed[$name]:-}" ]; then
    echo "  $name: FAILED after $n clean run(s)"
  else
    echo "  $name: $n run(s), $(( n * STAMPEDE_FUZZ_CASES )) cases, no failure"
  fi
done
[ ${#failed[@]} -eq 0 ]
