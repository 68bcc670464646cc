#!/usr/bin/env bash
# Install nanorun into a virtualenv: the CPU torch wheel first, then the locked rest, then the
# project itself (editable). Used by the README, CI and developers alike.
#
#   bash scripts/install.sh            # .venv with the dev + demo extras (everything CI needs)
#   NANORUN_VENV=/opt/nr bash scripts/install.sh
#   NANORUN_TORCH=skip bash scripts/install.sh   # use the system's torch (GPU image; venv with system site packages)
#   NANORUN_GPU=1 bash scripts/install.sh        # also flash-attn: scripts/gpu_wheels/*.whl offline, else a build
#
# Why torch first: a bare torch requirement resolved with nothing installed pulls a multi-GB CUDA
# build. `pip install torch==2.13.0` takes the CPU wheel that pip's find-links point at (see
# docs/versions.md#installing); the lock file leaves torch out so that it never overrides this choice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NANORUN_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${NANORUN_TORCH:-torch==2.13.0}

# NANORUN_TORCH=skip: the venv sees the system's packages, so the image's CUDA torch (and triton,
# flash-attn) is the one used; nothing below installs another torch over it.
VENV_ARGS=()
[ "$TORCH_SPEC" = "skip" ] && VENV_ARGS+=(--system-site-packages)
[ -x "$VENV/bin/python" ] || "$PY" -m venv ${VENV_ARGS[@]+"${VENV_ARGS[@]}"} "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q "uv==0.13.9"

if [ "$TORCH_SPEC" != "skip" ] && [ -z "${NANORUN_TORCH:-}" ] \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  # a CUDA build is already there (a GPU node): never replace it with the CPU wheel unasked
  echo "[install] keeping the CUDA build of torch $(python -c 'import torch; print(torch.__version__)') (NANORUN_TORCH=torch==X replaces it)"
  TORCH_SPEC=skip
fi
if [ "$TORCH_SPEC" != "skip" ]; then
  if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_SPEC#torch==}' else 1)" 2>/dev/null; then
    echo "[install] $TORCH_SPEC (CPU wheel from pip's find-links when present)"
    python -m pip install -q "$TORCH_SPEC"
  fi
fi

# uv does not read pip's configuration: hand it the same find-links so it sees local wheels.
FIND_LINKS=${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}
if [ -n "$FIND_LINKS" ] && [ -d "$FIND_LINKS" ]; then export UV_FIND_LINKS="$FIND_LINKS"; fi
echo "[install] locked dependencies (requirements.lock)"
uv pip install -q -r requirements.lock
uv pip install -q --no-deps -e .
if [ "${NANORUN_GPU:-0}" = "1" ]; then
  # Wheels carried to the node (scripts/gpu_wheels/, offline) first; else a source build of flash-attn
  # (needs CUDA torch, nvcc and network). Neither is required: core falls back to PyTorch SDPA, and
  # scripts/gpu_wheels/README.md says why no flash backend fits an offline node today.
  shopt -s nullglob
  wheels=(scripts/gpu_wheels/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "[install] gpu wheels from scripts/gpu_wheels/ (offline): ${wheels[*]##*/}"
    python -m pip install --no-index --find-links scripts/gpu_wheels "${wheels[@]}"
  elif ! python -m pip install --no-build-isolation "flash-attn>=2.6"; then
    echo "[install] flash-attn could not be built here: core uses PyTorch SDPA (scripts/gpu_wheels/README.md)" >&2
  fi
fi
python -c "import torch, core, stages, artifacts, flows, core.attention as a; print('[install] ok: torch', torch.__version__, '| cuda', torch.version.cuda, '| attention:', a.describe_backend())"
