"""Stage pretrain: the base model, trained by core/train/pretrain.py under torchrun, as an artifact.

    nanorun stage pretrain --preset cpu-demo --input data=data_shards@latest --input tokenizer=tokenizer@latest
    nanorun stage pretrain --preset d24-speedrun --input data=... --input tokenizer=...   # 8 GPUs
    nanorun speedrun --preset cpu-demo                            # the whole pipeline, this stage included

    from stages.pretrain import PRESETS, preset
    from core.layouts import model_checkpoint
    cfg = preset("tiny", seed=1)                                  # a Config from a preset + overrides
    m = execute("pretrain", cfg, {"data": data_ref, "tokenizer": tok_ref}, store)
    model, meta = core.checkpoint.load_model(model_checkpoint(store.materialize(m.ref)))

Identity = everything that changes the weights (the depth dial, horizon, batch, LRs, schedule, seed,
dtype, fp8, the world size, the platform); runtime = how it runs (how the world size splits into
processes and nodes, device batch size, threads, eval / sample / save cadence, compile, wandb,
timeout, price). Which fields are runtime, and the tolerance each was measured to keep: docs/identity.md.

run() writes the trainer's config to run.json, launches torchrun through stagekit/launch.py (output
streamed into train.log and the `nanorun.launch` logger, heartbeat while silent, TERM-then-KILL on
timeout, LaunchError naming the last error lines), turns each step line into progress(step, total,
loss=, tok_per_s=, mfu=), and on success lays out the artifact:

    checkpoint.json          {"checkpoint": "checkpoints/step_NNNNNN", "step": N}: the model to load
    checkpoints/step_NNNNNN/ the final checkpoint only (model.pt, optim_rank*.pt, rank*.pt, meta.json)
    run.json                 the trainer's config        metrics.jsonl  every step / eval (trainer)
    train.log                torchrun's output           attempts.jsonl one row per launch (for cost)
    loss_curve.png           train loss and val bpb      wandb/         the offline wandb run

A rerun after a crash gets the same work dir back and the trainer resumes from the newest complete
checkpoint in it (exactly: see core/train/pretrain.py). Intermediate checkpoints are removed only
after the run succeeded. Multi-node: nnodes > 1 with the rendezvous endpoint of node 0; every node
runs this stage with its own node_rank and the checkpoint directory must be on shared storage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.layouts import tokenizer_dir
from core.train.config import PretrainConfig
from stages.base import ConfigError, Input, progress, runtime, stage_logger
from stagekit.training import LaunchConfig, launch_trainer, read_training, seal_training_dir, stage_fields, trainer_values

NAME = "pretrain"
code_version = "1"
INPUTS = ("data", "tokenizer")
OPTIONAL_INPUTS = ("eval_bundle",)

log = stage_logger(NAME)

@dataclass(frozen=True)
class Config(LaunchConfig, stage_fields(PretrainConfig, "Pretrain")):
    """The trainer's fields (core/train/config.py PretrainConfig: identity = the recipe, runtime = how
    it runs) plus how it is launched (LaunchConfig) and the stage's own runtime fields."""
    rdzv_id: str = runtime("nanorun-pretrain", help="rendezvous id shared by the nodes of one job")
    gpu_hour_price: float = runtime(0.0, help="price per GPU-hour (per process-hour on CPU) for the cost estimate")
    extra_args: tuple = runtime((), help="extra flags for core.train.pretrain (experiments)")

    def __post_init__(self):
        object.__setattr__(self, "extra_args", tuple(str(a) for a in self.extra_args))
        object.__setattr__(self, "window_pattern", str(self.window_pattern).upper())
        self.check_launch(NAME)
        if self.gpu_hour_price < 0:
            raise ConfigError("pretrain.gpu_hour_price must be >= 0")
        trainer_values(self, PretrainConfig, NAME)  # the trainer's own rules, once (core/train/config.py)
        if self.total_batch_size > 0:
            self.grad_accum_steps(self.total_batch_size)

    def trainer_config(self, *, data_dir, tok_dir, out, tokenizer_fingerprint: str, eval_bundle_dir) -> dict:
        """The run.json for core.train.pretrain: every trainer field as is, plus the paths."""
        return trainer_values(self, PretrainConfig, NAME, data_dir=str(data_dir), tokenizer_dir=str(tok_dir),
                              out=str(out), tokenizer_fingerprint=tokenizer_fingerprint,
                              eval_bundle_dir=str(eval_bundle_dir) if eval_bundle_dir else "",
                              run_name=self.run_name or f"pretrain-{self.label()}")

    def grad_accum_steps(self, total_batch_size: int) -> int:
        per_step = self.device_batch_size * self.max_seq_len * self.world_size
        if total_batch_size % per_step:
            raise ConfigError(
                f"pretrain: the total batch of {total_batch_size:,} tokens is not a multiple of device_batch_size "
                f"{self.device_batch_size} x max_seq_len {self.max_seq_len} x {self.world_size} process(es) = "
                f"{per_step:,}, so gradient accumulation cannot reach it; change device_batch_size, nproc or "
                "total_batch_size")
        return total_batch_size // per_step

    def label(self) -> str:
        return f"d{self.depth}"


# Reference GPU recipes (8 GPUs, ~$3 per GPU-hour for the cost estimate) and small CPU runs.
_GPU = dict(nproc=8, device_batch_size=32, eval_every=250, eval_tokens=20 * 524288, core_metric_every=2000,
            sample_every=2000, save_every=500, gpu_hour_price=3.0)
PRESETS: dict[str, dict] = {
    # seconds on a CPU: the tests' recipe (2 gradient-accumulation steps on 1 process, 1 on 2)
    "tiny": dict(depth=2, head_dim=64, max_seq_len=64, total_batch_size=256, num_iterations=24, warmup_steps=2,
                 matrix_lr=0.2, embedding_lr=3.0, unembedding_lr=0.1, weight_decay=0.0, loader_buffer=32,
                 device_batch_size=2,
                 eval_every=8, eval_tokens=512, sample_every=-1, core_metric_every=-1, save_every=8,
                 keep_checkpoints=2, wandb="disabled", device_type="cpu", compile=False),
    # ~3 minutes on 2 idle CPU cores (~0.4 s/step): on chitchat with an 8192 vocab, val bpb 3.41 -> ~1.55.
    # A 256-wide d4 at twice the batch reached the same bpb in twice the time. The base LRs are ~10x
    # the reference's because the sqrt(B/B_REF) rule scales them by 0.09 at this batch; weight decay
    # is off (not tuned at this size).
    "cpu-demo": dict(depth=4, aspect_ratio=32, head_dim=64, max_seq_len=256, total_batch_size=4096,
                     num_iterations=300, warmup_steps=10, matrix_lr=0.2, embedding_lr=3.0, unembedding_lr=0.1,
                     weight_decay=0.0, device_batch_size=16, eval_every=50, eval_tokens=32768, sample_every=150,
                     core_metric_every=-1, save_every=50, device_type="cpu"),
    "d12": dict(depth=12, **_GPU),
    "d20": dict(depth=20, **_GPU),
    "d24-speedrun": dict(depth=24, target_param_data_ratio=8.0, fp8=True, **{**_GPU, "device_batch_size": 16}),
    "d26": dict(depth=26, **{**_GPU, "device_batch_size": 16}),
}


preset = Config.from_preset  # preset("tiny", seed=1): a resolved Config from a preset + overrides


def _plan(cfg: Config, vocab_size: int):
    from core.scaling import derive, recipe_of

    try:
        return derive(recipe_of(cfg), vocab_size)
    except ValueError as e:
        raise ConfigError(f"pretrain: {e}") from None


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    cfg.check_platform(NAME)
    if cfg.node_rank > 0:
        raise ConfigError(f"pretrain: node_rank={cfg.node_rank} joins node 0's run rather than building the artifact: "
                          "run `nanorun stage pretrain ... --join` on this node (only node 0 commits)")
    total = _train(cfg, inputs, Path(out))
    return finish(cfg, Path(out), total)


def join(cfg: Config, inputs: dict[str, Input], out: Path) -> None:
    """This node's share of a multi-node run (node_rank >= 1): the same torchrun job through the
    c10d rendezvous at node 0, writing into the same (shared) work dir. Commits nothing: node 0's
    run() lays out and commits the artifact once every node is done."""
    cfg.check_platform(NAME)
    if cfg.nnodes < 2 or cfg.node_rank < 1:
        raise ConfigError(f"pretrain: joining needs nnodes > 1 and node_rank >= 1 (got nnodes={cfg.nnodes}, "
                          f"node_rank={cfg.node_rank}); node 0 runs the stage itself")
    _train(cfg, inputs, Path(out))


def _train(cfg: Config, inputs: dict[str, Input], out: Path) -> int:
    """Launch (or resume) the trainer under torchrun on this node; returns the total step count."""
    from core.checkpoint import list_checkpoints
    from core.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    node = f"-node{cfg.node_rank}" if cfg.node_rank else ""  # joined nodes keep their own config and log
    tok_dir = tokenizer_dir(inputs["tokenizer"].path)
    vocab = Tokenizer.from_directory(tok_dir).vocab_size
    plan = _plan(cfg, vocab)
    cfg.grad_accum_steps(plan.total_batch_size)  # an auto batch must divide too: fail before launching
    total = plan.num_iterations
    bundle = inputs.get("eval_bundle")
    run_json = out / f"run{node}.json"
    run_json.write_text(json.dumps(cfg.trainer_config(
        data_dir=inputs["data"].path, tok_dir=tok_dir, out=out, tokenizer_fingerprint=inputs["tokenizer"].ref.fingerprint,
        eval_bundle_dir=bundle.path if bundle else None), indent=1) + "\n")
    ckpts = list_checkpoints(out / "checkpoints")
    start = ckpts[-1][0] if ckpts else 0
    log.info("pretrain d%d: %d steps of %s tokens on %d process(es)%s", cfg.depth, total,
             f"{plan.total_batch_size:,}", cfg.world_size,
             f"; resuming from the checkpoint at step {start} in the work dir" if ckpts else "")
    progress(start, total, phase="train")
    rdzv = cfg.rendezvous()
    launch_trainer("core.train.pretrain", run_json, out, name=f"pretrain{node}", nproc=cfg.nproc,
                   omp_threads=cfg.omp_threads, timeout=cfg.timeout, heartbeat=cfg.heartbeat,
                   extra_args=cfg.extra_args, resumed_from=start, rdzv=rdzv, log_path=out / f"train{node}.log",
                   ledger=not node)  # node 0's ledger counts every node (nnodes)
    return total


def finish(cfg: Config, out: Path, total: int) -> dict:
    """Keep only the final checkpoint, draw the curves, and compute the manifest metrics."""
    rel = seal_training_dir(out, total)
    latest, train, val, attempts, common = read_training(out)
    derived = latest["start"]["derived"]
    device_hours = sum(a["seconds"] * a["nproc"] * a["nnodes"] for a in attempts) / 3600
    plot_curves(out / "loss_curve.png", train, val, f"pretrain {cfg.label()}")
    return {
        "checkpoint": rel, "iterations": total, "tokens": derived["total_tokens"],
        "total_batch_size": derived["total_batch_size"], "grad_accum_steps": derived["grad_accum_steps"],
        "world_size": derived["world_size"], "device": derived["device"], "dtype": derived["dtype"],
        "num_params": derived["num_params"], "num_scaling_params": derived["num_scaling_params"],
        "flops_per_token": derived["flops_per_token"],
        "final_val_bpb": val[-1]["val_bpb"] if val else None,
        "min_val_bpb": min(r["val_bpb"] for r in val) if val else None,
        "val_bpb_curve": [[r["step"], round(r["val_bpb"], 6)] for r in val], **common,
        "device_hours": round(device_hours, 6), "cost_estimate": round(device_hours * cfg.gpu_hour_price, 4),
        "core_metric": latest["core"]["core"] if "core" in latest else None,
        "samples": latest["sample"]["samples"] if "sample" in latest else [],
    }


def plot_curves(path: Path, train: list[dict], val: list[dict], title: str) -> None:
    """Train loss (smoothed) and val bits-per-byte against steps, side by side (PNG, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax1.set(xlabel="step", ylabel="train loss (nats, smoothed)", title="train loss")
    ax2.plot([r["step"] for r in val], [r["val_bpb"] for r in val], marker="o", color="tab:orange")
    ax2.set(xlabel="step", ylabel="bits per byte", title="validation bpb")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
