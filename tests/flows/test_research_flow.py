"""`nanorun research`: one-line refusals, the plan, and (slow) a real run on CPU through the Prefect
flow, a rerun with one more seed that trains only the new points, and a fully cached rerun answered
from the store without Prefect."""
from __future__ import annotations

import time

import pytest

import cli.main as cli


@pytest.mark.parametrize("argv, says", [
    (["--candidate", "nope"], "candidate 'nope': expected"),
    (["--candidate", "odd=base.warmdown_ratio=5"], "warmdown_ratio and final_lr_frac must be in [0, 1]"),
    (["--seeds", "1"], "at least 2 distinct integer seeds"),
    (["--candidate", "a=base.matrix_lr=0.1", "--budget", "0.00001"], "budget: rung d1 needs"),
    (["--metrics", "core", "--candidate", "a=base.matrix_lr=0.1", "--plan"], "needs the CORE bundle"),
])
def test_cli_refuses_in_one_line(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.delenv("NANORUN_EVAL_BUNDLE", raising=False)
    monkeypatch.chdir(tmp_path)  # no nanorun.toml naming a bundle
    assert cli.main(["--store", str(tmp_path / "store"), "research", "--depths", "1", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nanorun research: error:") and says in err[0], err


def test_cli_plan_lists_points_and_cost(tmp_path, capsys):
    assert cli.main(["--store", str(tmp_path / "store"), "research", "--depths", "1", "2",
                     "--candidate", "a=base.matrix_lr=0.1", "--budget", "2", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "rungs d1 -> d2" in out and "d2    a " in out and "0/3" in out and "of a 2 device-hour budget" in out


@pytest.mark.slow
def test_research_on_cpu_then_one_more_seed_then_cached(tmp_path, monkeypatch, capsys, pretrain_launches):
    import prefect.artifacts

    store = str(tmp_path / "store")
    launched = pretrain_launches
    published = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: published.append(kw))
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")
    # 8 steps: seconds a point; embedding_lr 10x lower than tiny's 3.0 trains visibly worse
    argv = ["--store", store, "research", "--depths", "1", "2", "--set", "base.num_iterations=8",
            "--candidate", "low=base.embedding_lr=0.3"]
    assert cli.main([*argv, "--seeds", "1", "2"]) == 0
    first = len(launched)
    assert first in (4, 8)  # the baseline and `low` at d1 (and at d2 if `low` was promoted)
    out = capsys.readouterr().out
    assert "# Research research" in out and "| low | base.embedding_lr=0.3 | 0 |" in out
    # in the Prefect UI as the other reports: the plots embedded
    assert published[-1]["key"] == "research-research" and "![delta](data:image/png;base64," in published[-1]["markdown"]

    assert cli.main([*argv, "--seeds", "1", "2", "3"]) == 0
    assert len(launched) - first in (2, 4, 6, 8)  # seed 3 at d1 (and what a new promotion adds)
    out = capsys.readouterr().out
    assert "fails at d1" in out  # three seeds show it
    n = len(launched)

    import cli.commands as commands

    monkeypatch.setattr(commands, "_prefect_env", lambda: pytest.fail("started Prefect for a fully cached research"))
    t0 = time.monotonic()
    assert cli.main([*argv, "--seeds", "1", "2", "3"]) == 0
    took = time.monotonic() - t0
    cached = capsys.readouterr()
    assert len(launched) == n and "points and the report are committed and verified" in cached.err
    assert cached.out.split("\nreport ")[0] == out.split("\nreport ")[0] and took < 10, took


def test_the_research_deployment_has_typed_described_parameters():
    from pathlib import Path

    import yaml
    from prefect.utilities.callables import parameter_schema

    from flows.research_flow import research

    deployments = yaml.safe_load((Path(__file__).parents[2] / "prefect.yaml").read_text())["deployments"]
    assert next(d for d in deployments if d["name"] == "research")["entrypoint"] == "flows/research_flow.py:research"
    props = parameter_schema(research.fn).model_dump()["properties"]
    untyped = [k for k, v in props.items() if "type" not in v and "anyOf" not in v]
    undescribed = [k for k, v in props.items() if not v.get("description")]
    assert not untyped and not undescribed and props["candidates"]["type"] == "array", (untyped, undescribed)
