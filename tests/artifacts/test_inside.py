"""Nothing outside the artifact is ever read or written: a checkpoint pointer that leads out is
refused, a link planted in an artifact is reported by verify, a pulled folder is checked against its
own manifest before use, a pull never writes through a link planted in the destination, and a
manifest naming itself as its input does not send push --with-inputs into endless recursion."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from artifacts import ChecksumError, open_store
from artifacts import verified
from artifacts.local import require_intact_folder, verify_folder
from core.layouts import CHECKPOINT_POINTER, LayoutError, model_checkpoint
from cli.main import main
from tests.artifacts.fixtures import make_ref, put, s3_store, store, tamper  # noqa: F401 (fixtures)
from tests.cli.test_cli import one_line_error

WEIGHTS = bytes(range(256)) * 4096  # 1 MiB


def _outside_checkpoint(tmp_path):
    outside = tmp_path / "outside" / "step_000024"
    outside.mkdir(parents=True)
    (outside / "meta.json").write_text("{}")
    return outside


POINTERS = {
    "climbing out": lambda outside: "../" * 12 + str(outside).lstrip("/"),
    "absolute": str,
    "dot-dot past the root": lambda outside: "checkpoints/../../x",
}


@pytest.mark.parametrize("kind", sorted(POINTERS))
def test_checkpoint_pointer_cannot_lead_outside_the_artifact(tmp_path, kind):
    outside = _outside_checkpoint(tmp_path)
    art = tmp_path / "art"
    art.mkdir()
    (art / CHECKPOINT_POINTER).write_text(json.dumps({"checkpoint": POINTERS[kind](outside), "step": 24}))
    with pytest.raises(LayoutError, match="outside|relative"):
        model_checkpoint(art)


def test_checkpoint_pointer_through_a_link_inside_is_refused(tmp_path):
    outside = _outside_checkpoint(tmp_path)
    art = tmp_path / "art"
    art.mkdir()
    (art / "checkpoints").symlink_to(outside.parent)
    (art / CHECKPOINT_POINTER).write_text(json.dumps({"checkpoint": "checkpoints/step_000024"}))
    with pytest.raises(LayoutError, match="outside"):
        model_checkpoint(art)
    (art / CHECKPOINT_POINTER).write_text("[1, 2]")
    with pytest.raises(LayoutError, match="damaged"):
        model_checkpoint(art)


def test_chat_refuses_a_committed_pointer_that_leads_outside(tmp_path, nanorun_home, capsys):
    """The manifest hashes the crafted pointer, so verify passes: the consumer must refuse it."""
    outside = _outside_checkpoint(tmp_path)
    store = open_store(str(tmp_path / "store"), index=False)
    tok = make_ref("tok", stage="tokenizer")
    put(store, tok, {"tokenizer.json": b"{}"})
    ref = make_ref("m", stage="sft")
    escape = "../" * 12 + str(outside).lstrip("/")
    put(store, ref, {CHECKPOINT_POINTER: json.dumps({"checkpoint": escape, "step": 24}).encode(),
                     "checkpoints/step_000024/meta.json": b"{}"}, inputs={"tokenizer": tok})
    assert store.verify(ref).ok
    code = main(["--store", store.url, "chat", str(ref), "-p", "hi"])
    one_line_error(code, capsys.readouterr().err, "leads outside")


def test_a_link_planted_in_an_artifact_is_reported(tmp_path, nanorun_home):
    store = open_store(str(tmp_path / "store"), index=False)
    ref = make_ref("linked")
    put(store, ref, {"a.txt": b"a"})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret").write_text("x")
    art = store.root / ref.key
    (art / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (art / "b.txt").symlink_to(art / "a.txt")
    v = store.verify(ref)
    assert not v.ok and v.problems == [
        "not a regular file: b.txt (a symlink or special file; artifacts hold regular files only)",
        "not a regular file: sub (a symlink or special file; artifacts hold regular files only)"]
    with pytest.raises(ChecksumError, match="not a regular file"):
        store.materialize(ref)


def test_a_damaged_pulled_folder_is_refused_and_checks_are_remembered(store, tmp_path, monkeypatch, capsys):
    ref = make_ref("pulled")
    put(store, ref, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    folder = store.pull(ref, tmp_path / "B")
    assert verify_folder(folder).ok and verify_folder(tmp_path) is None
    hashed = []
    real = verified.sha256_file
    monkeypatch.setattr(verified, "sha256_file", lambda p: hashed.append(p) or real(p))
    for name in ("model.safetensors", "config.json"):
        os.utime(folder / name, ns=(0, 0))  # old enough to be remembered (not racily clean)
    require_intact_folder(folder)
    assert len(hashed) == 2
    hashed.clear()
    require_intact_folder(folder)
    assert hashed == []  # unchanged files are not read again
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[4096:8192] = bytes(4096)  # same size, other bytes
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256 mismatch model.safetensors"):
        require_intact_folder(folder)
    code = main(["chat", str(folder), "-p", "hi"])
    one_line_error(code, capsys.readouterr().err, "sha256 mismatch model.safetensors", "pull it again")


def test_pull_never_writes_through_a_planted_link(store, tmp_path):
    ref = make_ref("planted")
    put(store, ref, {"a.txt": b"hello\n", "sub/w.bin": WEIGHTS, "sub/deeper/c": b"c"})
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    twin = tmp_path / "twin"
    twin.write_bytes(b"hello\n")
    dest = tmp_path / "B"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "w.bin.nanorun-part").symlink_to(victim)
    (dest / "a.txt.nanorun-part").symlink_to(victim)
    (dest / "a.txt").symlink_to(twin)  # the right bytes, but through a link: replaced, not kept
    store.pull(ref, dest)
    assert victim.read_bytes() == b"precious" and twin.read_bytes() == b"hello\n"
    assert not (dest / "a.txt").is_symlink() and (dest / "sub" / "w.bin").read_bytes() == WEIGHTS
    assert verify_folder(dest).ok
    shutil.rmtree(dest / "sub")
    (dest / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a directory link on the way
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ChecksumError, match="leading out of"):
        store.pull(ref, dest)
    assert not any((tmp_path / "elsewhere").iterdir())


def test_push_with_inputs_survives_a_manifest_naming_itself(store, tmp_path):
    a, b = make_ref("a"), make_ref("b")
    put(store, a, {"x": b"1"}, inputs={"self": a, "other": b})
    put(store, b, {"y": b"2"}, inputs={"back": a})
    other = open_store(str(tmp_path / "other"), index=False)
    m = store.push(a, other, with_inputs=True)
    assert other.manifest(a) == m and other.manifest(b) == store.manifest(b)
