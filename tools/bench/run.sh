#!/usr/bin/env bash
# Benchmark harness: stampede against wrk on this machine, plus the generator's own
# figures (memory per idle VU, arrival-rate accuracy, schedule lag, RSS over a long run).
# Run by hand, never by CI: it installs packages, builds in release and loads both cores.
#
#   tools/bench/run.sh [--rounds 3] [--duration 10s] [--idle-vus 10000]
#                      [--short 5s] [--long 50s] [--skip-build] [--keep DIR]
#                      [--only throughput,idle,arrival,rss,mesh,soak,h2,grpc,ws,scale] [--max N] [--rate N]
#                      [--lag-runs 3]
#
# `--only h2`: HTTP/2 over TLS against h2load (nghttp2-client), 50 connections x 1
# stream (50 VUs) and 50 connections x 10 streams (500 VUs sharing connections,
# `http2_streams_per_connection = 10`, vs `h2load -m10`), alternating round by round.
# Not in the default set.
#
# `--only scale`: 10, 30 and 50 nodes (tools/bench/scale.sh): full-view time, idle
# bytes/s, CPU and RSS per node, links per node; then one 10 s run at 200 it/s across
# all of them (trigger-to-first-request, start skew, wall time, run control traffic per
# node, merged vs target); then stampede-sim's 1,000-node figures. Not in the default set.
#
# `--only ws [--short 5s]`: WebSocket echo round trips per CPU-second of stampede (one
# worker on CPU 0) against stampede-target's /ws/orders (one thread on CPU 1), 50
# sockets, --rounds rounds of --short each.
#
# `--only soak [--duration 30m]`: a 3-node loopback mesh at 300 it/s for the duration
# (30 min unless --duration is given), VmRSS and RssAnon of every node every 5 s;
# prints each node's slopes after warm-up (VmRSS and RssAnon), the rate's stability and
# exactness. Not in the
# default set: it takes half an hour.
#
# `--only grpc`: gRPC unary calls (shop.Inventory/GetStock over h2c) per CPU-second of
# the generator against stampede-target (1 thread, CPU 1), stampede on CPU 0.
#
# Layout: nginx (1 worker) pinned to CPU 1, the load generator (wrk or stampede) pinned
# to CPU 0; wrk and stampede alternate round by round so that drift in the machine's
# load hits both alike. Everything (config, logs, results) lives in a temp dir that is
# removed on exit unless --keep is given. See docs/benchmarks.md.
set -euo pipefail

ROUNDS=3
DURATION=10s
IDLE_VUS=10000
SHORT=5s
LONG=50s
BUILD=1
KEEP=""
CONNS=50
ONLY="throughput,idle,arrival,rss,mesh"
RATE=""
RATE_GIVEN=""
MAX_REF=""
LAG_RUNS=3
DURATION_GIVEN=""

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; DURATION_GIVEN=1; shift 2 ;;
        --idle-vus) IDLE_VUS="$2"; shift 2 ;;
        --short) SHORT="$2"; shift 2 ;;
        --long) LONG="$2"; shift 2 ;;
        --skip-build) BUILD=0; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        --rate) RATE="$2"; RATE_GIVEN=1; shift 2 ;;
        --max) MAX_REF="$2"; shift 2 ;;
        --lag-runs) LAG_RUNS="$2"; shift 2 ;;
        --keep) KEEP="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

# Durations are whole seconds here ("10s" or "10"; "30m" and "2h" for the soak): wrk
# and the plans both take them.
secs() {
    local v="$1" mult=1
    case "$v" in
        *m) v="${v%m}"; mult=60 ;;
        *h) v="${v%h}"; mult=3600 ;;
        *) v="${v%s}" ;;
    esac
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "run.sh: '$1' is not a whole number of seconds, minutes or hours" >&2; exit 2; }
    echo $((v * mult))
}
DUR_S=$(secs "$DURATION")
SHORT_S=$(secs "$SHORT")
LONG_S=$(secs "$LONG")
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rounds must be a positive integer" >&2; exit 2; }
[[ -z "$RATE" || "$RATE" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rate must be a positive integer" >&2; exit 2; }
[[ -z "$MAX_REF" || "$MAX_REF" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --max must be a positive integer" >&2; exit 2; }
[[ "$LAG_RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --lag-runs must be a positive integer" >&2; exit 2; }
want() { [[ ",$ONLY," == *",$1,"* ]]; }
[[ "$IDLE_VUS" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --idle-vus must be a positive integer" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH="$ROOT/tools/bench"
# STAMPEDE_BIN=/path/to/stampede runs another build (e.g. an older commit's, for a
# before/after in one sitting); use with --skip-build.
STAMPEDE="${STAMPEDE_BIN:-$ROOT/target/release/stampede}"

log() { printf '\n== %s\n' "$*"; }

# --- what the harness needs ------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx-light)
[[ -x /usr/bin/time ]] || need_pkgs+=(time)
command -v openssl >/dev/null || need_pkgs+=(openssl)
want h2 && ! command -v h2load >/dev/null && need_pkgs+=(nghttp2-client)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    log "installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NCPU=$(nproc)
if [[ "$NCPU" -lt 2 ]]; then
    echo "run.sh: needs at least 2 CPUs (generator on CPU 0, nginx on CPU 1)" >&2
    exit 2
fi

if [[ "$BUILD" == 1 ]]; then
    log "building stampede (release)"
    (cd "$ROOT" && nice -n 10 cargo build --release -p stampede -p stampede-tools)
fi
[[ -x "$STAMPEDE" ]] || { echo "run.sh: $STAMPEDE is missing (drop --skip-build)" >&2; exit 2; }

# 10k idle VUs each hold a connection: the generator and nginx need the descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- the target ------------------------------------------------------------------
WORK=$(mktemp -d /tmp/stampede-bench.XXXXXX)
NGINX_PID=""
MESH_TARGET_PID=""
GRPC_TARGET_PID=""
cleanup() {
    if [[ -d "$WORK/testnet" ]]; then
        STAMPEDE_TESTNET_DIR="$WORK/testnet" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
    fi
    if [[ -n "$GRPC_TARGET_PID" ]]; then
        kill "$GRPC_TARGET_PID" 2>/dev/null || true
        wait "$GRPC_TARGET_PID" 2>/dev/null || true
    fi
    if [[ -n "$MESH_TARGET_PID" ]]; then
        kill "$MESH_TARGET_PID" 2>/dev/null || true
        wait "$MESH_TARGET_PID" 2>/dev/null || true
    fi
    if [[ -n "$NGINX_PID" ]] && kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -QUIT "$NGINX_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
    fi
    if [[ -n "$KEEP" ]]; then
        mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/ && echo "results kept in $KEEP"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 20000))
        if ! ss -Htln "sport = :$p" | grep -q .; then echo "$p"; return; fi
    done
    echo "run.sh: no free port found" >&2
    exit 1
}
PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
TLSPORT=$(free_port)
[[ "$TLSPORT" != "$PORT" ]] || TLSPORT=$(free_port)
TLSURL="https://127.0.0.1:$TLSPORT"
mkdir -p "$WORK"/{client_body,proxy,fastcgi,uwsgi,scgi}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1
sed -e "s#@DIR@#$WORK#g" -e "s#@PORT@#$PORT#g" -e "s#@TLSPORT@#$TLSPORT#g" \
    "$BENCH/nginx.conf.in" >"$WORK/nginx.conf"
taskset -c 1 "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/error.log" &
NGINX_PID=$!
up=0
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
    sleep 0.1
done
[[ "$up" == 1 ]] || { echo "run.sh: nginx did not come up; see its log:" >&2; cat "$WORK/error.log" >&2; exit 1; }

# --- helpers -----------------------------------------------------------------------
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
# CPU ticks nginx's worker has used so far: tells whether the target, not the generator,
# was the bottleneck of a round (a worker near 100% of CPU 1 is).
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1)
TCK=$(getconf CLK_TCK)
nginx_ticks() { awk '{print $14 + $15}' "/proc/$NGINX_WORKER/stat"; }
nginx_pct() { # TICKS_BEFORE SECONDS
    awk -v a="$1" -v b="$(nginx_ticks)" -v t="$TCK" -v s="$2" 'BEGIN { printf "%.0f%%", 100 * (b - a) / t / s }'
}
# user + system CPU seconds of the process /usr/bin/time ran.
cpu_s() { awk -F': ' '/User time|System time/ {t += $2} END {print t + 0}' "$1"; }
maxrss_kb() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# stampede run PLAN OUT.json TIME.txt [--set ...]: pinned to CPU 0, one worker, peak RSS
# from /usr/bin/time. A nonzero exit (e.g. a saturated generator failing nothing) is
# tolerated as long as the JSON summary was written.
run_stampede() {
    local plan="$1" json="$2" timef="$3"
    shift 3
    taskset -c 0 /usr/bin/time -v -o "$timef" "$STAMPEDE" run "$plan" --workers 1 --quiet \
        --out "json=$json" --set "defaults.base_url=\"$URL\"" "$@" \
        >"$json.log" 2>&1 || true
    if [[ ! -s "$json" ]]; then
        echo "run.sh: stampede wrote no summary; its output:" >&2
        cat "$json.log" >&2
        exit 1
    fi
}

WRK_VERSION=$(wrk -v 2>&1 | head -1 || true)
# oha joins the throughput rounds when it is installed (`cargo install oha`; it has no
# Debian package); OHA=/path/to/oha picks one off the PATH.
OHA="${OHA:-$(command -v oha || true)}"
OHA_VERSION=""
[[ -n "$OHA" ]] && OHA_VERSION=$("$OHA" --version 2>&1 | head -1 || true)
NGINX_VERSION=$("$NGINX" -v 2>&1 | head -1)
CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
STAMPEDE_VERSION=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
log "machine"
echo "date:      $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "cpus:      $NCPU x $CPU_MODEL"
echo "load avg:  $(cut -d' ' -f1-3 /proc/loadavg) (other work on the box skews every figure)"
echo "kernel:    $(uname -r)"
echo "wrk:       $WRK_VERSION"
echo "oha:       ${OHA_VERSION:-not installed (cargo install oha adds it to the throughput rounds)}"
echo "nginx:     $NGINX_VERSION (1 worker, CPU 1, $URL)"
echo "stampede:  $STAMPEDE_VERSION (release, --workers 1, CPU 0)"

# --- 1. throughput, alternating ----------------------------------------------------
MED_ST=""
if want throughput; then
log "throughput: wrk -t1 -c$CONNS vs stampede constant-vus $CONNS, ${DUR_S}s each, $ROUNDS rounds"
printf '%-6s %10s %10s %6s %9s %11s %13s %13s %6s %9s %9s\n' round "wrk rps" "st. rps" ratio \
    "wrk p99" "st. p99" "wrk req/cpu-s" "st. req/cpu-s" ratio "nginx(wrk)" "nginx(st)"
: >"$WORK/ratios" ; : >"$WORK/st_rps" ; : >"$WORK/wrk_rps" ; : >"$WORK/eff_ratios"
: >"$WORK/oha_ratios" ; : >"$WORK/oha_eff_ratios"
for r in $(seq "$ROUNDS"); do
    t0=$(nginx_ticks)
    taskset -c 0 /usr/bin/time -v -o "$WORK/wrk-$r.time" \
        wrk -t1 -c"$CONNS" -d"${DUR_S}s" --latency "$URL/" >"$WORK/wrk-$r.txt" 2>&1
    wrk_rps=$(awk '/^Requests\/sec:/ {print $2}' "$WORK/wrk-$r.txt")
    wrk_req=$(awk '/requests in/ {print $1}' "$WORK/wrk-$r.txt")
    wrk_ng=$(nginx_pct "$t0" "$DUR_S")
    t0=$(nginx_ticks)
    wrk_p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk-$r.txt")
    [[ -n "$wrk_rps" ]] || { echo "run.sh: cannot read wrk's output:" >&2; cat "$WORK/wrk-$r.txt" >&2; exit 1; }
    run_stampede "$BENCH/throughput.toml" "$WORK/st-$r.json" "$WORK/st-$r.time" \
        --set "scenarios.hammer.vus=$CONNS" --set "scenarios.hammer.duration=\"${DUR_S}s\""
    st_ng=$(nginx_pct "$t0" "$(jq -r .duration_s "$WORK/st-$r.json")")
    st_rps=$(jq -r '.totals.rps' "$WORK/st-$r.json")
    st_p99=$(jq -r '.totals.latency_us.p99' "$WORK/st-$r.json")
    st_failed=$(jq -r '.totals.failed' "$WORK/st-$r.json")
    st_req=$(jq -r '.totals.requests' "$WORK/st-$r.json")
    rat=$(ratio "$st_rps" "$wrk_rps")
    # Requests per CPU-second of the generator: less sensitive than rps to other work
    # that steals CPU 0 from the generator (taskset pins us, it does not keep others off).
    wrk_eff=$(awk -v n="$wrk_req" -v c="$(cpu_s "$WORK/wrk-$r.time")" 'BEGIN { printf "%.0f", (c > 0 ? n / c : 0) }')
    st_eff=$(awk -v n="$st_req" -v c="$(cpu_s "$WORK/st-$r.time")" 'BEGIN { printf "%.0f", (c > 0 ? n / c : 0) }')
    eff_rat=$(ratio "$st_eff" "$wrk_eff")
    echo "$rat" >>"$WORK/ratios"; echo "$st_rps" >>"$WORK/st_rps"; echo "$wrk_rps" >>"$WORK/wrk_rps"
    echo "$eff_rat" >>"$WORK/eff_ratios"
    printf '%-6s %10.0f %10.0f %6s %9s %9sus %13s %13s %6s %9s %9s' "$r" "$wrk_rps" "$st_rps" \
        "$rat" "$wrk_p99" "$st_p99" "$wrk_eff" "$st_eff" "$eff_rat" "$wrk_ng" "$st_ng"
    [[ "$st_failed" == 0 ]] && echo || echo "  ($st_failed failed requests)"
    if [[ -n "$OHA" ]]; then
        taskset -c 0 /usr/bin/time -v -o "$WORK/oha-$r.time" \
            "$OHA" -z "${DUR_S}s" -c "$CONNS" --no-tui --output-format json "$URL/" \
            >"$WORK/oha-$r.json" 2>"$WORK/oha-$r.err" || true
        oha_rps=$(jq -r '.summary.requestsPerSec // empty' "$WORK/oha-$r.json" 2>/dev/null || true)
        if [[ -n "$oha_rps" ]]; then
            oha_req=$(jq -r '[.statusCodeDistribution[]] | add // 0' "$WORK/oha-$r.json")
            oha_eff=$(awk -v n="$oha_req" -v c="$(cpu_s "$WORK/oha-$r.time")" 'BEGIN { printf "%.0f", (c > 0 ? n / c : 0) }')
            echo "$(ratio "$st_rps" "$oha_rps")" >>"$WORK/oha_ratios"
            echo "$(ratio "$st_eff" "$oha_eff")" >>"$WORK/oha_eff_ratios"
            printf '  oha   %10.0f rps, %13s req/cpu-s; stampede/oha %s, per CPU-second %s\n' \
                "$oha_rps" "$oha_eff" "$(ratio "$st_rps" "$oha_rps")" "$(ratio "$st_eff" "$oha_eff")"
        else
            echo "  oha: no result (see $WORK/oha-$r.err)"
        fi
    fi
done
MED_RATIO=$(median <"$WORK/ratios")
MED_ST=$(median <"$WORK/st_rps")
MED_WRK=$(median <"$WORK/wrk_rps")
MED_EFF=$(median <"$WORK/eff_ratios")
printf 'median: wrk %.0f rps, stampede %.0f rps, median ratio stampede/wrk = %s\n' \
    "$MED_WRK" "$MED_ST" "$MED_RATIO"
printf 'median ratio of requests per CPU-second of the generator, stampede/wrk = %s\n' "$MED_EFF"
if [[ -s "$WORK/oha_ratios" ]]; then
    printf 'median ratio stampede/oha = %s, per CPU-second = %s\n' \
        "$(median <"$WORK/oha_ratios")" "$(median <"$WORK/oha_eff_ratios")"
fi
fi

# --- 1b. HTTP/2 over TLS against h2load, alternating --------------------------------
if want h2; then
H2LOAD_VERSION=$(h2load --version 2>&1 | head -1)
log "HTTP/2 over TLS ($TLSURL): $H2LOAD_VERSION -t1 vs stampede --workers 1, ${DUR_S}s each, $ROUNDS rounds"
printf '%-6s %-8s %10s %10s %6s %14s %14s %6s %9s %9s\n' round shape "h2load rps" "st. rps" ratio \
    "h2load req/cpu" "st. req/cpu" ratio "nginx(h)" "nginx(st)"
for shape in 1 10; do
    : >"$WORK/h2_ratios_$shape"; : >"$WORK/h2_eff_$shape"
    vus=$((CONNS * shape))
    for r in $(seq "$ROUNDS"); do
        t0=$(nginx_ticks)
        taskset -c 0 /usr/bin/time -v -o "$WORK/h2load-$shape-$r.time" \
            h2load -t1 -c"$CONNS" -m"$shape" -D"$DUR_S" "$TLSURL/" >"$WORK/h2load-$shape-$r.txt" 2>&1 || true
        h_ng=$(nginx_pct "$t0" "$DUR_S")
        h_rps=$(awk '/^finished in/ {print $4}' "$WORK/h2load-$shape-$r.txt")
        h_req=$(awk '/^requests:/ {print $8}' "$WORK/h2load-$shape-$r.txt")
        [[ -n "$h_rps" ]] || { echo "run.sh: cannot read h2load's output:" >&2; cat "$WORK/h2load-$shape-$r.txt" >&2; exit 1; }
        t0=$(nginx_ticks)
        run_stampede "$BENCH/h2.toml" "$WORK/h2st-$shape-$r.json" "$WORK/h2st-$shape-$r.time" \
            --set "defaults.base_url=\"$TLSURL\"" --set "scenarios.hammer.vus=$vus" \
            --set "defaults.http2_streams_per_connection=$shape" \
            --set "scenarios.hammer.duration=\"${DUR_S}s\""
        j="$WORK/h2st-$shape-$r.json"
        st_ng=$(nginx_pct "$t0" "$(jq -r .duration_s "$j")")
        st_rps=$(jq -r '.totals.rps' "$j")
        st_req=$(jq -r '.totals.requests' "$j")
        st_failed=$(jq -r '.totals.failed' "$j")
        rat=$(ratio "$st_rps" "$h_rps")
        h_eff=$(awk -v n="$h_req" -v c="$(cpu_s "$WORK/h2load-$shape-$r.time")" 'BEGIN { printf "%.0f", (c > 0 ? n / c : 0) }')
        st_eff=$(awk -v n="$st_req" -v c="$(cpu_s "$WORK/h2st-$shape-$r.time")" 'BEGIN { printf "%.0f", (c > 0 ? n / c : 0) }')
        eff_rat=$(ratio "$st_eff" "$h_eff")
        echo "$rat" >>"$WORK/h2_ratios_$shape"; echo "$eff_rat" >>"$WORK/h2_eff_$shape"
        printf '%-6s %-8s %10.0f %10.0f %6s %14s %14s %6s %9s %9s' "$r" "${CONNS}x$shape" "$h_rps" \
            "$st_rps" "$rat" "$h_eff" "$st_eff" "$eff_rat" "$h_ng" "$st_ng"
        [[ "$st_failed" == 0 ]] && echo || echo "  ($st_failed failed requests)"
    done
    printf 'median %sx%s: stampede/h2load = %s, per CPU-second of the generator = %s\n' "$CONNS" "$shape" \
        "$(median <"$WORK/h2_ratios_$shape")" "$(median <"$WORK/h2_eff_$shape")"
done
fi

# --- 2. memory per idle VU ---------------------------------------------------------
if want idle; then
log "memory per idle VU: $IDLE_VUS VUs that send one request then think (5s run), vs 1 VU"
run_stampede "$BENCH/idle-vus.toml" "$WORK/idle-1.json" "$WORK/idle-1.time" \
    --set "scenarios.idle.vus=1"
run_stampede "$BENCH/idle-vus.toml" "$WORK/idle-n.json" "$WORK/idle-n.time" \
    --set "scenarios.idle.vus=$IDLE_VUS"
RSS1=$(maxrss_kb "$WORK/idle-1.time")
RSSN=$(maxrss_kb "$WORK/idle-n.time")
IDLE_REQ=$(jq -r '.totals.requests' "$WORK/idle-n.json")
IDLE_FAILED=$(jq -r '.totals.failed' "$WORK/idle-n.json")
PER_VU=$(awk -v a="$RSSN" -v b="$RSS1" -v n="$IDLE_VUS" 'BEGIN { printf "%.0f", (a - b) * 1024 / (n > 1 ? n - 1 : 1) }')
echo "peak RSS, 1 VU:        $RSS1 KiB"
echo "peak RSS, $IDLE_VUS VUs:  $RSSN KiB  ($IDLE_REQ requests, $IDLE_FAILED failed)"
echo "per idle VU:           $PER_VU bytes (each holding one open keep-alive connection)"
fi

# --- 3. arrival-rate accuracy and schedule lag ------------------------------------
# The reference maximum: stampede's median closed-loop throughput, or --max N.
MAX_REF="${MAX_REF:-}"
if [[ -z "$MAX_REF" && -n "$MED_ST" ]]; then
    MAX_REF=$(awk -v m="$MED_ST" 'BEGIN { printf "%d", m }')
fi
if [[ -z "$RATE" && -n "$MAX_REF" ]]; then
    RATE=$(awk -v m="$MAX_REF" 'BEGIN { printf "%d", m * 0.8 }')
fi
if [[ -z "$RATE" ]] && { want arrival || want rss; }; then
    echo "run.sh: the arrival and rss parts need --max N or --rate N when throughput is not run" >&2
    exit 2
fi
# Enough VUs for the rate at 25 ms per iteration (10x the p50 seen here), so that drops
# mean a late generator rather than a small pool.
max_vus_for() { awk -v r="$1" 'BEGIN { v = int(r / 40); print (v < 100 ? 100 : v) }'; }
MAXVUS=$(max_vus_for "$RATE")
# CPU 0's time stolen by the hypervisor (the `steal` column of /proc/stat), in ticks: a
# VM whose vCPU is descheduled for milliseconds shows it as schedule lag no program
# can avoid, so the arrival figures print it beside the lag.
steal_ticks() { awk '$1 == "cpu0" {print $9}' /proc/stat; }
arrival() { # DURATION_S NAME
    local s0
    s0=$(steal_ticks)
    arrival_run "$@"
    echo $(( $(steal_ticks) - s0 )) >"$WORK/$2.steal"
}
arrival_run() { # DURATION_S NAME
    run_stampede "$BENCH/arrival.toml" "$WORK/$2.json" "$WORK/$2.time" \
        --set "scenarios.arrivals.rate=$RATE" --set "scenarios.arrivals.max_vus=$MAXVUS" \
        --set "scenarios.arrivals.duration=\"${1}s\""
}
stolen_pct() { # DURATION_S NAME
    awk -v t="$(cat "$WORK/$2.steal")" -v d="$1" -v hz="$TCK" 'BEGIN {printf "%.1f%%", 100 * t / hz / d}'
}
# Per-second lag p99 from the second second on (the first opens every connection).
PER_SECOND='[.timeline[1:][] | select(.requests > 0) | .schedule_lag_p99_us] | sort'
report_arrival() { # DURATION_S NAME
    local j="$WORK/$2.json"
    jq -r --argjson d "$1" --argjson rate "$RATE" --argjson maxvus "$MAXVUS" '
        "target rate:           \($rate)/s for \($d)s, max_vus \($maxvus)",
        "achieved:              \((.totals.iterations / $d) | floor)/s  (\(.totals.iterations) iterations, \((100 * .totals.iterations / ($rate * $d)) * 10 | round / 10)% of target; run took \(.duration_s)s)",
        "dropped iterations:    \(.totals.dropped_iterations)",
        "schedule lag p50/p99:  \(.generator.schedule_lag_us.p50) / \(.generator.schedule_lag_us.p99) us over the whole run",
        "  per second, from 1 s on: p99 median \('"$PER_SECOND"' | .[length / 2 | floor]) us, best \('"$PER_SECOND"' | min) us, worst \('"$PER_SECOND"' | max) us",
        "latency p50/p99:       \(.totals.latency_us.p50) / \(.totals.latency_us.p99) us (from the intended start)",
        "generator cpu:         \(.generator.cpu) (spin for close events counted as idle)  saturated: \(.generator.saturated)"' "$j"
    echo "CPU 0 stolen by the VM host during the run: $(stolen_pct "$1" "$2")"
}
# One line of the rate ladder: rate, achieved, dropped, lag, CPU, saturation, steal.
ladder_row() { # DURATION_S NAME SHARE
    jq -r --argjson d "$1" --argjson rate "$RATE" --arg share "$3" --arg stolen "$(stolen_pct "$1" "$2")" '
        [$share, $rate, "\((1000 * .totals.iterations / ($rate * $d)) | round / 10)%",
         .totals.dropped_iterations, .generator.schedule_lag_us.p50,
         .generator.schedule_lag_us.p99, ('"$PER_SECOND"' | .[length / 2 | floor]),
         ('"$PER_SECOND"' | min), .generator.cpu, .generator.saturated, $stolen]
        | @tsv' "$WORK/$2.json" | awk -F'\t' '{ printf "%-5s %8s %8s %7s %8s %9s %11s %9s %5s %6s %7s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 }'
}
kept_up() { # NAME: achieved within 1 % and the generator did not call itself saturated
    jq -e --argjson rate "$RATE" --argjson d "$DUR_S" \
        '(.totals.iterations >= 0.99 * $rate * $d) and (.generator.saturated | not)' \
        "$WORK/$1.json" >/dev/null
}
if want arrival; then
# What the machine itself takes from a busy thread on the generator's core: lag that no
# generator on this core can avoid (see stampede-noise).
NOISE="$ROOT/target/release/stampede-noise"
if [[ -x "$NOISE" ]]; then
    log "noise on CPU 0 (stampede-noise: a thread spinning on the clock, 3 s)"
    taskset -c 0 "$NOISE" --duration 3s
fi
if [[ -n "$MAX_REF" && -z "$RATE_GIVEN" ]]; then
    log "arrival rate ladder: constant-arrival-rate at 20-100% of the reference maximum $MAX_REF/s (stampede's closed-loop median unless --max), ${DUR_S}s each"
    printf '%-5s %8s %8s %7s %8s %9s %11s %9s %5s %6s %7s\n' share rate achieved dropped "lag p50" "lag p99" "p99/s med" "p99/s min" cpu satur. stolen
    OPEN_MAX=""
    for pct in 20 40 60 80 100; do
        RATE=$(awk -v m="$MAX_REF" -v p="$pct" 'BEGIN { printf "%d", m * p / 100 }')
        MAXVUS=$(max_vus_for "$RATE")
        # Several runs per rung, the median one (by per-second p99) shown: the host's
        # noise comes and goes over minutes and moves single runs by 10x at p99.
        : >"$WORK/ladder-$pct.runs"
        for k in $(seq "$LAG_RUNS"); do
            arrival "$DUR_S" "ladder-$pct-$k"
            printf '%s %s\n' "$(jq -r "$PER_SECOND"' | .[length / 2 | floor] // 0' "$WORK/ladder-$pct-$k.json")" "$k" >>"$WORK/ladder-$pct.runs"
        done
        mid=$(sort -g "$WORK/ladder-$pct.runs" | awk -v n="$LAG_RUNS" 'NR == int((n + 1) / 2) {print $2}')
        for f in json time steal; do cp "$WORK/ladder-$pct-$mid.$f" "$WORK/ladder-$pct.$f"; done
        ladder_row "$DUR_S" "ladder-$pct" "$pct%"
        if kept_up "ladder-$pct"; then OPEN_MAX="$RATE"; fi
    done
    echo "(the median of $LAG_RUNS runs per rung; lag in us; p99/s: per-second p99 from 1 s on, median and best second; cpu: generator CPU, spin counted as idle)"
    if [[ -n "$OPEN_MAX" ]]; then
        echo "open-model maximum: $OPEN_MAX/s (the highest rung achieved within 1 % with the generator not saturated)"
        RATE=$(awk -v m="$OPEN_MAX" 'BEGIN { printf "%d", m * 0.8 }')
        MAXVUS=$(max_vus_for "$RATE")
        log "arrival rate: constant-arrival-rate at $RATE/s (80% of the open-model maximum), ${DUR_S}s, $LAG_RUNS runs"
        # Each run after a 1 s noise probe on the same core: whether a run met the lag
        # target follows the machine's noise of that minute, so both are shown.
        printf '%-4s %9s %11s %9s %8s  %s\n' run "lag p99" "p99/s med" "p99/s max" cpu "noise just before"
        : >"$WORK/arrival-open.runs"
        for k in $(seq "$LAG_RUNS"); do
            noise="(stampede-noise not built)"
            if [[ -x "$NOISE" ]]; then
                noise=$(taskset -c 0 "$NOISE" --duration 1s | sed -E 's/ in gaps >= 20 us//; s/; gaps:.*//')
            fi
            arrival "$DUR_S" "arrival-open-$k"
            jq -r --arg k "$k" --arg noise "$noise" '[$k, .generator.schedule_lag_us.p99,
                ('"$PER_SECOND"' | .[length / 2 | floor]), ('"$PER_SECOND"' | max),
                .generator.cpu, $noise] | @tsv' "$WORK/arrival-open-$k.json" |
                awk -F'\t' '{ printf "%-4s %9s %11s %9s %8s  %s\n", $1, $2, $3, $4, $5, $6 }'
            printf '%s %s\n' "$(jq -r '.generator.schedule_lag_us.p99' "$WORK/arrival-open-$k.json")" "$k" >>"$WORK/arrival-open.runs"
        done
        met=$(awk '$1 < 1000' "$WORK/arrival-open.runs" | wc -l)
        echo "whole-run lag p99 under 1 ms in $met of $LAG_RUNS runs; the median run in full:"
        mid=$(sort -g "$WORK/arrival-open.runs" | awk -v n="$LAG_RUNS" 'NR == int((n + 1) / 2) {print $2}')
        for f in json time steal; do cp "$WORK/arrival-open-$mid.$f" "$WORK/arrival-open.$f"; done
        report_arrival "$DUR_S" arrival-open
    else
        echo "open-model maximum: not found (no rung kept up)"
    fi
    RATE=$(awk -v m="$MAX_REF" 'BEGIN { printf "%d", m * 0.8 }')
    MAXVUS=$(max_vus_for "$RATE")
    echo
    echo "at 80% of the reference maximum ($RATE/s), the median run in full:"
    report_arrival "$DUR_S" ladder-80
else
    log "arrival rate: constant-arrival-rate at $RATE/s, ${DUR_S}s"
    arrival "$DUR_S" arrival
    report_arrival "$DUR_S" arrival
fi
if [[ -x "$NOISE" ]]; then
    log "noise on CPU 0 again, after the arrival runs"
    taskset -c 0 "$NOISE" --duration 3s
fi
fi

# --- 4. RSS over a long run ----------------------------------------------------------
if want rss; then
# At half the rate, where the generator keeps up: a saturated run piles up busy VUs,
# and its RSS then measures the backlog rather than growth over time.
RATE=$((RATE / 2))
MAXVUS=$(max_vus_for "$RATE")
log "RSS flat over time: the arrival plan at $RATE/s for ${SHORT_S}s and for ${LONG_S}s"
arrival "$SHORT_S" rss-short
# The long run's RSS every 5 s, read from CPU 1 (the target's core; the generator's is
# left alone), beside the VUs alive then: RSS that follows the VUs and not the clock
# is flat over time.
: >"$WORK/rss-long.samples"
(
    pid=""
    for _ in $(seq 100); do
        pid=$(pgrep -n -x stampede || true)
        [[ -n "$pid" ]] && break
        sleep 0.1
    done
    t=0
    while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; do
        sleep 5
        t=$((t + 5))
        awk -v t="$t" '/^VmRSS:/ {print t, $2}' "/proc/$pid/status" 2>/dev/null >>"$WORK/rss-long.samples" || true
    done
) &
SAMPLER=$!
taskset -p -c 1 "$SAMPLER" >/dev/null 2>&1 || true
arrival "$LONG_S" rss-long
wait "$SAMPLER" 2>/dev/null || true
for run in short long; do
    j="$WORK/rss-$run.json"
    printf 'peak RSS, %-5s run: %7s KiB  (%s requests, %s dropped, up to %s VUs alive)\n' \
        "$run" "$(maxrss_kb "$WORK/rss-$run.time")" "$(jq -r .totals.requests "$j")" \
        "$(jq -r .totals.dropped_iterations "$j")" "$(jq -r '[.timeline[].vus] | max' "$j")"
done
if [[ -s "$WORK/rss-long.samples" ]]; then
    printf 'long run, every 5 s:  '
    while read -r t kb; do
        vus=$(jq -r --argjson t "$((t - 1))" '[.timeline[] | select(.t <= $t) | .vus] | max // 0' "$WORK/rss-long.json")
        printf '%ss %s KiB (%s VUs)  ' "$t" "$kb" "$vus"
    done <"$WORK/rss-long.samples"
    echo
fi
fi

# --- gRPC unary calls ---------------------------------------------------------------
if want grpc; then
log "gRPC unary: stampede constant-vus $CONNS, shop.Inventory/GetStock on stampede-target (h2c, 1 thread, CPU 1), ${DUR_S}s each, $ROUNDS rounds"
GPORT=$(free_port)
taskset -c 1 "$ROOT/target/release/stampede-target" --listen "127.0.0.1:$GPORT" --threads 1 \
    >"$WORK/grpc-target.log" 2>&1 &
GRPC_TARGET_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$GPORT") 2>/dev/null && break; sleep 0.1; done
# The plan names its .proto relative to itself: both go to the work dir.
cp "$ROOT/examples/proto/inventory.proto" "$BENCH/grpc.toml" "$WORK/"
printf '%-6s %10s %10s %13s %7s\n' round "calls/s" "p99 us" "calls/cpu-s" failed
for r in $(seq "$ROUNDS"); do
    URL="http://127.0.0.1:$GPORT" run_stampede "$WORK/grpc.toml" "$WORK/grpc-$r.json" "$WORK/grpc-$r.time" \
        --set "scenarios.calls.vus=$CONNS" --set "scenarios.calls.duration=\"${DUR_S}s\""
    g_rps=$(jq -r '.totals.rps' "$WORK/grpc-$r.json")
    g_p99=$(jq -r '.totals.latency_us.p99' "$WORK/grpc-$r.json")
    g_req=$(jq -r '.totals.requests' "$WORK/grpc-$r.json")
    g_failed=$(jq -r '.totals.failed' "$WORK/grpc-$r.json")
    g_eff=$(awk -v n="$g_req" -v c="$(cpu_s "$WORK/grpc-$r.time")" 'BEGIN { if (c > 0) printf "%.0f", n / c; else print "n/a" }')
    printf '%-6s %10s %10s %13s %7s\n' "$r" "$g_rps" "$g_p99" "$g_eff" "$g_failed"
done
kill "$GRPC_TARGET_PID" 2>/dev/null || true
wait "$GRPC_TARGET_PID" 2>/dev/null || true
GRPC_TARGET_PID=""
fi

# --- 5. mesh -------------------------------------------------------------------------
# stampede-target's load count, read over a plain socket (no curl needed).
target_count() { # PORT
    local body
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET /_stats HTTP/1.0\r\nHost: x\r\n\r\n' >&3
    body=$(cat <&3 | sed '1,/^\r\{0,1\}$/d')
    exec 3<&-
    printf '%s' "$body"
}
if want mesh; then
log "mesh figures: 3 local nodes of 1 worker (testnet/local.sh, release build), stampede-target, 300 it/s for 12 s, kill -9 of a member at ~4 s"
TN="$WORK/testnet"
# One worker thread per node: three nodes share this machine's cores, and six workers
# all waking for the start instant on two vCPUs would measure the OS scheduler's queue.
STAMPEDE_CAPACITY=1 STAMPEDE_BIN="$STAMPEDE" STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" 3 >"$WORK/testnet.log" 2>&1 \
    || { echo "run.sh: testnet did not start:" >&2; cat "$WORK/testnet.log" >&2; exit 1; }
TPORT=$(free_port)
"$ROOT/target/release/stampede-target" --listen "127.0.0.1:$TPORT" >"$WORK/target.log" 2>&1 &
MESH_TARGET_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$TPORT") 2>/dev/null && break; sleep 0.1; done
t0=$(date +%s.%N)
"$STAMPEDE" run --mesh --quiet --data-dir "$TN/n1" "$BENCH/mesh.toml" \
    --set "defaults.base_url=\"http://127.0.0.1:$TPORT\"" --out "json=$WORK/mesh.json" >"$WORK/mesh.log" 2>&1 &
RUN_PID=$!
# Nothing polls the target while the nodes start: a poll loop (bash, jq) on these two
# cores is the very competition that makes nodes wake late for their start instant.
# stampede-target stamps its first load request, read after the run. The run starts
# ~0.7 s after the call, so the kill lands about 4 s into it.
sleep 4.7
victim=$(sed -n 3p "$TN/pids")
kill -9 "$victim" 2>/dev/null || true
killed=$(date +%s.%N)
wait "$RUN_PID" || true
stats=$(target_count "$TPORT")
first=$(printf '%s' "$stats" | jq -r '(.first_load_unix_us // empty) / 1e6' 2>/dev/null || true)
if [[ -s "$WORK/mesh.json" && -n "$first" ]]; then
    echo "trigger-to-first-request: $(awk -v a="$t0" -v b="$first" 'BEGIN {printf "%.0f ms", (b - a) * 1000}') (CLI call to the first request the target received, stamped by the target)"
    if awk -v f="$first" -v k="$killed" 'BEGIN {exit !(f > k)}'; then
        echo "run.sh: the run started after the kill; the failover figure below is void" >&2
    fi
    echo "start skew across nodes:  $(jq -r .start_skew_us "$WORK/mesh.json") us (max - min of the nodes' engine start stamps, on the leader's clock)"
    # On one machine every node reads the same clock, so a node's start on it is its
    # lateness minus its measured offset: the spread is the true skew, including what
    # the clock-offset estimate got wrong (which cancels out of start_skew_us).
    echo "true start skew:          $(jq -r '[.nodes[] | select(.start_late_us != null) | .start_late_us - .clock_offset_us] | if length > 1 then (max - min | tostring) + " us" else "n/a" end' "$WORK/mesh.json") (one clock; clock offsets measured: $(jq -r '[.nodes[].clock_offset_us // empty] | map(tostring) | join(", ")' "$WORK/mesh.json") us)"
    # The first whole second after the kill from which every second is within 5 % of 300/s.
    # Whole seconds after the kill and before the schedule's end: the run's own start
    # (millisecond precision, from the summary) + 12 s, so that a partial last second
    # is never counted.
    run_end=$(awk -v s="$(date -d "$(jq -r .started_at "$WORK/mesh.json")" +%s.%N)" 'BEGIN {printf "%.3f", s + 12}')
    back=$(printf '%s' "$stats" | jq -r --argjson k "$killed" --argjson e "$run_end" '
        [.per_second[] | select(.[0] > ($k | floor) and .[0] + 1 <= $e)] as $s
        | [range(0; $s | length) | select(all($s[.:][]; .[1] >= 285 and .[1] <= 315))]
        | if length > 0 then $s[.[0]][0] else empty end')
    if [[ -n "$back" ]]; then
        echo "failover recovery:        rate back at 300/s from the second starting $(awk -v k="$killed" -v b="$back" 'BEGIN {printf "%.1f s", b - k}') after the kill (whole seconds at the target)"
    else
        echo "failover recovery:        the rate did not return to 300/s ±5 % before the run ended"
    fi
    echo "totals:                   summary $(jq -r .totals.requests "$WORK/mesh.json") requests, target counted $(printf '%s' "$stats" | jq -r .load_requests); events: $(jq -r '[.events[].kind] | join(", ")' "$WORK/mesh.json")"
else
    echo "run.sh: the mesh run wrote no summary; its output:" >&2
    cat "$WORK/mesh.log" >&2
fi
STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
kill "$MESH_TARGET_PID" 2>/dev/null || true
wait "$MESH_TARGET_PID" 2>/dev/null || true
MESH_TARGET_PID=""
fi

# --- scale: membership of 10, 30, 50 idle nodes (tools/bench/scale.sh) -------------
if want scale; then
    log "membership and one run at scale: 10, 30 and 50 nodes on loopback (testnet/local.sh, release build), then stampede-sim at 1,000"
    "$BENCH/scale.sh" --bin "$STAMPEDE"
fi

# --- 6. soak -------------------------------------------------------------------------
# Memory over a long mesh run: 3 nodes of 1 worker (as for the mesh figures), 300 it/s
# of one request each against stampede-target. Every 5 s the sampler reads each node's
# VmRSS and RssAnon, every 30 s the target's per-second counts (it keeps the last 120
# s), so that nothing is lost between samples. A node's memory swings by about a
# megabyte within seconds (a second's snapshots decoded, merged, encoded; the heap
# trimmed every 10 s), so one sample every 30 s fixed a 17-minute slope only to about
# ±20 KiB/min; 200 samples fix it several times better. (A slope over each minute's
# lowest sample was tried: with 17 points it was noisier, not steadier.) VmRSS also counts the pages of the
# binary's code that the node has run so far (RssFile, ~15 MB of the ~21 MB): a code
# path first taken late in the run — a late snapshot, a stall's catch-up — adds its
# pages once, bounded by the binary and given back under memory pressure; RssAnon is
# the memory the node allocated, what would grow with the run's length. Slope: least squares over the samples after the
# warm-up, and for comparison with the earlier soaks after 5 minutes. The warm-up is
# 13 minutes (the first third of a run shorter than 30 minutes): a node's memory is bounded by design,
# and the bounded parts fill first — the timelines keep every second for 700 s
# (reports/aggregate.rs TIERS), the live view 600 s (reports/live.rs KEEP_SECONDS) —
# and the machine's first stalls fill the VU pool and the histograms' range. After
# that only the coarse tiers add a point per 10 s or per minute per timeline.
if want soak; then
SOAK_S=$DUR_S
[[ -n "$DURATION_GIVEN" ]] || SOAK_S=1800
SOAK_RATE=300
WARM_S=$(( SOAK_S >= 1800 ? 780 : SOAK_S / 3 ))
EARLY_WARM_S=$(( SOAK_S / 6 < 300 ? SOAK_S / 6 : 300 ))
log "soak: 3 local nodes of 1 worker, stampede-target, $SOAK_RATE it/s of one request for ${SOAK_S}s; RSS of every node every 5 s (warm-up ${WARM_S}s)"
echo "load avg before: $(cut -d' ' -f1-3 /proc/loadavg)"
TN="$WORK/testnet"
STAMPEDE_CAPACITY=1 STAMPEDE_BIN="$STAMPEDE" STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" 3 >"$WORK/testnet-soak.log" 2>&1 \
    || { echo "run.sh: testnet did not start:" >&2; cat "$WORK/testnet-soak.log" >&2; exit 1; }
TPORT=$(free_port)
"$ROOT/target/release/stampede-target" --listen "127.0.0.1:$TPORT" >"$WORK/target-soak.log" 2>&1 &
MESH_TARGET_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$TPORT") 2>/dev/null && break; sleep 0.1; done
mapfile -t SOAK_PIDS <"$TN/pids"
# A run proposed before the nodes have found each other would be a run of node 1 alone.
for _ in $(seq 60); do "$STAMPEDE" peers --data-dir "$TN/n1" 2>/dev/null | grep -q '3 alive' && break; sleep 1; done
: >"$WORK/soak-rss.samples"
: >"$WORK/soak-anon.samples"
: >"$WORK/soak-target.seconds"
: >"$WORK/soak-load.samples"
"$STAMPEDE" run --mesh --quiet --data-dir "$TN/n1" "$BENCH/soak.toml" \
    --set "defaults.base_url=\"http://127.0.0.1:$TPORT\"" --set "scenarios.steady.rate=$SOAK_RATE" \
    --set "scenarios.steady.duration=\"${SOAK_S}s\"" \
    --out "json=$WORK/soak.json" --out "html=$WORK/soak.html" --out "csv=$WORK/soak.csv" \
    >"$WORK/soak.log" 2>&1 &
RUN_PID=$!
t0=$(date +%s)
# Bounded: the plan's duration plus 5 minutes for the start and the report.
tick=0
while kill -0 "$RUN_PID" 2>/dev/null && (( $(date +%s) - t0 < SOAK_S + 300 )); do
    sleep 5
    tick=$(( tick + 1 ))
    line="$(( $(date +%s) - t0 ))"
    anon="$line"
    for pid in "${SOAK_PIDS[@]}"; do
        line+=" $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
        anon+=" $(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
    done
    echo "$line" >>"$WORK/soak-rss.samples"
    echo "$anon" >>"$WORK/soak-anon.samples"
    (( tick % 6 == 0 )) || continue
    cut -d' ' -f1 /proc/loadavg >>"$WORK/soak-load.samples"
    target_count "$TPORT" | jq -r '.per_second[] | "\(.[0]) \(.[1])"' >>"$WORK/soak-target.seconds" 2>/dev/null || true
done
if kill -0 "$RUN_PID" 2>/dev/null; then
    echo "run.sh: the soak run did not end within ${SOAK_S}s + 5 min; stopping it" >&2
    kill "$RUN_PID" 2>/dev/null || true
fi
wait "$RUN_PID" || true
stats=$(target_count "$TPORT")
printf '%s' "$stats" | jq -r '.per_second[] | "\(.[0]) \(.[1])"' >>"$WORK/soak-target.seconds" 2>/dev/null || true
echo "load avg after:  $(cut -d' ' -f1-3 /proc/loadavg) (the machine is shared: other work competes with the nodes)"
awk '{ n++; s += $1; if ($1 > m) m = $1 } END { if (n) printf "load avg (1 min) during the run: mean %.1f, max %.1f over %d samples\n", s / n, m, n }' "$WORK/soak-load.samples"
if [[ -s "$WORK/soak.json" ]]; then
    echo "RSS samples (s, VmRSS KiB per node, then RssAnon KiB per node):"
    paste -d' ' "$WORK/soak-rss.samples" <(cut -d' ' -f2- "$WORK/soak-anon.samples") | \
        awk '{ printf "  %s", $1; for (i = 2; i <= NF; i++) printf " %s", $i; printf "\n" }' | \
        awk 'NR % 24 == 6' 
    # Least-squares slope of each node's RSS against time after a warm-up, KiB/min.
    # Only samples taken while the plan runs: the origin builds the report after it
    # (a one-off of a few MB that it gives back), which is not growth per minute.
    # With it a 95 % interval: the samples wander (an allocator's transient peaks, a few
    # hundred KiB over minutes), so the fit and its interval are over one-minute means,
    # with the standard error taken over their effective number n (1 - r) / (1 + r), r
    # the lag-1 autocorrelation of the residuals (5-second samples gave intervals that
    # two soaks of the same build did not share). A 30-minute soak fixes a slope to
    # about +-15 KiB/min; two hours to a few.
    soak_slope() {
    awk -v warm="$1" -v end="$SOAK_S" -v what="$2" '$1 >= warm && $1 <= end {
            k = int(($1 - warm) / 60) + 1
            if (k > n) n = k
            c[k]++; x[k] += $1 / 60
            for (i = 2; i <= NF; i++) y[k, i] += $i
            nf = NF; samples++
        }
        END {
            m = 0
            for (k = 1; k <= n; k++) if (c[k]) { m++; bx[m] = x[k] / c[k]; for (i = 2; i <= nf; i++) by[m, i] = y[k, i] / c[k] }
            if (m < 4) { printf "%s slope: too few minutes after the warm-up\n", what; exit }
            for (k = 1; k <= m; k++) mx += bx[k] / m
            for (k = 1; k <= m; k++) sxx += (bx[k] - mx) ^ 2
            worst = -1e18; worst_hi = -1e18
            for (i = 2; i <= nf; i++) {
                my = 0; sxy = 0
                for (k = 1; k <= m; k++) my += by[k, i] / m
                for (k = 1; k <= m; k++) sxy += (bx[k] - mx) * (by[k, i] - my)
                b = sxy / sxx; a = my - b * mx
                ss = 0; lag = 0
                for (k = 1; k <= m; k++) { e[k] = by[k, i] - a - b * bx[k]; ss += e[k] ^ 2 }
                for (k = 2; k <= m; k++) lag += e[k] * e[k - 1]
                r = (ss > 0) ? lag / ss : 0
                if (r < 0) r = 0
                neff = m * (1 - r) / (1 + r)
                if (neff < 3) neff = 3
                half = 2 * sqrt(ss / (m - 2) / sxx * m / neff)
                if (b > worst) worst = b
                if (b + half > worst_hi) worst_hi = b + half
                printf "%s slope after %d s, node %d: %+.1f KiB/min, 95 %% interval %+.1f .. %+.1f (minute means %d KiB -> %d KiB; %d samples in %d minutes)\n", what, warm, i - 1, b, b - half, b + half, by[1, i], by[m, i], samples, m
            }
            printf "%s slope after %d s, worst node: %+.1f KiB/min, the highest interval end %+.1f (goal < 10)\n", what, warm, worst, worst_hi
        }' "$3"
    }
    awk -v end="$SOAK_S" '$1 > end { printf "RSS after the plan (the origin builds the report) at %d s:", $1; for (i = 2; i <= NF; i++) printf " %s", $i; printf " KiB\n" }' "$WORK/soak-rss.samples"
    soak_slope "$EARLY_WARM_S" RSS "$WORK/soak-rss.samples"
    soak_slope "$WARM_S" RSS "$WORK/soak-rss.samples"
    soak_slope "$EARLY_WARM_S" RssAnon "$WORK/soak-anon.samples"
    soak_slope "$WARM_S" RssAnon "$WORK/soak-anon.samples"
    # Whole seconds inside the run (its start from the summary, the first and last
    # seconds left out as partial), each the target's last reading of that second.
    start=$(date -d "$(jq -r .started_at "$WORK/soak.json")" +%s)
    sort -n -k1,1 -k2,2n "$WORK/soak-target.seconds" | awk '{ c[$1] = ($2 > c[$1] ? $2 : c[$1]) } END { for (s in c) print s, c[s] }' | sort -n >"$WORK/soak-target.per-second"
    awk -v a="$((start + 1))" -v b="$((start + SOAK_S - 1))" -v rate="$SOAK_RATE" '
        $1 >= a && $1 < b { n++; d = ($2 - rate) / rate * 100; if (d < 0) d = -d; if (d > worst) { worst = d; at = $1 - a + 1 }; if (d > 2) out++ }
        END { printf "rate stability: %d whole seconds at the target, %d outside %d/s +-2 %%, worst %.1f %% (second %d of the run)\n", n, out + 0, rate, worst, at }' \
        "$WORK/soak-target.per-second"
    echo "nodes in the run: $(jq -r '[.nodes[].name] | join(", ")' "$WORK/soak.json")"
    echo "exactness: summary $(jq -r .totals.requests "$WORK/soak.json") requests ($(jq -r .totals.failed "$WORK/soak.json") failed, $(jq -r .totals.dropped_iterations "$WORK/soak.json") dropped), target counted $(printf '%s' "$stats" | jq -r .load_requests)"
    echo "report: timeline $(jq -r '.timeline | length' "$WORK/soak.json") points (widths $(jq -r '[.timeline[].width_s] | unique | map(tostring) | join(", ")' "$WORK/soak.json") s), JSON $(( $(stat -c %s "$WORK/soak.json") / 1024 )) KiB, HTML $(( $(stat -c %s "$WORK/soak.html") / 1024 )) KiB, CSV $(( $(stat -c %s "$WORK/soak.csv") / 1024 )) KiB"
    echo "lag p99 $(jq -r .generator.schedule_lag_us.p99 "$WORK/soak.json") us, latency p99 $(jq -r .totals.latency_us.p99 "$WORK/soak.json") us; events: $(jq -r '[.events[].kind] | join(", ")' "$WORK/soak.json")"
else
    echo "run.sh: the soak run wrote no summary; its output:" >&2
    cat "$WORK/soak.log" >&2
fi
STAMPEDE_TESTNET_DIR="$TN" "$ROOT/testnet/local.sh" stop >/dev/null 2>&1 || true
kill "$MESH_TARGET_PID" 2>/dev/null || true
wait "$MESH_TARGET_PID" 2>/dev/null || true
MESH_TARGET_PID=""
fi

# --- 7. WebSocket echo round trips ---------------------------------------------------
if want ws; then
WS_S=$(secs "$SHORT")
log "websocket: stampede (1 worker, CPU 0) vs stampede-target /ws/orders (1 thread, CPU 1), 50 sockets echoing back to back, ${WS_S}s x $ROUNDS rounds"
WPORT=$(free_port)
taskset -c 1 "$ROOT/target/release/stampede-target" --listen "127.0.0.1:$WPORT" --threads 1 >"$WORK/ws-target.log" 2>&1 &
MESH_TARGET_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$WPORT") 2>/dev/null && break; sleep 0.1; done
printf '%-6s %12s %12s %10s %16s %10s %10s\n' round "round trips" "per second" "cpu s" "per CPU-second" "rtt p50" "rtt p99"
for r in $(seq "$ROUNDS"); do
    json="$WORK/ws-$r.json"
    taskset -c 0 /usr/bin/time -v -o "$WORK/ws-$r.time" "$STAMPEDE" run "$BENCH/ws.toml" --workers 1 --quiet \
        --out "json=$json" --set "defaults.base_url=\"http://127.0.0.1:$WPORT\"" \
        --set "scenarios.echo.duration=\"${WS_S}s\"" >"$json.log" 2>&1 || true
    [[ -s "$json" ]] || { echo "run.sh: the ws round wrote no summary:" >&2; cat "$json.log" >&2; exit 1; }
    n=$(jq -r '.totals.metrics.ws_msg_rtt.count // 0' "$json")
    cpu=$(cpu_s "$WORK/ws-$r.time")
    printf '%-6s %12s %12s %10s %16s %10s %10s\n' "$r" "$n" "$(awk -v n="$n" -v d="$WS_S" 'BEGIN {printf "%.0f", n / d}')" "$cpu" \
        "$(awk -v n="$n" -v c="$cpu" 'BEGIN { if (c > 0) printf "%.0f", n / c; else print "n/a" }')" \
        "$(jq -r '.totals.metrics.ws_msg_rtt.p50' "$json") us" "$(jq -r '.totals.metrics.ws_msg_rtt.p99' "$json") us" | tee -a "$WORK/ws.rows"
done
echo "median round trips per CPU-second: $(awk '{print $5}' "$WORK/ws.rows" | median)"
stats=$(target_count "$WPORT")
echo "exactness (all rounds): stampede received $(cat "$WORK"/ws-*.json | jq -s '[.[].totals.metrics.ws_msgs_received.count] | add') messages, the target sent $(printf '%s' "$stats" | jq -r .ws_messages_sent)"
kill "$MESH_TARGET_PID" 2>/dev/null || true
wait "$MESH_TARGET_PID" 2>/dev/null || true
MESH_TARGET_PID=""
fi
