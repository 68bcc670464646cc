"""The GPU kit's plan, computed on CPU before any GPU time is spent: the shapes of the kit's d12/d20
training configs checked on the meta device (no memory, no FLOPs), and the time budget of its sections.

    python -m bench.gpu_plan          # the shape check and the GPU budget plan (~40 s on 2 busy CPU cores)
    (bench/gpu_check.py prints the same at the start of every run, --cpu-dry-run included)

Per depth: parameter count; FP8 eligibility (every block's six matrices must convert: both dims a
multiple of 16, core.fp8.eligible); memory against an 80 GB H100: fp32 weights + grads, optimizer
state (AdamW 2 buffers, Muon 1), and the activations autograd saves in one eager forward, counted
with saved_tensors_hooks on meta tensors, attention counted as flash / memory-efficient SDPA keeps it
(q, k, v, out, fp32 log-sum-exp; the math path's T x T matrices never exist on the GPU). Compiled
code saves less (inductor recomputes pointwise ops), so this is an upper bound. Also measured: how
long dynamo + AOT autograd take to trace the real d12 step (aot_eager on meta tensors), the part of a
GPU compile that does not depend on the GPU; inductor's code generation comes on top.

The budget: each section's estimate in seconds from the parameter counts (FLOPs per token at an
assumed MFU for step times) and the compile/launch costs below. (a) tests, (b) the pretrain stage path
with SIGTERM + resume and (c) SFT + RL are never skipped; (d) throughput and (e) inference run only
while their estimate fits in what is left of the budget, else they say "skipped: budget" with it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from unittest import mock

import torch

GPU_MEMORY_BYTES = 80e9       # H100 SXM/PCIe (an H200 has 141 GB: the check is for the smaller card)
ASSUMED_MFU = 0.35            # for step-time estimates (the reference reaches 0.41-0.50 with FA3)
COMPILE_S_D12 = 55.0          # one cold inductor compile of a d12 training step (observed 40-70 s), per 12 layers
WARM_COMPILE_FRACTION = 0.3   # a later process with the same graph hits inductor's on-disk cache
LAUNCH_S = 15.0               # torchrun + import torch + CUDA context + checkpoint I/O per launch
PYTEST_S = 150.0              # pytest -m gpu tests/gpu on small models (2 FP8 compiles included)
INFER_S = 30.0                # d12 prompt 512, 64 decode tokens at batch 1/8/32, eager


class _SavedLikeFlash(torch.autograd.Function):
    """Stands in for SDPA in the meta forward: saves what flash / memory-efficient attention keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_like_sdpa(q, k, v, window):
    return _SavedLikeFlash.apply(q, k, v)


def _plan_model(depth: int, head_dim: int, seq: int, vocab: int, rows: int):
    from core.gpt import build_model
    from core.scaling import derive
    from core.train.config import PretrainConfig

    plan = derive(PretrainConfig(depth=depth, head_dim=head_dim, max_seq_len=seq, num_iterations=1000,
                                 total_batch_size=rows * seq), vocab)
    return plan, build_model(plan.model_config(), "meta", torch.bfloat16)


def shape_check(depth: int, head_dim: int, seq: int, vocab: int, rows: int) -> dict:
    """Parameters, FP8 eligibility and memory of one training config, on the meta device."""
    import core.attention as attention
    from core.fp8 import convert_to_fp8, eligible
    from core.gpt import Linear
    from core.optim import build_optimizer

    plan, model = _plan_model(depth, head_dim, seq, vocab, rows)
    n_fp8 = convert_to_fp8(model, "tensorwise", check_hardware=False)
    not_fp8 = sorted({f"{m.in_features}x{m.out_features}" for m in model.modules()
                      if isinstance(m, Linear) and not eligible(m)})
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = build_optimizer(model, plan).param_groups          # meta: no state is allocated yet
    buffers = {"adamw": 2, "muon": 1}                              # AdamW: both moments; Muon: momentum
    state = sum(4 * buffers[g["kind"]] * sum(p.numel() for p in g["params"]) for g in groups)   # fp32 buffers
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()   # a storage saved twice counts once
        return t

    idx = torch.zeros(rows, seq, dtype=torch.long, device="meta")
    with mock.patch.object(attention, "_sdpa", _flash_like_sdpa), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    activations = sum(saved.values())
    total = 2 * weights + state + activations                     # weights + grads (same dtype) + state + saved
    return {"depth": depth, "params": model.num_params(), "flops_per_token": plan.flops_per_token,
            "rows": rows, "seq": seq, "fp8_layers": n_fp8, "fp8_ok": n_fp8 == 6 * depth, "fp8_skipped_shapes": not_fp8,
            "weights_grads_gb": round(2 * weights / 1e9, 2), "optimizer_gb": round(state / 1e9, 2),
            "activations_gb": round(activations / 1e9, 2), "total_gb": round(total / 1e9, 2),
            "fits_80gb": total < GPU_MEMORY_BYTES}


def trace_s(depth: int, head_dim: int, seq: int, vocab: int, rows: int) -> float:
    """Seconds for dynamo + AOT autograd to trace one training step (forward + backward) at these
    shapes: torch.compile(backend="aot_eager") on meta tensors, so nothing is computed."""
    import torch._dynamo

    _, model = _plan_model(depth, head_dim, seq, vocab, rows)
    compiled = torch.compile(model, dynamic=False, backend="aot_eager")
    idx = torch.zeros(rows, seq, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    with warnings.catch_warnings():   # meta tensors: "nll_loss has no autograd kernel" (nothing is computed)
        warnings.simplefilter("ignore", UserWarning)
        compiled(idx, idx).backward()
    seconds = time.perf_counter() - t0
    torch._dynamo.reset()
    return round(seconds, 1)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    estimate_s: float
    never_skip: bool


def step_s(flops_per_token: float, tokens: int, peak: float) -> float:
    return flops_per_token * tokens / (peak * ASSUMED_MFU)


def compile_s(depth: int, trace: dict[int, float]) -> float:
    """A cold compile: COMPILE_S_D12 per 12 layers, or more if tracing alone (measured) took longer."""
    per_layer = max([COMPILE_S_D12 / 12] + [seconds / d for d, seconds in trace.items()])
    return per_layer * depth


def budget_plan(sizes, stage, shapes: dict[int, dict], stage_flops: float, fp8: bool, peak: float,
                trace: dict[int, float]) -> list[Section]:
    """The GPU run's sections in order with estimates. sizes: bench.gpu_check.Sizes; stage:
    bench.gpu_stage.StageSizes; shapes: depth -> shape_check(); stage_flops: FLOPs per token of the
    stage path's model (its tokenizer is byte-level, so its vocab is tiny); trace: depth -> measured
    trace seconds (trace_s), which raise the compile estimate when they exceed it."""
    z = stage
    stage_step = step_s(stage_flops, z.device_batch * z.seq, peak)
    cold = compile_s(z.depth, trace)
    warm = cold * WARM_COMPILE_FRACTION
    saved = (z.term_after // z.save_every + 1) * z.save_every       # a generous stop step for the estimate
    pretrain = 3 * LAUNCH_S + cold + 2 * warm + (z.steps + z.term_after + 1 + z.steps - saved) * stage_step
    sft_rl = 2 * LAUNCH_S + cold + 2 * 2 * z.rl_new_tokens * 0.02 + 10   # RL: 2 x 2 replies, ~20 ms a decode step
    plan = [Section("tests", "(a) pytest -m gpu tests/gpu", min(PYTEST_S, sizes.pytest_timeout_s), True),
            Section("stage", f"(b) pretrain d{z.depth} under torchrun: {z.steps} steps, SIGTERM after "
                             f"{z.term_after}, exact resume", pretrain, True),
            Section("sft_rl", "(c) one SFT step + one RL step from it", sft_rl, True)]
    recipes = ["bf16"] + (["fp8-tensorwise", "fp8-rowwise"] if fp8 else [])
    for recipe in recipes:
        for depth in sizes.depths:
            s = shapes[depth]
            steps = sizes.warmup_steps + sizes.timed_steps
            est = compile_s(depth, trace) + steps * step_s(s["flops_per_token"], s["rows"] * s["seq"], peak) + 5
            plan.append(Section(f"train:{depth}:{recipe}", f"(d) throughput d{depth} {recipe}, compiled", est, False))
    plan.append(Section("infer", "(e) inference d12, batches 1/8/32", INFER_S, False))
    return plan


def plan_lines(plan: list[Section], budget: float, shapes: dict[int, dict], trace: dict[int, float]) -> list[str]:
    lines = [f"GPU budget plan ({budget:.0f} s; step times at {ASSUMED_MFU:.0%} MFU of an H100, cold compile "
             f"{COMPILE_S_D12:.0f} s per 12 layers, {LAUNCH_S:.0f} s per launch):"]
    t = 0.0
    for s in plan:
        t += s.estimate_s
        flag = "never skipped" if s.never_skip else ("fits" if t <= budget else "skipped: budget")
        lines.append(f"  {s.title:<66} ~{s.estimate_s:5.0f} s  (by {t:4.0f} s)  {flag}")
    for d, s in sorted(shapes.items()):
        lines.append(f"  d{d}: {s['params'] / 1e6:.0f}M params | {s['rows']} x {s['seq']} tokens | FP8 "
                     f"{s['fp8_layers']}/{6 * d} block matrices{'' if s['fp8_ok'] else ' (NOT all)'} (kept bf16: "
                     f"{', '.join(s['fp8_skipped_shapes'])}) | memory {s['weights_grads_gb']} weights+grads + "
                     f"{s['optimizer_gb']} optimizer + {s['activations_gb']} activations (eager bound) = "
                     f"{s['total_gb']} GB {'<' if s['fits_80gb'] else '>='} 80 GB")
    for d, seconds in sorted(trace.items()):
        lines.append(f"  d{d} dynamo + AOT trace of a training step, measured on this CPU: {seconds:.1f} s "
                     "(the GPU compile adds inductor's codegen on top)")
    return lines


def main() -> int:
    from bench.gpu_check import GPU, H100_BF16_PEAK
    from bench.gpu_stage import BYTE_VOCAB, GPU_STAGE
    from core.scaling import derive
    from core.train.config import PretrainConfig

    shapes = {d: shape_check(d, GPU.head_dim, GPU.seq, GPU.vocab, GPU.device_batch[d]) for d in GPU.depths}
    trace = {12: trace_s(12, GPU.head_dim, GPU.seq, GPU.vocab, GPU.device_batch[12])}
    flops = derive(PretrainConfig(depth=GPU_STAGE.depth, head_dim=GPU_STAGE.head_dim, max_seq_len=GPU_STAGE.seq),
                   BYTE_VOCAB).flops_per_token
    plan = budget_plan(GPU, GPU_STAGE, shapes, flops, fp8=True, peak=H100_BF16_PEAK, trace=trace)
    print("\n".join(plan_lines(plan, GPU.budget_s, shapes, trace)))
    return 0 if all(s["fp8_ok"] and s["fits_80gb"] for s in shapes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
