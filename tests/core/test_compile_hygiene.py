"""Compile hygiene that a GPU run depends on, proved on CPU: a compiled training step compiles on
its first call and never again. A recompile on step 2 costs a GPU session a second full inductor
compile (~40-70 s at d12); dynamo's guards are the same whatever the backend, so the cheap
`aot_eager` backend (dynamo + AOT autograd, no inductor C++ build) shows them here in seconds."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from core.gpt import GPTConfig, build_model
from core.optim import build_optimizer

STEPS = 4


def windowed_config() -> GPTConfig:
    """SSSL windows (128-token short window < the 256-token context: the explicit-mask SDPA path),
    GQA (4 query heads on 2 kv heads), value embeddings on layers 1 and 3."""
    return GPTConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                     window_pattern="SSSL")


@pytest.mark.parametrize("how", ["model", "trunk"])
def test_compiled_training_step_never_recompiles(how):
    """how=model: torch.compile(model) as the trainers and the GPU kit do; trunk: compile_for_training().
    The fused chunked loss (the CPU default) runs eager behind its graph break in both. FP8 is off:
    CPU FP8 GEMMs made this one test take minutes; tests/gpu/test_compile_dist_gpu.py compiles FP8."""
    cfg = windowed_config()
    assert cfg.window_sizes()[:3] == [128] * 3 and cfg.has_ve(1) and cfg.has_ve(3)
    torch._dynamo.reset()
    model = build_model(cfg, "cpu", torch.float32, seed=0)
    counter = CompileCounterWithBackend("aot_eager")
    if how == "model":
        step_model = torch.compile(model, dynamic=False, backend=counter)
    else:
        step_model = model.compile_for_training(backend=counter)
    opt = build_optimizer(model)
    gen = torch.Generator().manual_seed(0)
    graphs = None
    for step in range(STEPS):
        data = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len + 1), generator=gen)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):   # the failure names the guard
            loss = step_model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        if step == 0:
            graphs = counter.frame_count
    assert graphs and counter.frame_count == graphs, (graphs, counter.frame_count)
    torch._dynamo.reset()
