#!/usr/bin/env bash
# Everything on one machine, on loopback: server, pool, deployments, worker. Ctrl-C stops the worker
# first, then the server (the order the server likes).
#   bash deploy/local.sh            then open http://127.0.0.1:4200 and run the `speedrun` deployment
set -euo pipefail
here=$(dirname "$0")
. "$here/env.sh"
mkdir -p "$NANORUN_HOME"
bash "$here/server.sh" > "$NANORUN_HOME/prefect-server.log" 2>&1 &
server=$!
worker=""
cleanup() { [ -n "$worker" ] && kill "$worker" 2>/dev/null && wait "$worker" 2>/dev/null; kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; }
trap cleanup EXIT INT TERM
bash "$here/deploy.sh"
echo "Prefect UI: http://$PREFECT_HOST:$PREFECT_PORT  (server log: $NANORUN_HOME/prefect-server.log)"
bash "$here/worker.sh" &
worker=$!
wait "$worker"
