"""The depth dial: one pure function from a depth (and a few knobs) to every derived hyperparameter.

    python -m core.scaling --depth 24 --target-param-data-ratio 8      # print the speedrun plan
    python -m core.scaling --depth 12 20 24 26                         # the reference table

    from core.scaling import derive
    plan = derive(depth=20)
    model = build_model(plan.model_config(), device)
    lrm = plan.lr_multiplier(step)

Rules (docs/reference.md#the-depth-dial; numbers as nanochat's base_train):
- model_dim = ceil(depth * aspect_ratio / head_dim) * head_dim, n_head = model_dim / head_dim.
- scaling params = transformer matrices + lm_head; target tokens = ratio * scaling params.
- D_REF = ratio * scaling params of the same recipe at depth 12; B_REF = 2^19 tokens.
  Batch B = 2^round(log2(B_REF * (target/D_REF)^0.383)) (Power Lines, arXiv:2505.13738).
- Horizon precedence: num_iterations > target_flops (round(F / (flops/token * B))) > ratio
  (target_tokens // B).
- LRs x sqrt(B/B_REF) (AdamW sqrt rule, assumed for Muon too); lm_head / wte / value-embedding
  LRs also x (model_dim/768)^-0.5 (muP-style width transfer from d12).
- Muon weight decay = 0.28 * sqrt(B/B_REF) * D_REF/target (constant T_epoch, arXiv:2405.13698),
  cosine-decayed to 0 over the run.
- Schedule: warmup 40 steps, constant, linear warmdown over the last 65% to 0.05x. Muon momentum
  0.85 -> 0.97 over 400 steps, then 0.97 -> 0.90 across the warmdown.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

from core.gpt import GPTConfig, count_params, estimate_flops

B_REF = 2 ** 19
REF_DEPTH = 12
REF_MODEL_DIM = 768
BATCH_EXPONENT = 0.383


def model_dims(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """(model_dim, n_head): depth*aspect_ratio rounded up to a multiple of head_dim."""
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    return model_dim, model_dim // head_dim


def reference_lrs(model_dim: int, batch_lr_scale: float = 1.0, embedding_lr: float = 0.3,
                  unembedding_lr: float = 0.008, matrix_lr: float = 0.02, scalar_lr: float = 0.5,
                  weight_decay: float = 0.28) -> dict:
    """Final per-group LRs (core.optim.param_groups keywords) for a width and batch scale."""
    s = (model_dim / REF_MODEL_DIM) ** -0.5
    return dict(
        lm_head_lr=unembedding_lr * batch_lr_scale * s,
        wte_lr=embedding_lr * batch_lr_scale * s,
        value_embeds_lr=0.5 * embedding_lr * batch_lr_scale * s,
        resid_lr=0.01 * scalar_lr * batch_lr_scale,
        x0_lr=scalar_lr * batch_lr_scale,
        smear_lr=0.2,  # the reference keeps the smear/backout scalars at a fixed 0.2
        matrix_lr=matrix_lr * batch_lr_scale,
        weight_decay=weight_decay,
    )


@dataclass(frozen=True)
class TrainingPlan:
    # the recipe
    depth: int
    aspect_ratio: int
    head_dim: int
    max_seq_len: int
    vocab_size: int
    window_pattern: str
    target_param_data_ratio: float
    target_flops: float | None
    # the model
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    num_params: int
    num_scaling_params: int
    flops_per_token: float
    # horizon and batch
    ref_tokens: int             # D_REF
    target_tokens: int          # ratio * scaling params (drives batch size and weight decay)
    total_batch_size: int
    batch_size_source: str      # "auto" | "given"
    num_iterations: int
    horizon_source: str         # "num_iterations" | "target_flops" | "ratio"
    total_tokens: int
    # learning rates (final, after batch and width scaling)
    batch_lr_scale: float
    dmodel_lr_scale: float
    lm_head_lr: float
    wte_lr: float
    value_embeds_lr: float
    resid_lr: float
    x0_lr: float
    smear_lr: float
    matrix_lr: float
    weight_decay: float         # Muon, at step 0 (cosine-decayed by muon_weight_decay)
    # schedules
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    momentum_warmup_steps: int = 400
    momentum_start: float = 0.85
    momentum_peak: float = 0.97
    momentum_end: float = 0.90

    def model_config(self) -> GPTConfig:
        return GPTConfig(sequence_len=self.max_seq_len, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd,
                         window_pattern=self.window_pattern)

    def optimizer_lrs(self) -> dict:
        return dict(lm_head_lr=self.lm_head_lr, wte_lr=self.wte_lr, value_embeds_lr=self.value_embeds_lr,
                    resid_lr=self.resid_lr, x0_lr=self.x0_lr, smear_lr=self.smear_lr,
                    matrix_lr=self.matrix_lr, weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def warmdown_steps(self) -> int:
        return round(self.warmdown_ratio * self.num_iterations)

    def grad_accum_steps(self, device_batch_size: int, world_size: int = 1) -> int:
        per_step = device_batch_size * self.max_seq_len * world_size
        if self.total_batch_size % per_step:
            raise ValueError(f"total batch {self.total_batch_size:,} tokens is not a multiple of device_batch_size "
                             f"{device_batch_size} x seq {self.max_seq_len} x {world_size} ranks = {per_step:,}: "
                             "change --device-batch-size or --total-batch-size")
        return self.total_batch_size // per_step

    # pure schedules ------------------------------------------------------------------------------
    def lr_multiplier(self, step: int) -> float:
        warmdown = self.warmdown_steps
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step <= self.num_iterations - warmdown:
            return 1.0
        progress = (self.num_iterations - step) / warmdown
        return progress + (1 - progress) * self.final_lr_frac

    def muon_momentum(self, step: int) -> float:
        warmdown_start = self.num_iterations - self.warmdown_steps
        if step < self.momentum_warmup_steps:
            frac = step / self.momentum_warmup_steps
            return (1 - frac) * self.momentum_start + frac * self.momentum_peak
        if step >= warmdown_start:
            progress = (step - warmdown_start) / max(self.warmdown_steps, 1)
            return self.momentum_peak * (1 - progress) + self.momentum_end * progress
        return self.momentum_peak

    def muon_weight_decay(self, step: int) -> float:
        return self.weight_decay * 0.5 * (1 + math.cos(math.pi * step / self.num_iterations))

    def table(self) -> str:
        rows = [
            ("depth / model_dim / heads (kv)", f"d{self.depth} / {self.n_embd} / {self.n_head} ({self.n_kv_head})"),
            ("seq len / vocab / windows", f"{self.max_seq_len:,} / {self.vocab_size:,} / {self.window_pattern}"),
            ("params total / scaling", f"{self.num_params:,} / {self.num_scaling_params:,}"),
            ("FLOPs per token", f"{self.flops_per_token:.4e}"),
            ("tokens: target (ratio) / D_REF", f"{self.target_tokens:,} ({self.target_param_data_ratio:g}) / {self.ref_tokens:,}"),
            ("batch (tokens)", f"{self.total_batch_size:,} ({self.batch_size_source})"),
            ("iterations", f"{self.num_iterations:,} (from {self.horizon_source})"),
            ("total tokens / ratio", f"{self.total_tokens:,} / {self.total_tokens / self.num_scaling_params:.2f}"),
            ("total FLOPs", f"{self.flops_per_token * self.total_tokens:.4e}"),
            ("lr scale: batch / width", f"{self.batch_lr_scale:.4f} / {self.dmodel_lr_scale:.4f}"),
            ("lr: lm_head / wte / value_embeds", f"{self.lm_head_lr:.6g} / {self.wte_lr:.6g} / {self.value_embeds_lr:.6g}"),
            ("lr: resid / x0 / smear", f"{self.resid_lr:.6g} / {self.x0_lr:.6g} / {self.smear_lr:.6g}"),
            ("lr: matrix (Muon)", f"{self.matrix_lr:.6g}"),
            ("Muon weight decay", f"{self.weight_decay:.6f} (cosine to 0)"),
            ("schedule", f"warmup {self.warmup_steps}, warmdown {self.warmdown_steps} steps to {self.final_lr_frac:g}x"),
            ("Muon momentum", f"{self.momentum_start} -> {self.momentum_peak} ({self.momentum_warmup_steps} steps) -> {self.momentum_end}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}} : {v}" for k, v in rows)


def _scaling_params(config: GPTConfig) -> int:
    c = count_params(config)
    return c["transformer_matrices"] + c["lm_head"]


def derive(depth: int, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
           vocab_size: int = 32768, target_param_data_ratio: float = 12.0, target_flops: float | None = None,
           num_iterations: int | None = None, total_batch_size: int | None = None, n_kv_head: int | None = None,
           window_pattern: str = "SSSL", embedding_lr: float = 0.3, unembedding_lr: float = 0.008,
           matrix_lr: float = 0.02, scalar_lr: float = 0.5, weight_decay: float = 0.28, warmup_steps: int = 40,
           warmdown_ratio: float = 0.65, final_lr_frac: float = 0.05) -> TrainingPlan:
    """Every derived hyperparameter for a depth. None (or <= 0) disables target_flops,
    num_iterations and total_batch_size (auto)."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"depth, aspect_ratio and head_dim must be >= 1 (got {depth}, {aspect_ratio}, {head_dim})")
    if not target_param_data_ratio or target_param_data_ratio <= 0:
        raise ValueError("target_param_data_ratio must be > 0: it sets the batch size and weight decay "
                         "even when --num-iterations or --target-flops chooses the horizon")
    if not 0 <= warmdown_ratio <= 1 or not 0 <= final_lr_frac <= 1 or warmup_steps < 0:
        raise ValueError("warmdown_ratio and final_lr_frac must be in [0, 1], warmup_steps >= 0")
    target_flops = target_flops if target_flops and target_flops > 0 else None
    num_iterations = num_iterations if num_iterations and num_iterations > 0 else None
    total_batch_size = total_batch_size if total_batch_size and total_batch_size > 0 else None

    model_dim, n_head = model_dims(depth, aspect_ratio, head_dim)
    kv = n_head if n_kv_head is None else n_kv_head
    config = GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=kv, n_embd=model_dim, window_pattern=window_pattern)
    ref_dim, ref_heads = model_dims(REF_DEPTH, aspect_ratio, head_dim)
    ref_config = GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=REF_DEPTH, n_head=ref_heads,
                           n_kv_head=ref_heads, n_embd=ref_dim, window_pattern=window_pattern)

    counts = count_params(config)
    scaling = counts["transformer_matrices"] + counts["lm_head"]
    flops = estimate_flops(config)
    target_tokens = int(target_param_data_ratio * scaling)
    ref_tokens = target_param_data_ratio * _scaling_params(ref_config)

    if total_batch_size is None:
        predicted = B_REF * (target_tokens / ref_tokens) ** BATCH_EXPONENT
        batch, batch_source = 2 ** round(math.log2(predicted)), "auto"
    else:
        batch, batch_source = int(total_batch_size), "given"

    if num_iterations is not None:
        iters, horizon = int(num_iterations), "num_iterations"
    elif target_flops is not None:
        iters, horizon = round(target_flops / (flops * batch)), "target_flops"
    else:
        iters, horizon = target_tokens // batch, "ratio"
    if iters < 1:
        raise ValueError(f"the horizon gives {iters} iterations at batch {batch:,}: raise the ratio/flops/iterations "
                         "or lower --total-batch-size")

    batch_lr_scale = (batch / B_REF) ** 0.5
    wd = weight_decay * batch_lr_scale * (ref_tokens / target_tokens)
    lrs = reference_lrs(model_dim, batch_lr_scale, embedding_lr, unembedding_lr, matrix_lr, scalar_lr, wd)
    return TrainingPlan(
        depth=depth, aspect_ratio=aspect_ratio, head_dim=head_dim, max_seq_len=max_seq_len, vocab_size=vocab_size,
        window_pattern=config.window_pattern, target_param_data_ratio=float(target_param_data_ratio),
        target_flops=target_flops, n_layer=depth, n_embd=model_dim, n_head=n_head, n_kv_head=kv,
        num_params=counts["total"], num_scaling_params=scaling, flops_per_token=flops,
        ref_tokens=int(ref_tokens), target_tokens=target_tokens, total_batch_size=batch,
        batch_size_source=batch_source, num_iterations=iters, horizon_source=horizon, total_tokens=iters * batch,
        batch_lr_scale=batch_lr_scale, dmodel_lr_scale=(model_dim / REF_MODEL_DIM) ** -0.5,
        warmup_steps=warmup_steps, warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac, **lrs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Print the derived training plan for one or more depths")
    ap.add_argument("--depth", type=int, nargs="+", default=[12, 20, 24, 26])
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--window-pattern", default="SSSL")
    ap.add_argument("--target-param-data-ratio", type=float, default=12.0)
    ap.add_argument("--target-flops", type=float, default=None)
    ap.add_argument("--num-iterations", type=int, default=None)
    ap.add_argument("--total-batch-size", type=int, default=None)
    a = ap.parse_args(argv)
    for depth in a.depth:
        plan = derive(depth, a.aspect_ratio, a.head_dim, a.max_seq_len, a.vocab_size, a.target_param_data_ratio,
                      a.target_flops, a.num_iterations, a.total_batch_size, window_pattern=a.window_pattern)
        print(plan.table(), end="\n\n")


if __name__ == "__main__":
    main()
