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

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.checkpoint import (check_tokenizer, latest_checkpoint, load_checkpoint, load_model, rng_state,
                             save_checkpoint, set_rng_state)
from core.common import cleanup_distributed, compute_dtype, dtype_name, init_distributed, parse_dtype, print0, \
    set_num_threads
from core.optim import SMALL_PARAM, build_optimizer
from core.scaling import reference_lrs
from core.tasks.mixture import build_mixture
from core.tokenizer import Tokenizer
from core.train.common import (MetricsLog, StepClock, WANDB_MODES, check_resume, format_step_line,
                               mark_loop_started, peak_flops, run_entry_point, seed_everything, setup_wandb,
                               tokenizer_record)


def _opt(default, help: str, identity: bool = False):
    return field(default=default, metadata={"help": help, "identity": identity})


@dataclass
class SFTConfig:
    base_checkpoint: str = _opt("", "the base model: a complete checkpoint directory (step_NNNNNN)")
    tokenizer_dir: str = _opt("", "tokenizer artifact the base was trained with")
    mixture: str = _opt("", 'JSON file {"train": [specs], "val": [specs], "seed": N, "paths": {source: file}}')
    out: str = _opt("", "output directory: checkpoints/, metrics.jsonl (resumes from its checkpoints)")
    tokenizer_fingerprint: str = _opt("", "the tokenizer artifact's fingerprint (default: a hash of tokenizer.json)")
    # identity: the recipe (-1 = inherit from the base run, as the reference)
    max_seq_len: int = _opt(-1, "row length (-1 = the base model's context)", True)
    total_batch_size: int = _opt(-1, "tokens per optimizer step (-1 = the base run's)", True)
    num_iterations: int = _opt(-1, "optimizer steps (-1 = one pass over the mixture)", True)
    embedding_lr: float = _opt(-1.0, "AdamW lr of wte, raw (-1 = the base run's)", True)
    unembedding_lr: float = _opt(-1.0, "AdamW lr of lm_head, raw (-1 = the base run's)", True)
    matrix_lr: float = _opt(-1.0, "Muon lr, raw (-1 = the base run's)", True)
    scalar_lr: float = _opt(-1.0, "AdamW lr of the per-layer scalars, raw (-1 = the base run's)", True)
    init_lr_frac: float = _opt(0.8, "every LR starts at this fraction of the above", True)
    warmup_ratio: float = _opt(0.0, "fraction of the steps with a linear LR warmup", True)
    warmdown_ratio: float = _opt(0.5, "fraction of the steps at the end with a linear LR decay", True)
    final_lr_frac: float = _opt(0.0, "LR at the end, as a fraction of the initial LR", True)
    weight_decay: float = _opt(0.0, "Muon weight decay", True)
    load_optimizer: bool = _opt(True, "warm-start the optimizer state from the base checkpoint", True)
    buffer_size: int = _opt(100, "conversations kept rendered for best-fit packing (reference: 100)", True)
    seed: int = _opt(42, "RNG seed", True)
    dtype: str = _opt("auto", "compute dtype: auto | bfloat16 | float32 | float16", True)
    # runtime
    device_type: str = _opt("", "cuda | cpu | mps (empty = autodetect)")
    device_batch_size: int = _opt(-1, "rows per micro-batch per process (-1 = the base run's)")
    eval_every: int = _opt(200, "val loss every N steps and at the end (-1 = only at the end)")
    eval_tokens: int = _opt(40 * 524288, "validation tokens per evaluation (at most one pass over the val mixture)")
    save_every: int = _opt(-1, "checkpoint every N steps (-1 = only at the end)")
    keep_checkpoints: int = _opt(2, "keep the newest K checkpoints")
    compile: bool | None = _opt(None, "torch.compile the model (default: on CUDA only)")
    wandb: str = _opt("offline", "wandb mode: disabled | offline | online")
    wandb_project: str = _opt("nanorun-sft", "wandb project")
    run_name: str = _opt("", "wandb run name (default: sft-d{depth})")

    def __post_init__(self):
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"--wandb {self.wandb!r}: use one of {', '.join(WANDB_MODES)}")
        if not (0 <= self.warmup_ratio <= 1 and 0 <= self.warmdown_ratio <= 1 and
                self.warmup_ratio + self.warmdown_ratio <= 1 and 0 <= self.final_lr_frac <= 1):
            raise ValueError("--warmup-ratio, --warmdown-ratio (summing to <= 1) and --final-lr-frac must be in [0, 1]")
        if self.init_lr_frac <= 0 or self.buffer_size < 1 or self.keep_checkpoints < 1 or self.eval_tokens < 1:
            raise ValueError("--init-lr-frac must be > 0; --buffer-size, --keep-checkpoints, --eval-tokens >= 1")

    def identity(self, mixture: dict | None = None) -> dict:
        ident = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["identity"]}
        if mixture is not None:
            ident["mixture"] = {k: mixture[k] for k in ("train", "val", "seed")}
        return ident


IDENTITY_FIELDS = tuple(f.name for f in fields(SFTConfig) if f.metadata["identity"])


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    p = argparse.ArgumentParser(prog="python -m core.train.sft", description="Supervised fine-tuning for chat")
    p.add_argument("--config", help="JSON file with any of the options below; command-line flags win")
    for f in fields(SFTConfig):
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool) or f.default is None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=type(f.default), **kw)
    args = vars(p.parse_args(argv))
    values = json.loads(Path(args.pop("config")).read_text()) if args.get("config") else {}
    args.pop("config", None)
    unknown = sorted(set(values) - {f.name for f in fields(SFTConfig)})
    if unknown:
        p.error(f"config: unknown key(s) {unknown}")
    values.update(args)
    try:
        cfg = SFTConfig(**values)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    for name in ("base_checkpoint", "tokenizer_dir", "mixture", "out"):
        if not getattr(cfg, name):
            p.error(f"--{name.replace('_', '-')} is required (or give it in --config)")
    return cfg


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


def _unshard(states: list[dict], groups: list[dict]) -> dict[int, dict]:
    """Per-rank optimizer state dicts (ZeRO-2 shards, or one full state) -> full single-process state."""
    full, idx = {}, 0
    for g in groups:
        params = g["params"]
        if g["kind"] == "adamw":
            for p in params:
                per = [s["state"].get(idx) for s in states]
                if per[0] is not None:
                    st = dict(per[0])
                    for key in ("exp_avg", "exp_avg_sq"):
                        if st[key].shape != p.shape:  # row shards: rank r holds rows [r*rows, (r+1)*rows)
                            st[key] = torch.cat([s[key] for s in per], 0)
                    full[idx] = st
                idx += 1
        else:  # a Muon group's state lives on its first param: rank r owns matrices [r*chunk, (r+1)*chunk)
            per = [s["state"].get(idx) for s in states]
            if per[0] is not None:
                full[idx] = {k: torch.cat([s[k] for s in per], 0)[:len(params)] for k in per[0]}
            idx += len(params)
    return full


def _shard(full: dict[int, dict], groups: list[dict], rank: int, world: int) -> dict[int, dict]:
    """Full state -> this rank's shard in the layout of core.optim (MuonAdamW or DistMuonAdamW)."""
    out, idx = {}, 0
    for g in groups:
        params = g["params"]
        if g["kind"] == "adamw":
            for p in params:
                if idx in full:
                    st = dict(full[idx])
                    if world > 1 and not (p.numel() < SMALL_PARAM or p.shape[0] % world):
                        rows = p.shape[0] // world
                        st = {k: (v[rank * rows:(rank + 1) * rows].clone() if k != "step" else v) for k, v in st.items()}
                    out[idx] = st
                idx += 1
        else:
            if idx in full:
                n = len(params)
                chunk = -(-n // world)
                lo, owned = rank * chunk, max(0, min(chunk, n - rank * chunk))
                st = {}
                for k, v in full[idx].items():
                    buf = torch.zeros((chunk, *v.shape[1:]), dtype=v.dtype)
                    buf[:owned] = v[lo:lo + owned]
                    st[k] = buf
                out[idx] = st
            idx += len(params)
    return out


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
        state = _shard(_unshard([base_ck.optim_state(r, "cpu") for r in range(base_world)], groups), groups, rank, world)
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


@torch.no_grad()
def evaluate_val(model, batches: list, token_bytes: torch.Tensor, device) -> tuple[float, float]:
    """(loss in nats per trained token, bits per byte) over the batches, summed over all ranks.
    bpb counts only targets that have bytes (not specials such as <|assistant_end|>), as core.eval.bpb."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, nats on byte tokens, bytes
    table = token_bytes.to(device=device, dtype=torch.int64)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = model(x, targets=y, loss_reduction="none").double()  # 0 at ignored targets
        valid = y != -1
        nb = torch.where(valid, table[torch.where(valid, y, 0)], 0)
        sums += torch.stack([loss.sum(), valid.sum().double(), torch.where(nb > 0, loss, 0).sum(), nb.sum().double()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    nats, count, byte_nats, nbytes = sums.tolist()
    if count == 0 or nbytes == 0:
        raise ValueError("validation: no trained-on targets in the val mixture; give it more conversations")
    return nats / count, byte_nats / (math.log(2) * nbytes)


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


def train(cfg: SFTConfig) -> dict:
    t_process = time.time()
    info = init_distributed(cfg.device_type or None)
    device, rank, world = info.device, info.rank, info.world_size
    master = rank == 0
    if device.type == "cpu":
        set_num_threads()
    dtype = compute_dtype(device) if cfg.dtype == "auto" else parse_dtype(cfg.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    barrier = dist.barrier if info.ddp else (lambda: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    metrics = MetricsLog(out / "metrics.jsonl", enabled=master)

    # ---- the base model and what it inherits
    tokenizer = Tokenizer.from_directory(cfg.tokenizer_dir)
    base_ck = load_checkpoint(Path(cfg.base_checkpoint))
    base = base_ck.meta
    check_tokenizer(base, cfg.tokenizer_fingerprint or None, tokenizer.vocab_size, f"--base-checkpoint {base_ck.path}")
    tok_rec = (tokenizer_record(cfg.tokenizer_dir, tokenizer.vocab_size, cfg.tokenizer_fingerprint)
               if cfg.tokenizer_fingerprint or not base.get("tokenizer") else dict(base["tokenizer"]))
    run_cfg = base.get("run_config") or {}
    model_cfg = base["model_config"]
    seq = int(_inherit(cfg.max_seq_len, model_cfg.get("sequence_len"), 2048))
    total_batch = int(_inherit(cfg.total_batch_size, (base.get("plan") or {}).get("total_batch_size"), 524288))
    dbs = int(_inherit(cfg.device_batch_size, base.get("device_batch_size"), 32))
    per_step = dbs * seq * world
    if total_batch % per_step:
        raise ValueError(f"total batch {total_batch:,} tokens is not a multiple of device_batch_size {dbs} x seq {seq} "
                         f"x {world} process(es) = {per_step:,}: change --device-batch-size or --total-batch-size")
    grad_accum = total_batch // per_step
    raw = {k: float(_inherit(getattr(cfg, k), run_cfg.get(k), d)) for k, d in
           (("embedding_lr", 0.3), ("unembedding_lr", 0.008), ("matrix_lr", 0.02), ("scalar_lr", 0.5))}
    lrs = reference_lrs(model_cfg["n_embd"], 1.0, weight_decay=cfg.weight_decay, **raw)
    lrs = {k: (v * cfg.init_lr_frac if k.endswith("_lr") else v) for k, v in lrs.items()}
    mixture = json.loads(Path(cfg.mixture).read_text())
    base_id = hashlib.sha256(json.dumps({"step": base_ck.step, "model_config": model_cfg,
                                         "identity": base.get("identity")}, sort_keys=True).encode()).hexdigest()[:16]
    identity = {**cfg.identity(mixture), "base": base_id}

    # ---- model, resume, optimizer
    seed_everything(cfg.seed)
    orig_model, _ = load_model(base_ck.path, device, dtype)
    orig_model.train()
    latest = latest_checkpoint(ckpt_root)
    ck, notes = None, []
    if latest is not None:
        ck = load_checkpoint(latest)
        notes = check_resume(ck.meta, where=latest, identity=identity, tokenizer=tok_rec, world_size=world,
                             device_batch_size=dbs)
        orig_model.load_state_dict(ck.model_state(device), strict=True)
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    optimizer = build_optimizer(orig_model, None, distributed=info.ddp, **lrs)
    loop = {"smooth_train_loss": 0.0, "val_loss": None, "val_bpb": None, "min_val_loss": math.inf,
            "training_time": 0.0, "timed_steps": 0, "wall_time": 0.0, "wandb_id": None}
    loader_state, start_step, warm = None, 0, "resumed: optimizer state from the checkpoint"
    if ck is not None:
        optimizer.load_state_dict(ck.optim_state(rank, device))
        rank_state = ck.rank_state(rank)
        loader_state = rank_state["loader"]
        set_rng_state(rank_state["rng"])
        loop.update(ck.meta["loop_state"])
        start_step = ck.step
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
            val_batches.append(b)
    token_bytes = tokenizer.token_bytes().to(device)
    data_seconds = time.perf_counter() - t_data

    peak, peak_source = peak_flops(device, dtype)
    flops_per_token = orig_model.estimate_flops()
    derived = {"max_seq_len": seq, "total_batch_size": total_batch, "device_batch_size": dbs,
               "grad_accum_steps": grad_accum, "num_iterations": total_steps, "pass_micro_batches": pass_batches,
               "world_size": world, "device": str(device), "dtype": dtype_name(dtype), "compile": use_compile,
               "lrs": lrs, "raw_lrs": raw, "flops_per_token": flops_per_token, "peak_flops": peak,
               "peak_flops_source": peak_source, "data": data_stats, "val_data": val_stats, "base_id": base_id,
               "num_params": sum(p.numel() for p in orig_model.parameters())}
    rows = [("base", f"{base_ck.path} (kind {base.get('kind')}, d{model_cfg['n_layer']}, id {base_id})"),
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
            ("optimizer", warm),
            ("start", f"resuming from {latest} (step {start_step})" if ck else f"fresh (no checkpoint in {ckpt_root})")]
    print0("\n".join(f"{k:<27} : {v}" for k, v in rows))
    for note in notes:
        print0(f"note: {note}")
    dropped = metrics.truncate_after(start_step if ck is not None else -1)
    if dropped:
        print0(f"metrics.jsonl: dropped {dropped} row(s) an interrupted attempt recorded after step {start_step}")
    metrics.append("start", step=start_step, resumed=ck is not None, config=dataclasses.asdict(cfg),
                   identity=identity, derived=derived, tokenizer=tok_rec)
    wandb_run = setup_wandb(cfg.wandb, project=cfg.wandb_project, name=cfg.run_name or f"sft-d{model_cfg['n_layer']}",
                            config={**dataclasses.asdict(cfg), **{k: v for k, v in derived.items() if k != "data"}},
                            directory=out, rank=rank, run_id=loop.get("wandb_id"))
    loop["wandb_id"] = getattr(wandb_run, "id", None)

    def meta_record() -> dict:
        return {"kind": "sft", "model_config": model_cfg, "tokenizer": tok_rec, "identity": identity,
                "run_config": dataclasses.asdict(cfg), "derived": derived, "device_batch_size": dbs,
                "grad_accum_steps": grad_accum, "base": {"checkpoint": str(base_ck.path), "step": base_ck.step,
                                                         "kind": base.get("kind"), "id": base_id},
                "val_loss": loop["val_loss"], "val_bpb": loop["val_bpb"], "loop_state": loop}

    clock = StepClock(total_steps, training_time=loop["training_time"], timed_steps=loop["timed_steps"])
    step = start_step
    mark_loop_started()
    while True:
        last = step == total_steps
        resumed_here = ck is not None and step == start_step  # its eval and save happened before the save
        if val_batches is not None and not resumed_here and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            model.eval()
            val_loss, val_bpb = evaluate_val(model, val_batches, token_bytes, device)
            model.train()
            loop["val_loss"], loop["val_bpb"] = val_loss, val_bpb
            loop["min_val_loss"] = min(loop["min_val_loss"], val_loss)
            print0(f"step {step:05d}/{total_steps:05d} | val loss {val_loss:.6f} | val bpb {val_bpb:.6f}")
            metrics.append("val", step=step, val_loss=val_loss, val_bpb=val_bpb)
            wandb_run.log({"step": step, "val/loss": val_loss, "val/bpb": val_bpb})
        if not resumed_here and (last or (step > 0 and cfg.save_every > 0 and step % cfg.save_every == 0)):
            loop["wall_time"] += time.time() - t_process
            t_process = time.time()
            path = save_checkpoint(ckpt_root, step, rank=rank, world_size=world,
                                   model_state=orig_model.state_dict() if master else None,
                                   optim_state=optimizer.state_dict(),
                                   rank_state={"loader": packer.state_dict(), "rng": rng_state()},
                                   meta=meta_record() if master else None, keep_last=cfg.keep_checkpoints,
                                   barrier=barrier)
            print0(f"step {step:05d}/{total_steps:05d} | saved checkpoint {path}")
        if last:
            break

        sync()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = packer.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = model(x, y)  # mean over this micro-batch's trained targets (each row has some)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        lrm = lr_multiplier(cfg, step, total_steps)
        optimizer.set_schedule(lrm, muon_momentum(step))
        optimizer.step()
        orig_model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum).item()
        sync()
        dt = time.perf_counter() - t0
        step += 1
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {step}: lower the learning rates")
        clock.tick(dt, step)
        loop["smooth_train_loss"] = 0.9 * loop["smooth_train_loss"] + 0.1 * train_loss
        smooth = loop["smooth_train_loss"] / (1 - 0.9 ** step)
        loop["training_time"], loop["timed_steps"] = clock.training_time, clock.timed_steps
        tok_per_s = total_batch / dt
        mfu = 100 * flops_per_token * total_batch / dt / (peak * world)
        print0(format_step_line(step, total_steps, smooth, lrm, dt, tok_per_s, mfu, clock.training_time,
                                clock.eta(step)))
        metrics.append("train", step=step, loss=smooth, raw_loss=train_loss, lrm=lrm, dt=dt, tok_per_s=tok_per_s,
                       mfu=mfu, training_time=clock.training_time)
        if step % 10 == 0 or step == total_steps:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/tok_per_sec": tok_per_s,
                           "train/mfu": mfu})
        if step == start_step + 1:  # the reference's GC trick (see core/train/pretrain.py)
            gc.collect()
            gc.freeze()
            gc.disable()

    summary = {"step": total_steps, "val_loss": loop["val_loss"], "val_bpb": loop["val_bpb"],
               "min_val_loss": None if math.isinf(loop["min_val_loss"]) else loop["min_val_loss"],
               "train_loss": loop["smooth_train_loss"] / (1 - 0.9 ** max(total_steps, 1)),
               "training_time": loop["training_time"], "wall_time": loop["wall_time"], "world_size": world}
    if start_step < total_steps:
        metrics.append("done", **summary)
        print0(f"done: {total_steps:,} steps | val loss {loop['val_loss']} | training time "
               f"{clock.training_time / 60:.2f}m")
    wandb_run.finish()
    cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> None:
    run_entry_point(train, parse_config(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    main()
