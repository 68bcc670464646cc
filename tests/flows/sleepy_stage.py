"""A stage whose "trainer" runs until it is stopped: the signal tests' stand-in for pretraining.

run() launches, through stagekit.launch like the trainer stages, a Python child that starts a
grandchild (torchrun's workers), writes both pids to `pid_file` and sleeps; with ignore_term the
child ignores SIGTERM, so only the launcher's KILL after the grace period stops it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from stages.base import StageConfig, identity, runtime

NAME = "sleepy"
code_version = "1"
INPUTS: tuple[str, ...] = ()

CHILD = """
import os, signal, subprocess, sys, time
if {ignore_term}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open({pid_file!r} + ".tmp", "w") as f:
    f.write(f"{{os.getpid()}} {{worker.pid}}")
os.replace({pid_file!r} + ".tmp", {pid_file!r})
print("training", flush=True)
time.sleep({seconds})
"""


@dataclass(frozen=True)
class Config(StageConfig):
    seconds: int = identity(600, help="how long the trainer would run")
    pid_file: str = runtime("", help="where the trainer writes its pid and its worker's")
    ignore_term: bool = runtime(False, help="the trainer ignores SIGTERM (only KILL stops it)")


def run(cfg: Config, inputs: dict, out: Path) -> dict:
    from stagekit.launch import launch

    launch([sys.executable, "-c", CHILD.format(ignore_term=cfg.ignore_term, pid_file=cfg.pid_file,
                                                  seconds=cfg.seconds)],
           log_path=out / "train.log", name="sleepy")
    return {}
