"""The stage contract.

A stage is a module with:

    NAME = "tokenizer"                 # also the top-level folder in the store
    code_version = "1"                 # bump by hand whenever outputs for the same config change
    INPUTS = ("data",)                 # names of the upstream artifacts run() needs
    OPTIONAL_INPUTS = ("eval_bundle",) # (optional) inputs run() uses when given; absent = not hashed
    PRESETS = {"tiny": {...}}          # (optional) named field sets: Config.from_preset("tiny", seed=1)
    def join(cfg, inputs, out): ...    # (optional) multi-node: this node's share; another node commits
    @dataclass(frozen=True)
    class Config(StageConfig):
        vocab_size: int = identity(32768, help="...")      # hashed into the fingerprint
        threads: int = runtime(2, help="...")              # recorded, never hashed
        def __post_init__(self): ...                        # validate values only (no I/O), raise ConfigError
        def resolve(self) -> "Config": ...                  # (optional) fill in content digests (I/O)
    def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:   # returns metrics
        ...

run() is a pure function of its config and its inputs: it reads only `inputs[name].path` (a local,
read-only directory holding the committed files of that upstream artifact) and writes only into
`out`. `out` is deterministic per artifact: after a failure, the rerun of the same artifact gets
the same directory back with whatever the failed attempt left there, so long stages resume from
their own checkpoints in it (and others should start by clearing what they do not trust).
The returned metrics (JSON-serialisable) go into the manifest. Stages never import prefect: they
log through `logging` (logger "nanorun.<stage>") and report progress through `progress()`; the
Prefect wrapper in flows/ forwards both to the UI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from contextvars import ContextVar
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from artifacts.manifest import ArtifactRef, CanonicalJSONError, Manifest, canonical_json
from core.train.config import type_problem


class ConfigError(ValueError):
    """A stage config value is wrong; the message says which field and what is allowed."""


def _field(kind: str, default: Any, default_factory: Any, help: str):
    kw = {"metadata": {"kind": kind, "help": help}}
    if default_factory is not MISSING:
        kw["default_factory"] = default_factory
    elif default is not MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def identity(default: Any = MISSING, *, default_factory: Any = MISSING, help: str = ""):
    """A config field that changes the artifact (hashed into the fingerprint)."""
    return _field("identity", default, default_factory, help)


def runtime(default: Any = MISSING, *, default_factory: Any = MISSING, help: str = ""):
    """A config field that does not change the artifact (recorded in the manifest only)."""
    return _field("runtime", default, default_factory, help)


class StageConfig:
    """Mixin for a stage's frozen Config dataclass: every field must be identity() or runtime()."""

    def _split(self) -> tuple[dict, dict]:
        ident, rt = {}, {}
        for f in dataclasses.fields(self):
            kind = f.metadata.get("kind")
            if kind not in ("identity", "runtime"):
                raise TypeError(
                    f"{type(self).__qualname__}.{f.name} is neither identity() nor runtime(): "
                    "every stage config field must say whether it changes the artifact"
                )
            (ident if kind == "identity" else rt)[f.name] = getattr(self, f.name)
        return ident, rt

    def identity_dict(self) -> dict:
        ident = self._split()[0]
        canonical_json(ident)  # refuse non-deterministic values early, with the field named
        return ident

    def runtime_dict(self) -> dict:
        return self._split()[1]

    def label(self) -> str:
        """Human-readable part of the artifact name; must be a function of identity fields."""
        return "default"

    def resolve(self) -> "StageConfig":
        """This config with what it reads from outside filled in: content digests of local files,
        listings of a data source. `__post_init__` only validates values (a config is a value, cheap
        to rebuild anywhere); the plan builder calls resolve() once per step, and execute() calls
        it again as a safety net, where a resolved config returns itself without any I/O. Stages
        whose identity depends on outside content override it."""
        return self

    @classmethod
    def field_help(cls) -> dict[str, tuple[str, str]]:
        return {f.name: (f.metadata.get("kind", "?"), f.metadata.get("help", "")) for f in dataclasses.fields(cls)}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "StageConfig":
        """The resolved config of the stage's preset `name` (its module's PRESETS) plus overrides."""
        presets = stage_presets(sys.modules[cls.__module__])
        if name not in presets:
            raise ConfigError(f"stage {cls.__module__.rpartition('.')[2]} has no preset {name!r} "
                              f"(presets: {', '.join(presets) or 'none'})")
        return cls.from_dict({**presets[name], **overrides}).resolve()

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        """Build from a (possibly partial) dict; unknown keys are an error naming the valid ones."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        types = {name: str(f.type) for name, f in fields.items()}
        unknown = sorted(set(d) - set(types))
        stage = cls.__module__.rpartition(".")[2]
        if unknown:
            raise ConfigError(f"{cls.__module__}.Config: unknown field(s) {unknown}; valid: {sorted(types)}")
        # Values come from --set, JSON plans and flow parameters: each has its field's type and a
        # canonical JSON form (no NaN anywhere in it) before __post_init__ looks at it.
        for name, value in d.items():
            if value is None and fields[name].default is None:
                continue  # a field whose default is None ("computed when resolved") may be given as null
            problem = type_problem(name, value, types[name])
            if problem is None:
                try:
                    canonical_json(value)
                except CanonicalJSONError as e:
                    problem = f"{name}={value!r}: {str(e).partition(': ')[2] or e}"
            if problem and types[name] == "str" and not isinstance(value, str):
                problem += f" (a value that parses as JSON is taken as JSON: quote a string, {name}='\"{value}\"')"
            if problem:
                raise ConfigError(f"{stage}.{problem}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{cls.__module__}.Config: {e}") from e


@dataclass(frozen=True)
class Input:
    """An upstream artifact as seen by run(): committed, verified and present on local disk."""

    ref: ArtifactRef
    path: Path
    manifest: Manifest

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics


class StageModule(Protocol):
    """What callers use of a stage module; pipeline.execute.load_stage() checks it. Optional, with
    these defaults when absent: OPTIONAL_INPUTS = (), PRESETS = {} (name -> Config fields, used by
    Config.from_preset), join (multi-node: this node's share of a build another node commits)."""

    NAME: str
    code_version: str
    INPUTS: tuple[str, ...]
    Config: type  # a frozen dataclass subclassing StageConfig

    def run(self, cfg: Any, inputs: dict[str, Input], out: Path) -> dict: ...


def optional_inputs(mod) -> tuple[str, ...]:
    return tuple(getattr(mod, "OPTIONAL_INPUTS", ()))


def stage_presets(mod) -> dict[str, dict]:
    return dict(getattr(mod, "PRESETS", {}))


# ---- progress reporting ------------------------------------------------------------------------
# A stage calls progress(step, total, ...) from its main thread; whoever executes the stage (the CLI
# progress bar, the Prefect progress artifact) installs a reporter with report_progress_to().
ProgressFn = Callable[[int, int, dict], None]
_reporter: ContextVar[ProgressFn | None] = ContextVar("nanorun_progress", default=None)


def progress(step: int, total: int, **info: Any) -> None:
    fn = _reporter.get()
    if fn is not None:
        try:
            fn(step, total, info)
        except Exception:  # a broken reporter must never kill a training run
            logging.getLogger("nanorun").debug("progress reporter failed", exc_info=True)


def report_progress_to(fn: ProgressFn):
    return _bound(_reporter, fn)


@contextlib.contextmanager
def _bound(var: ContextVar, value: Any):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


# ---- checkpoint mirror ---------------------------------------------------------------------------
# While execute() runs a stage whose work dir the store cannot see (an S3 store's is machine-local),
# it binds the store's staging area for that artifact (artifacts/staging.CheckpointStaging); a
# long stage uploads its checkpoints there and, on a machine without its work dir, resumes from
# them (stagekit/checkpoint_sync.py). None otherwise: a stage never gets the store itself.
_mirror: ContextVar[Any] = ContextVar("nanorun_checkpoint_mirror", default=None)


def checkpoint_mirror():
    return _mirror.get()


def mirror_checkpoints_to(staging):
    return _bound(_mirror, staging)


# ---- URL sources: trust on first use -------------------------------------------------------------
# While execute() runs a stage it binds the store's record of URL sources (artifacts/source_pins.py);
# stagekit/fetch.py checks each download against it. None outside execute() (a bare fetch checks nothing).
_pins: ContextVar[Any] = ContextVar("nanorun_source_pins", default=None)


def source_pins():
    return _pins.get()


def pin_sources_to(pins):
    return _bound(_pins, pins)


def stage_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"nanorun.{name}")
