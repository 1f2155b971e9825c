#!/usr/bin/env bash
# volmove's main job on the embedded defaults: the local Docker engine and a
# local-directory repository.  Installs what is missing, then backs up a demo
# volume, restores it under a new name and shows that the two match.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/docker-engine.sh ensure

export VOLMOVE_REPO=${VOLMOVE_REPO:-/var/lib/volmove/repo}
vm() { echo "+ volmove $*" >&2; .venv/bin/volmove "$@"; }

.venv/bin/python scripts/demo.py volmove-demo
[ -f "$VOLMOVE_REPO/config" ] || vm init
vm backup volmove-demo
docker volume rm -f volmove-demo-restored >/dev/null 2>&1 || true
vm restore volmove-demo --as volmove-demo-restored
vm compare volmove-demo               # the source matches the snapshot...
vm compare volmove-demo-restored --of volmove-demo   # ...and so does the restored copy
vm snapshots volmove-demo
