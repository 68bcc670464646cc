"""Time to grade HumanEval's 164 canonical solutions in the sandbox (core/sandbox.py), and how many pass.

    python -m bench.humaneval_grading                 # 2 programs at a time, as chat_eval's grade_workers
    python -m bench.humaneval_grading --workers 4 --stop 40

Prints the isolation in use (bubblewrap, or python guards only) and one table row: problems,
passed, wall seconds, programs per second.
"""
from __future__ import annotations

import argparse
import time

from core import sandbox
from core.tasks.humaneval import HumanEval


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.humaneval_grading", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="programs graded at once")
    p.add_argument("--stop", type=int, default=None, help="only the first N problems")
    a = p.parse_args(argv)
    if a.workers < 1 or (a.stop is not None and a.stop < 1):
        p.error(f"--workers and --stop must be >= 1, got {a.workers} and {a.stop}")
    task = HumanEval(stop=a.stop)
    print(sandbox.describe_isolation())
    t0 = time.perf_counter()
    failed = task.canonical_failures(workers=a.workers)
    seconds = time.perf_counter() - t0
    print(f"{'problems':>8} {'passed':>6} {'workers':>7} {'seconds':>8} {'per s':>6}")
    print(f"{len(task):>8} {len(task) - len(failed):>6} {a.workers:>7} {seconds:>8.1f} {len(task) / seconds:>6.1f}")
    for task_id, reason in failed[:10]:
        print(f"  FAILED {task_id}: {reason}")


if __name__ == "__main__":
    main()
