#!/usr/bin/env bash
# A throw-away S3 server for volmove's tests: a single-node Ceph cluster (1 mon,
# 1 BlueStore OSD on a sparse file) plus the RADOS Gateway, all on 127.0.0.1.
# Ceph 16.2 from Debian 12; a real S3 implementation, unlike an emulator.
#
#   scripts/s3-server.sh start   install packages if needed, start, write $S3_DIR/s3.env
#   scripts/s3-server.sh env     print the env file (eval "$(scripts/s3-server.sh env)")
#   scripts/s3-server.sh stop    stop only the daemons it started, remove $S3_DIR
#
# The env file exports AWS_ENDPOINT_URL / S3_ENDPOINT_URL (http), AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and S3_HTTPS_ENDPOINT_URL + S3_CA_BUNDLE
# (the same gateway over HTTPS with a self-signed certificate).
#
# Knobs (environment, all optional):
#   S3_DIR        state dir, wiped on start      (default /tmp/volmove-ceph)
#   RGW_PORT      http port                      (default 7580)
#   RGW_SSL_PORT  https port                     (default 7543)
#   MON_PORT_V2 / MON_PORT_V1  monitor ports     (default 3310 / 6799)
#   OSD_SIZE      sparse BlueStore file size     (default 10G; the most disk it can take.
#                 When it fills up Ceph holds writes rather than failing them.)
#   RGW_GC_WAIT   seconds before deleted data is garbage-collected (default 30)
#   S3_ACCESS_KEY / S3_SECRET_KEY  credentials of the S3 user "volmove"
# The default ports differ from Ceph's own so this can run beside another cluster.
# Needs: Debian 12 (bookworm) or a derivative, root or sudo for the package install.
set -euo pipefail

S3_DIR=${S3_DIR:-/tmp/volmove-ceph}
RGW_PORT=${RGW_PORT:-7580}
RGW_SSL_PORT=${RGW_SSL_PORT:-7543}
MON_PORT_V2=${MON_PORT_V2:-3310}
MON_PORT_V1=${MON_PORT_V1:-6799}
OSD_SIZE=${OSD_SIZE:-10G}
RGW_GC_WAIT=${RGW_GC_WAIT:-30}
S3_ACCESS_KEY=${S3_ACCESS_KEY:-VOLMOVETESTACCESSKEY}
S3_SECRET_KEY=${S3_SECRET_KEY:-volmovetestsecretkey000000000000000000000}
PACKAGES="radosgw ceph-mon ceph-osd ceph-common curl openssl"
CONF=$S3_DIR/ceph.conf

die() { echo "s3-server.sh: $*" >&2; exit 1; }
t0=$(date +%s.%N)
log() { awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$*" 'BEGIN{printf "[%5.1fs] %s\n", b-a, m}' >&2; }

# --- packages ------------------------------------------------------------------

install_packages() {
  local missing=0 b sudo=""
  for b in ceph ceph-mon ceph-osd radosgw radosgw-admin ceph-authtool monmaptool curl openssl; do
    command -v "$b" >/dev/null || missing=1
  done
  [ "$missing" = 0 ] && return 0
  command -v apt-get >/dev/null || die "needs Debian/Ubuntu packages: $PACKAGES"
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (or install sudo) to install: $PACKAGES"
    sudo="sudo"
  fi
  log "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  # a fresh image has no package lists; a stale one may name versions no longer served
  # (apt output goes to stderr: stdout of 'start' is the env file, for eval)
  if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then $sudo apt-get update -q >&2; fi
  $sudo apt-get install -y -q --no-install-recommends $PACKAGES >&2 \
    || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q --no-install-recommends $PACKAGES >&2; }
}

# --- helpers ---------------------------------------------------------------------

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }   # no dependency on ss/netstat

running() { # true if any daemon of this cluster is alive
  local pf
  for pf in "$S3_DIR"/run/*.pid; do
    [ -e "$pf" ] && ours "$(cat "$pf")" && return 0
  done
  return 1
}

ours() { kill -0 "$1" 2>/dev/null && grep -qa -- "$CONF" "/proc/$1/cmdline"; }

# alive and not a zombie (in a container whose init does not reap, a stopped daemon stays Z)
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }

stop_pid() { # name pidfile: only a ceph daemon started with this cluster's conf
  local name=$1 pf=$2 pid i
  [ -f "$pf" ] || return 0
  pid=$(cat "$pf")
  if ours "$pid"; then
    kill -TERM "$pid"
    for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && { echo "$name ($pid) still alive, SIGKILL"; kill -KILL "$pid"; }
    echo "stopped $name ($pid)"
  fi
  rm -f "$pf"
}

# --- stop ------------------------------------------------------------------------

cmd_stop() { # KEEP_DATA=1 keeps the dir (logs) for a post-mortem
  [ -d "$S3_DIR/run" ] || { echo "nothing to stop in $S3_DIR"; return 0; }
  local pf
  stop_pid radosgw "$S3_DIR/run/client.rgw.a.pid"   # gateway first, monitor last
  for pf in "$S3_DIR"/run/osd.*.pid; do [ -e "$pf" ] && stop_pid "$(basename "$pf" .pid)" "$pf"; done
  stop_pid mon.a "$S3_DIR/run/mon.a.pid"
  if [ "${KEEP_DATA:-0}" != 1 ]; then rm -rf "$S3_DIR"; echo "removed $S3_DIR"; fi
}

# --- start -----------------------------------------------------------------------

check_start() {
  case "$S3_DIR" in /|/tmp|/root|/home|"") die "refusing S3_DIR=$S3_DIR";; esac
  if [ -d "$S3_DIR" ] && [ -n "$(ls -A "$S3_DIR")" ] && [ ! -f "$CONF" ]; then
    die "$S3_DIR exists, is not empty and holds no ceph.conf: refusing to wipe it"
  fi
  local port
  for port in "$MON_PORT_V2" "$MON_PORT_V1" "$RGW_PORT" "$RGW_SSL_PORT"; do
    port_in_use "$port" && die "port $port already in use (set RGW_PORT, RGW_SSL_PORT, MON_PORT_V2, MON_PORT_V1)"
  done
  return 0
}

make_cert() {
  mkdir -p "$S3_DIR/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$S3_DIR/tls/key.pem" -out "$S3_DIR/tls/cert.pem" 2>/dev/null
}

write_conf() {
  cat >"$CONF" <<EOF
[global]
  fsid = $1
  mon host = [v2:127.0.0.1:$MON_PORT_V2,v1:127.0.0.1:$MON_PORT_V1]
  public addr = 127.0.0.1
  cluster addr = 127.0.0.1
  ms bind ipv6 = false
  auth cluster required = cephx
  auth service required = cephx
  auth client required = cephx
  auth allow insecure global id reclaim = false
  keyring = $S3_DIR/keyring
  run dir = $S3_DIR/run
  pid file = $S3_DIR/run/\$name.pid
  admin socket = $S3_DIR/run/\$name.asok
  log file = $S3_DIR/log/\$name.log
  crash dir = $S3_DIR/log/crash
  # one OSD: one replica, no failure domain, few PGs
  osd pool default size = 1
  osd pool default min size = 1
  mon allow pool size one = true
  mon warn on pool no redundancy = false
  osd crush chooseleaf type = 0
  osd pool default pg num = 8
  osd pool default pgp num = 8
  osd pool default pg autoscale mode = off
  mon max pg per osd = 1000
  # small CI disks: don't let the mon stop itself at 5% free
  mon data avail warn = 2
  mon data avail crit = 1
  mon osd full ratio = .97
  mon osd backfillfull ratio = .96
  mon osd nearfull ratio = .95
  osd failsafe full ratio = .98

[mon.a]
  mon data = $S3_DIR/mon.a

[osd]
  osd data = $S3_DIR/osd.\$id
  keyring = $S3_DIR/osd.\$id/keyring
  osd objectstore = bluestore
  bluestore block create = true
  bluestore block size = $(numfmt --from=iec "$OSD_SIZE")
  bluestore fsck on mount = false
  osd memory target = 1073741824
  # few cores: fewer op shards/threads than the SSD defaults (8 shards x 2)
  osd op num shards = 1
  osd op num threads per shard = 2

[client.rgw.a]
  rgw data = $S3_DIR/rgw.a
  keyring = $S3_DIR/rgw.a/keyring
  # tcp_nodelay: without it a small response (a LIST, a HEAD, a short ranged GET) waits ~45 ms
  # for the client's delayed ACK (Nagle); a 128 KiB one took 5 ms.
  rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT ssl_endpoint=127.0.0.1:$RGW_SSL_PORT ssl_certificate=$S3_DIR/tls/cert.pem ssl_private_key=$S3_DIR/tls/key.pem tcp_nodelay=1
  rgw thread pool size = 64
  rgw gc obj min wait = $RGW_GC_WAIT
  rgw gc processor period = $RGW_GC_WAIT
  rgw gc processor max time = $RGW_GC_WAIT
EOF
}

start_mon() {
  local fsid=$1 keyring=$S3_DIR/keyring i
  ceph-authtool "$keyring" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  monmaptool --create --clobber --fsid "$fsid" \
    --addv a "[v2:127.0.0.1:$MON_PORT_V2,v1:127.0.0.1:$MON_PORT_V1]" "$S3_DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$S3_DIR/monmap" --keyring "$keyring"
  ceph-mon -c "$CONF" -i a
  for i in $(seq 60); do $C mon stat >/dev/null 2>&1 && break; sleep 0.5; done
  $C mon stat >/dev/null || die "monitor did not form a quorum (see $S3_DIR/log/mon.a.log)"
  log "mon.a up"
}

start_osd() { # the steps of ceph-volume: register with a cephx secret, mkfs, start
  local uuid secret id i
  uuid=$(cat /proc/sys/kernel/random/uuid)
  secret=$(ceph-authtool --gen-print-key)
  echo "{\"cephx_secret\": \"$secret\"}" >"$S3_DIR/osd-new.json"
  id=$($C osd new "$uuid" -i "$S3_DIR/osd-new.json")
  rm -f "$S3_DIR/osd-new.json"
  mkdir -p "$S3_DIR/osd.$id"
  ceph-authtool "$S3_DIR/osd.$id/keyring" --create-keyring -n "osd.$id" --add-key "$secret" >/dev/null
  ceph-osd -c "$CONF" -i "$id" --mkfs --osd-uuid "$uuid" >"$S3_DIR/log/osd-mkfs.log" 2>&1 \
    || { cat "$S3_DIR/log/osd-mkfs.log" >&2; die "ceph-osd --mkfs failed"; }
  ceph-osd -c "$CONF" -i "$id" 2>>"$S3_DIR/log/osd-start.log"
  for i in $(seq 120); do $C osd dump 2>/dev/null | grep -q "^osd.$id up" && break; sleep 0.5; done
  $C osd dump | grep -q "^osd.$id up" || { tail -30 "$S3_DIR/log/osd.$id.log" >&2; die "osd.$id did not come up"; }
  log "osd.$id up"
}

create_pools() { # RGW would create these lazily, a few seconds each, inside the first requests
  local pools=".rgw.root default.rgw.control default.rgw.meta default.rgw.log
       default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec" pool
  # in parallel, so the monitor batches them into a few map updates
  for pool in $pools; do $C osd pool create "$pool" 8 8 >/dev/null 2>&1 & done; wait
  for pool in $pools; do $C osd pool application enable "$pool" rgw >/dev/null 2>&1 & done; wait
  [ "$($C osd pool ls | grep -c rgw)" -ge 7 ] || die "pool creation failed"
  log "rgw pools created"
}

start_rgw() {
  local pidf=$S3_DIR/run/client.rgw.a.pid i
  # the first radosgw-admin command also creates the default zonegroup and zone
  radosgw-admin -c "$CONF" user create --uid=volmove --display-name="volmove tests" \
    --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >"$S3_DIR/user.json"
  $C auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' >"$S3_DIR/rgw.a/keyring"
  radosgw -c "$CONF" -n client.rgw.a
  for i in $(seq 240); do
    curl -s -o /dev/null "http://127.0.0.1:$RGW_PORT/" && break
    [ -f "$pidf" ] && ! kill -0 "$(cat "$pidf")" 2>/dev/null && break   # radosgw died
    sleep 0.25
  done
  curl -s -o /dev/null "http://127.0.0.1:$RGW_PORT/" \
    || { tail -30 "$S3_DIR/log/client.rgw.a.log" >&2; die "radosgw did not answer"; }
  for i in $(seq 40); do
    curl -s --cacert "$S3_DIR/tls/cert.pem" -o /dev/null "https://127.0.0.1:$RGW_SSL_PORT/" && break
    sleep 0.25
  done
  curl -s --cacert "$S3_DIR/tls/cert.pem" -o /dev/null "https://127.0.0.1:$RGW_SSL_PORT/" \
    || die "radosgw does not answer on https://127.0.0.1:$RGW_SSL_PORT"
  log "radosgw answering on http://127.0.0.1:$RGW_PORT and https://127.0.0.1:$RGW_SSL_PORT"
}

write_env() {
  cat >"$S3_DIR/s3.env.tmp" <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
export S3_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
export S3_HTTPS_ENDPOINT_URL=https://127.0.0.1:$RGW_SSL_PORT
export S3_CA_BUNDLE=$S3_DIR/tls/cert.pem
EOF
  mv "$S3_DIR/s3.env.tmp" "$S3_DIR/s3.env"   # the file appears only once the server answers
}

cmd_start() {
  if [ -f "$S3_DIR/s3.env" ] && running; then
    echo "already running in $S3_DIR" >&2; cat "$S3_DIR/s3.env"; return 0
  fi
  install_packages
  running && die "a half-started cluster is running in $S3_DIR: run '$0 stop' first"
  check_start
  C="ceph -c $CONF --connect-timeout 20"
  started_ok=0
  # on failure stop whatever this run started, keeping the logs
  trap '[ "$started_ok" = 1 ] || { echo "start failed; logs in $S3_DIR/log" >&2; KEEP_DATA=1 cmd_stop >&2; }' EXIT
  rm -rf "$S3_DIR"
  mkdir -p "$S3_DIR"/{run,log,mon.a,rgw.a}
  make_cert
  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$fsid"
  start_mon "$fsid"
  start_osd
  create_pools
  start_rgw
  write_env
  cat "$S3_DIR/s3.env"
  started_ok=1
}

cmd_env() {
  [ -f "$S3_DIR/s3.env" ] && running || die "no S3 server running in $S3_DIR ('$0 start')"
  cat "$S3_DIR/s3.env"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop|env   (state in \$S3_DIR, default /tmp/volmove-ceph)" >&2; exit 2 ;;
esac
