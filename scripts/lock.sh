#!/usr/bin/env bash
# Re-resolve requirements.lock from pyproject.toml (run after changing dependencies).
# torch is left out of the lock (scripts/install.sh installs it first); the override pins the CPU
# build so that torch's own dependencies are the CPU ones (no nvidia-* packages).
set -euo pipefail
cd "$(dirname "$0")/.."
. "${NANORUN_VENV:-.venv}/bin/activate"
uv pip compile pyproject.toml --extra dev --extra demo --python-version 3.11 \
  --find-links "${PIP_FIND_LINKS:-/opt/wheels}" --override scripts/lock-overrides.txt \
  --no-emit-package torch --no-header -o requirements.lock
