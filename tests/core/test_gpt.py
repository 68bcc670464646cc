"""The GPT: config, counts, init, causality, KV-cache decode == full forward, vocab padding, loss."""
from __future__ import annotations

import math

import pytest
import torch

from core.gpt import (GPT, GPTConfig, KVCache, build_model, count_params, estimate_flops,
                      plain_softcap_cross_entropy, softcap_cross_entropy)

# seq 512 -> short window 128, so T=200 exercises real sliding windows; GQA 4 heads / 2 kv heads
SMALL = GPTConfig(sequence_len=512, vocab_size=1000, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                  window_pattern="SL")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


def randomized(config=SMALL, seed=0, scale=0.05) -> GPT:
    """A model whose every parameter is non-trivial (init zeroes projections and the smear lambda)."""
    model = build_model(config, "cpu", dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        model.smear_lambda.fill_(0.8)
    return model


def tokens(B, T, vocab=1000, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ config


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=6)
    with pytest.raises(ValueError, match="n_kv_head=4 must divide n_head=6"):
        GPTConfig(n_kv_head=4)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "bogus": 1})
    assert GPTConfig(window_pattern="sssl").window_pattern == "SSSL"


def test_windows_and_value_embedding_layout():
    cfg = GPTConfig()  # 12 layers, seq 2048
    assert cfg.short_window == 512
    assert cfg.window_sizes() == [512, 512, 512, 2048] * 3
    assert GPTConfig(n_layer=5, window_pattern="L").window_sizes() == [2048] * 5
    assert GPTConfig(n_layer=6, window_pattern="S").window_sizes()[-1] == 2048  # last layer always full
    assert [i for i in range(12) if cfg.has_ve(i)] == [1, 3, 5, 7, 9, 11]
    assert [i for i in range(5) if GPTConfig(n_layer=5).has_ve(i)] == [0, 2, 4]
    assert cfg.padded_vocab_size == 32768 and GPTConfig(vocab_size=1000).padded_vocab_size == 1024


@pytest.mark.parametrize("cfg", [SMALL, GPTConfig(sequence_len=64, vocab_size=517, n_layer=3, n_head=6, n_kv_head=1,
                                                  n_embd=96, window_pattern="SSL")])
def test_counts_from_config_match_model(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.param_counts() == count_params(cfg)
    c = count_params(cfg)
    assert model.num_scaling_params() == c["transformer_matrices"] + c["lm_head"]
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_flops_estimate_by_hand():
    cfg = GPTConfig(sequence_len=512, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    blocks = 2 * 12 * 64 * 64 + 2 * 12  # one value-embedding gate (layer 1, 12 -> 2)
    matmul = blocks + 1024 * 64 + 24    # + lm_head + smear gate
    attn = 12 * 2 * 32 * (128 + 512)    # layer 0 short window 128, layer 1 full
    assert estimate_flops(cfg) == 6 * matmul + attn


def test_init_scheme():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
    m = build_model(cfg, "cpu", seed=0)
    assert abs(m.transformer.wte.weight.std().item() - 0.8) < 0.01
    assert abs(m.lm_head.weight.std().item() - 0.001) < 1e-4
    bound = math.sqrt(3) / math.sqrt(256)
    attn = m.transformer.h[0].attn
    for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight):
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert m.transformer.h[0].mlp.c_fc.weight.abs().max() <= 0.4 * bound
    assert all(b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0 for b in m.transformer.h)
    torch.testing.assert_close(m.resid_lambdas.data, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(m.x0_lambdas.data, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert m.smear_lambda.item() == 0 and m.backout_lambda.item() == pytest.approx(0.2)
    assert m.smear_gate.weight.min() >= 0 and m.smear_gate.weight.max() <= 0.02
    # every parameter is fp32 (master weights), and the same seed gives the same model
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    m2 = build_model(cfg, "cpu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


# ------------------------------------------------------------------------------------------ forward


def test_causality():
    m = randomized()
    idx = tokens(2, 150)
    idx2 = idx.clone()
    idx2[:, 100:] = tokens(2, 50, seed=9)
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :100], b[:, :100], atol=0, rtol=0)
    assert not torch.allclose(a[:, 100:], b[:, 100:])


def test_kv_cache_decode_equals_full_forward():
    m = randomized()
    idx = tokens(2, 200)  # > short window (128): sliding windows active in the cache path
    with torch.no_grad():
        full = m(idx)
        cache = KVCache.for_model(m, batch_size=2, max_seq_len=256)
        parts = [m(idx[:, :50], kv_cache=cache), m(idx[:, 50:160], kv_cache=cache)]  # prefill + a chunk
        for t in range(160, 200):
            parts.append(m(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 200
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_expand_and_reset():
    m = randomized()
    idx = tokens(1, 60)
    with torch.no_grad():
        full = m(idx)
        cache = KVCache.for_model(m, batch_size=1, max_seq_len=128)
        last = m(idx[:, :40], kv_cache=cache, last_only=True)
        assert last.shape == (1, 1, 1000)
        torch.testing.assert_close(last[:, 0], full[:, 39], atol=1e-5, rtol=0)
        many = cache.expand(3)
        out = m(idx[:, 40:60].expand(3, -1), kv_cache=many)
        for row in range(3):
            torch.testing.assert_close(out[row], full[0, 40:60], atol=1e-5, rtol=0)
        cache.reset()
        torch.testing.assert_close(m(idx[:, :10], kv_cache=cache), full[:, :10], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="batch-1"):
            many.expand(2)
        with pytest.raises(ValueError, match="full"):
            m(tokens(1, 200), kv_cache=cache)


def test_padded_vocab_is_never_predicted():
    m = randomized()
    assert m.lm_head.weight.shape[0] == 1024
    idx, tgt = tokens(2, 40), tokens(2, 40, seed=1)
    with torch.no_grad():
        loss_before = m(idx, tgt)
        m.lm_head.weight[1000:] = 100.0  # padded rows that would win every argmax if they were used
        logits = m(idx)
        loss_after = m(idx, tgt)
    assert logits.shape == (2, 40, 1000)
    assert logits.argmax(-1).max() < 1000
    assert torch.equal(loss_before, loss_after)
    m.zero_grad()
    m(idx, tgt).backward()
    assert m.lm_head.weight.grad[1000:].abs().sum() == 0 and m.lm_head.weight.grad[:1000].abs().sum() > 0


def test_logits_are_softcapped_fp32():
    m = randomized(scale=0.5)
    with torch.no_grad():
        m.lm_head.weight.mul_(100)
        logits = m(tokens(1, 30))
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


@pytest.mark.parametrize("chunk", [7, 1024])
def test_fused_loss_equals_plain_loss_and_grads(chunk):
    m = randomized()
    m.loss_chunk_rows = chunk
    idx, tgt = tokens(3, 50), tokens(3, 50, seed=2)
    tgt[0, :20] = -1
    tgt[2, 45:] = -1
    results = {}
    for fused in (True, False):
        for reduction in ("mean", "sum"):
            m.fused_loss = fused
            m.zero_grad()
            loss = m(idx, tgt, loss_reduction=reduction)
            loss.backward()
            results[fused, reduction] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    for reduction in ("mean", "sum"):
        (lf, gf), (lp, gp) = results[True, reduction], results[False, reduction]
        torch.testing.assert_close(lf, lp, atol=1e-5, rtol=1e-6)
        for name in gp:
            torch.testing.assert_close(gf[name], gp[name], atol=1e-6, rtol=1e-4, msg=name)
    n_valid = (tgt != -1).sum()
    torch.testing.assert_close(results[True, "sum"][0] / n_valid, results[True, "mean"][0])


def test_loss_reduction_none_and_no_grad_path():
    m = randomized()
    idx, tgt = tokens(2, 40), tokens(2, 40, seed=3)
    tgt[1, :10] = -1
    per_token = m(idx, tgt, loss_reduction="none")           # grad enabled: plain path
    with torch.no_grad():
        per_token_chunked = m(idx, tgt, loss_reduction="none")  # no grad: chunked path
        mean = m(idx, tgt)
        logits = m(idx)
    assert per_token.shape == (2, 40) and per_token.dtype == torch.float32
    assert torch.all(per_token[1, :10] == 0) and torch.all(per_token[1, 10:] > 0)
    torch.testing.assert_close(per_token_chunked, per_token.detach(), atol=1e-5, rtol=1e-6)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 1000), tgt.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token_chunked.view(-1), ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(mean, per_token_chunked.sum() / (tgt != -1).sum())
    with pytest.raises(ValueError, match="loss_reduction"):
        m(idx, tgt, loss_reduction="avg")


def test_all_targets_ignored_gives_nan_like_torch():
    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    tgt = torch.full((8,), -1)
    assert torch.isnan(softcap_cross_entropy(h, w, tgt, 64, 15.0))
    assert torch.isnan(plain_softcap_cross_entropy(h, w, tgt, 64, 15.0, "mean"))


def test_bf16_compute_close_to_fp32():
    m = randomized()
    idx, tgt = tokens(2, 64), tokens(2, 64, seed=4)
    with torch.no_grad():
        ref = m(idx, tgt)
        m.set_compute_dtype(torch.bfloat16)
        low = m(idx, tgt)
        logits = m(idx)
    assert logits.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.02 * ref.item()
    cache = KVCache.for_model(m, 1, 64)
    assert cache.k.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        m.set_compute_dtype(torch.float32)(idx[:1, :4], kv_cache=cache)


def test_meta_build_then_load_state_dict():
    src = randomized()
    dst = build_model(SMALL, "cpu", init=False)
    dst.load_state_dict(src.state_dict())
    idx = tokens(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(idx), src(idx), atol=0, rtol=0)
    assert "cos" not in src.state_dict() and len(src.state_dict()) == len(list(src.parameters()))


# ------------------------------------------------------------------------------------------ fp8


def test_fp8_linear_math_on_cpu():
    """The FP8 GEMMs (torch._scaled_mm exists on CPU too) stay within FP8 rounding of bf16."""
    from core.fp8 import fp8_linear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(256, 128, generator=g) * 0.05).requires_grad_(True)
    grad_out = torch.randn(64, 256, generator=g)
    ref = torch.nn.functional.linear(x.float(), w)
    gx, gw = torch.autograd.grad(ref, (x, w), grad_out)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for recipe, tol in (("tensorwise", 0.08), ("rowwise", 0.06)):
        y = fp8_linear(x, w, recipe)
        fx, fw = torch.autograd.grad(y, (x, w), grad_out.bfloat16())
        assert y.dtype == torch.bfloat16 and fw.dtype == torch.float32
        assert 0 < rel(y, ref) < tol and 0 < rel(fx, gx) < tol and 0 < rel(fw, gw) < tol, recipe


def test_fp8_conversion_guard_and_disable():
    from core.fp8 import convert_to_fp8, disable_fp8
    cfg = GPTConfig(sequence_len=64, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    m = randomized(cfg)
    with pytest.raises(ValueError, match="compute capability"):
        convert_to_fp8(m)  # CPU: refused with a clear message
    assert convert_to_fp8(m, "rowwise", check_hardware=False) == 2 * 6  # q, k, v, proj, fc, mlp proj
    assert m.lm_head.fp8 is None and m.transformer.h[1].attn.ve_gate.fp8 is None
    m.set_compute_dtype(torch.bfloat16)
    idx, tgt = tokens(2, 64, vocab=1024), tokens(2, 64, vocab=1024, seed=1)
    fp8_loss = m(idx, tgt)
    fp8_loss.backward()
    assert m.transformer.h[0].attn.c_q.weight.grad.abs().sum() > 0
    with disable_fp8(m):
        assert m.transformer.h[0].mlp.c_fc.fp8 is None
        bf16_loss = m(idx, tgt)
    assert m.transformer.h[0].mlp.c_fc.fp8 == "rowwise"
    assert abs(fp8_loss.item() - bf16_loss.item()) < 0.02 * bf16_loss.item()


@pytest.mark.slow
def test_compiled_trunk_matches_eager():
    """compile_for_training(): same loss and gradients as eager; no-grad calls stay eager (bitwise)."""
    cfg = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
    eager, compiled = randomized(cfg), randomized(cfg)
    compiled.compile_for_training()
    idx, tgt = tokens(2, 64, vocab=256), tokens(2, 64, vocab=256, seed=1)
    for model in (eager, compiled):
        model(idx, tgt).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        assert torch.equal(compiled(idx), eager(idx))


def test_training_after_an_inference_mode_forward():
    """The first forward under inference_mode (eval at step 0, generation) must not poison training."""
    from core.gpt import GPTConfig, build_model

    cfg = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg, "cpu", torch.float32, seed=0)
    x = torch.randint(0, 128, (2, 16))
    with torch.inference_mode():
        model(x)
    loss = model(x, targets=x)
    loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(loss)
