"""Sweeps and A/B comparisons: grids refused in one line when wrong, points sharing their upstream
artifacts, the sweep_report stage on synthetic points, and (slow) `nanorun sweep` / `nanorun
compare` on a CPU: a failed point does not stop the others, a rerun is fully cached, and a new
depth trains only its own points."""
from __future__ import annotations

import csv
import time

import pytest

import cli.main as cli
from pipeline.sweep import PRESETS, Sweep, preset, sweep_steps
from stages.base import ConfigError
from pipeline.execute import artifact_ref


@pytest.mark.parametrize("spec, message", [
    (dict(grid={}), "the grid is empty"),
    (dict(grid={"depth": []}), "grid axis 'depth' is empty"),
    (dict(grid={"dept": [1, 2]}), "unknown grid field 'dept'"),
    (dict(grid={"depth": [1, 2, 1]}), "duplicate points: depth lists 1 more than once"),
    (dict(grid={"depth": [1]}, seeds=[1, 1]), "duplicate points: a seed"),
    (dict(grid={"device_batch_size": [1, 2]}), "runtime field"),
    (dict(grid={"seed": [1, 2]}), "seeds are their own axis"),
    (dict(grid={"depth": [1]}, recipe="nope"), "unknown recipe 'nope'"),
])
def test_bad_grids_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        Sweep("bad", **spec)


def test_points_that_are_one_artifact_are_refused():
    # the recipe's num_iterations wins over target_flops: both budgets would train the same model
    sw = preset("tiny", grid={"depth": (1,)}, overrides={"base": {"num_iterations": 5}})
    with pytest.raises(ConfigError, match=r"duplicate points: num_iterations=5 wins over target_flops"):
        sweep_steps(sw)
    with pytest.raises(ConfigError, match="duplicate points"):  # an A/B whose arms change nothing
        sweep_steps(preset("tiny", grid={"depth": (1,)}, seeds=(1, 2), arms={"A": {}, "B": {"base": {}}}))


def test_cli_refuses_a_bad_grid_in_one_line(capsys):
    for argv in (["sweep", "--grid", "dept=1,2", "--plan"], ["sweep", "--depths", "1", "1", "--plan"],
                 ["compare", "--depths", "1", "--seeds", "1", "--b", "base.matrix_lr=0.1", "--plan"]):
        assert cli.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"nanorun {argv[0]}: error:"), err


def test_points_share_one_data_tokenizer_and_bundle(shared_data):
    plan = sweep_steps(preset("tiny"), eval_bundle=str(shared_data / "eval_bundle"))
    assert [s.name for s in plan.shared] == ["data", "tokenizer", "eval_bundle"]
    assert len(plan.points) == 6 and len(plan.steps) == 3 + 6 + 6
    refs = {}
    for s in plan.steps:
        refs[s.name] = artifact_ref(s.stage, s.cfg, {k: refs[v] for k, v in s.inputs.items()})
    pretrains = [s for s in plan.steps if s.stage == "pretrain"]
    assert {tuple(s.inputs.values()) for s in pretrains} == {("data", "tokenizer")}
    assert {(s.cfg.depth, s.cfg.target_flops, s.cfg.num_iterations) for s in pretrains} == {
        (d, f, -1) for d in (1, 2, 3) for f in (1e10, 3e10)}  # the recipe's fixed horizon is cleared
    assert len({refs[s.name] for s in pretrains}) == 6

    # an A/B that changes only pretraining shares every upstream artifact across its arms
    ab = sweep_steps(preset("tiny", grid={"depth": (1, 2)}, seeds=(1, 2), core=False,
                           arms={"A": {}, "B": {"base": {"matrix_lr": 0.4}}}))
    assert [s.name for s in ab.shared] == ["data", "tokenizer"]
    assert [p.key for p in ab.points][:2] == ["A-d1-F1e10-s1", "A-d1-F1e10-s2"] and len(ab.points) == 16
    # ... and one that changes the tokenizer gets its own tokenizer
    tok = sweep_steps(preset("tiny", grid={"depth": (1,)}, seeds=(1, 2), core=False,
                            arms={"A": {}, "B": {"tokenizer": {"vocab_size": 1088}}}))
    assert [s.name for s in tok.shared] == ["data", "tokenizer", "tokenizer-B"]


def test_presets_reproduce_the_reference_scripts():
    sl, mini = preset("scaling-laws"), preset("miniseries")
    assert sl.grid == {"depth": (10, 12, 14, 16, 18, 20), "target_flops": (1e18, 2.15e18, 4.64e18, 1e19)}
    assert mini.grid["depth"] == tuple(range(12, 27, 2)) and mini.grid["target_param_data_ratio"] == (12.0,)
    plan = sweep_steps(mini, eval_bundle="https://example.org/bundle.zip")
    cfg = next(s.cfg for s in plan.steps if s.stage == "pretrain")
    assert (cfg.target_flops, cfg.num_iterations, cfg.nproc) == (-1, -1, 8)
    assert set(PRESETS) == {"scaling-laws", "miniseries", "tiny"}


def _rows(kind):
    from tests.stagekit.test_stats import chinchilla_rows

    if kind == "sweep":
        rows, _, _ = chinchilla_rows([1e18, 1e19, 1e20], [-0.4, 0.0, 0.4, 0.8], noise=1e-4)
        for r in rows:
            r["core"] = 0.1
        return rows
    out = []
    for arm, shift in (("A", 0.0), ("B", -0.05)):  # B is better by 0.05 bpb at d2, no different at d1
        for depth in (1, 2):
            for seed, eps in zip((1, 2, 3), (-0.004, 0.001, 0.003)):
                out.append(dict(point=f"{arm}-d{depth}-s{seed}", arm=arm, cell=f"d{depth}", depth=depth, seed=seed,
                                target_flops=None, flops=1e10 * depth, val_bpb=2.0 + eps + (shift if depth == 2 else 0.0)
                                + (0.002 if arm == "B" and depth == 1 and seed == 1 else 0.0),
                                core=None, status="ok"))
    return out


def test_report_stage_writes_table_fits_and_plots(tmp_path):
    from artifacts import open_store
    from pipeline.execute import execute
    from stages.sweep_report import Config
    from tests.conftest import png_size

    store = open_store(str(tmp_path / "store"))
    rows = _rows("sweep") + [dict(point="d9-F1e21-s1", arm="", cell="d9-F1e21", depth=9, status="failed: boom")]
    m = execute("sweep_report", Config(name="synthetic", rows=rows), {}, store)
    d = store.materialize(m.ref)
    assert {"results.csv", "report.md", "analysis.json", "bpb_vs_flops.png", "scaling_fits.png",
            "core_vs_flops.png"} <= {f.path for f in m.files}
    assert all(png_size(d / f)[0] > 300 for f in ("bpb_vs_flops.png", "scaling_fits.png", "core_vs_flops.png"))
    table = list(csv.DictReader(open(d / "results.csv")))
    assert len(table) == len(rows) and table[-1]["status"] == "failed: boom"
    report = (d / "report.md").read_text()
    assert "N_opt ∝ C^a: exponent 0.45" in report and "D_opt ∝ C^b: exponent 0.54" in report
    assert "- d9-F1e21-s1: failed: boom" in report
    assert m.metrics["n_failed"] == 1 and abs(m.metrics["n_opt_fit"]["slope"] - 0.4516) < 0.03
    assert execute("sweep_report", Config(name="synthetic", rows=rows), {}, store).ref == m.ref  # cached

    c = execute("sweep_report", Config(name="ab", kind="compare", rows=_rows("compare")), {}, store)
    assert c.metrics["verdicts"] == {"d1": {"val_bpb": "no detectable difference"}, "d2": {"val_bpb": "better"}}
    text = (store.materialize(c.ref) / "report.md").read_text()
    assert "| d2 | val_bpb | 3 / 3 |" in text and "- d2: val_bpb: B better than A" in text and "- d1: val_bpb: no detectable difference" in text
    with pytest.raises(ConfigError, match="no rows"):
        Config(name="x", rows=())


@pytest.mark.slow
def test_sweep_and_compare_on_cpu(tmp_path, shared_data, monkeypatch, capsys, pretrain_launches):
    """`nanorun sweep` on a CPU through the Prefect flow: d4 cannot train at this budget (0 steps) and
    fails alone; the next run adds d3 and trains only it; the one after is fully cached. Then
    `nanorun compare` reuses the sweep's d1 model as arm A's first seed and prints its verdicts."""
    store = str(tmp_path / "store")
    launched = pretrain_launches
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")
    common = ["--store", store]
    grid = ["--preset", "tiny", "--flops", "2.5e9", "--eval-bundle", str(shared_data / "eval_bundle")]

    assert cli.main([*common, "sweep", *grid, "--depths", "1", "2", "4"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 point(s) failed (d4-F2.5e09-s42: ConfigError: pretrain: the horizon gives 0 iterations" in err
    assert len(launched) == 2

    assert cli.main([*common, "sweep", *grid, "--depths", "1", "2", "3"]) == 0
    assert len(launched) == 3  # only d3 trained
    out = capsys.readouterr().out
    assert "| d3-F2.5e09 | 3 |" in out and "failed" not in out
    report_dir = out.strip().splitlines()[-1].split(": ", 1)[1]
    from pathlib import Path

    files = {p.name for p in Path(report_dir).iterdir()}
    assert {"results.csv", "report.md", "bpb_vs_flops.png", "core_vs_flops.png"} <= files
    rows = list(csv.DictReader(open(Path(report_dir) / "results.csv")))
    assert [r["depth"] for r in rows] == ["1", "2", "3"] and all(r["core"] and r["val_bpb"] for r in rows)

    # all cached: answered from the store, without Prefect's temporary server (14 s before)
    import cli.commands as commands

    prefect_env = commands._prefect_env
    monkeypatch.setattr(commands, "_prefect_env", lambda: pytest.fail("started Prefect for a fully cached sweep"))
    t0 = time.monotonic()
    assert cli.main([*common, "sweep", *grid, "--depths", "1", "2", "3"]) == 0
    assert time.monotonic() - t0 <= 2.0
    cached = capsys.readouterr()
    assert cached.out == out and len(launched) == 3 and "all 10 steps are committed and verified" in cached.err
    monkeypatch.setattr(commands, "_prefect_env", prefect_env)

    assert cli.main([*common, "compare", *grid, "--depths", "1", "--seeds", "42", "43", "--no-core",
                     "--b", "base.matrix_lr=0.02"]) == 0
    assert len(launched) == 3 + 3  # A-s42 is the sweep's d1 model
    out = capsys.readouterr().out
    assert "# Compare tiny-compare: B vs A" in out and "| d1-F2.5e09 | val_bpb | 2 / 2 |" in out
    monkeypatch.setattr(commands, "_prefect_env", lambda: pytest.fail("started Prefect for a fully cached compare"))
    t0 = time.monotonic()
    assert cli.main([*common, "compare", *grid, "--depths", "1", "--seeds", "42", "43", "--no-core",
                     "--b", "base.matrix_lr=0.02"]) == 0
    assert time.monotonic() - t0 <= 2.0 and capsys.readouterr().out == out
    verdict = next(line for line in out.splitlines() if line.startswith("- d1-F2.5e09: val_bpb: "))
    assert verdict.split(": ")[-1] in ("B better than A", "B worse than A", "no detectable difference")


def test_compare_two_sweeps_results_csv(tmp_path, capsys):
    """Two commits: each worktree runs the same sweep into its own store; compare their tables."""
    from stagekit.reporting import write_csv
    from stages.sweep_report import BASE_COLUMNS

    rows = _rows("compare")
    for arm in "AB":
        write_csv(tmp_path / f"{arm}.csv", [{**r, "arm": ""} for r in rows if r["arm"] == arm], BASE_COLUMNS)
    assert cli.main(["compare", "--csv", str(tmp_path / "A.csv"), "--csv", str(tmp_path / "B.csv")]) == 0
    out = capsys.readouterr().out
    assert "- d1: val_bpb: no detectable difference" in out and "- d2: val_bpb: B better than A" in out
    assert cli.main(["compare", "--csv", str(tmp_path / "A.csv")]) == 2
    assert "give exactly two results.csv files" in capsys.readouterr().err


def test_compare_report_states_its_arms_and_a_pooled_verdict(tmp_path):
    from artifacts import open_store
    from pipeline.sweep import Sweep, report_config
    from pipeline.execute import execute
    from stages.sweep_report import Config, analyze_compare, compare_figure

    sw = Sweep(name="ab", recipe="tiny", grid={"depth": [1, 2]}, seeds=(1, 2, 3),
               arms={"A": {}, "B": {"base": {"matrix_lr": 0.02}}})
    cfg = report_config(sw, _rows("compare"))
    assert cfg["arms"] == [("A", "no overrides"), ("B", "base.matrix_lr=0.02")]
    store = open_store(str(tmp_path / "store"))
    m = execute("sweep_report", Config(**cfg), {}, store)
    d = store.materialize(m.ref)
    text = (d / "report.md").read_text()
    head = text.split("## Per cell")[0]
    assert "- **A**: no overrides" in head and "- **B**: base.matrix_lr=0.02" in head
    # d1 alone: no difference, d2 alone: better; across both the verdict is one line with its method
    assert "- val_bpb: **B better than A** (mean Δ -0.0247 over 2 cell(s); Stouffer's Z" in head
    assert m.metrics["pooled"] == {"val_bpb": "better"}
    # every cell also gets a seeded bootstrap interval of Δ beside Welch's: its own column, in the JSON too
    assert "| Δ | 95% CI | 95% bootstrap | p | verdict |" in text
    cells = analyze_compare(list(Config(**cfg).rows), 0.95)["cells"]
    assert all(c["val_bpb"]["boot_low"] <= c["val_bpb"]["diff"] <= c["val_bpb"]["boot_high"] for c in cells)
    assert cells == analyze_compare(list(Config(**cfg).rows), 0.95)["cells"]  # seeded: the same report twice
    table = list(csv.DictReader(open(d / "results.csv")))
    assert {(r["arm"], r["arm_overrides"]) for r in table} == {("A", "no overrides"), ("B", "base.matrix_lr=0.02")}
    fig = compare_figure(analyze_compare(list(Config(**cfg).rows), 0.95, dict(cfg["arms"])))
    legends = [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]
    assert legends == ["B (base.matrix_lr=0.02) − A (no overrides)"]


def test_frontier_is_the_best_point_per_budget_and_fits_need_three_budgets():
    from stages.sweep_report import analyze_sweep, sweep_markdown

    def row(depth, budget, flops, bpb):
        return dict(point=f"d{depth}-F{budget:.0e}", arm="", cell=f"d{depth}-F{budget:.0e}", depth=depth, seed=1,
                    target_flops=budget, flops=flops, val_bpb=bpb, core=None, scaling_params=1e5 * depth,
                    tokens=flops / (6e5 * depth), status="ok")

    # d3 lands slightly under the 1e10 budget and is worse than d1 at it: not a frontier point
    rows = [row(1, 1e10, 1e10, 2.00), row(3, 1e10, 9.82e9, 2.20), row(1, 3e10, 3e10, 1.90), row(3, 3e10, 2.9e10, 1.95)]
    a = analyze_sweep(rows)
    assert a["frontier"] == ["d1-F1e+10", "d1-F3e+10"]
    assert "bpb_fit" not in a and "n_opt_fit" not in a
    md = sweep_markdown("x", rows, a, [])
    assert "- no frontier fit: 2 budget(s) with points, a fit needs 3+: add 1 more FLOP budget(s) (--flops)" in md
    assert "- no N_opt(C) / D_opt(C) fit: 2 budget(s) with an isoFLOP optimum, a fit needs 3+" in md
    a = analyze_sweep(rows + [row(1, 1e11, 1e11, 1.80), row(3, 1e11, 1e11, 1.70)])
    assert a["frontier"] == ["d1-F1e+10", "d1-F3e+10", "d3-F1e+11"] and a["bpb_fit"]["n"] == 3
