"""The leaderboard's rows without Prefect or training (pipeline/board.py, flows/leaderboard.py): rows
grouped by recipe (preset plus its digest), the run id and one date format, a 120-column default
view, the nightly judged only against its own recipe."""
from __future__ import annotations

import argparse
import csv
import io
import json

import pytest

from cli.info_commands import Leaderboard
from pipeline.board import _mark_nights, format_rows, format_stats, recipe_stats

IDS = {600: "a" * 12, 1500: "b" * 12, 24: "c" * 12}  # recipe digests of tiny at 600 / 1500 / 24 steps


def _row(steps, bpb, tag="", core=0.07, date="2026-12-05T14:38:12.5+00:00", seconds=100.0, **extra):
    r = {"store": "/s", "ref": f"report/x-{steps}-{tag}-{bpb}", "committed_at": "2026-12-05 14:40:00+00:00",
         "preset": "tiny", "recipe_id": IDS[steps], "depth": 2, "date": date, "git_commit": "0123456789abcdef",
         "hardware": "cpu x2 (host-with-a-long-name)", "total_seconds": seconds, "training_time_s": 50.0,
         "time_to_gpt2_s": None, "cost": 0.0, "val_bpb": bpb, "core": core, "core_n_tasks": 4, "core_label": "CORE",
         "tag": tag, **{f"{s}_s": 10.0 for s in ("data", "tokenizer", "base", "base_eval", "sft", "chat_eval", "export")}}
    r.update(extra)
    return r


def _board(*more):
    rows = [_row(600, 1.60), _row(600, 1.62), _row(1500, 1.50), _row(1500, 1.52),
            _row(24, 2.70, tag="20261204"), _row(24, 2.72, tag="20261205"), _row(24, 2.71, tag="20261205-2"), *more]
    _mark_nights(rows)
    return rows


def test_stats_never_pool_runs_of_different_recipes():
    stats = {e["recipe"]: e for e in recipe_stats(_board())}
    assert set(stats) == {"tiny aaaaaa", "tiny bbbbbb", "tiny cccccc"}
    assert stats["tiny aaaaaa"]["runs"] == 2 and stats["tiny aaaaaa"]["val_bpb"] == pytest.approx(1.61)
    assert stats["tiny cccccc"]["val_bpb_sd"] == pytest.approx(0.01)  # the nightlies' own noise, not 0.54
    assert "| tiny bbbbbb | 2 | 1.5100 ± 0.0141 |" in format_stats(recipe_stats(_board()))


def test_rows_show_the_run_id_and_one_date_format():
    board = _board()
    assert [r["run"] for r in board] == ["manual"] * 4 + ["2026-12-04", "2026-12-05", "2026-12-05-2"]
    assert {r["date"] for r in board} == {"2026-12-05 14:38"}
    legacy = [{**_row(24, 2.7, tag="20261206"), "date": None, "recipe_id": None}]
    _mark_nights(legacy)
    assert legacy[0]["date"] == "2026-12-05 14:40" and legacy[0]["recipe"] == "tiny ?"


def test_regressions_are_judged_within_a_recipe():
    # a nightly of another recipe (far worse bpb) right after: not a regression of the 24-step nights
    rows = [_row(24, 2.70, tag="20261204"), _row(1500, 3.50, tag="20261205"), _row(24, 2.71, tag="20261206"),
            _row(24, 3.20, tag="20261207")]
    _mark_nights(rows)
    assert [r["regressed"] for r in rows] == ["", "", "", "bpb"]


def test_default_view_fits_120_columns_and_wide_has_every_column():
    rows = _board(_row(24, 2.9, tag="20261207-12", core=0.0694, seconds=36000.0))
    rows[-1]["regressed"] = "CORE, bpb, time"  # the widest the column gets
    narrow = format_rows(rows)
    assert max(len(line) for line in narrow.splitlines()) <= 120
    assert "| 2026-12-05 14:38 | 2026-12-05-2 | tiny cccccc | 0123456 |" in narrow and "0.0694 4/22" in narrow
    wide = format_rows(rows, wide=True)
    assert max(len(line) for line in wide.splitlines()) > 120
    head = wide.splitlines()[0]
    assert all(c in head for c in ("hardware", "pretrain time", "sft", "cost", "depth"))


def test_json_and_csv_flags_give_every_field():
    p = argparse.ArgumentParser()
    Leaderboard.add_arguments(p)
    assert p.parse_args(["--json"]).format == "json" and p.parse_args(["--csv"]).format == "csv"
    assert p.parse_args([]).format == "md" and p.parse_args(["--wide"]).wide
    board = _board()
    data = json.loads(format_rows(board, "json"))
    assert data[-1]["run"] == "2026-12-05-2" and data[-1]["recipe_id"] == IDS[24] and "hardware" in data[-1]
    table = list(csv.DictReader(io.StringIO(format_rows(board, "csv"))))
    assert table[0]["recipe"] == "tiny aaaaaa" and "sft_s" in table[0]


def test_nightly_compares_only_nights_of_its_recipe(tmp_path, nanorun_home):
    from artifacts import open_store
    from flows.leaderboard import previous_nights
    from tests.artifacts.fixtures import make_ref, put

    store = open_store(str(tmp_path / "store"), index=False)
    for i, (night, steps) in enumerate((("2026-12-03", 24), ("2026-12-04", 1500), ("2026-12-05", 24))):
        ref = make_ref(f"n{i}", seed=i, stage="report")
        put(store, ref, {"report.md": b"x"}, metrics={"recipe_id": IDS[steps], "val_bpb": 2.7})
        store.set_alias("report", f"nightly-tiny-{night}", ref)
    assert [r for r, _ in previous_nights(store, "tiny", "2026-12-06", recipe_id=IDS[24])] == ["2026-12-03", "2026-12-05"]
    assert [r for r, _ in previous_nights(store, "tiny", "2026-12-06")] == ["2026-12-03", "2026-12-04", "2026-12-05"]
