"""Worker for test_optim.test_distributed_gloo_matches_single_process (not collected by pytest).

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/core/_dist_worker.py OUT_DIR

Each rank trains the same tiny model on its half of every batch with DistMuonAdamW for STEPS steps and
saves its parameters and optimizer shard to OUT_DIR.
"""
from __future__ import annotations

import sys

import torch

from core.common import cleanup_distributed, init_distributed
from core.gpt import GPTConfig, build_model
from core.optim import DistMuonAdamW, build_optimizer

STEPS = 4
# 3 layers, GQA: Muon groups of 2, 3 and 6 matrices -> uneven ownership and zero padding on 2 ranks
CONFIG = GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SL")


def make_model():
    model = build_model(CONFIG, "cpu", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of `step`, split in the two ranks' halves."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)
    return [(x[:2], y[:2]), (x[2:], y[2:])]


def schedule(step: int) -> tuple[float, float, float]:
    """(lr multiplier, Muon momentum, Muon weight decay) for a step."""
    return 1.0 - 0.1 * step, 0.85 + 0.02 * step, 0.2 / (step + 1)


def main(out_dir: str) -> None:
    info = init_distributed("cpu")
    assert info.ddp and info.world_size == 2, info
    model = make_model()
    opt = build_optimizer(model)
    assert isinstance(opt, DistMuonAdamW)
    for step in range(STEPS):
        x, y = micro_batches(step)[info.rank]
        model(x, y).backward()
        opt.set_schedule(*schedule(step))
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out_dir}/model_rank{info.rank}.pt")
    torch.save(opt.state_dict(), f"{out_dir}/optim_rank{info.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
