"""A plan is compiled once: data that round-trips through JSON to the same artifacts, printed by
`--plan --json`, received by the flow, and rebuilt into a stage Config only by execute_step()."""
from __future__ import annotations

import json

import pytest

from pipeline.execute import PlanError, artifact_ref, config_from_plan, load_stage
from pipeline.plan import Plan, Step, compile_plan, plan_rows
from pipeline.recipes import speedrun_plan


def test_a_plan_round_trips_through_json_to_the_same_artifacts(shared_data, nanorun_home):
    plan = speedrun_plan("tiny", {"base": {"num_iterations": 7}}, eval_bundle=str(shared_data / "eval_bundle"),
                         chat_data=str(shared_data / "chat"))
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.names == plan.names and again.recipe["overrides"] == {"base": {"num_iterations": 7}}
    for step in again:
        mod = load_stage(step.stage)
        cfg = config_from_plan(mod, step.config, step.name)   # what execute_step() builds, once
        assert artifact_ref(mod, cfg, again.input_refs(step)) == step.ref, step.name
    assert again.step("base").config["num_iterations"] == 7
    with pytest.raises(PlanError, match="no step 'nope'"):
        again.step("nope")
    with pytest.raises(PlanError, match="a plan is"):
        Plan.from_dict({"steps": "x"})


def test_execute_step_refuses_a_plan_the_code_no_longer_builds(tmp_path):
    from artifacts import open_store
    from pipeline.execute import execute_step
    from tests.artifacts import toy_stage

    plan = compile_plan([Step("a", toy_stage, toy_stage.Config(n=1))])
    (step,) = plan.steps
    stale = type(step)(step.name, step.stage, step.config, step.inputs,
                       type(step.ref)(step.ref.stage, step.ref.label, "0" * 16))  # compiled by other code
    with pytest.raises(PlanError, match="the code changed since the plan was compiled"):
        execute_step(stale, {}, open_store(str(tmp_path / "store")))


@pytest.mark.s3
def test_a_plan_lists_its_s3_source_once_from_the_cli_to_the_committed_artifact(s3_bucket, corpus_files, tmp_path,
                                                                                monkeypatch, capsys, nanorun_home):
    """`nanorun stage data_shards` on an S3 prefix: the CLI compiles the plan (one listing), the flow
    receives it, the task's cache key and execute_step() take the plan's digest as it is. Before the
    plan was compiled once the flow built the config again and listed the bucket a second time."""
    import boto3

    import cli.main as cli
    from stages import data_shards

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    for f in corpus_files[:3]:
        client.put_object(Bucket=bucket, Key="corpus/" + f.name, Body=f.read_bytes())
    listings = []
    real = data_shards.Config._listing
    import traceback

    def spy(self, kind):  # run() lists again on purpose, to prove the files did not change: told apart
        in_run = any(f.name == "_plan" and f.filename.endswith("data_shards.py") for f in traceback.extract_stack())
        listings.append("run() check" if in_run else "resolve")
        return real(self, kind)
    monkeypatch.setattr(data_shards.Config, "_listing", spy)
    store = str(tmp_path / "store")
    argv = ["--store", store, "stage", "data_shards", "--set", f"source=s3://{bucket}/corpus", "--set", "workers=2"]
    assert cli.main([*argv, "--plan", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert listings == ["resolve"] and printed["steps"][0]["status"] == "run"
    planned = printed["steps"][0]["ref"]
    listings.clear()
    assert cli.main(argv) == 0
    # resolved once per plan, by the CLI's compile: not again by the flow, the cache key or execute_step()
    assert listings == ["resolve", "run() check"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == planned
    from artifacts import open_store

    (row,) = plan_rows(Plan.from_dict(printed), open_store(store))
    assert row.status == "cached"
