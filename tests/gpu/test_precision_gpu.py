"""Precision on the GPU: a bf16 training step tracks fp32 on the same batch; FP8 linears (tensorwise,
rowwise) track bf16, and a few FP8 training steps follow the bf16 loss curve (H100/Ada only); the
fused chunked loss computes what the full-logits loss does."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from core.fp8 import RECIPES, convert_to_fp8, fp8_available, fp8_linear
from core.gpt import build_model
from core.optim import apply_schedule, build_optimizer
from core.scaling import derive
from core.train.config import PretrainConfig
from tests.gpu._helpers import random_gpt, small_config

pytestmark = pytest.mark.gpu


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def needs_fp8(device):
    if device.type == "cuda" and not fp8_available(device):
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs compute capability >= 8.9)")


def test_bf16_step_tracks_fp32(device):
    cfg = small_config(1024, n_layer=4, n_embd=256, head_dim=128, sequence_len=256)
    fp32 = random_gpt(cfg, device, torch.float32, seed=1)
    bf16 = copy.deepcopy(fp32).set_compute_dtype(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (2, 4, cfg.sequence_len + 1), device=device, generator=g)
    models = {"fp32": fp32, "bf16": bf16}
    opts = {k: build_optimizer(m) for k, m in models.items()}
    losses, first_grads = {k: [] for k in models}, {}
    for i in range(2):
        for k, m in models.items():
            loss = m(data[i, :, :-1], data[i, :, 1:])
            loss.backward()
            losses[k].append(loss.item())
            if i == 0:
                first_grads[k] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            opts[k].step()
            m.zero_grad(set_to_none=True)
    for a, b in zip(losses["bf16"], losses["fp32"]):
        assert abs(a - b) / b < 2e-2, losses                       # the same loss before and after a step
    # a cosine of two 1-element vectors is +-1 (a sign test): directions are compared on tensors of
    # many elements only (the scalar gains' effect shows in the losses above)
    g32, g16 = first_grads["fp32"], first_grads["bf16"]
    checked = 0
    for name, want in g32.items():
        if want.numel() > 1 and want.norm() > 0:
            cos = F.cosine_similarity(g16[name].flatten().float(), want.flatten(), dim=0).item()
            assert cos > 0.99, (name, cos)
            checked += 1
    assert checked >= 4 * 6, checked                     # at least every block's six matrices


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_matches_bf16(device, recipe):
    needs_fp8(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(512, 768, device=device, generator=g).to(torch.bfloat16)
    w = torch.randn(1024, 768, device=device, generator=g) * 768 ** -0.5
    dy = torch.randn(512, 1024, device=device, generator=g).to(torch.bfloat16)
    results = []
    for fn in (lambda x, w: fp8_linear(x, w, recipe), lambda x, w: F.linear(x, w.to(x.dtype))):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww)
        y.backward(dy)
        results.append((y, xx.grad, ww.grad))
    (y8, gx8, gw8), (y, gx, gw) = results
    assert y8.dtype == torch.bfloat16 and gw8.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits (~4% per operand), e5m2 gradients 2 (~7%): errors of a few percent
    assert rel_err(y8, y) < 0.08, rel_err(y8, y)
    assert rel_err(gx8, gx) < 0.15, rel_err(gx8, gx)
    assert rel_err(gw8, gw) < 0.15, rel_err(gw8, gw)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_training_tracks_bf16(device, recipe):
    needs_fp8(device)
    plan = derive(PretrainConfig(depth=4, head_dim=128, max_seq_len=256, num_iterations=50, total_batch_size=8 * 256,
                                 warmup_steps=0), 1024)
    bf16 = build_model(plan.model_config(), device, torch.bfloat16, seed=0)
    fp8 = copy.deepcopy(bf16)
    assert convert_to_fp8(fp8, recipe, check_hardware=device.type == "cuda") == 4 * 6  # q k v proj fc mlp-proj
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 1024, (8, 257), device=device, generator=g)  # one batch, learned by heart
    curves = {}
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        opt, curve = build_optimizer(model, plan), []
        for step in range(6):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            apply_schedule(opt, plan, step)
            opt.step()
            model.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[name] = curve
    assert curves["bf16"][-1] < curves["bf16"][0] - 0.3, curves       # it learns ...
    for a, b in zip(curves["fp8"], curves["bf16"]):
        assert abs(a - b) / b < 0.03, curves                           # ... and FP8 follows step by step


def test_fused_loss_matches_the_plain_loss(device):
    """The chunked lm_head + soft-cap + CE (the CPU default, opt-in on CUDA) against full logits."""
    cfg = small_config(1024, n_layer=2, n_embd=256, head_dim=128, sequence_len=256)
    model = random_gpt(cfg, device, torch.bfloat16, seed=2)
    model.loss_chunk_rows = 384                                  # several chunks, the last one partial
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.sequence_len), device=device, generator=g)
    y = x.roll(-1, dims=1)
    y[:, -7:] = -1                                               # ignored targets
    results = {}
    for fused in (True, False):
        model.fused_loss = fused
        loss = model(x, y)
        loss.backward()
        results[fused] = (loss.item(), model.lm_head.weight.grad.clone(), model.transformer.h[0].mlp.c_fc.weight.grad.clone())
        model.zero_grad(set_to_none=True)
    (lf, hf, cf), (lp, hp, cp) = results[True], results[False]
    assert abs(lf - lp) / lp < 1e-2, (lf, lp)
    assert rel_err(hf, hp) < 2e-2 and rel_err(cf, cp) < 2e-2, (rel_err(hf, hp), rel_err(cf, cp))
