"""Pipelines as data: Steps compiled once into a Plan, a dry-run table, and the one walker every runner uses.

    from pipeline.plan import Step, compile_plan, plan_rows, format_plan, walk, run_pipeline
    steps = [Step("shards", "data_shards", shards_cfg),
             Step("tok", "tokenizer", tok_cfg, {"data": "shards"})]   # a str input names an earlier step
    plan = compile_plan(steps)                 # resolved configs, input wiring and artifact refs, once
    print(format_plan(plan_rows(plan, store))) # cached / will run / locked
    results = run_pipeline(plan, store)        # {step name: Manifest}, without Prefect
    outcomes = walk(plan, run_step)            # a failure stops only its dependents

A Plan is plain data (JSON: `nanorun speedrun --plan --json`): each step's stage, its full resolved
config, its inputs (earlier steps or artifact refs) and the artifact it will be. The CLI compiles it,
the Prefect flow receives it, and execute_step() (pipeline/execute.py) is the one place a stage
Config is built again from it, in the process that runs the stage.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from artifacts.lease import pinned
from artifacts.manifest import ArtifactRef, Manifest
from pipeline.execute import EventFn, PlanError, artifact_ref, check_call, execute_step, load_stage, stage_status
from stages.base import optional_inputs

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


@dataclass(frozen=True)
class PlanStep:
    """One resolved step of a Plan: what execute_step() needs, as plain data. `inputs` maps a stage
    input to an earlier step's name or to an artifact ref (`stage/label-fp`); `ref` is the artifact
    this step is planned to be (its fingerprint: Prefect's cache key for the step)."""

    name: str
    stage: str | ModuleType  # a registered stage's name; in-process plans may hold the module itself
    config: dict
    inputs: dict[str, str]
    ref: ArtifactRef
    optional: bool = False

    @property
    def stage_name(self) -> str:
        return self.stage if isinstance(self.stage, str) else self.stage.NAME

    def to_dict(self) -> dict:
        return {"name": self.name, "stage": self.stage_name, "config": self.config, "inputs": dict(self.inputs),
                "ref": str(self.ref), "optional": self.optional}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanStep":
        try:
            return cls(d["name"], d["stage"], dict(d["config"]), dict(d.get("inputs") or {}),
                       ArtifactRef.parse(d["ref"]), bool(d.get("optional", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"not a plan step ({type(e).__name__}: {e}): {str(d)[:200]}") from None


@dataclass(frozen=True)
class Plan:
    """A recipe compiled once: its steps in order, each resolved (configs with their digests, inputs
    wired, artifact refs computed), and what it was compiled from (`recipe`, for people)."""

    steps: tuple[PlanStep, ...]
    recipe: dict = field(default_factory=dict)

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def step(self, name: str) -> PlanStep:
        for s in self.steps:
            if s.name == name:
                return s
        raise PlanError(f"no step {name!r} in this plan; its steps: {', '.join(self.names)}")

    def input_refs(self, step: PlanStep) -> dict[str, ArtifactRef]:
        """The step's inputs as planned: every upstream step committed as its planned artifact."""
        refs = {s.name: s.ref for s in self.steps}
        return {k: refs[v] if v in refs else ArtifactRef.parse(v) for k, v in step.inputs.items()}

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("steps"), list):
            raise PlanError("a plan is {recipe: {...}, steps: [...]} (`nanorun speedrun --plan --json` writes one)")
        return cls(tuple(PlanStep.from_dict(s) for s in d["steps"]), dict(d.get("recipe") or {}))


def config_fields(cfg) -> dict:
    """Every field of a stage Config (identity and runtime), as the plan carries it."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def compile_plan(steps: list[Step], recipe: dict | None = None) -> Plan:
    """Steps (configs as objects, inputs naming earlier steps or refs) -> a Plan. Each config is
    resolved (content digests, source listings: its I/O) here, once; nothing downstream resolves it
    again (a resolved config returns itself)."""
    refs: dict[str, ArtifactRef] = {}
    out = []
    for step in steps:
        if step.name in refs:
            raise PlanError(f"duplicate step name {step.name!r}")
        if "/" in step.name:
            raise PlanError(f"step name {step.name!r}: a '/' would read as an artifact ref")
        mod = load_stage(step.stage)
        inputs = {}
        for k, v in step.inputs.items():
            if isinstance(v, ArtifactRef):
                inputs[k] = v
            elif v in refs:
                inputs[k] = refs[v]
            else:
                raise PlanError(f"step {step.name!r}: input {k!r} names {v!r}, which is not an earlier step "
                                f"(earlier: {', '.join(refs) or 'none'})")
        check_call(mod, step.cfg, inputs)
        cfg = step.cfg.resolve()
        refs[step.name] = artifact_ref(mod, cfg, inputs)
        out.append(PlanStep(step.name, step.stage if isinstance(step.stage, ModuleType) else mod.NAME,
                            config_fields(cfg),
                            {k: v if isinstance(v, str) else str(v) for k, v in step.inputs.items()},
                            refs[step.name], step.optional))
    return Plan(tuple(out), dict(recipe or {}))


def as_plan(plan: Plan | list[Step]) -> Plan:
    return plan if isinstance(plan, Plan) else compile_plan(plan)


def plan_rows(plan: Plan | list[Step], store, force: tuple[str, ...] | list[str] = ()) -> list[PlanRow]:
    """Say for every step whether it is cached, will run (rebuilt by force, or resuming from a
    checkpoint its work dir holds), or is being built by someone else; runs nothing and builds no
    config (the refs are the plan's). Fingerprints depend only on configs, code and upstream
    fingerprints, so steps below a step that will run are still named exactly."""
    rows = []
    for step in as_plan(plan):
        state, holder = stage_status(store, step.ref)
        forced = step.name in force
        state = "run" if forced and state == "cached" else state
        rows.append(PlanRow(step.name, step.stage_name, step.ref, state, holder.describe() if holder else None,
                            note=resume_note(store, step.ref, forced) if state == "run" else None))
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
RunStep = Callable[[PlanStep, dict[str, ArtifactRef]], tuple[Manifest, bool]]


def walk(plan: Plan | list[Step], run_step: RunStep, *, max_parallel: int | None = None,
         on_outcome: Callable[[Outcome], None] | None = None, store=None) -> dict[str, Outcome]:
    """Run every step whose inputs are available, each as soon as they are, up to max_parallel at
    once (None: no limit), and return {step: Outcome} in step order. A failed step stops only what
    needs it: a step whose required input failed, was skipped or was not run is "not run" (with
    what it needed); an optional stage input (the stage's OPTIONAL_INPUTS) that is missing is left
    out and the step runs without it. The Prefect flow and run_pipeline() both walk with this.
    With `store`, everything the pipeline will produce or read is pinned there until it ends, so gc
    (here or on another machine) cannot delete an artifact a later step needs (artifacts/lease.py)."""
    plan = as_plan(plan)  # the whole pipeline is valid before any of it runs
    planned = {ref for step in plan for ref in (step.ref, *plan.input_refs(step).values())}
    with pinned(store, sorted(planned)) if store is not None else contextlib.nullcontext() as pin:
        return _walk_steps(plan, run_step, max_parallel, on_outcome, pin)


def _walk_steps(plan: Plan, run_step, max_parallel, on_outcome, pin) -> dict[str, Outcome]:
    steps = plan.steps
    names = set(plan.names)
    outcomes: dict[str, Outcome] = {}
    pending = list(steps)
    running: dict[Future, PlanStep] = {}

    def record(o: Outcome) -> None:
        outcomes[o.step] = o
        if pin is not None and o.ref is not None:  # a step built without an optional input: not planned
            pin.add_inputs([o.ref])
        if on_outcome is not None:
            on_outcome(o)

    pool = ThreadPoolExecutor(max_workers=max_parallel or len(steps) or 1, thread_name_prefix="step")
    try:
        while pending or running:
            for step in [s for s in pending if all(v in outcomes for v in s.inputs.values() if v in names)]:
                pending.remove(step)
                optional = set(optional_inputs(load_stage(step.stage)))
                inputs, missing = {}, []
                for k, v in step.inputs.items():
                    if v not in names:
                        inputs[k] = ArtifactRef.parse(v)
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


def local_step(store, plan: Plan, force: tuple[str, ...] | list[str] = (),
               on_event: EventFn | None = None) -> RunStep:
    """walk()'s run_step without Prefect: each step through execute_step(), a cache hit or a build."""
    def run_step(step: PlanStep, inputs: dict[str, ArtifactRef]) -> tuple[Manifest, bool]:
        kinds: list[str] = []

        def seen(kind: str, info: dict) -> None:
            kinds.append(kind)
            if on_event is not None:
                on_event(kind, info)
        m = execute_step(step, inputs, store, as_planned=inputs == plan.input_refs(step),
                         force=step.name in force, on_event=seen)
        return m, "cached" in kinds
    return run_step


def run_pipeline(plan: Plan | list[Step], store, *, force: tuple[str, ...] | list[str] = (),
                 on_event: EventFn | None = None, max_parallel: int | None = 1) -> dict[str, Manifest]:
    """Execute the steps without Prefect (each a cache hit or a build), one at a time by default;
    returns {step: Manifest} of the steps that produced one. force names steps to rebuild. Raises
    PipelineFailed, after everything that could run has run, if a step failed."""
    plan = as_plan(plan)
    unknown = set(force) - set(plan.names)
    if unknown:
        raise PlanError(f"force names unknown step(s) {sorted(unknown)}")

    outcomes = check_outcomes(walk(plan, local_step(store, plan, force, on_event), max_parallel=max_parallel,
                                   store=store))
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
