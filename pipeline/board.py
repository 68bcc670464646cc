"""The leaderboard: one row per completed speedrun, from the run index (DuckDB). No Prefect here.

    nanorun leaderboard [--preset cpu-demo] [--store URL] [--limit N]   # fits 120 columns
    nanorun leaderboard --wide                  # every column: hardware, each stage's time, cost
    nanorun leaderboard --json | --csv          # every field, for tools (also --format json|csv)
    nanorun leaderboard --stats                 # per recipe: runs, mean ± sd of bpb, CORE, time, cost

A completed speedrun is a committed `report` artifact: its metrics are the row (stages/report.py,
summarize). Sorted like the public leaderboard: time to GPT-2 (CORE >= 0.256525 on the full
metric) first, fastest first; then CORE, best first; then newest.

A recipe is the preset's name plus the digest of everything the run was built with (stages/
reporting.py, recipe_digest), e.g. `tiny 3fa2c1`: runs that share a preset but not its overrides
(600 vs 1500 iterations) are different recipes; --stats and the regression marks never pool them.
Reports from before the digest show `tiny ?` and are pooled only with each other. Why: docs/reports.md.
"""
from __future__ import annotations

import csv
import io
import json

from stagekit.stats import regression_check
from pipeline.retention import night_run, run_order
from stagekit.reporting import short_time

STAGE_COLUMNS = ("data", "tokenizer", "base", "base_eval", "sft", "chat_eval", "export")

SQL = """
SELECT store, ref, committed_at,
       metrics->>'$.preset'                              AS preset,
       metrics->>'$.recipe_id'                           AS recipe_id,
       TRY_CAST(metrics->>'$.depth' AS INTEGER)          AS depth,
       metrics->>'$.date'                                AS date,
       metrics->>'$.commit'                              AS git_commit,
       metrics->>'$.hardware'                            AS hardware,
       TRY_CAST(metrics->>'$.total_seconds' AS DOUBLE)   AS total_seconds,
       TRY_CAST(metrics->>'$.training_time_s' AS DOUBLE) AS training_time_s,
       TRY_CAST(metrics->>'$.time_to_gpt2_s' AS DOUBLE)  AS time_to_gpt2_s,
       TRY_CAST(metrics->>'$.cost' AS DOUBLE)            AS cost,
       TRY_CAST(metrics->>'$.val_bpb' AS DOUBLE)         AS val_bpb,
       TRY_CAST(metrics->>'$.core' AS DOUBLE)            AS core,
       TRY_CAST(metrics->>'$.core_n_tasks' AS INTEGER)   AS core_n_tasks,
       metrics->>'$.core_label'                          AS core_label,
       metrics->'$.stage_seconds'                        AS stage_seconds,
       identity->>'$.tag'                                AS tag
FROM artifacts
WHERE stage = 'report' {where}
-- a report copied into another store (the nightly flow does) is the same run: count it once
QUALIFY row_number() OVER (PARTITION BY ref ORDER BY committed_at) = 1
ORDER BY time_to_gpt2_s ASC NULLS LAST, core DESC NULLS LAST, committed_at DESC
{limit}
"""


# The nightly check (also what the leaderboard's `regressed` column says of each night): the fixed
# tolerances stand in only until two earlier nights measure the noise.
DEFAULT_TOLERANCES = {"core_noise": 0.02, "bpb_noise": 0.02, "slowdown": 0.25}
# (summary key, lower is better, the flow parameter holding its fallback tolerance)
CHECKED = (("core", False, "core_noise"), ("val_bpb", True, "bpb_noise"), ("total_seconds", True, "slowdown"))
SHORT_NAMES = {"core": "CORE", "val_bpb": "bpb", "total_seconds": "time"}  # the regressed column


def compare(tonight: dict, history: list[dict], *, alpha: float = 0.01, core_noise: float = DEFAULT_TOLERANCES["core_noise"],
            bpb_noise: float = DEFAULT_TOLERANCES["bpb_noise"], slowdown: float = DEFAULT_TOLERANCES["slowdown"]) -> tuple[list[str], list[dict]]:
    """(regressions, one judgement row per metric) of tonight's summary against earlier nights'
    (oldest first).

    A regression is a value outside the run-to-run noise measured from the earlier nights: beyond
    the one-sided (1 - alpha) prediction limit of their mean and spread (stagekit.stats.
    regression_check). Until two earlier nights exist the spread is unknown, and the fixed
    tolerances stand in against the last night (CORE - core_noise, bpb + bpb_noise, time x (1 +
    slowdown)); the judgement row says which rule was used."""
    tolerance = {"core_noise": core_noise, "bpb_noise": bpb_noise, "slowdown": slowdown}
    out, table = [], []
    for key, lower, fallback in CHECKED:
        value, earlier = tonight.get(key), [h[key] for h in history if h.get(key) is not None]
        if value is None or not earlier:
            continue
        r = regression_check(earlier, value, lower_is_better=lower, alpha=alpha)
        if r["judged"]:
            rule = f"mean {r['mean']:.4g} ± {r['sd']:.2g} over {r['n']} nights, {1 - alpha:.0%} limit {r['limit']:.4g}"
        else:
            tol, prev = tolerance[fallback], earlier[-1]
            r["limit"] = prev * (1 + tol) if key == "total_seconds" else (prev + tol if lower else prev - tol)
            r["regressed"] = value > r["limit"] if lower else value < r["limit"]
            rule = f"last night {prev:.4g}, fixed tolerance {fallback}={tol} (noise needs 2+ earlier nights)"
        table.append({"metric": key, "tonight": value, **r, "rule": rule})
        if r["regressed"]:
            out.append(f"{key} {value:.4g} {'>' if lower else '<'} {r['limit']:.4g} ({rule})")
    return out, table


def nightly_tag(run: str) -> str:
    """The report tag of a nightly run (pipeline/retention.py names runs): the night without dashes,
    then the row's number from the second row of a night on (`2026-11-21-2` -> `20261121-2`). The
    tag is part of the report's identity: every run gets a report (and a leaderboard row) of its own."""
    night, n = run_order(run)
    return night.replace("-", "") + (f"-{n}" if n > 1 else "")


def _nightly_run(tag: str) -> tuple[str, int] | None:
    """(night, n) of a nightly report's tag (nightly_tag's inverse), None for a manual run's tag."""
    return run_order(f"{tag[:4]}-{tag[4:6]}-{tag[6:]}")


def recipe_key(r: dict) -> str:
    """The recipe a row belongs to: the preset and its recipe digest, shortened ("tiny 3fa2c1")."""
    if r.get("recipe"):
        return r["recipe"]
    preset = r.get("preset") or "?"
    return f"{preset} {r['recipe_id'][:6]}" if r.get("recipe_id") else (f"{preset} ?" if "recipe_id" in r else preset)


def _mark_nights(out: list[dict]) -> None:
    """Every row's recipe, run (a nightly's run id, e.g. 2026-12-05-2, else "manual") and finish
    time (YYYY-MM-DD HH:MM); for nightly rows, which metrics regressed against the earlier nights
    of the same recipe (compare(), as the flow judged)."""
    nights: dict[str, list[tuple[tuple[str, int], dict]]] = {}
    for r in out:
        run = _nightly_run(r.pop("tag") or "")
        r["recipe"] = recipe_key(r)
        r["run"] = night_run(*run) if run else "manual"
        r["date"] = short_time(r.get("date") or r.get("committed_at"))
        r["regressed"] = ""
        if run:
            nights.setdefault(r["recipe"], []).append((run, r))
    for runs in nights.values():
        rs = [r for _, r in sorted(runs, key=lambda x: x[0])]
        for i, r in enumerate(rs):
            regressions, _ = compare(r, rs[max(0, i - 14):i])
            r["regressed"] = ", ".join(SHORT_NAMES[x.split()[0]] for x in regressions)


def rows(index=None, *, store: str | None = None, preset: str | None = None, limit: int | None = None) -> list[dict]:
    """Leaderboard rows (dicts), best first."""
    from artifacts.index import RunIndex

    index = index or RunIndex()
    where, params = [], []
    if store:
        where.append("AND store = ?")
        params.append(store)
    if preset:
        where.append("AND metrics->>'$.preset' = ?")
        params.append(preset)
    sql = SQL.format(where=" ".join(where), limit=f"LIMIT {int(limit)}" if limit else "")
    out = []
    for r in index.query(sql, params):
        r = dict(r)
        secs = r.pop("stage_seconds")
        secs = json.loads(secs) if isinstance(secs, str) else (secs or {})
        for stage in STAGE_COLUMNS:
            r[f"{stage}_s"] = secs.get(stage)
        r["committed_at"] = str(r["committed_at"])
        out.append(r)
    _mark_nights(out)
    return out


def _hms(s) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _num(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _core_cell(r: dict) -> str:
    if r["core"] is None:
        return "–"
    partial = r["core_n_tasks"] is not None and r["core_n_tasks"] < 22
    return f"{r['core']:.4f}" + (f" {r['core_n_tasks']}/22" if partial else "")


# (header, cell) of the default view: what tells runs apart and how they did, in 120 columns
NARROW = (("date", lambda r: r["date"]), ("run", lambda r: r["run"]), ("recipe", lambda r: r["recipe"]),
          ("commit", lambda r: (r["git_commit"] or "?")[:7]), ("total", lambda r: _hms(r["total_seconds"])),
          ("to GPT-2", lambda r: _hms(r["time_to_gpt2_s"])), ("val bpb", lambda r: _num(r["val_bpb"], 4)),
          ("CORE", _core_cell), ("regressed", lambda r: r["regressed"] or "–"))
WIDE = (("#", None), *NARROW[:4], ("depth", lambda r: str(r["depth"])), ("hardware", lambda r: r["hardware"] or "?"),
        *NARROW[4:6], ("pretrain time", lambda r: _hms(r["training_time_s"])),
        *[(s, lambda r, s=s: _hms(r[f"{s}_s"])) for s in STAGE_COLUMNS],
        ("cost", lambda r: "–" if r["cost"] is None else f"${r['cost']:.2f}"), *NARROW[6:])


def format_rows(rows: list[dict], fmt: str = "md", wide: bool = False) -> str:
    """The rows as a Markdown table (the default view fits 120 columns; wide: every column) or, for
    tools, as JSON or CSV with every field."""
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}: md, csv or json")
    columns = WIDE if wide else NARROW
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for i, r in enumerate(rows, 1):
        lines.append("| " + " | ".join(str(i) if cell is None else cell(r) for _, cell in columns) + " |")
    if not rows:
        lines.append("(no completed speedrun in the run index yet: run `nanorun speedrun`)")
    return "\n".join(lines) + "\n"


# ---- mean ± spread per recipe -----------------------------------------------------------------------
STAT_COLUMNS = (("val_bpb", "val bpb", 4), ("core", "CORE", 4), ("total_seconds", "total", None),
                ("time_to_gpt2_s", "to GPT-2", None), ("cost", "cost", 2))


def recipe_stats(rows: list[dict]) -> list[dict]:
    """Per recipe (preset and its digest, recipe_key): the number of runs and, per metric, mean,
    sample sd and count (stagekit.stats)."""
    from stagekit.stats import mean_spread

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(recipe_key(r), []).append(r)
    out = []
    for recipe, rs in sorted(by.items()):
        entry = {"recipe": recipe, "preset": rs[0].get("preset") or "?", "runs": len(rs)}
        for key, _, _ in STAT_COLUMNS:
            mean, sd, n = mean_spread([r.get(key) for r in rs])
            entry.update({key: mean, f"{key}_sd": sd, f"{key}_n": n})
        out.append(entry)
    return out


def _pm(mean, sd, digits) -> str:
    if mean is None:
        return "–"
    if digits is None:  # seconds
        return _hms(mean) + (f" ± {sd:.0f}s" if sd is not None else "")
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def format_stats(stats: list[dict], fmt: str = "md") -> str:
    if fmt in ("json", "csv"):
        return format_rows(stats, fmt)
    head = ["recipe", "runs", *[label for _, label, _ in STAT_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for e in stats:
        lines.append("| " + " | ".join([e["recipe"], str(e["runs"]),
                                         *[_pm(e[k], e[f"{k}_sd"], d) for k, _, d in STAT_COLUMNS]]) + " |")
    if not stats:
        lines.append("(no completed speedrun in the run index yet)")
    return "\n".join(lines) + "\n"
