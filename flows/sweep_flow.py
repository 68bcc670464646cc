"""The Prefect flow of a sweep or an A/B comparison (the grid and its Steps: pipeline/sweep.py).

    nanorun sweep --preset tiny --eval-bundle ../shared/data/eval_bundle [--max-parallel 2]
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --b base.matrix_lr=0.4

    from pipeline.sweep import preset
    from flows.sweep_flow import sweep
    result = sweep(spec=preset("tiny").to_dict(), store="/tmp/store", eval_bundle="../shared/data/eval_bundle")

Shared artifacts (data, tokenizer, CORE bundle) are built first, then every point's pretrain step
and its core_eval, at most `max_parallel` stage runs at once (pipeline.execute.walk, as the speedrun
flow). A failed point is reported and the others go on; the sweep_report stage then writes the
table, fits and plots of what finished (a Markdown artifact in the UI), and only then does the flow
fail, naming the failed points. The CORE bundle is optional evidence, as in the speedrun: without
it the points train and the report has no CORE. Every step is an ordinary cached stage: a rerun
builds only the points not yet committed.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from artifacts import open_store
from artifacts.redact import unseal
from pipeline import settings
from flows.speedrun import log_outcome, prefect_step, publish_markdown
from pipeline.sweep import Sweep, report_config, sweep_rows, sweep_steps
from flows.tasks import run_stage
from pipeline.execute import format_outcomes, walk


@flow(name="sweep", log_prints=True, validate_parameters=True)
def sweep(spec: dict, store: str | None = None, eval_bundle: str | None = None, data_source: str | None = None,
          nproc: int | None = None) -> dict:
    """Build every point of a sweep or comparison (pipeline.sweep.Sweep as a dict) and its report; returns
    {"report": ref, "path": local dir of the report, "markdown": report.md, "points": {key: pretrain
    ref or None}, "failed": {key: error}}.

    store: a directory or s3://bucket/prefix. eval_bundle: the CORE bundle (local dir/zip or URL;
    without it CORE is not run and the points still are). The flow run fails after the report is
    written if any point failed."""
    logger = get_run_logger()
    spec, store, eval_bundle, data_source = unseal((spec, store, eval_bundle, data_source))
    sw = Sweep.from_dict(spec)
    plan = sweep_steps(sw, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc)
    st = open_store(settings.value("store", store))  # nanorun.toml, as the CLI (pipeline/settings.py)
    logger.info("%s %s -> %s: %d points, %d stage runs at a time", sw.kind, sw.name, st.url, len(plan.points),
                sw.max_parallel)
    # the walker runs each step once its inputs are there, max_parallel at once (on a GPU node a
    # point takes all its GPUs: 1); a failed point stops only its own CORE step
    outcomes = walk(plan.steps, prefect_step(st.url, []), max_parallel=sw.max_parallel,
                    on_outcome=lambda o: log_outcome(logger, o), store=st)
    logger.info("%s %s:\n%s", sw.kind, sw.name, format_outcomes(outcomes))
    rows, errors = sweep_rows(plan, outcomes)
    report = run_stage.with_options(task_run_name=f"{sw.kind} report")("sweep_report", report_config(sw, rows), {},
                                                                       st.url)
    ref = st.resolve(report)
    path = st.materialize(ref)
    markdown = (path / "report.md").read_text()
    publish_markdown(markdown, path, key=f"{sw.kind}-{sw.name}", description=str(ref))
    if errors:
        raise RuntimeError(f"{sw.kind} {sw.name}: {len(errors)} of {len(rows)} point(s) failed "
                           f"({'; '.join(f'{k}: {v}' for k, v in errors.items())[:800]}); the report of the others is "
                           f"{ref} in {st.url}; run the same command again to retry only the failed points")
    return {"report": str(ref), "path": str(path), "markdown": markdown, "failed": errors,
            "points": {r["point"]: r["pretrain"] for r in rows}}


