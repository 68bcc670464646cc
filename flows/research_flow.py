"""The Prefect flow of a research run (the method: pipeline/research.py; deployment `research` in prefect.yaml).

    nanorun research --preset tiny --depths 1 2 3 --seeds 1 2 3 --candidate lr=base.matrix_lr=0.4
    prefect deployment run 'research/research' --param candidates='["lr=base.matrix_lr=0.4"]' --watch

    from flows.research_flow import research
    result = research(candidates=["lr=base.matrix_lr=0.4"], recipe="tiny", depths=[1, 2, 3], store="/tmp/store")

Every point of the baseline and the config candidates is a run_stage task run (the same cached
stage runs as a sweep's); a code candidate's points run in its checkout's process (pipeline/candidates.py).
A failed point stops only its candidate's line; the research_report stage then writes what was
found (a Markdown artifact in the UI, plots embedded), and only then does the flow fail, naming the
failed points and any proposer error.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from artifacts import open_store
from artifacts.redact import seal, unseal
from flows.speedrun import prefect_step, publish_markdown
from flows.tasks import run_stage
from pipeline import settings
from pipeline.research import Research
from pipeline.recipes import stage_plan
from pipeline.research import research as run_research


@flow(name="research", log_prints=True, validate_parameters=True)
def research(candidates: list[str], recipe: str = "tiny", depths: list[int] | None = None,
             seeds: list[int] | None = None, metrics: list[str] | None = None, alpha: float = 0.05, keep: int = 0,
             budget: float | None = None, overrides: dict | None = None, search: dict | None = None,
             samples: int = 0, propose: str = "", rounds: int = 3, name: str = "research", max_parallel: int = 1,
             store: str | None = None, eval_bundle: str | None = None, data_source: str | None = None) -> dict:
    """Try candidates against the recipe at growing depths and promote only what keeps beating it;
    returns {"report": ref, "path": its local dir, "markdown": report.md, "verdicts": {name: verdict},
    "spent_hours": device-hours this run built, "failed": [points]}.

    Args:
        candidates: named changes, each "NAME=STEP.FIELD=VALUE[,...]", "NAME=git:REF" or "NAME=patch:FILE".
        recipe: the speedrun preset every point starts from (tiny, cpu-demo, d12, ...).
        depths: the rungs, smallest first (default: the recipe's ladder, tiny 1 2 3).
        seeds: seeds per rung for the baseline and every candidate (default 1 2 3; at least 2).
        metrics: val_bpb (lower is better) and/or core (higher is better; needs the CORE bundle).
        alpha: significance of the one-sided Welch test after Holm across a rung's candidates.
        keep: at most this many candidates promoted per rung (0: every significant one).
        budget: device-hours for the points this run builds; a rung that would exceed it is not started.
        overrides: {step: {field: value}} applied to the baseline and every candidate.
        search: the built-in proposer: {"step.field": [values]} searched as a grid (or `samples` of it).
        samples: how many random points of the search grid (0: all of them).
        propose: a proposer command: the results so far as JSON on stdin, {"candidate": ...} lines out.
        rounds: how many times the proposer is asked for new candidates at most.
        name: the research's name (labels the report artifact).
        max_parallel: points trained at once.
        store: a directory or s3://bucket/prefix (default: the project's settings).
        eval_bundle: the CORE bundle (local dir/zip or URL), needed with the core metric.
        data_source: data source for data_shards.
    """
    logger = get_run_logger()
    params = unseal(dict(store=store, eval_bundle=eval_bundle, data_source=data_source))
    r = Research(name=name, recipe=recipe, depths=tuple(depths or ()), seeds=tuple(seeds or (1, 2, 3)),
                 candidates=tuple(candidates), metrics=tuple(metrics or ("val_bpb",)), alpha=alpha, keep=keep,
                 budget=budget, overrides=overrides or {}, search=search or {}, samples=samples, propose=propose,
                 rounds=rounds, max_parallel=max_parallel)
    st = open_store(settings.value("store", params["store"]))  # nanorun.toml, as the CLI (pipeline/settings.py)
    logger.info("research %s -> %s: %d candidate(s), rungs %s, seeds %s", r.name, st.url, len(r.candidates),
                list(r.depths), list(r.seeds))
    res = run_research(r, store=st.url, eval_bundle=params["eval_bundle"], data_source=params["data_source"],
                       point_rows=_prefect_points(st.url, params["eval_bundle"], params["data_source"]),
                       log=logger.info)
    return finish(res, st, logger)


def _prefect_points(store_url: str, eval_bundle, data_source):
    """point_rows whose in-process points are run_stage task runs (a fresh step map per call: every
    candidate's points are named alike)."""
    from pipeline.candidates import point_rows

    def rows(c, sw):
        return point_rows(c, sw, store=store_url, eval_bundle=eval_bundle, data_source=data_source,
                          run_step=lambda store, plan: prefect_step(plan, store_url, []))
    return rows


def finish(res: dict, st, logger) -> dict:
    """Write the report (a cached stage), publish it in the UI, fail the run if a point or the proposer failed."""
    from stages.research_report import report_config

    name = res["research"]["name"]
    (step,) = stage_plan("research_report", report_config(res), None, {}).steps
    ref = st.resolve(run_stage.with_options(task_run_name="research report")(seal(step.to_dict()), {}, st.url))
    path = st.materialize(ref)
    markdown = (path / "report.md").read_text()
    publish_markdown(markdown, path, key=f"research-{name}", description=str(ref))
    failed = [f"{x['candidate']} {x['point']}" for x in res["rows"] if x.get("status") != "ok"]
    if failed or res["errors"]:
        raise RuntimeError(f"research {name}: {len(failed)} point(s) failed ({', '.join(failed)[:600]})"
                           f"{'; ' + '; '.join(res['errors']) if res['errors'] else ''}; the report of the rest is "
                           f"{ref} in {st.url}; run the same command again to retry only the failed points")
    logger.info("research %s: %s", name, "; ".join(f"{c['name']}: {c['verdict']}" for c in res["candidates"]))
    return {"report": str(ref), "path": str(path), "markdown": markdown, "spent_hours": res["spent_hours"],
            "verdicts": {c["name"]: c["verdict"] for c in res["candidates"]}, "failed": failed}
