"""report: the run report and the leaderboard row from the manifests of a (tiny) speedrun."""
from __future__ import annotations

import pytest

from stages import report
from pipeline.execute import execute
from tests.conftest import png_size

pytestmark = pytest.mark.slow


def test_report_of_the_tiny_speedrun(tiny_run):
    store, run = tiny_run
    m = run["report"]
    s = m.metrics
    assert s["preset"] == "tiny" and s["depth"] == 2 and s["iterations"] == run["base"].metrics["iterations"]
    assert s["val_bpb"] == run["base"].metrics["final_val_bpb"] and s["core"] == run["base_eval"].metrics["core"]
    assert s["core_n_tasks"] == 4 and s["core_complete"] is False and s["time_to_gpt2_s"] is None
    assert set(s["stage_seconds"]) == {"data", "tokenizer", "eval_bundle", "base", "base_eval", "sft",
                                    "chat_eval", "export"}
    chat = run["chat_eval"].metrics  # offline: no MMLU, so no ChatCORE; the partial mean under its label
    assert chat["chatcore"] is None and chat["chatcore_label"].startswith("ChatCORE over 4/5 tasks (missing MMLU)")
    assert s["chat"] == {"chatcore_partial": chat["chatcore_partial"],
                         **{f"{t} accuracy": r["accuracy"] for t, r in chat["tasks"].items()}}
    assert s["chatcore_label"] == chat["chatcore_label"]
    assert s["total_seconds"] == pytest.approx(sum(s["stage_seconds"].values()), abs=0.01)
    assert s["artifacts"]["base"] == str(run["base"].ref)
    assert s["training_time_s"] == run["base"].metrics["training_time_s"] > 0  # pretraining's own time
    d = store.materialize(m.ref)
    md = (d / "report.md").read_text()
    assert "pretraining time " in md and "CORE over 4/22 tasks" in md and "GPT-2 1.5B" in md and str(run["base"].ref) in md
    assert f"| {chat['chatcore_label']} |" in md and "| chat: spelling_bee accuracy (not in ChatCORE) |" in md
    for name in ("loss.png", "core.png", "throughput.png"):
        assert f"]({name})" in md
        w, h = png_size(d / name)
        assert w >= 800 and h >= 300


def test_partial_report_needs_only_the_base_model(tiny_run):
    store, run = tiny_run
    m = execute("report", report.Config(recipe="partial"), {"base": run["base"].ref}, store)
    assert m.metrics["core"] is None and m.metrics["core_label"] is None
    assert set(m.metrics["stage_seconds"]) == {"base"}
    assert "core.png" not in {f.path for f in m.files}
