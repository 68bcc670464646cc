"""Supervised fine-tuning for chat, with exact resume. Run under torchrun like the pretrainer:

    python -m torch.distributed.run --standalone --nproc_per_node=8 -m core.train.sft \\
        --base-checkpoint BASE/checkpoints/step_005568 --tokenizer-dir TOK --mixture mixture.json --out OUT
    # CPU, one process, a tiny model (seconds):
    python -m core.train.sft --base-checkpoint B --tokenizer-dir TOK --mixture mixture.json --out /tmp/sft \\
        --device-batch-size 4 --total-batch-size 512 --max-seq-len 64 --matrix-lr 0.005 --embedding-lr 0.1 \\
        --unembedding-lr 0.004 --scalar-lr 0.01 --eval-every 5 --save-every 5 --wandb disabled
    python -m core.train.sft --config OUT/run.json          # the same keys from a file (what stages/sft.py writes)

mixture.json: {"train": [TaskSpec dicts], "val": [TaskSpec dicts], "seed": 42, "paths": {source: local file}}
(core.tasks.mixture; paths is where each file/URL source lives on this machine and is not part of
the recipe). Everything lands in OUT: checkpoints/step_NNNNNN (kind "sft"), metrics.jsonl, wandb/.

The recipe (reference: nanochat scripts/chat_sft.py):
- start from the base checkpoint (core.checkpoint.load_model; the tokenizer must be the one it was
  trained with); max_seq_len, total and device batch size default to the base run's; the AdamW/Muon
  LRs default to the base run's *raw* LRs (no batch scaling, as the reference) x init_lr_frac 0.8;
  Muon weight decay 0 (pretraining already decayed it to 0).
- optimizer warm start: the base checkpoint's momentum / second-moment buffers are loaded (only
  the state: LRs and the rest are this run's). A base saved by another number of processes is
  re-sharded (ZeRO-2 shards gathered, then split for this world size).
- data: each conversation is rendered with its loss mask (core.tokenizer.render_conversation, cut
  to max_seq_len + 1 tokens) and rows of max_seq_len + 1 tokens are packed best-fit from a buffer of
  `buffer_size` conversations (the largest that fits, earliest among equals); when none fits the
  row is padded with BOS: a conversation is never cropped across rows. Targets are -1 where the
  mask is 0 (user turns, tool output, BOS, padding). Rank r takes conversations r, r+W, ... of the
  shuffled mixture; conversations with nothing to train on after the cut are skipped.
- horizon: one pass over the mixture (until a rank has packed all of its share; the reference's
  stop rule) unless --num-iterations. The pass is simulated on the rendered lengths first, so the
  number of steps is exact and the LR schedule uses progress = step / steps (the reference
  estimates progress from consumption): constant, then a linear warmdown over the last
  warmdown_ratio to final_lr_frac; Muon momentum 0.85 -> 0.95 over 300 steps.
- val: loss (nats per trained token) and bits per byte on the validation mixture, every
  --eval-every steps and at the end.
Resume is automatic and exact (as core/train/pretrain.py): the newest complete checkpoint in
OUT/checkpoints restores the model, this rank's optimizer shard, the packer (cursor, buffer), RNG
and loop state; a killed and resumed run ends bit-identical (tests/core/test_sft.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.checkpoint import load_model
from core.common import dtype_name, print0
from core.eval.bpb import evaluate_loss_bpb
from core.optim import build_optimizer, shard_state, unshard_state
from core.scaling import B_REF, reference_lrs
from core.tasks.mixture import build_mixture
from core.train.common import (LoopState, finish_run, load_base, log_eval, log_step, maybe_compile, open_log,
                               optimizer_step, resume_model, resume_state, run_entry_point, save, seed_everything,
                               start_run, stop_run)
from core.train.telemetry import run_peak_flops
from core.train.config import PretrainConfig, SFTConfig, identity_fields
from core.train.config import parse_config as _parse_config


IDENTITY_FIELDS = identity_fields(SFTConfig)


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    return _parse_config(SFTConfig, argv, prog="python -m core.train.sft", description="Supervised fine-tuning for chat")


# ---- data: render, pack best-fit with padding --------------------------------------------------------


def render_share(mixture, tokenizer, rank: int, world: int, cap: int) -> tuple[list, dict]:
    """This rank's conversations (mixture indices rank, rank+W, ...) rendered and cut to `cap`
    tokens, as (ids int32, mask int8) arrays; and counts (per task, tokens, skipped)."""
    convs, stats = [], {"conversations": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0, "skipped": 0}
    per_task: dict[str, int] = {}
    for i in range(rank, len(mixture), world):
        ids, mask = tokenizer.render_conversation(mixture[i], max_tokens=1 << 62)
        if len(ids) > cap:
            stats["truncated"] += 1
            ids, mask = ids[:cap], mask[:cap]
        if not any(mask[1:]):  # nothing left to learn from (a long prompt cut before the reply)
            stats["skipped"] += 1
            continue
        convs.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)))
        name = mixture.task_of(i)
        per_task[name] = per_task.get(name, 0) + 1
        stats["conversations"] += 1
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += int(sum(mask[1:]))
    stats["per_task"] = per_task
    return convs, stats


class Packer:
    """Rows of cap = T+1 tokens packed best-fit from a buffer of conversations, padded with BOS.

    cycle=True wraps around the share (epochs); cycle=False stops when it is used up (validation).
    state_dict() is everything needed to continue exactly: how many conversations were fetched,
    how many were packed, and which ones sit in the buffer, in order."""

    def __init__(self, convs: list, batch_size: int, cap: int, bos: int, buffer_size: int, cycle: bool = True,
                 state: dict | None = None):
        if not convs and cycle:
            raise ValueError("this rank got no conversations to train on: the mixture is smaller than the "
                             "number of processes, or nothing in it fits; use fewer processes or more data")
        self.convs, self.batch_size, self.cap, self.bos = convs, batch_size, cap, bos
        self.buffer_size, self.cycle = buffer_size, cycle
        self.lengths = [len(c[0]) for c in convs]
        state = state or {"fetched": 0, "packed": 0, "buffer": []}
        self.fetched, self.packed, self.buffer = state["fetched"], state["packed"], list(state["buffer"])

    def state_dict(self) -> dict:
        return {"fetched": self.fetched, "packed": self.packed, "buffer": list(self.buffer)}

    def _refill(self) -> None:
        n = len(self.convs)
        while len(self.buffer) < self.buffer_size and (self.cycle or self.fetched < n):
            self.buffer.append(self.fetched % n)
            self.fetched += 1

    def next_row(self) -> list[int]:
        """Indices of the conversations packed into the next row (empty when used up)."""
        row, used = [], 0
        while True:
            self._refill()
            best, best_len = -1, 0
            for j, ci in enumerate(self.buffer):
                n = self.lengths[ci]
                if best_len < n <= self.cap - used:
                    best, best_len = j, n
            if best < 0:
                return row
            row.append(self.buffer.pop(best))
            used += best_len
            self.packed += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inputs, targets) int64 (B, T); None once a non-cycling packer is used up."""
        rows = [self.next_row() for _ in range(self.batch_size)]
        if not any(rows):
            return None
        tokens = np.full((self.batch_size, self.cap), self.bos, dtype=np.int64)
        mask = np.zeros((self.batch_size, self.cap), dtype=np.int8)
        for r, row in enumerate(rows):
            pos = 0
            for ci in row:
                ids, m = self.convs[ci]
                tokens[r, pos:pos + len(ids)] = ids
                mask[r, pos:pos + len(ids)] = m
                pos += len(ids)
        targets = tokens[:, 1:].copy()
        targets[mask[:, 1:] == 0] = -1  # prompts, tool output, BOS and padding are not trained on
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(targets)


def batches_per_pass(convs: list, batch_size: int, cap: int, buffer_size: int) -> int:
    """Micro-batches until every conversation of the share has been packed (dry run on lengths)."""
    p = Packer(convs, batch_size, cap, 0, buffer_size, cycle=True)
    batches = 0
    while p.packed < len(convs):
        for _ in range(batch_size):
            p.next_row()
        batches += 1
    return batches


# ---- optimizer warm start ------------------------------------------------------------------------------


def warm_start_optimizer(optimizer, base_ck, rank: int, world: int, device) -> str:
    """Load the base checkpoint's optimizer buffers into `optimizer` (state only: this run's LRs,
    momentum and weight decay stay). Returns what was done, for the log."""
    base_world = int(base_ck.meta.get("world_size") or 1)
    files = [base_ck.path / f"optim_rank{r}.pt" for r in range(base_world)]
    if not all(f.is_file() for f in files):
        return f"no optimizer state in {base_ck.path}: fresh optimizer (the reference warns this is slightly worse)"
    groups = optimizer.param_groups
    if base_world == world:
        state = base_ck.optim_state(rank, "cpu")["state"]
        how = "same process count"
    else:
        state = shard_state(unshard_state([base_ck.optim_state(r, "cpu") for r in range(base_world)], groups), groups, rank, world)
        how = f"re-sharded from {base_world} to {world} process(es)"
    params = [p for g in groups for p in g["params"]]
    for idx, st in state.items():
        optimizer.state[params[int(idx)]] = {k: (v if k == "step" else v.to(device)) for k, v in st.items()}
    return f"optimizer warm start: {len(state)} param state(s) from {base_ck.path} ({how})"


# ---- schedule and evaluation -----------------------------------------------------------------------------


def lr_multiplier(cfg: SFTConfig, step: int, total: int) -> float:
    progress = step / max(total, 1)
    if progress < cfg.warmup_ratio:
        return (progress + 1e-8) / cfg.warmup_ratio
    if progress <= 1.0 - cfg.warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - cfg.warmdown_ratio)) / cfg.warmdown_ratio
    return (1 - decay) + decay * cfg.final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ---- the run -----------------------------------------------------------------------------------------------


def _all_reduce(values: list[float], op, device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _inherit(value, base_value, fallback):
    """The reference's rule: an explicit value wins, else the base run's, else the default."""
    if value is not None and value > 0:
        return value
    return base_value if base_value is not None else fallback


@dataclasses.dataclass
class SFTLoop(LoopState):
    """The SFT loop's state across resumes: the shared fields plus its validation results."""
    val_loss: float | None = None   # the latest val loss (None before the first evaluation)
    val_bpb: float | None = None    # the latest val bits-per-byte
    min_val_loss: float = math.inf  # the lowest val loss so far


def train(cfg: SFTConfig) -> dict:
    run = start_run(cfg, SFTLoop())
    device, rank, world, dtype, loop = run.device, run.rank, run.world, run.dtype, run.loop

    # ---- the base model and what it inherits
    tokenizer, base_ck, tok_rec, base_id = load_base(cfg)
    base = base_ck.meta
    run_cfg = base.get("run_config") or {}
    model_cfg = base["model_config"]
    # a base without a record of its own gets the pretraining defaults (PretrainConfig's, B_REF)
    seq = int(_inherit(cfg.max_seq_len, model_cfg.get("sequence_len"), PretrainConfig.max_seq_len))
    total_batch = int(_inherit(cfg.total_batch_size, (base.get("plan") or {}).get("total_batch_size"), B_REF))
    dbs = int(_inherit(cfg.device_batch_size, base.get("device_batch_size"), PretrainConfig.device_batch_size))
    per_step = dbs * seq * world
    if total_batch % per_step:
        raise ValueError(f"total batch {total_batch:,} tokens is not a multiple of device_batch_size {dbs} x seq {seq} "
                         f"x {world} process(es) = {per_step:,}: change --device-batch-size or --total-batch-size")
    grad_accum = total_batch // per_step
    raw = {k: float(_inherit(getattr(cfg, k), run_cfg.get(k), getattr(PretrainConfig, k)))
           for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}
    lrs = reference_lrs(model_cfg["n_embd"], 1.0, weight_decay=cfg.weight_decay, **raw)
    lrs = {k: (v * cfg.init_lr_frac if k.endswith("_lr") else v) for k, v in lrs.items()}
    mixture = json.loads(Path(cfg.mixture).read_text())
    identity = {**cfg.identity(mixture), "base": base_id}

    # ---- model, resume, optimizer
    seed_everything(cfg.seed)
    orig_model, _ = load_model(base_ck.path, device, dtype)
    orig_model.train()
    notes = resume_model(run, orig_model, identity=identity, tokenizer=tok_rec, device_batch_size=dbs)
    model, use_compile = maybe_compile(orig_model, cfg.compile, device)
    optimizer = build_optimizer(orig_model, None, distributed=run.info.ddp, **lrs)
    loader_state = resume_state(run, optimizer)
    if run.ck is not None:
        warm = "resumed: optimizer state from the checkpoint"
    elif cfg.load_optimizer:
        warm = warm_start_optimizer(optimizer, base_ck, rank, world, device)
    else:
        warm = "fresh optimizer state (--no-load-optimizer)"

    # ---- data: render this rank's share, count the pass, cache the val batches
    t_data = time.perf_counter()
    cap = seq + 1
    train_mix = build_mixture(mixture["train"], mixture.get("paths"), seed=mixture.get("seed", 42))
    convs, stats = render_share(train_mix, tokenizer, rank, world, cap)
    names = sorted(train_mix.counts)
    counts = [stats[k] for k in ("conversations", "tokens", "trained_tokens", "truncated", "skipped")]
    summed = _all_reduce(counts + [stats["per_task"].get(n, 0) for n in names], dist.ReduceOp.SUM, device)
    data_stats = dict(zip(("conversations", "tokens", "trained_tokens", "truncated", "skipped"), map(int, summed)))
    data_stats["per_task"] = dict(zip(names, map(int, summed[len(counts):])))
    data_stats["mixture_counts"] = train_mix.counts
    if cfg.num_iterations > 0:
        total_steps, pass_batches = cfg.num_iterations, None
    else:
        mine = batches_per_pass(convs, dbs, cap, cfg.buffer_size) if convs else 0
        pass_batches = int(_all_reduce([mine], dist.ReduceOp.MIN, device)[0])
        total_steps = max(1, -(-pass_batches // grad_accum))
    packer = Packer(convs, dbs, cap, tokenizer.bos_token_id, cfg.buffer_size, cycle=True, state=loader_state)
    val_batches, val_stats = None, None
    if mixture.get("val"):
        val_mix = build_mixture(mixture["val"], mixture.get("paths"), seed=mixture.get("seed", 42))
        val_convs, val_stats = render_share(val_mix, tokenizer, rank, world, cap)
        vp = Packer(val_convs, dbs, cap, tokenizer.bos_token_id, cfg.buffer_size, cycle=False)
        eval_steps = max(1, cfg.eval_tokens // per_step)
        val_batches = []
        while len(val_batches) < eval_steps and (b := vp.next_batch()) is not None:
            val_batches.append(tuple(t.to(device) for t in b))
    token_bytes = tokenizer.token_bytes().to(device)
    data_seconds = time.perf_counter() - t_data

    def train_batches():
        while True:
            yield tuple(t.to(device, non_blocking=True) for t in packer.next_batch())

    peak, peak_source = run_peak_flops(run)
    flops_per_token = orig_model.estimate_flops()
    derived = {"max_seq_len": seq, "total_batch_size": total_batch, "device_batch_size": dbs,
               "grad_accum_steps": grad_accum, "num_iterations": total_steps, "pass_micro_batches": pass_batches,
               "world_size": world, "device": str(device), "dtype": dtype_name(dtype), "compile": use_compile,
               "lrs": lrs, "raw_lrs": raw, "flops_per_token": flops_per_token, "peak_flops": peak,
               "peak_flops_source": peak_source, "data": data_stats, "val_data": val_stats, "base_id": base_id,
               "num_params": sum(p.numel() for p in orig_model.parameters())}
    open_log(run, total_steps=total_steps, notes=notes, config=dataclasses.asdict(cfg), identity=identity,
             derived=derived, tokenizer=tok_rec, wandb_mode=cfg.wandb, wandb_project=cfg.wandb_project,
             wandb_name=cfg.run_name or f"sft-d{model_cfg['n_layer']}",
             wandb_config={**dataclasses.asdict(cfg), **{k: v for k, v in derived.items() if k != "data"}}, rows=[
        ("base", f"{base_ck.path} (kind {base.get('kind')}, d{model_cfg['n_layer']}, id {base_id})"),
        ("processes / device / dtype", f"{world} / {device} / {dtype_name(dtype)}"),
        ("micro-batch x grad accum", f"{dbs} x {seq} tokens x {world} ranks x {grad_accum} = {total_batch:,} tokens"),
        ("steps", f"{total_steps:,} ({'--num-iterations' if pass_batches is None else f'one pass: {pass_batches:,} micro-batches'})"),
        ("lr (x init_lr_frac)", " / ".join(f"{k} {v:.4g}" for k, v in lrs.items())),
        ("mixture", ", ".join(f"{n} {c:,}" for n, c in train_mix.counts.items())),
        ("rendered (all ranks)", f"{data_stats['conversations']:,} conversations, {data_stats['tokens']:,} tokens "
                                 f"({data_stats['trained_tokens']:,} trained), {data_stats['truncated']} cut to "
                                 f"{cap}, {data_stats['skipped']} skipped, in {data_seconds:.1f}s"),
        ("val", f"{len(val_batches)} batch(es) per eval" if val_batches is not None else "none"),
        ("peak FLOP/s per process", f"{peak:.3e} ({peak_source})"),
        ("optimizer", warm)])

    def meta_record() -> dict:
        return {"kind": "sft", "model_config": model_cfg, "tokenizer": tok_rec, "identity": identity,
                "run_config": dataclasses.asdict(cfg), "derived": derived, "device_batch_size": dbs,
                "grad_accum_steps": grad_accum, "base": {"checkpoint": str(base_ck.path), "step": base_ck.step,
                                                         "kind": base.get("kind"), "id": base_id},
                "val_loss": loop.val_loss, "val_bpb": loop.val_bpb}

    step, batches = run.start_step, train_batches()
    while True:
        last = step == total_steps
        fresh = not run.resumed_at(step)  # a resumed step's eval and save happened before its save
        if val_batches is not None and fresh and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            model.eval()
            val_loss, val_bpb = evaluate_loss_bpb(model, val_batches, token_bytes)
            model.train()
            loop.val_loss, loop.val_bpb = val_loss, val_bpb
            loop.min_val_loss = min(loop.min_val_loss, val_loss)
            print0(f"step {step:05d}/{total_steps:05d} | val loss {val_loss:.6f} | val bpb {val_bpb:.6f}")
            log_eval(run, step, {"val/loss": val_loss, "val/bpb": val_bpb,
                                 "total_training_flops": flops_per_token * total_batch * step},
                     kind="val", val_loss=val_loss, val_bpb=val_bpb)
        stop = run.stop_requested()  # a SIGTERM: save this step, then leave
        if run.save_due(step, cfg.save_every, last=last, stop=stop):
            save(run, step, model=orig_model, optimizer=optimizer, loader_state=packer.state_dict(),
                 meta=meta_record(), keep=cfg.keep_checkpoints)
        if last:
            break
        if stop:
            stop_run(run, step)
        lrm = lr_multiplier(cfg, step, total_steps)
        optimizer.set_schedule(lrm, muon_momentum(step))
        # each micro-batch's loss is the mean over its trained targets (every row has some)
        train_loss, dt = optimizer_step(run, model, optimizer, batches, grad_accum)
        step += 1
        log_step(run, step, train_loss, lrm, dt, tokens_per_step=total_batch, flops_per_token=flops_per_token,
                 peak=peak, epoch=packer.packed / len(convs))

    summary = {"step": total_steps, "val_loss": loop.val_loss, "val_bpb": loop.val_bpb,
               "min_val_loss": None if math.isinf(loop.min_val_loss) else loop.min_val_loss,
               "train_loss": loop.train_loss(total_steps),
               "training_time": loop.training_time, "wall_time": loop.wall_time, "world_size": world}
    return finish_run(run, summary, f"{total_steps:,} steps | val loss {loop.val_loss}")


def main(argv: list[str] | None = None) -> None:
    run_entry_point(train, parse_config(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    main()
