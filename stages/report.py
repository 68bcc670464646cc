"""Stage report: the run report of a speedrun (Markdown + PNG plots) and its leaderboard row.

    nanorun stage report --input base=pretrain@latest --input base_eval=core_eval@latest --set recipe=cpu-demo

Reads only the manifests (and a few files) of the artifacts it is given; every input but `base` is
optional, so a partial pipeline still gets a report. The returned metrics are the leaderboard row
(`nanorun leaderboard` reads them from the run index): preset, depth, commit, hardware, the wall time
of each stage and in total, cost, val bpb, CORE with its task count, chat scores.
Files: report.md, loss.png (train loss + val bpb), core.png (CORE per task vs GPT-2), throughput.png.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from artifacts.manifest import Manifest
from stages.base import ConfigError, Input, StageConfig, identity, stage_logger

NAME = "report"
code_version = "3"
INPUTS = ("base",)
# role -> the stage that fills it in the speedrun graph (the order is the report's order)
OPTIONAL_INPUTS = ("data", "tokenizer", "eval_bundle", "base_eval", "sft", "chat_eval", "export")
GPT2_CORE = {"GPT-2 124M": 0.113891, "GPT-2 1.5B": 0.256525}
log = stage_logger(NAME)


@dataclass(frozen=True)
class Config(StageConfig):
    recipe: str = identity("custom", help="the recipe's (speedrun preset's) name, shown in the report and "
                                          "the leaderboard")
    title: str = identity("", help="report title (default: 'nanorun speedrun <recipe>')")
    tag: str = identity("", help="tells reproductions of the same run apart (the nightly flow sets the date)")

    def __post_init__(self):
        if not self.recipe or any(c.isspace() for c in self.recipe):
            raise ConfigError(f"report.recipe={self.recipe!r}: a non-empty name without spaces")

    def label(self) -> str:
        return "".join(c if c.isalnum() or c in "_." else "_" for c in "_".join(filter(None, (self.recipe, self.tag))))


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


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
        "depth": base.identity.get("depth"),
        "date": prov.get("end_time") or prov.get("committed_at"),
        "commit": prov.get("git_commit"),
        "dirty": prov.get("git_dirty"),
        "hardware": f"{bm.get('device', '?')} x{bm.get('world_size', '?')} ({prov.get('host', '?')})",
        "stage_seconds": {k: (round(v, 3) if v is not None else None) for k, v in seconds.items()},
        "total_seconds": round(total, 3),
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
    }


def _core_not_run(manifests: dict[str, Manifest]) -> str:
    # the speedrun skips CORE when the bundle cannot be had (offline): say so instead of a bare "-"
    return "not run" + ("" if "eval_bundle" in manifests else " (no eval bundle)")


def render_markdown(summary: dict, manifests: dict[str, Manifest], title: str, images: dict[str, str] | None = None,
                    core_table: str | None = None) -> str:
    """The report (also the model card of an export) as Markdown."""
    images = images or {}
    s = summary
    out = [f"# {title}", ""]
    out += [f"- preset **{s['preset']}**, depth {s['depth']}, {_fmt(s['num_params'])} parameters, "
            f"{_fmt(s['iterations'])} iterations over {_fmt(s['tokens'])} tokens",
            f"- code {s['commit'] or 'unknown'}{' (dirty)' if s['dirty'] else ''}, finished {s['date']}",
            f"- hardware {s['hardware']}; total wall time {_hms(s['total_seconds'])}"
            + (f", estimated cost ${s['cost']:.2f}" if s["cost"] else ""), ""]
    out += ["## Results", "", "| metric | value |", "|---|---:|",
            f"| val bits-per-byte (final / min) | {_fmt(s['val_bpb'])} / {_fmt(s['min_val_bpb'])} |",
            f"| {s['core_label'] or 'CORE'} | {_fmt(s['core']) if 'base_eval' in manifests else _core_not_run(manifests)} |"]
    out += [f"| {name} CORE | {v:.6f} |" for name, v in GPT2_CORE.items()]
    chat_tasks = (manifests["chat_eval"].metrics.get("tasks") or {}) if "chat_eval" in manifests else {}
    for k, v in s["chat"].items():
        task = chat_tasks.get(k.removesuffix(" accuracy")) or {}
        beside = " (not in ChatCORE)" if "chatcore_task" in task and not task["chatcore_task"] else ""
        name = (s.get("chatcore_label") or "ChatCORE") if k.startswith("chatcore") else f"chat: {k}{beside}"
        out.append(f"| {name} | {_fmt(v)} |")
    out += [f"| throughput (tok/s, MFU %) | {_fmt(s['tok_per_s'], 0)}, {_fmt(s['mfu_percent'], 2)} |", ""]
    out += ["## Stages", "", "| step | artifact | wall time | built |", "|---|---|---:|---|"]
    for role, m in manifests.items():
        resumed = " (resumed)" if m.provenance.get("resumed") else ""
        out.append(f"| {role} | `{m.ref}` | {_hms(s['stage_seconds'].get(role))} | {m.provenance.get('end_time', '?')}{resumed} |")
    out.append("")
    if "loss" in images:
        out += ["## Training", "", f"![loss]({images['loss']})", ""]
    if "throughput" in images:
        out += [f"![throughput]({images['throughput']})", ""]
    if core_table:
        out += ["## CORE per task", "", core_table.rstrip(), ""]
    if "core" in images:
        out += [f"![core]({images['core']})", ""]
    samples = manifests["base"].metrics.get("samples") or []
    if samples:
        out += ["## Samples (base model, greedy)", ""] + [f"- `{x!r}`" for x in samples[:8]] + [""]
    return "\n".join(out)


def _plot_loss(path: Path, base: Manifest) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss, bpb = base.metrics.get("loss_curve") or [], base.metrics.get("val_bpb_curve") or []
    if not loss and not bpb:
        return False
    fig = Figure(figsize=(10, 4), dpi=100)
    for i, (curve, name) in enumerate(((loss, "train loss (smoothed)"), (bpb, "val bits-per-byte"))):
        ax = fig.add_subplot(1, 2, i + 1)
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="." if len(curve) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def _plot_throughput(path: Path, base_dir: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    metrics = base_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "train" and r.get("tok_per_s") is not None:
                rows.append(r)
    if not rows:
        return False
    fig = Figure(figsize=(10, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r["step"] for r in rows], [r["tok_per_s"] for r in rows], label="tok/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3)
    if any(r.get("mfu") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r.get("mfu") for r in rows], color="tab:orange", alpha=0.6, label="MFU %")
        ax2.set_ylabel("MFU %")
    ax.set_title("pretraining throughput")
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def _plot_core(path: Path, core: Manifest) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from core.eval.core import GPT2_REFERENCE, centered

    tasks = core.metrics.get("tasks") or {}
    if not tasks:
        return False
    names = list(tasks)
    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / (1 + len(GPT2_REFERENCE))
    xs = range(len(names))
    ax.bar([x - 0.4 + width / 2 for x in xs], [tasks[n]["centered"] for n in names], width, label="this run")
    for j, (ref_name, ref) in enumerate(GPT2_REFERENCE.items(), start=1):
        vals = [centered(ref[n], tasks[n]["random_baseline"]) if n in ref else 0.0 for n in names]
        ax.bar([x - 0.4 + width / 2 + j * width for x in xs], vals, width, label=ref_name, alpha=0.7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("centered accuracy")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.set_title(core.metrics.get("label") or "CORE")
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    order = ("data", "tokenizer", "eval_bundle", "base", "base_eval", "sft", "chat_eval", "export")
    manifests = {role: inputs[role].manifest for role in order if role in inputs}
    summary = summarize(manifests, cfg.recipe)
    images = {}
    if _plot_loss(out / "loss.png", manifests["base"]):
        images["loss"] = "loss.png"
    if _plot_throughput(out / "throughput.png", inputs["base"].path):
        images["throughput"] = "throughput.png"
    core_table = None
    if "base_eval" in inputs:
        if _plot_core(out / "core.png", manifests["base_eval"]):
            images["core"] = "core.png"
        md = inputs["base_eval"].path / "core.md"
        core_table = md.read_text() if md.is_file() else None
    title = cfg.title or f"nanorun speedrun {cfg.recipe}"
    (out / "report.md").write_text(render_markdown(summary, manifests, title, images, core_table))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("report: %s, val bpb %s, %s %s, total %s", cfg.recipe, _fmt(summary["val_bpb"]),
             summary["core_label"] or "CORE", _fmt(summary["core"]), _hms(summary["total_seconds"]))
    return summary
