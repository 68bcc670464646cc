#!/usr/bin/env bash
# Start a worker that runs nanorun flows on this machine (foreground). One per machine.
#   bash deploy/worker.sh                                  # CPU box: torchrun with 1 process
#   NANORUN_STORE=s3://bucket/runs bash deploy/worker.sh   # artifacts in S3 (see deploy/README.md)
# On a GPU node the flows' nproc parameter (the presets say 8) decides how many GPUs torchrun uses.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$NANORUN_REPO"
exec prefect worker start --pool "$NANORUN_POOL" --name "nanorun-$(hostname)" ${NANORUN_WORKER_ARGS:-}
