"""The nightly leaderboard reproduction (deployment `nightly-leaderboard`, cron 03:00 UTC).

Each night the pinned recipe runs from scratch into its own store root,
`{store}/@nightly/{preset}/{run}` (a reproduction must not be a cache hit on yesterday's
artifacts; the run is named after the night, YYYY-MM-DD), its report is copied into the main store
under the alias `report@nightly-{preset}-{run}` (so it lands on `nanorun leaderboard`), and it is
judged against the earlier nights: CORE, val bpb or wall time worse than the run-to-run noise those
nights measure (a prediction limit from their mean and spread, stagekit/stats.py) is a regression; until
two earlier nights exist, fixed tolerances against the last night stand in. The comparison and the
recipe's mean ± spread are published as a Markdown artifact; with fail_on_regression the flow run
then fails so that notifications fire.

A second run for a night that already has a report is refused unless `rerun` says what it is for:
"add" a second row for that night (run `{night}-2`, its own store root), or "replace" the night
(rebuilt from scratch as a new run; once its report is committed the night's earlier reports and
store roots are deleted, so the leaderboard shows one row for the night).

    prefect deployment run 'nightly-leaderboard/nightly-leaderboard' --param commit=<sha>
"""
from __future__ import annotations

import datetime as dt
from typing import Literal

from prefect import flow, get_run_logger

from artifacts import open_store
from artifacts.manifest import ArtifactRef
from artifacts.provenance import git_state
from pipeline import settings
from pipeline.board import format_rows, format_stats, nightly_tag, recipe_key, recipe_stats, rows
from pipeline.retention import NIGHTLY_ROOT, keep_nights_default, night_run, night_store_url, prune_nights, run_order
from flows.speedrun import speedrun
from pipeline.board import DEFAULT_TOLERANCES, compare  # noqa: F401 (compare: the nightly judgement)


def nightly_runs(store, preset: str) -> list[str]:
    """The nightly runs of `preset` with a report in `store` (alias report@nightly-{preset}-{run}),
    oldest first."""
    prefix = f"report@nightly-{preset}-"
    runs = [name[len(prefix):] for name in store.aliases("report") if name.startswith(prefix)]
    return sorted((r for r in runs if run_order(r)), key=run_order)  # (nightly-cpu-demo-… is not cpu's)


def previous_nights(store, preset: str, run: str, limit: int = 14, recipe_id: str | None = None) -> list[tuple[str, dict]]:
    """(run, report summary) of the last `limit` nightly runs before `run` with a report in
    `store`, oldest first (a night's earlier rows included: they measure the same noise). Only runs
    of the same recipe (the report's recipe_id: preset plus every override) when it is given: a
    night run with other overrides measures something else."""
    earlier = [r for r in nightly_runs(store, preset) if run_order(r) < run_order(run)]
    summaries = [(r, store.require(store.get_alias("report", f"nightly-{preset}-{r}")).metrics) for r in earlier]
    return [(r, m) for r, m in summaries if recipe_id is None or m.get("recipe_id") == recipe_id][-limit:]


def replaced(main, preset: str, run: str) -> None:
    """Delete a nightly run that another run of its night replaces: its report in the main store
    (manifest, files, alias, run index row) and its store root (the report's copy and index row
    there first, so no leaderboard row is left behind)."""
    ref = main.get_alias("report", f"nightly-{preset}-{run}")
    root = open_store(night_store_url(main.url, preset, run))
    if root.manifest(ref) is not None:
        root.delete(ref)
    main.delete(ref)
    main._remove_tree("/".join([NIGHTLY_ROOT, preset, run]))


# What a second run for a night that already has a report does (the flow's `rerun` parameter).
Rerun = Literal["refuse", "add", "replace"]
# The final state of a refused run: its name is what `prefect deployment run --watch` ends with.
REFUSED = "Refused: the night has a report; rerun=add or replace"


def night_of(date: str | None) -> str:
    """The night a run is for: `date` (YYYY-MM-DD, refused with Python's own message when
    malformed) or today in UTC."""
    night = date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    dt.date.fromisoformat(night)
    return night


def refusal(main, preset: str, night: str, rerun: Rerun, option: str = "rerun='{}'") -> tuple[list[str], str | None]:
    """(the night's runs with a report, why this run is refused or None); `option` spells the
    parameter in the reason (the CLI: "--rerun {}")."""
    done = [r for r in nightly_runs(main, preset) if run_order(r)[0] == night]
    if done and rerun == "refuse":
        return done, (f"nightly {preset} {night} already has a report ({', '.join(done)}): set "
                      f"{option.format('add')} for another row of that night or {option.format('replace')} to "
                      "rebuild it")
    return done, None


@flow(name="nightly-leaderboard", log_prints=True, validate_parameters=True)
def nightly_leaderboard(preset: str = "cpu-demo", overrides: dict[str, dict] | None = None, store: str | None = None,
                        commit: str | None = None, eval_bundle: str | None = None, chat_data: str | None = None,
                        nproc: int | None = None,
                        date: str | None = None, core_noise: float = DEFAULT_TOLERANCES["core_noise"],
                        bpb_noise: float = DEFAULT_TOLERANCES["bpb_noise"],
                        slowdown: float = DEFAULT_TOLERANCES["slowdown"], alpha: float = 0.01, history: int = 14,
                        fail_on_regression: bool = True, keep_nights: int | None = None,
                        rerun: Rerun = "refuse") -> dict:
    """Reproduce the pinned recipe, append it to the leaderboard, flag regressions against the
    run-to-run noise of the last `history` nights.

    commit: the git commit the reproduction must run at (the worker's checkout is checked; pin the
    deployment's code to it). date: the night (YYYY-MM-DD, default today in UTC). alpha: the false
    alarm rate per metric per night. core_noise / bpb_noise / slowdown: the tolerances used only
    until two earlier nights measure the noise. keep_nights: how many nights' store roots to keep
    (default $NANORUN_KEEP_NIGHTS or 7; their reports stay regardless). rerun: when the night
    already has a report, "refuse" (the default, and the schedule's: one row a night; the run ends
    in a failed state named REFUSED whose message says why), "add" (a second row for the night,
    reproduced from scratch in its own store root) or "replace" (the night rebuilt from scratch; its
    earlier rows and store roots are deleted once the new report is committed)."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    code = git_state()
    if commit and not (code["commit"] or "").startswith(commit):
        raise ValueError(f"nightly-leaderboard is pinned to commit {commit}, but the worker runs "
                         f"{code['commit'] or 'an unknown commit'}: check out {commit} in the worker's repository")
    if commit and code["dirty"]:
        raise ValueError(f"nightly-leaderboard is pinned to {commit}, but the worker's checkout has local changes")
    keep_nights = keep_nights or keep_nights_default()
    night = night_of(date)
    main = open_store(settings.value("store", store))  # nanorun.toml, as the CLI (pipeline/settings.py)
    done, refused = refusal(main, preset, night, rerun)
    if refused:  # the reason is the final state's message (its name in `deployment run --watch`)
        from prefect.states import Failed

        logger.error(refused)
        return Failed(name=REFUSED, message=refused, data=ValueError(refused))
    # a retried run that crashed before its report resumes in its own root: the name is the same
    run = night_run(night, run_order(done[-1])[1] + 1 if done else 1)
    # "@nightly" is not a stage name: the main store never lists (or garbage-collects) these roots
    night_store = night_store_url(main.url, preset, run)
    logger.info("nightly %s %s at %s -> %s", preset, run, code["commit"], night_store)

    # Fingerprints are a pure function of the recipe, so every night's artifacts would hash alike:
    # the report carries the run as a tag, the rest is kept apart by the per-run store.
    overrides = {**(overrides or {}), "report": {**(overrides or {}).get("report", {}), "tag": nightly_tag(run)}}
    refs = speedrun(preset=preset, store=night_store, overrides=overrides, eval_bundle=eval_bundle,
                    chat_data=chat_data, nproc=nproc)
    report_ref = ArtifactRef.parse(next(r for r in refs.values() if r.startswith("report/")))
    summary = (main.manifest(report_ref) or open_store(night_store).push(report_ref, main)).metrics
    main.set_alias("report", f"nightly-{preset}-{run}", report_ref)
    for old in done if rerun == "replace" else []:  # the new row is in: now drop the ones it replaces
        replaced(main, preset, old)
        logger.info("rerun=replace: removed nightly %s %s (report and store root)", preset, old)
    for key in prune_nights(main, keep_nights):
        logger.info("retention: removed %s (keeping the newest %d nights)", key, keep_nights)

    prev = previous_nights(main, preset, run, history, recipe_id=summary.get("recipe_id"))
    regressions, table = compare(summary, [m for _, m in prev], alpha=alpha, core_noise=core_noise,
                                 bpb_noise=bpb_noise, slowdown=slowdown)
    lines = [f"# Nightly {preset} — {run}", "", f"commit `{code['commit']}`, recipe {recipe_key(summary)}, "
             f"report `{report_ref}` in {night_store}", ""]
    if prev:
        lines += [f"Compared with {len(prev)} earlier nightly run(s) of this recipe ({prev[0][0]} … {prev[-1][0]}):", "",
                  "| metric | tonight | limit | regressed | rule |", "|---|---:|---:|---|---|"]
        lines += [f"| {t['metric']} | {t['tonight']:.4g} | {t['limit']:.4g} | {'**yes**' if t['regressed'] else 'no'} | "
                  f"{t['rule']} |" for t in table]
        lines.append("")
    else:
        lines += ["No earlier night of this recipe to compare with.", ""]
    lines += ["**Regressions:** " + ("; ".join(regressions) if regressions else "none"), "", "## Leaderboard", "",
              format_stats(recipe_stats(rows(preset=preset)), "md"), "", format_rows(rows(preset=preset, limit=20), "md")]
    key = "nightly-" + "".join(c if c.isalnum() else "-" for c in preset.lower())
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=f"nightly {preset} {run}")
    for r in regressions:
        logger.warning("regression: %s", r)
    if regressions and fail_on_regression:
        raise RuntimeError(f"nightly {preset} {run} regressed: {'; '.join(regressions)}")
    return {"night": night, "run": run, "report": str(report_ref), "store": night_store,
            "regressions": regressions, "previous": prev[-1][0] if prev else None, "nights_compared": len(prev),
            "checks": table}

