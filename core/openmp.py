"""How idle OpenMP threads wait, for CPU processes. Torch-free on purpose: OpenMP reads these
variables once, when torch loads, so they must be in the environment before that (the launcher
sets them for the trainers, the CLI for its own process and the in-process stages).

    env.update(wait_env(env))   # before starting a CPU worker

Measured on the 2-core box (the d4 cpu-demo trainer, bench/pretrain_path.py, 20 steps; tok/s):

    policy                         fp32    bf16   with two busy processes beside it (step only)
    libgomp default (300k spins)   -       -      2,622 bf16: idle threads burn the cores others need
    OMP_WAIT_POLICY=PASSIVE        3,514   6,904  5,096 bf16: no spinning at all
    GOMP_SPINCOUNT=20000           3,988   9,247  3,823 bf16

With the default policy the issue-13 bf16 run took 63 s per step while anything else ran. PASSIVE
removes that, but every parallel region then pays a futex wake-up: -13% fp32, -34% bf16 on a quiet
machine. A short bounded spin (libgomp's GOMP_SPINCOUNT; about a millisecond) keeps the quiet-machine
speed and degrades gracefully under contention. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
"""
from __future__ import annotations

from collections.abc import Mapping

SPIN_COUNT = "20000"


def wait_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` (empty when the user already chose a wait policy)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}
