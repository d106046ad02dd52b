#!/usr/bin/env bash
# Start N stampede nodes as plain processes on 127.0.0.1, joined by bootstrap.
#
#   testnet/local.sh N        start N nodes (a shared key, data dirs under a temp dir)
#   testnet/local.sh stop     stop every node started by this script
#   testnet/local.sh status   show the mesh as node 1 sees it
#
# Environment: STAMPEDE_BIN (default: target/debug/stampede, built if missing),
# STAMPEDE_TESTNET_DIR (default: /tmp/stampede-testnet). mDNS is off (it does not work
# on loopback, and would send multicast on the machine's real interfaces).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${STAMPEDE_TESTNET_DIR:-/tmp/stampede-testnet}"
BIN="${STAMPEDE_BIN:-$ROOT/target/debug/stampede}"

die() { echo "local.sh: $*" >&2; exit 1; }

first_addr() { # the first listen multiaddr in a node's control.json
    grep -o '"/ip4/[^"]*' "$1/control.json" | head -n1 | tr -d '"'
}
json_field() { # json_field FILE KEY -> string value
    grep -o "\"$2\": *\"[^\"]*\"" "$1" | head -n1 | sed 's/.*: *"\(.*\)"/\1/'
}

wait_control() { # wait_control DATA_DIR PID
    for _ in $(seq 1 100); do
        if [ -f "$1/control.json" ] && grep -q "\"pid\": $2," "$1/control.json"; then return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

stop() {
    [ -f "$DIR/pids" ] || { echo "no local testnet running (no $DIR/pids)"; return 0; }
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$DIR/pids"
    for _ in $(seq 1 50); do
        alive=0
        while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$DIR/pids"
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done < "$DIR/pids"
    rm -f "$DIR/pids"
    echo "stopped; logs remain in $DIR"
}

start() {
    local n="$1"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 128 ] || die "N must be 1..128, got '$n'"
    [ -f "$DIR/pids" ] && die "a testnet is already running in $DIR (run: $0 stop)"
    if [ ! -x "$BIN" ]; then
        echo "building stampede ..."
        (cd "$ROOT" && cargo build -q -p stampede)
    fi
    mkdir -p "$DIR"
    [ -f "$DIR/swarm.key" ] || "$BIN" keygen --out "$DIR/swarm.key" 2>/dev/null
    : > "$DIR/pids"
    trap 'echo "start failed; stopping what started" >&2; stop' ERR
    local boot=""
    for i in $(seq 1 "$n"); do
        local d="$DIR/n$i"
        mkdir -p "$d"
        rm -f "$d/control.json"
        local args=(node --name "n$i" --data-dir "$d" --key-file "$DIR/swarm.key"
                    --listen /ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0 --label "index=$i")
        [ -n "$boot" ] && args+=(--bootstrap "$boot")
        # Loopback plus what the caller allows (a flag would replace the caller's list).
        STAMPEDE_ALLOW_TARGET="loopback${STAMPEDE_ALLOW_TARGET:+,$STAMPEDE_ALLOW_TARGET}" \
            STAMPEDE_MDNS=false "$BIN" "${args[@]}" > "$DIR/n$i.log" 2>&1 < /dev/null &
        local pid=$!
        echo "$pid" >> "$DIR/pids"
        wait_control "$d" "$pid" || { cat "$DIR/n$i.log" >&2; false; }
        [ -z "$boot" ] && boot="$(first_addr "$d")"
        printf 'n%-3s pid %-7s control %-21s http %-21s data %s\n' "$i" "$pid" \
            "$(json_field "$d/control.json" addr)" "$(json_field "$d/control.json" http)" "$d"
    done
    trap - ERR
    echo
    echo "mesh of $n node(s) up; bootstrap: $boot"
    echo "try:  $BIN peers --data-dir $DIR/n1      stop: $0 stop"
}

case "${1:-}" in
    stop) stop ;;
    status) "$BIN" peers --data-dir "$DIR/n1" ;;
    ''|-h|--help) sed -n '2,11p' "$0" ;;
    *) start "$1" ;;
esac
