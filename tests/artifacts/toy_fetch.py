"""A stage whose identity holds a URL (like data_shards.source / eval_bundle.url), for the
credential-redaction tests: run() logs the URL, returns it as a metric and writes its sha256 (so a
test can tell that the stage saw the URL with its credentials); with `download` it fetches the URL."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from stages.base import StageConfig, identity, runtime
from stagekit.fetch import fetch

NAME = "toy_fetch"
code_version = "1"
INPUTS: tuple[str, ...] = ()
log = logging.getLogger("nanorun.toy_fetch")


@dataclass(frozen=True)
class Config(StageConfig):
    url: str = identity("https://example.invalid/data.parquet", help="where the data comes from")
    mirror: str = runtime("", help="another URL, not part of the identity")
    download: bool = identity(False, help="really fetch url into data.bin (stagekit/fetch.py)")
    sha256: str = identity("", help="the content's sha256, when the config pins it")


def run(cfg: Config, inputs: dict, out: Path) -> dict:
    log.info("fetching %s (mirror %s)", cfg.url, cfg.mirror)
    (out / "data.txt").write_text(hashlib.sha256(cfg.url.encode()).hexdigest() + "\n")
    if cfg.download:
        fetch(cfg.url, out / "data.bin", sha256=cfg.sha256 or None, retries=1)
    return {"source": cfg.url}
