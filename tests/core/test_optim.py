"""Muon + AdamW: orthogonalisation band, one step == a float64 hand computation, state, ZeRO-2 on gloo."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.gpt import GPTConfig, build_model
from core.optim import (POLAR_EXPRESS_COEFFS, DistMuonAdamW, MuonAdamW, apply_schedule, build_optimizer,
                        orthogonalize, param_groups)
from core.scaling import derive, reference_lrs
from core.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
# The coefficients as printed in docs/reference.md#optimizer (5 decimals).
REFERENCE_COEFFS = [(8.15655, -22.48329, 15.87877), (4.04293, -2.80892, 0.50002), (3.89167, -2.77248, 0.50606),
                (3.28575, -2.36813, 0.46449), (2.34654, -1.70978, 0.42324)]
TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SL")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


def test_coefficients_are_the_reference_ones():
    for ours, ref in zip(POLAR_EXPRESS_COEFFS, REFERENCE_COEFFS):
        assert [round(c, 5) for c in ours] == list(ref)


def test_polar_express_scalar_map_band():
    """The 5-step polynomial maps every singular value in [1e-3, 1] into [0.8589, 1.1411]."""
    s = torch.logspace(-3, 0, 100_001, dtype=torch.float64)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        s = a * s + b * s ** 3 + c * s ** 5
    assert 0.8588 < s.min() and s.max() < 1.1412


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_singular_values_in_band(shape, dtype):
    m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    grads = torch.stack([u @ torch.diag(torch.logspace(0, -lg, k)) @ v.T for lg in (0.5, 1, 2)])  # cond 3..100
    out = orthogonalize(grads.to(dtype)).double()
    slack = 0.01 if dtype == torch.float32 else 0.03
    for i in range(3):
        sv = torch.linalg.svdvals(out[i])
        assert sv.min() > 0.8589 - slack and sv.max() < 1.1411 + slack, (i, sv.min(), sv.max())
        # same singular vectors as the row-equilibrated input (MuonEq rescales rows first): U^T X V diagonal
        eq = grads[i].double() / grads[i].double().norm(dim=1, keepdim=True)
        ue, _, vhe = torch.linalg.svd(eq, full_matrices=False)
        core = ue.T @ out[i] @ vhe.T
        off = core - torch.diag(torch.diagonal(core))
        assert off.norm() < (0.01 if dtype == torch.float32 else 0.1) * core.norm()


# ------------------------------------------------------------------------------ hand computation


def _muon_by_hand(p, g, state, momentum, lr, wd, beta2):
    """One Muon step on one float64 matrix, written out from docs/reference.md#optimizer."""
    buf = state.setdefault("buf", torch.zeros_like(p))
    buf.mul_(momentum).add_((1 - momentum) * g)
    u = (1 - momentum) * g + momentum * buf
    m, n = u.shape
    u = u * ((u.norm() / math.sqrt(m)) / u.norm(dim=1, keepdim=True).clamp_min(1e-6))
    x = u / (u.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if m > n:
            A = x.T @ x
            x = a * x + x @ (b * A + c * A @ A)
        else:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
    x = x * math.sqrt(min(m, n)) / x.norm()
    dim = 1 if m >= n else 0
    v_mean = (x * x).mean(dim=dim, keepdim=True)
    v_norm = math.sqrt(v_mean.sum().item() * x.shape[dim])
    v = state.setdefault("v", torch.zeros_like(v_mean))
    v.mul_(beta2).add_((1 - beta2) * v_mean)
    step = v.clamp_min(1e-10).rsqrt()
    v_norm_new = math.sqrt((v_mean * x.shape[dim] * step * step).sum().item())
    x = x * step * (v_norm / v_norm_new)
    lr = lr * max(1.0, m / n) ** 0.5
    return p - lr * x - lr * wd * p * ((x * p) >= 0)


def _adamw_by_hand(p, g, state, lr, betas, eps, wd):
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = betas[0] * state.get("m", torch.zeros_like(p)) + (1 - betas[0]) * g
    v = state["v"] = betas[1] * state.get("v", torch.zeros_like(p)) + (1 - betas[1]) * g * g
    p = p * (1 - lr * wd)
    return p - lr / (1 - betas[0] ** t) * m / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(seed, B=4, T=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


@pytest.mark.parametrize("how", [
    {},
    # the reference's compiled steps (per-tensor AdamW, stacked Muon): hyperparameters are 0-D tensors
    # refilled each step, so the second step's new lr, momentum and wd must reach the compiled kernels
    pytest.param(dict(fused_adamw=False, compile_steps=True), marks=pytest.mark.slow, id="compiled"),
])
def test_two_steps_equal_float64_hand_computation(how):
    model = build_model(TINY, "cpu", dtype=torch.float32, seed=0)
    _randomize(model)
    opt = build_optimizer(model, distributed=False, **how)
    assert isinstance(opt, MuonAdamW)
    shadow = {id(p): p.detach().double().clone() for p in model.parameters()}
    states: dict = {}
    for step, (lrm, momentum, wd) in enumerate([(1.0, 0.85, 0.2), (0.5, 0.9, 0.1)]):
        x, y = _batch(step)
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        opt.set_schedule(lrm, momentum, wd)
        for group in opt.param_groups:
            for p in group["params"]:
                g, st = p.grad.double(), states.setdefault(id(p), {})
                if group["kind"] == "muon":
                    shadow[id(p)] = _muon_by_hand(shadow[id(p)], g, st, momentum, group["initial_lr"] * lrm, wd, 0.9)
                else:
                    shadow[id(p)] = _adamw_by_hand(shadow[id(p)], g, st, group["initial_lr"] * lrm, group["betas"],
                                                   1e-10, group["weight_decay"])
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), shadow[id(p)], atol=2e-6, rtol=1e-5, msg=name)
    kinds = {g["name"]: g["kind"] for g in opt.param_groups}
    assert kinds["lm_head"] == kinds["wte"] == kinds["value_embeds"] == kinds["smear"] == "adamw"
    assert sum(k == "muon" for k in kinds.values()) == len({tuple(p.shape) for p in model.transformer.h.parameters()})


def test_groups_follow_the_reference():
    model = build_model(TINY, "cpu", seed=0)
    groups = {g["name"]: g for g in param_groups(model, **reference_lrs(32))}
    s = (32 / 768) ** -0.5
    assert groups["lm_head"]["lr"] == pytest.approx(0.008 * s) and groups["lm_head"]["betas"] == (0.8, 0.96)
    assert groups["wte"]["lr"] == pytest.approx(0.3 * s) and groups["wte"]["weight_decay"] == 0.001
    assert groups["value_embeds"]["lr"] == pytest.approx(0.15 * s) and groups["value_embeds"]["weight_decay"] == 0.01
    assert groups["resid_lambdas"]["lr"] == pytest.approx(0.005) and groups["resid_lambdas"]["weight_decay"] == 0.05
    assert groups["x0_lambdas"]["lr"] == 0.5 and groups["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert groups["smear"]["lr"] == 0.2 and len(groups["smear"]["params"]) == 3
    assert all(g["eps"] == 1e-10 for g in groups.values() if g["kind"] == "adamw")
    muon = [g for g in groups.values() if g["kind"] == "muon"]
    assert all(g["lr"] == 0.02 and g["ns_steps"] == 5 and g["beta2"] == 0.9 for g in muon)
    with pytest.raises(ValueError, match="unknown LR"):
        build_optimizer(model, matrix_learning_rate=0.1)


def test_state_dict_roundtrip_and_schedule():
    plan = derive(PretrainConfig(depth=3, aspect_ratio=11, head_dim=8, max_seq_len=32, num_iterations=50), 256)
    model = build_model(TINY, "cpu", seed=0)
    _randomize(model)
    opt = build_optimizer(model, plan)
    for step in range(2):
        x, y = _batch(step)
        model(x, y).backward()
        apply_schedule(opt, plan, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(plan.lm_head_lr * plan.lr_multiplier(1))
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert muon["momentum"] == pytest.approx(plan.muon_momentum(1))
    assert muon["weight_decay"] == pytest.approx(plan.muon_weight_decay(1))

    buffer = io.BytesIO()  # through bytes, like a checkpoint (an in-memory state_dict aliases the live state)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    clone = build_model(TINY, "cpu", init=False)
    clone.load_state_dict(saved["model"])
    opt2 = build_optimizer(clone, plan)
    opt2.load_state_dict(saved["optim"])
    for m, o in ((model, opt), (clone, opt2)):
        x, y = _batch(7)
        m(x, y).backward()
        apply_schedule(o, plan, 2)
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_dist_optimizer_needs_a_process_group():
    model = build_model(TINY, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="process group"):
        DistMuonAdamW(param_groups(model, **reference_lrs(32)))


@pytest.mark.slow
def test_distributed_gloo_matches_single_process(tmp_path):
    """2 gloo processes (ZeRO-2, each half the batch) == 1 process with 2 accumulation micro-steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "core" / "_dist_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from tests.core._dist_worker import STEPS, make_model, micro_batches, schedule
    model = make_model()
    opt = build_optimizer(model, distributed=False)
    for step in range(STEPS):
        for x, y in micro_batches(step):  # the two ranks' halves, as accumulation micro-steps
            (model(x, y) / 2).backward()
        opt.set_schedule(*schedule(step))
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist_state = torch.load(tmp_path / "model_rank0.pt")
    rank1 = torch.load(tmp_path / "model_rank1.pt")
    worst = 0.0
    for name, p in model.named_parameters():
        assert torch.equal(dist_state[name], rank1[name]), f"ranks disagree on {name}"
        worst = max(worst, (dist_state[name] - p.detach()).abs().max().item())
    assert worst < 1e-6, worst
    # the optimizer state is sharded: each rank holds half of the large AdamW rows
    shard0 = torch.load(tmp_path / "optim_rank0.pt")["state"]
    full = opt.state_dict()["state"]
    wte_index = next(i for i, g in enumerate(opt.param_groups) if g["name"] == "wte")
    wte_id = opt.state_dict()["param_groups"][wte_index]["params"][0]
    assert shard0[wte_id]["exp_avg"].shape[0] * 2 == full[wte_id]["exp_avg"].shape[0]
