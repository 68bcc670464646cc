"""core/eval/chat.py: grading on planted completions (a fake engine that answers with the gold
solution scores 1.0, a wrong one 0.0), letter-logit multiple choice, ChatCORE and the table; and the
real Engine on a tiny GPT."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from core.eval.chat import (ChatEvalResult, TaskResult, build_eval_tasks, evaluate_categorical, evaluate_chat,
                            evaluate_generative, format_table)
from core.tasks.gsm8k import GSM8K
from core.tasks.multiple_choice import MultipleChoice
from core.tasks.spelling import SpellingBee
from tests._tok import small_tokenizer


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"))


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return GSM8K(shared_data / "chat" / "gsm8k_test.jsonl")


class _Model(nn.Module):
    def __init__(self, sequence_len=4096):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"sequence_len": sequence_len})()


def _reply_text(conv) -> str:
    """The gold assistant reply as the model would write it (tool output included, as the engine injects it)."""
    content = conv["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


class PlantedEngine:
    """Engine stand-in: answers each prompt with a planted reply (the gold one, or a wrong number)."""

    def __init__(self, tokenizer, task, wrong: bool = False):
        self.model, self.tokenizer, self.wrong = _Model(), tokenizer, wrong
        self.replies = {tuple(tokenizer.render_for_completion(c)): _reply_text(c) for c in task}
        self.calls = []

    def generate_batch(self, tokens, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        self.calls.append((len(tokens), num_samples, max_tokens, temperature, top_k))
        reply = self.replies[tuple(tokens)]
        if self.wrong:
            reply = reply.rsplit("####", 1)[0] + "#### 123456789"
        return [list(tokens) + self.tokenizer.encode(reply)] * num_samples, [[0] * len(tokens)] * num_samples


def test_generative_grading_on_planted_completions(tok, gsm8k, words):
    n = 6
    right = evaluate_generative(gsm8k, PlantedEngine(tok, gsm8k), tok, max_problems=n, top_k=7)
    assert (right.correct, right.total, right.accuracy, right.centered) == (n, n, 1.0, 1.0)
    wrong_engine = PlantedEngine(tok, gsm8k, wrong=True)
    wrong = evaluate_generative(gsm8k, wrong_engine, tok, max_problems=n, num_samples=3)
    assert (wrong.correct, wrong.total, wrong.accuracy) == (0, n, 0.0)
    assert wrong_engine.calls[0][1:] == (3, 512, 0.0, 50) and len(wrong.samples) == 3
    assert wrong.samples[0]["completion"].endswith("#### 123456789") and not wrong.samples[0]["correct"]
    assert gsm8k.grade(gsm8k[0], _reply_text(gsm8k[0])) == (True, "")
    bee = SpellingBee(words, size=5, split="test")
    assert evaluate_generative(bee, PlantedEngine(tok, bee), tok).accuracy == 1.0
    assert evaluate_generative(bee, PlantedEngine(tok, bee, wrong=True), tok).accuracy == 0.0


def test_a_prompt_longer_than_the_model_can_address_counts_as_wrong(tok, gsm8k):
    engine = PlantedEngine(tok, gsm8k)
    engine.model = _Model(sequence_len=8)
    res = evaluate_generative(gsm8k, engine, tok, max_problems=2)
    assert (res.correct, res.total) == (0, 2) and engine.calls == []


class LetterModel(nn.Module):
    """Logits that put `bias` on one letter at the answer position of each prompt."""

    def __init__(self, tokenizer, task, pick):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.vocab = tokenizer.vocab_size
        self.choice = {}
        for c in task:
            ids = tokenizer.render_for_completion(c)
            self.choice[tuple(ids)] = tokenizer.encode(pick(c))[0]
        self.bos = tokenizer.bos_token_id

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        for r, row in enumerate(ids.tolist()):
            while row and row[-1] == self.bos:  # strip the padding to find this prompt
                row.pop()
            logits[r, len(row) - 1, self.choice[tuple(row)]] = 10.0
            logits[r, len(row) - 1, 0] = 99.0  # a non-letter token wins overall: only letters are compared
        return logits


def test_categorical_argmax_over_the_letters(tok, tmp_path):
    f = tmp_path / "mmlu.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"Q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4})
                           for i in range(10)))
    task = MultipleChoice(f)
    gold = LetterModel(tok, task, lambda c: c["messages"][-1]["content"])
    res = evaluate_categorical(task, gold, tok, batch_size=3)
    assert (res.correct, res.total, res.baseline, res.centered) == (10, 10, 0.25, 1.0)
    wrong = LetterModel(tok, task, lambda c: "A" if c["messages"][-1]["content"] != "A" else "B")
    res = evaluate_categorical(task, wrong, tok, batch_size=4, max_problems=7)
    assert (res.correct, res.total, res.accuracy) == (0, 7, 0.0) and res.centered == pytest.approx(-1 / 3)


def _result(**tasks) -> ChatEvalResult:
    """{name: (correct, total, kind)} -> a ChatEvalResult (baseline 1/4 for categorical tasks)."""
    return ChatEvalResult({n: TaskResult(n, kind, c, t, 0.25 if kind == "categorical" else 0.0, available=t)
                           for n, (c, t, kind) in tasks.items()})


def test_chatcore_is_the_references_five_task_mean_and_nothing_else(tok, shared_data):
    cat, gen = "categorical", "generative"
    five = dict(arc_easy=(3, 4, cat), **{"ARC-Challenge": (2, 4, cat)}, mmlu=(1, 4, cat), gsm8k=(1, 4, gen),
                humaneval=(1, 2, gen))
    r = _result(**five, spelling_bee=(4, 4, gen))
    centred = [2 / 3, 1 / 3, 0.0, 0.25, 0.5]
    assert r.chatcore == pytest.approx(sum(centred) / 5) == pytest.approx(r.chatcore_partial)
    assert r.chatcore_cat == pytest.approx(1 / 3) and r.chatcore_label == "ChatCORE" and r.chatcore_missing == []
    d = r.to_dict()
    assert d["tasks"]["spelling_bee"]["chatcore_task"] is None and d["tasks"]["mmlu"]["chatcore_task"] == "MMLU"
    table = format_table(r)
    assert "spelling_bee (not in ChatCORE)" in table and table.splitlines()[-1] == f"ChatCORE: {r.chatcore:+.4f}"
    # four of five (offline: no MMLU): no ChatCORE, the partial mean under a label that says so
    partial = _result(**{k: v for k, v in five.items() if k != "mmlu"}, spelling_bee=(4, 4, gen))
    assert partial.chatcore is None and partial.chatcore_cat is None
    assert partial.chatcore_partial == pytest.approx((2 / 3 + 1 / 3 + 0.25 + 0.5) / 4)
    assert partial.chatcore_label == "ChatCORE over 4/5 tasks (missing MMLU)"
    assert format_table(partial).splitlines()[-1].startswith("ChatCORE over 4/5 tasks (missing MMLU): +0.4375")
    only_extras = _result(spelling_bee=(1, 1, gen))
    assert only_extras.chatcore_partial is None and "over 0/5" in only_extras.chatcore_label
    sampled = ChatEvalResult({"gsm8k": TaskResult("gsm8k", gen, 1, 4, 0.0, available=1319)})
    assert sampled.chatcore_label.endswith("sampled (<= 4 problems per task)")
    with pytest.raises(ValueError, match="both count as GSM8K"):
        _result(gsm8k=(1, 1, gen), GSM8K=(1, 1, gen)).chatcore
    tasks = build_eval_tasks([{"task": "gsm8k", "source": "g.jsonl", "stop": 3},
                              {"task": "spelling_bee", "size": 4, "split": "test"}, {"task": "humaneval", "stop": 2}],
                             {"g.jsonl": shared_data / "chat" / "gsm8k_test.jsonl"})
    assert list(tasks) == ["gsm8k", "spelling_bee", "humaneval"] and len(tasks["gsm8k"]) == 3
    with pytest.raises(ValueError, match="cannot be evaluated"):
        build_eval_tasks([{"task": "chitchat", "stop": 2}], {})


def test_chatcore_tasks_are_centred_on_the_references_baselines(tok, tmp_path):
    """ARC questions with 3 or 5 choices still count against 0.25, as in the reference."""
    from core.eval.chat import chatcore_metrics

    f = tmp_path / "arc.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"Q{i}", "choices": ["a", "b", "c"], "answer": 0})
                           for i in range(4)))
    task = MultipleChoice(f)
    model = LetterModel(tok, task, lambda c: c["messages"][-1]["content"])
    res = evaluate_chat(model, tok, {"arc_easy": task, "other": MultipleChoice(f)}, log=None)
    assert res.tasks["arc_easy"].baseline == 0.25 and res.tasks["other"].baseline == pytest.approx(1 / 3)
    rec = chatcore_metrics(model, tok, {"ARC-Easy": task}, max_cat=2, log=None)
    assert rec == {"chatcore_metric": None, "chatcore_partial": 1.0, "chatcore_cat": None, "chatcore/ARC-Easy": 1.0}


def test_the_real_engine_on_a_tiny_gpt(tok, gsm8k):
    """The whole path with a real model: prompt rendering, KV-cached generation, decoding, grading."""
    from core.gpt import GPTConfig, build_model

    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = build_model(cfg, "cpu", torch.float32, seed=0).eval()
    res = evaluate_chat(model, tok, {"gsm8k": gsm8k}, max_problems=2, max_new_tokens=8, log=None)
    t = res.tasks["gsm8k"]
    assert t.total == 2 and t.correct == 0 and t.kind == "generative" and len(t.samples) == 2


@pytest.fixture(scope="module")
def words():
    return ["strawberry", "apple", "banana"]
