"""A damaged artifact is never consumed silently: same-size damage is caught by the
sha256 check on every consuming path, unchanged files are not rehashed, unlisted files and
malformed manifests are reported in one line."""
from __future__ import annotations

import json
import os

import pytest

from artifacts import ChecksumError, CorruptManifestError
from artifacts import verified
from cli.main import main
from pipeline.execute import execute, status
from pipeline.plan import Step, format_plan, plan_rows
from tests.artifacts import toy_consumer, toy_stage
from tests.artifacts.fixtures import forget_local_copy, make_ref, put, s3_store, store, tamper  # noqa: F401 (fixtures)

WEIGHTS = bytes(range(256)) * 256  # 64 KiB


def flip_4k(store, ref, path: str) -> None:
    """Flip 4 KiB in the middle of a stored file: same size, different bytes."""
    data = bytearray(store._read(f"{ref.key}/{path}"))
    data[16384:20480] = bytes(b ^ 0xFF for b in data[16384:20480])
    tamper(store, ref, path, bytes(data))


def test_same_size_damage_is_caught_and_refused(store):
    ref = make_ref("w")
    put(store, ref, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    if hasattr(store, "root"):
        store.materialize(ref)  # consumed once: a later check must not trust that blindly
    flip_4k(store, ref, "model.safetensors")
    forget_local_copy(store, ref)
    fast = store.verify(ref, fast=True)
    assert fast.ok and "size checked" in str(fast)
    full = store.verify(ref)
    assert not full.ok and full.problems == [p for p in full.problems if "sha256 mismatch model.safetensors" in p]
    assert "size and sha256 checked" in str(full)
    with pytest.raises(ChecksumError, match="model.safetensors") as e:
        store.materialize(ref)  # S3: hashed on download
    assert "\n" not in str(e.value)


def test_damaged_local_copy_of_an_s3_artifact_is_fetched_again(s3_store):
    ref = make_ref("copy")
    put(s3_store, ref, {"model.safetensors": WEIGHTS})
    path = s3_store.materialize(ref)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[100:4196] = bytes(4096)
    (path / "model.safetensors").write_bytes(bytes(data))
    (path / "stray.txt").write_text("not in the manifest")
    again = s3_store.materialize(ref)
    assert (again / "model.safetensors").read_bytes() == WEIGHTS and not (again / "stray.txt").exists()


def test_unchanged_files_are_not_rehashed(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(WEIGHTS)
    got, hashed = verified.digests([f])
    assert hashed == 1 and len(got[f]) == 64
    assert verified.digests([f])[1] == 1  # just written: racily clean, not remembered yet
    old = f.stat().st_mtime - 10
    os.utime(f, (old, old))
    assert verified.digests([f])[1] == 1
    assert verified.digests([f]) == (got, 0)  # remembered by (path, size, mtime, ctime, inode)
    assert verified.digests([f], recheck=True)[1] == 1
    # Same-size damage with the mtime put back still changes the ctime: rehashed and caught.
    with open(f, "r+b") as fh:
        fh.seek(4096)
        fh.write(bytes(4096))
    os.utime(f, (old, old))
    got2, hashed = verified.digests([f])
    assert hashed == 1 and got2[f] != got[f]
    f.unlink()
    assert verified.digests([f])[0][f] == verified.MISSING


def test_unlisted_file_is_flagged(store):
    ref = make_ref("extra")
    put(store, ref, {"a.txt": b"a"})
    tamper(store, ref, "sub/extra.bin", b"xx")
    v = store.verify(ref)
    assert v.problems == ["unlisted file sub/extra.bin (2 bytes): in the artifact but not in its manifest"]
    if hasattr(store, "root"):
        with pytest.raises(ChecksumError, match="unlisted file sub/extra.bin"):
            store.materialize(ref)


MALFORMED = [
    lambda d: d["files"][0].update(size="big"),
    lambda d: d["files"][0].update(sha256=None),
    lambda d: d.update(inputs=["x"]),
    lambda d: d.update(files={"a": 1}),
    lambda d: d.pop("identity"),
    lambda d: b"[" * 100_000 + b"]" * 100_000,
]


def test_malformed_manifest_is_one_line(store, capsys):
    for i, edit in enumerate(MALFORMED):
        ref = make_ref(f"bad{i}")
        put(store, ref, {"a.txt": b"a"})
        d = json.loads(store._read(store._manifest_key(ref)))
        raw = edit(d)
        store._write(store._manifest_key(ref), raw if isinstance(raw, bytes) else json.dumps(d).encode())
        v = store.verify(ref)
        assert not v.ok and len(v.problems) == 1 and v.problems[0].startswith("corrupt manifest"), (i, v.problems)
        assert str(v)
        with pytest.raises(CorruptManifestError):
            store.materialize(ref)
    assert store.list() == []
    assert main(["--store", store.url, "verify", str(make_ref("bad0"))]) == 1
    out = capsys.readouterr().out
    assert "size must be a non-negative integer, got 'big'" in out and len(out.splitlines()) == 2


def test_cache_hit_rebuilds_damaged_target_and_consumer_refuses(tmp_path, store):
    cfg = toy_stage.Config(n=2, size=40_000, calls_dir=str(tmp_path))
    m = execute(toy_stage, cfg, {}, store)
    flip_4k(store, m.ref, "part1.bin")
    forget_local_copy(store, m.ref)
    with pytest.raises(ChecksumError, match="part1.bin") as e:
        execute(toy_consumer, toy_consumer.Config(), {"src": m.ref}, store)
    assert "\n" not in str(e.value)
    if not hasattr(store, "root"):
        return  # S3: a cache hit compares sizes; the bytes are hashed when a consumer downloads them
    steps = [Step("toy", toy_stage, cfg)]
    assert "will run" in format_plan(plan_rows(steps, store))
    execute(toy_stage, cfg, {}, store)
    assert (tmp_path / "calls").read_text().count("\n") == 2 and status(toy_stage, cfg, {}, store)[0] == "cached"
    assert execute(toy_consumer, toy_consumer.Config(), {"src": m.ref}, store).metrics == {"total": 80_000}


def test_cli_verify_says_which_check_ran(store, capsys):
    ref = make_ref("cli")
    put(store, ref, {"a.txt": b"hello"})
    assert main(["--store", store.url, "verify", str(ref)]) == 0
    assert "size and sha256 checked" in capsys.readouterr().out
    assert main(["--store", store.url, "verify", str(ref), "--fast"]) == 0
    assert "(1 files, 5 bytes, size checked)" in capsys.readouterr().out
    assert main(["--store", store.url, "verify", str(ref), "--deep"]) == 0  # old spelling still accepted
    assert "size and sha256 checked" in capsys.readouterr().out


def test_gc_forgets_the_digests_of_files_that_are_gone(tmp_path):
    """verified.sqlite keeps one row per file ever checked; files deleted since are dropped (nanorun gc)."""
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    for f in (kept, gone):
        f.write_bytes(WEIGHTS)
        old = f.stat().st_mtime - 10
        os.utime(f, (old, old))
        verified.digests([f])
    gone.unlink()
    rows = lambda: {p for p in (str(kept), str(gone)) if verified._remembered([p])}  # noqa: E731
    assert rows() == {str(kept), str(gone)}
    assert verified.forget_missing(dry_run=True) >= 1 and rows() == {str(kept), str(gone)}
    assert verified.forget_missing() >= 1
    assert rows() == {str(kept)} and verified.forget_missing() == 0



def test_an_unusable_verified_table_costs_a_rehash_never_an_error(tmp_path, monkeypatch):
    (tmp_path / "not-a-dir").write_text("a file where the table's folder should be")
    monkeypatch.setattr(verified, "db_path", lambda: tmp_path / "not-a-dir" / "verified.sqlite")
    f = tmp_path / "w.bin"
    f.write_bytes(WEIGHTS)
    old = f.stat().st_mtime - 10
    os.utime(f, (old, old))
    assert verified.digests([f])[1] == 1 and verified.digests([f])[1] == 1  # nothing remembered: hashed again
    assert verified.forget_missing() == 0
