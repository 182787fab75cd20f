#!/usr/bin/env bash
# The shared conversation store of a multi-replica (Ray Serve) deployment: Redis on loopback.
#   scripts/redis.sh install         install redis-server (Debian/Ubuntu apt) unless present
#   scripts/redis.sh start [PORT]    start it (default port 6379), data in $LOOPSERVE_REDIS_DIR
#   scripts/redis.sh stop [PORT]     stop it (saves first)
#   scripts/redis.sh status [PORT]
# Durability: append-only file fsynced at every write, so a committed turn survives a crash.
# Multi-node: LOOPSERVE_REDIS_BIND=0.0.0.0 LOOPSERVE_REDIS_PASSWORD=secret scripts/redis.sh start 6380
# and give replicas redis://:secret@HOST:6380/0.
set -euo pipefail
cmd=${1:-status}
port=${2:-6379}
dir=${LOOPSERVE_REDIS_DIR:-${LOOPSERVE_CACHE:-$HOME/.cache/loopserve}/redis-$port}

find_server() { command -v redis-server || { test -x /usr/bin/redis-server && echo /usr/bin/redis-server; } || true; }

case "$cmd" in
install)
    if [ -n "$(find_server)" ]; then echo "redis-server: $(find_server)"; exit 0; fi
    if ! command -v apt-get >/dev/null; then
        echo "redis-server is missing and apt-get is not available: install Redis >= 6 with your package manager" >&2
        exit 1
    fi
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
    # The Debian package may start a system-wide instance on 6379; we run our own.
    (command -v systemctl >/dev/null && $SUDO systemctl disable --now redis-server >/dev/null 2>&1) || true
    echo "redis-server: $(find_server)"
    ;;
start)
    srv=$(find_server)
    [ -n "$srv" ] || { echo "redis-server not found: run scripts/redis.sh install" >&2; exit 1; }
    mkdir -p "$dir"
    bind=${LOOPSERVE_REDIS_BIND:-127.0.0.1}
    auth=(); [ -n "${LOOPSERVE_REDIS_PASSWORD:-}" ] && auth=(--requirepass "$LOOPSERVE_REDIS_PASSWORD")
    "$srv" --port "$port" --bind "$bind" --dir "$dir" --appendonly yes --appendfsync always \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "" "${auth[@]}"
    for _ in $(seq 50); do REDISCLI_AUTH="${LOOPSERVE_REDIS_PASSWORD:-}" redis-cli -p "$port" ping >/dev/null 2>&1 && { echo "redis on $bind:$port (data $dir)"; exit 0; }; sleep 0.1; done
    echo "redis did not start: see $dir/redis.log" >&2; exit 1
    ;;
stop)
    REDISCLI_AUTH="${LOOPSERVE_REDIS_PASSWORD:-}" redis-cli -p "$port" shutdown >/dev/null 2>&1 || true
    echo "redis on port $port stopped"
    ;;
status)
    REDISCLI_AUTH="${LOOPSERVE_REDIS_PASSWORD:-}" redis-cli -p "$port" ping
    ;;
*)
    echo "usage: $0 install|start|stop|status [PORT]" >&2; exit 2
    ;;
esac
