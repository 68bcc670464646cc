"""The nightly leaderboard flow: per-night stores, the report aliased in the main store, the
comparison with the previous night, regressions failing the run, the pinned commit enforced, a
second run of the same night refused, added or replacing the night as asked.

Each night's store is seeded with a copy of the session's tiny run, so only the report (tagged with
the night) is built: the flow logic is what is under test here, not training."""
from __future__ import annotations

import json
import re
import shutil

import pytest

import cli.main as cli
from artifacts import open_store
from pipeline.board import rows
from flows.leaderboard import REFUSED, compare, nightly_leaderboard, nightly_runs

pytestmark = pytest.mark.slow


def _seed(tiny_run, main_root, preset, night):
    src = tiny_run[0].root
    shutil.copytree(src, main_root / "@nightly" / preset / night, ignore=shutil.ignore_patterns(".staging", ".leases"))


def test_two_nights_then_a_regression(tiny_run, shared_data, tmp_path):
    main_root = tmp_path / "main"
    main = open_store(str(main_root))
    common = dict(preset="tiny", store=str(main_root), eval_bundle=str(shared_data / "eval_bundle"),
                  chat_data=str(shared_data / "chat"))

    _seed(tiny_run, main_root, "tiny", "2026-11-21")
    first = nightly_leaderboard(date="2026-11-21", **common)
    assert first["previous"] is None and first["regressions"] == []
    assert main.get_alias("report", "nightly-tiny-2026-11-21") is not None
    assert first["store"].endswith("@nightly/tiny/2026-11-21")
    assert "nightly" not in main.stages()  # the per-night roots are not mistaken for a stage

    # the previous night looked much better on CORE: tonight is a regression
    prev_ref = main.get_alias("report", "nightly-tiny-2026-11-21")
    path = main_root / prev_ref.key / "MANIFEST.json"
    data = json.loads(path.read_text())
    data["metrics"]["core"] += 0.5
    path.write_text(json.dumps(data))
    _seed(tiny_run, main_root, "tiny", "2026-11-22")
    state = nightly_leaderboard(date="2026-11-22", return_state=True, **common)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=r"tiny 2026-11-22 regressed: core"):
        state.result()
    tonight = main.get_alias("report", "nightly-tiny-2026-11-22")
    assert tonight is not None and tonight != prev_ref  # the tag keeps the nights apart
    listed = [r["ref"] for r in rows(preset="tiny")]
    assert str(prev_ref) in listed and str(tonight) in listed and len(listed) == len(set(listed))
    by_ref = {r["ref"]: r for r in rows(preset="tiny")}
    assert by_ref[str(tonight)]["run"] == "2026-11-22" and by_ref[str(tonight)]["recipe"].startswith("tiny ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", by_ref[str(tonight)]["date"])  # the one date format


def test_a_second_run_of_a_night_is_refused_added_or_replaces_it(tiny_run, shared_data, tmp_path, nanorun_home,
                                                                  capsys, monkeypatch):
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")  # `nanorun nightly` would set it for the session
    main_root = tmp_path / "main"
    main = open_store(str(main_root))
    night = "2026-11-21"
    common = dict(preset="tiny", store=str(main_root), eval_bundle=str(shared_data / "eval_bundle"),
                  chat_data=str(shared_data / "chat"), date=night, fail_on_regression=False)

    def board():  # the leaderboard of this test's own run index (nanorun_home)
        return rows(preset="tiny")

    _seed(tiny_run, main_root, "tiny", night)
    first = nightly_leaderboard(**common)
    assert first["run"] == night and [r["ref"] for r in board()] == [first["report"]]

    # the default (the schedule's): a night has one row; a second run says how to get another
    state = nightly_leaderboard(return_state=True, **common)
    reason = (r"^nightly tiny 2026-11-21 already has a report \(2026-11-21\): "
              r"set rerun='add' .* or rerun='replace' to rebuild it$")
    with pytest.raises(ValueError, match=reason):
        state.result()
    # `prefect deployment run --watch` ends with the final state's name; the UI shows its message
    assert state.is_failed() and state.name == REFUSED and re.match(reason, state.message)

    _seed(tiny_run, main_root, "tiny", f"{night}-2")
    capsys.readouterr()
    assert cli.main(["--store", str(main_root), "nightly", "--preset", "tiny", "--rerun", "add", "--date", night,
                     "--eval-bundle", common["eval_bundle"], "--chat-data", common["chat_data"]]) == 0
    said = capsys.readouterr().out  # `nanorun nightly` ran the flow: its result, from its line and the store
    added = {"run": f"{night}-2", "report": str(main.get_alias("report", f"nightly-tiny-{night}-2")),
             "store": said.split("(store ")[1].split(")")[0],
             "nights_compared": int(said.split("compared with ")[1].split()[0])}
    assert said.startswith(f"nightly tiny {night}-2: report {added['report']} (store ") and "regressions: none" in said
    assert added["run"] == f"{night}-2" and added["store"].endswith(f"@nightly/tiny/{night}-2")
    assert added["nights_compared"] == 1 and added["report"] != first["report"]  # its own row, judged
    assert sorted(r["ref"] for r in board()) == sorted([first["report"], added["report"]])
    assert sorted(r["run"] for r in board()) == [night, f"{night}-2"]  # the run ids tell the rows apart

    _seed(tiny_run, main_root, "tiny", f"{night}-3")
    again = nightly_leaderboard(rerun="replace", **common)
    assert again["run"] == f"{night}-3" and again["nights_compared"] == 0
    assert [(r["ref"], r["run"]) for r in board()] == [(again["report"], f"{night}-3")]  # one row for the night
    assert nightly_runs(main, "tiny") == [f"{night}-3"] and main._dirs("@nightly/tiny") == [f"{night}-3"]
    assert main.list("report") == [main.require(main.resolve(again["report"]))]  # the old reports are gone


def test_the_leaderboard_marks_nightly_rows_and_their_regressions():
    from pipeline.board import _mark_nights

    def night(tag, core, preset="tiny"):
        return {"tag": tag, "preset": preset, "core": core, "val_bpb": 1.0, "total_seconds": 100.0, "date": "x"}

    board = [night("20261121", 0.30), night("20261122", 0.10), night("20261122", 0.10, "d20"),
             {**night("", 0.05), "date": "2026-11-23T10:00"}, night("20261121-2", 0.10)]
    _mark_nights(board)
    assert [r["run"] for r in board] == ["2026-11-21", "2026-11-22", "2026-11-22", "manual", "2026-11-21-2"]
    assert [r["date"] for r in board] == ["x", "x", "x", "2026-11-23 10:00", "x"]
    # CORE fell by far more than the fixed tolerance stands in for (one earlier run: no measured noise
    # yet); the night's second row (20261121-2) comes after its first, before the next night
    assert [r["regressed"] for r in board] == ["", "", "", "", "CORE"]


def test_pinned_commit_is_enforced(tmp_path):
    state = nightly_leaderboard(preset="tiny", store=str(tmp_path), commit="0000000deadbeef", return_state=True)
    with pytest.raises(ValueError, match="pinned to commit 0000000deadbeef"):
        state.result()


def test_compare():
    """With one earlier night the fixed tolerances stand in; with several, their measured noise rules."""
    tol = dict(core_noise=0.02, bpb_noise=0.02, slowdown=0.25)
    prev = [{"core": 0.20, "val_bpb": 1.00, "total_seconds": 100}]
    assert compare({"core": 0.19, "val_bpb": 1.01, "total_seconds": 110}, prev, **tol)[0] == []
    regs, table = compare({"core": 0.10, "val_bpb": 1.10, "total_seconds": 200}, prev, **tol)
    assert [r.split()[0] for r in regs] == ["core", "val_bpb", "total_seconds"]
    assert all("fixed tolerance" in t["rule"] for t in table)
    assert compare({"core": None, "val_bpb": 2.0, "total_seconds": 1}, [], core_noise=0, bpb_noise=0, slowdown=0) == ([], [])

    # quiet nights: a 0.01 bpb rise (inside the fixed 0.02 tolerance) is far outside their noise
    quiet = [{"core": 0.2 + e, "val_bpb": 1.0 + e / 10, "total_seconds": 100 + 100 * e} for e in (0, 0.001, -0.001, 0.0005)]
    regs, table = compare({"core": 0.2, "val_bpb": 1.01, "total_seconds": 100}, quiet, **tol)
    assert [r.split()[0] for r in regs] == ["val_bpb"] and "over 4 nights" in table[1]["rule"]
    # noisy nights: a 0.05 CORE drop (beyond the fixed 0.02) is within their noise
    noisy = [{"core": c} for c in (0.20, 0.28, 0.14, 0.24, 0.17)]
    assert compare({"core": 0.16}, noisy, **tol)[0] == []
