"""Attention on the GPU: whichever backend core picked (flash-attn 3/2 or SDPA) against a naive fp32
reference, and flash-attn against SDPA directly, outputs and gradients, with sliding windows and GQA."""
from __future__ import annotations

import pytest
import torch

import core.attention as attention

pytestmark = pytest.mark.gpu

B, T, H, D = 2, 256, 4, 128
WINDOWS = [None, 32, 100]        # full causal; windows much shorter than T (flash-attn's (w, 0) convention)


def naive_attention(q, k, v, window):
    """fp32 softmax(q k^T / sqrt(d)) v with the causal window mask written out: key j is seen by query
    i when i - window <= j <= i."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    i = torch.arange(q.size(2), device=q.device)[:, None]
    j = torch.arange(k.size(2), device=q.device)[None, :]
    seen = (j <= i) & ((i - j <= window) if window is not None else True)
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    return (scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def inputs(device, n_kv: int):
    g = torch.Generator(device=device).manual_seed(n_kv)
    make = lambda h: torch.randn(B, T, h, D, device=device, generator=g, dtype=torch.bfloat16)  # noqa: E731
    return make(H), make(n_kv), make(n_kv), make(H)


def fwd_bwd(fn, q, k, v, dy, window):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v, window)
    y.backward(dy.to(y.dtype))
    return y.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("n_kv", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"window{w}")
def test_backend_matches_naive_reference(device, window, n_kv):
    q, k, v, dy = inputs(device, n_kv)
    got = fwd_bwd(attention.attention, q, k, v, dy, window)
    want = fwd_bwd(naive_attention, q.float(), k.float(), v.float(), dy, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 2e-2, (attention.BACKEND, name, rel_err(a, b))


@pytest.mark.parametrize("n_kv", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"window{w}")
def test_flash_matches_sdpa(device, monkeypatch, window, n_kv):
    if attention._flash is None or device.type != "cuda":
        pytest.skip(f"no flash-attn importable here (backend {attention.BACKEND}): SDPA is the only backend")
    q, k, v, dy = inputs(device, n_kv)
    flash = fwd_bwd(attention.attention, q, k, v, dy, window)
    monkeypatch.setattr(attention, "_flash", None)
    sdpa = fwd_bwd(attention.attention, q, k, v, dy, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), flash, sdpa):
        assert rel_err(a, b) < 2e-2, (attention.BACKEND, name, rel_err(a, b))
