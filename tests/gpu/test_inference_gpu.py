"""Inference on the GPU: KV-cached generation (flash-attn's kvcache kernel when importable) produces
what the uncached forward predicts, sliding windows included; an export bundle loads onto the GPU and
computes exactly what the model it was exported from does there."""
from __future__ import annotations

import pytest
import torch

from core.engine import Engine
from core.export import load
from tests.gpu._helpers import byte_tokenizer, random_gpt, small_config, write_bundle

pytestmark = pytest.mark.gpu

PROMPT = "The history of science is the study of the development of science and knowledge. " * 2  # 166 bytes


def greedy(engine: Engine, prompt: list[int], n: int, rows: int = 1) -> list[list[int]]:
    engine.stop_tokens, engine.tool = frozenset(), (lambda expr: None)  # decode exactly n tokens
    cols = [col for col, _ in engine.generate(prompt, num_samples=rows, max_tokens=n, temperature=0.0)]
    return [list(r) for r in zip(*cols)]


def test_kv_cache_generation_matches_uncached_forward(device):
    tok = byte_tokenizer()
    cfg = small_config(tok.vocab_size, n_layer=3, n_embd=256, head_dim=128, sequence_len=512)  # 128-token windows
    model = random_gpt(cfg, device, torch.bfloat16, seed=3).eval()
    prompt = [tok.bos_token_id] + tok.encode(PROMPT)
    rows = greedy(Engine(model, tok), prompt, 48, rows=3)
    assert rows[0] == rows[1] == rows[2]              # greedy rows of one prompt agree (cache replication)
    seq = torch.tensor([prompt + rows[0]], device=device)
    with torch.no_grad():
        logits = model(seq)[0, len(prompt) - 1:-1].float()  # teacher-forced, no cache: predicts each token
    top2 = logits.topk(2, dim=-1).values
    ties = (top2[:, 0] - top2[:, 1]) < 0.25               # bf16 noise may flip near-ties, nothing else
    agree = logits.argmax(-1).cpu() == torch.tensor(rows[0])
    assert bool((agree | ties.cpu()).all()), (agree, ties)
    assert agree.float().mean() > 0.9


def test_export_bundle_round_trip(device, tmp_path):
    tok = byte_tokenizer()
    source = random_gpt(small_config(tok.vocab_size), "cpu", torch.float32, seed=5)
    bundle = write_bundle(tmp_path, source, tok)
    model, tokenizer, gen = load(bundle, device=device)
    assert model.lm_head.weight.device.type == device.type and tokenizer.vocab_size == tok.vocab_size
    source = source.to(device).set_compute_dtype(model.compute_dtype).eval()
    x = torch.randint(0, tok.vocab_size, (2, 200), device=device, generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    prompt = [tok.bos_token_id] + tok.encode("Hello there")
    assert greedy(Engine(model, tokenizer), prompt, 16) == greedy(Engine(source, tok), prompt, 16)
