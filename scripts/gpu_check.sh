#!/usr/bin/env bash
# GPU acceptance kit: every CUDA path of core checked on one GPU, in at most 8 minutes, no network.
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
# Sizes chosen to fit 8 minutes on one H100 (bench/gpu_check.py, GPU and DRY): pytest -m gpu on small
# models (d2-d4, seq 256, <= ~1.5 min, 200 s cap); inference d12 (reference shape), prompt 512, 64
# decode tokens at batch 1/8/32 (< 0.5 min); training d12 (32 x 2048 tokens a step) and d20 (16 x 2048),
# bf16 then FP8, each 3 untimed steps (the first compiles, ~40-70 s) + 6 timed ones (4 configs <= ~4.5
# min). A config starts only if its reserve (80 s) fits before 440 s, else it is skipped with the
# reason; the hard timeout below (480 s = 8 min, NANORUN_GPU_CHECK_TIMEOUT) still gets the JSON line
# of what finished. Python: $PYTHON, else .venv/bin/python, else python3.
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
exec timeout --signal=TERM --kill-after=20 "${NANORUN_GPU_CHECK_TIMEOUT:-480}" "$PY" -m bench.gpu_check "$@"
