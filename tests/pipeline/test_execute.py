"""execute / status / plan / run_pipeline with tiny test stages (tests/artifacts/toy_*.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import pipeline.execute as ex
from artifacts.lease import Lease
from stages.base import ConfigError
from pipeline.execute import PlanError, execute, execute_step, status
from pipeline.plan import Step, format_plan, load_steps, plan_rows, run_pipeline
from tests.artifacts import toy_consumer, toy_stage
from tests.artifacts.fixtures import run_python, store, tamper  # noqa: F401 (fixture)


def calls(d: Path) -> int:
    f = d / "calls"
    return len(f.read_text().splitlines()) if f.exists() else 0


def test_build_then_cache_hit(store, tmp_path, toy_stages):
    cfg = toy_stage.Config(n=2, calls_dir=str(tmp_path))
    events = []
    m = execute(toy_stage, cfg, {}, store, on_event=lambda kind, info: events.append(kind))
    assert [e for e in events] == ["running", "committed"]
    assert m.ref.label == "n2" and m.metrics["files"] == 2 and m.metrics["resumed"] == 0
    assert m.identity == {"n": 2, "size": 1000, "seed": 0} and m.runtime["calls_dir"] == str(tmp_path)
    p = m.provenance
    assert p["git_commit"] and p["packages"]["python"] and p["host"] and p["duration_s"] >= 0
    assert p["start_time"] <= p["end_time"] and "command" in p and p["resumed"] is False
    assert store.verify(m.ref, deep=True).ok and store.resolve("toy@latest") == m.ref
    # Runtime fields do not change the artifact: a different calls_dir is still a cache hit.
    again = execute("toy", toy_stage.Config(n=2, calls_dir=str(tmp_path), sleep=0.5), {},
                    store, on_event=lambda kind, info: events.append(kind))
    assert again == m and events[-1] == "cached" and calls(tmp_path) == 1
    assert status(toy_stage, cfg, {}, store) == ("cached", m.ref)
    assert status(toy_stage, toy_stage.Config(n=3), {}, store)[0] == "run"


def test_rerun_after_failure_resumes_in_the_same_work_dir(store, tmp_path):
    failing = toy_stage.Config(n=3, fail_at=1, calls_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="failing on purpose"):
        execute(toy_stage, failing, {}, store)
    ref = ex.artifact_ref(toy_stage, failing, {})
    assert store.manifest(ref) is None
    assert sorted(p.name for p in store.work_dir(ref).iterdir()) == ["part0.bin", "part1.bin"]
    m = execute(toy_stage, toy_stage.Config(n=3, calls_dir=str(tmp_path)), {}, store)
    assert m.ref == ref and m.metrics["resumed"] == 2 and m.provenance["resumed"] is True
    assert calls(tmp_path) == 2 and store.verify(ref, deep=True).ok


def test_force_rebuilds_from_scratch(store, tmp_path):
    cfg = toy_stage.Config(n=2, calls_dir=str(tmp_path))
    first = execute(toy_stage, cfg, {}, store)
    (store.work_dir(first.ref) / "part0.bin").write_bytes(toy_stage.content(cfg, 0))  # junk a rerun would reuse
    second = execute(toy_stage, cfg, {}, store, force=True)
    assert calls(tmp_path) == 2 and second.metrics["resumed"] == 0  # the work dir was cleared
    assert second.ref == first.ref and store.manifest(first.ref) == second
    assert second.provenance["start_time"] >= first.provenance["start_time"]
    assert store.verify(second.ref, deep=True).ok


def test_damaged_artifact_is_rebuilt(store, tmp_path):
    cfg = toy_stage.Config(n=2, calls_dir=str(tmp_path))
    m = execute(toy_stage, cfg, {}, store)
    tamper(store, m.ref, "part1.bin", None)
    assert status(toy_stage, cfg, {}, store)[0] == "run"  # a manifest alone is not a cache hit
    m2 = execute(toy_stage, cfg, {}, store)
    assert calls(tmp_path) == 2 and store.verify(m2.ref).ok


def test_inputs_are_materialized_and_checked(store):
    up = execute(toy_stage, toy_stage.Config(n=2, size=10), {}, store)
    down = execute(toy_consumer, toy_consumer.Config(scale=3), {"src": up.ref}, store)
    assert down.metrics == {"total": 60} and down.inputs == {"src": up.ref}
    data = json.loads((store.materialize(down.ref) / "sum.json").read_text())
    assert data == {"total": 60, "from": str(up.ref)}
    # The downstream fingerprint follows the upstream one.
    up2 = execute(toy_stage, toy_stage.Config(n=2, size=10, seed=1), {}, store)
    assert ex.artifact_ref(toy_consumer, toy_consumer.Config(scale=3), {"src": up2.ref}) != down.ref
    with pytest.raises(ConfigError, match=r"missing \['src'\]"):
        execute(toy_consumer, toy_consumer.Config(), {}, store)
    with pytest.raises(ConfigError, match=r"unexpected \['extra'\]"):
        execute(toy_stage, toy_stage.Config(), {"extra": up.ref}, store)
    with pytest.raises(ConfigError, match="must be a tests.artifacts.toy_stage.Config"):
        execute(toy_stage, toy_consumer.Config(), {}, store)
    with pytest.raises(ConfigError, match="n must be >= 1"):
        toy_stage.Config(n=0)


def test_plan_statuses_and_pipeline(store, tmp_path):
    steps = [Step("a", toy_stage, toy_stage.Config(n=1, calls_dir=str(tmp_path))),
             Step("b", toy_consumer, toy_consumer.Config(scale=2), {"src": "a"}),
             Step("c", toy_stage, toy_stage.Config(n=2))]
    rows = plan_rows(steps, store)
    assert [r.status for r in rows] == ["run", "run", "run"]
    execute(toy_stage, steps[0].cfg, {}, store)
    holder = Lease(store, rows[2].ref, ttl=30)
    assert holder.try_acquire()
    try:
        rows = plan_rows(steps, store)
        assert [r.status for r in rows] == ["cached", "run", "locked"]
        assert rows[2].owner.startswith(holder.owner.rsplit(":", 2)[0]) and "locked by" in rows[2].action
        text = format_plan(rows)
        assert "will run" in text and "3 steps: 1 cached, 1 to run, 1 locked" in text
    finally:
        holder.release()
    results = run_pipeline(steps, store)
    assert {k: m.ref for k, m in results.items()} == {r.step: r.ref for r in rows}  # plan named them exactly
    assert results["b"].inputs == {"src": results["a"].ref} and calls(tmp_path) == 1
    assert [r.status for r in plan_rows(steps, store)] == ["cached"] * 3
    with pytest.raises(PlanError, match="not an earlier step"):
        plan_rows([Step("b", toy_consumer, toy_consumer.Config(), {"src": "later"})], store)
    with pytest.raises(PlanError, match="duplicate step name"):
        plan_rows([steps[0], steps[0]], store)
    with pytest.raises(PlanError, match="unknown step"):
        run_pipeline(steps, store, force=["zzz"])


def test_plan_file(store, tmp_path, toy_stages):
    up = execute(toy_stage, toy_stage.Config(n=1), {}, store)
    f = tmp_path / "plan.yaml"
    f.write_text("steps:\n"
                 "  - {name: a, stage: toy, config: {n: 2}}\n"
                 "  - {name: b, stage: toy_sum, inputs: {src: a}}\n"
                 f"  - {{name: c, stage: toy_sum, config: {{scale: 5}}, inputs: {{src: '{up.ref.fingerprint[:6]}'}}}}\n")
    steps = load_steps(f, store)
    assert steps[1].inputs == {"src": "a"} and steps[2].inputs == {"src": up.ref}
    assert [r.status for r in plan_rows(steps, store)] == ["run", "run", "run"]
    f.write_text(json.dumps({"steps": [{"name": "a", "stage": "toy", "config": {"n": 0}}]}))
    with pytest.raises(ConfigError, match="n must be >= 1"):
        load_steps(f, store)
    f.write_text(json.dumps([{"name": "a", "stage": "toy", "config": {"bogus": 1}}]))
    with pytest.raises(ConfigError, match="unknown field"):
        load_steps(f, store)
    with pytest.raises(PlanError, match="unknown stage"):
        ex.load_stage("no_such_stage")


def test_a_plan_file_imports_only_registered_stages(store, tmp_path, monkeypatch):
    """A plan file (or a flow parameter) naming a module path must not import it: importing runs code."""
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                  "from tests.artifacts.toy_stage import *  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "plan.json"
    f.write_text(json.dumps({"steps": [{"name": "a", "stage": "planted.stage", "config": {"n": 1}}]}))
    with pytest.raises(PlanError, match="unknown stage 'planted.stage'.*registered"):
        load_steps(f, store)
    assert not (tmp_path / "imported").exists()


BUILDER = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import pipeline.execute as ex
from artifacts import open_store
from tests.artifacts import toy_stage
ex.POLL_SECONDS = 0.1
store = open_store(os.environ["STORE"], index=False)
cfg = toy_stage.Config(n=4, sleep=0.15, calls_dir=os.environ["CALLS"])
m = ex.execute(toy_stage, cfg, {}, store, lease_ttl=5)
print(json.dumps({"ref": str(m.ref), "files": [f.sha256 for f in m.files]}))
"""


@pytest.mark.slow
def test_two_concurrent_builders_run_the_work_once(store, tmp_path):
    procs = [run_python(BUILDER, STORE=store.url, CALLS=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outs]
    assert results[0] == results[1]
    assert calls(tmp_path) == 1  # exactly one process ran the stage
    logs = "".join(err for _, err in outs)
    assert "waiting for toy/n4-" in logs and "after waiting" in logs and logs.count("committed toy/n4-") == 1


@pytest.mark.slow
def test_killed_builder_is_taken_over_and_resumed(store, tmp_path):
    # A builder SIGKILLed mid-run leaves a lease that has not expired yet; its pid is gone, so the
    # next run on this machine takes over at once and resumes from the dead builder's work dir.
    code = BUILDER.replace("n=4, sleep=0.15", "n=3, sleep=60").replace("lease_ttl=5", "lease_ttl=600")
    proc = run_python(code, STORE=store.url, CALLS=tmp_path)
    cfg = toy_stage.Config(n=3, calls_dir=str(tmp_path))
    part0 = store.work_dir(ex.artifact_ref(toy_stage, cfg, {})) / "part0.bin"
    deadline = time.time() + 60
    while not part0.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    t = time.time()
    m = execute(toy_stage, cfg, {}, store)
    assert time.time() - t < 5 and m.metrics["resumed"] == 1 and calls(tmp_path) == 2
    assert store.verify(m.ref, deep=True).ok


def test_optional_inputs_are_accepted_and_hashed_only_when_given():
    import types
    from dataclasses import dataclass

    from artifacts.manifest import ArtifactRef
    from stages.base import StageConfig, identity
    from pipeline.execute import artifact_ref

    @dataclass(frozen=True)
    class _OptCfg(StageConfig):
        n: int = identity(1)

    mod = types.ModuleType("opt_stage")
    mod.NAME, mod.code_version, mod.INPUTS, mod.OPTIONAL_INPUTS = "opt_stage", "1", ("a",), ("b",)
    mod.Config, mod.run = _OptCfg, lambda cfg, inputs, out: {"inputs": sorted(inputs)}
    a = ArtifactRef("x", "a", "0" * 16)
    b = ArtifactRef("y", "b", "1" * 16)
    without = artifact_ref(mod, _OptCfg(), {"a": a})
    with_b = artifact_ref(mod, _OptCfg(), {"a": a, "b": b})
    assert without != with_b
    with pytest.raises(ConfigError, match=r"missing \['a'\].*optional: \['b'\]"):
        artifact_ref(mod, _OptCfg(), {"b": b})
    with pytest.raises(ConfigError, match=r"unexpected \['c'\]"):
        artifact_ref(mod, _OptCfg(), {"a": a, "c": b})


def test_metrics_are_made_plain_or_refused():
    import numpy as np

    assert ex._plain_metrics("s", {"loss": np.float32(1.5), "hist": np.arange(3), "n": [np.int64(4)]}) == {
        "loss": 1.5, "hist": [0, 1, 2], "n": [4]}
    assert ex._plain_metrics("s", None) == {}
    with pytest.raises(TypeError, match="must return a dict"):
        ex._plain_metrics("s", 3.0)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        ex._plain_metrics("s", {"x": object()})


def test_a_failed_step_stops_only_what_needs_it(store, tmp_path):
    """The walker runs every step whose inputs exist: a failure leaves the independent branch
    committed, its dependents "not run (needs X)"; a failed optional step (evidence) is skipped, and
    a step that takes it as an optional stage input runs without it."""
    import types
    from dataclasses import dataclass

    from stages.base import StageConfig, identity
    from pipeline.plan import PipelineFailed, format_outcomes, walk

    @dataclass(frozen=True)
    class _Cfg(StageConfig):
        tag: int = identity(0)

    opt = types.ModuleType("opt_consumer")
    opt.NAME, opt.code_version, opt.INPUTS, opt.OPTIONAL_INPUTS = "opt_consumer", "1", (), ("src",)
    opt.Config, opt.run = _Cfg, lambda cfg, inputs, out: {"inputs": sorted(inputs)}
    steps = [Step("bad", toy_stage, toy_stage.Config(n=2, fail_at=0)),
             Step("needs_bad", toy_consumer, toy_consumer.Config(), {"src": "bad"}),
             Step("good", toy_stage, toy_stage.Config(n=1, calls_dir=str(tmp_path))),
             Step("needs_good", toy_consumer, toy_consumer.Config(), {"src": "good"}),
             Step("evidence", toy_stage, toy_stage.Config(n=3, fail_at=1), optional=True),
             Step("uses_evidence", opt, _Cfg(), {"src": "evidence"}),
             Step("needs_evidence", toy_consumer, toy_consumer.Config(scale=3), {"src": "evidence"})]
    with pytest.raises(PipelineFailed, match=r"1 of 7 steps failed \(bad: RuntimeError: toy: failing on purpose") as e:
        run_pipeline(steps, store)
    got = {name: (o.status, o.detail) for name, o in e.value.outcomes.items()}
    assert got["bad"][0] == "failed" and "failing on purpose" in got["bad"][1]
    assert got["needs_bad"] == ("not run", "needs bad")
    assert got["good"] == ("committed", "") and got["needs_good"] == ("committed", "")
    assert got["evidence"][0] == "skipped" and got["needs_evidence"] == ("not run", "needs evidence")
    assert got["uses_evidence"] == ("committed", "")
    assert e.value.outcomes["uses_evidence"].manifest.metrics == {"inputs": []}  # ran without it
    table = format_outcomes(e.value.outcomes)
    assert "not run (needs bad)" in table and "3 committed, 1 failed, 1 skipped, 2 not run" in table
    # the rerun reuses what was committed and, with nothing failing any more, succeeds
    fixed = [Step(s.name, s.stage, toy_stage.Config(n=2) if s.name == "bad" else s.cfg, s.inputs, s.optional)
             for s in steps if s.name not in ("evidence", "uses_evidence", "needs_evidence")]
    outcomes = walk(fixed, lambda step, inputs: (execute_step(step, inputs, store),
                                                  step.name in ("good", "needs_good")), max_parallel=2)
    assert {n: o.status for n, o in outcomes.items()} == {
        "bad": "committed", "needs_bad": "committed", "good": "cached", "needs_good": "cached"}
    assert calls(tmp_path) == 1


def test_load_stage_checks_the_whole_contract():
    import types

    from stages.base import optional_inputs, stage_presets

    def module(**attrs):
        mod = types.ModuleType("contract_stage")
        mod.NAME, mod.code_version, mod.INPUTS, mod.Config, mod.run = "c", "1", (), toy_stage.Config, toy_stage.run
        for k, v in attrs.items():
            setattr(mod, k, v)
        return mod

    plain = ex.load_stage(module())
    assert optional_inputs(plain) == () and stage_presets(plain) == {}
    for attrs, msg in [(dict(INPUTS=["a"]), "INPUTS must be a tuple"), (dict(OPTIONAL_INPUTS="ab"), "OPTIONAL_INPUTS"),
                       (dict(PRESETS={"tiny": 3}), "PRESETS must map"), (dict(join="x"), "join must be a function"),
                       (dict(Config=dict), "Config must be a dataclass")]:
        with pytest.raises(PlanError, match=msg):
            ex.load_stage(module(**attrs))
    # presets are one mechanism for every stage: Config.from_preset, resolved
    from stages import pretrain

    cfg = pretrain.Config.from_preset("tiny", seed=7)
    assert cfg.seed == 7 and cfg.depth == pretrain.PRESETS["tiny"]["depth"] and pretrain.preset("tiny", seed=7) == cfg
    with pytest.raises(ConfigError, match=r"stage pretrain has no preset 'nope' \(presets: tiny, "):
        pretrain.Config.from_preset("nope")


def test_a_running_pipeline_keeps_what_it_made_from_gc(store):
    """gc while a pipeline runs (here or on another machine: the pin is on the store) keeps every
    artifact the pipeline made or will read, even one whose alias moved on; once it ends, the pin goes."""
    steps = [Step("a", toy_stage, toy_stage.Config(n=1)), Step("b", toy_stage, toy_stage.Config(n=2)),
             Step("c", toy_consumer, toy_consumer.Config(scale=2), {"src": "a"})]
    swept = []

    def on_event(kind, info):
        if kind == "running" and info["ref"].label == "n2":  # b runs: a is committed, c has not read it yet
            execute(toy_stage, toy_stage.Config(n=3), {}, store)  # another run moves toy@latest on
            swept.append(store.gc(dry_run=False, grace_s=0))
    out = run_pipeline(steps, store, on_event=on_event)
    assert swept and not [i for i in swept[0].items if i.ref == out["a"].ref]
    assert store.manifest(out["a"].ref) is not None and out["c"].inputs["src"] == out["a"].ref
    assert not [r for r in store._lease_refs() if r.stage == "running_plan"]
