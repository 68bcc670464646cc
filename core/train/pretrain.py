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

import dataclasses
import math
import os
from pathlib import Path

import torch

from core.common import dtype_name, print0
from core.dataloader import PackingLoader
from core.eval.bpb import evaluate_bpb
from core.fp8 import convert_to_fp8, disable_fp8
from core.gpt import build_model
from core.layouts import shard_files
from core.optim import apply_schedule, build_optimizer
from core.scaling import derive
from core.tokenizer import Tokenizer
from core.train.common import (LoopState, finish_run, log_eval, log_step, maybe_compile, open_log, optimizer_step, resume_model,
                               resume_state, run_entry_point, save, seed_everything, start_run, stop_run,
                               tokenizer_record)
from core.train.telemetry import run_peak_flops
from core.train.config import PretrainConfig, identity_fields
from core.train.config import parse_config as _parse_config

SAMPLE_PROMPTS = (  # the reference's prompts: facts, a little reasoning, a little arithmetic
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)
VAL_CACHE_BYTES = 256 * 2 ** 20  # keep the validation batches in memory when they fit in this


IDENTITY_FIELDS = identity_fields(PretrainConfig)


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    return _parse_config(PretrainConfig, argv, prog="python -m core.train.pretrain",
                         description="Pretrain the base model (run under torchrun for several processes)")


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


@dataclasses.dataclass
class PretrainLoop(LoopState):
    """The pretrain loop's state across resumes: the shared fields plus its validation results."""
    min_val_bpb: float = math.inf   # the lowest val bits-per-byte so far
    val_bpb: float | None = None    # the latest one (None before the first evaluation)


def train(cfg: PretrainConfig) -> dict:
    run = start_run(cfg, PretrainLoop())
    device, rank, world, dtype, loop = run.device, run.rank, run.world, run.dtype, run.loop
    tokenizer = Tokenizer.from_directory(cfg.tokenizer_dir)
    tok_rec = tokenizer_record(cfg.tokenizer_dir, tokenizer.vocab_size, cfg.tokenizer_fingerprint or None)
    token_bytes = tokenizer.token_bytes().to(device)
    train_files, val_files = shard_files(Path(cfg.data_dir))
    plan = derive(cfg, tokenizer.vocab_size)
    grad_accum = plan.grad_accum_steps(cfg.device_batch_size, world)  # refuses a batch that does not divide
    total_steps, batch = plan.num_iterations, plan.total_batch_size

    # model: built and initialised exactly as a fresh run, then overwritten by the checkpoint if any
    seed_everything(cfg.seed)
    orig_model = build_model(plan.model_config(), device, dtype, seed=cfg.seed)
    notes = resume_model(run, orig_model, identity=cfg.identity(), tokenizer=tok_rec,
                         device_batch_size=cfg.device_batch_size)
    n_fp8 = convert_to_fp8(orig_model, cfg.fp8_recipe) if cfg.fp8 else 0
    model, use_compile = maybe_compile(orig_model, cfg.compile, device, dtype, plan.num_iterations)
    optimizer = build_optimizer(orig_model, plan, distributed=run.info.ddp, compile_steps=use_compile)
    loader_state = resume_state(run, optimizer)
    train_loader = PackingLoader(train_files, tokenizer, cfg.device_batch_size, cfg.max_seq_len, rank, world,
                                 state=loader_state, device=device, buffer_size=cfg.loader_buffer)

    peak, peak_source = run_peak_flops(run)
    derived = {**plan.to_dict(), "world_size": world, "device_batch_size": cfg.device_batch_size,
               "grad_accum_steps": grad_accum, "tokens_per_micro_batch": cfg.device_batch_size * cfg.max_seq_len,
               "device": str(device), "dtype": dtype_name(dtype), "compile": use_compile, "fp8_layers": n_fp8,
               "peak_flops": peak, "peak_flops_source": peak_source}
    print0(plan.table())
    open_log(run, total_steps=total_steps, notes=notes, config=dataclasses.asdict(cfg), identity=cfg.identity(),
             derived=derived, tokenizer=tok_rec, wandb_mode=cfg.wandb, wandb_project=cfg.wandb_project,
             wandb_name=cfg.run_name or f"d{cfg.depth}", wandb_config={**dataclasses.asdict(cfg), **derived}, rows=[
                 ("processes / device / dtype", f"{world} / {device} / {dtype_name(dtype)}"),
                 ("micro-batch x grad accum", f"{cfg.device_batch_size} x {cfg.max_seq_len} tokens x {world} ranks x "
                                              f"{grad_accum} = {batch:,} tokens"),
                 ("peak FLOP/s per process", f"{peak:.3e} ({peak_source})"),
                 ("compile / fp8 / wandb", f"{use_compile} / "
                                           f"{f'{cfg.fp8_recipe}, {n_fp8} layers' if cfg.fp8 else 'off'} / {cfg.wandb}"),
                 ("tokenizer", f"{tok_rec['fingerprint']} (vocab {tok_rec['vocab_size']:,})"),
                 ("data", f"{len(train_files)} train / {len(val_files)} val shard(s) in {cfg.data_dir}")])

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
                "val_bpb": loop.val_bpb}

    step = run.start_step
    if step == total_steps:
        print0(f"the checkpoint at step {step} is the end of this run: nothing left to train")
    while True:
        last = step == total_steps
        fresh = not run.resumed_at(step)  # a resumed step's evals and save happened before its save
        due = lambda every: fresh and every > 0 and (last or (step > 0 and step % every == 0))  # noqa: E731
        flops = plan.flops_per_token * batch * step
        if cfg.eval_every > 0 and fresh and (last or step % cfg.eval_every == 0):  # step 0 too: the baseline
            model.eval()
            with disable_fp8(orig_model):
                bpb = evaluate_bpb(orig_model if cfg.fp8 else model, val_batches(), token_bytes, steps=eval_steps)
            model.train()
            loop.val_bpb, loop.min_val_bpb = bpb, min(loop.min_val_bpb, bpb)
            print0(f"step {step:05d}/{total_steps:05d} | val bpb {bpb:.6f} (min {loop.min_val_bpb:.6f})")
            log_eval(run, step, {"val/bpb": bpb, "tokens": step * batch, "total_training_flops": flops},
                     kind="val", val_bpb=bpb, tokens=step * batch)
        if cfg.eval_bundle_dir and due(cfg.core_metric_every):
            from core.eval.core import evaluate_core
            # like the reference, prompts are not cut to the training context (few-shot prompts may be
            # longer); only to what the rotary table covers (10x the context)
            with disable_fp8(orig_model):
                res = evaluate_core(orig_model, tokenizer, cfg.eval_bundle_dir, device=device, rank=rank,
                                    world_size=world, max_per_task=cfg.core_metric_max_per_task,
                                    max_seq_len=orig_model.rotary_len)
            print0(f"step {step:05d}/{total_steps:05d} | {res.label}: {res.core:.4f}")
            centered = {k: t.centered for k, t in res.tasks.items()}
            log_eval(run, step, {"core_metric": res.core, "centered_results": centered, "total_training_flops": flops},
                     kind="core", core=res.core, label=res.label, tasks=centered)
        if run.master and due(cfg.sample_every):
            orig_model.eval()
            with disable_fp8(orig_model):
                samples = greedy_samples(orig_model, tokenizer)
            orig_model.train()
            for s in samples:
                print0(f"sample | {s!r}")
            run.metrics.append("sample", step=step, samples=samples)
        stop = run.stop_requested()  # a SIGTERM: save this step, then leave
        if run.save_due(step, cfg.save_every, last=last, stop=stop):
            save(run, step, model=orig_model, optimizer=optimizer, loader_state=train_loader.state_dict(),
                 meta=meta_record(), keep=cfg.keep_checkpoints)
        if last:
            break
        if stop:
            train_loader.close()
            stop_run(run, step)
        lrm = apply_schedule(optimizer, plan, step)  # Muon + AdamW with the reference's schedules
        train_loss, dt = optimizer_step(run, model, optimizer, train_loader, grad_accum)
        step += 1
        log_step(run, step, train_loss, lrm, dt, tokens_per_step=batch, flops_per_token=plan.flops_per_token,
                 peak=peak, epoch=train_loader.stats()["epoch"])

    summary = {"step": total_steps, "val_bpb": loop.val_bpb,
               "min_val_bpb": None if math.isinf(loop.min_val_bpb) else loop.min_val_bpb,
               "train_loss": loop.train_loss(total_steps),
               "training_time": loop.training_time, "wall_time": loop.wall_time,
               "tokens": total_steps * batch, "num_params": plan.num_params,
               "num_scaling_params": plan.num_scaling_params, "world_size": world}
    train_loader.close()
    return finish_run(run, summary, f"{total_steps:,} steps, {total_steps * batch:,} tokens | val bpb "
                                    f"{loop.val_bpb} (min {summary['min_val_bpb']})")


def main(argv: list[str] | None = None) -> None:
    run_entry_point(train, parse_config(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    main()
