"""Nightly runs do not grow the store without bound: gc keeps the newest N nights per preset."""
from __future__ import annotations

import pytest

from artifacts import open_store
from pipeline.retention import night_store_url, prune_nights
from tests.artifacts.fixtures import make_ref, put, store  # noqa: F401 (fixture)


def test_prune_keeps_the_newest_nights_of_each_preset_and_the_main_store(store, capsys, monkeypatch):  # noqa: F811
    import cli.main as cli

    nights = [f"2026-11-{d:02d}" for d in range(1, 11)]
    for preset, days in (("tiny", nights), ("cpu-demo", nights[:3])):
        for night in days:
            put(open_store(night_store_url(store.url, preset, night)), make_ref(night.replace("-", "")), {"w.bin": b"x" * 64})
    main_ref = make_ref("main")
    put(store, main_ref, {"m.bin": b"m"})
    store.set_alias("toy", "keep", main_ref)

    assert prune_nights(store, 7, dry_run=True) == [f"@nightly/tiny/{n}" for n in nights[:3]]
    assert store._dirs("@nightly/tiny") == nights  # a dry run deletes nothing
    monkeypatch.setenv("NANORUN_KEEP_NIGHTS", "7")
    assert cli.main(["--store", store.url, "gc"]) == 0
    out = capsys.readouterr().out
    assert out.count("removed nightly root @nightly/tiny/") == 3
    assert store._dirs("@nightly/tiny") == nights[3:] and store._dirs("@nightly/cpu-demo") == nights[:3]
    assert store.verify(main_ref).ok  # the main store's artifacts are gc's own business, untouched here
    kept = open_store(night_store_url(store.url, "tiny", nights[-1]))
    assert kept.verify(kept.refs()[0]).ok
    assert cli.main(["--store", store.url, "gc", "--keep-nights", "0"]) == 2
    assert "nanorun gc: error: gc: keep must be >= 1 night, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_nights(store, 0)


def test_prune_counts_nights_not_runs(store):  # noqa: F811
    """A night's added rows (rerun="add": 2026-11-02-2, ...) are kept or removed with their night."""
    runs = ["2026-11-01", "2026-11-01-2", "2026-11-02", "2026-11-02-2", "2026-11-02-10", "2026-11-03"]
    for run in runs:
        put(open_store(night_store_url(store.url, "tiny", run)), make_ref(run.replace("-", "")), {"w.bin": b"x"})
    assert prune_nights(store, 2) == ["@nightly/tiny/2026-11-01", "@nightly/tiny/2026-11-01-2"]
    assert sorted(store._dirs("@nightly/tiny")) == sorted(runs[2:])
