"""Bits per byte: a hand computation, specials and ignored targets excluded, steps, ranks."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from core.eval.bpb import evaluate_bpb, evaluate_loss_bpb

TOKEN_BYTES = torch.tensor([0, 1, 2, 3, 1, 4], dtype=torch.int32)   # token 0 is a special (0 bytes)


class TableLoss(torch.nn.Module):
    """Returns given per-token losses for the batch whose first input id selects them."""

    def __init__(self, losses: dict[int, torch.Tensor]):
        super().__init__()
        self.losses = losses

    def forward(self, idx, targets=None, loss_reduction="mean"):
        assert targets is not None and loss_reduction == "none"
        return self.losses[int(idx[0, 0])]


def _batch(key, targets):
    y = torch.tensor(targets)
    x = torch.full_like(y, 1)
    x[0, 0] = key
    return x, y


B1 = _batch(1, [[1, 0, 2], [-1, 5, 3]])
B2 = _batch(2, [[4, 4, 0], [2, -1, -1]])
LOSSES = {1: torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.5, 1.5]]),
          2: torch.tensor([[0.25, 0.75, 9.0], [3.0, 8.0, 8.0]])}


def test_hand_computation():
    model = TableLoss(LOSSES)
    # batch 1: targets 1 (1 byte, 1.0 nats), 0 special (excluded), 2 (2 bytes, 2.0), -1 ignored,
    # 5 (4 bytes, 0.5), 3 (3 bytes, 1.5): 5.0 nats over 10 bytes
    assert evaluate_bpb(model, [B1], TOKEN_BYTES) == pytest.approx(5.0 / (math.log(2) * 10), rel=1e-12)
    # batch 2: 4 (1 byte, 0.25), 4 (1, 0.75), 0 special, 2 (2 bytes, 3.0), two ignored: 4.0 nats, 4 bytes
    both = (5.0 + 4.0) / (math.log(2) * 14)
    assert evaluate_bpb(model, [B1, B2], TOKEN_BYTES) == pytest.approx(both, rel=1e-12)
    assert evaluate_bpb(model, [B1, B2], TOKEN_BYTES, steps=1) == pytest.approx(5.0 / (math.log(2) * 10))


def test_loss_and_bpb_in_one_pass():
    """SFT's val loss (nats per non-ignored target, specials included) and bpb from the same pass."""
    loss, bpb = evaluate_loss_bpb(TableLoss(LOSSES), [B1, B2], TOKEN_BYTES)
    # every target but the three ignored: 1 + 5 + 2 + 0.5 + 1.5 (batch 1), 0.25 + 0.75 + 9 + 3 (batch 2)
    assert loss == pytest.approx((10.0 + 13.0) / 9, rel=1e-12)
    assert bpb == evaluate_bpb(TableLoss(LOSSES), [B1, B2], TOKEN_BYTES)


def test_steps_does_not_pull_an_extra_batch():
    pulled = []

    def loader():
        for i in range(10):
            pulled.append(i)
            yield (B1, B2)[i % 2]

    evaluate_bpb(TableLoss(LOSSES), loader(), TOKEN_BYTES, steps=3)
    assert pulled == [0, 1, 2]


def test_no_bytes_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="no target bytes"):
        evaluate_bpb(TableLoss(LOSSES), [], TOKEN_BYTES)
    only_special = _batch(1, [[0, 0, -1], [-1, 0, 0]])
    with pytest.raises(ValueError, match="no target bytes"):
        evaluate_bpb(TableLoss(LOSSES), [only_special], TOKEN_BYTES)
    with pytest.raises(ValueError, match="steps"):
        evaluate_bpb(TableLoss(LOSSES), [B1], TOKEN_BYTES, steps=0)


class TinyLM(torch.nn.Module):
    """A small real causal LM (embedding -> causal running mean -> head) with the GPT loss API."""

    def __init__(self, vocab=6, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def logits(self, idx):
        h = self.emb[idx].cumsum(1) / torch.arange(1, idx.size(1) + 1)[None, :, None]
        return h @ self.head

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.logits(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view_as(targets) if loss_reduction == "none" else loss


def test_matches_log_probabilities_of_a_real_model():
    model = TinyLM()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randint(0, 6, (2, 7), generator=g)
        y = torch.randint(0, 6, (2, 7), generator=g)
        y[0, :2] = -1
        batches.append((x, y))
    nats = nbytes = 0.0
    for x, y in batches:
        logp = torch.log_softmax(model.logits(x), dim=-1).detach()
        for b in range(2):
            for t in range(7):
                tgt = int(y[b, t])
                if tgt >= 0 and TOKEN_BYTES[tgt] > 0:
                    nats -= float(logp[b, t, tgt])
                    nbytes += int(TOKEN_BYTES[tgt])
    assert evaluate_bpb(model, batches, TOKEN_BYTES) == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


def test_real_gpt_and_tokenizer(corpus_files):
    """bpb of a real GPT on BOS-prefixed documents: the BOS targets (specials) count neither nats nor
    bytes, the bytes are exactly the UTF-8 length of the text, the nats those of the logits."""
    import pyarrow.parquet as pq
    from core.gpt import GPT, GPTConfig
    from core.tokenizer import Tokenizer

    texts = pq.read_table(corpus_files[-1]).column("text").to_pylist()[:100]
    tok = Tokenizer.train(texts, vocab_size=512)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)).init_weights(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    docs = [t[:60] for t in texts[:8]]
    stream = [i for ids in tok.encode(docs, prepend="<|bos|>") for i in ids]
    rows = torch.tensor(stream[: (len(stream) - 1) // 33 * 33 + 1])
    x = rows[:-1].view(-1, 33)[:, :32]
    y = rows[1:].view(-1, 33)[:, :32].clone()
    y[0, :3] = -1                                                   # ignored targets
    tb = tok.token_bytes()
    valid = (y >= 0) & (tb[y.clamp(min=0)] > 0)
    assert ((y == tok.bos_token_id) & ~valid).any()                # BOS targets present and excluded
    with torch.no_grad():
        logp = torch.log_softmax(model(x), dim=-1)
    nats = -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid].double().sum().item()
    nbytes = sum(len(tok.decode([int(t)]).encode("utf-8")) for t in y[valid])
    assert nbytes == int(tb[y[valid]].sum())
    got = evaluate_bpb(model, [(x[:2], y[:2]), (x[2:], y[2:])], tb)
    assert got == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TableLoss(LOSSES)
        split = evaluate_bpb(model, [B1] if rank == 0 else [B2], TOKEN_BYTES)
        lonely = evaluate_bpb(model, [B1, B2] if rank == 0 else [], TOKEN_BYTES)   # rank 1 has no batches
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{split!r} {lonely!r}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_reduce_to_the_single_process_number(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = (5.0 + 4.0) / (math.log(2) * 14)
    for rank in (0, 1):
        split, lonely = map(float, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert split == pytest.approx(want, rel=1e-12) and lonely == pytest.approx(want, rel=1e-12)
