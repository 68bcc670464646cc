"""Attention backends on CPU (SDPA): causality, sliding windows, GQA, KV-cache attention."""
from __future__ import annotations

import math

import pytest
import torch

import core.attention as attn
from core.attention import attention, attention_kvcache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


def reference_attention(q, k, v, window: int | None):
    """Plain softmax attention in float64 with an explicit (causal, windowed) mask; (B,T,H,D) layout."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    tq, tk = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    i = torch.arange(tq).unsqueeze(1) + (tk - tq)
    j = torch.arange(tk).unsqueeze(0)
    allowed = j <= i
    if window is not None and window >= 0:
        allowed &= (i - j) <= window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def qkv(B=2, T=37, H=4, Hkv=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g),
            torch.randn(B, T, Hkv, D, generator=g))


def test_backend_is_sdpa_on_cpu():
    assert attn.BACKEND == "sdpa"
    assert "SDPA" in attn.describe_backend()


@pytest.mark.parametrize("window", [None, 0, 1, 5, 16, 36, 100])
def test_sliding_window_equals_full_mask_reference(window):
    q, k, v = qkv()
    y = attention(q, k, v, window)
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, window), atol=2e-6, rtol=1e-5)


def test_window_zero_attends_only_to_itself():
    q, k, v = qkv(Hkv=4)
    torch.testing.assert_close(attention(q, k, v, 0), v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 7])
def test_gqa_equals_repeated_kv(window):
    q, k, v = qkv(H=6, Hkv=2)
    y_gqa = attention(q, k, v, window)
    y_rep = attention(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), window)
    torch.testing.assert_close(y_gqa, y_rep, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y_gqa.double(), reference_attention(q, k, v, window), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_causality(window):
    """Changing the future never changes the past."""
    q, k, v = qkv(T=20)
    y = attention(q, k, v, window)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 12:] = torch.randn_like(t[:, 12:])
    y2 = attention(q2, k2, v2, window)
    torch.testing.assert_close(y[:, :12], y2[:, :12], atol=0, rtol=0)
    assert not torch.allclose(y[:, 12:], y2[:, 12:])


@pytest.mark.parametrize("window", [None, 3, 9])
def test_kvcache_attention_prefill_chunks_and_decode(window):
    """Prefill, a multi-token chunk, then one token at a time == one full causal pass (with GQA)."""
    B, T, H, Hkv, D = 2, 30, 4, 2, 8
    q, k, v = qkv(B, T, H, Hkv, D, seed=3)
    full = attention(q, k, v, window)
    kc, vc = torch.zeros(B, 40, Hkv, D), torch.zeros(B, 40, Hkv, D)
    outs, pos = [], 0
    for n in (11, 6) + (1,) * (T - 17):
        outs.append(attention_kvcache(q[:, pos:pos + n], kc, vc, k[:, pos:pos + n], v[:, pos:pos + n], pos, window))
        pos += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kc[:, :T], k)
    assert kc[:, T:].abs().sum() == 0


def test_mask_cache_is_bounded():
    attn._mask_cache.clear()
    for t in range(2, 80):
        attn.causal_window_mask(t, t, 1, "cpu")
    assert len(attn._mask_cache) <= 65


def test_forced_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANORUN_ATTENTION", "fa3")
    with pytest.raises(RuntimeError, match="not importable"):
        attn._pick_backend()
    monkeypatch.setenv("NANORUN_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="fa3, fa2 or sdpa"):
        attn._pick_backend()
