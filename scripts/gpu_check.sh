#!/usr/bin/env bash
# GPU acceptance kit: every CUDA path of core checked on one GPU, in at most 9 minutes, no network.
#
#   bash scripts/gpu_check.sh                  # on one H100/H200; the last line of stdout is one JSON object
#   bash scripts/gpu_check.sh --cpu-dry-run    # tiny sizes on CPU, CUDA-only parts skipped (CI runs this)
#   bash scripts/gpu_check.sh --only train --depths 12     # a part (see `python -m bench.gpu_check --help`)
#   bash scripts/gpu_check.sh | tail -1 | jq '.train'
#
# What it needs is what a GPU node has: Python 3.12, a CUDA build of torch (2.11 on the reference
# image), numpy, pyarrow, tokenizers, safetensors, triton, pytest. Nothing else is used (prefect,
# duckdb, boto3, wandb are blocked from import, as they are absent there). Anything missing that a
# wheel in scripts/gpu_wheels/ provides is installed from that folder only (pip --no-index), e.g.
# flash-attn built for the node's CUDA.
#
# Sections, the user's path first (bench/gpu_check.py): the budget plan, (a) pytest -m gpu, (b) the
# pretrain trainer under torchrun with SIGTERM + exact resume, (c) one SFT + one RL step, then if the
# plan says they fit (d) throughput d12/d20 bf16 and FP8 and (e) inference. The hard timeout below
# (560 s, NANORUN_GPU_CHECK_TIMEOUT) still gets the JSON line of what finished. Flash attention: see
# scripts/gpu_wheels/README.md. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

WHEELS=scripts/gpu_wheels
shopt -s nullglob
for whl in "$WHEELS"/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1)
  if ! "$PY" -m pip show "$dist" >/dev/null 2>&1; then
    echo "[gpu-check] installing vendored $(basename "$whl") (offline)"
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$whl" \
      || echo "[gpu-check] could not install $(basename "$whl"); continuing without it" >&2
  fi
done

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ("torch", "numpy", "pyarrow", "tokenizers", "safetensors", "pytest")
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "[gpu-check] $PY lacks: $missing (put their wheels in $WHEELS/ or install them)" >&2
  exit 2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export WANDB_MODE=disabled
exec timeout --signal=TERM --kill-after=20 "${NANORUN_GPU_CHECK_TIMEOUT:-560}" "$PY" -m bench.gpu_check "$@"
