"""Stage core_eval: the CORE score (DCLM's 22 tasks) of a pretrained or fine-tuned model.

    nanorun stage core_eval --input model=pretrain@latest --input tokenizer=tokenizer@latest \\
        --input bundle=eval_bundle@latest --set max_per_task=100

Scoring is core/eval/core.py (reference-exact prompts, sampling and metric). With nproc > 1 the
stage runs itself under torchrun (`python -m stages.core_eval WORKDIR`), every rank scoring a
strided share of each task; on one process it scores in-process. Files: core.json (per-task
accuracy and centered score), core.csv / core.md (next to GPT-2 124M and 1.5B, like the reference
CSVs). Metrics: CoreResult.to_dict() — `core`, `label` ("CORE over 18/22 tasks" when files are
missing), `n_tasks`, `tasks`, `missing`.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.train.config import DEVICE_TYPES
from stages.base import ConfigError, Input, StageConfig, identity, progress, runtime, stage_logger

NAME = "core_eval"
code_version = "1"
INPUTS = ("model", "tokenizer", "bundle")
log = stage_logger(NAME)


@dataclass(frozen=True)
class Config(StageConfig):
    max_per_task: int = identity(-1, help="examples per task after the reference's shuffle (-1 = all, the "
                                          "published metric); 10-shot tasks need >= 11")
    tasks: tuple = identity((), help="task labels to score (empty = every task whose file is present)")
    dtype: str = identity("auto", help="compute dtype: auto | bfloat16 | float32 (changes scores slightly)")
    nproc: int = runtime(1, help="processes (GPUs); > 1 runs under torchrun")
    device_type: str = runtime("", help="cuda | cpu | mps (empty = autodetect)")
    batch_size: int = runtime(32, help="rows per padded forward")
    max_batch_tokens: int = runtime(4096, help="rows x longest row per forward")
    timeout: float = runtime(0.0, help="kill a torchrun evaluation after this many seconds (0 = never)")

    def __post_init__(self):
        if self.max_per_task == 0 or self.max_per_task < -1:
            raise ConfigError(f"core_eval.max_per_task={self.max_per_task}: -1 (all) or a positive count")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ConfigError(f"core_eval.dtype={self.dtype!r}: auto | bfloat16 | float32 | float16")
        if self.nproc < 1 or self.batch_size < 1 or self.max_batch_tokens < 1:
            raise ConfigError("core_eval: nproc, batch_size and max_batch_tokens must be >= 1")
        if self.timeout < 0:
            raise ConfigError(f"core_eval.timeout={self.timeout}: seconds >= 0 (0 = never)")
        if self.device_type not in DEVICE_TYPES:
            raise ConfigError(f"core_eval.device_type={self.device_type!r}: cuda, cpu or mps (empty = autodetect)")
        if not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"core_eval.tasks={list(self.tasks)!r}: task labels (strings) of the bundle's core.yaml")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def label(self) -> str:
        return "all" if self.max_per_task == -1 else f"max{self.max_per_task}"


PRESETS = {
    "tiny": dict(max_per_task=12, tasks=("arc_easy", "piqa", "lambada_openai", "winograd")),
    "cpu-demo": dict(max_per_task=64),
    "gpu": dict(nproc=8),
}


def evaluate(job: dict) -> dict:
    """Load the model and tokenizer named in `job`, score CORE, save the tables; rank 0 returns metrics."""
    import torch

    from core.checkpoint import check_tokenizer, load_model
    from core.common import cleanup_distributed, compute_dtype, init_distributed, parse_dtype
    from core.eval.core import evaluate_core
    from core.tokenizer import Tokenizer

    dist = init_distributed(job["device_type"] or None)
    device = dist.device
    dtype = compute_dtype(device) if job["dtype"] == "auto" else parse_dtype(job["dtype"])
    try:
        tokenizer = Tokenizer.from_directory(job["tokenizer_dir"])
        model, meta = load_model(job["checkpoint"], device=device, dtype=dtype)
        check_tokenizer(meta, job["tokenizer_fingerprint"], tokenizer.vocab_size, "core_eval")

        def on_progress(done, total, info):
            if dist.rank == 0:
                log.info("[%d/%d] %s: accuracy %.4f, centered %.4f", done, total, info.get("task"),
                         info.get("accuracy", float("nan")), info.get("centered", float("nan")))
                progress(done, total, task=info.get("task"))

        t0 = time.time()
        with torch.inference_mode():
            result = evaluate_core(model, tokenizer, job["bundle_dir"], device=device,
                                   max_per_task=job["max_per_task"], batch_size=job["batch_size"],
                                   max_batch_tokens=job["max_batch_tokens"], rank=dist.rank,
                                   world_size=dist.world_size, tasks=list(job["tasks"]) or None,
                                   # the reference never crops; only a context beyond what the model's
                                   # rotary table covers (10 x its training length) is cut from the left
                                   max_seq_len=getattr(model, "rotary_len", None), on_progress=on_progress)
        if dist.rank != 0:
            return {}
        out = Path(job["out"])
        result.save(out)
        metrics = result.to_dict()
        metrics.update(seconds=round(time.time() - t0, 3), model_kind=meta.get("kind"), model_step=meta.get("step"),
                       world_size=dist.world_size, device=device.type, dtype=str(dtype).removeprefix("torch."))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    finally:
        cleanup_distributed()


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    from core.eval.core import CoreResult, format_table
    from core.layouts import model_checkpoint, tokenizer_dir

    for name in list(out.iterdir()):  # nothing partial from an earlier attempt is worth keeping
        if name.is_file():
            name.unlink()
    job = {
        "checkpoint": str(model_checkpoint(inputs["model"].path)),
        "tokenizer_dir": str(tokenizer_dir(inputs["tokenizer"].path)),
        "tokenizer_fingerprint": inputs["tokenizer"].ref.fingerprint,
        "bundle_dir": str(inputs["bundle"].path),
        "out": str(out),
        "max_per_task": cfg.max_per_task, "tasks": list(cfg.tasks), "dtype": cfg.dtype,
        "device_type": cfg.device_type, "batch_size": cfg.batch_size, "max_batch_tokens": cfg.max_batch_tokens,
    }
    if cfg.nproc == 1:
        metrics = evaluate(job)
    else:
        from stagekit.launch import launch, torchrun_cmd, worker_env

        (out / "job.json").write_text(json.dumps(job, indent=2) + "\n")
        launch(torchrun_cmd("stages.core_eval", [str(out / "job.json")], nproc=cfg.nproc),
               env=worker_env(cfg.nproc), log_path=out / "eval.log", timeout=cfg.timeout or None, name=NAME)
        metrics = json.loads((out / "metrics.json").read_text())
    log.info("%s = %s\n%s", metrics["label"], metrics["core"], format_table(CoreResult.from_dict(metrics), fmt="csv"))
    return metrics


if __name__ == "__main__":  # a torchrun worker: python -m stages.core_eval JOB.json
    evaluate(json.loads(Path(sys.argv[1]).read_text()))
