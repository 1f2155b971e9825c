#!/bin/sh
# Add (or change the password of) a Docker host's worker account on the broker.
#
#   add-host.sh [-f PASSWD_FILE] [--owner USER:GROUP] HOST
#   add-host.sh [-f PASSWD_FILE] [--owner USER:GROUP] --service
#   add-host.sh [-f PASSWD_FILE] --remove HOST
#
# HOST is the host's name as the fleet knows it (the worker's VOLMOVE_HOST); the
# ACL's `pattern ... volmove/v1/hosts/%u/#` gives the account its own topics and
# no others, so no ACL edit is needed. --service adds the control service's
# account, volmove-service.
#
# The password comes from VOLMOVE_BROKER_PASSWORD if set, else a random one is
# made. It is printed once on stdout as the two lines to put in that host's
# /etc/volmove/worker.env (VOLMOVE_BROKER_USER=..., VOLMOVE_BROKER_PASSWORD=...);
# the password file keeps only a salted hash. It never appears on a command line.
#
# PASSWD_FILE defaults to the passwd file beside this script (the one
# docker-compose.yml mounts). The broker reads it again on SIGHUP:
#   docker compose kill -s HUP broker      or      systemctl reload mosquitto
# --owner as in make-certs.sh: 1883:1883 for the eclipse-mosquitto container.
set -eu

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
die() { echo "add-host: $*" >&2; exit 1; }

file=$(dirname "$0")/passwd
owner=
remove=0
service=0
user=
while [ $# -gt 0 ]; do
    case $1 in
        -f) file=${2:?}; shift 2 ;;
        --owner) owner=${2:?}; shift 2 ;;
        --remove) remove=1; shift ;;
        --service) [ -z "$user" ] || usage; user=volmove-service; service=1; shift ;;
        -h|--help) usage ;;
        -*) usage ;;
        *) [ -z "$user" ] || usage; user=$1; shift ;;
    esac
done
[ -n "$user" ] || usage
# The ACL gives volmove-service every topic: a host must not get that name.
[ "$user" != volmove-service ] || [ "$service" = 1 ] || [ "$remove" = 1 ] \
    || die "volmove-service is the service's account: use --service"

# The name becomes an MQTT topic level and a password-file key.
case $user in
    ''|*[!A-Za-z0-9._-]*|[!A-Za-z0-9]*) die "invalid host name '$user': use letters, digits, '.', '_' and '-'" ;;
esac
# The same rule as the fleet protocol (core/volmove/core/fleet/topics.py, HOST_RE).
[ "${#user}" -le 63 ] || die "host name too long (63 characters at most)"

# mpasswd [OPTION...] FILE USER: mosquitto_passwd ($MOSQUITTO_PASSWD), else the
# one in the broker's image through Docker.
mpasswd() {
    if command -v "${MOSQUITTO_PASSWD:-mosquitto_passwd}" >/dev/null; then
        "${MOSQUITTO_PASSWD:-mosquitto_passwd}" "$@"
    elif command -v docker >/dev/null; then
        pw_dir=$(cd "$(dirname "$file")" && pwd)
        pw_name=$(basename "$file")
        # The arguments name $file; in the container it is /w/<name>.
        pw_opts=
        while [ $# -gt 0 ] && [ "$1" != "$file" ]; do pw_opts="$pw_opts $1"; shift; done
        shift
        # shellcheck disable=SC2086
        docker run --rm -i --network none -v "$pw_dir:/w" "${MOSQUITTO_IMAGE:-eclipse-mosquitto:2}" \
            mosquitto_passwd $pw_opts "/w/$pw_name" "$@"
    else
        die "mosquitto_passwd is needed (apt-get install mosquitto, or Docker to run it from eclipse-mosquitto:2)"
    fi
}
if [ -z "$owner" ] && [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    owner=mosquitto:mosquitto
fi

if [ "$remove" = 1 ]; then
    [ -f "$file" ] || die "no password file $file"
    mpasswd -D "$file" "$user" || die "mosquitto_passwd failed"
    echo "add-host: removed $user from $file; reload the broker (SIGHUP)" >&2
    exit 0
fi

password=${VOLMOVE_BROKER_PASSWORD:-}
if [ -z "$password" ]; then
    command -v openssl >/dev/null || die "openssl is needed to make a password (or set VOLMOVE_BROKER_PASSWORD)"
    password=$(openssl rand -base64 33 | tr -d '\n/+=' | cut -c1-32)
fi
case $password in *"
"*) die "the password must be one line" ;; esac

umask 077
create=
[ -s "$file" ] || create=-c
# mosquitto_passwd reads the password twice from stdin when it is not a terminal.
printf '%s\n%s\n' "$password" "$password" | mpasswd $create "$file" "$user" >/dev/null \
    || die "mosquitto_passwd failed"
chmod 640 "$file"
if [ -n "$owner" ]; then
    chown "$owner" "$file" || die "cannot give $file to $owner (run as root)"
fi

echo "VOLMOVE_BROKER_USER=$user"
echo "VOLMOVE_BROKER_PASSWORD=$password"
echo "add-host: $user added to $file; reload the broker (SIGHUP) to let it in" >&2
