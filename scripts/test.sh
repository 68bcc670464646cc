#!/usr/bin/env bash
# Set up (scripts/install.sh, plus Debian's chromium for the browser tests and bubblewrap for the
# code sandbox) and run the whole test suite, slow end-to-end tests included. The README's test
# command; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# debian COMMAND PACKAGE WITHOUT: install PACKAGE when COMMAND is missing (root + apt), else say
# what running without it means
debian() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian $2"
    (apt-get install -y -q "$2" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q "$2" >/dev/null; }) && return 0
  fi
  echo "[test] $1 is missing and could not be installed (needs root + apt): $3" >&2
}
debian chromium chromium "the browser tests will fail"
# bubblewrap isolates the programs HumanEval grading runs (core/sandbox.py, docs/sandbox.md)
debian bwrap bubblewrap "the code sandbox has its python guards only (it says so)"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export WANDB_MODE=disabled
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # for pytest's own torch too (core/openmp.py)
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"
