"""Run a stage as a cached, leased, committed artifact: lookup -> lease -> run in staging -> commit.

    from pipeline.execute import execute, plan, format_plan, run_pipeline, Step
    m = execute("tokenizer", cfg, {"data": shards_ref}, store)       # Manifest (cache hit or built)
    steps = [Step("shards", "data_shards", shards_cfg),
             Step("tok", "tokenizer", tok_cfg, {"data": "shards"})]   # a str input names an earlier step
    print(format_plan(plan(steps, store)))                              # cached / will run / locked
    results = run_pipeline(steps, store)                                # {step name: Manifest}
    outcomes = walk(steps, run_step)      # the walker both runners share: a failure stops only its dependents

No Prefect here (flows/ wraps the same calls): the store is the only source of truth. A cache hit
is a committed manifest whose files match it (size and sha256); anything else is (re)built. The work dir
is the same on every attempt, so a stage that failed half-way resumes from what it left there.
Plan files for `nanorun plan FILE` (JSON or YAML):
    steps:
      - {name: shards, stage: data_shards, config: {num_shards: 2}}
      - {name: tok, stage: tokenizer, config: {vocab_size: 4096}, inputs: {data: shards}}
An input is an earlier step's name or any ref the store resolves (`stage@alias`, a fingerprint
prefix). `stage` is a registered stage name (stages.STAGE_MODULES); nothing else is imported.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from artifacts.code import stage_code_identity
from artifacts.errors import StoreError
from artifacts.lease import DEFAULT_TTL, Lease, building, live_holder, pinned
from artifacts.manifest import ArtifactRef, CorruptManifestError, Manifest, fingerprint
from artifacts.provenance import collect as collect_provenance
from artifacts.staging import checkpoint_staging
from stages import STAGE_MODULES, get_stage
from artifacts.source_pins import SourcePins
from stages.base import ConfigError, Input, StageConfig, optional_inputs, mirror_checkpoints_to, pin_sources_to

log = logging.getLogger("nanorun.execute")

POLL_SECONDS = 2.0  # how often a waiter re-checks another builder's lease / commit
EventFn = Callable[[str, dict], None]  # on_event(kind, info): cached | waiting | running | committed | failed


class PlanError(StoreError):
    """A pipeline description is inconsistent (unknown step, bad input, duplicate name)."""


def load_stage(stage: str | ModuleType) -> ModuleType:
    """A stage module from a module object or a registered name (stages/__init__.py STAGE_MODULES)."""
    if isinstance(stage, ModuleType):
        mod = stage
    elif isinstance(stage, str) and stage in STAGE_MODULES:
        mod = get_stage(stage)
    else:  # never import a module a plan file or a flow parameter names: importing runs its code
        raise PlanError(f"unknown stage {stage!r}; known stages: {', '.join(STAGE_MODULES)} "
                        "(a stage is importable by name only once registered in stages.STAGE_MODULES)")
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
    _check_call(mod, cfg, inputs)
    cfg = cfg.resolve()
    fp = fingerprint(mod.NAME, code_version(mod), cfg.identity_dict(),
                     {name: ref.fingerprint for name, ref in sorted(inputs.items())})
    return ArtifactRef(mod.NAME, cfg.label(), fp)


def code_version(mod: ModuleType) -> str:
    """The stage's manual code_version + the digest of the code that runs for it + numeric dependency
    versions (artifacts/code.py): what fingerprints hash and manifests record."""
    return stage_code_identity(mod).version(mod.code_version)


def _check_call(mod: ModuleType, cfg, inputs: dict) -> None:
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
    return _status(store, ref)[0], ref


def _status(store, ref: ArtifactRef):
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
    _check_call(mod, cfg, inputs)
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


# ---- pipelines: steps as data, a dry-run plan, one walker -----------------------------------------
@dataclass
class Step:
    """One node of a pipeline: a stage with its config and its inputs (stage input -> an earlier
    step's name, or an ArtifactRef). `optional` marks evidence the run can do without (the CORE
    bundle): its failure is reported as skipped, and the run still succeeds."""

    name: str
    stage: str | ModuleType
    cfg: Any = None
    inputs: dict[str, str | ArtifactRef] = field(default_factory=dict)
    optional: bool = False


@dataclass
class PlanRow:
    step: str
    stage: str
    ref: ArtifactRef
    status: str  # cached | run | locked
    owner: str | None = None  # who holds the lease, when locked
    note: str | None = None  # why it runs, or from where: "--force", "resumes from step N"

    @property
    def action(self) -> str:
        action = {"cached": "cached", "run": "will run", "locked": f"locked by {self.owner}"}[self.status]
        return f"{action} ({self.note})" if self.note else action


def _resolve_inputs(step: Step, refs: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    out = {}
    for k, v in step.inputs.items():
        if isinstance(v, ArtifactRef):
            out[k] = v
        elif v in refs:
            out[k] = refs[v]
        else:
            raise PlanError(f"step {step.name!r}: input {k!r} names {v!r}, which is not an earlier step "
                            f"(earlier: {', '.join(refs) or 'none'})")
    return out


def _walk(steps: list[Step]):
    """Yield (step, module, input refs, ref) in order, checking names and wiring."""
    refs: dict[str, ArtifactRef] = {}
    for step in steps:
        if step.name in refs:
            raise PlanError(f"duplicate step name {step.name!r}")
        mod = load_stage(step.stage)
        inputs = _resolve_inputs(step, refs)
        ref = artifact_ref(mod, step.cfg, inputs)
        refs[step.name] = ref
        yield step, mod, inputs, ref


def plan(steps: list[Step], store, force: tuple[str, ...] | list[str] = ()) -> list[PlanRow]:
    """Fingerprint every step (no stage runs) and say whether it is cached, will run (rebuilt by
    force, or resuming from a checkpoint its work dir holds), or is being built by someone else.
    Fingerprints depend only on configs, code and upstream fingerprints, so steps below a step that
    will run are still named exactly."""
    rows = []
    for step, mod, _, ref in _walk(steps):
        state, holder = _status(store, ref)
        forced = step.name in force
        state = "run" if forced and state == "cached" else state
        rows.append(PlanRow(step.name, mod.NAME, ref, state, holder.describe() if holder else None,
                            note=resume_note(store, ref, forced) if state == "run" else None))
    return rows


def resume_note(store, ref: ArtifactRef, force: bool = False) -> str | None:
    """"resumes from step N" when the work dir on this machine holds a complete checkpoint; with
    force, that it starts from an empty work dir instead (as execute() does)."""
    checkpoints, step = store.work_dir_path(ref) / "checkpoints", None
    if checkpoints.is_dir():
        from core.checkpoint import list_checkpoints  # torch: only where a trainer left checkpoints

        found = list_checkpoints(checkpoints)
        step = found[-1][0] if found else None
    if force:
        return "--force: rebuilt from scratch" + ("" if step is None else f", not from its checkpoint at step {step}")
    return f"resumes from step {step}" if step is not None else None


def format_plan(rows: list[PlanRow]) -> str:
    head = ("STEP", "STAGE", "ARTIFACT", "STATUS")
    table = [head] + [(r.step, r.stage, str(r.ref), r.action) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in table]
    n_run = sum(r.status == "run" for r in rows)
    lines.append(f"{len(rows)} steps: {sum(r.status == 'cached' for r in rows)} cached, {n_run} to run, "
                 f"{sum(r.status == 'locked' for r in rows)} locked")
    return "\n".join(lines)


@dataclass
class Outcome:
    """What happened to one step of a walked pipeline."""

    step: str
    status: str                      # committed | cached | failed | skipped | not run
    manifest: Manifest | None = None
    detail: str = ""                 # failed / skipped: the one-line reason; not run: what it needed
    error: BaseException | None = None

    @property
    def ref(self) -> ArtifactRef | None:
        return self.manifest.ref if self.manifest is not None else None


# run_step(step, its input refs) -> (the committed manifest, whether it was a cache hit)
RunStep = Callable[[Step, dict[str, ArtifactRef]], tuple[Manifest, bool]]


def walk(steps: list[Step], run_step: RunStep, *, max_parallel: int | None = None,
         on_outcome: Callable[[Outcome], None] | None = None, store=None) -> dict[str, Outcome]:
    """Run every step whose inputs are available, each as soon as they are, up to max_parallel at
    once (None: no limit), and return {step: Outcome} in step order. A failed step stops only what
    needs it: a step whose required input failed, was skipped or was not run is "not run" (with
    what it needed); an optional stage input (the stage's OPTIONAL_INPUTS) that is missing is left
    out and the step runs without it. The Prefect flow and run_pipeline() both walk with this.
    With `store`, everything the pipeline will produce or read is pinned there until it ends, so gc
    (here or on another machine) cannot delete an artifact a later step needs (artifacts/lease.py)."""
    planned = set()
    for step, _, inputs, ref in _walk(steps):  # the whole pipeline is valid before any of it runs
        planned |= {ref, *inputs.values()}
    with pinned(store, sorted(planned)) if store is not None else contextlib.nullcontext() as pin:
        return _walk_steps(steps, run_step, max_parallel, on_outcome, pin)


def _walk_steps(steps, run_step, max_parallel, on_outcome, pin) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    pending = list(steps)
    running: dict[Future, Step] = {}

    def record(o: Outcome) -> None:
        outcomes[o.step] = o
        if pin is not None and o.ref is not None:  # a step built without an optional input: not planned
            pin.add_inputs([o.ref])
        if on_outcome is not None:
            on_outcome(o)

    pool = ThreadPoolExecutor(max_workers=max_parallel or len(steps) or 1, thread_name_prefix="step")
    try:
        while pending or running:
            for step in [s for s in pending if all(v in outcomes for v in s.inputs.values() if isinstance(v, str))]:
                pending.remove(step)
                optional = set(optional_inputs(load_stage(step.stage)))
                inputs, missing = {}, []
                for k, v in step.inputs.items():
                    if isinstance(v, ArtifactRef):
                        inputs[k] = v
                    elif outcomes[v].manifest is not None:
                        inputs[k] = outcomes[v].ref
                    elif k not in optional:
                        missing.append(v)
                if missing:
                    record(Outcome(step.name, "not run", detail="needs " + ", ".join(missing)))
                else:  # each thread runs in a copy of this context (a Prefect flow run's, say)
                    running[pool.submit(contextvars.copy_context().run, run_step, step, inputs)] = step
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                step = running.pop(fut)
                try:
                    manifest, was_cached = fut.result()
                    record(Outcome(step.name, "cached" if was_cached else "committed", manifest))
                except Exception as e:
                    reason = getattr(e, "headline", "") or f"{type(e).__name__}: {' '.join(str(e).split())}"
                    record(Outcome(step.name, "skipped" if step.optional else "failed", detail=reason, error=e))
    finally:  # an interrupt: do not wait for running stages here (their launcher stops them)
        pool.shutdown(wait=not running, cancel_futures=True)
    return {s.name: outcomes[s.name] for s in steps}


class PipelineFailed(RuntimeError):
    """Some steps failed; the others finished and are committed. `outcomes` says what happened."""

    def __init__(self, outcomes: dict[str, Outcome]):
        self.outcomes = outcomes
        failed = [o for o in outcomes.values() if o.status == "failed"]
        not_run = sum(o.status == "not run" for o in outcomes.values())
        first = failed[0]
        super().__init__(f"{len(failed)} of {len(outcomes)} steps failed ({first.step}: {first.detail[:120]}"
                         + (f"; and {', '.join(o.step for o in failed[1:])}" if len(failed) > 1 else "")
                         + f"), {not_run} not run")


def check_outcomes(outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
    """Raise PipelineFailed if any step failed (skipped evidence and what it held back do not count)."""
    if any(o.status == "failed" for o in outcomes.values()):
        raise PipelineFailed(outcomes)
    return outcomes


def format_outcomes(outcomes: dict[str, Outcome]) -> str:
    """The end-of-run table: step, artifact, what happened (with the one-line reason)."""
    def status(o: Outcome) -> str:
        if o.status == "not run":
            return f"not run ({o.detail})"
        return f"{o.status}: {o.detail[:160]}" if o.detail else o.status
    table = [("STEP", "ARTIFACT", "STATUS")] + [(o.step, str(o.ref) if o.ref else "-", status(o))
                                                 for o in outcomes.values()]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:2], widths)) + "  " + row[2] for row in table]
    counts = collections.Counter(o.status for o in outcomes.values())
    lines.append(", ".join(f"{counts[k]} {k}" for k in ("committed", "cached", "failed", "skipped", "not run")
                           if counts[k]))
    return "\n".join(lines)


def run_pipeline(steps: list[Step], store, *, force: tuple[str, ...] | list[str] = (),
                 on_event: EventFn | None = None, max_parallel: int | None = 1) -> dict[str, Manifest]:
    """Execute the steps without Prefect (each a cache hit or a build), one at a time by default;
    returns {step: Manifest} of the steps that produced one. force names steps to rebuild. Raises
    PipelineFailed, after everything that could run has run, if a step failed."""
    unknown = set(force) - {s.name for s in steps}
    if unknown:
        raise PlanError(f"force names unknown step(s) {sorted(unknown)}")

    def run_step(step: Step, inputs: dict[str, ArtifactRef]) -> tuple[Manifest, bool]:
        kinds: list[str] = []

        def seen(kind: str, info: dict) -> None:
            kinds.append(kind)
            if on_event is not None:
                on_event(kind, info)
        m = execute(step.stage, step.cfg, inputs, store, force=step.name in force, on_event=seen)
        return m, "cached" in kinds

    outcomes = check_outcomes(walk(steps, run_step, max_parallel=max_parallel, store=store))
    return {name: o.manifest for name, o in outcomes.items() if o.manifest is not None}


def steps_from_dict(data: Any, store=None) -> list[Step]:
    """Steps from a parsed plan file ({"steps": [...]} or a list); non-step inputs resolved by store."""
    items = data.get("steps") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise PlanError("a plan file holds a non-empty list of steps, or {steps: [...]}")
    steps: list[Step] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item or "stage" not in item:
            raise PlanError(f"step #{i + 1}: expected a mapping with name, stage, config, inputs; got {item!r}")
        unknown = set(item) - {"name", "stage", "config", "inputs"}
        if unknown:
            raise PlanError(f"step {item['name']!r}: unknown key(s) {sorted(unknown)} (name, stage, config, inputs)")
        mod = load_stage(item["stage"])
        cfg = mod.Config.from_dict(item.get("config") or {}).resolve()
        earlier = {s.name for s in steps}
        inputs: dict[str, str | ArtifactRef] = {}
        for k, v in (item.get("inputs") or {}).items():
            if v in earlier:
                inputs[k] = v
            elif store is None:
                raise PlanError(f"step {item['name']!r}: input {k!r} = {v!r} is not an earlier step")
            else:
                inputs[k] = store.resolve(str(v))
        steps.append(Step(item["name"], mod, cfg, inputs))
    return steps


def load_steps(path: Path | str, store=None) -> list[Step]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan file {path}: {e.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise PlanError(f"plan file {path} does not parse: {e}") from None
    return steps_from_dict(data, store)
