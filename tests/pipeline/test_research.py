"""pipeline/research.py with a fake point_rows (no training): promotion across rungs, Holm, --keep,
the verdicts, a failing candidate, the budget, the built-in and command proposers, the report stage."""
from __future__ import annotations

import sys

import pytest

from pipeline.research import Research, format_plan, plan_research, propose, research, search_candidates
from stagekit.stats import holm, one_sided_p, welch
from stages.base import ConfigError

# val bpb offsets per candidate and depth: better (negative), worse, nothing, better only at d1
EFFECT = {"good": {1: -0.05, 2: -0.05, 3: -0.05}, "bad": {1: 0.05, 2: 0.05, 3: 0.05},
          "same": {1: 0.0, 2: 0.0, 3: 0.0}, "shallow": {1: -0.05, 2: 0.0, 3: 0.0}}
NOISE = {1: -0.004, 2: 0.0, 3: 0.005, 4: 0.002}  # per seed: a spread, the same for every candidate
LR = {"good": 0.11, "bad": 0.12, "same": 0.13, "shallow": 0.14, "small": 0.15}  # base.matrix_lr -> its effect


class Fake:
    """point_rows(candidate, sweep): rows as pipeline.sweep.point_row makes them, from EFFECT by the
    candidate's base.matrix_lr (LR); records every call."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, c, sw):
        depth = sw.grid["depth"][0]
        self.calls.append((c.name, depth, sw.seeds))
        effect = {v: k for k, v in LR.items()}.get(sw.overrides.get("base", {}).get("matrix_lr"), "same")
        rows = []
        for seed in sw.seeds:
            broken = (c.name, depth) in self.fail
            rows.append({"point": f"d{depth}-s{seed}", "arm": "", "depth": depth, "seed": seed,
                         "val_bpb": None if broken else 2.0 - 0.1 * depth + EFFECT[effect][depth] + NOISE[seed],
                         "core": None, "wall_time_s": 36.0, "pretrain": f"pretrain/d{depth}-{c.name}{seed}",
                         "status": "failed: RuntimeError: boom" if broken else "ok"})
        return rows


def cand(name, effect):
    return f"{name}=base.matrix_lr={LR[effect]}"


def go(tmp_path, fake=None, **kw):
    kw.setdefault("depths", (1, 2, 3))
    r = Research(recipe="tiny", **kw)
    return research(r, store=str(tmp_path / "store"), point_rows=fake or Fake(), log=lambda s: None)


def verdicts(res):
    return {c["name"]: c["verdict"] for c in res["candidates"]}


def test_only_what_holds_at_every_depth_is_promoted_to_the_end(tmp_path):
    fake = Fake()
    res = go(tmp_path, fake, candidates=(cand("good", "good"), cand("bad", "bad"), cand("same", "same"),
                                         cand("shallow", "shallow")))
    assert verdicts(res) == {"good": "holds at every depth tried", "bad": "fails at d1",
                             "same": "not significant at d1", "shallow": "not significant at d2"}
    # the baseline runs once per rung; a candidate only at the rungs it reached
    assert [(n, d) for n, d, _ in fake.calls] == [
        ("baseline", 1), ("good", 1), ("bad", 1), ("same", 1), ("shallow", 1),
        ("baseline", 2), ("good", 2), ("shallow", 2), ("baseline", 3), ("good", 3)]
    assert [r["depth"] for r in res["rungs"]] == [1, 2, 3]
    assert res["rungs"][0]["results"]["good"]["decision"] == "better"
    assert all(row["command"].startswith("nanorun research --preset tiny --depths ") for row in res["rows"])
    assert "--candidate good=base.matrix_lr=" in next(r["command"] for r in res["rows"] if r["candidate"] == "good")


def test_holm_adjusts_across_the_rungs_candidates():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_holm_turns_a_lone_significant_result_into_a_non_significant_one(tmp_path):
    # a small effect that is significant alone (p < 0.05) but not once 4 candidates share the rung
    EFFECT["small"] = {1: -0.01, 2: -0.01, 3: -0.01}
    try:
        alone = go(tmp_path, depths=(1,), candidates=(cand("small", "small"),))
        p = alone["rungs"][0]["results"]["small"]["p_better"]
        assert p < 0.05 and verdicts(alone)["small"] == "holds at every depth tried"
        crowd = go(tmp_path, depths=(1,), candidates=(cand("small", "small"), *(cand(f"n{i}", "same") for i in range(3))))
        j = crowd["rungs"][0]["results"]["small"]
        assert j["p_better"] == pytest.approx(p) and j["p_better_holm"] >= 0.05
        assert verdicts(crowd)["small"] == "not significant at d1"
    finally:
        del EFFECT["small"]


def test_one_sided_p_points_the_right_way():
    w = welch([2.0, 2.01, 2.02], [1.9, 1.91, 1.92])  # B lower
    assert one_sided_p(w, lower_is_better=True) < 0.01 < 0.99 < one_sided_p(w, lower_is_better=False)
    exact = welch([1.0, 1.0], [0.5, 0.5])
    assert one_sided_p(exact, lower_is_better=True) == 0.0 and one_sided_p(exact, lower_is_better=False) == 1.0


def test_keep_promotes_at_most_k(tmp_path):
    res = go(tmp_path, keep=1, candidates=(cand("good", "good"), cand("shallow", "shallow")))
    first = res["rungs"][0]["results"]
    assert sorted(j["decision"] for j in first.values()) == ["better", "held back"]
    held = next(n for n, j in first.items() if j["decision"] == "held back")
    entry = next(c for c in res["candidates"] if c["name"] == held)
    assert entry["verdict"] == "holds at every depth tried" and entry["depths"] == [1] and "--keep 1" in entry["reason"]
    assert res["rungs"][1]["candidates"] != [held]


def test_a_failed_point_stops_only_its_candidates_line(tmp_path):
    fake = Fake(fail={("good", 2)})
    res = go(tmp_path, fake, candidates=(cand("good", "good"), cand("good2", "good")))
    assert verdicts(res) == {"good": "fails at d2", "good2": "holds at every depth tried"}
    entry = next(c for c in res["candidates"] if c["name"] == "good")
    assert "failed" in entry["reason"] and ("good2", 3) in [(n, d) for n, d, _ in fake.calls]


def test_failed_baseline_points_judge_nobody(tmp_path):
    res = go(tmp_path, Fake(fail={("baseline", 1)}), candidates=(cand("good", "good"),))
    assert verdicts(res) == {"good": "not significant at d1"}
    assert "baseline" in res["candidates"][0]["reason"]


def test_budget_refuses_before_anything_runs_and_stops_a_later_rung(tmp_path):
    fake = Fake()
    # no pretrain was measured in an empty store: the CPU default (~15 s start-up per point)
    with pytest.raises(ConfigError, match="budget: rung d1 needs ~.* device-hours.*nothing was run"):
        go(tmp_path, fake, budget=1e-4, candidates=(cand("good", "good"),))
    assert fake.calls == []
    # enough for d1 (6 points x ~15 s = 0.025 h) but not after it: d1 spends 6 x 36 s = 0.06 h
    res = go(tmp_path, fake, budget=0.07, candidates=(cand("good", "good"),))
    assert [r["depth"] for r in res["rungs"]] == [1] and res["stopped"].startswith("budget: rung d2")
    assert verdicts(res) == {"good": "holds at every depth tried"}
    assert res["spent_hours"] == pytest.approx(0.06)


def test_plan_shows_points_cache_and_cost_per_rung(tmp_path):
    from artifacts import open_store

    r = Research(recipe="tiny", depths=(1, 2), candidates=(cand("good", "good"),), budget=1.0)
    text = format_plan(plan_research(r, open_store(str(tmp_path / "store"))))
    assert "d1    baseline" in text and "d2    good" in text and "0/3" in text
    assert "default for cpu" in text and "of a 1 device-hour budget" in text


def test_search_grid_and_samples():
    r = Research(search={"base.matrix_lr": (0.1, 0.4), "base.embedding_lr": (1, 2)})
    specs = search_candidates(r)
    assert len(specs) == 4 and specs[0] == "matrix_lr-0.1_embedding_lr-1=base.matrix_lr=0.1,base.embedding_lr=1"
    two = search_candidates(Research(search=r.search, samples=2))
    assert len(two) == 2 and set(two) <= set(specs) and two == search_candidates(Research(search=r.search, samples=2))


PROPOSER = """
import json, sys
res = json.load(sys.stdin)
tried = {c["name"] for c in res["candidates"]}
best = [c["name"] for c in res["candidates"] if c["verdict"] == "holds at every depth tried"]
if "again" not in tried:  # one more round: another try of what held
    print(json.dumps({"candidate": "again=base.matrix_lr=0.11"}))
    print()
print(json.dumps({"candidate": "dup=base.matrix_lr=0.12"}) if "dup" not in tried and best else "")
"""


def test_a_proposer_command_reads_the_results_and_adds_rounds(tmp_path):
    script = tmp_path / "proposer.py"
    script.write_text(PROPOSER)
    fake = Fake()
    res = go(tmp_path, fake, depths=(1, 2), candidates=(cand("good", "good"),),
             propose=f"{sys.executable} {script}", rounds=3)
    assert verdicts(res) == {"good": "holds at every depth tried", "again": "holds at every depth tried",
                             "dup": "fails at d1"}
    assert [(c["name"], c["round"]) for c in res["candidates"]] == [("good", 0), ("again", 1), ("dup", 1)]
    assert [n for n, _, _ in fake.calls].count("baseline") == 2  # its rows are shared across rounds
    assert not res["errors"]


def test_a_proposed_candidate_that_cannot_be_planned_fails_alone(tmp_path):
    script = tmp_path / "proposer.py"
    script.write_text('import json\nprint(json.dumps({"candidate": "odd=base.warmdown_ratio=5"}))\n'
                      'print(json.dumps({"candidate": "again=base.matrix_lr=0.11"}))\n')
    res = go(tmp_path, depths=(1,), candidates=(cand("good", "good"),), propose=f"{sys.executable} {script}", rounds=1)
    assert verdicts(res) == {"good": "holds at every depth tried", "odd": "fails at d1",
                             "again": "holds at every depth tried"}
    assert "warmdown_ratio" in next(c["reason"] for c in res["candidates"] if c["name"] == "odd")


def test_a_proposer_alone_proposes_the_first_round(tmp_path):
    script = tmp_path / "proposer.py"
    script.write_text(PROPOSER)
    res = go(tmp_path, depths=(1,), propose=f"{sys.executable} {script}", rounds=1)
    assert [(c["name"], c["round"]) for c in res["candidates"]] == [("again", 0)]
    baseline_row = next(x for x in res["rows"] if x["candidate"] == "baseline")
    assert baseline_row["command"].endswith("--candidate again=base.matrix_lr=0.11")


def test_a_broken_proposer_is_one_line_and_the_results_stay(tmp_path):
    with pytest.raises(ConfigError, match=r'each line must be \{"candidate": "NAME=FORM"\}'):
        propose(f"{sys.executable} -c \"print('hello')\"", {})
    res = go(tmp_path, depths=(1,), candidates=(cand("good", "good"),), propose=f"{sys.executable} -c 'exit(3)'")
    assert verdicts(res) == {"good": "holds at every depth tried"} and "exited 3" in res["errors"][0]


@pytest.mark.parametrize("kw, message", [
    (dict(depths=(2, 1)), "smallest first"), (dict(seeds=(1,)), "at least 2 distinct"),
    (dict(metrics=("loss",)), "val_bpb and/or core"), (dict(alpha=0.5), "alpha=0.5"),
    (dict(budget=0), "budget=0"), (dict(search={"matrix_lr": (1,)}), "STEP.FIELD=V1,V2"),
    (dict(recipe="nope"), "unknown recipe"), (dict(candidates=()), "nothing to try")])
def test_bad_research_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        Research(**{"candidates": ("a=base.matrix_lr=0.1",), **kw})


def test_a_candidate_named_twice_is_refused_before_anything_runs(tmp_path):
    fake = Fake()
    with pytest.raises(ConfigError, match="used twice"):
        go(tmp_path, fake, candidates=(cand("x", "good"), cand("x", "bad")))
    assert fake.calls == []


def test_report_stage_writes_verdicts_plots_and_is_a_pure_function_of_the_points(tmp_path):
    from artifacts import open_store
    from pipeline.execute import execute
    from stages.research_report import report_config

    res = go(tmp_path, candidates=(cand("good", "good"), cand("bad", "bad"), cand("shallow", "shallow")))
    cfg = report_config(res)
    store = open_store(str(tmp_path / "store"))
    m = execute("research_report", cfg_obj(cfg), {}, store)
    out = store.materialize(m.ref)
    md = (out / "report.md").read_text()
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "points.csv", "delta.png", "promotion.png"}
    assert "| good | base.matrix_lr=0.11 | 0 | d1, d2, d3 | **holds at every depth tried**" in md
    assert "**fails at d1**" in md and "**not significant at d2**" in md and "## Promotion tree" in md
    assert "`nanorun research --preset tiny --depths 3 --seeds 1 2 3 --candidate good=base.matrix_lr=" in md
    assert m.metrics["verdicts"]["bad"] == "fails at d1"
    # the same points again (a cached rerun spends nothing) give the same report artifact
    again = go(tmp_path, candidates=(cand("good", "good"), cand("bad", "bad"), cand("shallow", "shallow")))
    again["spent_hours"] = 0.0
    for row in again["rows"]:
        row["cached"] = True
    assert execute("research_report", cfg_obj(report_config(again)), {}, store).ref == m.ref


def cfg_obj(d):
    from stages.research_report import Config

    return Config.from_dict(d)
