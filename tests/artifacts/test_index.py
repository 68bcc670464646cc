"""The run index: updated on commit, rebuilt from manifests, never blocking a commit."""
from __future__ import annotations

import json
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


def test_ls_follows_the_store_not_a_stale_index(nanorun_home, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.delenv("NANORUN_STORE", raising=False)
    store = open_store()  # the local root is $NANORUN_HOME, where the Prefect home lives too
    (nanorun_home / "prefect" / "storage").mkdir(parents=True)
    gone, bad, kept = make_ref("gone"), make_ref("bad"), make_ref("kept")
    for r in (gone, bad, kept):
        put(store, r, {"x": r.label.encode()})
    assert main(["ls"]) == 0
    assert sorted(line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]) == sorted(
        map(str, (gone, bad, kept)))
    assert store.stages() == ["toy"]  # prefect/ is not a stage
    store._remove(store._manifest_key(gone))  # uncommitted and corrupted behind the index's back
    broken = json.loads(store._read(store._manifest_key(bad)))
    broken["files"][0]["size"] = "big"
    store._write(store._manifest_key(bad), json.dumps(broken).encode())
    elsewhere = make_ref("elsewhere")
    put(open_store(index=False), elsewhere, {"x": b"e"})  # committed by another machine
    assert main(["ls"]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()[1:]] == [str(elsewhere), str(kept)]
    assert "2 artifact(s)" in err and "prefect" not in out
    assert sorted(r["ref"] for r in RunIndex().artifacts(store=store.url)) == sorted([str(elsewhere), str(kept)])


CORRUPTIONS = {
    "garbage": lambda data: bytes(range(256)) * 80,
    "truncated": lambda data: data[: len(data) // 2],
    "flipped block": lambda data: data[:12288] + bytes(b ^ 0x5A for b in data[12288:12800]) + data[12800:],
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_index_is_moved_aside_and_rebuilt(nanorun_home, capsys, monkeypatch, kind):
    """A damaged index.duckdb made ls, index --rebuild and leaderboard fail forever with "locked by
    another process": it is a cache of the manifests, so it is rebuilt from them."""
    from cli.main import main

    monkeypatch.delenv("NANORUN_STORE", raising=False)
    store = open_store()
    refs = [make_ref(f"c{i}") for i in range(3)]
    for r in refs:
        put(store, r, {"x": r.label.encode()})
    idx = RunIndex()
    assert len(idx.artifacts(store=store.url)) == 3
    idx.path.write_bytes(CORRUPTIONS[kind](idx.path.read_bytes()))
    for argv in (["ls"], ["index", "--rebuild"], ["leaderboard"], ["ls"]):
        started = time.monotonic()
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        assert time.monotonic() - started < 5  # no waiting out a lock that is not there
    out = capsys.readouterr().out
    assert all(str(r) in out for r in refs)
    assert sorted(r["ref"] for r in idx.artifacts(store=store.url)) == sorted(map(str, refs))
    assert len(list(nanorun_home.glob("index.duckdb.corrupt-*"))) == 1  # kept for a post-mortem, once
