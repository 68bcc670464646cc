"""The run report's content, shared by the report stage (report.md, the leaderboard row) and the
export stage (the model card): a summary of a run from its stages' manifests, and its Markdown; the
RL curves (the rl stage's rl_curve.png, the report's rl.png).
Also the tables and figures the sweep and research reports share (write_csv, g, pm, figure,
save_figure). Not a stage: stages import it instead of each other.

    from stagekit.reporting import summarize, render_markdown
    summary = summarize({"base": m_pretrain, "base_eval": m_core, ...}, preset="cpu-demo")
    markdown = render_markdown(summary, manifests, "nanorun speedrun cpu-demo", images={"loss": "loss.png"})
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from artifacts.manifest import Manifest

GPT2_CORE = {"GPT-2 124M": 0.113891, "GPT-2 1.5B": 0.256525}


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def short_time(stamp) -> str:
    """An ISO time as "YYYY-MM-DD HH:MM" (UTC as recorded), the one date format of reports and the
    leaderboard; "?" when unknown."""
    if not stamp:
        return "?"
    return str(stamp)[:16].replace("T", " ")


def gpt2_rows(core: Manifest | None) -> list[tuple[str, float]]:
    """(label, GPT-2's CORE) to show beside this run's CORE: over the same tasks when the run
    evaluated only some of them (the whole-metric number would compare different task sets)."""
    from core.eval.core import GPT2_REFERENCE, reference_core

    tasks = (core.metrics.get("tasks") or {}) if core else {}
    total = core.metrics.get("total_tasks") if core else None
    if not tasks or len(tasks) == total:
        return [(f"{name} CORE", v) for name, v in GPT2_CORE.items()]
    out = []
    for name, v in GPT2_CORE.items():
        same = reference_core(GPT2_REFERENCE[name], {t: r["random_baseline"] for t, r in tasks.items()})
        out.append((f"{name} CORE over the same {len(tasks)} tasks (all {total or '?'}: {v:.6f})", same)
                   if same is not None else (f"{name} CORE (all tasks; not the run's tasks)", v))
    return out


def stage_seconds(m: Manifest) -> float | None:
    """How long building this artifact took (training stages: every attempt, resumes included)."""
    if m.metrics.get("wall_time_s") is not None:
        return float(m.metrics["wall_time_s"])
    return m.provenance.get("duration_s")


def _chat_scores(metrics: dict) -> dict:
    """ChatCORE (chatcore: all five tasks ran; else chatcore_partial, the mean over those that did,
    shown under its label) and each chat task's accuracy (not the evaluation's own bookkeeping)."""
    key = "chatcore" if metrics.get("chatcore") is not None else "chatcore_partial"
    scores = {key: metrics[key]} if metrics.get(key) is not None else {}
    for task, r in (metrics.get("tasks") or {}).items():
        if isinstance(r, dict) and r.get("accuracy") is not None:
            scores[f"{task} accuracy"] = r["accuracy"]
    return scores


# Where an input came from, not what it is: left out of the recipe's identity when the artifact also
# records its content's digest (the same eval bundle from another folder is the same recipe).
LOCATION_KEYS = ("url", "source")


def recipe_digest(manifests: dict[str, Manifest]) -> str:
    """What the run trained and evaluated, as a short digest: every stage's identity config (the
    preset's values plus every override), so the leaderboard groups and the nightly judges only
    runs of the same recipe, never two runs that merely share a preset's name."""
    ident = {}
    for role, m in manifests.items():
        located = bool(m.identity.get("content_digest"))
        ident[role] = {k: v for k, v in m.identity.items() if not (located and k in LOCATION_KEYS)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def summarize(manifests: dict[str, Manifest], preset: str) -> dict:
    """The leaderboard row of a run from the manifests of its stages (role -> manifest)."""
    base = manifests["base"]
    bm = base.metrics
    seconds = {role: stage_seconds(m) for role, m in manifests.items()}
    core = manifests.get("base_eval")
    chat = manifests.get("chat_eval")
    core_score = core.metrics.get("core") if core else None
    complete = bool(core and core.metrics.get("n_tasks") == core.metrics.get("total_tasks")
                    and (core.metrics.get("max_per_task") or -1) <= 0)
    total = sum(s for s in seconds.values() if s is not None)
    costs = [m.metrics.get("cost_estimate") for m in manifests.values() if m.metrics.get("cost_estimate") is not None]
    prov = base.provenance
    return {
        "preset": preset,
        "recipe_id": recipe_digest(manifests),
        "depth": base.identity.get("depth"),
        "date": prov.get("end_time") or prov.get("committed_at"),
        "commit": prov.get("git_commit"),
        "dirty": prov.get("git_dirty"),
        "hardware": f"{bm.get('device', '?')} x{bm.get('world_size', '?')} ({prov.get('host', '?')})",
        "stage_seconds": {k: (round(v, 3) if v is not None else None) for k, v in seconds.items()},
        "total_seconds": round(total, 3),
        # pretraining's own training time (the reference's total_training_time, its "time to GPT-2")
        "training_time_s": bm.get("training_time_s"),
        "cost": round(sum(costs), 4) if costs else None,
        "val_bpb": bm.get("final_val_bpb"),
        "min_val_bpb": bm.get("min_val_bpb"),
        "core": core_score,
        "core_label": core.metrics.get("label") if core else None,
        "core_n_tasks": core.metrics.get("n_tasks") if core else None,
        "core_complete": complete,
        # the leaderboard's headline: wall time to reach GPT-2 1.5B's CORE, on the full metric only
        "time_to_gpt2_s": round(total, 3) if complete and core_score is not None and core_score >= GPT2_CORE["GPT-2 1.5B"] else None,
        "chat": _chat_scores(chat.metrics) if chat else {},
        "chatcore_label": chat.metrics.get("chatcore_label") if chat else None,
        "tok_per_s": bm.get("tok_per_s"),
        "mfu_percent": bm.get("mfu_percent"),
        "num_params": bm.get("num_params"),
        "iterations": bm.get("iterations"),
        "tokens": bm.get("tokens"),
        "artifacts": {role: str(m.ref) for role, m in manifests.items()},
        **({"rl": {k: manifests["rl"].metrics.get(k) for k in ("final_reward", "final_passk", "iterations")}}
           if "rl" in manifests else {}),
    }


def _core_not_run(manifests: dict[str, Manifest]) -> str:
    # the speedrun skips CORE when the bundle cannot be had (offline): say so instead of a bare "-"
    return "not run" + ("" if "eval_bundle" in manifests else " (no eval bundle)")


def render_markdown(summary: dict, manifests: dict[str, Manifest], title: str, images: dict[str, str] | None = None,
                    core_table: str | None = None, resumes: list[int] | None = None) -> str:
    """The report (also the model card of an export) as Markdown."""
    images = images or {}
    s = summary
    out = [f"# {title}", ""]
    out += [f"- preset **{s['preset']}**, depth {s['depth']}, {fmt(s['num_params'])} parameters, "
            f"{fmt(s['iterations'])} iterations over {fmt(s['tokens'])} tokens",
            f"- code {s['commit'] or 'unknown'}{' (dirty)' if s['dirty'] else ''}, finished {short_time(s['date'])}",
            f"- hardware {s['hardware']}; total wall time {hms(s['total_seconds'])}, pretraining time "
            f"{hms(s.get('training_time_s'))}"
            + (f", estimated cost ${s['cost']:.2f}" if s["cost"] else ""), ""]
    out += ["## Results", "", "| metric | value |", "|---|---:|",
            f"| val bits-per-byte (final / min) | {fmt(s['val_bpb'])} / {fmt(s['min_val_bpb'])} |",
            f"| {s['core_label'] or 'CORE'} | {fmt(s['core']) if 'base_eval' in manifests else _core_not_run(manifests)} |"]
    out += [f"| {name} | {v:.6f} |" for name, v in gpt2_rows(manifests.get("base_eval"))]
    chat_tasks = (manifests["chat_eval"].metrics.get("tasks") or {}) if "chat_eval" in manifests else {}
    for k, v in s["chat"].items():
        task = chat_tasks.get(k.removesuffix(" accuracy")) or {}
        beside = " (not in ChatCORE)" if "chatcore_task" in task and not task["chatcore_task"] else ""
        name = (s.get("chatcore_label") or "ChatCORE") if k.startswith("chatcore") else f"chat: {k}{beside}"
        out.append(f"| {name} | {fmt(v)} |")
    out += [f"| throughput (tok/s, MFU %) | {fmt(s['tok_per_s'], 0)}, {fmt(s['mfu_percent'], 2)} |", ""]
    # built: minutes are enough, and a full ISO stamp pushed the column past the page's width
    out += ["## Stages", "", "| step | artifact | wall time | built |", "|---|---|---:|---|"]
    for role, m in manifests.items():
        resumed = " (resumed)" if m.provenance.get("resumed") else ""
        out.append(f"| {role} | `{m.ref}` | {hms(s['stage_seconds'].get(role))} | "
                   f"{short_time(m.provenance.get('end_time'))}{resumed} |")
    out.append("")
    if "loss" in images:
        out += ["## Training", "", f"![loss]({images['loss']})", ""]
        if resumes:
            out += [f"Pretraining was resumed at step {', '.join(map(str, resumes))} (dotted lines).", ""]
    if "throughput" in images:
        out += [f"![throughput]({images['throughput']})", ""]
    if "rl" in s:
        passk = ", ".join(f"{k} {fmt(v)}" for k, v in (s["rl"]["final_passk"] or {}).items())
        out += ["## RL (GSM8K)", "", f"- {fmt(s['rl']['iterations'])} steps, final mean reward "
                f"{fmt(s['rl']['final_reward'])}; held-out {passk or 'pass@k not run'}", ""]
        out += [f"![rl]({images['rl']})", ""] if "rl" in images else []
    if core_table:
        out += ["## CORE per task", "", core_table.rstrip(), ""]
    if "core" in images:
        out += [f"![core]({images['core']})", ""]
    samples = manifests["base"].metrics.get("samples") or []
    if samples:
        out += ["## Samples (base model, greedy)", ""] + [f"- `{x!r}`" for x in samples[:8]] + [""]
    return "\n".join(out)


def plot_rl_curves(path: Path, reward_curve: list, passk_curve: list, title: str) -> bool:
    """Mean reward per step and pass@k per evaluation (the manifest's curves) as a PNG; False when empty."""
    if not reward_curve and not passk_curve:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([r[0] for r in reward_curve], [r[1] for r in reward_curve], lw=1, marker=".")
    ax1.set(xlabel="step", ylabel="mean reward", title=f"{title}: reward")
    k_max = max((len(p[1]) for p in passk_curve), default=0)
    for k in sorted({1, k_max} - {0}):
        ax2.plot([p[0] for p in passk_curve], [p[1][k - 1] for p in passk_curve], marker="o", label=f"pass@{k}")
    ax2.set(xlabel="step", ylabel="GSM8K test", title="pass@k")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if k_max:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


# ---- tables and figures of the sweep and research reports ---------------------------------------------
def write_csv(path: Path, rows, columns) -> None:
    """rows as CSV: `columns` first, then every other key in alphabetical order; None as empty."""
    extra = sorted({k for r in rows for k in r} - set(columns))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*columns, *extra], extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def g(v, fmt=".4g") -> str:
    return "–" if v is None else format(v, fmt)


def pm(mean, sd, fmt=".4f") -> str:
    return "–" if mean is None else format(mean, fmt) + (f" ± {sd:{fmt}}" if sd is not None else "")


def figure(ncols: int, width: float = 6.0):
    """A figure of `ncols` panels in a row, drawn without a display (Agg), and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_figure(fig, out: Path, name: str, written: list[str]) -> None:
    """Grid, legends where there are labels, tight layout; saved as out/name and appended to `written`."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name)
    written.append(name)
