"""The store's behaviour, one suite run against both backends (local directory, S3 on moto)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from artifacts import (AmbiguousRefError, ArtifactRef, ChecksumError, CorruptManifestError, Manifest,
                       NotCommittedError, StoreError, UnknownRefError, open_store)
from artifacts.lease import Lease
from artifacts.manifest import MANIFEST_NAME
from tests.artifacts.fixtures import make_ref, put, run_python, s3_store, store, tamper  # noqa: F401 (fixtures)

FILES = {"a.txt": b"hello\n", "sub/b.bin": os.urandom(70_000), "empty": b""}


def test_commit_then_read_back(store, tmp_path):
    ref = make_ref("a")
    assert store.manifest(ref) is None
    m = put(store, ref, FILES, metrics={"loss": 0.25})
    assert store.manifest(ref) == m
    assert {f.path: f.size for f in m.files} == {p: len(d) for p, d in FILES.items()}
    assert m.metrics == {"loss": 0.25} and m.provenance["committed_at"]
    assert store.verify(ref).ok and store.verify(ref, deep=True).ok
    path = store.materialize(ref)
    assert {p: (path / p).read_bytes() for p in FILES} == FILES
    assert [x.ref for x in store.list()] == [ref] and store.list("other") == []
    assert store.get_alias("toy", "latest") == ref
    dest = store.pull(ref, tmp_path / "pulled")
    assert {p: (dest / p).read_bytes() for p in FILES} == FILES
    assert Manifest.from_json((dest / MANIFEST_NAME).read_text()) == m


def test_work_dir_is_deterministic_and_survives(store):
    ref = make_ref("w")
    w1 = store.work_dir(ref)
    (w1 / "ckpt").write_text("step 100")
    assert store.work_dir(ref) == w1 and (w1 / "ckpt").read_text() == "step 100"
    assert not any(store.work_dir(ref, clear=True).iterdir())
    assert store.manifest(ref) is None  # a work dir is never visible as committed


def test_verify_reports_damage(store):
    ref = make_ref("v")
    put(store, ref, FILES)
    tamper(store, ref, "a.txt", b"HELLO\n")  # same size, different bytes
    assert store.verify(ref, fast=True).ok
    full = store.verify(ref)
    assert not full.ok and "sha256 mismatch a.txt" in full.problems[0] and full.check == "size and sha256"
    tamper(store, ref, "sub/b.bin", b"short")
    tamper(store, ref, "empty", None)
    problems = store.verify(ref).problems
    assert any("size mismatch sub/b.bin" in p for p in problems) and any("missing file empty" in p for p in problems)
    assert "not committed" in store.verify(make_ref("nothing")).problems[0]


def test_corrupt_manifest_is_not_committed(store):
    ref = make_ref("c")
    put(store, ref, FILES)
    store._write(store._manifest_key(ref), b'{"version": 1, "stage": "toy"')
    with pytest.raises(CorruptManifestError, match="not valid JSON"):
        store.manifest(ref)
    assert not store.verify(ref).ok
    assert store.list() == []
    with pytest.raises(CorruptManifestError):
        store.materialize(ref)


def test_resolve(store):
    a = ArtifactRef("toy", "a", "abcd000000000001")
    b = ArtifactRef("toy", "b", "abcd000000000002")
    c = ArtifactRef("other", "c", "ef01000000000003")
    for r in (a, b, c):
        put(store, r, {"x": r.label.encode()})
    assert store.resolve(str(a)) == a and store.resolve("toy/a-abcd0") == a
    assert store.resolve("ef01") == c and store.resolve("other/ef01") == c
    assert store.resolve("abcd0000000000012"[:16]) == a
    assert store.resolve("toy@latest") == b and store.resolve("other@latest") == c
    with pytest.raises(AmbiguousRefError, match="toy/a-abcd000000000001, toy/b-abcd000000000002"):
        store.resolve("abcd")
    for bad, msg in [("abc", "too short"), ("toy/a-ffff000000000001", "unknown ref"), ("9999", "unknown ref"),
                     ("toy@nope", "no alias"), ("nostage/abcd", "no artifacts of stage"), ("hello world", "not an artifact ref")]:
        with pytest.raises(UnknownRefError, match=msg):
            store.resolve(bad)


def test_aliases(store):
    a, b = make_ref("a"), make_ref("b")
    put(store, a, {"x": b"1"})
    put(store, b, {"x": b"2"})
    store.set_alias("toy", "leaderboard-2026-11-23", a)
    assert store.get_alias("toy", "leaderboard-2026-11-23") == a
    assert store.aliases() == {"toy@latest": b, "toy@leaderboard-2026-11-23": a}
    assert store.resolve("toy@leaderboard-2026-11-23") == a
    with pytest.raises(NotCommittedError):
        store.set_alias("toy", "x", make_ref("ghost"))
    with pytest.raises(StoreError, match="is a toy artifact"):
        store.set_alias("other", "x", a)
    with pytest.raises(StoreError, match="bad alias name"):
        store.set_alias("toy", "has/slash", a)
    store.delete_alias("toy", "leaderboard-2026-11-23")
    assert store.get_alias("toy", "leaderboard-2026-11-23") is None


def test_replace_commit_drops_old_files(store):
    ref = make_ref("r")
    put(store, ref, {"old.bin": b"1" * 100, "keep": b"k"})
    m = put(store, ref, {"new.bin": b"2" * 50, "keep": b"K"})
    assert [f.path for f in m.files] == ["keep", "new.bin"]
    assert store.verify(ref, deep=True).ok
    assert set(store._file_sizes(ref)) == {"keep", "new.bin"}
    path = store.materialize(ref)
    assert (path / "keep").read_bytes() == b"K" and not (path / "old.bin").exists()


def test_delete(store):
    ref = make_ref("d")
    put(store, ref, FILES)
    store.set_alias("toy", "mine", ref)
    store.delete(ref)
    assert store.manifest(ref) is None and store._file_sizes(ref) == {}
    assert store.aliases() == {}
    with pytest.raises(NotCommittedError):
        store.materialize(ref)


def test_push_between_backends(store, tmp_path, s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    other = open_store(str(tmp_path / "other")) if store.url.startswith("s3://") else open_store(f"s3://{bucket}/x")
    up, down = make_ref("up"), make_ref("down")
    put(store, up, FILES)
    put(store, down, {"y": b"2"}, inputs={"src": up})
    m = store.push(down, other, with_inputs=True)
    assert other.manifest(down) == m and other.manifest(up) == store.manifest(up)
    assert other.verify(up, deep=True).ok and other.verify(down, deep=True).ok
    assert other.get_alias("toy", "latest") is None  # a copy is not a new build
    assert store.push(down, other) == m  # already there: no-op


def test_push_refuses_damaged_source(store, tmp_path):
    ref = make_ref("bad")
    put(store, ref, FILES)
    tamper(store, ref, "a.txt", b"HELLO\n")
    other = open_store(str(tmp_path / "other"))
    with pytest.raises(ChecksumError):
        store.push(ref, other)
    assert other.manifest(ref) is None


def test_gc(store):
    half = make_ref("half")  # an interrupted build: files but no manifest, nobody holding the lease
    put(store, half, {"x": b"h"})
    store._remove(store._manifest_key(half))
    old, new, dep = make_ref("m", 1), make_ref("m", 2), make_ref("dep")
    put(store, old, {"x": b"1" * 10})
    put(store, dep, {"x": b"d"})
    put(store, new, {"x": b"2" * 20}, inputs={"src": dep})  # latest -> new -> dep: both reachable
    (store.work_dir(make_ref("abandoned")) / "ckpt").write_text("x")
    busy = make_ref("busy")
    lease = Lease(store, busy, inputs=[old])  # a live build that reads `old`
    assert lease.try_acquire()
    (store.work_dir(busy) / "f").write_text("x")
    try:
        report = store.gc(dry_run=True, grace_s=0)
        kinds = {(i.kind, i.what.rsplit("/", 1)[-1]) for i in report.items if i.kind != "cache"}
        assert kinds == {("uncommitted", half.name), ("staging", make_ref("abandoned").name)}, report.format()
        assert store.manifest(old) is not None and store._file_sizes(half)  # dry run deleted nothing
        lease.release()
        report = store.gc(dry_run=False, grace_s=0)
        assert ("unreferenced", old.key) in {(i.kind, i.what) for i in report.items}
        assert report.total_bytes >= 10 and not report.dry_run
        assert [m.ref for m in store.list()] == sorted([dep, new])
        assert store._file_sizes(half) == {} and store._file_sizes(old) == {}
        assert store.gc(dry_run=True, grace_s=0).items == []
    finally:
        lease.release()


def test_gc_grace_keeps_recent_leftovers(store):
    half = make_ref("half")
    put(store, half, {"x": b"h"})
    store._remove(store._manifest_key(half))
    report = store.gc(dry_run=True, grace_s=3600)
    assert not [i for i in report.items if i.kind == "uncommitted"] and any(half.key in k for k in report.kept)


# ---- crash safety: a writer SIGKILLed mid-commit leaves nothing committed ----------------------
WRITER = """
import os, sys, time
from pathlib import Path
from artifacts import open_store, Manifest
from tests.artifacts.fixtures import make_ref
store = open_store(sys.argv[1] if len(sys.argv) > 1 else os.environ["STORE"])
ref = make_ref("killme")
work = store.work_dir(ref)
for i in range(3):
    (work / f"f{i}.bin").write_bytes(bytes([i]) * (20 << 20 if i == 0 else 1 << 20))
ready = Path(os.environ["READY"])
def pause():
    ready.touch()
    time.sleep(120)
point, s3 = os.environ["KILL_POINT"], store.url.startswith("s3://")
if point == "files" and s3:   # after the first multipart part went up
    real = store.client.upload_part
    def upload_part(**kw):
        r = real(**kw)
        pause()
    store.client.upload_part = upload_part
elif point == "files":        # while hashing (before anything moved into place)
    import artifacts.files as files
    real_sha, calls = files.sha256_file, []
    def sha(path, fsync=False):
        calls.append(path)
        if len(calls) == 2:
            pause()
        return real_sha(path, fsync)
    files.sha256_file = sha
else:                          # every file in place, the manifest about to be written
    real_write = store._write
    import artifacts.local as local
    real_atomic = local.write_atomic
    def write(key, data):
        if key.endswith("MANIFEST.json"):
            pause()
        return real_write(key, data)
    def atomic(path, data, durable=True):
        if path.name == "MANIFEST.json":
            pause()
        return real_atomic(path, data, durable)
    store._write, local.write_atomic = write, atomic
store.commit(ref, work, Manifest("toy", ref.label, ref.fingerprint, "1", {}, {}, {}, []))
print("COMMITTED")
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["files", "manifest"])
def test_sigkill_mid_commit_leaves_nothing_committed(store, tmp_path, point):
    ready = tmp_path / "ready"
    proc = run_python(WRITER, STORE=store.url, READY=ready, KILL_POINT=point)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "writer never reached the kill point"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ref = make_ref("killme")
    assert store.manifest(ref) is None
    assert not store.verify(ref).ok and store.list() == []
    with pytest.raises(UnknownRefError):
        store.resolve(ref.fingerprint[:8])
    # The rerun gets its work dir back (the local store even after the rename) and commits cleanly.
    work = store.work_dir(ref)
    assert sorted(p.name for p in work.iterdir()) == ["f0.bin", "f1.bin", "f2.bin"]
    m = store.commit(ref, work, Manifest("toy", ref.label, ref.fingerprint, "1", {}, {}, {}, []))
    assert m.total_bytes == (20 << 20) + (2 << 20)
    assert store.verify(ref, deep=True).ok
    kinds = {i.kind for i in store.gc(dry_run=False, grace_s=0).items}
    if store.url.startswith("s3://") and point == "files":
        assert "multipart" in kinds  # the killed writer's half-finished upload is aborted
    assert store.verify(ref, deep=True).ok


# ---- S3 downloads: resumable with Range GETs, checksum-verified ---------------------------------
def test_interrupted_download_resumes_with_range(s3_store, monkeypatch):
    store = s3_store
    import artifacts.s3 as s3mod

    monkeypatch.setattr(s3mod, "SEGMENT_MIN", 256 << 10)  # 4 ranged streams for a 1 MiB file
    ref = make_ref("big")
    data = os.urandom(1 << 20)
    put(store, ref, {"big.bin": data, "small": b"s"})
    shutil.rmtree(store._cache_dir(ref))  # as on another machine: nothing cached
    real_get = store.client.get_object
    ranges = []

    class Breaking:
        def __init__(self, body):
            self.body = body

        def iter_chunks(self, n):
            for i, chunk in enumerate(self.body.iter_chunks(32 << 10)):
                if i == 2:
                    raise ConnectionResetError("connection reset by peer (test)")
                yield chunk

    def flaky(**kw):
        ranges.append(kw.get("Range"))
        r = real_get(**kw)
        return {**r, "Body": Breaking(r["Body"])} if kw["Key"].endswith("big.bin") else r

    monkeypatch.setattr(store.client, "get_object", flaky)
    with pytest.raises(ConnectionResetError):
        store.materialize(ref)
    cache = store._cache_dir(ref)
    assert not (cache / MANIFEST_NAME).exists() and not (cache / "big.bin").exists()
    state = json.loads((cache / "big.bin.nanorun-part.json").read_text())
    assert state["progress"] == [i * (256 << 10) + (64 << 10) for i in range(4)]
    monkeypatch.setattr(store.client, "get_object", real_get)
    before = store.bytes_downloaded
    path = store.materialize(ref)
    assert (path / "big.bin").read_bytes() == data
    assert store.bytes_downloaded - before == len(data) - 4 * (64 << 10)  # only the rest was fetched
    assert not list(path.glob("*.nanorun-part*"))


def test_download_detects_corruption(s3_store, monkeypatch):
    store = s3_store
    ref = make_ref("rot")
    put(store, ref, {"x.bin": b"a" * 5000})
    shutil.rmtree(store._cache_dir(ref))
    tamper(store, ref, "x.bin", b"b" * 5000)
    with pytest.raises(ChecksumError, match="sha256"):
        store.materialize(ref)
    assert not store._cache_dir(ref).joinpath("x.bin").exists()


def test_materialize_cache_follows_replacement(s3_store):
    store = s3_store
    ref = make_ref("cache")
    put(store, ref, {"x": b"one"})
    first = store.materialize(ref)
    assert (first / "x").read_bytes() == b"one"
    # Another machine rebuilds the artifact (force): our cached copy must not be served.
    other = open_store(store.url)
    other.local = store.local.parent / "elsewhere"
    put(other, ref, {"x": b"two", "y": b"new"})
    path = store.materialize(ref)
    assert (path / "x").read_bytes() == b"two" and (path / "y").read_bytes() == b"new"


def test_unreachable_endpoint_is_named(tmp_path, monkeypatch, nanorun_home):
    from tests.conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("NANORUN_S3_MAX_ATTEMPTS", "1")
    s = open_store("s3://nowhere/x")
    from artifacts import StoreUnreachableError

    with pytest.raises(StoreUnreachableError, match=endpoint.replace(".", r"\.")):
        s.list()


def test_open_store_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("NANORUN_STORE", raising=False)
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "h"))
    assert open_store().url == str(tmp_path / "h")
    monkeypatch.setenv("NANORUN_STORE", str(tmp_path / "s"))
    assert open_store().url == str(tmp_path / "s")
    assert open_store(f"file://{tmp_path}/f").url == f"{tmp_path}/f"
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("gs://bucket")
    s3 = open_store("s3://bkt/a/b/")
    assert (s3.bucket, s3.prefix, s3.url) == ("bkt", "a/b", "s3://bkt/a/b")
    assert str(s3.local).startswith(str(tmp_path / "h"))  # machine-local state under $NANORUN_HOME


def test_commit_refuses_reserved_names(store):
    ref = make_ref("reserved")
    work = store.work_dir(ref)
    (work / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="reserved"):
        store.commit(ref, work, Manifest("toy", ref.label, ref.fingerprint, "1", {}, {}, {}, []))
    assert store.manifest(ref) is None
