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
dtype, fp8); runtime = how it runs (processes, nodes, device batch size, eval / sample / save
cadence, compile, wandb, timeout, price). Like the device batch size, the process count is runtime
by design: it changes the data order across ranks and the float summation order, not the recipe.

run() writes the trainer's config to run.json, launches torchrun through stages/launch.py (output
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
from dataclasses import dataclass, fields
from pathlib import Path

from stages.base import ConfigError, Input, StageConfig, identity, progress, runtime, stage_logger
from core.layouts import tokenizer_dir
from stages.training import launch_trainer, read_training, seal_training_dir

NAME = "pretrain"
code_version = "1"
INPUTS = ("data", "tokenizer")
OPTIONAL_INPUTS = ("eval_bundle",)

log = stage_logger(NAME)

WANDB_MODES = ("disabled", "offline", "online")
DTYPES = ("auto", "bfloat16", "float32", "float16")


@dataclass(frozen=True)
class Config(StageConfig):
    # ---- identity: the recipe (core.scaling.derive turns the depth into everything else)
    depth: int = identity(20, help="transformer layers (the depth dial)")
    aspect_ratio: int = identity(64, help="model_dim = depth x aspect_ratio, rounded up to head_dim")
    head_dim: int = identity(128, help="attention head dimension")
    max_seq_len: int = identity(2048, help="context length")
    window_pattern: str = identity("SSSL", help="sliding-window pattern tiled over layers (S short, L full)")
    target_param_data_ratio: float = identity(12.0, help="tokens = ratio x scaling params (sets batch and WD too)")
    target_flops: float = identity(-1.0, help="train for this many FLOPs instead (-1 = off)")
    num_iterations: int = identity(-1, help="explicit optimizer steps (-1 = off; wins over flops and ratio)")
    total_batch_size: int = identity(-1, help="tokens per optimizer step (-1 = auto, Power Lines rule)")
    embedding_lr: float = identity(0.3, help="AdamW lr of wte (before batch/width scaling)")
    unembedding_lr: float = identity(0.008, help="AdamW lr of lm_head (before batch/width scaling)")
    matrix_lr: float = identity(0.02, help="Muon lr (before batch scaling)")
    scalar_lr: float = identity(0.5, help="AdamW lr of the per-layer scalars (before batch scaling)")
    weight_decay: float = identity(0.28, help="Muon weight decay at d12 (scaled by batch and horizon)")
    warmup_steps: int = identity(40, help="linear LR warmup steps")
    warmdown_ratio: float = identity(0.65, help="fraction of the run with a linear LR decay at the end")
    final_lr_frac: float = identity(0.05, help="LR at the end, as a fraction of the peak")
    loader_buffer: int = identity(1000, help="documents kept tokenized for best-fit packing (reference: 1000)")
    seed: int = identity(42, help="init and RNG seed")
    dtype: str = identity("auto", help="compute dtype: auto | bfloat16 | float32 | float16")
    fp8: bool = identity(False, help="FP8 matmuls in the blocks (H100+ only)")
    fp8_recipe: str = identity("tensorwise", help="tensorwise | rowwise")
    # ---- runtime: how it runs
    nproc: int = runtime(1, help="processes per node (GPUs, or CPU processes with gloo)")
    nnodes: int = runtime(1, help="nodes (multi-node needs rdzv_endpoint and shared storage)")
    node_rank: int = runtime(0, help="this node's rank")
    rdzv_endpoint: str = runtime("", help="host:port of node 0's rendezvous (multi-node)")
    rdzv_id: str = runtime("nanorun-pretrain", help="rendezvous id shared by the nodes of one job")
    device_type: str = runtime("", help="cuda | cpu | mps (empty = autodetect)")
    device_batch_size: int = runtime(32, help="sequences per micro-batch per process")
    eval_every: int = runtime(250, help="val bpb every N steps (-1 = off)")
    eval_tokens: int = runtime(20 * 524288, help="validation tokens per evaluation")
    core_metric_every: int = runtime(2000, help="CORE every N steps when an eval_bundle input is given (-1 = off)")
    core_metric_max_per_task: int = runtime(500, help="CORE examples per task during training")
    sample_every: int = runtime(2000, help="greedy samples every N steps (-1 = off)")
    save_every: int = runtime(250, help="checkpoint every N steps (-1 = only at the end)")
    keep_checkpoints: int = runtime(2, help="checkpoints kept while training")
    compile: bool | None = runtime(None, help="torch.compile (None = on CUDA only)")
    wandb: str = runtime("offline", help="disabled | offline | online")
    omp_threads: int = runtime(0, help="CPU threads per process (0 = cores / nproc)")
    timeout: float = runtime(0.0, help="kill the run after this many seconds (0 = never)")
    heartbeat: float = runtime(60.0, help="log a 'still running' line after this many silent seconds")
    gpu_hour_price: float = runtime(0.0, help="price per GPU-hour (per process-hour on CPU) for the cost estimate")
    extra_args: tuple = runtime((), help="extra flags for core.train.pretrain (experiments)")

    def __post_init__(self):
        object.__setattr__(self, "extra_args", tuple(str(a) for a in self.extra_args))
        object.__setattr__(self, "window_pattern", str(self.window_pattern).upper())
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "nproc", "nnodes", "device_batch_size",
                     "keep_checkpoints", "loader_buffer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"pretrain.{name}={getattr(self, name)!r}: expected an integer >= 1")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ConfigError(f"pretrain.window_pattern={self.window_pattern!r}: use only S (short) and L (full)")
        if self.target_param_data_ratio <= 0:
            raise ConfigError("pretrain.target_param_data_ratio must be > 0: it sets the batch size and weight "
                              "decay even when num_iterations or target_flops sets the horizon")
        if not 0 <= self.warmdown_ratio <= 1 or not 0 <= self.final_lr_frac <= 1 or self.warmup_steps < 0:
            raise ConfigError("pretrain: warmdown_ratio and final_lr_frac must be in [0, 1], warmup_steps >= 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"pretrain.dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.fp8_recipe not in ("tensorwise", "rowwise"):
            raise ConfigError(f"pretrain.fp8_recipe={self.fp8_recipe!r}: use tensorwise or rowwise")
        if self.wandb not in WANDB_MODES:
            raise ConfigError(f"pretrain.wandb={self.wandb!r}: use one of {', '.join(WANDB_MODES)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"pretrain.node_rank={self.node_rank} must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise ConfigError("pretrain: nnodes > 1 needs rdzv_endpoint host:port (node 0's rendezvous)")
        if self.eval_every > 0 and self.eval_tokens < 1:
            raise ConfigError("pretrain.eval_tokens must be >= 1 when eval_every is on")
        if self.timeout < 0 or self.heartbeat <= 0 or self.gpu_hour_price < 0 or self.omp_threads < 0:
            raise ConfigError("pretrain: timeout, gpu_hour_price and omp_threads must be >= 0, heartbeat > 0")
        if self.total_batch_size > 0:
            self.grad_accum_steps(self.total_batch_size)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

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
                     core_metric_every=-1, save_every=50, device_type="cpu", compile=False),
    "d12": dict(depth=12, **_GPU),
    "d20": dict(depth=20, **_GPU),
    "d24-speedrun": dict(depth=24, target_param_data_ratio=8.0, fp8=True, **{**_GPU, "device_batch_size": 16}),
    "d26": dict(depth=26, **{**_GPU, "device_batch_size": 16}),
}


preset = Config.from_preset  # preset("tiny", seed=1): a resolved Config from a preset + overrides


def trainer_config(cfg: Config, *, data_dir: Path, tok_dir: Path, out: Path, tokenizer_fingerprint: str,
                   eval_bundle_dir: Path | None) -> dict:
    """The run.json for core.train.pretrain: every Config field the trainer knows, plus the paths."""
    from core.train.pretrain import PretrainConfig

    known = {f.name for f in fields(PretrainConfig)}
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in known}
    values.update(data_dir=str(data_dir), tokenizer_dir=str(tok_dir), out=str(out),
                  tokenizer_fingerprint=tokenizer_fingerprint, run_name=f"pretrain-{cfg.label()}",
                  eval_bundle_dir=str(eval_bundle_dir) if eval_bundle_dir else "")
    PretrainConfig(**values)  # the trainer's own validation, before paying for a launch
    return values


def _plan(cfg: Config, vocab_size: int):
    from core.scaling import derive

    try:
        return derive(cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len, vocab_size,
                      cfg.target_param_data_ratio, cfg.target_flops, cfg.num_iterations, cfg.total_batch_size,
                      window_pattern=cfg.window_pattern, warmup_steps=cfg.warmup_steps,
                      warmdown_ratio=cfg.warmdown_ratio, final_lr_frac=cfg.final_lr_frac)
    except ValueError as e:
        raise ConfigError(f"pretrain: {e}") from None


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    if cfg.node_rank > 0:
        raise ConfigError(f"pretrain: node_rank={cfg.node_rank} joins node 0's run rather than building the artifact: "
                          "run `nanorun stage pretrain ... --join` on this node (only node 0 commits)")
    total = _train(cfg, inputs, Path(out))
    return finish(cfg, Path(out), total)


def join(cfg: Config, inputs: dict[str, Input], out: Path) -> None:
    """This node's share of a multi-node run (node_rank >= 1): the same torchrun job through the
    c10d rendezvous at node 0, writing into the same (shared) work dir. Commits nothing: node 0's
    run() lays out and commits the artifact once every node is done."""
    if cfg.nnodes < 2 or cfg.node_rank < 1:
        raise ConfigError(f"pretrain: joining needs nnodes > 1 and node_rank >= 1 (got nnodes={cfg.nnodes}, "
                          f"node_rank={cfg.node_rank}); node 0 runs the stage itself")
    _train(cfg, inputs, Path(out))


def _train(cfg: Config, inputs: dict[str, Input], out: Path) -> int:
    """Launch (or resume) the trainer under torchrun on this node; returns the total step count."""
    from core.checkpoint import list_checkpoints
    from core.tokenizer import Tokenizer
    from stages.launch import Rendezvous

    out.mkdir(parents=True, exist_ok=True)
    node = f"-node{cfg.node_rank}" if cfg.node_rank else ""  # joined nodes keep their own config and log
    tok_dir = tokenizer_dir(inputs["tokenizer"].path)
    vocab = Tokenizer.from_directory(tok_dir).vocab_size
    plan = _plan(cfg, vocab)
    cfg.grad_accum_steps(plan.total_batch_size)  # an auto batch must divide too: fail before launching
    total = plan.num_iterations
    bundle = inputs.get("eval_bundle")
    run_json = out / f"run{node}.json"
    run_json.write_text(json.dumps(trainer_config(
        cfg, data_dir=inputs["data"].path, tok_dir=tok_dir, out=out, tokenizer_fingerprint=inputs["tokenizer"].ref.fingerprint,
        eval_bundle_dir=bundle.path if bundle else None), indent=1) + "\n")
    ckpts = list_checkpoints(out / "checkpoints")
    start = ckpts[-1][0] if ckpts else 0
    log.info("pretrain d%d: %d steps of %s tokens on %d process(es)%s", cfg.depth, total,
             f"{plan.total_batch_size:,}", cfg.world_size,
             f"; resuming from the checkpoint at step {start} in the work dir" if ckpts else "")
    progress(start, total, phase="train")
    rdzv = Rendezvous(cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint, cfg.rdzv_id) if cfg.nnodes > 1 else None
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
