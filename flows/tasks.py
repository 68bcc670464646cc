"""The one Prefect task every flow uses: run a stage through pipeline.execute.

    ref = run_stage.submit(plan.step("tokenizer").to_dict(), {"data": "data_shards/..."}, store_url)

Caching: Prefect's result cache alone is not trusted (docs/versions.md#prefect-3: a Cached state survives the
artifact being deleted). The cache key is the artifact's fingerprint and is offered only when the
store holds that artifact committed and verified; otherwise the policy returns no key and the task
runs, and execute_step() does the lookup/lease/build/commit. So a cached rerun shows every stage as
Cached in the UI, and a deleted or damaged artifact is rebuilt.

Logs: the `nanorun` loggers of the stage (and of the launcher streaming torchrun's output) are
forwarded to the task run's logger for the duration of the task. Progress: stages call
stages.base.progress(); here that updates a Prefect progress artifact (throttled).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import threading
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy
# tqdm (the terminal bar) is imported with this module, on one thread: imported on first use, by
# tasks starting at once or a stage reporting from several download threads, one of them saw the
# module half-initialised ("partially initialized module 'tqdm'") and failed its step
from tqdm import tqdm

from artifacts import open_store
from artifacts.errors import StoreUnreachableError
from artifacts.manifest import ArtifactRef
from artifacts.redact import unseal
from stages.base import ConfigError, report_progress_to
from pipeline.execute import execute_step, join, load_stage, stage_status
from pipeline.plan import PlanStep

PROGRESS_EVERY_S = 2.0


FORWARDED = "nanorun_forwarded"  # set on records flows.tasks handed to the Prefect run logger


def _not_forwarded(record: logging.LogRecord) -> bool:
    return not getattr(record, FORWARDED, False)


def print_forwarded_once() -> None:
    """A `nanorun.*` record that flows.tasks handed to the Prefect run logger is printed by that
    logger (as `Task run 'base' - ...`): the root logger's console handlers (the CLI's, or Prefect's
    in a flow run a worker started) skip it, so a worker's console shows each line once, not twice.
    Idempotent: called by the CLI and at the start of every task."""
    for handler in logging.getLogger().handlers:
        if _not_forwarded not in handler.filters:
            handler.addFilter(_not_forwarded)


def planned_ref(step: dict, inputs: dict[str, str], store) -> ArtifactRef:
    """The artifact a task run builds: the plan's ref when its inputs are the planned ones (no Config
    is built: the plan carries the fingerprint), else (an optional input left out) the ref of the
    config with these inputs."""
    ref = ArtifactRef.parse(step["ref"])
    if step.get("as_planned", True):
        return ref
    from pipeline.execute import artifact_ref, config_from_plan

    mod = load_stage(step["stage"])
    return artifact_ref(mod, config_from_plan(mod, step["config"], step["name"]),
                        {k: ArtifactRef.parse(v) for k, v in inputs.items()})


class StoreVerifiedCache(CachePolicy):
    """Cache key = the artifact's fingerprint; a Prefect record only counts while the store holds
    the artifact committed and verified.

    When the store lacks the artifact, any record Prefect still has under that key is expired
    before the key is returned: the task then runs (execute_step() rebuilds the artifact) and writes
    a fresh record, so the very next run is Cached again."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        if inputs.get("force"):
            return None
        try:
            store = open_store(unseal(inputs.get("store_url")))
            ref = planned_ref(inputs["step"], inputs.get("inputs") or {}, store)
            state = stage_status(store, ref)[0]
        except Exception:  # let the task itself run and report the problem with a clear message
            return None
        # the same artifact in two stores is two cache entries (a rerun must verify the store it uses)
        store_id = hashlib.sha256(store.url.encode()).hexdigest()[:8]
        key = f"nanorun-{store_id}-{ref.stage}-{ref.name}"
        if state != "cached":
            _expire_record(getattr(task_ctx, "result_store", None), key)
        return key


def _expire_record(result_store, key: str) -> None:
    """Make a stale Prefect result record a cache miss (Prefect has no delete; expired = miss)."""
    if result_store is None:
        return
    try:
        if result_store.exists(key):
            from prefect.types._datetime import now

            result_store.write(obj=None, key=key, expiration=now("UTC") - datetime.timedelta(days=1))
            logging.getLogger("nanorun.flows").info("%s: Prefect remembers it but the store does not: rebuilding", key)
    except Exception:
        logging.getLogger("nanorun.flows").warning("could not expire Prefect's stale record %s", key, exc_info=True)


def _is_transient(task, task_run, state) -> bool:
    """Retry storage/network hiccups; never retry bad configs or training crashes."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    if isinstance(exc, ConfigError):
        return False
    from stagekit.fetch import FetchError

    if isinstance(exc, FetchError):
        # never retried here: a 404 or an unresolvable host is permanent, and connection errors
        # were already retried by fetch() within its own bounded budget (retries x backoff,
        # ~30 s by default; raise the stage's retries/backoff for unattended runs). Retrying the
        # task on top multiplied that into minutes (5 attempts x 3 task tries: 2m26s refused).
        return False
    return isinstance(exc, (StoreUnreachableError, ConnectionError, TimeoutError))


STEP_LINES = 100  # trainer step lines a run's log gets at most (all of them: train.log, nanorun -v)


def step_log_every(total: int) -> int:
    """A `total`-step run logs every N-th step line: a 1,500-step run put 1,500 lines into the
    Prefect run and the terminal; now ~STEP_LINES, beside the progress artifact and bar."""
    return max(1, -(-total // STEP_LINES))


def _thinned(message: str) -> bool:
    """A trainer step line ("[name] step i/N ..." as stagekit/launch.py logs it) other than the first,
    the last and every step_log_every(N)-th."""
    _, sep, line = message.partition("] ")
    if not sep or not line.startswith("step "):
        return False
    from core.train.telemetry import parse_step_line  # loaded already: the stage launching a trainer did

    p = parse_step_line(line)
    return p is not None and p["step"] % step_log_every(p["total"]) != 0 and p["step"] not in (1, p["total"])


class _ForwardToRunLogger(logging.Handler):
    """Forward `nanorun.*` records emitted on the task's own thread to the Prefect run logger."""

    def __init__(self, run_logger):
        super().__init__(logging.INFO)
        self.run_logger = run_logger
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return  # another task running concurrently in this process owns that record
        try:
            message = record.getMessage()
            if not _thinned(message) or logging.getLogger("nanorun").isEnabledFor(logging.DEBUG):  # -v: all
                self.run_logger.log(record.levelno, "%s", message)
            setattr(record, FORWARDED, True)  # the console handlers skip it (print_forwarded_once)
        except Exception:
            self.handleError(record)


class _ProgressArtifact:
    """stages.base.progress() -> a Prefect progress artifact, updated at most every few seconds."""

    def __init__(self, key: str, description: str):
        self.key, self.description = key, description
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, step: int, total: int, info: dict) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        done = step >= total
        if self.artifact_id is not None and not done and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        pct = 100.0 * step / max(1, total)
        extra = " · ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        desc = f"{self.description}: step {step}/{total}" + (f" · {extra}" if extra else "")
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=pct, key=self.key, description=desc)
        else:
            update_progress_artifact(self.artifact_id, progress=pct, description=desc)


class _TerminalBar:
    """stages.base.progress() -> a tqdm bar on stderr (the CLI's view of a long stage)."""

    def __init__(self, name: str):
        self.name, self.bar = name, None

    def __call__(self, step: int, total: int, info: dict) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.name, unit="step", dynamic_ncols=True, leave=True)
        self.bar.total = total
        self.bar.n = step
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        self.bar.refresh()
        if step >= total:
            self.bar.close()


class _Both:
    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, step, total, info):
        for fn in self.fns:
            fn(step, total, info)


@contextlib.contextmanager
def _observed(name: str):
    """Forward the stage's logs to the task run and its progress() to a Prefect progress artifact
    (and a terminal bar when the CLI asks for one)."""
    handler = _ForwardToRunLogger(get_run_logger())
    print_forwarded_once()  # in a flow run a worker started too, not only under the CLI
    nanorun_logger = logging.getLogger("nanorun")
    nanorun_logger.addHandler(handler)
    if nanorun_logger.level == logging.NOTSET or nanorun_logger.level > logging.INFO:
        nanorun_logger.setLevel(logging.INFO)
    reporter = _ProgressArtifact(f"{name.replace('_', '-')}-progress", name)
    if os.environ.get("NANORUN_PROGRESS_BAR") == "1":  # set by the CLI: also draw a terminal bar
        reporter = _Both(reporter, _TerminalBar(name))
    try:
        with report_progress_to(reporter):
            yield
    finally:
        nanorun_logger.removeHandler(handler)


@task(name="stage", cache_policy=StoreVerifiedCache(), persist_result=True, result_serializer="json",
      retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_is_transient)
def run_stage(step: dict, inputs: dict[str, str], store_url: str | None = None, force: bool = False) -> str:
    """Build (or find) one plan step's artifact (pipeline/plan.py PlanStep.to_dict(), plus
    `as_planned`: whether `inputs` are the ones the plan wired); returns its ref `stage/label-fingerprint`."""
    step = unseal(step)
    refs = {name: ArtifactRef.parse(r) for name, r in inputs.items()}
    with _observed(step["stage"]):
        manifest = execute_step(PlanStep.from_dict(step), refs, open_store(unseal(store_url)), force=force,
                                as_planned=step.get("as_planned", True))
    return str(manifest.ref)


@task(name="join-stage", cache_policy=NO_CACHE)
def join_stage(step: dict, inputs: dict[str, str], store_url: str | None = None) -> str:
    """This node's share of a multi-node build that another node runs (and commits)."""
    from pipeline.execute import config_from_plan

    step = unseal(step)
    mod = load_stage(step["stage"])
    cfg = config_from_plan(mod, step["config"], step["name"])
    refs = {name: ArtifactRef.parse(r) for name, r in inputs.items()}
    with _observed(mod.NAME):
        return str(join(mod, cfg, refs, open_store(unseal(store_url))))
