"""The depth dial: one pure function from a depth (and a few knobs) to every derived hyperparameter.

    python -m core.scaling --depth 24 --target-param-data-ratio 8      # print the speedrun plan
    python -m core.scaling --depth 12 20 24 26                         # the reference table

    from core.scaling import derive
    from core.train.config import PretrainConfig
    plan = derive(PretrainConfig(depth=20), vocab_size=32768)    # its defaults and checks are PretrainConfig's
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
from core.train.config import PretrainConfig, add_field_flags

B_REF = 2 ** 19
REF_DEPTH = 12
REF_MODEL_DIM = 768
BATCH_EXPONENT = 0.383
# the PretrainConfig fields derive() reads: the recipe; the rest of a PretrainConfig says how it runs
RECIPE_FIELDS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "target_param_data_ratio",
                 "target_flops", "num_iterations", "total_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr",
                 "scalar_lr", "weight_decay", "warmup_steps", "warmdown_ratio", "final_lr_frac")


def model_dims(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """(model_dim, n_head): depth*aspect_ratio rounded up to a multiple of head_dim."""
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    return model_dim, model_dim // head_dim


def reference_lrs(model_dim: int, batch_lr_scale: float = 1.0, embedding_lr: float = PretrainConfig.embedding_lr,
                  unembedding_lr: float = PretrainConfig.unembedding_lr, matrix_lr: float = PretrainConfig.matrix_lr,
                  scalar_lr: float = PretrainConfig.scalar_lr, weight_decay: float = PretrainConfig.weight_decay) -> dict:
    """Final per-group LRs (core.optim.param_groups keywords) for a width and batch scale; the base
    LRs default to the reference's (PretrainConfig's defaults)."""
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
    # schedules (the LR's from the recipe; Muon's momentum is the reference's, not a setting)
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
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


def recipe_of(source) -> PretrainConfig:
    """A PretrainConfig holding source's RECIPE_FIELDS (any object with those attributes, e.g. a pretrain
    stage Config, whose fields are PretrainConfig's), validated by PretrainConfig; the rest defaults."""
    return PretrainConfig(**{name: getattr(source, name) for name in RECIPE_FIELDS})


def derive(cfg: PretrainConfig, vocab_size: int = GPTConfig.vocab_size) -> TrainingPlan:
    """Every derived hyperparameter of a pretraining recipe (the RECIPE_FIELDS of cfg) for a vocab.
    cfg's defaults and validation are PretrainConfig's: they live there once. A target_flops,
    num_iterations or total_batch_size <= 0 is off (total_batch_size: auto)."""
    target_flops = cfg.target_flops if cfg.target_flops > 0 else None
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else None
    total_batch_size = cfg.total_batch_size if cfg.total_batch_size > 0 else None
    ratio = cfg.target_param_data_ratio

    model_dim, n_head = model_dims(cfg.depth, cfg.aspect_ratio, cfg.head_dim)
    config = GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=cfg.depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=model_dim, window_pattern=cfg.window_pattern)
    ref_dim, ref_heads = model_dims(REF_DEPTH, cfg.aspect_ratio, cfg.head_dim)
    ref_config = GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=REF_DEPTH, n_head=ref_heads,
                           n_kv_head=ref_heads, n_embd=ref_dim, window_pattern=cfg.window_pattern)

    counts = count_params(config)
    scaling = counts["transformer_matrices"] + counts["lm_head"]
    flops = estimate_flops(config)
    target_tokens = int(ratio * scaling)
    ref_tokens = ratio * _scaling_params(ref_config)

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
    wd = cfg.weight_decay * batch_lr_scale * (ref_tokens / target_tokens)
    lrs = reference_lrs(model_dim, batch_lr_scale, cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr,
                        cfg.scalar_lr, wd)
    return TrainingPlan(
        depth=cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len,
        vocab_size=vocab_size, window_pattern=config.window_pattern, target_param_data_ratio=float(ratio),
        target_flops=target_flops, n_layer=cfg.depth, n_embd=model_dim, n_head=n_head, n_kv_head=n_head,
        num_params=counts["total"], num_scaling_params=scaling, flops_per_token=flops,
        ref_tokens=int(ref_tokens), target_tokens=target_tokens, total_batch_size=batch,
        batch_size_source=batch_source, num_iterations=iters, horizon_source=horizon, total_tokens=iters * batch,
        batch_lr_scale=batch_lr_scale, dmodel_lr_scale=(model_dim / REF_MODEL_DIM) ** -0.5,
        warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio, final_lr_frac=cfg.final_lr_frac, **lrs)


def main(argv=None) -> None:
    """python -m core.scaling [--depth D ...] [--<recipe field> V ...]: one plan per depth. Every other
    flag is a PretrainConfig field (its default and its checks are that class's)."""
    ap = argparse.ArgumentParser(prog="python -m core.scaling",
                                 description="Print the derived training plan for one or more depths")
    ap.add_argument("--depth", type=int, nargs="+", default=[12, 20, 24, 26])
    ap.add_argument("--vocab-size", type=int, default=GPTConfig.vocab_size)
    add_field_flags(ap, PretrainConfig, RECIPE_FIELDS[1:])  # all but depth
    a = vars(ap.parse_args(argv))
    depths, vocab_size = a.pop("depth"), a.pop("vocab_size")
    for depth in depths:
        try:
            plan = derive(PretrainConfig(depth=depth, **a), vocab_size)
        except ValueError as e:
            ap.error(str(e))
        print(plan.table(), end="\n\n")


if __name__ == "__main__":
    main()
