"""torch.compile and NCCL on the GPU: a compiled training step (as core/train/pretrain.py compiles the
model) matches eager ones, in bf16 and in FP8 (both recipes, never recompiling after step 1), and the
ZeRO-2 optimizer on NCCL with one process matches MuonAdamW."""
from __future__ import annotations

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch._dynamo.testing import CompileCounterWithBackend

from core.fp8 import RECIPES, convert_to_fp8, fp8_available
from core.gpt import build_model
from core.optim import DistMuonAdamW, MuonAdamW, apply_schedule, build_optimizer
from core.scaling import derive
from core.train.config import PretrainConfig

pytestmark = pytest.mark.gpu


def tiny_plan():
    return derive(PretrainConfig(depth=2, head_dim=128, max_seq_len=256, num_iterations=10,
                                 total_batch_size=4 * 256), 1024)


def train(model, step_model, opt, plan, data, start: int = 0) -> list[float]:
    losses = []
    for step in range(data.size(0)):
        loss = step_model(data[step, :, :-1], data[step, :, 1:])
        loss.backward()
        apply_schedule(opt, plan, start + step)
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_training_step_matches_eager(device):
    if device.type != "cuda":
        pytest.skip("checks inductor's CUDA kernels (CPU compile is covered by tests/core)")
    plan = tiny_plan()
    eager = build_model(plan.model_config(), device, torch.bfloat16, seed=0)
    other = copy.deepcopy(eager)
    init = {name: p.detach().clone() for name, p in eager.named_parameters()}
    compiled = torch.compile(other, dynamic=False)
    data = torch.randint(0, 1024, (3, 4, 257), device=device, generator=torch.Generator(device=device).manual_seed(0))
    want = train(eager, eager, build_optimizer(eager, plan), plan, data)
    got = train(other, compiled, build_optimizer(other, plan), plan, data)
    for a, b in zip(got, want):
        assert abs(a - b) / b < 1e-2, (got, want)
    # the updates point the same way (scalars that start at 0 differ relatively more: Adam's first
    # steps are sign-like on tiny gradients, so bf16 rounding shows; matrices are what matters)
    for (name, p), q in zip(other.named_parameters(), eager.parameters()):
        if p.dim() >= 2 and (q - init[name]).norm() > 0:
            cos = torch.nn.functional.cosine_similarity((p - init[name]).flatten().float(),
                                                        (q - init[name]).flatten().float(), dim=0).item()
            assert cos > 0.95, (name, cos)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_compiled_training_step(device, recipe):
    """FP8 under inductor (what the trainers run with --fp8 on CUDA) follows FP8 eager step by step and
    compiles once: a recompile would cost every FP8 run a second full compile."""
    if device.type != "cuda" or not fp8_available(device):
        pytest.skip("needs FP8 tensor cores (CUDA compute capability >= 8.9)")
    plan = tiny_plan()
    eager = build_model(plan.model_config(), device, torch.bfloat16, seed=0)
    assert convert_to_fp8(eager, recipe) == 2 * 6
    other = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(other, dynamic=False, backend=counter)
    data = torch.randint(0, 1024, (4, 4, 257), device=device, generator=torch.Generator(device=device).manual_seed(2))
    want = train(eager, eager, build_optimizer(eager, plan), plan, data)
    opt = build_optimizer(other, plan)
    got = train(other, compiled, opt, plan, data[:1])
    graphs = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        got += train(other, compiled, opt, plan, data[1:], start=1)
    assert graphs > 0 and counter.frame_count == graphs
    assert all(math.isfinite(x) for x in got), got
    for a, b in zip(got, want):      # the scales are computed in float64 so that both agree closely
        assert abs(a - b) / b < 2e-2, (got, want)


def test_distributed_optimizer_on_nccl_one_process(device):
    if device.type != "cuda" or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL (the gloo path is covered by tests/core/test_optim.py)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpu = torch.device("cuda", torch.cuda.current_device())  # NCCL binds to one indexed device
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=gpu)
    try:
        plan = tiny_plan()
        single = build_model(plan.model_config(), device, torch.bfloat16, seed=0)
        sharded = copy.deepcopy(single)
        opt_single = build_optimizer(single, plan, distributed=False)
        opt_sharded = build_optimizer(sharded, plan, distributed=True)
        assert isinstance(opt_single, MuonAdamW) and isinstance(opt_sharded, DistMuonAdamW)
        data = torch.randint(0, 1024, (2, 4, 257), device=device, generator=torch.Generator(device=device).manual_seed(1))
        init = {name: p.detach().clone() for name, p in single.named_parameters()}
        got = train(sharded, sharded, opt_sharded, plan, data)
        want = train(single, single, opt_single, plan, data)
        # Not bitwise: SDPA's / flash's backward accumulates with atomics (run-to-run nondeterministic
        # in the last bits), and Muon's bf16 Newton-Schulz turns a last-bit gradient difference into
        # ~1% of an update. The first loss precedes any backward, so it is the same computation.
        assert got[0] == pytest.approx(want[0], rel=1e-6), (got, want)
        assert got == pytest.approx(want, rel=1e-2), (got, want)
        for (name, p), q in zip(sharded.named_parameters(), single.parameters()):
            a, b = (p - init[name]).flatten().float(), (q - init[name]).flatten().float()
            if b.numel() > 1 and b.norm() > 0:     # updates of matrices/vectors point the same way
                assert F.cosine_similarity(a, b, dim=0).item() > 0.98, name
            # a shard updated twice, never or with another's update is off by a whole update; rounding
            # stays far below a tenth of the largest one (plus bf16's own 2^-8 of the weight)
            torch.testing.assert_close(p.float(), q.float(), rtol=2 ** -8, atol=0.1 * b.abs().max().item() + 1e-6,
                                       msg=name)
    finally:
        dist.destroy_process_group()
