"""Speedrun recipes: presets build valid pipelines; overrides and shortcuts land where they say."""
from __future__ import annotations

import pytest

from pipeline.recipes import PRESETS, SPEEDRUN_GRAPH, merge, parse_set, speedrun_steps
from stages.base import ConfigError
from pipeline.execute import artifact_ref
from tests.conftest import REPO


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_a_valid_pipeline(preset, shared_data):
    steps = speedrun_steps(preset, eval_bundle=str(shared_data / "eval_bundle"))
    rl_on = PRESETS[preset].get("rl", {}).get("enabled", False)  # on in the GPU presets only
    assert rl_on == (preset not in ("cpu-demo", "tiny"))
    assert [s.name for s in steps] == [n.name for n in SPEEDRUN_GRAPH if n.name != "rl" or rl_on]
    assert {s.inputs["model"] for s in steps if s.name in ("chat_eval", "export")} == {"rl" if rl_on else "sft"}
    refs = {}
    for s in steps:  # every step fingerprints with its upstream refs
        refs[s.name] = artifact_ref(s.stage, s.cfg, {k: refs[v] for k, v in s.inputs.items()})
    assert len({r.fingerprint for r in refs.values()}) == len(steps)


def test_overrides_and_shortcuts(tmp_path, corpus_files):
    (tmp_path / "shard_00000.parquet").write_bytes(corpus_files[0].read_bytes())
    steps = {s.name: s for s in speedrun_steps("tiny", {"base": {"num_iterations": 7}}, depth=3, nproc=2,
                                               data_source=str(tmp_path), eval_bundle="https://example.org/b.zip")}
    assert steps["base"].cfg.num_iterations == 7 and steps["base"].cfg.depth == 3 and steps["base"].cfg.nproc == 2
    assert steps["eval_bundle"].cfg.url == "https://example.org/b.zip"
    assert steps["data"].cfg.source == "local" and steps["data"].cfg.local_path == str(tmp_path)


def test_runtime_overrides_keep_the_fingerprint_identity_overrides_change_it():
    def base_ref(overrides):
        steps = speedrun_steps("tiny", overrides)
        refs = {}
        for s in steps:
            refs[s.name] = artifact_ref(s.stage, s.cfg, {k: refs[v] for k, v in s.inputs.items()})
        return refs["base"]

    plain = base_ref({})
    assert base_ref({"base": {"device_batch_size": 1, "eval_every": 3}}) == plain
    assert base_ref({"base": {"num_iterations": 25}}) != plain
    assert base_ref({"tokenizer": {"vocab_size": 1088}}).fingerprint != plain.fingerprint  # upstream change


def test_bad_overrides_name_the_step_and_field():
    with pytest.raises(ConfigError, match=r"unknown step\(s\) \['bse'\]"):
        speedrun_steps("tiny", {"bse": {"depth": 2}})
    with pytest.raises(ConfigError, match=r"step 'base'.*depth"):
        speedrun_steps("tiny", {"base": {"depth": 0}})
    with pytest.raises(ConfigError, match=r"step 'tokenizer'.*unknown field"):
        speedrun_steps("tiny", {"tokenizer": {"vocab": 10}})
    with pytest.raises(ConfigError, match="unknown speedrun preset 'nope'"):
        speedrun_steps("nope")
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        speedrun_steps("tiny", {"base": {"preset": "huge"}})


def test_rl_is_toggled_with_enabled(shared_data):
    steps = speedrun_steps("tiny", parse_set(["rl.enabled=true"]), chat_data=str(shared_data / "chat"))
    assert [s.name for s in steps if s.name in ("sft", "rl")] == ["sft", "rl"]
    assert "rl" not in [s.name for s in speedrun_steps("d20", {"rl": {"enabled": False}})]
    with pytest.raises(ConfigError, match="rl.enabled='yes': expected true or false"):
        speedrun_steps("tiny", {"rl": {"enabled": "yes"}})
    with pytest.raises(ConfigError, match="step 'rl': rl: .*gsm8k_train.jsonl does not exist"):  # RL needs GSM8K
        speedrun_steps("tiny", {"rl": {"enabled": True}}, chat_data="/nonexistent")


def test_parse_set():
    assert parse_set(["base.depth=6", "base.dtype=bfloat16", "data.shard_indices=[1,2]", "base.fp8=true"]) == {
        "base": {"depth": 6, "dtype": "bfloat16", "fp8": True}, "data": {"shard_indices": [1, 2]}}
    with pytest.raises(ConfigError, match="STEP.FIELD=VALUE"):
        parse_set(["depth=6"])
    assert merge({"a": {"x": 1}}, {"a": {"y": 2}}, {"a": {"x": 3}}) == {"a": {"x": 3, "y": 2}}


def test_pretrain_takes_the_core_bundle_only_when_it_scores_core_during_training():
    steps = {s.name: s for s in speedrun_steps("d20")}
    assert steps["base"].cfg.core_metric_every > 0 and steps["base"].inputs["eval_bundle"] == "eval_bundle"
    steps = {s.name: s for s in speedrun_steps("tiny")}
    assert "eval_bundle" not in steps["base"].inputs
    steps = {s.name: s for s in speedrun_steps("tiny", {"base": {"core_metric_every": 8}})}
    assert steps["base"].inputs["eval_bundle"] == "eval_bundle"


def test_the_run_form_offers_the_presets_and_describes_every_parameter():
    from prefect.utilities.callables import parameter_schema

    from flows.speedrun import speedrun

    props = parameter_schema(speedrun.fn).model_dump()["properties"]
    assert props["preset"]["enum"] == list(PRESETS)
    assert all(p.get("description") for p in props.values()), [k for k, p in props.items() if not p.get("description")]


def test_data_locations_come_from_the_environment_when_not_given(monkeypatch, tmp_path):
    """An offline worker sets NANORUN_EVAL_BUNDLE / NANORUN_CHAT_DATA once; runs that name no bundle
    (the scheduled nightly one) use them; an explicit parameter still wins."""
    bundle = REPO.parent / "shared" / "data" / "eval_bundle"
    monkeypatch.setenv("NANORUN_EVAL_BUNDLE", str(bundle))
    monkeypatch.setenv("NANORUN_CHAT_DATA", str(tmp_path))
    steps = {s.name: s for s in speedrun_steps("tiny")}
    assert steps["eval_bundle"].cfg.local_path == str(bundle.resolve())
    assert steps["sft"].cfg.data_dir == str(tmp_path.resolve())
    explicit = {s.name: s for s in speedrun_steps("tiny", eval_bundle="https://example.invalid/b.zip")}
    assert explicit["eval_bundle"].cfg.url == "https://example.invalid/b.zip"


# Every kind of bad value of a non-trainer field gave a Python traceback from deep inside a stage
# (AttributeError, TypeError, CanonicalJSONError); each must be one line naming the field, exit 2.
BAD_FIELDS = [
    ("chat_eval.temperature=NaN", "chat_eval.temperature=nan: must be a finite number"),
    ("chat_eval.max_new_tokens=Infinity", "chat_eval.max_new_tokens=inf: expected int"),
    ("chat_eval.seed=true", "chat_eval.seed=True: expected int, got bool"),
    ("chat_eval.task_max_problems=x", "chat_eval.task_max_problems='x': expected dict"),
    ("chat_eval.max_problems=0", "max_problems=0: -1 (all) or a positive number"),
    ("chat_eval.top_k=-1", "top_k (0 = off)"),
    ("chat_eval.fetch_retries=-1", "fetch_retries >= 1"),
    ("chat_eval.device_type=tpu", "chat_eval.device_type='tpu'"),
    ("chat_eval.bundle_tasks=[1]", "chat_eval.bundle_tasks=[1]: task labels"),
    ("chat_eval.source_digests=NaN", "chat_eval.source_digests=nan: expected dict"),
    ("data.source=1", "data_shards.source=1: expected str, got int"),
    ("data.source=NaN", "data_shards.source=nan: expected str"),
    ("data.workers=true", "data_shards.workers=True: expected int"),
    ("data.timeout=NaN", "data_shards.timeout=nan: must be a finite number"),
    ("data.content_digest={}", "data_shards.content_digest={}: expected str"),
    ("report.tag=-1", "report.tag=-1: expected str, got int"),
    ("report.recipe=[1]", "report.recipe=[1]: expected str, got list"),
    ("report.title=NaN", "report.title=nan: expected str"),
    ("tokenizer.max_chars=NaN", "tokenizer.max_chars=nan: expected int"),
    ("tokenizer.threads=true", "tokenizer.threads=True: expected int"),
    ("eval_bundle.url=1", "eval_bundle.url=1: expected str"),
    ("eval_bundle.local_path=[1]", "eval_bundle.local_path=[1]: expected str"),
    ("base_eval.max_per_task=NaN", "core_eval.max_per_task=nan: expected int"),
    ("base_eval.timeout=-1", "core_eval.timeout=-1: seconds >= 0"),
    ("base_eval.tasks=[1]", "core_eval.tasks=[1]: task labels"),
    ("base_eval.tasks=[NaN]", "core_eval.tasks=[nan]: non-finite float nan"),
    ("export.title=Infinity", "export.title=inf: expected str"),
    ("export.top_p=NaN", "export.top_p=nan: must be a finite number"),
]


@pytest.mark.parametrize("item,needle", BAD_FIELDS, ids=[item for item, _ in BAD_FIELDS])
def test_bad_non_trainer_fields_are_one_line_and_exit_2(item, needle, capsys, nanorun_home):
    from cli.main import main
    from tests.cli.test_cli import one_line_error

    code = main(["speedrun", "--preset", "tiny", "--plan", "--set", item])
    one_line_error(code, capsys.readouterr().err, needle)
