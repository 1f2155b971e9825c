#!/bin/sh
# Prepare docker-compose.yml's secrets, once, on the machine that runs it:
#   - a CA (deploy/ca/, never mounted) and the broker's TLS certificate
#     (deploy/mosquitto/certs/) for the names in $VOLMOVE_BROKER_NAMES
#     (default: broker, localhost, 127.0.0.1 and this machine's name)
#   - broker accounts volmove-service and this host's worker (deploy/mosquitto/passwd)
#   - .env beside docker-compose.yml with the passwords, the S3 keys, the
#     service API's token and VOLMOVE_HOST (default: this machine's short name)
#
#   deploy/compose-setup.sh
#
# Run again at will: existing passwords and keys in .env, and the CA, are kept;
# the server certificate is renewed. Run as root so the broker (uid 1883 in its
# container) gets its key and password file without making them world-readable.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
env_file=$top/.env
say() { echo "compose-setup: $*" >&2; }

# KEY from .env, if there.
current() { [ -f "$env_file" ] && sed -n "s/^$1=//p" "$env_file" | tail -n 1 || true; }
secret() { openssl rand -base64 33 | tr -d '\n/+=' | cut -c1-32; }

host=${VOLMOVE_HOST:-$(current VOLMOVE_HOST)}
host=${host:-$(hostname -s)}
service_pw=$(current VOLMOVE_SERVICE_BROKER_PASSWORD)
worker_pw=$(current VOLMOVE_WORKER_BROKER_PASSWORD)
s3_key=$(current S3_ACCESS_KEY)
s3_secret=$(current S3_SECRET_KEY)
api_token=$(current VOLMOVE_SERVICE_TOKEN)
[ -n "$service_pw" ] || service_pw=$(secret)
[ -n "$worker_pw" ] || worker_pw=$(secret)
[ -n "$s3_key" ] || s3_key=volmove
[ -n "$s3_secret" ] || s3_secret=$(secret)
[ -n "$api_token" ] || api_token=$(secret)

owner=
[ "$(id -u)" = 0 ] && owner=1883:1883

# shellcheck disable=SC2086
"$here/mosquitto/make-certs.sh" ${owner:+--owner $owner} --ca-dir "$here/ca" "$here/mosquitto/certs" \
    ${VOLMOVE_BROKER_NAMES:-broker localhost 127.0.0.1 "$(hostname -f 2>/dev/null || hostname)"}
passwd=$here/mosquitto/passwd
# shellcheck disable=SC2086
VOLMOVE_BROKER_PASSWORD=$service_pw "$here/mosquitto/add-host.sh" -f "$passwd" ${owner:+--owner $owner} --service >/dev/null
# shellcheck disable=SC2086
VOLMOVE_BROKER_PASSWORD=$worker_pw "$here/mosquitto/add-host.sh" -f "$passwd" ${owner:+--owner $owner} "$host" >/dev/null
if [ -z "$owner" ]; then
    chmod 644 "$here/mosquitto/certs/server.key" "$passwd"
    say "not root: server.key and passwd made world-readable so the broker's user can read them"
fi

umask 077
cat >"$env_file.tmp" <<EOF
# Written by deploy/compose-setup.sh: secrets for docker-compose.yml. Never commit.
VOLMOVE_HOST=$host
VOLMOVE_SERVICE_BROKER_PASSWORD=$service_pw
VOLMOVE_WORKER_BROKER_PASSWORD=$worker_pw
S3_ACCESS_KEY=$s3_key
S3_SECRET_KEY=$s3_secret
VOLMOVE_SERVICE_TOKEN=$api_token
EOF
# Keep any other setting the user added.
if [ -f "$env_file" ]; then
    grep -vE '^(# Written by deploy/compose-setup.sh|VOLMOVE_HOST|VOLMOVE_SERVICE_BROKER_PASSWORD|VOLMOVE_WORKER_BROKER_PASSWORD|S3_ACCESS_KEY|S3_SECRET_KEY|VOLMOVE_SERVICE_TOKEN)(=|:|$)' \
        "$env_file" >>"$env_file.tmp" || true
fi
mv -f "$env_file.tmp" "$env_file"
say "ready: $env_file (host $host); now: docker compose up -d --build"
