"""The speedrun flow over a store that already holds the run: nothing is launched, the rerun is
Cached, and an artifact deleted from the store is rebuilt even though Prefect remembers it."""
from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {t.name: t.state.name for t in runs}


def test_cached_rerun_launches_no_subprocess_and_verifies_the_store(tiny_run, shared_data, monkeypatch):
    from flows.speedrun import speedrun

    store, run = tiny_run
    params = dict(preset="tiny", store=store.url, eval_bundle=str(shared_data / "eval_bundle"),
                  chat_data=str(shared_data / "chat"))
    launched = []
    real_popen = subprocess.Popen

    def spy(*a, **kw):  # every subprocess; Prefect's own temporary server is allowed, training is not
        cmd = kw.get("args", a[0] if a else None)
        launched.append(" ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd))
        return real_popen(*a, **kw)

    def stage_processes():
        return [c for c in launched if any(m in c for m in ("torch.distributed.run", "core.train", "stages."))]

    monkeypatch.setattr(subprocess, "Popen", spy)
    first = speedrun(**params, return_state=True)
    refs = first.result()
    assert refs == {name: str(m.ref) for name, m in run.items()}
    assert stage_processes() == []
    assert set(_task_states(first)) == set(run)  # the tiny recipe's steps (rl off)

    second = speedrun(**params, return_state=True)
    assert set(_task_states(second).values()) == {"Cached"}

    # Prefect still has a cached record for the report; the store no longer has the artifact.
    shutil.rmtree(store.root / run["report"].ref.key)
    third = speedrun(**params, return_state=True)
    states = _task_states(third)
    assert states.pop("report") == "Completed" and set(states.values()) == {"Cached"}
    assert store.verify(run["report"].ref, deep=True).ok
    assert stage_processes() == []
    # the rebuild left a fresh record: the next run is entirely Cached again
    assert set(_task_states(speedrun(**params, return_state=True)).values()) == {"Cached"}


def test_stage_flow_runs_one_stage_and_routes_join(tiny_run):
    from flows.speedrun import stage
    from stages.base import ConfigError

    store, run = tiny_run
    inputs = {"data": str(run["data"].ref), "tokenizer": "tokenizer@latest"}
    ref = stage(name="pretrain", config=_tiny_pretrain(), inputs=inputs, store=store.url)
    assert ref == str(run["base"].ref)  # the same recipe: served from the store
    state = stage(name="pretrain", config=_tiny_pretrain(), inputs=inputs, store=store.url, join=True,
                  return_state=True)
    with pytest.raises(ConfigError, match="nnodes > 1 and node_rank >= 1"):
        state.result()


def _tiny_pretrain() -> dict:
    from stages.pretrain import PRESETS

    return dict(PRESETS["tiny"])


def test_cli_on_a_fresh_machine_creates_its_homes(tmp_path, shared_data):
    """`nanorun stage ...` with a NANORUN_HOME that does not exist yet and no PREFECT_HOME: the
    temporary Prefect server must find a home it can create its database in (first run ever)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(NANORUN_HOME=str(tmp_path / "fresh" / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")
    res = subprocess.run([sys.executable, "-m", "cli.main", "stage", "eval_bundle",
                          "--set", f"local_path={shared_data / 'eval_bundle'}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("eval_bundle/local-")
    assert (tmp_path / "fresh" / "home" / "prefect").is_dir()


def test_stage_cli_refuses_a_mismatched_tokenizer_in_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    """`nanorun stage core_eval` with a tokenizer the model was not trained with: exit 2 and one line
    that says what to pass instead, through the real flow (not a traceback)."""
    import cli.main as cli
    from artifacts import open_store
    from stages import tokenizer
    from pipeline.execute import execute

    shared, run = tiny_run
    store = open_store(str(tmp_path / "store"))  # the session's store keeps its aliases
    shared.push(run["base"].ref, store, with_inputs=True)
    shared.push(run["eval_bundle"].ref, store)
    other = execute("tokenizer", tokenizer.Config(vocab_size=run["tokenizer"].metrics["vocab_size"] // 2,
                                                  max_chars=200_000), {"data": run["data"].ref}, store)
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")
    code = cli.main(["--store", store.url, "stage", "core_eval", "--input", f"model={run['base'].ref}",
                     "--input", f"tokenizer={other.ref}", "--input", f"bundle={run['eval_bundle'].ref}",
                     "--set", "max_per_task=2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nanorun stage")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "tokenizer/model mismatch" in lines[0] and "pass the tokenizer artifact it was trained with" in lines[0]
    assert store.refs("core_eval") == []  # nothing committed


def test_a_fully_cached_speedrun_answers_from_the_store_without_prefect(tiny_run, shared_data, capsys, monkeypatch):
    """No step to run and no server configured: the CLI decides from the plan and never starts
    Prefect's temporary server (which cost ~50 s of a cached rerun)."""
    import cli.main as cli
    import cli.commands as commands

    store, run = tiny_run
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(commands, "_prefect_env", lambda: pytest.fail("started Prefect for a fully cached run"))
    code = cli.main(["--store", store.url, "speedrun", "--preset", "tiny", "--eval-bundle",
                     str(shared_data / "eval_bundle"), "--chat-data", str(shared_data / "chat")])
    out = capsys.readouterr()
    assert code == 0 and "all 9 steps are committed and verified: nothing to run" in out.err
    assert dict(line.split() for line in out.out.splitlines()) == {name: str(m.ref) for name, m in run.items()}


def test_stage_with_recipe_hits_the_speedruns_fingerprint(tiny_run, shared_data, capsys):
    """`nanorun stage NAME --recipe PRESET` builds the step exactly as the speedrun does, upstream
    artifacts included, without copying its config out of `nanorun show`."""
    import cli.main as cli

    store, run = tiny_run
    common = ["--recipe", "tiny", "--eval-bundle", str(shared_data / "eval_bundle"), "--chat-data",
              str(shared_data / "chat"), "--plan"]
    for name, step in (("base", "base"), ("sft", "sft"), ("core_eval", "base_eval")):
        assert cli.main(["--store", store.url, "stage", name, *common]) == 0
        assert capsys.readouterr().out.split() == [str(run[step].ref), "cached"]
    assert cli.main(["--store", store.url, "stage", "base", *common, "--set", "seed=5"]) == 0
    ref, _, state = capsys.readouterr().out.strip().partition("  ")
    assert ref != str(run["base"].ref) and state == "will run"  # the speedrun plan's words
    assert cli.main(["--store", store.url, "stage", "nope", *common]) == 2
    assert "recipe tiny has no step 'nope'; its steps: data (data_shards)" in capsys.readouterr().err


def test_a_stage_config_is_built_once_per_step_by_the_plan_and_never_by_the_flow(tiny_run, shared_data, monkeypatch):
    """Per step, a stage Config is built once where the plan is compiled (the CLI) and once by
    execute_step() where the stage runs. A flow handed the plan builds none (the task's cache key is
    the planned fingerprint), so a fully cached run builds none at all; a flow run without a plan (the
    UI, a schedule) compiles it once itself. Counted at StageConfig.from_dict, which every build
    (from_preset, a plan's fields) goes through."""
    from flows.speedrun import speedrun
    from pipeline.recipes import speedrun_plan
    from stages.base import StageConfig

    store, run = tiny_run
    built: list[str] = []
    original = StageConfig.__dict__["from_dict"].__func__

    def counted(cls, d):
        built.append(cls.__module__)
        return original(cls, d)

    monkeypatch.setattr(StageConfig, "from_dict", classmethod(counted))
    recipe = dict(eval_bundle=str(shared_data / "eval_bundle"), chat_data=str(shared_data / "chat"))
    plan = speedrun_plan("tiny", **recipe)
    assert sorted(built) == sorted(f"stages.{s.stage}" for s in plan)  # once per step
    built.clear()
    # the store holds every artifact, and Prefect may not have recorded them yet: each task then
    # runs, and its execute_step() builds its Config once, finding the artifact committed
    speedrun(preset="tiny", store=store.url, plan=plan.to_dict())
    assert sorted(built) == sorted(set(built)) and set(built) <= {f"stages.{s.stage}" for s in plan}  # each once
    built.clear()
    state = speedrun(preset="tiny", store=store.url, plan=plan.to_dict(), return_state=True)
    assert set(_task_states(state).values()) == {"Cached"} and built == []
    speedrun(preset="tiny", store=store.url, **recipe)  # no plan given: compiled in the flow, once
    assert sorted(built) == sorted(f"stages.{s.stage}" for s in plan)
