#!/bin/sh
# Docker engines for development and tests, on a Debian 12 machine as root.
#
#   docker-engine.sh ensure            install docker.io + busybox-static if missing, start the
#                                      default engine if it does not answer, wait until it does
#   docker-engine.sh start-host NAME   run one more independent engine, a separate "host";
#                                      prints its DOCKER_HOST (export DOCKER_HOST=$(... start-host b))
#   docker-engine.sh stop-host NAME    stop it (its data root is kept, like a powered-off host)
#
# Logs go to /var/log/volmove-dockerd.log and /run/volmove-hosts/NAME.log.
set -eu

DEFAULT_SOCK=/var/run/docker.sock
HOSTS_RUN=/run/volmove-hosts
HOSTS_DATA=/var/lib/volmove-hosts
WAIT_SECONDS=60
APT_UPDATED=

say() { echo "docker-engine: $*" >&2; }
die() { say "$*"; exit 1; }

apt_install() {
    if [ -z "$APT_UPDATED" ]; then
        apt-get update
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

install_engine() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io busybox-static
    elif ! installed busybox-static; then
        # The helper image is FROM scratch: it needs the statically linked busybox.
        apt_install busybox-static
    fi
}

answers() { docker -H "unix://$1" version >/dev/null 2>&1; }

wait_for() {  # socket, log file
    i=0
    while ! answers "$1"; do
        i=$((i + 1))
        if [ "$i" -gt "$WAIT_SECONDS" ]; then
            [ -f "$2" ] && tail -n 20 "$2" >&2
            die "no Docker engine answers at unix://$1 after ${WAIT_SECONDS}s"
        fi
        sleep 1
    done
}

ensure() {
    install_engine
    answers "$DEFAULT_SOCK" && return 0
    log=/var/log/volmove-dockerd.log
    if [ -d /run/systemd/system ]; then
        systemctl start docker
    else
        say "starting dockerd in the background (log: $log)"
        setsid dockerd >>"$log" 2>&1 </dev/null &
    fi
    wait_for "$DEFAULT_SOCK" "$log"
    say "Docker engine ready at unix://$DEFAULT_SOCK"
}

check_name() {
    case "$1" in
        "" | *[!A-Za-z0-9_-]*) die "host name must be letters, digits, '-' or '_': '$1'" ;;
    esac
}

start_host() {
    check_name "$1"
    install_engine
    sock="$HOSTS_RUN/$1.sock"
    if answers "$sock"; then
        echo "unix://$sock"
        return 0
    fi
    mkdir -p "$HOSTS_RUN" "$HOSTS_DATA/$1"
    # Its own socket, state, runtime dir, pid file and containerd namespace make it a
    # separate engine; no bridge or iptables rules so it leaves the machine's network alone.
    setsid dockerd \
        --host "unix://$sock" \
        --data-root "$HOSTS_DATA/$1" \
        --exec-root "$HOSTS_RUN/$1" \
        --pidfile "$HOSTS_RUN/$1.pid" \
        --containerd-namespace "volmove-$1" \
        --containerd-plugins-namespace "volmove-$1-plugins" \
        --bridge none --iptables=false --ip-masq=false \
        >>"$HOSTS_RUN/$1.log" 2>&1 </dev/null &
    wait_for "$sock" "$HOSTS_RUN/$1.log"
    say "engine '$1' ready"
    echo "unix://$sock"
}

stop_host() {
    check_name "$1"
    pidfile="$HOSTS_RUN/$1.pid"
    [ -f "$pidfile" ] || { say "engine '$1' is not running"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 30 ]; then
            say "engine '$1' ignored SIGTERM; killing it"
            kill -9 "$pid" 2>/dev/null || true
            # A killed dockerd leaves the containerd it started behind.
            cpid="$HOSTS_RUN/$1/containerd/containerd.pid"
            [ -f "$cpid" ] && kill "$(cat "$cpid")" 2>/dev/null || true
            break
        fi
        sleep 1
    done
    rm -f "$pidfile" "$HOSTS_RUN/$1.sock"
    say "engine '$1' stopped"
}

case "${1:-}" in
    ensure) ensure ;;
    start-host) start_host "${2:-}" ;;
    stop-host) stop_host "${2:-}" ;;
    *) die "usage: $0 ensure | start-host NAME | stop-host NAME" ;;
esac
