"""A stage that "trains" by supervising a dummy subprocess through stagekit.launch.launch() (the way
the trainer stages run torchrun), for the lost-lease tests: the child prints a line every 50 ms for
`seconds` and its pid is written to `<out>/child.pid` so a test can check it is gone."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from stages.base import StageConfig, identity, runtime
from stagekit.launch import launch

NAME = "toy_trainer"
code_version = "1"
INPUTS: tuple[str, ...] = ()

CHILD = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
for i in range(int(float(sys.argv[2]) * 20)):
    print("step", i, flush=True)
    time.sleep(0.05)
"""


@dataclass(frozen=True)
class Config(StageConfig):
    seconds: float = identity(60.0, help="how long the dummy trainer runs")
    tag: str = runtime("", help="unused")


def run(cfg: Config, inputs: dict, out: Path) -> dict:
    launch([sys.executable, "-c", CHILD, str(out / "child.pid"), str(cfg.seconds)], name="toy-trainer", kill_grace=5)
    return {"seconds": cfg.seconds}
