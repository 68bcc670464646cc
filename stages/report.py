"""Stage report: the run report of a speedrun (Markdown + PNG plots) and its leaderboard row.

    nanorun stage report --input base=pretrain@latest --input base_eval=core_eval@latest --set recipe=cpu-demo

Reads only the manifests (and a few files) of the artifacts it is given; every input but `base` is
optional, so a partial pipeline still gets a report. The returned metrics are the leaderboard row
(`nanorun leaderboard` reads them from the run index): preset, depth, commit, hardware, the wall time
of each stage and in total, cost, val bpb, CORE with its task count, chat scores.
Files: report.md, loss.png (train loss + val bpb), core.png (CORE per task vs GPT-2), throughput.png,
rl.png (reward and pass@k per step, with an `rl` input).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from artifacts.manifest import Manifest
from stages.base import ConfigError, Input, StageConfig, identity, stage_logger
from stagekit.reporting import fmt, hms, plot_rl_curves, render_markdown, summarize

NAME = "report"
code_version = "4"
INPUTS = ("base",)
# role -> the stage that fills it in the speedrun graph (the order is the report's order)
OPTIONAL_INPUTS = ("data", "tokenizer", "eval_bundle", "base_eval", "sft", "rl", "chat_eval", "export")
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


def resume_steps(base_dir: Path) -> list[int]:
    """The steps a resumed attempt of pretraining started from (metrics.jsonl "start" rows)."""
    from core.train.telemetry import read_metrics

    return [r["step"] for r in read_metrics(base_dir / "metrics.jsonl") if r.get("kind") == "start" and r.get("resumed")]


def _mark_resumes(ax, steps: list[int]) -> None:
    for i, step in enumerate(steps):
        ax.axvline(step, color="gray", linestyle=":", linewidth=1.2, label="resumed" if i == 0 else None)
    if steps:
        ax.legend(fontsize=8)


def loss_figure(base: Manifest, resumes: list[int]):
    """Train loss and val bpb per step, a dotted line where a resumed attempt started (None: no curve)."""
    from matplotlib.figure import Figure

    loss, bpb = base.metrics.get("loss_curve") or [], base.metrics.get("val_bpb_curve") or []
    if not loss and not bpb:
        return None
    fig = Figure(figsize=(10, 4), dpi=100)
    for i, (curve, name) in enumerate(((loss, "train loss (smoothed)"), (bpb, "val bits-per-byte"))):
        ax = fig.add_subplot(1, 2, i + 1)
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="." if len(curve) < 30 else None)
        _mark_resumes(ax, resumes)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def throughput_figure(base_dir: Path, resumes: list[int]):
    """tok/s (and MFU) per step from metrics.jsonl, resumes marked (None: no train rows)."""
    from matplotlib.figure import Figure

    from core.train.telemetry import read_metrics

    rows = [r for r in read_metrics(base_dir / "metrics.jsonl") if r.get("kind") == "train" and r.get("tok_per_s") is not None]
    if not rows:
        return None
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
    _mark_resumes(ax, resumes)
    ax.set_title("pretraining throughput")
    fig.tight_layout()
    return fig


def _save_png(fig, path: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig is None:
        return False
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
    order = ("data", "tokenizer", "eval_bundle", "base", "base_eval", "sft", "rl", "chat_eval", "export")
    manifests = {role: inputs[role].manifest for role in order if role in inputs}
    summary = summarize(manifests, cfg.recipe)
    images = {}
    resumes = resume_steps(inputs["base"].path)
    if _save_png(loss_figure(manifests["base"], resumes), out / "loss.png"):
        images["loss"] = "loss.png"
    if _save_png(throughput_figure(inputs["base"].path, resumes), out / "throughput.png"):
        images["throughput"] = "throughput.png"
    if "rl" in manifests:  # reward and pass@k curves from the rl manifest
        rm = manifests["rl"].metrics
        if plot_rl_curves(out / "rl.png", rm.get("reward_curve") or [], rm.get("passk_curve") or [], "rl gsm8k"):
            images["rl"] = "rl.png"
    core_table = None
    if "base_eval" in inputs:
        if _plot_core(out / "core.png", manifests["base_eval"]):
            images["core"] = "core.png"
        md = inputs["base_eval"].path / "core.md"
        core_table = md.read_text() if md.is_file() else None
    title = cfg.title or f"nanorun speedrun {cfg.recipe}"
    (out / "report.md").write_text(render_markdown(summary, manifests, title, images, core_table, resumes))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("report: %s, val bpb %s, %s %s, total %s", cfg.recipe, fmt(summary["val_bpb"]),
             summary["core_label"] or "CORE", fmt(summary["core"]), hms(summary["total_seconds"]))
    return summary
