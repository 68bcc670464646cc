"""Stage sweep_report: the table, fits and plots of a sweep or an A/B comparison (pipeline/sweep.py).

    nanorun sweep --preset tiny --eval-bundle ../shared/data/eval_bundle   # builds the points, then this
    nanorun show sweep_report@latest                                        # the fitted exponents (metrics)

Its config holds one row per point (pipeline.sweep.point_row: depth, params, tokens, FLOPs, val bpb,
CORE, times, the pretrain / core_eval refs), so the artifact is a pure function of the points'
results: a rerun over the same cached points is a cache hit, a new point makes a new report.

Files (kind "sweep"): results.csv (one row per point), report.md, analysis.json, bpb_vs_flops.png
(val bpb vs FLOPs per depth, the compute-optimal frontier, the isoFLOP optima), scaling_fits.png
(N_opt(C) and D_opt(C) with fitted exponents ± standard error; 2+ FLOP budgets), core_vs_flops.png
(when CORE was run). Kind "compare": results.csv, report.md, analysis.json, compare.png (B - A per
grid cell with its confidence interval). Method: stagekit/stats.py; what a compare report states (the
arms, one verdict over all cells) and when a fit is shown: docs/reports.md.

The rows are in the run index too (the artifact's identity), one per point (`RunIndex().query`):
    SELECT r->>'point' AS point, TRY_CAST(r->>'val_bpb' AS DOUBLE) AS val_bpb FROM (SELECT
        unnest(from_json(identity->'rows', '["JSON"]')) AS r FROM artifacts WHERE stage = 'sweep_report')
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stagekit.reporting import figure as _figure
from stagekit.reporting import g as _g
from stagekit.reporting import pm as _pm
from stagekit.reporting import save_figure as _save
from stagekit.reporting import write_csv
from stagekit.stats import isoflop_optimum, mean_spread, pareto_frontier, power_law_fit, stouffer, verdict, welch
from stages.base import ConfigError, Input, StageConfig, identity, stage_logger

NAME = "sweep_report"
code_version = "3"  # 3: compare cells carry a bootstrap CI
INPUTS: tuple[str, ...] = ()
log = stage_logger(NAME)

BASE_COLUMNS = ("point", "arm", "cell", "depth", "seed", "target_flops", "ratio", "model_dim", "params",
                "scaling_params", "iterations", "batch_tokens", "tokens", "flops", "tokens_per_param", "val_bpb",
                "core", "training_time_s", "wall_time_s", "status", "pretrain", "core_eval")


@dataclass(frozen=True)
class Config(StageConfig):
    name: str = identity("sweep", help="the sweep's name (the artifact label)")
    kind: str = identity("sweep", help="sweep (scaling fits) | compare (A/B statistics per grid cell)")
    rows: tuple = identity((), help="one dict per point (pipeline.sweep.point_row)")
    confidence: float = identity(0.95, help="confidence level of intervals; 1 - it is the test's alpha")
    arms: tuple = identity((), help="compare: (arm, what it changes) pairs, stated in report.md, results.csv "
                                    "and the plot")

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(dict(r) for r in self.rows))
        object.__setattr__(self, "arms", tuple((str(a), str(d)) for a, d in self.arms))
        if self.kind not in ("sweep", "compare"):
            raise ConfigError(f"sweep_report.kind={self.kind!r}: sweep or compare")
        if not self.rows:
            raise ConfigError("sweep_report: no rows (a sweep has at least one point)")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"sweep_report.confidence={self.confidence}: in [0.5, 1)")
        if self.kind == "compare" and len({r.get("arm") for r in self.rows}) != 2:
            raise ConfigError("sweep_report: a comparison needs rows of exactly two arms")

    def label(self) -> str:
        return "".join(c if c.isalnum() or c in "_." else "_" for c in self.name) or "sweep"


METRICS = (("val_bpb", True), ("core", False))  # (metric, lower is better)


# ---- analysis (pure) -------------------------------------------------------------------------------
def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("val_bpb") is not None and r.get("flops")]


def cells(rows) -> list[dict]:
    """Points averaged over seeds: one dict per (arm, cell) with val bpb / CORE mean and spread."""
    groups = defaultdict(list)
    for r in _ok(rows):
        groups[(r["arm"], r["cell"])].append(r)
    out = []
    for (arm, cell), rs in groups.items():
        bpb, bpb_sd, n = mean_spread([r["val_bpb"] for r in rs])
        core, core_sd, _ = mean_spread([r["core"] for r in rs])
        first = rs[0]
        out.append({"arm": arm, "cell": cell, "depth": first["depth"], "target_flops": first["target_flops"],
                    "n": n, "val_bpb": bpb, "val_bpb_sd": bpb_sd, "core": core, "core_sd": core_sd,
                    **{k: mean_spread([r[k] for r in rs])[0] for k in ("scaling_params", "tokens", "flops")}})
    return sorted(out, key=lambda c: (c["arm"], c["target_flops"] or 0, c["depth"] or 0, c["cell"]))


# A scaling law is fitted only through 3+ budgets: through 2 points a line always fits exactly (no
# error to report), and the exponent's CI from 3 points is already wide.
MIN_FIT_BUDGETS = 3


def frontier(cs: list[dict]) -> list[dict]:
    """The compute-optimal frontier: per FLOP budget the cell with the lowest val bpb, cheapest budget
    first. Without budgets (a grid over depth or ratio only) every cell is its own budget and the
    frontier is the cells that no cheaper cell beats."""
    budgets = defaultdict(list)
    for c in cs:
        if c["target_flops"]:
            budgets[c["target_flops"]].append(c)
    if budgets:
        return [min(group, key=lambda c: c["val_bpb"]) for _, group in sorted(budgets.items())]
    return [cs[i] for i in pareto_frontier([c["flops"] for c in cs], [c["val_bpb"] for c in cs])]


def analyze_sweep(rows) -> dict:
    """IsoFLOP optima per budget, N_opt(C) / D_opt(C) power laws, the frontier and its bpb(C) law
    (each law only through MIN_FIT_BUDGETS or more budgets)."""
    cs = cells(rows)
    budgets = defaultdict(list)
    for c in cs:
        if c["target_flops"]:
            budgets[c["target_flops"]].append(c)
    optima = []
    for budget, group in sorted(budgets.items()):
        if len(group) < 2:
            continue
        n, d, bpb, how = isoflop_optimum([c["scaling_params"] for c in group], [c["val_bpb"] for c in group],
                                         [c["tokens"] for c in group])
        optima.append({"flops": budget, "params": n, "tokens": d, "ratio": d / n, "val_bpb": bpb, "method": how})
    out = {"n_points": len(rows), "n_ok": len(_ok(rows)), "cells": cs, "optima": optima}
    if len(optima) >= MIN_FIT_BUDGETS:
        flops = [o["flops"] for o in optima]
        out["n_opt_fit"] = power_law_fit(flops, [o["params"] for o in optima]).to_dict()
        out["d_opt_fit"] = power_law_fit(flops, [o["tokens"] for o in optima]).to_dict()
    front = frontier(cs)
    out["frontier"] = [c["cell"] for c in front]
    if len(front) >= MIN_FIT_BUDGETS:
        out["bpb_fit"] = power_law_fit([c["flops"] for c in front], [c["val_bpb"] for c in front]).to_dict()
    return out


def analyze_compare(rows, confidence: float, overrides: dict[str, str] | None = None) -> dict:
    """Per grid cell: B - A on val bpb (and CORE where run) over seeds, Welch's t-test, a verdict;
    then per metric one verdict over all cells (stagekit.stats.stouffer). `overrides`: what each arm changes."""
    arms = sorted({r["arm"] for r in rows}, key=lambda a: (a != "A", a))
    a_name, b_name = arms[0], arms[1]
    by = defaultdict(lambda: defaultdict(list))
    for r in _ok(rows):
        by[r["cell"]][r["arm"]].append(r)
    order = sorted(by, key=lambda c: (by[c][a_name] or by[c][b_name])[0]["depth"] or 0)
    out, tests = [], defaultdict(list)
    for cell in order:
        a, b = by[cell][a_name], by[cell][b_name]
        entry = {"cell": cell, "depth": (a or b)[0]["depth"]}
        for metric, lower in METRICS:
            va = [r[metric] for r in a if r[metric] is not None]
            vb = [r[metric] for r in b if r[metric] is not None]
            if va and vb:
                w = welch(va, vb, confidence)
                tests[metric].append(w)
                entry[metric] = {**w.to_dict(), "verdict": verdict(w, lower_is_better=lower)}
        out.append(entry)
    pooled = {}
    for metric, lower in METRICS:
        p = stouffer(tests[metric])
        if p is not None:
            pooled[metric] = {**p.to_dict(), "verdict": verdict(p, lower_is_better=lower)}
    return {"arms": [a_name, b_name], "arm_overrides": {k: (overrides or {}).get(k, "") for k in (a_name, b_name)},
            "n_points": len(rows), "n_ok": len(_ok(rows)), "cells": out, "pooled": pooled, "confidence": confidence}


# ---- files ---------------------------------------------------------------------------------------------
def _fit_line(label: str, fit: dict) -> str:
    lo, hi = fit["slope_ci95"]
    return f"- {label}: exponent {fit['slope']:.3f} ± {fit['slope_se']:.2g} (SE; 95% CI [{lo:.3f}, {hi:.3f}], n={fit['n']})"


def sweep_markdown(name: str, rows, a: dict, images: list[str]) -> str:
    lines = [f"# Sweep {name}", "", f"{a['n_ok']} of {a['n_points']} points done. Mean ± sd over seeds.", "",
             "| point | depth | FLOP budget | scaling params | tokens | tokens/param | FLOPs | val bpb | CORE | n |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in a["cells"]:
        ratio = c["tokens"] / c["scaling_params"] if c["tokens"] and c["scaling_params"] else None
        lines.append(f"| {c['cell']} | {c['depth']} | {_g(c['target_flops'], '.3g')} | {_g(c['scaling_params'], ',.0f')} | "
                     f"{_g(c['tokens'], ',.0f')} | {_g(ratio, '.2f')} | {_g(c['flops'], '.3g')} | "
                     f"{_pm(c['val_bpb'], c['val_bpb_sd'])} | {_pm(c['core'], c['core_sd'])} | {c['n']} |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", f"**{len(failed)} failed point(s)** (rerun the sweep to retry them):", ""]
        lines += [f"- {r['point']}: {r['status']}" for r in failed]
    lines += ["", "## Compute-optimal models", ""]
    if a["optima"]:
        lines += ["| FLOP budget | N_opt | D_opt | tokens/param | val bpb | from |", "|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {o['flops']:.3g} | {o['params']:,.0f} | {o['tokens']:,.0f} | {o['ratio']:.2f} | {o['val_bpb']:.4f} | "
                  f"{o['method']} |" for o in a["optima"]]
        lines.append("")
    need = f"a fit needs {MIN_FIT_BUDGETS}+"
    if "n_opt_fit" in a:
        lines += [_fit_line("N_opt ∝ C^a", a["n_opt_fit"]), _fit_line("D_opt ∝ C^b", a["d_opt_fit"])]
    elif not a["optima"]:
        lines.append(f"- no isoFLOP curve: N_opt(C) and D_opt(C) need FLOP budgets (target_flops) with 2+ depths "
                     f"each, {MIN_FIT_BUDGETS}+ budgets: add them (--flops)")
    else:
        lines.append(f"- no N_opt(C) / D_opt(C) fit: {len(a['optima'])} budget(s) with an isoFLOP optimum, {need}: "
                     f"add {MIN_FIT_BUDGETS - len(a['optima'])} more FLOP budget(s) (--flops) with 2+ depths each")
    if "bpb_fit" in a:
        lines.append(_fit_line("frontier val bpb ∝ C^c (best point per budget)", a["bpb_fit"]))
    else:
        lines.append(f"- no frontier fit: {len(a['frontier'])} budget(s) with points, {need}: add "
                     f"{MIN_FIT_BUDGETS - len(a['frontier'])} more FLOP budget(s) (--flops)")
    lines += ["", *[f"![{Path(i).stem}]({i})" for i in images]]
    return "\n".join(lines) + "\n"


def _arm(a: dict, arm: str) -> str:
    return f"{arm} ({a['arm_overrides'][arm]})" if a["arm_overrides"].get(arm) else arm


def _says(B: str, A: str, v: str) -> str:
    return f"{B} {v} than {A}" if v in ("better", "worse") else v


def _interval(low, high) -> str:
    return "–" if low is None else f"[{low:+.4f}, {high:+.4f}]"


def compare_markdown(name: str, rows, a: dict, image: str | None) -> str:
    A, B = a["arms"]
    pct = f"{a['confidence']:.0%}"
    lines = [f"# Compare {name}: {B} vs {A}", "", f"- **{A}**: {a['arm_overrides'][A] or '(not stated)'}",
             f"- **{B}**: {a['arm_overrides'][B] or '(not stated)'}", "", "## Verdict over all cells", ""]
    for metric, p in a["pooled"].items():
        lines.append(f"- {metric}: **{_says(B, A, p['verdict'])}** (mean Δ {p['diff']:+.4f} over {p['k']} cell(s); "
                     f"Stouffer's Z {p['z']:+.2f}, two-sided p {p['p']:.3g})")
    if not a["pooled"]:
        lines.append("- no cell has 2+ seeds in both arms: nothing to judge (add seeds)")
    lines += ["", "Stouffer's method: each cell's Welch t gives a one-sided p_i = P(T > t_i), z_i = Φ⁻¹(1 − p_i); "
              "Z = Σ z_i / √k is standard normal when B and A do not differ anywhere; p = 2 (1 − Φ(|Z|)). "
              "Mean Δ weighs the cells equally.", "", "## Per cell", "",
             f"{a['n_ok']} of {a['n_points']} points done. Δ = {B} − {A}, mean over seeds; {pct} CI and two-sided "
             "p from Welch's t-test; bootstrap: a seeded percentile bootstrap CI of Δ that assumes no normality "
             "(docs/reports.md).", "",
             f"| cell | metric | n {A} / {B} | {A} | {B} | Δ | {pct} CI | {pct} bootstrap | p | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in a["cells"]:
        for metric in ("val_bpb", "core"):
            w = c.get(metric)
            if not w:
                continue
            ci, boot = (_interval(w.get(lo), w.get(hi)) for lo, hi in (("ci_low", "ci_high"), ("boot_low", "boot_high")))
            lines.append(f"| {c['cell']} | {metric} | {w['n_a']} / {w['n_b']} | {_pm(w['mean_a'], w['sd_a'])} | "
                         f"{_pm(w['mean_b'], w['sd_b'])} | {w['diff']:+.4f} | {ci} | {boot} | {_g(w['p'], '.3g')} | "
                         f"**{w['verdict']}** |")
    lines += ["", "Verdicts:", ""]
    for c in a["cells"]:
        parts = [f"{m}: " + _says(B, A, c[m]["verdict"]) for m, _ in METRICS if c.get(m)]
        lines.append(f"- {c['cell']}: " + ("; ".join(parts) if parts else "no finished pair"))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", f"**{len(failed)} failed point(s)**:", "", *[f"- {r['point']}: {r['status']}" for r in failed]]
    if image:
        lines += ["", f"![compare]({image})"]
    return "\n".join(lines) + "\n"


def _per_depth(ax, cs: list[dict], metric: str) -> None:
    """One line per depth across FLOPs, error bars = sd over seeds."""
    for depth in sorted({c["depth"] for c in cs}):
        pts = sorted((c for c in cs if c["depth"] == depth), key=lambda c: c["flops"])
        ax.errorbar([c["flops"] for c in pts], [c[metric] for c in pts], yerr=[c[f"{metric}_sd"] or 0 for c in pts],
                    fmt="o-", capsize=3, label=f"d{depth}")


def plot_sweep(out: Path, a: dict) -> list[str]:
    cs, written = a["cells"], []
    fig, (ax,) = _figure(1, 7)
    _per_depth(ax, cs, "val_bpb")
    front = sorted((c for c in cs if c["cell"] in a["frontier"]), key=lambda c: c["flops"])
    ax.plot([c["flops"] for c in front], [c["val_bpb"] for c in front], "k--", lw=1.5, label="compute-optimal frontier")
    if a["optima"]:
        ax.scatter([o["flops"] for o in a["optima"]], [o["val_bpb"] for o in a["optima"]], marker="*", s=180,
                   c="gold", edgecolors="black", zorder=5, label="isoFLOP optimum")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="val bits per byte", title="val bpb vs FLOPs per depth")
    _save(fig, out, "bpb_vs_flops.png", written)
    if "n_opt_fit" in a:
        fig, axes = _figure(2)
        flops = [o["flops"] for o in a["optima"]]
        for ax, key, fit, what in ((axes[0], "params", a["n_opt_fit"], "N_opt (scaling params)"),
                                   (axes[1], "tokens", a["d_opt_fit"], "D_opt (tokens)")):
            ax.loglog(flops, [o[key] for o in a["optima"]], "o", ms=8)
            lo, hi = math.log10(min(flops)) - 0.2, math.log10(max(flops)) + 0.2
            xs = [10 ** (lo + (hi - lo) * i / 50) for i in range(51)]
            se = f" ± {fit['slope_se']:.2g}" if fit["slope_se"] is not None else ""
            ax.plot(xs, [10 ** (fit["intercept"] + fit["slope"] * math.log10(x)) for x in xs], "r--",
                    label=f"∝ C^{fit['slope']:.3f}{se}")
            ax.set(xlabel="FLOP budget C", ylabel=what, title=f"{what} vs compute")
        _save(fig, out, "scaling_fits.png", written)
    with_core = [c for c in cs if c["core"] is not None]
    if with_core:
        fig, (ax,) = _figure(1, 7)
        _per_depth(ax, with_core, "core")
        ax.set(xscale="log", xlabel="training FLOPs", ylabel="CORE", title="CORE vs FLOPs per depth")
        _save(fig, out, "core_vs_flops.png", written)
    return written


def compare_figure(a: dict):
    """B - A per cell with its CI, one panel per metric, the arms' overrides in the legend (None: no pair)."""
    metrics = [m for m, _ in METRICS if any(c.get(m) for c in a["cells"])]
    if not metrics:
        return None
    A, B = a["arms"]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        cs = [c for c in a["cells"] if c.get(metric)]
        xs = list(range(len(cs)))
        ys = [c[metric]["diff"] for c in cs]
        err = [[(y - c[metric]["ci_low"]) if c[metric]["ci_low"] is not None else 0 for y, c in zip(ys, cs)],
               [(c[metric]["ci_high"] - y) if c[metric]["ci_high"] is not None else 0 for y, c in zip(ys, cs)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=5, label=f"{_arm(a, B)} − {_arm(a, A)}")
        ax.axhline(0, color="k", lw=1)
        ax.set_xticks(xs, [c["cell"] for c in cs], rotation=30, fontsize=8)
        better = "lower is better" if metric == "val_bpb" else "higher is better"
        ax.set(ylabel=f"Δ {metric} ({B} − {A})", title=f"{metric}: {B} − {A}, {a['confidence']:.0%} CI ({better})")
    return fig


def plot_compare(out: Path, a: dict) -> str | None:
    fig = compare_figure(a)
    if fig is None:
        return None
    _save(fig, out, "compare.png", [])
    return "compare.png"


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    out = Path(out)
    arms = dict(cfg.arms)
    rows = [{**r, "arm_overrides": arms.get(r.get("arm"), "")} if arms else r for r in cfg.rows]
    write_csv(out / "results.csv", rows, BASE_COLUMNS)
    failed = [r["point"] for r in rows if r.get("status") != "ok"]
    if cfg.kind == "sweep":
        a = analyze_sweep(rows)
        images = plot_sweep(out, a) if a["cells"] else []
        (out / "report.md").write_text(sweep_markdown(cfg.name, rows, a, images))
        metrics = {k: a.get(k) for k in ("n_opt_fit", "d_opt_fit", "bpb_fit", "optima") if a.get(k) is not None}
    else:
        a = analyze_compare(rows, cfg.confidence, arms)
        image = plot_compare(out, a)
        (out / "report.md").write_text(compare_markdown(cfg.name, rows, a, image))
        metrics = {"verdicts": {c["cell"]: {m: c[m]["verdict"] for m in ("val_bpb", "core") if c.get(m)}
                                for c in a["cells"]},
                   "pooled": {m: p["verdict"] for m, p in a["pooled"].items()}}
    (out / "analysis.json").write_text(json.dumps(a, indent=1, default=str) + "\n")
    log.info("%s %s: %d points, %d failed -> %s", cfg.kind, cfg.name, len(rows), len(failed), out / "report.md")
    return {"kind": cfg.kind, "name": cfg.name, "n_points": len(rows), "n_failed": len(failed), "failed": failed,
            **metrics}
