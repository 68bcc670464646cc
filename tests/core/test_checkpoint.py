"""Checkpoints: complete or invisible, all ranks' files, RNG round trip, pruning."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from core.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, rng_state,
                             save_checkpoint, set_rng_state)


def _save(root, step, keep_last=2):
    model = {"w": torch.full((3,), float(step))}
    return save_checkpoint(root, step, rank=0, world_size=1, model_state=model,
                           optim_state={"m": torch.ones(2) * step}, rank_state={"loader": {"pos": step}},
                           meta={"config": {"depth": 4}}, keep_last=keep_last)


def test_round_trip_and_keep_last(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 30 and ck.meta["config"] == {"depth": 4} and ck.meta["world_size"] == 1
    assert torch.equal(ck.model_state()["w"], torch.full((3,), 30.0))
    assert torch.equal(ck.optim_state(0)["m"], torch.ones(2) * 30)
    assert ck.rank_state(0)["loader"] == {"pos": 30}
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        ck.optim_state(1)


def test_interrupted_save_is_invisible_and_cleaned(tmp_path):
    _save(tmp_path, 10)
    # a save killed half way: temp dir with some files, no rename
    tmp = tmp_path / "step_000020.tmp"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_000010"
    _save(tmp_path, 30)
    assert not tmp.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 30]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp)


def test_two_ranks_write_their_own_shards(tmp_path):
    barrier = threading.Barrier(2)
    errors = []

    def rank_main(rank):
        try:
            save_checkpoint(tmp_path, 5, rank=rank, world_size=2,
                            model_state={"w": torch.zeros(1)} if rank == 0 else None,
                            optim_state={"shard": torch.tensor([rank])}, rank_state={"r": rank},
                            meta={"x": 1} if rank == 0 else None, barrier=barrier.wait)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.optim_state(1)["shard"].item() == 1 and ck.rank_state(1) == {"r": 1}
    assert ck.meta["world_size"] == 2


def test_rng_state_round_trip():
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_load_model_round_trip_and_tokenizer_check(tmp_path):
    from core.checkpoint import TokenizerMismatchError, check_tokenizer, load_model
    from core.gpt import GPTConfig, build_model

    cfg = GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg, "cpu", torch.float32, seed=0)
    meta = {"model_config": cfg.to_dict(), "kind": "base", "tokenizer": {"fingerprint": "ab" * 8, "vocab_size": 300}}
    path = save_checkpoint(tmp_path, 7, rank=0, world_size=1, model_state=model.state_dict(), optim_state=None,
                           rank_state={}, meta=meta)
    loaded, meta2 = load_model(path)
    idx = torch.randint(0, 300, (1, 16))
    assert torch.equal(loaded(idx), model.eval()(idx))
    assert meta2["step"] == 7 and not loaded.training
    check_tokenizer(meta2, "ab" * 8, 300, "test")
    with pytest.raises(TokenizerMismatchError, match="300-token vocabulary"):
        check_tokenizer(meta2, None, 512, "test")
    with pytest.raises(TokenizerMismatchError, match="trained with tokenizer abab"):
        check_tokenizer(meta2, "cd" * 8, 300, "test")


class _Planted:
    """What a crafted checkpoint file holds: unpickling it would create `marker` (any code could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_every_file_loads_weights_only_and_a_crafted_pickle_is_refused(tmp_path):
    import pickle

    from core.checkpoint import CheckpointError

    random.seed(3)
    np.random.seed(3)
    path = save_checkpoint(tmp_path, 5, rank=0, world_size=1, model_state={"w": torch.ones(2)},
                           optim_state={"m": torch.ones(2)}, rank_state={"loader": {"epoch": 1}, "rng": rng_state()},
                           meta={"kind": "base"})
    for f in ("model.pt", "optim_rank0.pt", "rank0.pt"):  # RNG states are tensors and plain values
        torch.load(path / f, weights_only=True)
    marker = tmp_path / "planted"
    torch.save({"loader": _Planted(marker)}, path / "rank0.pt")
    with pytest.raises(CheckpointError, match=r"rank0\.pt cannot be loaded: it holds objects other than tensors") as e:
        load_checkpoint(path).rank_state(0)
    assert "\n" not in str(e.value) and not isinstance(e.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_a_truncated_model_file_is_a_clear_error(tmp_path):
    from core.checkpoint import CheckpointError, load_model
    from core.gpt import GPTConfig, build_model

    cfg = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    path = save_checkpoint(tmp_path, 7, rank=0, world_size=1, optim_state=None, rank_state={},
                           model_state=build_model(cfg, "cpu", torch.float32, seed=0).state_dict(),
                           meta={"model_config": cfg.to_dict(), "kind": "base"})
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt cannot be loaded: .*corrupt") as e:
        load_model(path)
    assert "does not match its own model config" not in str(e.value) and "\n" not in str(e.value)
