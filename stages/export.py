"""Stage export: a trained model (pretrain or sft artifact) as a self-contained bundle (core/export.py).

    nanorun stage export --input model=sft@latest --input tokenizer=tokenizer@latest \\
        --input base=pretrain@latest --input base_eval=core_eval@latest --input chat_eval=chat_eval@latest
    nanorun pull export@latest --to my-model/        # then, anywhere: core.export.load("my-model/")
    nanorun chat export@latest                       # or: nanorun chat my-model/

Files: model.safetensors (weights only, `dtype`), config.json (architecture, kind, parameter counts,
lineage), tokenizer.json + token_bytes.npy, generation_config.json (the sampling defaults below,
stop tokens), README.md (the model card). The optional inputs only feed the card: `base` (the
pretrain artifact of an sft model) and the evaluations give the training report of stages/report.py
(summarize + render_markdown); a `report` artifact is embedded as it is, with its plots. The
tokenizer is checked against the one the model was trained with (check_tokenizer) before anything
is written. Metrics: kind, step, parameter counts, sizes.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from stages.base import ConfigError, Input, StageConfig, identity, stage_logger

NAME = "export"
code_version = "1"
INPUTS = ("model", "tokenizer")
OPTIONAL_INPUTS = ("base", "base_eval", "chat_eval", "report")
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
REPORT_DIR = "report"  # the report's plots, inside the bundle
log = stage_logger(NAME)


@dataclass(frozen=True)
class Config(StageConfig):
    dtype: str = identity("float32", help="weights dtype in the bundle: float32 (exact) | bfloat16 | float16")
    temperature: float = identity(0.6, help="default sampling temperature (generation_config.json)")
    top_k: int = identity(50, help="default top-k (0 = off)")
    top_p: float = identity(1.0, help="default nucleus top-p (1 = off)")
    max_tokens: int = identity(512, help="default maximum new tokens per reply")
    title: str = identity("", help="model card title (default: 'nanorun GPT d<depth> (<kind>)')")

    def __post_init__(self):
        if self.dtype not in DTYPE_LABELS:
            raise ConfigError(f"export.dtype={self.dtype!r}: use one of {', '.join(DTYPE_LABELS)}")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"export.temperature={self.temperature}: between 0 and 2 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"export.top_k={self.top_k!r}: an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"export.top_p={self.top_p}: in (0, 1] (1 = off)")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"export.max_tokens={self.max_tokens!r}: an integer >= 1")

    def label(self) -> str:
        return DTYPE_LABELS[self.dtype]


# How a run ran, not what the model is (the training report, when there is one, has them).
OPERATIONAL = {"total_batch_size", "grad_accum_steps", "world_size", "tok_per_s", "mfu_percent", "training_time_s",
               "wall_time_s", "attempts", "device_hours", "cost_estimate", "seconds", "flops_per_token", "model_step",
               "skipped", "truncated", "max_per_task", "total_tasks"}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in OPERATIONAL}


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def metrics_section(inputs: dict[str, Input]) -> str:
    """Every scalar metric the lineage carries, per artifact (what is known about the model)."""
    rows = []
    for role in ("model", "base", "base_eval", "chat_eval"):
        if role in inputs:
            ref = inputs[role].ref
            rows += [f"| {role} (`{ref.stage}`) | {k} | {_fmt(v)} |" for k, v in _scalars(inputs[role].metrics).items()]
    if not rows:
        return ""
    return "\n".join(["## Metrics", "", "| from | metric | value |", "|---|---|---:|", *rows])


def _demote(markdown: str) -> str:
    """A report's headings one level down, so that it sits under the card's title."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def report_section(inputs: dict[str, Input], kind: str, out: Path, title: str) -> str:
    """The training report: a given report artifact (plots copied along), else rendered from the
    manifests at hand (needs the pretrain manifest: the model's own, or the `base` input)."""
    from stagekit.reporting import render_markdown, summarize

    if "report" in inputs:
        src = inputs["report"].path
        md = (src / "report.md").read_text() if (src / "report.md").is_file() else ""
        images = re.findall(r"\]\(([A-Za-z0-9_.\-]+\.png)\)", md)
        for name in images:
            if (src / name).is_file():
                (out / REPORT_DIR).mkdir(exist_ok=True)
                shutil.copyfile(src / name, out / REPORT_DIR / name)
                md = md.replace(f"]({name})", f"]({REPORT_DIR}/{name})")
        return _demote(md)
    from core.layouts import CHAT_KINDS

    chat = kind in CHAT_KINDS  # the model is the sft or rl artifact; its pretrain base is the `base` input
    roles = {"base": inputs.get("base") if chat else inputs["model"], "base_eval": inputs.get("base_eval"),
             "sft": inputs["model"] if kind == "sft" else None, "rl": inputs["model"] if kind == "rl" else None,
             "chat_eval": inputs.get("chat_eval")}
    manifests = {role: i.manifest for role, i in roles.items() if i is not None}
    if "base" not in manifests or manifests["base"].stage != "pretrain":
        return ""  # an sft model without its base: the lineage table and the metrics say what is known
    return _demote(render_markdown(summarize(manifests, "unknown"), manifests, title))


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    from core.checkpoint import load_checkpoint
    from core.export import export_bundle
    from core.layouts import model_checkpoint, tokenizer_dir

    out = Path(out)
    for p in list(out.iterdir()):  # an earlier attempt's files: rewritten from scratch (seconds)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    model = inputs["model"]
    try:
        ckpt = model_checkpoint(model.path)
    except FileNotFoundError:
        raise ConfigError(f"export: input model={model.ref} is a {model.ref.stage} artifact without a "
                          "checkpoint.json: give a pretrain, sft or rl artifact") from None
    kind = load_checkpoint(ckpt).meta.get("kind", "base")
    lineage = {"model": str(model.ref), "tokenizer": str(inputs["tokenizer"].ref)}
    for role, ref in sorted(model.manifest.inputs.items()):  # where the model itself came from
        lineage.setdefault(f"{model.ref.stage}.{role}", str(ref))
    for role in OPTIONAL_INPUTS:
        if role in inputs:
            lineage[role] = str(inputs[role].ref)
    sections = [s for s in (metrics_section(inputs), report_section(inputs, kind, out, "Training report")) if s]
    info = export_bundle(ckpt, tokenizer_dir(inputs["tokenizer"].path), out, dtype=cfg.dtype,
                         generation={"temperature": cfg.temperature, "top_k": cfg.top_k,
                                     "top_p": None if cfg.top_p >= 1 else cfg.top_p, "max_tokens": cfg.max_tokens},
                         tokenizer_fingerprint=inputs["tokenizer"].ref.fingerprint, lineage=lineage,
                         title=cfg.title or None, card_sections=sections)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    a = info["architecture"]
    log.info("exported %s (%s, step %s, %s params) as %s: %s", model.ref, kind, info["step"],
             f"{info['num_params']:,}", cfg.dtype, ", ".join(f"{k} {v:,} B" for k, v in files.items()))
    return {"kind": info["kind"], "step": info["step"], "model": str(model.ref), "depth": a["n_layer"],
            "num_params": info["num_params"], "num_scaling_params": info["num_scaling_params"],
            "dtype": cfg.dtype, "vocab_size": a["vocab_size"], "sequence_len": a["sequence_len"],
            "weights_bytes": info["weights"]["bytes"], "total_bytes": sum(files.values()), "files": files}
