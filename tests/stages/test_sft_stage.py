"""sft stage: the mixture as identity (content digests of data_dir files and packages, paths as
runtime), presets, URL sources fetched from a loopback server; and through execute with a local
store on a tiny pretrain artifact built by the real stages: the committed layout, the metrics, the
checkpoint (kind sft, the tokenizer record), progress and the cache hit on a runtime change."""
from __future__ import annotations

import json
import shutil

import pytest

from core.checkpoint import check_tokenizer, load_model
from core.layouts import model_checkpoint
from stages import pretrain, sft
from stagekit import sources
from stages.base import ConfigError, report_progress_to
from pipeline.execute import execute
from tests.stages._http_server import FileServer
from tests.train_helpers import store_with_data_and_tokenizer

_BUILT: dict = {}


def build_base(tmp_path_factory, shared_data):
    """A local store with data_shards, tokenizer and a short tiny pretrain artifact, built once per
    session (tests/stages/test_chat_eval_stage.py uses it too): ~15-30 s on a busy 2-core box."""
    key = id(tmp_path_factory)
    if key not in _BUILT:
        store, data, tok = store_with_data_and_tokenizer(tmp_path_factory.mktemp("sft-stage-base"),
                                                         shared_data / "corpus", docs=48)
        cfg = pretrain.preset("tiny", num_iterations=4, save_every=4, eval_every=4, omp_threads=1)
        base = execute("pretrain", cfg, {"data": data.ref, "tokenizer": tok.ref}, store)
        _BUILT[key] = (store, base.ref, tok.ref)
    return _BUILT[key]


@pytest.fixture(scope="module")
def chat(shared_data):
    return shared_data / "chat"


def test_identity_is_the_mixture_and_the_file_contents_not_their_paths(chat, tmp_path):
    a = sft.preset("tiny", data_dir=str(chat))
    ident = a.identity_dict()
    assert "data_dir" not in ident and a.runtime_dict()["data_dir"] == str(chat.resolve())
    assert set(ident["source_digests"]) == {"identity_conversations.jsonl", "gsm8k_train.jsonl", "gsm8k_test.jsonl",
                                            "english-words"}
    assert ident["train_mixture"][2] == {"task": "spelling_bee", "source": "english-words", "size": 8}
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("identity_conversations.jsonl", "gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        shutil.copy(chat / f, copy / f)
    b = sft.preset("tiny", data_dir=str(copy), device_batch_size=1, eval_every=1, omp_threads=1)
    assert b.identity_dict() == ident  # another copy of the same files, another way to run it: same artifact
    (copy / "gsm8k_test.jsonl").write_text((chat / "gsm8k_test.jsonl").read_text()[:5000].rsplit("\n", 1)[0] + "\n")
    changed = sft.preset("tiny", data_dir=str(copy))
    assert changed.source_digests["gsm8k_test.jsonl"] != ident["source_digests"]["gsm8k_test.jsonl"]
    stale = sft.Config.from_dict({**changed.identity_dict(), **changed.runtime_dict(),
                                  "source_digests": ident["source_digests"]})
    assert stale.resolve() is stale  # given digests are taken as they are (no I/O); the run refuses changed files
    with pytest.raises(RuntimeError, match="source 'gsm8k_test.jsonl' .* changed since the config was built"):
        sources.resolve_sources([*stale.train_mixture, *stale.val_mixture], stale.data_dir, stale.source_digests, tmp_path)
    assert sft.preset("tiny", data_dir=str(chat), matrix_lr=0.01).identity_dict() != ident
    assert sft.preset("tiny", data_dir=str(chat)).label() == "identity_gsm8k_spelling_bee_simple_spelling"


def test_config_errors_say_what_to_do(chat):
    one = ({"task": "gsm8k", "source": "gsm8k_train.jsonl"},)
    for kw, msg in [(dict(train_mixture=one), "set data_dir"),
                    (dict(train_mixture=({"task": "gsm8k", "source": str(chat / "gsm8k_train.jsonl")},),
                          data_dir=str(chat)), "must be a file name inside data_dir"),
                    (dict(train_mixture=({"task": "gsm8k", "source": "nope.jsonl"},), data_dir=str(chat)),
                     "nope.jsonl does not exist"),
                    (dict(), "train_mixture is empty"),
                    (dict(train_mixture=({"task": "gsm8k"},)), "needs a source"),
                    (dict(train_mixture=one, data_dir=str(chat), max_seq_len=256, device_batch_size=3,
                          total_batch_size=1024), "not a multiple of device_batch_size 3"),
                    (dict(train_mixture=one, data_dir=str(chat), warmdown_ratio=2.0), "sft: warmup_ratio, warmdown_ratio"),
                    (dict(train_mixture=one, data_dir=str(chat), nproc=0), "nproc=0")]:
        with pytest.raises(ConfigError, match=msg):
            sft.Config(**kw).resolve()
    offline = sft.preset("tiny")  # no chat data: the optional file sources are left out, packages stay
    assert [s["task"] for s in offline.train_mixture] == ["spelling_bee", "simple_spelling"]
    assert set(offline.source_digests) == {"english-words"}
    with pytest.raises(ConfigError, match="stage sft has no preset"):
        sft.preset("d99")


def test_presets(chat):
    demo = sft.preset("cpu-demo", data_dir=str(chat))
    names = [s.get("name") or s["task"] for s in demo.train_mixture]
    assert names == ["chitchat", "simple_spelling", "spelling_bee", "identity", "gsm8k"]
    offline = sft.preset("cpu-demo")  # without the chat data: package sources only
    assert [s["task"] for s in offline.train_mixture] == ["chitchat", "simple_spelling", "spelling_bee"]
    assert set(offline.source_digests) == {"chitchat-dataset", "english-words"}
    for name in ("d12", "d20", "d24", "d26", "d20-identity-spelling"):
        cfg = sft.preset(name)
        assert cfg.nproc == 8 and cfg.source_digests == {}  # URLs identify themselves
        epochs = {s.get("name") or s["task"]: s.get("epochs", 1) for s in cfg.train_mixture}
        if name == "d20-identity-spelling":  # the reference's earlier recipe, as a named preset
            assert epochs == {"smoltalk": 1, "identity": 2, "mmlu": 3, "gsm8k": 4, "simple_spelling": 1,
                              "spelling_bee": 1}
        else:  # its current recipe (HEAD) is the default
            assert epochs == {"smoltalk": 1, "mmlu": 3, "gsm8k": 4}


def test_url_sources_are_fetched_and_verified(chat, tmp_path):
    body = (chat / "identity_conversations.jsonl").read_bytes()[:20000].rsplit(b"\n", 1)[0] + b"\n"
    import hashlib

    with FileServer({"/ident.jsonl": body}) as srv:
        url = srv.url("/ident.jsonl")
        specs = [{"task": "conversations", "source": url, "sha256": hashlib.sha256(body).hexdigest()}]
        paths = sources.resolve_sources(specs, "", {}, tmp_path)
        assert open(paths[url], "rb").read() == body and paths[url].startswith(str(tmp_path / sources.SOURCES_DIR))
        with pytest.raises(Exception, match="does not match the expected"):
            sources.resolve_sources([{**specs[0], "sha256": "0" * 64}], "", {}, tmp_path / "other", retries=1)


@pytest.mark.slow
def test_sft_through_execute_on_a_tiny_pretrain_artifact(tmp_path_factory, shared_data, chat):
    store, base, tok = build_base(tmp_path_factory, shared_data)
    extra = (chat / "identity_conversations.jsonl").read_bytes()[-30000:].split(b"\n", 1)[1]
    with FileServer({"/web.jsonl": extra}) as srv:
        # wandb offline (as in the cpu-demo preset): its symlinks must not reach the store
        cfg = sft.preset("tiny", data_dir=str(chat), omp_threads=1, wandb="offline")
        cfg = sft.Config.from_dict({**cfg.identity_dict(), **cfg.runtime_dict(), "source_digests": None,
                                    "train_mixture": (*cfg.train_mixture, {"task": "conversations", "stop": 6,
                                                                           "source": srv.url("/web.jsonl"),
                                                                           "name": "web"})})
        events = []
        with report_progress_to(lambda step, total, info: events.append((step, total, info))):
            m = execute("sft", cfg, {"base": base, "tokenizer": tok}, store)
    mt = m.metrics
    total = mt["iterations"]
    assert events[-1][:2] == (total, total) and events[-1][2]["loss"] > 0
    assert mt["counts_per_task"] == {"identity": 24, "gsm8k": 24, "spelling_bee": 8, "simple_spelling": 16, "web": 6}
    assert mt["conversations"] + mt["skipped"] == 78 and mt["trained_tokens"] > 0
    assert (mt["max_seq_len"], mt["total_batch_size"], mt["grad_accum_steps"], mt["world_size"]) == (256, 1024, 2, 1)
    assert [s for s, _ in mt["val_loss_curve"]] == sorted({*range(0, total, 4), total})
    assert mt["final_val_loss"] < mt["val_loss_curve"][0][1]
    assert [s for s, _ in mt["loss_curve"]] == list(range(1, total + 1)) and mt["tok_per_s"] > 0
    assert mt["lrs"]["matrix_lr"] == pytest.approx(0.8 * 0.005)  # raw LR x init_lr_frac, no batch scaling

    paths = {f.path for f in m.files}
    assert {"checkpoint.json", "run.json", "mixture.json", "train.log", "metrics.jsonl", "attempts.jsonl",
            "loss_curve.png"} <= paths
    assert sorted({p.split("/")[1] for p in paths if p.startswith("checkpoints/")}) == [f"step_{total:06d}"]
    assert not any(p.startswith(sources.SOURCES_DIR + "/") for p in paths)  # downloads are not part of the artifact
    assert any(p.startswith("wandb/") and p.endswith(".wandb") for p in paths)  # the offline run, files only
    art = store.materialize(m.ref)
    mixture = json.loads((art / "mixture.json").read_text())
    assert mixture["train"][-1]["source"].endswith("/web.jsonl") and mixture["seed"] == 42
    model, meta = load_model(model_checkpoint(art))
    assert meta["kind"] == "sft" and meta["base"]["kind"] == "base" and model.config.n_layer == 2
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    check_tokenizer(meta, tok.fingerprint, 1024, "test")
    assert "optimizer warm start" in (art / "train.log").read_text()

    # a runtime change is the same artifact: a cache hit, nothing runs
    same = sft.Config.from_dict({**cfg.identity_dict(), **cfg.runtime_dict(), "source_digests": None,
                                 "eval_every": 1, "omp_threads": 1})
    again = execute("sft", same, {"base": base, "tokenizer": tok}, store)
    assert again.ref == m.ref and again.files == m.files and again.metrics == json.loads(json.dumps(mt))
