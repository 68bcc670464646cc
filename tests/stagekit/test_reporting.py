"""The run report's content from synthetic manifests (stagekit/reporting.py, stages/report.py): fast."""
from __future__ import annotations

import json

import pytest

from artifacts.manifest import Manifest
from core.eval.core import GPT2_REFERENCE, centered
from stages.report import loss_figure, resume_steps, throughput_figure
from stagekit.reporting import render_markdown, summarize

TASKS = {"hellaswag": 0.25, "arc_easy": 0.25, "piqa": 0.5, "copa": 0.5}  # task -> random baseline


def _manifest(stage, identity=None, metrics=None, provenance=None):
    return Manifest(stage, "x", "f" * 16, "1", identity or {}, {}, {}, [], metrics or {}, provenance or {})


def _run(core_tasks=TASKS, total=22):
    base = _manifest("pretrain", {"depth": 2}, {"final_val_bpb": 2.1, "loss_curve": [[1, 5.0], [10, 4.0]],
                                                "val_bpb_curve": [[10, 2.1]]},
                     {"end_time": "2026-12-05T14:38:12.123456+00:00", "resumed": True})
    tasks = {t: {"centered": 0.01, "random_baseline": b, "accuracy": 0.3} for t, b in core_tasks.items()}
    core = _manifest("core_eval", metrics={"core": 0.0694, "label": f"CORE over {len(tasks)}/{total} tasks",
                                           "n_tasks": len(tasks), "total_tasks": total, "tasks": tasks})
    return {"base": base, "base_eval": core}


def _value(md: str, row_start: str) -> str:
    line = next(x for x in md.splitlines() if x.startswith(row_start))
    return line.rsplit("|", 2)[1].strip()


def test_partial_core_is_compared_with_gpt2_on_the_same_tasks():
    manifests = _run()
    md = render_markdown(summarize(manifests, "tiny"), manifests, "t")
    same = sum(centered(GPT2_REFERENCE["GPT-2 124M"][t], b) for t, b in TASKS.items()) / len(TASKS)
    assert float(_value(md, "| GPT-2 124M CORE over the same 4 tasks (all 22: 0.113891)")) == pytest.approx(same, abs=1e-6)
    assert "| GPT-2 1.5B CORE over the same 4 tasks" in md
    assert "| GPT-2 124M CORE | 0.113891 |" not in md  # the whole-metric number is not beside a 4-task score


def test_full_core_is_compared_with_gpt2_full_core():
    manifests = _run({t: 0.25 for t in GPT2_REFERENCE["GPT-2 124M"]}, total=22)
    md = render_markdown(summarize(manifests, "tiny"), manifests, "t")
    assert "| GPT-2 124M CORE | 0.113891 |" in md and "| GPT-2 1.5B CORE | 0.256525 |" in md


def test_stage_table_shows_minutes_not_a_full_iso_stamp():
    manifests = _run()
    md = render_markdown(summarize(manifests, "tiny"), manifests, "t")
    row = next(x for x in md.splitlines() if x.startswith("| base |"))
    assert row.endswith("| 2026-12-05 14:38 (resumed) |")
    assert "finished 2026-12-05 14:38" in md


def test_resumed_run_charts_mark_the_resume(tmp_path):
    rows = [{"kind": "start", "step": 0, "resumed": False}, {"kind": "train", "step": 5, "tok_per_s": 100.0, "mfu": 1.0},
            {"kind": "start", "step": 6, "resumed": True}, {"kind": "train", "step": 8, "tok_per_s": 110.0, "mfu": 1.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert resume_steps(tmp_path) == [6]
    for fig in (loss_figure(_run()["base"], [6]), throughput_figure(tmp_path, [6])):
        marks = [ln for ax in fig.axes for ln in ax.lines if ln.get_label() == "resumed"]
        assert marks and list(marks[0].get_xdata()) == [6, 6]
    manifests = _run()
    md = render_markdown(summarize(manifests, "tiny"), manifests, "t", {"loss": "loss.png"}, resumes=[6])
    assert "resumed at step 6" in md


def test_recipe_digest_is_every_override_but_not_where_inputs_were_read_from():
    from stagekit.reporting import recipe_digest

    def run(steps, bundle_url="/a/eval_bundle", digest="sha256:1", source="chitchat"):
        return {"data": _manifest("data_shards", {"source": source, "content_digest": ""}),
                "eval_bundle": _manifest("eval_bundle", {"url": bundle_url, "content_digest": digest}),
                "base": _manifest("pretrain", {"depth": 2, "num_iterations": steps})}

    assert recipe_digest(run(24)) == recipe_digest(run(24, bundle_url="/elsewhere/eval_bundle"))
    assert recipe_digest(run(24)) != recipe_digest(run(600))
    assert recipe_digest(run(24)) != recipe_digest(run(24, digest="sha256:2"))
    assert recipe_digest(run(24)) != recipe_digest(run(24, source="fineweb-edu"))  # no digest: the source is it
