#!/usr/bin/env bash
# Membership and one run at scale: N real nodes on 127.0.0.1 (testnet/local.sh), for
# each N of --sizes:
#   1. idle: time to full view after the last start, then over a --window of idle
#      seconds each node's TCP bytes (sent + received, from ss), CPU (/proc) and RSS,
#      and its links;
#   2. run: ONE bounded run (tools/bench/scale.toml: --rate it/s for --plan seconds,
#      constant arrival rate) across every node, triggered with `stampede run --mesh`
#      through n1's control endpoint against a loopback stampede-target: trigger to the
#      first request (stamped by the target), start skew (from the summary), wall time
#      of the CLI call vs the plan's length, control traffic per node (every node
#      socket's bytes except those to the target's port, which are counted apart as the
#      load's own) and exactness (the summary's merged requests vs the target's count).
# Then the simulator's figures at --sim-nodes (stampede-sim --membership and --traffic;
# minutes at 1,000 nodes).
# Called by `tools/bench/run.sh --only scale`, or on its own:
#
#   tools/bench/scale.sh [--sizes 10,30,50] [--window 10] [--bin target/release/stampede]
#                        [--rate 200] [--plan 10] [--no-run] [--sim-nodes 1000 | 0]
#                        [--keep DIR]
#
# --keep DIR copies the work directory (every node's log, each run's summary JSON and
# CLI output, the socket samples) to DIR at the end.
# stampede-target and stampede-sim are taken from the directory of --bin.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZES="10,30,50"
WINDOW=10
BIN="$ROOT/target/release/stampede"
RATE=200
PLAN_S=10
RUN=1
SIM_NODES=1000
KEEP=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sizes) SIZES="$2"; shift 2 ;;
        --window) WINDOW="$2"; shift 2 ;;
        --bin) BIN="$2"; shift 2 ;;
        --rate) RATE="$2"; shift 2 ;;
        --plan) PLAN_S="$2"; shift 2 ;;
        --no-run) RUN=0; shift ;;
        --sim-nodes) SIM_NODES="$2"; shift 2 ;;
        --keep) KEEP="$2"; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "scale.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ "$WINDOW" =~ ^[1-9][0-9]*$ && "$WINDOW" -le 600 ]] || { echo "scale.sh: --window must be 1..600 seconds" >&2; exit 2; }
[[ "$RATE" =~ ^[1-9][0-9]*$ && "$RATE" -le 10000 ]] || { echo "scale.sh: --rate must be 1..10000 it/s" >&2; exit 2; }
[[ "$PLAN_S" =~ ^[1-9][0-9]*$ && "$PLAN_S" -le 300 ]] || { echo "scale.sh: --plan must be 1..300 seconds" >&2; exit 2; }
[[ "$SIM_NODES" =~ ^[0-9]+$ && ( "$SIM_NODES" == 0 || ( "$SIM_NODES" -ge 3 && "$SIM_NODES" -le 1000 ) ) ]] \
    || { echo "scale.sh: --sim-nodes must be 0 (skip) or 3..1000" >&2; exit 2; }
IFS=, read -r -a NS <<<"$SIZES"
for n in "${NS[@]}"; do
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 2 && "$n" -le 128 ]] || { echo "scale.sh: sizes must be 2..128 (testnet/local.sh's bound), got '$n'" >&2; exit 2; }
done
[[ -x "$BIN" ]] || { echo "scale.sh: $BIN is missing (cargo build --release -p stampede)" >&2; exit 2; }
BINDIR=$(cd "$(dirname "$BIN")" && pwd)
TARGET_BIN="$BINDIR/stampede-target"
SIM_BIN="$BINDIR/stampede-sim"
if [[ "$RUN" == 1 ]]; then
    [[ -x "$TARGET_BIN" ]] || { echo "scale.sh: $TARGET_BIN is missing (cargo build --release -p stampede-tools), or pass --no-run" >&2; exit 2; }
    command -v jq >/dev/null || { echo "scale.sh: the run columns need jq (or pass --no-run)" >&2; exit 2; }
fi
command -v ss >/dev/null || { echo "scale.sh: needs ss (iproute2)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/stampede-scale.XXXXXX)
TN="$WORK/testnet"
TARGET_PID=""
SAMPLER_PID=""
RUN_PID=""
cleanup() {
    # Everything this script started, by pid: the sampler, a run's CLI, the nodes, the target.
    if [[ -n "$SAMPLER_PID" ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
    if [[ -n "$RUN_PID" ]]; then kill "$RUN_PID" 2>/dev/null || true; fi
    STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
    if [[ -n "$TARGET_PID" ]]; then
        kill "$TARGET_PID" 2>/dev/null || true
        wait "$TARGET_PID" 2>/dev/null || true
    fi
    if [[ -n "$KEEP" ]]; then
        mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/ && echo "scale.sh: work directory kept in $KEEP" >&2
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
TCK=$(getconf CLK_TCK)

http_of() { grep -o '"http": *"[^"]*' "$1/control.json" | sed 's/.*"//'; }
# One HTTP/1.0 exchange over bash's /dev/tcp, bounded: prints the body. METHOD HOST:PORT PATH
http_body() {
    local out
    out=$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/${2%:*}/${2##*:}" || exit 1
        printf "%s %s HTTP/1.0\r\nHost: %s\r\nContent-Length: 0\r\n\r\n" "$1" "$3" "$2" >&3
        cat <&3' _ "$1" "$2" "$3" 2>/dev/null) || return 1
    printf '%s' "$out" | sed '1,/^\r\{0,1\}$/d'
}
# The mesh size a node reports on /metrics (alive members, itself included).
mesh_size() { # HOST:PORT
    http_body GET "$1" /metrics | awk '/^stampede_mesh_size / {print $2; f=1} END {if (!f) print 0}'
}
# "pid bytes sockets" for every established TCP socket of the given pids (sent + received).
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
# One line per established TCP socket of the given pids: "pid local peer sent received".
socket_lines() { # PID...
    ss -Htinp state established 2>/dev/null | awk -v pids=" $* " '
        /users:\(\(/ { match($0, /pid=[0-9]+/); pid = substr($0, RSTART + 4, RLENGTH - 4); l = $3; p = $4; next }
        pid != "" && index(pids, " " pid " ") {
            s = 0; r = 0
            if (match($0, /bytes_sent:[0-9]+/)) s = substr($0, RSTART + 11, RLENGTH - 11)
            if (match($0, /bytes_received:[0-9]+/)) r = substr($0, RSTART + 15, RLENGTH - 15)
            print pid, l, p, s, r
            pid = ""
        }'
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU time of every thread of a process in ns (schedstat's run time: exact, where the
# ticks of /proc/PID/stat are sampled at the scheduler tick and overcharge a process
# whose timers fire on tick boundaries, as an idle node's do).
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
lo_bytes() { awk '$1 == "lo:" {printf "%.0f\n", $2 + $10}' /proc/net/dev; }
load1() { cut -d' ' -f1 /proc/loadavg; }
free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 20000))
        if ! ss -Htln "sport = :$p" | grep -q .; then echo "$p"; return; fi
    done
    echo "scale.sh: no free port found for the target" >&2
    exit 1
}

# --- the target: one stampede-target for every size, its counters reset before each run
if [[ "$RUN" == 1 ]]; then
    TPORT=$(free_port)
    "$TARGET_BIN" --listen "127.0.0.1:$TPORT" >"$WORK/target.log" 2>&1 </dev/null &
    TARGET_PID=$!
    up=0
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$TPORT") 2>/dev/null && { up=1; break; }
        kill -0 "$TARGET_PID" 2>/dev/null || break
        sleep 0.1
    done
    [[ "$up" == 1 ]] || { echo "scale.sh: stampede-target did not listen on 127.0.0.1:$TPORT within 10 s; its log:" >&2; cat "$WORK/target.log" >&2; exit 1; }
fi

# One run across all n nodes: writes the run's cells "| t2fr | skew | wall | control |
# exact |" to $WORK/run-$n.cells and a detail line to $WORK/run-$n.detail. Called in the
# script's own shell (not in a $(...)), so that the EXIT trap knows the pids it started.
# Never exits the script: a failure is named in the cells and on stderr.
run_round() { # N PIDS...
    run_cells "$@" >"$WORK/run-$1.cells"
}
run_cells() { # N PIDS...
    local n="$1"; shift
    local pids=("$@")
    local out="$WORK/run-$n.json" log="$WORK/run-$n.log" samples="$WORK/sockets-$n"
    local limit=$((PLAN_S + 120))
    if ! http_body POST "127.0.0.1:$TPORT" /_stats/reset >/dev/null; then
        echo "scale.sh: $n nodes: cannot reset stampede-target's counters (127.0.0.1:$TPORT)" >&2
        echo "| target down | - | - | - | - |"; return
    fi
    # Socket bytes once a second from just before the trigger until the CLI returns:
    # a socket that closes mid-run loses at most its last second (load connections are
    # only told apart, mesh links rarely close during a run).
    mkdir -p "$samples"
    (
        i=0
        while [[ $i -lt $((limit + 10)) ]]; do
            socket_lines "${pids[@]}" >"$samples/.$i"
            printf '%s\n' "$(date +%s.%N)" >>"$samples/.$i"
            mv "$samples/.$i" "$samples/$(printf %05d $i)"
            i=$((i + 1))
            sleep 1
        done
    ) &
    SAMPLER_PID=$!
    for _ in $(seq 50); do [[ -e "$samples/00000" ]] && break; sleep 0.1; done
    local l0; l0=$(load1)
    # Each node's CPU over the CLI call (schedstat, exact), to name where a run's CPU goes.
    local -A C0=()
    local p
    for p in "${pids[@]}"; do C0[$p]=$(cpu_ns "$p"); done
    local t0; t0=$(date +%s.%N)
    timeout -k 5 "$limit" "$BIN" run --mesh --quiet --data-dir "$TN/n1" \
        "$ROOT/tools/bench/scale.toml" \
        --set "defaults.base_url=\"http://127.0.0.1:$TPORT\"" \
        --set "scenarios.steady.rate=$RATE" --set "scenarios.steady.duration=\"${PLAN_S}s\"" \
        --out "json=$out" >"$log" 2>&1 </dev/null &
    RUN_PID=$!
    local rc=0
    wait "$RUN_PID" || rc=$?
    RUN_PID=""
    local t1; t1=$(date +%s.%N)
    # "mean % | max % (node) | sum %" of a core over the call; nodes named nI by start order.
    local cpu_run
    cpu_run=$(i=0; for p in "${pids[@]}"; do i=$((i + 1)); echo "n$i $(( $(cpu_ns "$p") - ${C0[$p]:-0} ))"; done \
        | awk -v a="$t0" -v b="$(date +%s.%N)" '{ c = 100 * $2 / 1e9 / (b - a); s += c; if (c > m) { m = c; mn = $1 } ; all = all sprintf(" %s %.1f", $1, c) }
            END { printf "%.1f %% per node, max %.1f %% (%s), sum %.0f %% of a core; by node:%s", s / NR, m, mn, s, all }')
    # One more sample after the CLI returned, then stop the sampler.
    sleep 1.2
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
    local l1; l1=$(load1)
    local stats; stats=$(http_body GET "127.0.0.1:$TPORT" /_stats) || stats=""
    local target_n; target_n=$(printf '%s' "$stats" | jq -r '.load_requests // empty' 2>/dev/null || true)
    local first; first=$(printf '%s' "$stats" | jq -r '(.first_load_unix_us // empty) / 1e6' 2>/dev/null || true)
    # Per node: bytes of its sockets to the target's port (the load) and of all others
    # (control), each the last reading minus the first (0 for a socket opened meanwhile).
    local traffic
    traffic=$(for f in "$samples"/[0-9]*; do echo "== $(tail -n1 "$f")"; sed '$d' "$f"; done | awk -v tport=":$TPORT" -v n="$n" '
        /^== / { t = $2; if (t0 == "") t0 = t; t1 = t; first = (t == t0); next }
        {
            k = $1 " " $2 " " $3; b = $4 + $5
            if (!(k in last)) { base[k] = first ? b : 0; pid[k] = $1; load[k] = (substr($3, length($3) - length(tport) + 1) == tport) }
            last[k] = b
        }
        END {
            for (k in last) { d = last[k] - base[k]; if (load[k]) L[pid[k]] += d; else C[pid[k]] += d }
            w = t1 - t0; if (w <= 0) w = 1
            for (p in C) { s += C[p]; if (C[p] > m) m = C[p] }
            for (p in L) ls += L[p]
            printf "%.1f %.1f %.1f %.1f\n", s / n / w / 1024, m / w / 1024, ls / n / w / 1024, w
        }')
    local ctl_mean ctl_max load_mean sample_w
    read -r ctl_mean ctl_max load_mean sample_w <<<"${traffic:-- - - -}"
    local wall; wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
    if [[ "$rc" != 0 || ! -s "$out" ]]; then
        local why="exit $rc"; [[ "$rc" == 124 || "$rc" == 137 ]] && why="no summary within ${limit} s"
        echo "scale.sh: $n nodes: the run (stampede run --mesh via n1) failed: $why; its output:" >&2
        tail -n 20 "$log" >&2
        if [[ ! -s "$out" ]]; then
            echo "run at $n nodes: FAILED ($why); target counted ${target_n:-?}; wall ${wall} s; load ${l0} -> ${l1}" >"$WORK/run-$n.detail"
            echo "| failed ($why) | - | ${wall} s for ${PLAN_S} s | ${ctl_mean} KiB/s (max ${ctl_max}) | - vs ${target_n:-?} |"
            return
        fi
    fi
    if ! jq -e '.totals.requests and .nodes' "$out" >/dev/null 2>&1; then
        echo "scale.sh: $n nodes: the run's summary ($out) is not the JSON expected (totals, nodes)" >&2
        echo "run at $n nodes: summary unreadable; target counted ${target_n:-?}" >"$WORK/run-$n.detail"
        echo "| summary unreadable | - | ${wall} s for ${PLAN_S} s | ${ctl_mean} KiB/s (max ${ctl_max}) | - vs ${target_n:-?} |"
        return
    fi
    local t2fr="-"
    [[ -n "$first" ]] && t2fr=$(awk -v a="$t0" -v b="$first" 'BEGIN {printf "%.2f s", b - a}')
    local skew; skew=$(jq -r '.start_skew_us / 1000 | . * 100 | round / 100 | tostring + " ms"' "$out")
    local true_skew; true_skew=$(jq -r '[.nodes[] | select(.start_late_us != null) | .start_late_us - .clock_offset_us] | if length > 1 then ((max - min) / 1000 | . * 100 | round / 100 | tostring) + " ms" else "n/a" end' "$out")
    local merged; merged=$(jq -r .totals.requests "$out")
    local joined; joined=$(jq -r '[.nodes[] | select(.status == "completed")] | length' "$out")
    local statuses; statuses=$(jq -r '[.nodes[].status] | group_by(.) | map("\(length) \(.[0])") | join(", ")' "$out")
    local events; events=$(jq -r '[.events[].kind] | group_by(.) | map("\(.[0]) x\(length)") | join(", ")' "$out")
    local exact="**$merged vs ${target_n:-?}**"
    [[ "$merged" == "$target_n" ]] && exact="$merged = $target_n"
    exact="$exact of $((RATE * PLAN_S))"
    [[ "$joined" != "$n" ]] && exact="$exact (**$joined of $n completed**: $statuses)"
    echo "run at $n nodes: exit $rc; nodes $statuses; events: ${events:-none}; true start skew (one clock) $true_skew; load (the target's port) ${load_mean} KiB/s per node; sockets sampled over ${sample_w} s; failed $(jq -r .totals.failed "$out"), dropped $(jq -r .totals.dropped_iterations "$out"); load avg ${l0} -> ${l1}; CPU over the call ${cpu_run}" >"$WORK/run-$n.detail"
    echo "| $t2fr | $skew | ${wall} s for ${PLAN_S} s | ${ctl_mean} KiB/s (max ${ctl_max}) | $exact |"
}

ROWS=()
DETAILS=()
for n in "${NS[@]}"; do
    echo "== $n nodes (testnet/local.sh, $(basename "$BIN")), load average $(load1)" >&2
    TN="$WORK/testnet-$n"
    rm -rf "$TN"
    # One worker thread per node (as the mesh figures of run.sh): n nodes share two cores.
    STAMPEDE_CAPACITY=1 STAMPEDE_BIN="$BIN" STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" "$n" >"$WORK/start-$n.log" 2>&1 \
        || { echo "scale.sh: testnet of $n did not start (testnet/local.sh $n):" >&2; cat "$WORK/start-$n.log" >&2; exit 1; }
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
    declare -A T0=() N0=()
    for p in "${PIDS[@]}"; do T0[$p]=$(cpu_ticks "$p"); N0[$p]=$(cpu_ns "$p"); done
    il0=$(load1)
    sleep "$WINDOW"
    b1=$(socket_bytes "${PIDS[@]}" | awk '{s += $2} END {printf "%.0f\n", s}')
    links=$(socket_bytes "${PIDS[@]}" | awk '{s += $3; if ($3 > m) m = $3} END {printf "%.1f (max %d)", s / NR, m}')
    lo1=$(lo_bytes)
    cpu_sum=0; cpu_max=0; rss_sum=0; ns_sum=0; ns_max=0
    for p in "${PIDS[@]}"; do
        d=$(( $(cpu_ticks "$p") - ${T0[$p]} ))
        cpu_sum=$((cpu_sum + d)); [[ "$d" -gt "$cpu_max" ]] && cpu_max=$d
        d=$(( $(cpu_ns "$p") - ${N0[$p]} ))
        ns_sum=$((ns_sum + d)); [[ "$d" -gt "$ns_max" ]] && ns_max=$d
        rss_sum=$((rss_sum + $(rss_kb "$p")))
    done
    unset T0 N0
    il1=$(load1)
    # Each byte is counted at both ends (sent by one node, received by another): per
    # node, half the sum is what it sent, the other half what it received.
    row=$(awk -v n="$n" -v w="$WINDOW" -v b="$((b1 - b0))" -v lo="$((lo1 - lo0))" -v c="$cpu_sum" -v cm="$cpu_max" \
        -v t="$TCK" -v r="$rss_sum" -v full="$full" -v links="$links" -v ns="$ns_sum" -v nm="$ns_max" 'BEGIN {
        printf "| %d | %.2f KB/s | %.1f KB/s | %.2f %% (max %.2f %%) | %.2f %% (max %.2f %%) | %.0f MB | %s | %s ",
            n, b / 2 / n / w / 1000, lo / n / w / 1000, 100 * ns / 1e9 / w / n, 100 * nm / 1e9 / w,
            100 * c / t / w / n, 100 * cm / t / w, r / n / 1024, links, full }')
    DETAILS+=("idle at $n nodes: load avg ${il0} -> ${il1} over the window")
    if [[ "$RUN" == 1 ]]; then
        run_round "$n" "${PIDS[@]}"
        row="$row$(cat "$WORK/run-$n.cells")"
        [[ -s "$WORK/run-$n.detail" ]] && DETAILS+=("$(cat "$WORK/run-$n.detail")")
    else
        row="$row| - | - | - | - | - |"
    fi
    echo "$row" >&2
    ROWS+=("$row")
    STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
done

echo
echo "idle nodes over ${WINDOW} s (after full view + 12 s); bytes: TCP payload each node sent (= received), from ss; lo: the loopback interface's bytes per node (shared machine: includes others' traffic)"
[[ "$RUN" == 1 ]] && echo "run: one ${PLAN_S} s constant-arrival-rate plan at ${RATE} it/s (tools/bench/scale.toml) across every node, triggered through n1 (stampede run --mesh), against stampede-target on 127.0.0.1:$TPORT; trigger-to-first-request: CLI call to the first request the target stamped; start skew: the summary's start_skew_us; wall: the CLI call's; control traffic: TCP payload in + out of each node's sockets except those to the target's port, per node over the run (mean, max node), from ss once a second; merged vs target: the summary's requests vs stampede-target's load_requests, of the plan's rate x duration; nodes that did not complete the run are named by status"
echo "idle CPU: run time of every thread (/proc/PID/task/*/schedstat, exact); ticks: utime + stime of /proc/PID/stat (sampled at the 100 Hz scheduler tick)"
echo "| nodes | idle bytes/s per node | lo bytes/s per node | idle CPU per node | idle CPU per node (ticks) | RSS per node | links per node | full view after last start | trigger-to-first-request | start skew | wall for a ${PLAN_S} s plan | run: control traffic per node | run: merged vs target |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
printf '%s\n' "${DETAILS[@]}"

# --- the simulator's figures at --sim-nodes -------------------------------------------
if [[ "$SIM_NODES" != 0 ]]; then
    if [[ ! -x "$SIM_BIN" ]]; then
        echo "scale.sh: $SIM_BIN is missing (cargo build --release -p stampede-tools --bin stampede-sim); no simulated figures" >&2
    else
        echo
        echo "simulated, $SIM_NODES nodes (stampede-sim --membership --nodes $SIM_NODES: 50 ms links, 1 % segment loss, a kill; stampede-sim --nodes $SIM_NODES --seeds 1 --faults none --traffic --counted-vus 0 --duration 10; stampede-sim --nodes $SIM_NODES --failover: 50 ms links, a member and an aggregator crashed):"
        # Exit 1 is a goal missed (the figures say which), 2 an error, 124 the time limit.
        rc=0
        timeout 1800 "$SIM_BIN" --membership --nodes "$SIM_NODES" >"$WORK/sim-membership.out" 2>&1 || rc=$?
        cat "$WORK/sim-membership.out"
        [[ "$rc" == 0 || "$rc" == 1 ]] || echo "scale.sh: stampede-sim --membership --nodes $SIM_NODES failed (exit $rc; 124: over 30 min)" >&2
        rc=0
        timeout 900 "$SIM_BIN" --nodes "$SIM_NODES" --seeds 1 --faults none --traffic --counted-vus 0 --duration 10 >"$WORK/sim-traffic.out" 2>&1 || rc=$?
        grep '^traffic' "$WORK/sim-traffic.out" || true
        [[ "$rc" == 0 || "$rc" == 1 ]] || { echo "scale.sh: stampede-sim --traffic --nodes $SIM_NODES failed (exit $rc; 124: over 15 min):" >&2; tail -n 5 "$WORK/sim-traffic.out" >&2; }
        # Failover with 50 ms links: a member and a group's aggregator crashed (needs more
        # than one group: at least 33 nodes at the default fan-in).
        if [[ "$SIM_NODES" -gt 32 ]]; then
            rc=0
            timeout 900 "$SIM_BIN" --nodes "$SIM_NODES" --failover >"$WORK/sim-failover.out" 2>&1 || rc=$?
            grep '^failover\|^VIOLATION' "$WORK/sim-failover.out" || true
            [[ "$rc" == 0 || "$rc" == 1 ]] || { echo "scale.sh: stampede-sim --failover --nodes $SIM_NODES failed (exit $rc):" >&2; tail -n 5 "$WORK/sim-failover.out" >&2; }
        fi
    fi
fi
