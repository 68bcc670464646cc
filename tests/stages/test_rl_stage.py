"""rl stage: the GSM8K sources as identity (content digests, paths runtime), config errors; through the
CLI on the tiny speedrun's sft model (the committed layout, the curves, kind "rl"); bad inputs (no
GSM8K: one line, exit 2; a pretrain base: warned); and the tiny speedrun with RL on (chat_eval and
export take the rl model, the report shows its curves) whose rerun is fully cached."""
from __future__ import annotations

import json
import logging

import pytest

from core.checkpoint import load_checkpoint
from core.layouts import model_checkpoint
from stages import rl
from stages.base import ConfigError
from pipeline.execute import execute
from pipeline.plan import plan_rows, run_pipeline
from tests.conftest import png_size


def test_identity_is_the_gsm8k_content_and_config_errors(shared_data, tmp_path):
    chat = shared_data / "chat"
    cfg = rl.preset("tiny", data_dir=str(chat))
    ident = cfg.identity_dict()
    assert "data_dir" not in ident and set(ident["source_digests"]) == {"gsm8k_train.jsonl", "gsm8k_test.jsonl"}
    assert ident["num_samples"] == 2 and ident["temperature"] == 1.0 and ident["init_lr_frac"] == 0.05
    assert rl.preset("tiny", data_dir=str(chat), omp_threads=1, eval_every=5).identity_dict() == ident  # runtime only
    assert rl.preset("tiny", data_dir=str(chat), nproc=2).identity_dict() != ident  # the world size is identity
    gpu = rl.preset("d20")
    assert (gpu.examples_per_step, gpu.num_samples, gpu.max_new_tokens, gpu.top_k, gpu.nproc) == (16, 16, 256, 50, 8)
    assert gpu.train_source.startswith("https://") and gpu.source_digests == {}  # an URL identifies itself
    for kw, msg in [(dict(data_dir=str(tmp_path)), "gsm8k_train.jsonl does not exist"),
                    (dict(), "set data_dir"),
                    (dict(data_dir=str(chat), examples_per_step=3, nproc=2), "not a multiple of the 2 process"),
                    (dict(data_dir=str(chat), num_samples=6, device_batch_size=4), "rl.num_samples=6"),
                    (dict(data_dir=str(chat), init_lr_frac=0), "rl.init_lr_frac")]:
        with pytest.raises(ConfigError, match=msg):
            rl.preset("tiny", **kw)


@pytest.fixture(scope="module")
def rl_store(tiny_run, tmp_path_factory):
    """A fresh store holding the tiny speedrun's artifacts up to sft (its own aliases)."""
    from artifacts import open_store

    shared, run = tiny_run
    store = open_store(str(tmp_path_factory.mktemp("rl-store")))
    for step in ("sft", "base_eval", "eval_bundle"):
        shared.push(run[step].ref, store, with_inputs=True)
    return store, run


def _cli(store, *args) -> int:
    import cli.main as cli

    return cli.main(["--store", store.url, "stage", "rl", "--preset", "tiny", *args])


def test_missing_gsm8k_is_one_line_exit_2(rl_store, tmp_path, capsys):
    store, run = rl_store
    code = _cli(store, "--set", f"data_dir={tmp_path}", "--input", f"base={run['sft'].ref}", "--input",
                f"tokenizer={run['tokenizer'].ref}")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("nanorun stage")]
    assert code == 2 and len(lines) == 1 and "gsm8k_train.jsonl does not exist" in lines[0], lines
    assert store.refs("rl") == []


def test_stage_rl_commits_an_rl_model_and_warns_on_a_pretrain_base(rl_store, shared_data, monkeypatch):
    # no capsys here: the CLI starts Prefect, whose console handler would keep capsys's closed stream
    store, run = rl_store
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")
    code = _cli(store, "--set", f"data_dir={shared_data / 'chat'}", "--input", f"base={run['sft'].ref}", "--input",
                f"tokenizer={run['tokenizer'].ref}")
    assert code == 0
    m = store.require(store.resolve("rl@latest"))
    mt = m.metrics
    assert mt["iterations"] == 2 and [r[0] for r in mt["reward_curve"]] == [1, 2]
    assert [p[0] for p in mt["passk_curve"]] == [0, 1, 2] and set(mt["final_passk"]) == {"pass@1", "pass@2"}
    assert mt["base_kind"] == "sft" and 0 <= mt["final_reward"] <= 1 and mt["attempts"] == 1
    files = {f.path for f in m.files}
    assert {"checkpoint.json", "run.json", "metrics.jsonl", "train.log", "rl_curve.png"} <= files
    assert not any(f.startswith("checkpoints/step_000001") for f in files)  # the final checkpoint only
    path = store.materialize(m.ref)
    assert png_size(path / "rl_curve.png")[0] > 0
    meta = load_checkpoint(model_checkpoint(path)).meta
    assert meta["kind"] == "rl" and meta["tokenizer"]["fingerprint"] == run["tokenizer"].ref.fingerprint

    # a pretrain base is allowed, with a warning (1 step, no eval before the end)
    warnings = logging.Handler(logging.WARNING)
    warnings.emit = lambda record: seen.append(record.getMessage())  # the CLI's logging setup stops propagation
    seen: list[str] = []
    logging.getLogger("nanorun.rl").addHandler(warnings)
    try:
        b = execute("rl", rl.preset("tiny", data_dir=str(shared_data / "chat"), num_iterations=1, eval_every=-1),
                    {"base": run["base"].ref, "tokenizer": run["tokenizer"].ref}, store)
    finally:
        logging.getLogger("nanorun.rl").removeHandler(warnings)
    assert b.metrics["base_kind"] == "base" and any("not chat-tuned" in m for m in seen), seen


def test_tiny_speedrun_with_rl_on_and_a_cached_rerun(rl_store, shared_data, capsys):
    from pipeline.recipes import speedrun_steps

    store, run = rl_store
    steps = speedrun_steps("tiny", {"rl": {"enabled": True}}, eval_bundle=str(shared_data / "eval_bundle"),
                           chat_data=str(shared_data / "chat"))
    assert {s.name: s.inputs.get("model") for s in steps if s.name in ("chat_eval", "export")} == \
        {"chat_eval": "rl", "export": "rl"}
    out = run_pipeline(steps, store)
    assert out["sft"].ref == run["sft"].ref  # the upstream artifacts are the session's
    assert out["chat_eval"].metrics["model_kind"] == "rl" and out["export"].metrics["kind"] == "rl"
    assert out["export"].metrics["model"] == str(out["rl"].ref)
    report = store.materialize(out["report"].ref)
    md = (report / "report.md").read_text()
    assert "## RL (GSM8K)" in md and "![rl](rl.png)" in md and png_size(report / "rl.png")[0] > 0
    assert json.loads((report / "summary.json").read_text())["rl"]["iterations"] == 2
    card = (store.materialize(out["export"].ref) / "README.md").read_text()
    assert "reinforcement learning" in card
    from cli.chat_commands import find_chat_model

    assert find_chat_model(str(out["rl"].ref), store).kind == "rl"  # `nanorun chat` / serve load it as a chat model
    assert {r.status for r in plan_rows(steps, store)} == {"cached"}
    import cli.main as cli  # `stage rl --recipe tiny`: the recipe's rl step, on because it is the one asked for

    assert cli.main(["--store", store.url, "stage", "rl", "--recipe", "tiny", "--eval-bundle",
                     str(shared_data / "eval_bundle"), "--chat-data", str(shared_data / "chat"), "--plan"]) == 0
    assert capsys.readouterr().out.split() == [str(out["rl"].ref), "cached"]
    # off by default: the graph is the one without RL
    assert "rl" not in [s.name for s in speedrun_steps("tiny", chat_data=str(shared_data / "chat"))]
