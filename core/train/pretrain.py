"""Pretrain the base model: the nanochat speedrun loop with exact resume. Run under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=8 -m core.train.pretrain \\
        --data-dir DATA --tokenizer-dir TOK --out OUT --depth 24 --target-param-data-ratio 8 --fp8
    # CPU, one process, a tiny model in about a minute:
    python -m core.train.pretrain --data-dir DATA --tokenizer-dir TOK --out /tmp/d2 --depth 2 \\
        --head-dim 64 --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096 --num-iterations 50 \\
        --warmup-steps 5 --eval-every 25 --eval-tokens 16384 --sample-every -1 --wandb disabled
    # the same keys from a file (what stages/pretrain.py writes); flags given on the command line win:
    python -m core.train.pretrain --config OUT/run.json

DATA is a data_shards artifact (train/ and val/ shard_*.parquet), TOK a tokenizer artifact
(tokenizer.json). Everything lands in OUT: checkpoints/step_NNNNNN (the last --keep-checkpoints),
metrics.jsonl (one JSON object per step / eval, read by the stage for its curves), wandb/.

The loop (reference: nanochat scripts/base_train.py): core.scaling.derive turns the depth into the
whole recipe (printed as one table at start-up and stored in every checkpoint); each step runs
grad_accum = total_batch / (device_batch x seq x world) micro-batches so the total batch is the
same on 1 CPU process, 2 gloo processes or 8 GPUs; Muon+AdamW with the reference schedules; val
bits-per-byte every --eval-every, CORE every --core-metric-every (with --eval-bundle-dir), greedy
samples every --sample-every; a checkpoint every --save-every and at the end.

Resume is automatic and exact: if OUT/checkpoints holds a complete checkpoint, the newest one is
loaded (model, this rank's optimizer shard, the packing loader's state, RNG states, loop state) and
the run continues as if never interrupted. On CPU a run killed with SIGKILL and resumed ends with
bit-identical weights (tests/core/test_pretrain_loop.py). A checkpoint of another recipe, tokenizer
or process count is refused with the reason (core.train.common.check_resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from core.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from core.common import cleanup_distributed, compute_dtype, dtype_name, init_distributed, parse_dtype, print0, \
    set_num_threads
from core.dataloader import PackingLoader
from core.eval.bpb import evaluate_bpb
from core.fp8 import convert_to_fp8, disable_fp8
from core.gpt import build_model
from core.optim import apply_schedule, build_optimizer
from core.scaling import derive
from core.tokenizer import Tokenizer
from core.train.common import (MetricsLog, StepClock, WANDB_MODES, check_resume, format_step_line,
                               mark_loop_started, peak_flops, read_metrics, run_entry_point, seed_everything,
                               setup_wandb, tokenizer_record)

SAMPLE_PROMPTS = (  # the reference's prompts: facts, a little reasoning, a little arithmetic
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)
VAL_CACHE_BYTES = 256 * 2 ** 20  # keep the validation batches in memory when they fit in this


def _opt(default, help: str, identity: bool = False):
    return field(default=default, metadata={"help": help, "identity": identity})


@dataclass
class PretrainConfig:
    # inputs and output
    data_dir: str = _opt("", "data_shards artifact: train/ and val/ shard_*.parquet")
    tokenizer_dir: str = _opt("", "tokenizer artifact (tokenizer.json, token_bytes.npy)")
    out: str = _opt("", "output directory: checkpoints/, metrics.jsonl, wandb/ (resumes from its checkpoints)")
    tokenizer_fingerprint: str = _opt("", "the tokenizer artifact's fingerprint (stored in checkpoints; "
                                          "default: a hash of tokenizer.json)")
    eval_bundle_dir: str = _opt("", "CORE eval bundle directory (enables --core-metric-every)")
    # model: the depth dial (identity: these change the weights)
    depth: int = _opt(20, "number of transformer layers; everything else derives from it", True)
    aspect_ratio: int = _opt(64, "model_dim = depth x aspect_ratio, rounded up to head_dim", True)
    head_dim: int = _opt(128, "attention head dimension", True)
    max_seq_len: int = _opt(2048, "context length", True)
    window_pattern: str = _opt("SSSL", "sliding windows tiled over layers: S = quarter context, L = full", True)
    # horizon: num_iterations > target_flops > target_param_data_ratio
    target_param_data_ratio: float = _opt(12.0, "tokens = ratio x scaling params (also sets batch and WD)", True)
    target_flops: float = _opt(-1.0, "train for this many FLOPs (-1 = off)", True)
    num_iterations: int = _opt(-1, "explicit number of optimizer steps (-1 = off)", True)
    # optimisation
    total_batch_size: int = _opt(-1, "tokens per optimizer step (-1 = auto from the Power Lines rule)", True)
    embedding_lr: float = _opt(0.3, "AdamW lr of the token embedding (before batch/width scaling)", True)
    unembedding_lr: float = _opt(0.008, "AdamW lr of lm_head (before batch/width scaling)", True)
    matrix_lr: float = _opt(0.02, "Muon lr of the transformer matrices (before batch scaling)", True)
    scalar_lr: float = _opt(0.5, "AdamW lr of the per-layer scalars (before batch scaling)", True)
    weight_decay: float = _opt(0.28, "Muon cautious weight decay at d12 (scaled by batch and horizon)", True)
    warmup_steps: int = _opt(40, "linear LR warmup steps", True)
    warmdown_ratio: float = _opt(0.65, "fraction of steps at the end with a linear LR decay", True)
    final_lr_frac: float = _opt(0.05, "LR at the end of the warmdown, as a fraction of the peak", True)
    loader_buffer: int = _opt(1000, "documents kept tokenized for best-fit packing (the reference's 1000; it "
                                    "decides which documents share a row, so it is part of the recipe)", True)
    seed: int = _opt(42, "model init and RNG seed", True)
    dtype: str = _opt("auto", "compute dtype: auto (bf16 on SM80+ GPUs, fp32 elsewhere) | bfloat16 | float32 "
                              "| float16", True)
    fp8: bool = _opt(False, "FP8 matmuls in the transformer blocks (H100+ GPUs only)", True)
    fp8_recipe: str = _opt("tensorwise", "FP8 scaling: tensorwise | rowwise", True)
    # runtime: how the run is executed, not what it computes
    device_type: str = _opt("", "cuda | cpu | mps (empty = autodetect)")
    device_batch_size: int = _opt(32, "sequences per micro-batch per process")
    eval_every: int = _opt(250, "val bits-per-byte every N steps and at the end (-1 = off)")
    eval_tokens: int = _opt(20 * 524288, "validation tokens per evaluation (a fixed slice of the val shard)")
    core_metric_every: int = _opt(2000, "CORE every N steps and at the end (-1 = off; needs --eval-bundle-dir)")
    core_metric_max_per_task: int = _opt(500, "CORE examples per task during training (-1 = all)")
    sample_every: int = _opt(2000, "greedy samples every N steps and at the end (-1 = off)")
    save_every: int = _opt(-1, "checkpoint every N steps (-1 = only at the end)")
    keep_checkpoints: int = _opt(2, "keep the newest K checkpoints")
    compile: bool | None = _opt(None, "torch.compile the model (default: on CUDA only)")
    wandb: str = _opt("offline", "wandb mode: disabled | offline (default: no network; `wandb sync` later) | online")
    wandb_project: str = _opt("nanorun", "wandb project")
    run_name: str = _opt("", "wandb run name (default: d{depth})")

    def __post_init__(self):
        positive = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "keep_checkpoints",
                    "loader_buffer")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)  # raises with the valid names
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"--wandb {self.wandb!r}: use one of {', '.join(WANDB_MODES)}")
        if self.fp8_recipe not in ("tensorwise", "rowwise"):
            raise ValueError(f"--fp8-recipe {self.fp8_recipe!r}: use tensorwise or rowwise")
        if self.eval_every > 0 and self.eval_tokens < 1:
            raise ValueError("--eval-tokens must be >= 1 when --eval-every is on")
        if not set(self.window_pattern.upper()) <= {"S", "L"} or not self.window_pattern:
            raise ValueError(f"--window-pattern {self.window_pattern!r}: use only S and L")

    def identity(self) -> dict:
        """The settings that change the weights; a checkpoint is resumable only with the same ones."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["identity"]}


IDENTITY_FIELDS = tuple(f.name for f in fields(PretrainConfig) if f.metadata["identity"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.train.pretrain", description="Pretrain the base model "
                                "(run under torchrun for several processes)")
    p.add_argument("--config", help="JSON file with any of the options below (underscored keys); "
                                    "options given on the command line win")
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        if isinstance(f.default, bool) or f.default is None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=type(f.default), **kw)
    return p


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values = {}
    config_file = args.pop("config", None)
    if config_file:
        values = json.loads(Path(config_file).read_text())
        known = {f.name for f in fields(PretrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{config_file}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    values.update(args)
    try:
        cfg = PretrainConfig(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    for name in ("data_dir", "tokenizer_dir", "out"):
        if not getattr(cfg, name):
            parser.error(f"--{name.replace('_', '-')} is required (or give it in --config)")
    return cfg


def shard_files(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """The layout of a data_shards artifact: train/ and val/ shard_*.parquet."""
    train, val = sorted((data_dir / "train").glob("shard_*.parquet")), sorted((data_dir / "val").glob("shard_*.parquet"))
    if not train or not val:
        raise FileNotFoundError(f"--data-dir {data_dir}: expected train/ and val/ shard_*.parquet (found {len(train)} "
                                f"train, {len(val)} val); point it at a data_shards artifact")
    return train, val


# ---- FP8 ---------------------------------------------------------------------------------------


# ---- samples -------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_samples(model, tokenizer, max_tokens: int = 16) -> list[str]:
    try:
        from core.engine import Engine
    except ImportError:
        Engine = None
    out = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend="<|bos|>")
        if Engine is not None:
            rows, _ = Engine(model, tokenizer).generate_batch(tokens, num_samples=1, max_tokens=max_tokens,
                                                               temperature=0.0)
            ids = rows[0]
        else:  # plain argmax loop without a KV cache
            ids = list(tokens)
            for _ in range(max_tokens):
                ctx = torch.tensor([ids[-model.config.sequence_len:]], device=model.lm_head.weight.device)
                ids.append(int(model(ctx)[0, -1].argmax()))
        out.append(tokenizer.decode(ids[1:]))
    return out


# ---- the run -------------------------------------------------------------------------------------


def train(cfg: PretrainConfig) -> dict:
    t_process = time.time()
    info = init_distributed(cfg.device_type or None)
    device, rank, world = info.device, info.rank, info.world_size
    master = rank == 0
    if device.type == "cpu":
        set_num_threads()  # OMP_NUM_THREADS, else the cores we may use (torchrun would default to 1)
    dtype = compute_dtype(device) if cfg.dtype == "auto" else parse_dtype(cfg.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    barrier = dist.barrier if info.ddp else (lambda: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    metrics = MetricsLog(out / "metrics.jsonl", enabled=master)

    tokenizer = Tokenizer.from_directory(cfg.tokenizer_dir)
    tok_rec = tokenizer_record(cfg.tokenizer_dir, tokenizer.vocab_size, cfg.tokenizer_fingerprint or None)
    token_bytes = tokenizer.token_bytes().to(device)
    train_files, val_files = shard_files(Path(cfg.data_dir))
    plan = derive(cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len, tokenizer.vocab_size,
                  cfg.target_param_data_ratio, cfg.target_flops, cfg.num_iterations, cfg.total_batch_size,
                  window_pattern=cfg.window_pattern.upper(), embedding_lr=cfg.embedding_lr,
                  unembedding_lr=cfg.unembedding_lr, matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr,
                  weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio,
                  final_lr_frac=cfg.final_lr_frac)
    grad_accum = plan.grad_accum_steps(cfg.device_batch_size, world)  # refuses a batch that does not divide
    total_steps, batch = plan.num_iterations, plan.total_batch_size

    # model: built and initialised exactly as a fresh run, then overwritten by the checkpoint if any
    seed_everything(cfg.seed)
    orig_model = build_model(plan.model_config(), device, dtype, seed=cfg.seed)
    latest = latest_checkpoint(ckpt_root)
    ck, notes = None, []
    if latest is not None:
        ck = load_checkpoint(latest)
        notes = check_resume(ck.meta, where=latest, identity=cfg.identity(), tokenizer=tok_rec, world_size=world,
                             device_batch_size=cfg.device_batch_size)
        orig_model.load_state_dict(ck.model_state(device), strict=True)
    n_fp8 = convert_to_fp8(orig_model, cfg.fp8_recipe) if cfg.fp8 else 0
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    optimizer = build_optimizer(orig_model, plan, distributed=info.ddp)
    loop = {"smooth_train_loss": 0.0, "min_val_bpb": math.inf, "val_bpb": None, "training_time": 0.0,
            "timed_steps": 0, "wall_time": 0.0, "wandb_id": None}
    loader_state, start_step = None, 0
    if ck is not None:
        optimizer.load_state_dict(ck.optim_state(rank, device))
        rank_state = ck.rank_state(rank)
        loader_state = rank_state["loader"]
        set_rng_state(rank_state["rng"])
        loop.update(ck.meta["loop_state"])
        start_step = ck.step
    train_loader = PackingLoader(train_files, tokenizer, cfg.device_batch_size, cfg.max_seq_len, rank, world,
                                 state=loader_state, device=device, buffer_size=cfg.loader_buffer)

    peak, peak_source = peak_flops(device, dtype)
    derived = {**plan.to_dict(), "world_size": world, "device_batch_size": cfg.device_batch_size,
               "grad_accum_steps": grad_accum, "tokens_per_micro_batch": cfg.device_batch_size * cfg.max_seq_len,
               "device": str(device), "dtype": dtype_name(dtype), "compile": use_compile, "fp8_layers": n_fp8,
               "peak_flops": peak, "peak_flops_source": peak_source}
    rows = [("processes / device / dtype", f"{world} / {device} / {dtype_name(dtype)}"),
            ("micro-batch x grad accum", f"{cfg.device_batch_size} x {cfg.max_seq_len} tokens x {world} ranks x "
                                         f"{grad_accum} = {batch:,} tokens"),
            ("peak FLOP/s per process", f"{peak:.3e} ({peak_source})"),
            ("compile / fp8 / wandb", f"{use_compile} / {f'{cfg.fp8_recipe}, {n_fp8} layers' if cfg.fp8 else 'off'} / "
                                      f"{cfg.wandb}"),
            ("tokenizer", f"{tok_rec['fingerprint']} (vocab {tok_rec['vocab_size']:,})"),
            ("data", f"{len(train_files)} train / {len(val_files)} val shard(s) in {cfg.data_dir}"),
            ("start", f"resuming from {latest} (step {start_step})" if ck else "fresh (no checkpoint in "
                                                                              f"{ckpt_root})")]
    print0(plan.table())
    print0("\n".join(f"{k:<31} : {v}" for k, v in rows))
    for note in notes:
        print0(f"note: {note}")
    # rows past the checkpoint belong to an attempt that died; they are recorded again
    dropped = metrics.truncate_after(start_step if ck is not None else -1)
    if dropped:
        print0(f"metrics.jsonl: dropped {dropped} row(s) an interrupted attempt recorded after step {start_step}")
    metrics.append("start", step=start_step, resumed=ck is not None, config=dataclasses.asdict(cfg),
                   identity=cfg.identity(), derived=derived, tokenizer=tok_rec)
    wandb_run = setup_wandb(cfg.wandb, project=cfg.wandb_project, name=cfg.run_name or f"d{cfg.depth}",
                            config={**dataclasses.asdict(cfg), **derived}, directory=out, rank=rank,
                            run_id=loop.get("wandb_id"))
    loop["wandb_id"] = getattr(wandb_run, "id", None)

    # validation batches: a fixed slice of the val shard, the same at every evaluation
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world))
    cache_val = eval_steps * cfg.device_batch_size * cfg.max_seq_len * 16 <= VAL_CACHE_BYTES
    val_cache: list | None = None

    def val_batches():
        nonlocal val_cache
        if val_cache is not None:
            return val_cache
        try:
            loader = PackingLoader(val_files, tokenizer, cfg.device_batch_size, cfg.max_seq_len, rank, world,
                                   infinite=False, max_batches=eval_steps, device=device,
                                   buffer_size=cfg.loader_buffer)
        except ValueError as e:
            if "gets no data" not in str(e):
                raise
            # a small val shard split over many ranks: this rank scores nothing, the sums still
            # all-reduce over the others (evaluate_bpb joins the collective with zero counts)
            val_cache = []
            return val_cache
        if not cache_val:
            return loader
        val_cache = list(loader)
        return val_cache

    def meta_record() -> dict:
        return {"kind": "base", "model_config": plan.model_config().to_dict(), "tokenizer": tok_rec,
                "identity": cfg.identity(), "run_config": dataclasses.asdict(cfg), "plan": plan.to_dict(),
                "derived": derived, "device_batch_size": cfg.device_batch_size, "grad_accum_steps": grad_accum,
                "data": {"train": [f.name for f in train_files], "val": [f.name for f in val_files]},
                "val_bpb": loop["val_bpb"], "loop_state": loop}

    clock = StepClock(total_steps, training_time=loop["training_time"], timed_steps=loop["timed_steps"])
    step = start_step
    mark_loop_started()
    if start_step == total_steps:
        print0(f"the checkpoint at step {start_step} is the end of this run: nothing left to train")
    while True:
        last = step == total_steps
        resumed_here = ck is not None and step == start_step  # its evals and save were done before the save
        tokens_seen = step * batch
        if cfg.eval_every > 0 and (last or step % cfg.eval_every == 0) and not resumed_here:
            model.eval()
            with disable_fp8(orig_model):
                bpb = evaluate_bpb(orig_model if cfg.fp8 else model, val_batches(), token_bytes, steps=eval_steps)
            model.train()
            loop["val_bpb"], loop["min_val_bpb"] = bpb, min(loop["min_val_bpb"], bpb)
            print0(f"step {step:05d}/{total_steps:05d} | val bpb {bpb:.6f} (min {loop['min_val_bpb']:.6f})")
            metrics.append("val", step=step, val_bpb=bpb, tokens=tokens_seen)
            wandb_run.log({"step": step, "val/bpb": bpb, "tokens": tokens_seen})
        if cfg.core_metric_every > 0 and cfg.eval_bundle_dir and not resumed_here and \
                (last or (step > 0 and step % cfg.core_metric_every == 0)):
            from core.eval.core import evaluate_core
            # like the reference, prompts are not cut to the training context (few-shot prompts may be
            # longer); only to what the rotary table covers (10x the context)
            with disable_fp8(orig_model):
                res = evaluate_core(orig_model, tokenizer, cfg.eval_bundle_dir, device=device, rank=rank,
                                    world_size=world, max_per_task=cfg.core_metric_max_per_task,
                                    max_seq_len=orig_model.rotary_len)
            print0(f"step {step:05d}/{total_steps:05d} | {res.label}: {res.core:.4f}")
            metrics.append("core", step=step, core=res.core, label=res.label,
                           tasks={k: t.centered for k, t in res.tasks.items()})
            wandb_run.log({"step": step, "core_metric": res.core})
        if cfg.sample_every > 0 and master and not resumed_here and \
                (last or (step > 0 and step % cfg.sample_every == 0)):
            orig_model.eval()
            with disable_fp8(orig_model):
                samples = greedy_samples(orig_model, tokenizer)
            orig_model.train()
            for s in samples:
                print0(f"sample | {s!r}")
            metrics.append("sample", step=step, samples=samples)
        if not resumed_here and (last or (step > 0 and cfg.save_every > 0 and step % cfg.save_every == 0)):
            loop["wall_time"] += time.time() - t_process
            t_process = time.time()
            path = save_checkpoint(ckpt_root, step, rank=rank, world_size=world,
                                   model_state=orig_model.state_dict() if master else None,
                                   optim_state=optimizer.state_dict(),
                                   rank_state={"loader": train_loader.state_dict(), "rng": rng_state()},
                                   meta=meta_record() if master else None, keep_last=cfg.keep_checkpoints,
                                   barrier=barrier)
            print0(f"step {step:05d}/{total_steps:05d} | saved checkpoint {path}")
        if last:
            break

        # ---- one optimizer step: grad_accum micro-batches, then Muon + AdamW ----
        sync()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(train_loader)
            loss = model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()  # .backward() sums: divide for the mean over micro-batches
        lrm = apply_schedule(optimizer, plan, step)
        optimizer.step()
        orig_model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum).item()  # also the sync point for the timing
        sync()
        dt = time.perf_counter() - t0
        step += 1
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {step}: the run diverged; lower the "
                                     "learning rates or check the data (resuming would diverge the same way)")
        clock.tick(dt, step)
        beta = 0.9  # EMA of the loss for a readable log, debiased for the first steps
        loop["smooth_train_loss"] = beta * loop["smooth_train_loss"] + (1 - beta) * train_loss
        smooth = loop["smooth_train_loss"] / (1 - beta ** step)
        loop["training_time"], loop["timed_steps"] = clock.training_time, clock.timed_steps
        tok_per_s = batch / dt
        mfu = 100 * plan.flops_per_token * batch / dt / (peak * world)
        print0(format_step_line(step, total_steps, smooth, lrm, dt, tok_per_s, mfu, clock.training_time,
                                clock.eta(step)))
        metrics.append("train", step=step, loss=smooth, raw_loss=train_loss, lrm=lrm, dt=dt, tok_per_s=tok_per_s,
                       mfu=mfu, training_time=clock.training_time, tokens=step * batch)
        if step % 10 == 0 or step == total_steps:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt,
                           "train/tok_per_sec": tok_per_s, "train/mfu": mfu, "tokens": step * batch})
        # The reference's GC trick: after the first step, freeze the setup's objects and stop the
        # cyclic collector, which otherwise spends ~0.5 s scanning them every few steps.
        if step == start_step + 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    summary = {"step": total_steps, "val_bpb": loop["val_bpb"],
               "min_val_bpb": None if math.isinf(loop["min_val_bpb"]) else loop["min_val_bpb"],
               "train_loss": loop["smooth_train_loss"] / (1 - 0.9 ** total_steps),
               "training_time": loop["training_time"], "wall_time": loop["wall_time"],
               "tokens": total_steps * batch, "num_params": plan.num_params,
               "num_scaling_params": plan.num_scaling_params, "world_size": world}
    # (a resume at the last step means an earlier attempt finished; it may have died before this row)
    if start_step < total_steps or not any(r["kind"] == "done" for r in read_metrics(metrics.path)):
        metrics.append("done", **summary)
    if start_step < total_steps:
        print0(f"done: {total_steps:,} steps, {total_steps * batch:,} tokens | val bpb {loop['val_bpb']} "
               f"(min {summary['min_val_bpb']}) | training time {clock.training_time / 60:.2f}m")
    wandb_run.finish()
    train_loader.close()
    cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> None:
    run_entry_point(train, parse_config(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    main()
