"""Inputs are checked before any work starts: a mistyped store URL, a --force typo, a research
command whose metric cannot be computed; and plans say what --force and a checkpoint will do."""
from __future__ import annotations

import time

import pytest

from artifacts import open_store
from artifacts.manifest import ArtifactRef
from cli.main import main
from pipeline.recipes import speedrun_steps
from pipeline.plan import plan_rows


@pytest.mark.parametrize("url", ["s3:/bucket/runs", "s3:bucket", "file:/tmp/x", "https:/host/runs"])
def test_a_store_that_looks_like_a_mistyped_url_is_refused(tmp_path, monkeypatch, capsys, url):
    monkeypatch.chdir(tmp_path)
    assert main(["--store", url, "ls"]) == 2
    err = capsys.readouterr().err
    assert "looks like a mistyped URL" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # no directory named after the typo


def test_a_force_typo_is_one_line_before_anything_starts(tmp_path, capsys):
    t0 = time.monotonic()
    assert main(["--store", str(tmp_path), "speedrun", "--preset", "tiny", "--force", "bsae"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 10  # no Prefect server (it takes ~10 s to start)
    assert err.count("\n") == 1 and "--force bsae: not a step of this run" in err and "base" in err, err
    assert "resume" not in err


def test_the_plan_shows_what_force_and_a_checkpoint_do(tmp_path, capsys):
    store = open_store(str(tmp_path))
    steps = speedrun_steps("tiny")
    rows = {r.step: r for r in plan_rows(steps, store)}
    assert rows["base"].action == "will run"
    ckpt = store.work_dir_path(rows["base"].ref) / "checkpoints" / "step_000007"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")  # a complete checkpoint (meta.json is written last)
    (ckpt.parent / "step_000009.tmp-1").mkdir()  # an interrupted save is not one
    rows = {r.step: r for r in plan_rows(steps, store, force=["tokenizer", "base"])}
    assert rows["base"].action == "will run (--force: rebuilt from scratch, not from its checkpoint at step 7)"
    assert rows["tokenizer"].action == "will run (--force: rebuilt from scratch)"
    assert main(["--store", str(tmp_path), "speedrun", "--preset", "tiny", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "will run (resumes from step 7)" in [line for line in out.splitlines() if line.startswith("base ")][0]
    assert main(["--store", str(tmp_path), "speedrun", "--preset", "tiny", "--plan", "--force", "base"]) == 0
    base = [line for line in capsys.readouterr().out.splitlines() if line.startswith("base ")][0]
    assert base.endswith("will run (--force: rebuilt from scratch, not from its checkpoint at step 7)")


def test_stage_plan_says_it_resumes(tmp_path, capsys, shared_data):
    argv = ["--store", str(tmp_path), "stage", "data_shards", "--set", f"source={shared_data / 'corpus'}", "--plan"]
    assert main(argv) == 0
    ref, _, action = capsys.readouterr().out.strip().partition("  ")
    assert action == "will run"
    ckpt = open_store(str(tmp_path)).work_dir_path(ArtifactRef.parse(ref))
    (ckpt / "checkpoints" / "step_000003").mkdir(parents=True)
    (ckpt / "checkpoints" / "step_000003" / "meta.json").write_text("{}")
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{ref}  will run (resumes from step 3)"
    assert main([*argv, "--force"]) == 0
    assert capsys.readouterr().out.strip().endswith("(--force: rebuilt from scratch, not from its checkpoint at step 3)")


def test_compare_without_a_bundle_refuses_before_training(tmp_path, capsys):
    argv = ["--store", str(tmp_path), "compare", "--preset", "tiny", "--depths", "1", "--seeds", "1", "2",
            "--b", "base.matrix_lr=0.4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CORE needs the eval bundle" in err and "nothing was trained" in err and err.count("\n") == 1, err
    assert main([*argv, "--plan"]) == 0  # the plan still shows, with the same note on top
    assert "note: CORE needs the eval bundle" in capsys.readouterr().err
