"""core/nanochat.py: a checkpoint and tokenizer that nanochat itself made (tests/data/nanochat_d2, see
its README) read into nanorun give nanochat's own numbers — the same token ids, val bpb to 1e-6, the
same CORE verdict on every example — and nothing read from those files can run code; writing
nanochat's layout and reading it back gives the same weights and tokenizer, bit for bit."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from core.gpt import GPTConfig, build_model
from core.nanochat import (NanochatError, encoding_state, find_checkpoint, read_checkpoint, read_encoding,
                           read_tokenizer, write_encoding, write_nanochat)
from tests._tok import small_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[1] / "data" / "nanochat_d2"
REF = json.loads((DATA / "reference.json").read_text())


@pytest.fixture(scope="module")
def imported():
    found = find_checkpoint(DATA)
    config, state, meta = read_checkpoint(found)
    model = build_model(config, device="cpu", dtype=torch.float32, init=False)
    model.load_state_dict(state, strict=True)
    return found, model.eval(), read_tokenizer(found.tokenizer_dir)


def test_the_tokenizer_gives_nanochats_token_ids(imported, shared_data, tmp_path):
    found, _, tok = imported
    assert found.kind == "base" and found.step == REF["meta_step"] == 30
    assert tok.encode(REF["text"]) == REF["text_ids"]
    # and written back, its pickle is nanochat's file byte for byte
    write_encoding(tmp_path / "tokenizer.pkl", encoding_state(tok))
    assert (tmp_path / "tokenizer.pkl").read_bytes() == (DATA / "tokenizer" / "tokenizer.pkl").read_bytes()
    # every document of the val shard (1.48M tokens), compared through nanochat's sha256 of the id lists
    val = sorted((shared_data / "corpus").glob("shard_*.parquet"))[-1]
    docs = pq.read_table(val, columns=["text"]).column("text").to_pylist()
    ids = tok.encode(docs)
    want = REF["val_shard_ids"]
    assert (len(docs), sum(map(len, ids))) == (want["docs"], want["tokens"])
    assert hashlib.sha256(json.dumps(ids).encode()).hexdigest() == want["sha256"]
    assert tok.vocab_size == 512 and tok.bos_token_id == 503
    # token_bytes.pt agrees with the pickled encoding (read_tokenizer refuses a mismatch)
    assert tok.token_bytes().tolist() == torch.load(DATA / "tokenizer" / "token_bytes.pt", weights_only=True).tolist()


def test_a_crafted_pickle_is_refused_in_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "tokenizer"
    bad.mkdir()
    (bad / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(NanochatError) as e:
        read_tokenizer(bad)
    msg = str(e.value)
    assert "\n" not in msg and "posix.system" in msg and "only tiktoken.core.Encoding" in msg
    assert not marker.exists()
    (bad / "tokenizer.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(NanochatError, match="not a readable pickle"):
        read_tokenizer(bad)


def test_val_bpb_matches_nanochats_base_eval(imported, shared_data):
    """nanochat's base_eval bpb: its BOS best-fit loader over the val shard (the last one, cycled as
    its loader does when the shard has fewer documents than its 1000-document buffer), then
    evaluate_bpb; nanorun's loader and evaluate_bpb on the same shard and batch shape."""
    from core.dataloader import PackingLoader
    from core.eval.bpb import evaluate_bpb

    _, model, tok = imported
    b = REF["bpb"]
    val = sorted((shared_data / "corpus").glob("shard_*.parquet"))[-1]
    loader = PackingLoader([val], tok, b["batch_size"], b["seq_len"], infinite=True)
    bpb = evaluate_bpb(model, loader, tok.token_bytes(), steps=b["steps"])
    assert abs(bpb - b["val_bpb"]) < 1e-6, (bpb, b["val_bpb"])


def test_core_verdicts_match_nanochat_example_by_example(imported, shared_data):
    from core.eval.bundle import load_bundle, load_task_data
    from core.eval.core import Scorer, build_examples, judge

    _, model, tok = imported
    bundle = load_bundle(shared_data / "eval_bundle")
    tasks = {t.label: t for t in bundle.tasks}
    scorer = Scorer(model, torch.device("cpu"), tok.bos_token_id, 32, 4096, 32, True)
    for label, ref in REF["core"]["tasks"].items():
        task = tasks[label]
        data = load_task_data(bundle, task, REF["core"]["max_per_task"])
        examples = build_examples(data, task, tok, list(range(len(data))))
        losses, exact = scorer.score(examples)
        verdicts = [judge(task.task_type, ex, lo, xa) for ex, lo, xa in zip(examples, losses, exact)]
        assert verdicts == ref["verdicts"], label


def test_unknown_config_fields_and_foreign_tensors_are_refused_in_one_line(tmp_path):
    model_dir = tmp_path / "base_checkpoints" / "d2"
    model_dir.mkdir(parents=True)
    (tmp_path / "tokenizer").symlink_to(DATA / "tokenizer")
    meta = json.loads((DATA / "base_checkpoints" / "d2" / "meta_000030.json").read_text())
    meta["model_config"]["mlp_ratio"] = 8
    (model_dir / "meta_000030.json").write_text(json.dumps(meta))
    (model_dir / "model_000030.pt").symlink_to(DATA / "base_checkpoints" / "d2" / "model_000030.pt")
    with pytest.raises(NanochatError, match=r"field\(s\) \['mlp_ratio'\] are not in the model nanorun implements"):
        read_checkpoint(find_checkpoint(tmp_path))
    meta["model_config"].pop("mlp_ratio")
    (model_dir / "meta_000030.json").write_text(json.dumps(meta))
    (model_dir / "model_000030.pt").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, model_dir / "model_000030.pt")
    with pytest.raises(NanochatError, match="weights_only=True") as e:
        read_checkpoint(find_checkpoint(tmp_path))
    assert "\n" not in str(e.value)


def test_write_then_read_gives_the_same_weights_and_tokenizer_bit_for_bit(tmp_path, shared_data):
    tok = small_tokenizer(str(shared_data / "corpus"))
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                       window_pattern="SL")
    state = build_model(config, device="cpu", dtype=torch.float32).state_dict()
    model_dir = write_nanochat(tmp_path, config, state, tok, kind="sft", step=7)
    assert model_dir == tmp_path / "chatsft_checkpoints" / "d2"
    found = find_checkpoint(tmp_path)
    assert (found.kind, found.step) == ("sft", 7)
    config2, state2, _ = read_checkpoint(found)
    assert config2 == config
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    tok2 = read_tokenizer(found.tokenizer_dir)
    assert tok2.hf.to_str() == tok.hf.to_str()
    text = val_text = "Hello, world! 12345 — déjà vu\n\n  indented"
    assert tok2.encode(text) == tok.encode(val_text)
    # the pickle holds tiktoken's Encoding state and reads back to the same state
    state_back = read_encoding(found.tokenizer_dir / "tokenizer.pkl")
    write_encoding(tmp_path / "again.pkl", state_back)
    assert (tmp_path / "again.pkl").read_bytes() == (found.tokenizer_dir / "tokenizer.pkl").read_bytes()
    with pytest.raises(NanochatError, match="nanochat hard-codes"):
        write_nanochat(tmp_path / "x", GPTConfig(**{**config.to_dict(), "rope_base": 10_000.0}), state, tok,
                       kind="base", step=1)


def test_a_tokenizer_nanorun_cannot_encode_alike_is_refused(tmp_path):
    state = read_encoding(DATA / "tokenizer" / "tokenizer.pkl")
    assert set(state) == {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    cases = {
        "split pattern": {**state, "pat_str": r"\S+|\s+"},
        "special tokens": {**state, "special_tokens": {"<|endoftext|>": len(state["mergeable_ranks"])}},
        "not a byte-pair encoding": {**state, "mergeable_ranks": {**state["mergeable_ranks"], b"\x00\x01\x02\x03": 502}},
    }
    for match, bad in cases.items():
        d = tmp_path / match.replace(" ", "_")
        d.mkdir()
        # drop the id the replacement took, so the table stays 0..n-1
        if match.startswith("not"):
            bad["mergeable_ranks"] = {b: i for b, i in bad["mergeable_ranks"].items() if i != 502 or len(b) == 4}
        write_encoding(d / "tokenizer.pkl", bad)
        with pytest.raises(NanochatError, match=match):
            read_tokenizer(d)


def test_compiled_keys_and_bf16_embeddings_load_as_fp32_masters(tmp_path):
    """A GPU run of nanochat saves torch.compile's `_orig_mod.` keys and bf16 embeddings."""
    model_dir = tmp_path / "base_checkpoints" / "d2"
    model_dir.mkdir(parents=True)
    (tmp_path / "tokenizer").symlink_to(DATA / "tokenizer")
    (model_dir / "meta_000030.json").symlink_to(DATA / "base_checkpoints" / "d2" / "meta_000030.json")
    original = torch.load(DATA / "base_checkpoints" / "d2" / "model_000030.pt", weights_only=True)
    gpu_style = {f"_orig_mod.{k}": v.bfloat16() if "wte" in k or "value_embeds" in k else v for k, v in original.items()}
    torch.save(gpu_style, model_dir / "model_000030.pt")
    _, state, _ = read_checkpoint(find_checkpoint(tmp_path))
    assert state.keys() == original.keys() and all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["transformer.wte.weight"], original["transformer.wte.weight"].bfloat16().float())
    assert torch.equal(state["lm_head.weight"], original["lm_head.weight"])


def test_a_tokenizer_with_a_merge_tiktoken_cannot_hold_is_not_exported():
    from core.tokenizer import Tokenizer

    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"bc", b"abc"]
    a, b, c, ab, bc = 97, 98, 99, 256, 257
    ok = Tokenizer._from_merges(tokens, [(a, b), (b, c), (ab, c)])
    assert len(encoding_state(ok)["mergeable_ranks"]) == 259
    # a + bc rebuilds abc: rustbpe can learn such a merge; a {bytes: id} table cannot say it
    extra = Tokenizer._from_merges(tokens, [(a, b), (b, c), (ab, c), (a, bc)])
    with pytest.raises(NanochatError, match="4 merges for 3 merged tokens"):
        encoding_state(extra)
