"""core/train/sft.py: best-fit packing with padding (never cropping a conversation), the packer's
exact state, the optimizer warm start and its re-sharding, the LR schedule; and the real trainer as a
subprocess on a tiny base model: SIGKILL after a checkpoint and resume -> bit-identical weights."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.checkpoint import load_checkpoint, save_checkpoint
from core.gpt import build_model
from core.optim import build_optimizer, shard_state, unshard_state
from core.scaling import derive
from core.train.config import PretrainConfig
from core.train.common import tokenizer_record
from core.train.telemetry import read_metrics
from core.train.sft import (Packer, SFTConfig, batches_per_pass, lr_multiplier, muon_momentum,
                            warm_start_optimizer)
from tests.train_helpers import REPO, assert_states_equal, kill_after, make_tokenizer_dir, trainer_env

BOS = 7


def conv(n: int, tag: int, trained: bool = True):
    """A fake rendered conversation of n tokens: BOS, then `tag`; mask 1 on the second half."""
    ids = np.full(n, tag, dtype=np.int32)
    ids[0] = BOS
    mask = np.zeros(n, dtype=np.int8)
    if trained:
        mask[n // 2:] = 1
    return ids, mask


def test_packing_is_best_fit_never_crops_and_pads_with_ignored_targets():
    lengths = [5, 9, 3, 8, 2, 6, 4, 9, 1 + 1, 7]
    convs = [conv(n, 100 + i) for i, n in enumerate(lengths)]
    p = Packer(convs, batch_size=2, cap=10, bos=BOS, buffer_size=4, cycle=False)
    assert p.next_row() == [1]             # 9 is the largest that fits in 10 (buffer: 5, 9, 3, 8)
    seen = [1]
    x, y = p.next_batch()
    assert x.shape == y.shape == (2, 9) and x.dtype == y.dtype == torch.int64
    batches = [(x, y)]
    while (b := p.next_batch()) is not None:
        batches.append(b)
    for x, y in batches:
        for r in range(x.shape[0]):
            last = int(y[r, -1])  # a conversation's last token is always trained here: -1 means padding
            row = x[r].tolist() + [last if last != -1 else BOS]
            # every conversation appears whole and contiguous: tags never split across rows
            tags = [t for t in row if t >= 100]
            for tag in set(tags):
                assert tags.count(tag) == lengths[tag - 100] - 1, (row, tag)
                seen.append(tag - 100)
            used = sum(lengths[t - 100] for t in set(tags))
            assert row[used:] == [BOS] * (10 - used)                 # padding is BOS ...
            assert (y[r, max(used - 1, 0):] == -1).all()             # ... and never a target
    assert sorted(seen) == list(range(len(lengths)))                 # everything packed exactly once
    x, y = Packer([conv(4, 100)], 1, 10, BOS, 4, cycle=False).next_batch()
    assert y[0].tolist() == [-1, 100, 100, -1, -1, -1, -1, -1, -1]   # mask[1:]: second half trained


def test_packer_state_resumes_exactly_and_pass_count():
    rng = np.random.default_rng(0)
    convs = [conv(int(n), 100 + i) for i, n in enumerate(rng.integers(2, 40, size=57))]
    a = Packer(convs, 3, 48, BOS, 10)
    for _ in range(5):
        a.next_batch()
    b = Packer(convs, 3, 48, BOS, 10, state=json.loads(json.dumps(a.state_dict())))
    for _ in range(12):  # past the end of the first pass: the share cycles
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    n = batches_per_pass(convs, 3, 48, 10)
    c = Packer(convs, 3, 48, BOS, 10)
    for _ in range(n - 1):
        c.next_batch()
    assert c.packed < len(convs)
    c.next_batch()
    assert c.packed >= len(convs)
    with pytest.raises(ValueError, match="got no conversations"):
        Packer([], 2, 10, BOS, 4)


def test_schedule():
    cfg = SFTConfig(warmdown_ratio=0.5, final_lr_frac=0.0)
    assert [lr_multiplier(cfg, s, 10) for s in (0, 5, 6, 8, 10)] == pytest.approx([1, 1, 0.8, 0.4, 0.0])
    warm = SFTConfig(warmup_ratio=0.2, warmdown_ratio=0.0)
    assert lr_multiplier(warm, 1, 10) == pytest.approx(0.5) and lr_multiplier(warm, 9, 10) == 1.0
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.9) and muon_momentum(999) == 0.95
    with pytest.raises(ValueError, match="warmup_ratio"):
        SFTConfig(warmup_ratio=0.6, warmdown_ratio=0.6)


def _tiny_model_and_optimizer(seed=0):
    plan = derive(PretrainConfig(depth=2, head_dim=64, max_seq_len=64, num_iterations=2, total_batch_size=256), 1024)
    model = build_model(plan.model_config(), "cpu", torch.float32, seed=seed)
    opt = build_optimizer(model, plan, distributed=False)
    x = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(seed))
    model(x, x).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return plan, model, opt


def test_optimizer_state_reshards_across_process_counts():
    _, model, opt = _tiny_model_and_optimizer()
    groups = opt.param_groups
    full = opt.state_dict()["state"]
    for world in (2, 3):
        shards = [{"state": shard_state(full, groups, r, world)} for r in range(world)]
        muon = next(i for i, g in enumerate(groups) if g["kind"] == "muon")
        first = sum(len(g["params"]) for g in groups[:muon])
        n = len(groups[muon]["params"])
        assert shards[0]["state"][first]["momentum_buffer"].shape[0] == -(-n // world)  # DistMuonAdamW's chunk
        back = unshard_state(shards, groups)
        assert_states_equal({k: full[k] for k in back}, back, f"world {world}")
        assert set(back) == set(full)


def test_warm_start_loads_the_base_optimizer_buffers(tmp_path):
    plan, model, opt = _tiny_model_and_optimizer()
    path = save_checkpoint(tmp_path / "ck", 2, rank=0, world_size=1, model_state=model.state_dict(),
                           optim_state=opt.state_dict(), rank_state={}, meta={"kind": "base"})
    fresh = build_optimizer(model, plan, distributed=False, matrix_lr=0.123)
    msg = warm_start_optimizer(fresh, load_checkpoint(path), 0, 1, torch.device("cpu"))
    assert "warm start" in msg and "same process count" in msg
    assert_states_equal(opt.state_dict()["state"], fresh.state_dict()["state"], "state")
    assert {g["lr"] for g in fresh.param_groups if g["kind"] == "muon"} == {0.123}  # this run's LRs stay
    (path / "optim_rank0.pt").unlink()
    assert "fresh optimizer" in warm_start_optimizer(fresh, load_checkpoint(path), 0, 1, torch.device("cpu"))


# ---- the real trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    """A tiny base checkpoint (d2, context 64, one optimizer step so there is state to warm-start
    from), a real tokenizer, and a mixture of real chat data with tool calls."""
    root = tmp_path_factory.mktemp("sft-inputs")
    tok_dir = make_tokenizer_dir(root / "tok", shared_data / "corpus")
    plan, model, opt = _tiny_model_and_optimizer()
    base = save_checkpoint(root / "base", 1, rank=0, world_size=1, model_state=model.state_dict(),
                           optim_state=opt.state_dict(), rank_state={},
                           meta={"kind": "base", "model_config": plan.model_config().to_dict(),
                                 "tokenizer": tokenizer_record(tok_dir, 1024, "tok-fp"), "plan": plan.to_dict(),
                                 "device_batch_size": 2, "identity": {"depth": 2},
                                 "run_config": {"embedding_lr": 0.1, "unembedding_lr": 0.004, "matrix_lr": 0.005,
                                                "scalar_lr": 0.01}})
    words = root / "words.txt"
    words.write_text("strawberry\napple\nbanana\nkiwi\n")
    chat = shared_data / "chat"
    mixture = {"train": [{"task": "conversations", "source": "identity", "stop": 12},
                         {"task": "gsm8k", "source": "gsm8k_train.jsonl", "stop": 12},
                         {"task": "spelling_bee", "source": "words.txt", "size": 8}],
               "val": [{"task": "gsm8k", "source": "gsm8k_test.jsonl", "stop": 6}], "seed": 42,
               "paths": {"identity": str(chat / "identity_conversations.jsonl"),
                         "gsm8k_train.jsonl": str(chat / "gsm8k_train.jsonl"),
                         "gsm8k_test.jsonl": str(chat / "gsm8k_test.jsonl"), "words.txt": str(words)}}
    (root / "mixture.json").write_text(json.dumps(mixture))
    return base, tok_dir, root / "mixture.json"


def sft_cmd(inputs, out, *flags):
    base, tok, mixture = inputs
    return [sys.executable, "-m", "core.train.sft", "--base-checkpoint", str(base), "--tokenizer-dir", str(tok),
            "--mixture", str(mixture), "--out", str(out), "--tokenizer-fingerprint", "tok-fp",
            "--max-seq-len", "128", "--device-batch-size", "2", "--total-batch-size", "512", "--eval-every", "3",
            "--save-every", "3", "--eval-tokens", "1024", "--wandb", "disabled", "--device-type", "cpu", *flags]


def run(cmd, timeout=240):
    return subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_identical_weights(inputs, tmp_path):
    a = tmp_path / "a"
    r = run(sft_cmd(inputs, a))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "optimizer warm start: " in r.stdout and "(same process count)" in r.stdout
    start = next(x for x in read_metrics(a / "metrics.jsonl") if x["kind"] == "start")
    steps = start["derived"]["num_iterations"]
    data = start["derived"]["data"]
    assert steps >= 7 and start["derived"]["grad_accum_steps"] == 2
    assert data["mixture_counts"] == {"identity": 12, "gsm8k": 12, "spelling_bee": 8}
    assert data["conversations"] + data["skipped"] == 32 and data["trained_tokens"] > 0

    b = tmp_path / "b"
    assert kill_after(sft_cmd(inputs, b), b / "checkpoints" / "step_000003" / "meta.json", tmp_path / "b.log") == -9
    assert not (b / "checkpoints" / f"step_{steps:06d}").exists()
    r = run(sft_cmd(inputs, b))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout
    final = f"step_{steps:06d}"
    for f in ("model.pt", "optim_rank0.pt"):
        assert_states_equal(torch.load(a / "checkpoints" / final / f, weights_only=True),
                            torch.load(b / "checkpoints" / final / f, weights_only=True), f)
    rows = lambda out, kind: [x for x in read_metrics(out / "metrics.jsonl") if x["kind"] == kind]  # noqa: E731
    assert [x["raw_loss"] for x in rows(b, "train")] == [x["raw_loss"] for x in rows(a, "train")]
    assert [x["step"] for x in rows(b, "val")] == sorted({*range(0, steps, 3), steps})  # each eval once
    assert [x["val_loss"] for x in rows(b, "val")] == [x["val_loss"] for x in rows(a, "val")]
    meta = json.loads((b / "checkpoints" / final / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["tokenizer"] == {"fingerprint": "tok-fp", "vocab_size": 1024}
    assert meta["model_config"]["n_layer"] == 2 and meta["base"]["step"] == 1
    val = rows(a, "val")
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # it learns the chat format

    # killed after the final checkpoint, before its done row: the rerun finds nothing to train and
    # still writes the done row the stage reads its training time from
    kept = [x for x in read_metrics(b / "metrics.jsonl") if x["kind"] != "done"]
    (b / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))
    assert run(sft_cmd(inputs, b)).returncode == 0
    done = rows(b, "done")
    assert len(done) == 1 and done[0]["training_time"] is not None and done[0]["val_loss"] == val[-1]["val_loss"]

    # another recipe in the same directory is refused with the reason
    r = run(sft_cmd(inputs, b, "--matrix-lr", "0.05"))
    assert r.returncode == 2 and "the identity config differs" in r.stderr and "matrix_lr" in r.stderr


def test_a_tokenizer_the_base_was_not_trained_with_is_refused(inputs, tmp_path):
    r = run([*sft_cmd(inputs, tmp_path / "x"), "--tokenizer-fingerprint", "other-fp"])
    assert r.returncode == 2 and "tokenizer/model mismatch" in r.stderr
