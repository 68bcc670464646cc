"""core/train/rl.py: the objective on synthetic tensors (group advantages, masking of prompt and forced
tool-output tokens, token-level normalisation), pass@k; and the real trainer as a subprocess on a
tiny chat checkpoint: SIGKILL after its first checkpoint and resume -> bit-identical weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from core.checkpoint import save_checkpoint
from core.gpt import build_model
from core.scaling import derive
from core.train.config import PretrainConfig
from core.train.common import tokenizer_record
from core.train.telemetry import read_metrics
from core.train.config import RLConfig
from core.train.rl import group_advantages, lr_multiplier, pass_at_k, pg_loss, rollout_seed, rollout_tensors
from tests.train_helpers import REPO, assert_states_equal, kill_after, make_tokenizer_dir, trainer_env


def test_advantage_is_reward_minus_group_mean_without_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert adv.tolist() == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages(torch.ones(3)).abs().sum() == 0  # all right (or all wrong): nothing to learn


def test_prompt_forced_tool_output_and_padding_are_never_targets():
    # prompt 10 11 12 | sampled 20 21 | forced (calculator output) 30 31 | sampled 22
    seqs = [[10, 11, 12, 20, 21, 30, 31, 22], [10, 11, 12, 23]]
    masks = [[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1]]
    inputs, targets = rollout_tensors(seqs, masks, pad=99, device="cpu")
    assert inputs.tolist() == [[10, 11, 12, 20, 21, 30, 31], [10, 11, 12, 23, 99, 99, 99]]
    assert targets.tolist() == [[-1, -1, 20, 21, -1, -1, 22], [-1, -1, 23, -1, -1, -1, -1]]


def test_pg_loss_is_token_level_and_weights_logp_by_advantage():
    targets = torch.tensor([[-1, 5, 6, -1], [-1, 7, -1, -1]])
    nll = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]], requires_grad=True)  # 0 where ignored
    adv = torch.tensor([0.5, -0.5])
    loss = pg_loss(nll, targets, adv)
    # -(sum of logp x adv) / 3 trained tokens = -((-1 - 2) x 0.5 + (-3) x -0.5) / 3 = 0
    assert loss.item() == pytest.approx(0.0)
    loss.backward()  # d loss / d nll = adv / 3: raise the likelihood of the better-than-average reply
    assert torch.allclose(nll.grad, torch.tensor([[1 / 6] * 4, [-1 / 6] * 4]))
    assert pg_loss(torch.zeros(1, 3), torch.full((1, 3), -1), torch.ones(1)).item() == 0.0  # nothing to train


def test_pass_at_k_seeds_and_schedule():
    assert pass_at_k([[False, True, False], [False, False, False], [True, False, False]], 3) == [1.0, 2.0, 2.0]
    assert rollout_seed(42, 3, 7) == rollout_seed(42, 3, 7) != rollout_seed(42, 4, 7)
    assert [lr_multiplier(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="not a multiple of device_batch_size"):
        RLConfig(num_samples=6, device_batch_size=4)
    assert RLConfig(num_samples=2, device_batch_size=8).num_samples == 2  # one pass of 2


# ---- the real trainer ------------------------------------------------------------------------------


def _teach_the_answer_format(model, tokenizer, steps: int = 60) -> None:
    """A few Adam steps on '#### 5' / '#### 7' replies, so that sampled replies are graded right about
    half of the time: mixed rewards in every group, non-zero advantages, real gradients."""
    from core.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(tokenizer)
    prompt = tok.render_for_completion(QUESTION)
    end = tok.encode_special("<|assistant_end|>")
    rows = [prompt + tok.encode(f"#### {n}") + [end] for n in (5, 7)]
    ids = torch.tensor(rows)
    targets = ids[:, 1:].clone()
    targets[:, :len(prompt) - 1] = -1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(ids[:, :-1], targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


QUESTION = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                         {"role": "assistant", "content": "2 + 3 = <<2+3=5>>5\n#### 5"}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    """A tiny 'sft' checkpoint (d2) that answers '#### 5' or '#### 7' at random, a real tokenizer, and
    GSM8K-format files of one question whose answer is 5."""
    root = tmp_path_factory.mktemp("rl-inputs")
    tok_dir = make_tokenizer_dir(root / "tok", shared_data / "corpus")
    plan = derive(PretrainConfig(depth=2, head_dim=64, max_seq_len=64, num_iterations=2, total_batch_size=256), 1024)
    model = build_model(plan.model_config(), "cpu", torch.float32, seed=0)
    _teach_the_answer_format(model, tok_dir)
    base = save_checkpoint(root / "sft", 3, rank=0, world_size=1, model_state=model.state_dict(), optim_state={},
                           rank_state={}, meta={"kind": "sft", "model_config": plan.model_config().to_dict(),
                                                "tokenizer": tokenizer_record(tok_dir, 1024, "tok-fp"),
                                                "identity": {"depth": 2}})
    row = json.dumps({"question": QUESTION["messages"][0]["content"], "answer": "2 + 3 = <<2+3=5>>5\n#### 5"})
    for split in ("train", "test"):
        (root / f"gsm8k_{split}.jsonl").write_text((row + "\n") * 8)
    return base, tok_dir, root


def rl_cmd(inputs, out, *flags):
    base, tok, chat = inputs
    return [sys.executable, "-m", "core.train.rl", "--base-checkpoint", str(base), "--tokenizer-dir", str(tok),
            "--train-file", str(chat / "gsm8k_train.jsonl"), "--test-file", str(chat / "gsm8k_test.jsonl"),
            "--out", str(out), "--tokenizer-fingerprint", "tok-fp", "--num-iterations", "3", "--examples-per-step",
            "2", "--num-samples", "2", "--device-batch-size", "1", "--max-new-tokens", "24", "--eval-every", "2",
            "--eval-examples", "2", "--eval-samples", "2", "--save-every", "1", "--wandb", "disabled",
            "--device-type", "cpu", "--dtype", "float32", *flags]


def run(cmd, timeout=240):
    return subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)


def test_sigkill_after_a_checkpoint_then_resume_gives_identical_weights(inputs, tmp_path):
    a = tmp_path / "a"
    r = run(rl_cmd(inputs, a))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = lambda out, kind: [x for x in read_metrics(out / "metrics.jsonl") if x["kind"] == kind]  # noqa: E731
    assert [x["step"] for x in rows(a, "rollout")] == [1, 2, 3]
    assert [x["step"] for x in rows(a, "passk")] == [0, 2, 3] and set(rows(a, "passk")[0]) >= {"pass@1", "pass@2"}
    assert [x["lrm"] for x in rows(a, "rollout")] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert all(x["sequence_length"] > 0 for x in rows(a, "rollout"))
    assert 0 < sum(x["reward"] for x in rows(a, "rollout")) < 3  # mixed rewards ...
    assert any(x["raw_loss"] != 0 for x in rows(a, "train"))  # ... within a group: a real gradient

    b = tmp_path / "b"
    assert kill_after(rl_cmd(inputs, b), b / "checkpoints" / "step_000001" / "meta.json", tmp_path / "b.log") == -9
    assert not (b / "checkpoints" / "step_000003").exists()
    r = run(rl_cmd(inputs, b))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout
    for f in ("model.pt", "optim_rank0.pt"):
        assert_states_equal(torch.load(a / "checkpoints" / "step_000003" / f, weights_only=True),
                            torch.load(b / "checkpoints" / "step_000003" / f, weights_only=True), f)
    assert [x["raw_loss"] for x in rows(b, "train")] == [x["raw_loss"] for x in rows(a, "train")]
    assert [x["reward"] for x in rows(b, "rollout")] == [x["reward"] for x in rows(a, "rollout")]
    assert [x["step"] for x in rows(b, "passk")] == [0, 2, 3]  # each eval once
    meta = json.loads((b / "checkpoints" / "step_000003" / "meta.json").read_text())
    assert meta["kind"] == "rl" and meta["tokenizer"] == {"fingerprint": "tok-fp", "vocab_size": 1024}
    # another recipe in the same directory is refused with the reason
    r = run(rl_cmd(inputs, b, "--num-samples", "4"))
    assert r.returncode == 2 and "the identity config differs" in r.stderr and "num_samples" in r.stderr
