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
# stop PID: INT (what Ctrl-C sends), up to 6 s to finish, then KILL: one Ctrl-C or TERM ends all of
# it within ~15 s, worker first (the server must outlive the worker's last API calls)
stop() {
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -INT "$pid" 2>/dev/null
  for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}
cleanup() { trap - EXIT INT TERM; stop "$worker"; stop "$server"; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
bash "$here/deploy.sh"
echo "Prefect UI: http://$PREFECT_HOST:$PREFECT_PORT  (server log: $NANORUN_HOME/prefect-server.log)"
bash "$here/worker.sh" &
worker=$!
wait "$worker"
