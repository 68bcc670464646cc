"""`nanorun import nanochat DIR` and `nanorun export REF --format nanochat`: from the CLI, a checkpoint
nanochat made becomes tokenizer + pretrain artifacts that stages take like trained ones (their
provenance says where they came from), a bad one is one line and exit 2, and exporting an artifact
then importing the folder gives back the same weights and tokenizer, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from artifacts import open_store
from core.checkpoint import load_model
from core.layouts import model_checkpoint, tokenizer_dir
from cli.main import main

DATA = Path(__file__).resolve().parents[1] / "data" / "nanochat_d2"
pytestmark = pytest.mark.usefixtures("one_thread")


def nanorun(*argv) -> int:
    return main([str(a) for a in argv])


def test_import_commits_tokenizer_and_pretrain_artifacts_with_provenance(tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert nanorun("import", "nanochat", DATA, "--store", store_dir) == 0
    store = open_store(str(store_dir))
    tok_m, model_m = store.require(store.resolve("tokenizer@latest")), store.require(store.resolve("pretrain@latest"))
    assert model_m.inputs["tokenizer"] == tok_m.ref
    assert model_m.provenance["imported_from"] == "nanochat" and model_m.provenance["step"] == 30
    assert model_m.provenance["model_config"]["n_layer"] == 2
    assert set(model_m.provenance["sha256"]) == {"model_000030.pt", "meta_000030.json", "tokenizer.pkl", "token_bytes.pt"}
    # what every consumer does with a trainer artifact: the checkpoint pointer, the meta, the tokenizer check
    model, meta = load_model(model_checkpoint(store.materialize(model_m.ref)))
    assert meta["kind"] == "base" and meta["tokenizer"] == {"fingerprint": tok_m.fingerprint, "vocab_size": 512}
    assert (tokenizer_dir(store.materialize(tok_m.ref)) / "tokenizer.json").is_file()
    # the same files again: the same artifacts, nothing rebuilt
    out = capsys.readouterr().out
    assert nanorun("import", "nanochat", DATA / "base_checkpoints", "--store", store_dir) == 0
    assert capsys.readouterr().out == out


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    d = tmp_path / "chatsft_checkpoints" / "d2"
    d.mkdir(parents=True)
    meta = json.loads((DATA / "base_checkpoints" / "d2" / "meta_000030.json").read_text())
    meta["model_config"]["n_mtp_heads"] = 2
    (d / "meta_000030.json").write_text(json.dumps(meta))
    (d / "model_000030.pt").symlink_to(DATA / "base_checkpoints" / "d2" / "model_000030.pt")
    rc = nanorun("import", "nanochat", d, "--tokenizer", DATA / "tokenizer", "--store", tmp_path / "store")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "['n_mtp_heads']" in err, err
    assert nanorun("import", "nanochat", tmp_path / "nowhere", "--store", tmp_path / "store") == 2


def test_export_then_import_reproduces_the_artifact_bit_for_bit(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "nanochat"
    assert nanorun("import", "nanochat", DATA, "--store", a) == 0
    assert nanorun("export", "pretrain@latest", "--format", "nanochat", "--to", out, "--store", a) == 0
    assert (out / "base_checkpoints" / "d2" / "model_000030.pt").is_file()
    assert {p.name for p in (out / "tokenizer").iterdir()} == {"tokenizer.pkl", "token_bytes.pt"}
    assert nanorun("import", "nanochat", out, "--store", b) == 0
    sa, sb = open_store(str(a)), open_store(str(b))
    ta, tb = (s.require(s.resolve("tokenizer@latest")) for s in (sa, sb))
    assert {f.path: f.sha256 for f in ta.files} == {f.path: f.sha256 for f in tb.files}  # tokenizer.json, token_bytes.npy
    wa = torch.load(model_checkpoint(sa.materialize(sa.resolve("pretrain@latest"))) / "model.pt", weights_only=True)
    wb = torch.load(model_checkpoint(sb.materialize(sb.resolve("pretrain@latest"))) / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) and wa[k].dtype == wb[k].dtype for k in wa)
