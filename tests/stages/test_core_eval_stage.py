"""core_eval: a real (tiny) pretrained model scored on real bundle rows, tables saved, mismatches refused."""
from __future__ import annotations

import pytest

from core.checkpoint import TokenizerMismatchError
from stages import core_eval
from pipeline.execute import execute

pytestmark = pytest.mark.slow


def test_core_eval_artifact(tiny_run):
    store, run = tiny_run
    m = run["base_eval"]
    assert m.inputs["model"] == run["base"].ref and m.inputs["bundle"] == run["eval_bundle"].ref
    assert {f.path for f in m.files} >= {"core.json", "core.csv", "core.md"}
    metrics = m.metrics
    assert metrics["n_tasks"] == 4 and set(metrics["tasks"]) == set(core_eval.PRESETS["tiny"]["tasks"])
    assert metrics["label"] == "CORE over 4/22 tasks (<= 12 examples/task)"
    assert metrics["core"] == pytest.approx(sum(t["centered"] for t in metrics["tasks"].values()) / 4, abs=1e-6)
    assert all(0.0 <= t["accuracy"] <= 1.0 and t["n_examples"] == 12 for t in metrics["tasks"].values())
    table = (store.materialize(m.ref) / "core.md").read_text()
    assert "GPT-2 124M" in table and "GPT-2 1.5B" in table and "winograd" in table


def test_core_eval_refuses_a_model_with_another_tokenizer(tiny_run, tmp_path):
    from stages import tokenizer as tok_stage

    store, run = tiny_run
    other = execute("tokenizer", tok_stage.Config(vocab_size=512, max_chars=200_000), {"data": run["data"].ref}, store)
    cfg = core_eval.Config(max_per_task=11, tasks=("winograd",))
    with pytest.raises(TokenizerMismatchError, match="tokenizer/model mismatch"):
        execute("core_eval", cfg, {"model": run["base"].ref, "tokenizer": other.ref, "bundle": run["eval_bundle"].ref}, store)


def test_config_validation():
    from stages.base import ConfigError

    with pytest.raises(ConfigError, match="max_per_task=0"):
        core_eval.Config(max_per_task=0)
    with pytest.raises(ConfigError, match="dtype"):
        core_eval.Config(dtype="int8")
    assert core_eval.Config(tasks=["a"]).tasks == ("a",)
    assert core_eval.Config().label() == "all" and core_eval.Config(max_per_task=50).label() == "max50"
