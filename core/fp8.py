"""FP8 training matmuls for H100+ (torch._scaled_mm), dynamic tensorwise or rowwise scaling.

    from core.fp8 import convert_to_fp8, disable_fp8
    n = convert_to_fp8(model, "tensorwise")      # raises on hardware without FP8 tensor cores
    with disable_fp8(model):                     # evaluate in bf16
        ...

A Linear does three GEMMs: y = x W^T, dx = dy W, dW = dy^T x. Each runs in FP8 with scales computed
from the current amax (no history): operands are scaled into range, saturated, cast, multiplied by
torch._scaled_mm, and the inverse scales undo it in the epilogue (the recipe of "FP8 Formats for Deep
Learning", arXiv:2209.05433). x and W use float8_e4m3fn (precision); gradients use float8_e5m2
(range) in the tensorwise recipe. The rowwise recipe (one scale per row of each operand, better
accuracy, slower) uses e4m3 everywhere, which the rowwise kernels require, and keeps the bf16
operands for the backward because its scales run along the other axis there.

Eligible layers (as the reference): nn.Linear with both dims divisible by 16 and min(in, out) >= 128,
i.e. not the tiny value-embedding/smear gates. Difference from the reference: our training loss
uses lm_head's weight inside the fused chunked cross-entropy, so lm_head is not converted (it stays
bf16 in training and, for the same numerics, in inference).

Never runs in CI (no GPU); the math is tested on CPU, where torch._scaled_mm also exists.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

RECIPES = ("tensorwise", "rowwise")
EPS = 1e-12


def fp8_available(device: torch.device | str | None = None) -> bool:
    """FP8 GEMMs need CUDA compute capability >= 8.9 (Ada/Hopper) and torch._scaled_mm."""
    if not (hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn") and torch.cuda.is_available()):
        return False
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@torch.no_grad()
def quantize(x: torch.Tensor, fp8_dtype: torch.dtype, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in fp8, inverse scale): one scale for the tensor (dim=None) or one per slice along `dim`
    (amax over `dim`, kept as a size-1 axis). The scale is computed in float64 so that eager and
    compiled code agree, and the cast saturates (a plain .to(fp8) would overflow to nan/inf)."""
    fmax = torch.finfo(fp8_dtype).max
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (fmax / amax.double().clamp(min=EPS)).float()
    x_fp8 = (x.float() * scale).clamp(-fmax, fmax).to(fp8_dtype)
    return x_fp8, scale.reciprocal()


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """Same values, column-major strides: _scaled_mm's second operand must be column-major."""
    return x.t().contiguous().t()


def _as_col(scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales as an (M, 1) tensor with unit strides (a transposed (1, M) view is rejected)."""
    return scale.reshape(-1).unsqueeze(1)


def _as_row(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1).unsqueeze(0)


def _mm(a, b, scale_a, scale_b, out_dtype, fast_accum: bool):
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


@torch._dynamo.allow_in_graph
class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T for 2-D x (M, K) and w (N, K), all three GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x, w, recipe: str):
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        ctx.recipe, ctx.out_dtype, ctx.w_dtype = recipe, out_dtype, w.dtype
        if recipe == "tensorwise":
            xq, xs = quantize(x, torch.float8_e4m3fn)
            wq, ws = quantize(w, torch.float8_e4m3fn)
            ctx.save_for_backward(xq, xs, wq, ws)
            # wq is (N, K) row-major, so wq.t() is (K, N) column-major: no copy needed
            return _mm(xq, wq.t(), xs, ws, out_dtype, fast_accum=True)
        xq, xs = quantize(x, torch.float8_e4m3fn, dim=1)     # (M, 1): one scale per row of x
        wq, ws = quantize(w, torch.float8_e4m3fn, dim=1)     # (N, 1): one per output column
        ctx.save_for_backward(x, w)
        return _mm(xq, wq.t(), xs, _as_row(ws), out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.recipe == "tensorwise":
            xq, xs, wq, ws = ctx.saved_tensors
            gq, gs = quantize(grad_out, torch.float8_e5m2)
            grad_x = _mm(gq, _col_major(wq), gs, ws, ctx.out_dtype, fast_accum=False)           # (M,N)@(N,K)
            grad_w = _mm(gq.t().contiguous(), _col_major(xq), gs, xs, ctx.out_dtype, fast_accum=False)  # (N,M)@(M,K)
        else:
            x, w = ctx.saved_tensors
            g_rows, g_rs = quantize(grad_out, torch.float8_e4m3fn, dim=1)   # (M, 1) scales
            w_cols, w_cs = quantize(w, torch.float8_e4m3fn, dim=0)          # (1, K) scales
            grad_x = _mm(g_rows, _col_major(w_cols), g_rs, w_cs, ctx.out_dtype, fast_accum=False)
            g_cols, g_cs = quantize(grad_out, torch.float8_e4m3fn, dim=0)   # (1, N) -> rows of g^T
            x_cols, x_cs = quantize(x, torch.float8_e4m3fn, dim=0)          # (1, K)
            grad_w = _mm(g_cols.t().contiguous(), _col_major(x_cols), _as_col(g_cs), x_cs, ctx.out_dtype,
                         fast_accum=False)
        return grad_x, grad_w.to(ctx.w_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str = "tensorwise") -> torch.Tensor:
    """F.linear(x, weight) with FP8 GEMMs; x (..., K) in bf16/fp16 (fp32 is cast to bf16)."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: use one of {RECIPES}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        x = x.to(torch.bfloat16)
    shape = x.shape
    out = _Float8Matmul.apply(x.reshape(-1, shape[-1]), weight, recipe)
    return out.reshape(*shape[:-1], out.shape[-1])


def eligible(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= 128)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", check_hardware: bool = True) -> int:
    """Route every eligible core.gpt.Linear through FP8; returns how many were converted. Call before
    torch.compile. check_hardware=False is for tests of the math on CPU."""
    from core.gpt import Linear
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: use one of {RECIPES}")
    if check_hardware:
        device = next(model.parameters()).device
        if not fp8_available(device):
            # a ValueError: the trainers report it as one line (the recipe asks for what the box lacks)
            raise ValueError(f"FP8 training needs a CUDA GPU with compute capability >= 8.9 (H100/Ada) and "
                             f"torch._scaled_mm; the model is on {device}. Drop --fp8 (it is part of the recipe, "
                             f"so it makes a different artifact).")
    n = 0
    head = getattr(model, "lm_head", None)  # stays bf16: the fused training loss uses its weight directly
    for module in model.modules():
        if isinstance(module, Linear) and eligible(module) and module is not head:
            module.fp8 = recipe
            n += 1
    return n


@contextlib.contextmanager
def disable_fp8(model: nn.Module):
    """Temporarily run every FP8 Linear in its normal precision (for evaluation)."""
    from core.gpt import Linear
    saved = [(m, m.fp8) for m in model.modules() if isinstance(m, Linear) and m.fp8 is not None]
    for m, _ in saved:
        m.fp8 = None
    try:
        yield
    finally:
        for m, recipe in saved:
            m.fp8 = recipe
