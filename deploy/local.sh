#!/usr/bin/env bash
# Everything on one machine, on loopback: server, pool, deployments, worker. Ctrl-C (or a TERM to
# this script) stops the worker and the flow runs it started first, then the server, within ~15 s.
#   bash deploy/local.sh            then open http://127.0.0.1:4200 and run the `speedrun` deployment
set -euo pipefail
here=$(dirname "$0")
. "$here/env.sh"
mkdir -p "$NANORUN_HOME"
bash "$here/server.sh" > "$NANORUN_HOME/prefect-server.log" 2>&1 &
server=$!
worker=""
# the processes below PID, from /proc (Linux; bash builtins only). The worker starts each flow run
# in a session of its own, so neither a terminal's Ctrl-C nor a signal to the worker reaches it.
below() {
  local stat rest pairs="" frontier=" $1 " next pair out=""
  for stat in /proc/[0-9]*/stat; do
    read -r rest < "$stat" 2>/dev/null || continue
    rest=${rest##*) }; rest=${rest#* }    # after "pid (comm) state ": ppid ...
    stat=${stat#/proc/}; pairs+="${stat%/stat}:${rest%% *} "
  done
  while [ -n "${frontier// /}" ]; do
    next=" "
    for pair in $pairs; do
      case $frontier in *" ${pair#*:} "*) next+="${pair%:*} "; out+="${pair%:*} " ;; esac
    done
    frontier=$next
  done
  echo $out
}
# stop PID and everything below it: INT (what Ctrl-C sends), up to 6 s to finish, then KILL. One
# Ctrl-C or TERM ends all of it within ~15 s, worker first (the server must outlive the worker's and
# its flow runs' last API calls). The worker alone would wait for its flow runs to finish.
stop() {
  local pid=$1 pids i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  pids="$pid $(below "$pid")"
  kill -INT $pids 2>/dev/null || true
  for i in $(seq 60); do kill -0 $pids 2>/dev/null || break; sleep 0.1; done
  kill -KILL $pids $(below "$pid") 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
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
