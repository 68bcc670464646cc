"""The nightly leaderboard reproduction (deployment `nightly-leaderboard`, cron 03:00 UTC).

Each night the pinned recipe runs from scratch into its own store root,
`{store}/@nightly/{preset}/{YYYY-MM-DD}` (a reproduction must not be a cache hit on yesterday's
artifacts), its report is copied into the main store under the alias
`report@nightly-{preset}-{date}` (so it lands on `nanorun leaderboard`), and it is compared with
the previous night's: CORE or bpb worse than the noise threshold, or a run slower by more than the
allowed fraction, is a regression. The comparison is published as a Markdown artifact; with
fail_on_regression the flow run then fails so that notifications fire.

    prefect deployment run 'nightly-leaderboard/nightly-leaderboard' --param commit=<sha>
"""
from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from artifacts import open_store
from artifacts.manifest import ArtifactRef
from artifacts.provenance import git_state
from flows.board import format_rows, rows
from flows.retention import keep_nights_default, night_store_url, prune_nights
from flows.speedrun import speedrun


def compare(tonight: dict, previous: dict | None, *, core_noise: float, bpb_noise: float, slowdown: float) -> list[str]:
    """Regressions of tonight's summary against the previous night's (empty: none)."""
    if previous is None:
        return []
    out = []
    if tonight.get("core") is not None and previous.get("core") is not None:
        if tonight["core"] < previous["core"] - core_noise:
            out.append(f"CORE {tonight['core']:.4f} < {previous['core']:.4f} - {core_noise} (noise)")
    if tonight.get("val_bpb") is not None and previous.get("val_bpb") is not None:
        if tonight["val_bpb"] > previous["val_bpb"] + bpb_noise:
            out.append(f"val bpb {tonight['val_bpb']:.4f} > {previous['val_bpb']:.4f} + {bpb_noise} (noise)")
    t, p = tonight.get("total_seconds"), previous.get("total_seconds")
    if t and p and t > p * (1 + slowdown):
        out.append(f"wall time {t:.0f}s > {p:.0f}s x {1 + slowdown:.2f}")
    return out


def previous_night(store, preset: str, night: str) -> tuple[str, dict] | None:
    """(date, report summary) of the latest night before `night` with a report alias in `store`."""
    prefix = f"nightly-{preset}-"
    dates = sorted(name.split("@", 1)[1][len(prefix):] for name in store.aliases("report")
                   if name.split("@", 1)[1].startswith(prefix))
    earlier = [d for d in dates if d < night]
    if not earlier:
        return None
    ref = store.get_alias("report", prefix + earlier[-1])
    return earlier[-1], store.require(ref).metrics


@flow(name="nightly-leaderboard", log_prints=True, validate_parameters=True)
def nightly_leaderboard(preset: str = "cpu-demo", overrides: dict[str, dict] | None = None, store: str | None = None,
                        commit: str | None = None, eval_bundle: str | None = None, chat_data: str | None = None,
                        nproc: int | None = None,
                        date: str | None = None, core_noise: float = 0.02, bpb_noise: float = 0.02,
                        slowdown: float = 0.25, fail_on_regression: bool = True,
                        keep_nights: int | None = None) -> dict:
    """Reproduce the pinned recipe, append it to the leaderboard, flag regressions vs last night.

    commit: the git commit the reproduction must run at (the worker's checkout is checked; pin the
    deployment's code to it). date: the night (YYYY-MM-DD, default today in UTC). keep_nights: how many
    nights' store roots to keep (default $NANORUN_KEEP_NIGHTS or 7; their reports stay regardless)."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    code = git_state()
    if commit and not (code["commit"] or "").startswith(commit):
        raise ValueError(f"nightly-leaderboard is pinned to commit {commit}, but the worker runs "
                         f"{code['commit'] or 'an unknown commit'}: check out {commit} in the worker's repository")
    if commit and code["dirty"]:
        raise ValueError(f"nightly-leaderboard is pinned to {commit}, but the worker's checkout has local changes")
    keep_nights = keep_nights or keep_nights_default()
    night = date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    dt.date.fromisoformat(night)  # refuse a malformed date with Python's own message
    main = open_store(store)
    # "@nightly" is not a stage name: the main store never lists (or garbage-collects) these roots
    night_store = night_store_url(main.url, preset, night)
    logger.info("nightly %s %s at %s -> %s", preset, night, code["commit"], night_store)

    # Fingerprints are a pure function of the recipe, so every night's artifacts would hash alike:
    # the report carries the night as a tag, the rest is kept apart by the per-night store.
    overrides = {**(overrides or {}), "report": {**(overrides or {}).get("report", {}), "tag": night.replace("-", "")}}
    refs = speedrun(preset=preset, store=night_store, overrides=overrides, eval_bundle=eval_bundle,
                    chat_data=chat_data, nproc=nproc)
    report_ref = ArtifactRef.parse(next(r for r in refs.values() if r.startswith("report/")))
    summary = (main.manifest(report_ref) or open_store(night_store).push(report_ref, main)).metrics
    main.set_alias("report", f"nightly-{preset}-{night}", report_ref)
    for key in prune_nights(main, keep_nights):
        logger.info("retention: removed %s (keeping the newest %d nights)", key, keep_nights)

    prev = previous_night(main, preset, night)
    regressions = compare(summary, prev[1] if prev else None, core_noise=core_noise, bpb_noise=bpb_noise,
                          slowdown=slowdown)
    lines = [f"# Nightly {preset} — {night}", "", f"commit `{code['commit']}`, report `{report_ref}` in {night_store}", ""]
    if prev:
        p = prev[1]
        lines += [f"Compared with {prev[0]}:", "", "| metric | previous | tonight |", "|---|---:|---:|"]
        for key in ("core", "val_bpb", "total_seconds"):
            lines.append(f"| {key} | {p.get(key)} | {summary.get(key)} |")
        lines.append("")
    else:
        lines += ["No earlier night to compare with.", ""]
    lines += ["**Regressions:** " + ("; ".join(regressions) if regressions else "none"), "",
              "## Leaderboard", "", format_rows(rows(preset=preset, limit=20), "md")]
    key = "nightly-" + "".join(c if c.isalnum() else "-" for c in preset.lower())
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=f"nightly {preset} {night}")
    for r in regressions:
        logger.warning("regression: %s", r)
    if regressions and fail_on_regression:
        raise RuntimeError(f"nightly {preset} {night} regressed: {'; '.join(regressions)}")
    return {"night": night, "report": str(report_ref), "store": night_store, "regressions": regressions,
            "previous": prev[0] if prev else None}
