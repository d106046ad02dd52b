#!/usr/bin/env bash
# Build N hosts in network namespaces on one bridge, with per-region latency, and run
# a stampede node in each. These namespaces are the project's own test hosts.
#
#   testnet/netns.sh up N      create sp-ns1..sp-nsN on bridge sp-br0 (10.77.0.0/24),
#                              delay by region label (us/eu/ap, round robin), start nodes
#   testnet/netns.sh down      stop the nodes and remove namespaces, veths and bridge
#   testnet/netns.sh peers I   `stampede peers` as seen from host I
#
# Needs root and iproute2. Nodes find each other by mDNS only (no bootstrap) unless
# NETNS_BOOTSTRAP=1. Netem delay needs the sch_netem kernel module; without it the
# hosts run without simulated latency (a warning says so).
# Environment: STAMPEDE_BIN, STAMPEDE_TESTNET_DIR (default /tmp/stampede-netns).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${STAMPEDE_TESTNET_DIR:-/tmp/stampede-netns}"
BIN="${STAMPEDE_BIN:-$ROOT/target/debug/stampede}"
BR=sp-br0
NET=10.77.0
REGIONS=(us eu ap)
declare -A DELAY=([us]=10ms [eu]=40ms [ap]=80ms)

die() { echo "netns.sh: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (creates network namespaces)"
    command -v ip > /dev/null || die "iproute2 (ip) is not installed"
}

down() {
    if [ -f "$DIR/pids" ]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$DIR/pids"
        for _ in $(seq 1 30); do
            alive=0
            while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$DIR/pids"
            [ "$alive" = 0 ] && break
            sleep 0.1
        done
        while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done < "$DIR/pids"
        rm -f "$DIR/pids"
    fi
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^sp-ns[0-9]+$' || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^sp-veth[0-9]+$' || true); do
        ip link del "$l" 2>/dev/null || true
    done
    ip link del "$BR" 2>/dev/null || true
    echo "netns testnet down"
}

up() {
    local n="$1"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 50 ] || die "N must be 1..50, got '$n'"
    need_root
    ip link show "$BR" > /dev/null 2>&1 && die "$BR exists already (run: $0 down)"
    if [ ! -x "$BIN" ]; then
        echo "building stampede ..."
        (cd "$ROOT" && cargo build -q -p stampede)
    fi
    trap 'echo "netns.sh: setup failed; tearing down" >&2; down' ERR INT TERM
    mkdir -p "$DIR"
    [ -f "$DIR/swarm.key" ] || "$BIN" keygen --out "$DIR/swarm.key" 2>/dev/null
    : > "$DIR/pids"
    ip link add "$BR" type bridge
    # mDNS (224.0.0.251) must flood to every port.
    ip link set "$BR" type bridge mcast_snooping 0
    ip link set "$BR" up
    local netem_ok=1
    for i in $(seq 1 "$n"); do
        local ns="sp-ns$i" region="${REGIONS[$(( (i - 1) % ${#REGIONS[@]} ))]}"
        ip netns add "$ns"
        ip link add "sp-veth$i" type veth peer name eth0 netns "$ns"
        ip link set "sp-veth$i" master "$BR" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$NET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        if [ "$netem_ok" = 1 ] && ! ip netns exec "$ns" tc qdisc add dev eth0 root netem delay "${DELAY[$region]}" 2> /dev/null; then
            echo "netns.sh: WARNING: netem is unavailable (kernel module sch_netem missing?); hosts run without simulated latency" >&2
            netem_ok=0
        fi
        local d="$DIR/n$i" args=()
        mkdir -p "$d"
        rm -f "$d/control.json"
        args=(node --name "$ns" --data-dir "$d" --key-file "$DIR/swarm.key"
              --listen "/ip4/$NET.$i/tcp/7400" --http 127.0.0.1:7401 --label "region=$region")
        if [ "${NETNS_BOOTSTRAP:-0}" = 1 ] && [ "$i" -gt 1 ]; then
            args+=(--bootstrap "/ip4/$NET.1/tcp/7400")
        fi
        # Loopback plus what the caller allows (a flag would replace the caller's list).
        STAMPEDE_ALLOW_TARGET="loopback${STAMPEDE_ALLOW_TARGET:+,$STAMPEDE_ALLOW_TARGET}" \
        STAMPEDE_MDNS_QUERY_INTERVAL_MS="${STAMPEDE_MDNS_QUERY_INTERVAL_MS:-1000}" \
            ip netns exec "$ns" "$BIN" "${args[@]}" > "$DIR/n$i.log" 2>&1 < /dev/null &
        echo $! >> "$DIR/pids"
        printf '%-8s %-12s region %-3s delay %-5s data %s\n' "$ns" "$NET.$i" "$region" \
            "$([ "$netem_ok" = 1 ] && echo "${DELAY[$region]}" || echo none)" "$d"
    done
    trap - ERR INT TERM
    echo
    echo "$n host(s) up on $BR; nodes discover each other by mDNS."
    echo "try:  $0 peers 1      (runs: ip netns exec sp-ns1 $BIN peers --data-dir $DIR/n1)"
    echo "stop: $0 down"
}

case "${1:-}" in
    up) up "${2:-3}" ;;
    down) need_root; down ;;
    peers) ip netns exec "sp-ns${2:-1}" "$BIN" peers --data-dir "$DIR/n${2:-1}" ${3:-} ;;
    *) sed -n '2,14p' "$0" ;;
esac
