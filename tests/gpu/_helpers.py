"""Small models and bundles for the GPU kit's tests, built from core alone: no shared data and no
rustbpe (a GPU node has neither), so the tokenizer is byte-level BPE without merges (265 tokens)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from core.gpt import GPTConfig, build_model


def byte_tokenizer():
    """A core.tokenizer.Tokenizer with the 256 byte tokens and the 9 specials, no merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from core.tokenizer import _BYTE_TO_CHAR, SPECIAL_TOKENS, Tokenizer, _configure

    vocab = {_BYTE_TO_CHAR[b]: b for b in range(256)}
    hf = _configure(HFTokenizer(BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False)))
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(hf)


def random_gpt(config: GPTConfig, device="cpu", dtype=torch.float32, seed: int = 0):
    """Every matrix random (the reference init zeroes output projections, which hides attention and
    the cache from a test) and a sharpened lm_head, so greedy choices are far from ties."""
    model = build_model(config, device, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        model.lm_head.weight.mul_(6.0)
        model.smear_lambda.fill_(0.5)
    return model


def small_config(vocab_size: int, n_layer: int = 2, n_embd: int = 128, head_dim: int = 64,
                 sequence_len: int = 512) -> GPTConfig:
    """sequence_len 512: a 128-token sliding window on the short layers."""
    heads = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=heads,
                     n_kv_head=heads, n_embd=n_embd)


def write_bundle(root: Path, model, tokenizer, kind: str = "sft") -> Path:
    """Save `model` as a training checkpoint and export it: (bundle folder)."""
    from core.checkpoint import save_checkpoint
    from core.export import export_bundle

    fp = "00112233aabbccdd"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {"kind": kind, "model_config": model.config.to_dict(),
            "tokenizer": {"fingerprint": fp, "vocab_size": tokenizer.vocab_size}, "loop_state": {}}
    ckpt = save_checkpoint(root / "checkpoints", 1, rank=0, world_size=1, model_state=state, optim_state={},
                           rank_state={}, meta=meta)
    tokenizer.save(root / "tokenizer")
    export_bundle(ckpt, root / "tokenizer", root / "bundle", tokenizer_fingerprint=fp)
    return root / "bundle"
