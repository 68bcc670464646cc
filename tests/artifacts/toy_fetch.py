"""A stage whose identity holds a URL (like data_shards.source / eval_bundle.url), for the
credential-redaction tests: run() logs the URL and returns it as a metric."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stages.base import StageConfig, identity, runtime

NAME = "toy_fetch"
code_version = "1"
INPUTS: tuple[str, ...] = ()
log = logging.getLogger("nanorun.toy_fetch")


@dataclass(frozen=True)
class Config(StageConfig):
    url: str = identity("https://example.invalid/data.parquet", help="where the data comes from")
    mirror: str = runtime("", help="another URL, not part of the identity")


def run(cfg: Config, inputs: dict, out: Path) -> dict:
    log.info("fetching %s (mirror %s)", cfg.url, cfg.mirror)
    (out / "data.txt").write_text("data\n")
    return {"source": cfg.url}
