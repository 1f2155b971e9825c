#!/bin/sh
# Make a self-signed CA and a server certificate for the broker's TLS listener.
#
#   make-certs.sh [--owner USER:GROUP] [--ca-dir DIR] [--days N] OUTDIR [NAME...]
#
# Writes OUTDIR/ca.crt (give it to every worker and the service:
# VOLMOVE_BROKER_CA), OUTDIR/server.crt and OUTDIR/server.key (for
# mosquitto.conf). The CA key stays in the CA directory (default OUTDIR; keep it
# off the broker with --ca-dir) and is never given to the --owner.
#
# NAMEs are the host names and IP addresses clients use to reach the broker;
# the certificate is valid for exactly these (default: broker localhost
# 127.0.0.1 and this machine's name).
#
# Run again to renew the server certificate (e.g. with more names): an existing
# CA is reused, so clients keep trusting the broker. Delete the CA directory's
# ca.key and ca.crt to start a new CA.
#
# --owner: Mosquitto reads its key after dropping root, as its own user — pass
# 1883:1883 for the eclipse-mosquitto container; by default, when run as root,
# the key goes to the local `mosquitto` user if there is one.
set -eu

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
die() { echo "make-certs: $*" >&2; exit 1; }

owner=
ca_dir=
days=825
while [ $# -gt 0 ]; do
    case $1 in
        --owner) owner=${2:?}; shift 2 ;;
        --ca-dir) ca_dir=${2:?}; shift 2 ;;
        --days) days=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
out=$1
shift
[ -n "$ca_dir" ] || ca_dir=$out
if [ $# -eq 0 ]; then
    set -- broker localhost 127.0.0.1 "$(hostname -f 2>/dev/null || hostname)"
fi
command -v openssl >/dev/null || die "openssl is needed (apt-get install openssl)"
if [ -z "$owner" ] && [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    owner=mosquitto:mosquitto
fi

umask 077
mkdir -p "$out" "$ca_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# subjectAltName: IP addresses as IP:, everything else as DNS:.
san=
for name in "$@"; do
    case $name in
        *[!0-9.]*) case $name in *:*) entry="IP:$name" ;; *) entry="DNS:$name" ;; esac ;;
        *) entry="IP:$name" ;;
    esac
    san="${san:+$san,}$entry"
done

if [ ! -s "$ca_dir/ca.key" ] || [ ! -s "$ca_dir/ca.crt" ]; then
    openssl req -x509 -new -nodes -newkey rsa:3072 -sha256 -days 3650 \
        -subj "/CN=volmove MQTT CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "CA failed"; }
    echo "make-certs: new CA in $ca_dir/ca.crt" >&2
fi

cat >"$tmp/ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
openssl req -new -nodes -newkey rsa:2048 -sha256 -subj "/CN=$1" \
    -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "key failed"; }
openssl x509 -req -in "$tmp/server.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
    -CAcreateserial -CAserial "$ca_dir/ca.srl" -days "$days" -sha256 -extfile "$tmp/ext" \
    -out "$tmp/server.crt" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "signing failed"; }
openssl verify -CAfile "$ca_dir/ca.crt" "$tmp/server.crt" >/dev/null || die "the new certificate does not verify"

[ "$ca_dir" = "$out" ] || cp "$ca_dir/ca.crt" "$tmp/ca.crt.copy"
chmod 644 "$tmp/server.crt"
chmod 640 "$tmp/server.key"
if [ -n "$owner" ]; then
    chown "$owner" "$tmp/server.key" "$tmp/server.crt" || die "cannot give the key to $owner (run as root)"
fi
mv -f "$tmp/server.key" "$out/server.key"
mv -f "$tmp/server.crt" "$out/server.crt"
if [ "$ca_dir" != "$out" ]; then
    mv -f "$tmp/ca.crt.copy" "$out/ca.crt"
fi
chmod 644 "$out/ca.crt" "$ca_dir/ca.crt"
chmod 755 "$out"
echo "make-certs: $out/server.crt for $san, valid $days days" >&2
