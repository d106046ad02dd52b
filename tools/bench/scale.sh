#!/usr/bin/env bash
# Membership at scale: N real idle nodes on 127.0.0.1 (testnet/local.sh), for each N
# of --sizes: time to full view after the last start, then over a --window of idle
# seconds each node's TCP bytes (sent + received, from ss), CPU (/proc) and RSS, and
# its links. Called by `tools/bench/run.sh --only scale`, or on its own:
#
#   tools/bench/scale.sh [--sizes 10,30,50] [--window 10] [--bin target/release/stampede]
#
# The run columns (trigger-to-first-request, start skew, run control traffic,
# exactness) are the run side's (issue #13) and printed as "-" here.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZES="10,30,50"
WINDOW=10
BIN="$ROOT/target/release/stampede"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sizes) SIZES="$2"; shift 2 ;;
        --window) WINDOW="$2"; shift 2 ;;
        --bin) BIN="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "scale.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ "$WINDOW" =~ ^[1-9][0-9]*$ && "$WINDOW" -le 600 ]] || { echo "scale.sh: --window must be 1..600 seconds" >&2; exit 2; }
IFS=, read -r -a NS <<<"$SIZES"
for n in "${NS[@]}"; do
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 2 && "$n" -le 64 ]] || { echo "scale.sh: sizes must be 2..64 (testnet/local.sh's bound), got '$n'" >&2; exit 2; }
done
[[ -x "$BIN" ]] || { echo "scale.sh: $BIN is missing (cargo build --release -p stampede)" >&2; exit 2; }
command -v ss >/dev/null || { echo "scale.sh: needs ss (iproute2)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/stampede-scale.XXXXXX)
TN="$WORK/testnet"
cleanup() {
    STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
TCK=$(getconf CLK_TCK)

http_of() { grep -o '"http": *"[^"]*' "$1/control.json" | sed 's/.*"//'; }
# The mesh size a node reports on /metrics (alive members, itself included).
mesh_size() { # HOST:PORT
    local body
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || { echo 0; return; }
    printf "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3
    body=$(timeout 5 cat <&3 || true)
    exec 3<&-
    printf '%s\n' "$body" | awk '/^stampede_mesh_size / {print $2; f=1} END {if (!f) print 0}'
}
# "pid bytes" for every established TCP socket of the given pids (sent + received).
socket_bytes() { # PID...
    ss -Htinp state established 2>/dev/null | awk -v pids=" $* " '
        /users:\(\(/ { match($0, /pid=[0-9]+/); pid = substr($0, RSTART + 4, RLENGTH - 4); next }
        pid != "" && index(pids, " " pid " ") {
            s = 0; r = 0
            if (match($0, /bytes_sent:[0-9]+/)) s = substr($0, RSTART + 11, RLENGTH - 11)
            if (match($0, /bytes_received:[0-9]+/)) r = substr($0, RSTART + 15, RLENGTH - 15)
            print pid, s + r, 1
            pid = ""
        }' | awk '{b[$1] += $2; c[$1] += $3} END {for (p in b) printf "%s %.0f %d\n", p, b[p], c[p]}'
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
lo_bytes() { awk '$1 == "lo:" {printf "%.0f\n", $2 + $10}' /proc/net/dev; }

ROWS=()
for n in "${NS[@]}"; do
    echo "== $n idle nodes (testnet/local.sh, $(basename "$BIN"))" >&2
    rm -rf "$TN"
    STAMPEDE_BIN="$BIN" STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" "$n" >"$WORK/start-$n.log" 2>&1 \
        || { echo "scale.sh: testnet of $n did not start:" >&2; cat "$WORK/start-$n.log" >&2; exit 1; }
    last_start=$(date +%s.%N)
    mapfile -t PIDS <"$TN/pids"
    HTTPS=()
    for i in $(seq 1 "$n"); do HTTPS+=("$(http_of "$TN/n$i")"); done
    # Full view: every node counts n alive. Polled until 60 s after the last start.
    full=""
    deadline=$(awk -v a="$last_start" 'BEGIN {printf "%d", a + 60}')
    while [[ $(date +%s) -lt "$deadline" ]]; do
        ok=1
        for h in "${HTTPS[@]}"; do
            [[ "$(mesh_size "$h")" == "$n" ]] || { ok=0; break; }
        done
        if [[ "$ok" == 1 ]]; then
            full=$(awk -v a="$last_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f s", b - a}')
            break
        fi
        sleep 0.1
    done
    if [[ -z "$full" ]]; then
        full="not in 60 s"
        for i in $(seq 1 "$n"); do
            echo "n$i sees $(mesh_size "${HTTPS[$((i - 1))]}") alive" >&2
        done
    fi
    # Idle from here: past the prune grace (10 s) of the links newcomers opened to the
    # bootstrap node, so the window sees the steady state, not the start.
    sleep 12
    b0=$(socket_bytes "${PIDS[@]}" | awk '{s += $2} END {printf "%.0f\n", s}')
    lo0=$(lo_bytes)
    declare -A T0=()
    for p in "${PIDS[@]}"; do T0[$p]=$(cpu_ticks "$p"); done
    sleep "$WINDOW"
    b1=$(socket_bytes "${PIDS[@]}" | awk '{s += $2} END {printf "%.0f\n", s}')
    links=$(socket_bytes "${PIDS[@]}" | awk '{s += $3; if ($3 > m) m = $3} END {printf "%.1f (max %d)", s / NR, m}')
    lo1=$(lo_bytes)
    cpu_sum=0; cpu_max=0; rss_sum=0
    for p in "${PIDS[@]}"; do
        d=$(( $(cpu_ticks "$p") - ${T0[$p]} ))
        cpu_sum=$((cpu_sum + d)); [[ "$d" -gt "$cpu_max" ]] && cpu_max=$d
        rss_sum=$((rss_sum + $(rss_kb "$p")))
    done
    unset T0
    # Each byte is counted at both ends (sent by one node, received by another): per
    # node, half the sum is what it sent, the other half what it received.
    row=$(awk -v n="$n" -v w="$WINDOW" -v b="$((b1 - b0))" -v lo="$((lo1 - lo0))" -v c="$cpu_sum" -v cm="$cpu_max" \
        -v t="$TCK" -v r="$rss_sum" -v full="$full" -v links="$links" 'BEGIN {
        printf "| %d | %.2f KB/s | %.1f KB/s | %.2f %% (max %.2f %%) | %.0f MB | %s | %s | - | - | - | - |",
            n, b / 2 / n / w / 1000, lo / n / w / 1000, 100 * c / t / w / n, 100 * cm / t / w,
            r / n / 1024, links, full }')
    echo "$row" >&2
    ROWS+=("$row")
    STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
done

echo
echo "idle nodes over ${WINDOW} s (after full view + 12 s); bytes: TCP payload each node sent (= received), from ss; lo: the loopback interface's bytes per node (shared machine: includes others' traffic)"
echo "| nodes | idle bytes/s per node | lo bytes/s per node | idle CPU per node | RSS per node | links per node | full view after last start | trigger-to-first-request | start skew | run control traffic per node | merged vs target |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
