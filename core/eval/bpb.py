"""Validation bits-per-byte: the tokenizer-independent loss used by pretraining and SFT.

    from core.eval.bpb import evaluate_bpb
    bpb = evaluate_bpb(model, val_batches, tokenizer.token_bytes().to(device), steps=20)

bpb = total nats over the validation targets / (ln 2 * total UTF-8 bytes of those target tokens).
Dividing by bytes instead of tokens makes runs with different vocabularies comparable (a larger
vocab has fewer, harder tokens per byte). Special tokens (0 bytes in the table) and ignored
targets (-1) count neither nats nor bytes, as in the reference. Under torch.distributed both sums
are all-reduced, so every rank returns the same number.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

IGNORE_INDEX = -1


def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor, *,
                 steps: int | None = None) -> float:
    """Bits per byte of `model` on (inputs, targets) batches (the first `steps` of them if given).

    model(x, targets=y, loss_reduction="none") must return the per-token loss (B, T) in nats.
    token_bytes: int (vocab_size,) UTF-8 byte length per token id, 0 for special tokens, on the
    device of the batches.
    """
    return evaluate_loss_bpb(model, batches, token_bytes, steps=steps)[1]


@torch.no_grad()
def evaluate_loss_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor, *,
                      steps: int | None = None) -> tuple[float, float]:
    """(mean loss in nats over every non-ignored target, bits per byte) in one pass (SFT reports both;
    the loss also counts special targets such as <|assistant_end|>, bpb does not)."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 or None, got {steps}")
    device = token_bytes.device
    # fp64 sums: millions of per-token losses lose digits in fp32 (MPS has no fp64)
    sums = torch.zeros(2, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # targets, bytes
    table = token_bytes.to(torch.int64)
    for n, (x, y) in enumerate(batches, 1):
        loss = model(x, targets=y, loss_reduction="none").reshape(-1).to(device=device, dtype=sums.dtype)
        y = y.reshape(-1).to(device)
        valid = y != IGNORE_INDEX
        nb = torch.where(valid, table[torch.where(valid, y, 0)], 0)
        sums += torch.stack([torch.where(valid, loss, 0).sum(), torch.where(nb > 0, loss, 0).sum()])
        counts += torch.stack([valid.sum(), nb.sum()])
        if steps is not None and n >= steps:  # stop without pulling one more batch from the loader
            break
    # every rank joins the reduce, even one that got no batches (else the others would hang)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    (nats, byte_nats), (targets, total_bytes) = sums.tolist(), counts.tolist()
    if total_bytes == 0:
        raise ValueError("evaluate_bpb: no target bytes to score (no batches, or only special / ignored "
                         "targets): check the validation loader and token_bytes")
    return nats / targets, byte_nats / (math.log(2) * total_bytes)
