#!/usr/bin/env bash
# The whole test suite on real services.  Installs and starts what the tests
# need — a Docker engine, the S3 server (single-node Ceph RGW); the Mosquitto
# brokers and extra Docker "hosts" are started by the test fixtures — then
# runs pytest.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
scripts/docker-engine.sh ensure

s3_env=$(scripts/s3-server.sh start)
eval "$s3_env"
trap 'scripts/s3-server.sh stop >/dev/null 2>&1 || true' EXIT
export VOLMOVE_TEST_S3_ENV=${S3_DIR:-/tmp/volmove-ceph}/s3.env

# A missing service fails the run instead of skipping tests.
export VOLMOVE_TEST_REQUIRE=1
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
