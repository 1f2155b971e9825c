#!/usr/bin/env bash
# Install volmove into ./.venv on Debian 12 as root, with the system packages it
# needs.  `install.sh --dev` adds what the test suite needs (broker, S3 server,
# restic, test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

pkgs=(python3 python3-venv python3-pip docker.io busybox-static zstd ca-certificates)
[ "$DEV" = 1 ] && pkgs+=(mosquitto mosquitto-clients restic attr curl docker-compose openssl radosgw ceph-mon ceph-osd ceph-common)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install: apt-get install ${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# A mosquitto or ceph started by the package's own service would hold the ports tests use.
if [ "$DEV" = 1 ] && command -v systemctl >/dev/null && systemctl is-active -q mosquitto 2>/dev/null; then
    systemctl stop mosquitto || true
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
if [ "$DEV" = 1 ]; then
    .venv/bin/pip install -q -e '.[dev]'
else
    .venv/bin/pip install -q -e .
fi
# An editable install leaves volmove's own modules uncompiled; compile them now so that no
# run pays for it (each would, wherever PYTHONDONTWRITEBYTECODE is set).
.venv/bin/python -m compileall -q core cli service workers >/dev/null
echo "install: volmove installed in $(pwd)/.venv" >&2
