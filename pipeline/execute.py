"""Run a stage as a cached, leased, committed artifact: lookup -> lease -> run in staging -> commit.

    from pipeline.execute import execute, execute_step
    m = execute("tokenizer", cfg, {"data": shards_ref}, store)       # Manifest (cache hit or built)
    m = execute_step(plan_step, {"data": shards_ref}, store)          # a step of a compiled Plan (pipeline/plan.py)

No Prefect here (flows/ wraps the same calls): the store is the only source of truth. A cache hit
is a committed manifest whose files match it (size and sha256); anything else is (re)built. The work dir
is the same on every attempt, so a stage that failed half-way resumes from what it left there.
execute_step() is the one place a stage Config is rebuilt from a plan's data; the plan itself
(Steps compiled once, the dry-run table, the walker) is pipeline/plan.py. `stage` is a registered
stage name (stages.registry.STAGE_MODULES); nothing else is imported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from artifacts.code import stage_code_identity
from artifacts.errors import StoreError
from artifacts.lease import DEFAULT_TTL, Lease, building, live_holder
from artifacts.manifest import ArtifactRef, CorruptManifestError, Manifest, fingerprint
from artifacts.provenance import collect as collect_provenance
from artifacts.staging import checkpoint_staging
from artifacts.source_pins import SourcePins
from stages.registry import STAGE_MODULES, get_stage
from stages.base import ConfigError, Input, StageConfig, optional_inputs, mirror_checkpoints_to, pin_sources_to

log = logging.getLogger("nanorun.execute")

POLL_SECONDS = 2.0  # how often a waiter re-checks another builder's lease / commit
EventFn = Callable[[str, dict], None]  # on_event(kind, info): cached | waiting | running | committed | failed


class PlanError(StoreError):
    """A pipeline description is inconsistent (unknown step, bad input, duplicate name)."""


def load_stage(stage: str | ModuleType) -> ModuleType:
    """A stage module from a module object or a registered name (stages/registry.py STAGE_MODULES)."""
    if isinstance(stage, ModuleType):
        mod = stage
    elif isinstance(stage, str) and stage in STAGE_MODULES:
        mod = get_stage(stage)
    else:  # never import a module a plan file or a flow parameter names: importing runs its code
        raise PlanError(f"unknown stage {stage!r}; known stages: {', '.join(STAGE_MODULES)} "
                        "(a stage is importable by name only once registered in stages.registry.STAGE_MODULES)")
    missing = [a for a in ("NAME", "code_version", "INPUTS", "Config", "run") if not hasattr(mod, a)]
    if missing:
        raise PlanError(f"{mod.__name__} is not a stage module: it lacks {', '.join(missing)} (see stages/base.py)")
    problems = []
    if not (isinstance(mod.Config, type) and issubclass(mod.Config, StageConfig) and dataclasses.is_dataclass(mod.Config)):
        problems.append("Config must be a dataclass subclassing stages.base.StageConfig")
    for attr in ("INPUTS", "OPTIONAL_INPUTS"):
        value = getattr(mod, attr, ())
        if not isinstance(value, tuple) or not all(isinstance(x, str) for x in value):
            problems.append(f"{attr} must be a tuple of input names")
    presets = getattr(mod, "PRESETS", {})
    if not isinstance(presets, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in presets.items()):
        problems.append("PRESETS must map preset names to dicts of Config fields")
    for fn in ("run", "join"):
        if hasattr(mod, fn) and not callable(getattr(mod, fn)):
            problems.append(f"{fn} must be a function")
    if problems:
        raise PlanError(f"{mod.__name__} breaks the stage contract (stages/base.py): {'; '.join(problems)}")
    return mod


def artifact_ref(stage: str | ModuleType, cfg, inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    """Where the artifact for (stage, cfg, inputs) lives; computed without touching any store."""
    mod = load_stage(stage)
    check_call(mod, cfg, inputs)
    cfg = cfg.resolve()
    fp = fingerprint(mod.NAME, code_version(mod), cfg.identity_dict(),
                     {name: ref.fingerprint for name, ref in sorted(inputs.items())})
    return ArtifactRef(mod.NAME, cfg.label(), fp)


def code_version(mod: ModuleType) -> str:
    """The stage's manual code_version + the digest of the code that runs for it + numeric dependency
    versions (artifacts/code.py): what fingerprints hash and manifests record."""
    return stage_code_identity(mod).version(mod.code_version)


def check_call(mod: ModuleType, cfg, inputs: dict) -> None:
    if not isinstance(cfg, mod.Config):
        raise ConfigError(f"{mod.NAME}: config must be a {mod.__name__}.Config, got {type(cfg).__name__}")
    required, given = set(mod.INPUTS), set(inputs)
    optional = set(optional_inputs(mod))
    if not required <= given <= required | optional:
        parts = []
        if required - given:
            parts.append(f"missing {sorted(required - given)}")
        if given - required - optional:
            parts.append(f"unexpected {sorted(given - required - optional)}")
        takes = sorted(required) or "none"
        raise ConfigError(f"{mod.NAME}: inputs {', '.join(parts)}; the stage takes {takes}"
                          + (f" (optional: {sorted(optional)})" if optional else ""))
    for name, ref in inputs.items():
        if not isinstance(ref, ArtifactRef):
            raise ConfigError(f"{mod.NAME}: input {name!r} must be an ArtifactRef, got {type(ref).__name__}")


def _cached(store, ref: ArtifactRef) -> Manifest | None:
    """The committed manifest at ref if its files match it (size and sha256; unchanged files checked
    before are not rehashed), else None (with a warning when something is there but damaged: it
    will be rebuilt and replaced)."""
    try:
        v = store.verify(ref, recheck=False)
    except CorruptManifestError as e:
        log.warning("%s: %s; rebuilding", ref, e)
        return None
    if v.ok:
        return v.manifest
    if v.manifest is not None:
        log.warning("%s: committed but damaged (%s); rebuilding", ref, "; ".join(v.problems))
    elif any("corrupt" in p for p in v.problems):
        log.warning("%s: %s; rebuilding", ref, v.problems[0])
    return None


def status(stage, cfg, inputs: dict[str, ArtifactRef], store) -> tuple[str, ArtifactRef]:
    """("cached" | "run" | "locked", ref) without running anything."""
    ref = artifact_ref(stage, cfg, inputs)
    return stage_status(store, ref)[0], ref


def stage_status(store, ref: ArtifactRef):
    """("cached" | "run" | "locked", the lease holder when locked) of an artifact ref."""
    if _cached(store, ref) is not None:
        return "cached", None
    holder = live_holder(store, ref)
    return ("locked", holder) if holder else ("run", None)


def execute(stage, cfg, inputs: dict[str, ArtifactRef], store, *, force: bool = False,
            on_event: EventFn | None = None, lease_ttl: float | None = None) -> Manifest:
    """Return the committed artifact for (stage, cfg, inputs), building it if needed.

    force=True rebuilds from an empty work dir and replaces the committed artifact. If another
    process is building the same artifact, waits for it and returns its result (or builds it if
    that builder fails)."""
    mod = load_stage(stage)
    check_call(mod, cfg, inputs)
    cfg = cfg.resolve()  # once: what the fingerprint hashes, run() sees and the manifest records
    ref = artifact_ref(mod, cfg, inputs)

    def emit(kind: str, **info):
        if on_event is not None:
            on_event(kind, {"ref": ref, **info})

    if not force and (m := _cached(store, ref)) is not None:
        log.info("cache hit %s (%s, %d files)", ref, _size(m.total_bytes), len(m.files))
        emit("cached", manifest=m)
        return m
    lease = Lease(store, ref, ttl=lease_ttl, inputs=list(inputs.values()))
    waited_since = None
    while not lease.try_acquire():
        if waited_since is None:
            waited_since = time.time()
            log.info("waiting for %s: being built by %s", ref, lease.holder.describe())
            emit("waiting", owner=lease.holder.describe())
        time.sleep(min(POLL_SECONDS, (lease_ttl or DEFAULT_TTL) / 4))
        if not force and (m := _cached(store, ref)) is not None:
            log.info("cache hit %s after waiting %.0fs (built by the other run)", ref, time.time() - waited_since)
            emit("cached", manifest=m, waited_s=time.time() - waited_since)
            return m
    with lease:
        if not force and (m := _cached(store, ref)) is not None:  # committed while we took the lease
            if waited_since is not None:
                log.info("cache hit %s after waiting %.0fs (built by the other run)", ref, time.time() - waited_since)
            emit("cached", manifest=m, **({"waited_s": time.time() - waited_since} if waited_since else {}))
            return m
        work = store.work_dir(ref, clear=force)
        staging = checkpoint_staging(store, ref, work, clear=force)  # None unless the store cannot see work
        leftovers = any(work.iterdir())
        upstream = _materialize(store, inputs)
        log.info("running %s in %s%s", ref, work, " (resuming: the work dir holds a previous attempt)" if leftovers else "")
        emit("running", work_dir=work, resumed=leftovers)
        start = time.time()
        try:
            # building(): launch() kills the trainer if the lease is lost (another builder took the work over)
            pins = SourcePins(store)  # URL sources: the first fetch's sha256 recorded, later ones enforced
            with mirror_checkpoints_to(staging), pin_sources_to(pins), building(lease):
                metrics = _plain_metrics(mod.NAME, mod.run(cfg, upstream, work))
            end = time.time()
            code = stage_code_identity(mod)
            manifest = Manifest(stage=mod.NAME, label=ref.label, fingerprint=ref.fingerprint,
                                code_version=code.version(mod.code_version), identity=cfg.identity_dict(),
                                runtime=cfg.runtime_dict(), inputs=dict(inputs), files=[], metrics=metrics,
                                provenance=collect_provenance(start, end, {
                                    "resumed": leftovers, "code_modules": code.modules,
                                    **({"url_sources": pins.seen} if pins.seen else {})}))
            lease.check()
            m = store.commit(ref, work, manifest)
            if staging is not None:
                staging.discard()
        except BaseException as e:
            log.error("failed %s after %.1fs: %s: %s (work dir kept for the rerun: %s)", ref,
                      time.time() - start, type(e).__name__, e, work)
            emit("failed", error=e, seconds=time.time() - start, work_dir=work)
            raise
    secs = time.time() - start
    log.info("committed %s: %d files, %s in %.1fs -> %s", ref, len(m.files), _size(m.total_bytes), secs, store.url)
    emit("committed", manifest=m, seconds=secs)
    return m


def execute_step(step, inputs: dict[str, ArtifactRef], store, *, as_planned: bool = True, force: bool = False, on_event: EventFn | None = None, lease_ttl: float | None = None) -> Manifest:
    """execute() for one step of a compiled Plan (pipeline/plan.py PlanStep): its Config is built here
    from the plan's data, the only rebuild after the plan was compiled (resolved fields are taken as
    they are: no digest or listing again). as_planned: `inputs` are the ones the plan wired (not so
    when an optional input was left out); then the artifact must be the one the plan named, and a
    different one means the code changed since the plan was compiled."""
    mod = load_stage(step.stage)
    cfg = config_from_plan(mod, step.config, step.name)
    if as_planned:
        ref = artifact_ref(mod, cfg, inputs)
        if ref != step.ref:
            raise PlanError(f"step {step.name!r}: the plan names {step.ref} but this code builds {ref}: the code "
                            "changed since the plan was compiled; plan the run again")
    return execute(mod, cfg, inputs, store, force=force, on_event=on_event, lease_ttl=lease_ttl)


def config_from_plan(mod: ModuleType, config: dict, step: str = ""):
    """A stage Config from the fields a plan carries (credentials sealed in flow parameters are unsealed)."""
    from artifacts.redact import unseal

    try:
        return mod.Config.from_dict(unseal(dict(config)))
    except ConfigError as e:
        raise ConfigError(f"step {step!r}: {e}" if step else str(e)) from None


def _materialize(store, inputs: dict[str, ArtifactRef]) -> dict[str, Input]:
    """Upstream artifacts as run() sees them: committed, verified, on local disk."""
    return {name: Input(r, store.materialize(r), store.require(r)) for name, r in sorted(inputs.items())}


def join(stage, cfg, inputs: dict[str, ArtifactRef], store) -> ArtifactRef:
    """Take part in another node's build of the same artifact (multi-node training).

    Runs the stage's join() in the artifact's work dir with no lease and no commit: the node that
    runs execute() for the same config holds the lease and commits once every node is done. The
    work dir must be on storage all nodes share (the ranks write checkpoints into it)."""
    mod = load_stage(stage)
    if not hasattr(mod, "join"):
        raise ConfigError(f"{mod.NAME} does not run across nodes (it has no join()); run it on one node")
    ref = artifact_ref(mod, cfg, inputs)
    work = store.work_dir(ref)
    log.info("joining the build of %s in %s", ref, work)
    start = time.time()
    mod.join(cfg, _materialize(store, inputs), work)
    log.info("done with %s after %.1fs (the node running the stage commits it)", ref, time.time() - start)
    return ref


def _plain(v: Any) -> Any:
    # Stages naturally return numpy/torch scalars (loss.item() forgotten); failing on them after
    # hours of training would be absurd, so convert what has an obvious plain value.
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 and not isinstance(v, (str, bytes)):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _plain_metrics(stage: str, metrics: Any) -> dict:
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, dict):
        raise TypeError(f"{stage}.run() must return a dict of metrics, got {type(metrics).__name__}")
    metrics = _plain(metrics)
    try:
        json.dumps(metrics)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{stage}.run() returned metrics that are not JSON-serialisable: {e}") from None
    return metrics


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
