"""The resume staging area (artifacts/staging.py) on both backends: a snapshot is visible only once
its STAGED.json is written, downloads are verified, re-snapshots send only what changed, older and
unfinished snapshots are pruned, and gc treats the area like the other uncommitted leftovers."""
from __future__ import annotations

import json

import pytest

from artifacts import ChecksumError, open_store
from artifacts.lease import Lease
from artifacts.staging import MARKER, STAGING, CheckpointStaging, Snapshot, checkpoint_staging
from tests.artifacts.fixtures import make_ref, put, s3_store, store  # noqa: F401 (fixtures)


def _tree(root, files: dict[str, bytes]):
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def _snapshot_files(step: int, log: bytes = b"row\n") -> dict[str, bytes]:
    d = f"checkpoints/step_{step:06d}"
    return {f"{d}/model.pt": bytes([step]) * 1000, f"{d}/meta.json": b'{"step": %d}' % step, "metrics.jsonl": log}


def _upload(area, tmp_path, step: int, **kw) -> Snapshot:
    src = _tree(tmp_path / f"src-{step}-{len(list(tmp_path.iterdir()))}", _snapshot_files(step, **kw))
    return area.upload(src, f"step_{step:06d}", step)


def test_snapshots_commit_by_marker_prune_and_resnapshot(store, tmp_path):  # noqa: F811
    area = CheckpointStaging(store, make_ref("d2"))
    assert area.snapshots() == [] and area.age() == float("inf")
    _upload(area, tmp_path, 4)
    # an upload interrupted after its first file (stop() turns true): nothing committed, never picked
    src = _tree(tmp_path / "src-8", _snapshot_files(8))
    calls = []
    assert area.upload(src, "step_000008", 8, stop=lambda: bool(calls.append(1)) or len(calls) > 1) is None
    assert store._dirs(area.base) == ["step_000004", "step_000008"]
    assert [s.step for s in area.snapshots()] == [4] and area.age() < 60

    snap = _upload(area, tmp_path, 12)
    dest = tmp_path / "fetched"
    area.fetch(snap, dest)
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == _snapshot_files(12)

    # snapshotting a step again (fresher logs) sends only the changed file, and drops the old generation
    again = _upload(area, tmp_path, 12, log=b"row\nrow2\n")
    keys = {f.path: f.key for f in snap.files}
    new_keys = {f.path: f.key for f in again.files}
    assert new_keys["checkpoints/step_000012/model.pt"] == keys["checkpoints/step_000012/model.pt"]
    assert new_keys["metrics.jsonl"] != keys["metrics.jsonl"]
    assert store._dirs(f"{area.base}/step_000012") == sorted({k.split("/")[0] for k in new_keys.values()})

    area.prune(keep={12})  # the older complete one and the unfinished upload go
    assert store._dirs(area.base) == ["step_000012"] and [s.step for s in area.snapshots()] == [12]
    area.prune(keep=set())  # ...but never the newest complete snapshot
    assert [s.step for s in area.snapshots()] == [12]

    area.discard()
    assert store._dirs(area.base) == [] and area.snapshots() == []


def test_damaged_or_crafted_snapshots_are_refused(store, tmp_path):  # noqa: F811
    area = CheckpointStaging(store, make_ref("d2"))
    snap = _upload(area, tmp_path, 4)
    f = next(f for f in snap.files if f.path.endswith("model.pt"))
    store._write(f"{area.base}/{snap.name}/{f.key}", b"x" * f.size)  # same size, other bytes
    with pytest.raises(ChecksumError):
        area.fetch(snap, tmp_path / "fetched")
    assert not (tmp_path / "fetched" / f.path).exists()
    # a STAGED.json naming a path outside the work dir is not a snapshot
    crafted = json.loads(snap.to_json())
    crafted["files"][0]["path"] = "../../.bashrc"
    store._write(f"{area.base}/step_000009/{MARKER}", json.dumps(crafted).encode())
    assert [s.step for s in area.snapshots()] == [4]


def test_mirroring_only_where_the_store_cannot_see_the_work_dir(tmp_path, s3_store, monkeypatch):  # noqa: F811
    local = open_store(str(tmp_path / "store"), index=False)
    ref = make_ref("d2")
    assert checkpoint_staging(local, ref, local.work_dir(ref)) is None  # inside the store's own root
    area = checkpoint_staging(s3_store, ref, s3_store.work_dir(ref))
    assert isinstance(area, CheckpointStaging) and str(area).endswith(f"/{STAGING}/toy/{ref.name}")
    _upload(area, tmp_path, 4)
    assert checkpoint_staging(s3_store, ref, s3_store.work_dir(ref)).snapshots()  # kept...
    assert checkpoint_staging(s3_store, ref, s3_store.work_dir(ref), clear=True).snapshots() == []  # ...unless forced
    monkeypatch.setenv("NANORUN_MIRROR_CHECKPOINTS", "0")
    assert checkpoint_staging(s3_store, ref, s3_store.work_dir(ref)) is None


def test_gc_removes_staging_of_committed_and_abandoned_builds(store, tmp_path):  # noqa: F811
    done, failed, running = make_ref("a", 1), make_ref("b", 2), make_ref("c", 3)
    for i, ref in enumerate((done, failed, running)):
        _upload(CheckpointStaging(store, ref), tmp_path, 4 + i)
    put(store, done, {"w.bin": b"w"})
    store.set_alias("toy", "keep", done)
    lease = Lease(store, running)
    assert lease.try_acquire()
    with lease:
        staged = lambda report: sorted(i.what.rsplit("/", 1)[-1] for i in report.items if i.kind == "staging")  # noqa: E731
        assert staged(store.gc(dry_run=True)) == [done.name]  # the failed build's is recent: kept for a rerun
        assert staged(store.gc(dry_run=True, grace_s=0)) == [done.name, failed.name]  # the live build's: never
        report = store.gc(dry_run=False, grace_s=0)
        assert all(i.bytes > 1000 for i in report.items if i.kind == "staging")
    assert store._dirs(f"{STAGING}/toy") == [running.name]


def test_a_lost_lease_stops_writing_the_area(tmp_path):
    """Once this builder lost the lease the area is the new builder's: no upload, no prune, from any
    thread (the checkpoint uploader runs on its own)."""
    import threading

    from artifacts.lease import building

    store = open_store(str(tmp_path / "store"), index=False)
    ref = make_ref("fenced")
    area = CheckpointStaging(store, ref)
    _upload(area, tmp_path, 4)
    lease = Lease(store, ref, ttl=30)
    assert lease.try_acquire()
    with building(lease):
        lease._lose("taken over by another builder that presumed us dead")
        got = []
        t = threading.Thread(target=lambda: got.append(_upload(area, tmp_path, 8)))
        t.start()
        t.join()
        area.prune(keep=())
        assert got == [None] and [s.step for s in area.snapshots()] == [4]
    lease.release()
