"""Stage research_report: what a research run found (pipeline/research.py): verdicts, Δ vs the baseline
per depth with intervals, the promotion tree, the cost, and the command that reproduces each point.

    nanorun research --preset tiny --candidate lr=base.matrix_lr=0.4   # builds the points, then this
    nanorun show research_report@latest                                 # the verdicts (metrics)

Its config is the research's results without what depends on the invocation (which points were
cached, what this run spent): the candidates with their verdicts, each rung's tests and every
point's row (pipeline.sweep.point_row + candidate, rung, device-hours, command). So the artifact is
a pure function of the points' results, as sweep_report's: a rerun over the same cached points is a
cache hit, one more seed or candidate makes a new report.

Files: report.md, results.json (the config), points.csv (one row per point), delta.png (candidate −
baseline per depth with its 1 − 2 alpha interval, one panel per metric), promotion.png (the
promotion tree: each candidate's decision at each rung it reached). Method: docs/research.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stagekit.reporting import figure, g, pm, save_figure, write_csv
from stages.base import ConfigError, Input, StageConfig, identity, stage_logger

NAME = "research_report"
code_version = "1"
INPUTS: tuple[str, ...] = ()
log = stage_logger(NAME)

# decision at a rung -> (marker colour, label) in the promotion tree
DECISIONS = {"better": ("tab:green", "better: promoted"), "held back": ("tab:olive", "better, held back by --keep"),
             "not significant": ("tab:gray", "not significant"), "worse": ("tab:red", "worse"),
             "failed": ("black", "a point failed")}
# what the report keeps of pipeline.research's results: everything but what this invocation saw
KEPT = ("research", "candidates", "rungs", "rows", "total_hours", "stopped", "errors")
RUNG_KEYS = ("round", "depth", "candidates", "results")
ROW_DROP = ("cached",)
COLUMNS = ("candidate", "round", "rung", "point", "seed", "val_bpb", "core", "status", "hours", "pretrain", "core_eval",
           "command")


def report_config(results: dict) -> dict:
    """The stage's config for pipeline.research's results (what the flow and the CLI hand it)."""
    rungs = [{k: rung[k] for k in RUNG_KEYS} for rung in results["rungs"]]
    rows = [{k: v for k, v in row.items() if k not in ROW_DROP} for row in results["rows"]]
    kept = {k: results[k] for k in KEPT}
    return {"name": results["research"]["name"], "results": {**kept, "rungs": rungs, "rows": rows,
                                                            "total_hours": round(results["total_hours"], 6)}}


@dataclass(frozen=True)
class Config(StageConfig):
    name: str = identity("research", help="the research's name (the artifact label)")
    results: dict = identity(None, help="pipeline.research's results, as report_config() keeps them")

    def __post_init__(self):
        if not isinstance(self.results, dict) or set(KEPT) - set(self.results):
            raise ConfigError(f"research_report: results must be a dict with {', '.join(KEPT)} "
                              "(pipeline.research's results through report_config)")

    def label(self) -> str:
        return "".join(c if c.isalnum() or c in "_." else "_" for c in self.name) or "research"


# ---- markdown ------------------------------------------------------------------------------------------
def _interval(t) -> str:
    return "–" if t.get("ci_low") is None else f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]"


def promotion_lines(res: dict) -> list[str]:
    """The promotion tree as text: per round, per rung, who was tested and what each got."""
    lines = []
    for rnd in sorted({rung["round"] for rung in res["rungs"]}):
        lines.append(f"- round {rnd}")
        for rung in (x for x in res["rungs"] if x["round"] == rnd):
            said = [f"{name}: {rung['results'][name]['decision']}" for name in rung["candidates"]]
            lines.append(f"  - d{rung['depth']}: " + "; ".join(said))
    return lines or ["- no rung ran"]


def markdown(name: str, res: dict, images: list[str]) -> str:
    r = res["research"]
    pct = f"{1 - 2 * r['alpha']:.0%}"
    budget = "none" if r.get("budget") is None else f"{r['budget']:g} device-hours"
    lines = [f"# Research {name}", "",
             f"Recipe **{r['recipe']}**{' + ' + r['changes'] if r.get('changes') else ''}; "
             f"rungs {' → '.join(f'd{d}' for d in r['depths'])}, seeds {', '.join(map(str, r['seeds']))}; "
             f"metrics {', '.join(r['metrics'])}; one-sided Welch vs the baseline, Holm-corrected across each rung's "
             f"candidates, alpha {r['alpha']}; keep {r['keep'] or 'every significant candidate'}; budget {budget}. "
             "Method: docs/research.md.", "", "## Verdicts", "",
             "| candidate | changes | round | depths tried | verdict | why |", "|---|---|---:|---|---|---|"]
    for c in res["candidates"]:
        depths = ", ".join(f"d{d}" for d in c["depths"]) or "–"
        lines.append(f"| {c['name']} | {c['changes']} | {c['round']} | {depths} | **{c['verdict']}** | {c['reason']} |")
    if res["stopped"]:
        lines += ["", f"Stopped early: {res['stopped']}."]
    for err in res["errors"]:
        lines += ["", f"**Error**: {err}"]
    lines += ["", "## Promotion tree", "", *promotion_lines(res), "", "## Δ vs the baseline per rung", "",
              f"Δ = candidate − baseline, mean over seeds; {pct} Welch interval (its upper end below 0 for val_bpb, "
              "lower end above 0 for CORE, is a one-sided p below alpha before Holm); p = one-sided p that the "
              "candidate is better; Holm = that p adjusted across the rung's candidates.", "",
              "| round | rung | candidate | metric | n | baseline | candidate | Δ | " + pct + " CI | p | Holm | decision |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rung in res["rungs"]:
        for cand in rung["candidates"]:
            j = rung["results"][cand]
            for metric, t in j.get("tests", {}).items():
                lines.append(f"| {rung['round']} | d{rung['depth']} | {cand} | {metric} | {t['n_a']} / {t['n_b']} | "
                             f"{pm(t['mean_a'], t['sd_a'])} | {pm(t['mean_b'], t['sd_b'])} | {t['diff']:+.4f} | "
                             f"{_interval(t)} | {g(t['p_better'], '.3g')} | {g(j['p_better_holm'], '.3g')} | "
                             f"{j['decision']} |")
            if not j.get("tests"):
                lines.append(f"| {rung['round']} | d{rung['depth']} | {cand} | – | – | – | – | – | – | – | – | "
                             f"{j['decision']}: {j['reason']} |")
    lines += ["", "## Cost", "", "| rung | round | points | device-hours |", "|---|---:|---:|---:|"]
    for rung in res["rungs"]:
        rows = [x for x in res["rows"] if x["rung"] == rung["depth"] and x["round"] == rung["round"]]
        lines.append(f"| d{rung['depth']} | {rung['round']} | {len(rows)} | {sum(x['hours'] for x in rows):.4f} |")
    lines += ["", f"Total: {res['total_hours']:.4f} device-hours, measured (each point's wall time x its "
                  "devices, whenever it was built; the baseline's points are counted once per rung).", "",
              "## Points", "", "| candidate | point | val bpb | CORE | status | artifact | reproduce |",
              "|---|---|---:|---:|---|---|---|"]
    for x in res["rows"]:
        lines.append(f"| {x['candidate']} | {x['point']} | {g(x.get('val_bpb'), '.4f')} | {g(x.get('core'), '.4f')} | "
                     f"{x.get('status')} | {x.get('pretrain') or '–'} | `{x['command']}` |")
    lines += ["", *[f"![{Path(i).stem}]({i})" for i in images]]
    return "\n".join(lines) + "\n"


# ---- plots ---------------------------------------------------------------------------------------------
def _candidates_in_order(res) -> list[str]:
    return [c["name"] for c in res["candidates"]]


def plot_delta(out: Path, res: dict) -> str | None:
    """Candidate − baseline per depth, one line per candidate, its interval as error bars."""
    metrics = [m for m in res["research"]["metrics"]
               if any(m in j.get("tests", {}) for rung in res["rungs"] for j in rung["results"].values())]
    if not metrics:
        return None
    names = _candidates_in_order(res)
    fig, axes = figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for k, name in enumerate(names):
            pts = [(rung["depth"], rung["results"][name]["tests"][metric]) for rung in res["rungs"]
                   if metric in rung["results"].get(name, {}).get("tests", {})]
            if not pts:
                continue
            xs = [d + 0.06 * (k - (len(names) - 1) / 2) for d, _ in pts]  # side by side, not on top
            ys = [t["diff"] for _, t in pts]
            err = [[y - t["ci_low"] if t["ci_low"] is not None else 0 for y, (_, t) in zip(ys, pts)],
                   [t["ci_high"] - y if t["ci_high"] is not None else 0 for y, (_, t) in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, label=name)
        ax.axhline(0, color="k", lw=1)
        depths = res["research"]["depths"]
        ax.set_xticks(depths, [f"d{d}" for d in depths])
        better = "lower is better" if metric == "val_bpb" else "higher is better"
        ax.set(xlabel="depth (rung)", ylabel=f"Δ {metric} vs baseline",
               title=f"{metric}: candidate − baseline, {1 - 2 * res['research']['alpha']:.0%} CI ({better})")
    save_figure(fig, out, "delta.png", [])
    return "delta.png"


def plot_promotion(out: Path, res: dict) -> str | None:
    """The promotion tree: a row per candidate, a column per rung, the decision as a coloured marker,
    a line along the rungs it was promoted through."""
    names = _candidates_in_order(res)
    if not res["rungs"] or not names:
        return None
    fig, (ax,) = figure(1, 7)
    y = {name: i for i, name in enumerate(reversed(names))}
    seen = set()
    for name in names:
        path = [(rung["depth"], rung["results"][name]["decision"]) for rung in res["rungs"] if name in rung["results"]]
        ax.plot([d for d, _ in path], [y[name]] * len(path), "-", color="lightgray", zorder=1)
        for depth, decision in path:
            colour, label = DECISIONS[decision]
            ax.scatter([depth], [y[name]], s=120, color=colour, zorder=2, label=None if decision in seen else label)
            seen.add(decision)
    depths = res["research"]["depths"]
    ax.set_xticks(depths, [f"d{d}" for d in depths])
    ax.set_yticks(list(y.values()), list(y))
    ax.set(xlabel="rung", title="promotion tree: the decision at each rung reached", ylim=(-0.7, len(names) - 0.3))
    save_figure(fig, out, "promotion.png", [])
    return "promotion.png"


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    out, res = Path(out), cfg.results
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_csv(out / "points.csv", res["rows"], COLUMNS)
    images = [i for i in (plot_delta(out, res), plot_promotion(out, res)) if i]
    (out / "report.md").write_text(markdown(cfg.name, res, images))
    verdicts = {c["name"]: c["verdict"] for c in res["candidates"]}
    failed = [x["point"] for x in res["rows"] if x.get("status") != "ok"]
    log.info("research %s: %d candidates, %d points (%d failed) -> %s", cfg.name, len(verdicts), len(res["rows"]),
             len(failed), out / "report.md")
    return {"name": cfg.name, "verdicts": verdicts, "n_points": len(res["rows"]), "n_failed": len(failed),
            "device_hours": res["total_hours"]}
