"""The Prefect flow of a sweep or an A/B comparison (the grid and its Steps: flows/sweep.py).

    nanorun sweep --preset tiny --eval-bundle ../shared/data/eval_bundle [--max-parallel 2]
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --b base.matrix_lr=0.4

    from flows.sweep import preset
    from flows.sweep_flow import sweep
    result = sweep(spec=preset("tiny").to_dict(), store="/tmp/store", eval_bundle="../shared/data/eval_bundle")

Shared artifacts (data, tokenizer, CORE bundle) are built first; then every point's pretrain step
is submitted, at most `max_parallel` stage runs at once (on a GPU node a point takes all its GPUs:
1), each point's core_eval as soon as its model is built (before further trainings start). A failed point is
reported and the others go on; the sweep_report stage then writes the table, fits and plots of
what finished (a Markdown artifact in the UI), and only then does the flow fail, naming the failed
points. Every step is an ordinary cached stage: a rerun builds only the points not yet committed.
"""
from __future__ import annotations

import dataclasses
import queue

from prefect import flow, get_run_logger

from artifacts import open_store
from artifacts.manifest import ArtifactRef
from flows.sweep import Sweep, point_row, report_config, sweep_steps
from flows.tasks import run_stage
from stages.execute import load_stage


def _submit(step, futures: dict, store_url: str):
    cfg = {f.name: getattr(step.cfg, f.name) for f in dataclasses.fields(step.cfg)}
    inputs = {name: futures[upstream] for name, upstream in step.inputs.items()}
    return run_stage.with_options(task_run_name=step.name).submit(load_stage(step.stage).NAME, cfg, inputs, store_url)


def _error(fut) -> str | None:
    """None if the task completed, else why not (waits for it)."""
    fut.wait()
    state = fut.state
    if state.is_completed():
        return None
    exc = fut.result(raise_on_failure=False)
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else (state.message or state.name)


@flow(name="sweep", log_prints=True, validate_parameters=True)
def sweep(spec: dict, store: str | None = None, eval_bundle: str | None = None, data_source: str | None = None,
          nproc: int | None = None) -> dict:
    """Build every point of a sweep or comparison (flows.sweep.Sweep as a dict) and its report; returns
    {"report": ref, "path": local dir of the report, "markdown": report.md, "points": {key: pretrain
    ref or None}, "failed": {key: error}}.

    store: a directory or s3://bucket/prefix. eval_bundle: the CORE bundle (local dir/zip or URL).
    The flow run fails after the report is written if any point failed."""
    logger = get_run_logger()
    sw = Sweep.from_dict(spec)
    plan = sweep_steps(sw, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc)
    st = open_store(store)
    logger.info("%s %s -> %s: %d points, %d at a time", sw.kind, sw.name, st.url, len(plan.points), sw.max_parallel)
    futures: dict = {}
    for step in plan.shared:
        futures[step.name] = _submit(step, futures, st.url)
    broken = {name: err for name, fut in futures.items() if (err := _error(fut)) is not None}
    if {"data", "tokenizer"} & set(broken):
        raise RuntimeError(f"{sw.kind} {sw.name}: shared step(s) failed, no point can run: {broken}")
    steps = {s.name: s for s in plan.steps}
    results: dict[str, str] = {}    # step name -> artifact ref
    errors: dict[str, str] = {}     # point key -> why it has no result
    done: queue.Queue = queue.Queue()
    todo = [(p, p.pretrain) for p in plan.points]
    ready: list = []                # core_eval steps whose model is built: they go before new trainings
    running = 0
    while todo or ready or running:
        while (ready or todo) and running < sw.max_parallel:  # one slot per stage run (GPU pool: the node)
            p, name = (ready or todo).pop(0)
            futures[name] = _submit(steps[name], futures, st.url)
            futures[name].add_done_callback(lambda fut, p=p, name=name: done.put((p, name, fut)))
            running += 1
        p, name, fut = done.get()
        running -= 1
        if (err := _error(fut)) is not None:
            errors[p.key] = err if name == p.pretrain else f"CORE: {err}"
            continue
        results[name] = fut.result()
        if name == p.pretrain and p.core:
            if "eval_bundle" in broken:
                errors[p.key] = f"CORE not run: the eval_bundle step failed: {broken['eval_bundle']}"
            else:
                ready.append((p, p.core))
    rows = []
    for p in plan.points:
        pre, core = (st.require(ArtifactRef.parse(results[n])) if n in results else None for n in (p.pretrain, p.core))
        rows.append(point_row(p, pre, core, errors.get(p.key)))
        if p.key in errors:
            logger.error("%s %s: point %s failed: %s", sw.kind, sw.name, p.key, errors[p.key])
    report = run_stage.with_options(task_run_name=f"{sw.kind} report")("sweep_report", report_config(sw, rows), {},
                                                                       st.url)
    ref = st.resolve(report)
    path = st.materialize(ref)
    markdown = (path / "report.md").read_text()
    _publish(markdown, st.url, ref, path, key=f"{sw.kind}-{sw.name}")
    if errors:
        raise RuntimeError(f"{sw.kind} {sw.name}: {len(errors)} of {len(rows)} point(s) failed "
                           f"({'; '.join(f'{k}: {v}' for k, v in errors.items())[:800]}); the report of the others is "
                           f"{ref} in {st.url}; run the same command again to retry only the failed points")
    return {"report": str(ref), "path": str(path), "markdown": markdown, "failed": errors,
            "points": {r["point"]: r["pretrain"] for r in rows}}


def _publish(markdown: str, store_url: str, ref, path, key: str) -> None:
    """The report as a Markdown artifact on the flow run's page, its images linked into the store."""
    from prefect.artifacts import create_markdown_artifact

    base = f"{store_url}/{ref.key}/" if "://" in store_url else f"file://{path}/"
    create_markdown_artifact(markdown=markdown.replace("](", "](" + base),
                             key="".join(c if c.isalnum() else "-" for c in key.lower()), description=str(ref))
