#!/usr/bin/env bash
# Create the work pool (if missing) and register every deployment of prefect.yaml with the server
# at PREFECT_API_URL. Run after server.sh is up, from any directory.
#   bash deploy/deploy.sh
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$NANORUN_REPO"
for _ in $(seq 60); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "no Prefect server at $PREFECT_API_URL (start deploy/server.sh)" >&2; exit 1; }
prefect work-pool inspect "$NANORUN_POOL" >/dev/null 2>&1 || prefect work-pool create "$NANORUN_POOL" --type process
prefect --no-prompt deploy --all
