#!/usr/bin/env bash
# Set up (scripts/install.sh) and run the CPU demo speedrun on the offline default data: PyPI's
# chitchat corpus (the `demo` extra), a d4 model, minutes on 2 cores. Artifacts go to the store
# ($NANORUN_STORE, else $NANORUN_HOME, else ~/.cache/nanorun); rerunning skips what is committed.
#   bash scripts/speedrun.sh [extra `nanorun speedrun` flags, e.g. --set base.num_iterations=100]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_MODE=${WANDB_MODE:-offline}
args=(--preset cpu-demo)
# Offline machines: the CORE bundle (and SFT's identity/GSM8K data) from ../shared/data when it is
# there, through ./nanorun.toml (written once, kept after), which later `nanorun` commands and the
# deployments read too; otherwise the bundle is downloaded from its public URL.
.venv/bin/nanorun config --init
exec .venv/bin/nanorun speedrun "${args[@]}" "$@"
