"""The run index: updated on commit, rebuilt from manifests, never blocking a commit."""
from __future__ import annotations

import math
import time

import pytest

from artifacts import open_store
from artifacts.index import RunIndex
from tests.artifacts.fixtures import make_ref, put, run_python


def test_commit_updates_index_and_lineage(tmp_path, nanorun_home):
    store = open_store(str(tmp_path / "s"))
    up, down = make_ref("up"), make_ref("down")
    put(store, up, {"x": b"12345"}, metrics={"loss": math.nan, "acc": 0.5})
    put(store, down, {"y": b"1"}, inputs={"src": up}, metrics={"core": 0.25})
    idx = RunIndex()
    assert idx.path == nanorun_home / "index.duckdb"
    rows = {r["ref"]: r for r in idx.artifacts(store=store.url)}
    assert set(rows) == {str(up), str(down)}
    assert rows[str(up)]["metrics"] == {"loss": None, "acc": 0.5}  # NaN has no JSON form: null
    assert rows[str(up)]["total_bytes"] == 5 and rows[str(down)]["stage"] == "toy"
    assert idx.lineage(down, store=store.url) == [
        {"ref": str(down), "input_name": "src", "input_ref": str(up), "depth": 1}]
    assert [r["ref"] for r in idx.lineage(up, upstream=False)] == [str(down)]
    best = idx.query("SELECT ref FROM artifacts WHERE CAST(metrics->>'core' AS DOUBLE) > ?", [0.1])
    assert best == [{"ref": str(down)}]
    store.delete(down)
    assert [r["ref"] for r in idx.artifacts(store=store.url)] == [str(up)]


def test_rebuild_from_manifests(tmp_path, nanorun_home):
    store = open_store(str(tmp_path / "s"), index=False)  # commits bypass the index entirely
    refs = [make_ref(f"r{i}") for i in range(3)]
    for r in refs:
        put(store, r, {"x": r.label.encode()})
    idx = RunIndex()
    assert not idx.path.exists() and idx.artifacts() == []
    assert idx.ensure(store) is True  # missing -> rebuilt from the store's manifests
    assert sorted(r["ref"] for r in idx.artifacts(store=store.url)) == sorted(map(str, refs))
    assert idx.ensure(store) is False  # known store: no rebuild
    store._remove(store._manifest_key(refs[0]))  # uncommitted behind the index's back
    assert idx.rebuild(store) == 2
    assert sorted(r["ref"] for r in idx.artifacts(store=store.url)) == sorted(map(str, refs[1:]))
    other = open_store(str(tmp_path / "other"))
    put(other, make_ref("o"), {"x": b"o"})
    assert len(idx.artifacts()) == 3 and len(idx.artifacts(store=other.url)) == 1


HOLD_LOCK = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1] if len(sys.argv) > 1 else __import__('os').environ['DB'])
print('locked', flush=True)
time.sleep(1.5)
con.close()
"""


@pytest.mark.slow
def test_busy_index_never_blocks_a_commit(tmp_path, nanorun_home, monkeypatch):
    store = open_store(str(tmp_path / "s"))
    idx = RunIndex()
    idx.ensure(store)  # create the database
    monkeypatch.setattr(RunIndex, "write_wait", 0.2)
    holder = run_python(HOLD_LOCK, DB=idx.path)
    assert holder.stdout.readline().strip() == "locked"
    t = time.time()
    ref = make_ref("while-busy".replace("-", "_"))
    put(store, ref, {"x": b"1"})  # the index is locked by the other process
    assert time.time() - t < 1.2
    assert len(list(idx.journal.glob("*.json"))) == 1  # parked in the journal, not lost
    holder.wait(timeout=30)
    idx.ensure(store)
    assert [r["ref"] for r in idx.artifacts(store=store.url)] == [str(ref)]
    assert not list(idx.journal.glob("*.json"))
