"""Real training on real text: a tiny GPT on ../shared/data/corpus bytes learns, in fp32 and bf16.

Byte-level tokens (vocab 256) keep the test independent of the tokenizer stage. The held-out text is
the validation shard; the bar is a margin below the unigram (context-free) entropy of the bytes.
"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from core.gpt import build_model
from core.optim import apply_schedule, build_optimizer
from core.scaling import derive
from core.train.config import PretrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)

T, B = 128, 16


def _bytes(path, limit: int) -> torch.Tensor:
    text = "\n".join(pq.read_table(path, columns=["text"]).column("text").to_pylist())[:limit]
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


@pytest.fixture(scope="module")
def corpus(corpus_files):
    return _bytes(corpus_files[0], 1_500_000), _bytes(corpus_files[-1], 150_000)


def _train(train, val, steps: int, dtype: torch.dtype, seed: int = 0):
    """The real recipe at toy scale: derive() schedules, reference LRs at batch scale 1."""
    plan = derive(PretrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=T, num_iterations=steps,
                                 total_batch_size=B * T, warmup_steps=10), 256)
    model = build_model(plan.model_config(), "cpu", dtype=dtype, seed=seed)
    unscaled = {k: (v / plan.batch_lr_scale if k not in ("weight_decay", "smear_lr") else v)
                for k, v in plan.optimizer_lrs().items()}
    opt = build_optimizer(model, plan, **unscaled)
    g = torch.Generator().manual_seed(seed)

    def val_loss():
        rows = [val[i * 9_000:i * 9_000 + T + 1] for i in range(16)]
        x = torch.stack([r[:-1] for r in rows])
        y = torch.stack([r[1:] for r in rows])
        with torch.no_grad():
            return model(x, y).item()

    start = val_loss()
    for step in range(steps):
        ix = torch.randint(0, len(train) - T - 1, (B,), generator=g).tolist()
        x = torch.stack([train[i:i + T] for i in ix])
        y = torch.stack([train[i + 1:i + T + 1] for i in ix])
        model(x, y).backward()
        apply_schedule(opt, plan, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return start, val_loss()


def _unigram_entropy(train, val) -> float:
    p = torch.bincount(train, minlength=256).double()
    p = (p / p.sum()).clamp_min(1e-9)
    return (-(p.log()[val]).mean()).item()


@pytest.mark.slow
def test_tiny_gpt_learns_real_text(corpus):
    train, val = corpus
    unigram = _unigram_entropy(train, val)  # ~3.2 nats/byte for this corpus
    start, end = _train(train, val, steps=250, dtype=torch.float32)
    assert abs(start - 5.545) < 0.01          # ln(256): the init predicts uniformly
    assert end < unigram - 0.6, (start, end, unigram)   # uses context, not just byte frequencies
    assert start - end > 3.0, (start, end)


@pytest.mark.slow
def test_bf16_training_matches_fp32(corpus):
    """Mixed precision (bf16 compute, fp32 master weights) ends where fp32 ends, within noise."""
    train, val = corpus
    _, fp32 = _train(train, val, steps=80, dtype=torch.float32)
    _, bf16 = _train(train, val, steps=80, dtype=torch.bfloat16)
    _, fp32_other_seed = _train(train, val, steps=80, dtype=torch.float32, seed=1)
    noise = abs(fp32 - fp32_other_seed)
    assert abs(bf16 - fp32) < max(0.05, 2 * noise), (fp32, bf16, fp32_other_seed)
