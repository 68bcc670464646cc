"""A tiny stage for the store/execute/CLI tests (the real stages are written elsewhere).

run() writes `n` deterministic files of `size` bytes, skipping files a previous attempt already
wrote (so a rerun after a failure shows it resumed), and appends one line per call to
`<calls_dir>/calls` so tests can count how many times the work really ran.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from stages.base import ConfigError, StageConfig, identity, runtime

NAME = "toy"
code_version = "1"
INPUTS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config(StageConfig):
    n: int = identity(3, help="number of files to write")
    size: int = identity(1000, help="bytes per file")
    seed: int = identity(0, help="changes the content")
    fail_at: int = runtime(-1, help="raise right after writing file #fail_at (tests)")
    sleep: float = runtime(0.0, help="seconds to sleep per file (tests)")
    calls_dir: str = runtime("", help="append a line per run() here (tests)")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"toy.Config.n must be >= 1, got {self.n}")
        if self.size < 0:
            raise ConfigError(f"toy.Config.size must be >= 0, got {self.size}")

    def label(self) -> str:
        return f"n{self.n}"


def content(cfg: Config, i: int) -> bytes:
    line = f"seed={cfg.seed} file={i}\n".encode()
    return (line * (cfg.size // len(line) + 1))[: cfg.size]


def run(cfg: Config, inputs: dict, out: Path) -> dict:
    if cfg.calls_dir:
        with open(Path(cfg.calls_dir) / "calls", "a") as f:
            f.write(f"{os.getpid()} {time.time()}\n")
    resumed = 0
    for i in range(cfg.n):
        p = out / f"part{i}.bin"
        if p.exists() and p.read_bytes() == content(cfg, i):
            resumed += 1
            continue
        p.write_bytes(content(cfg, i))
        if cfg.fail_at == i:
            raise RuntimeError(f"toy: failing on purpose after file {i}")
        time.sleep(cfg.sleep)
    return {"files": cfg.n, "resumed": resumed, "loss": 1.0 / (1 + cfg.seed)}
