"""Causal attention with GQA and sliding windows: one function, three backends, picked once.

    from core.attention import attention, attention_kvcache, BACKEND
    y = attention(q, k, v, window=512)                  # q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D)
    y = attention_kvcache(q, k_cache, v_cache, k, v, pos, window)   # inference, cache filled in place

Backends, chosen once at import (override with NANORUN_ATTENTION=fa3|fa2|sdpa):
- fa3: flash-attn 3 (`flash_attn_interface`), Hopper (SM 9.x) only, bf16/fp16.
- fa2: flash-attn 2 (`flash_attn`), CUDA SM >= 8.0, bf16/fp16.
- sdpa: torch.nn.functional.scaled_dot_product_attention everywhere else (CPU, MPS, older GPUs).
Flash kernels cannot take fp32, so a call with fp32 tensors uses SDPA whatever the backend.

Window semantics are flash-attn's `window_size=(window, 0)`: query i attends keys j with
i - window <= j <= i (window + 1 keys). `window=None` (or < 0) is full causal attention.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F


def _load_flash(kind: str):
    if not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability()
    try:
        if kind == "fa3":
            if major != 9:  # FA3 kernels are built for Hopper only
                return None
            import flash_attn_interface  # type: ignore
            return flash_attn_interface
        if kind == "fa2":
            if major < 8:
                return None
            import flash_attn  # type: ignore
            return flash_attn
    except Exception:  # not installed or built for another CUDA: fall back quietly
        return None
    return None


def _pick_backend() -> tuple[str, object]:
    wanted = os.environ.get("NANORUN_ATTENTION", "").strip().lower()
    if wanted not in ("", "fa3", "fa2", "sdpa"):
        raise ValueError(f"NANORUN_ATTENTION={wanted!r}: use fa3, fa2 or sdpa")
    if wanted == "sdpa":
        return "sdpa", None
    for kind in ("fa3", "fa2") if not wanted else (wanted,):
        module = _load_flash(kind)
        if module is not None:
            return kind, module
        if wanted:
            raise RuntimeError(f"NANORUN_ATTENTION={wanted} but it is not importable on this machine "
                               "(needs the `gpu` extra and a matching GPU); unset it to fall back")
    return "sdpa", None


def describe_backend() -> str:
    return {"fa3": "flash-attn 3 (Hopper)", "fa2": "flash-attn 2",
            "sdpa": "PyTorch SDPA (explicit mask for sliding windows)"}[BACKEND]


BACKEND, _flash = _pick_backend()
logging.getLogger("nanorun.attention").info("attention backend: %s", describe_backend())


def _use_flash(q: torch.Tensor) -> bool:
    return _flash is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _window(window: int | None, t: int) -> int:
    """Normalise: -1 means 'no window' (full causal) when the window covers everything."""
    if window is None or window < 0 or window >= t:
        return -1
    return int(window)


_mask_cache: dict = {}  # eager calls only: see causal_window_mask


def _build_mask(tq: int, tk: int, window: int, device) -> torch.Tensor:
    row = (tk - tq) + torch.arange(tq, device=device).unsqueeze(1)
    col = torch.arange(tk, device=device).unsqueeze(0)
    mask = col <= row
    if window >= 0:
        mask = mask & (row - col <= window)
    return mask


def causal_window_mask(tq: int, tk: int, window: int, device) -> torch.Tensor:
    """Boolean (tq, tk) mask, True = attend. Queries are the last tq of tk positions.

    Eager calls reuse one mask per shape. A compiled graph builds it in the graph instead (two
    aranges and a compare, fused by inductor): reading a module-level dict that the graph also
    fills makes dynamo guard on the dict's contents, so the second step, which finds the key the
    first one added, would recompile the whole model (docs/compile.md)."""
    if torch.compiler.is_compiling():
        return _build_mask(tq, tk, window, device)
    key = (tq, tk, window, str(device))
    mask = _mask_cache.get(key)
    if mask is None:
        mask = _build_mask(tq, tk, window, device)
        if len(_mask_cache) > 64:
            _mask_cache.clear()
        _mask_cache[key] = mask
    return mask


def _sdpa(q, k, v, window: int):
    """q (B,H,Tq,D), k/v (B,Hkv,Tk,D); queries are the last Tq positions of the Tk keys."""
    tq, tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if window < 0 and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if tq == 1:  # decode: attend to the last window+1 keys, no mask needed
        if 0 <= window < tk - 1:
            k, v = k[:, :, tk - window - 1:], v[:, :, tk - window - 1:]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = causal_window_mask(tq, tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal self-attention for training: q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D)."""
    w = _window(window, q.size(1))
    if _use_flash(q):
        y = _flash.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))
        return y[0] if isinstance(y, tuple) else y  # some FA3 builds return (out, softmax_lse)
    y = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), w)
    return y.transpose(1, 2)


def attention_kvcache(q, k_cache, v_cache, k, v, pos: int, window: int | None = None,
                      cache_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Inference attention: write k/v (B,Tn,Hkv,D) at [pos, pos+Tn) of the caches (B,Tmax,Hkv,D),
    then attend q (B,Tn,H,D) causally to everything cached so far."""
    tn = q.size(1)
    end = pos + tn
    if _use_flash(q):
        if cache_seqlens is None:
            cache_seqlens = torch.full((q.size(0),), pos, dtype=torch.int32, device=q.device)
        w = _window(window, end)
        y = _flash.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                           causal=True, window_size=(w, 0))
        return y[0] if isinstance(y, tuple) else y
    k_cache[:, pos:end] = k
    v_cache[:, pos:end] = v
    start = 0
    w = _window(window, end)
    if w >= 0:  # keys older than every query's window are never attended: do not read them
        start = max(0, pos - w)
    kk = k_cache[:, start:end].transpose(1, 2)
    vv = v_cache[:, start:end].transpose(1, 2)
    y = _sdpa(q.transpose(1, 2), kk, vv, w if w >= 0 and w < end - start else -1)
    return y.transpose(1, 2)
