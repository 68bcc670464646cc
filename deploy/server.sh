#!/usr/bin/env bash
# Start the Prefect server on loopback (foreground; Ctrl-C stops it). UI: http://127.0.0.1:4200
#   bash deploy/server.sh                      # PREFECT_HOST=0.0.0.0 to expose it (put auth in front)
set -euo pipefail
. "$(dirname "$0")/env.sh"
exec prefect server start --host "$PREFECT_HOST" --port "$PREFECT_PORT"
