"""How idle OpenMP threads wait, for CPU processes. Torch-free on purpose: OpenMP reads these
variables once, when torch loads, so they must be in the environment before that (the launcher
sets them for the trainers, the CLI for its own process and the in-process stages).

    env.update(wait_env(env))   # before starting a CPU worker

The default is OMP_WAIT_POLICY=PASSIVE: idle threads sleep at once. Measured on the 2-core box
(tok/s; the real d4 trainer through bench/pretrain_path.py on a quiet machine, and the cpu-demo
shape's training step while the test suite and a speedrun ran beside it, load 4-5):

    policy                          quiet fp32   quiet bf16   busy bf16 (cpu-demo shape)
    OMP_WAIT_POLICY=PASSIVE         3,514        6,904        4,962 / 5,750
    GOMP_SPINCOUNT=20000            3,988        9,247          819 / 1,338
    libgomp default (300k spins)    -            -            63 s per bf16 step (seen once)

Spinning wins 13-34% on a machine the trainer has to itself and loses 4-6x as soon as anything
else wants the cores (each small matmul's team waits for a thread whose core a spinner holds).
The loss is far worse than the gain, so PASSIVE is the default; on a dedicated machine set
GOMP_SPINCOUNT=20000 (or OMP_WAIT_POLICY) yourself: a wait policy in the environment always wins.
"""
from __future__ import annotations

from collections.abc import Mapping


def wait_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` (empty when the user already chose a wait policy)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}
