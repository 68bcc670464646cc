"""core/tasks row order: every task the reference shuffles yields its rows in the reference's order
(row i = source row numpy.random.default_rng(42).permutation(n)[i], what Hugging Face's
Dataset.shuffle(seed=42) gives), and slices take start/stop/step as the reference's Task does.

The expected orders are computed here from the source files themselves (json lines / parquet rows
and a numpy permutation), never from nanorun's own output."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.tasks.gsm8k import GSM8K
from core.tasks.humaneval import HumanEval, humaneval_file
from core.tasks.mixture import TaskSpec, build_task
from core.tasks.multiple_choice import MultipleChoice
from core.tasks.smoltalk import SmolTalk


def hf_order(n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(42).permutation(n)]


def json_lines(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_the_permutation_is_the_references_not_pythons_random():
    # the values the reference's shuffle(seed=42) gives on 100 rows (random.Random(42) gives 42, 41, 91)
    assert hf_order(100)[:3] == [59, 21, 56]


@pytest.mark.parametrize("name", ["gsm8k_train", "gsm8k_test"])
def test_gsm8k_rows_in_the_references_order(shared_data, name):
    path = shared_data / "chat" / f"{name}.jsonl"
    rows = json_lines(path)
    task = GSM8K(path)
    order = hf_order(len(rows))
    assert len(task) == len(rows)
    for i in list(range(25)) + [len(rows) - 1]:
        assert task[i]["messages"][0]["content"] == rows[order[i]]["question"], i
    # the SFT validation slice (stop=420) and a chat_eval limit name the reference's problems
    val = GSM8K(path, stop=420)
    assert len(val) == 420 and val[419]["messages"][0]["content"] == rows[order[419]]["question"]


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_rows_in_the_references_order(shared_data, name):
    path = shared_data / "eval_bundle" / "eval_data" / "world_knowledge" / f"{name}.jsonl"
    rows = json_lines(path)
    task = MultipleChoice(path)
    order = hf_order(len(rows))
    for i in range(40):
        row = rows[order[i]]
        prompt = task[i]["messages"][0]["content"]
        assert all(f"- {c}=" in prompt for c in row["choices"]), i
        assert task[i]["messages"][1]["content"] == "ABCDEFGH"[row["gold"]]


def test_mmlu_and_smoltalk_parquet_rows_in_the_references_order(tmp_path):
    n = 300  # distinct rows, so a wrong order cannot match by accident
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": [f"q{i}" for i in range(n)],
                             "choices": [[f"a{i}", f"b{i}", f"c{i}", f"d{i}"] for i in range(n)],
                             "answer": [i % 4 for i in range(n)], "subject": ["x"] * n}), mmlu)
    smol = tmp_path / "smol.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": f"u{i}"},
                                           {"role": "assistant", "content": f"a{i}"}] for i in range(n)]}), smol)
    order = hf_order(n)
    mc, st = MultipleChoice(mmlu, stop=200), SmolTalk(smol)
    assert len(mc) == 200
    for i in range(200):
        assert mc[i]["messages"][0]["content"].startswith(f"Multiple Choice question: q{order[i]}\n")
        assert st[i]["messages"][0]["content"] == f"u{order[i]}"


def test_humaneval_problems_in_the_references_order():
    rows = json_lines(humaneval_file())
    order = hf_order(len(rows))
    task = HumanEval()
    assert [task[i]["task_id"] for i in range(len(rows))] == [rows[j]["task_id"] for j in order]


def test_slices_take_start_stop_and_step_like_the_reference(shared_data):
    path = shared_data / "chat" / "gsm8k_test.jsonl"
    full = GSM8K(path)
    n = len(full)
    for start, stop, step in [(0, None, 3), (5, 100, 7), (10, 11, 5), (3, 3, 2)]:
        view = GSM8K(path, start=start, stop=stop, step=step)
        expected = list(range(start, n if stop is None else stop, step))  # Python's own slice semantics
        assert len(view) == len(expected)
        assert [view[i] for i in range(len(view))] == [full[j] for j in expected]
    spec = TaskSpec.from_dict({"task": "gsm8k", "source": "t.jsonl", "start": 1, "stop": 9, "step": 4})
    assert [t["messages"][0]["content"] for t in build_task(spec, path)] == \
           [full[1]["messages"][0]["content"], full[5]["messages"][0]["content"]]
    with pytest.raises(ValueError, match="step >= 1"):
        GSM8K(path, step=0)


def test_a_chat_eval_subset_names_the_references_problems(shared_data):
    """ChatCORE with max_problems and RL's pass@k take the first N rows of the shuffled task, as the
    reference's chat_eval / chat_rl do: the same N problems."""
    from core.eval.chat import _problems, build_eval_tasks

    gsm8k = shared_data / "chat" / "gsm8k_test.jsonl"
    arc = shared_data / "eval_bundle" / "eval_data" / "world_knowledge" / "arc_easy.jsonl"
    tasks = build_eval_tasks([{"task": "gsm8k", "source": "gsm8k_test.jsonl"},
                              {"task": "multiple_choice", "source": "arc_easy.jsonl", "name": "arc_easy"}],
                             {"gsm8k_test.jsonl": gsm8k, "arc_easy.jsonl": arc})
    rows = json_lines(gsm8k)
    order = hf_order(len(rows))
    task = tasks["gsm8k"]
    assert [task[i]["messages"][0]["content"] for i in range(_problems(task, 8))] == \
           [rows[j]["question"] for j in order[:8]]
    rows = json_lines(arc)
    order = hf_order(len(rows))
    task = tasks["arc_easy"]
    for i in range(_problems(task, 8)):
        assert task[i]["messages"][1]["content"] == "ABCDE"[rows[order[i]]["gold"]]
        assert rows[order[i]]["choices"][0] in task[i]["messages"][0]["content"]


def test_simple_spelling_picks_the_references_words(shared_data):
    """The reference reads words_alpha.txt line by line (its order is not quite sorted), shuffles
    the list with random.Random(42), and example i picks random.Random(i).choice of it (test split:
    seed 10_000_000 + i)."""
    import random

    from core.tasks.spelling import SimpleSpelling, load_words

    path = shared_data / "chat" / "words_alpha.txt"
    with open(path, encoding="utf-8") as f:
        words = [line.strip() for line in f]
    random.Random(42).shuffle(words)
    for split, offset in (("train", 0), ("test", 10_000_000)):
        task = SimpleSpelling(load_words(path), size=50, split=split)
        for i in range(50):
            word = random.Random(offset + i).choice(words)
            assert task[i]["messages"] == [{"role": "user", "content": f"Spell the word: {word}"},
                                           {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
