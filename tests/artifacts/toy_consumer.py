"""A tiny downstream stage: reads the toy stage's files through its Input and sums their sizes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stages.base import StageConfig, identity

NAME = "toy_sum"
code_version = "1"
INPUTS = ("src",)


@dataclass(frozen=True)
class Config(StageConfig):
    scale: int = identity(1, help="multiplies the total")


def run(cfg: Config, inputs: dict, out: Path) -> dict:
    src = inputs["src"]
    total = sum((src.path / f.path).stat().st_size for f in src.manifest.files) * cfg.scale
    (out / "sum.json").write_text(json.dumps({"total": total, "from": str(src.ref)}))
    return {"total": total}
