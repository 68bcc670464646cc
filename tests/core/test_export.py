"""core/export.py: a bundle written from a real checkpoint loads with nothing else and behaves like
the checkpoint (same logits, same greedy tokens through the Engine); damaged or foreign folders are
refused with messages that say what to do."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.checkpoint import TokenizerMismatchError, load_model, save_checkpoint
from core.engine import Engine, render_chat
from core.export import BundleError, GenerationConfig, export_bundle, load, read_config
from tests._tok import small_tokenizer
from tests.core.test_engine import tiny_gpt

TOK_FP = "ab12cd34ef56ab78"
BUNDLE = {"config.json", "model.safetensors", "tokenizer.json", "token_bytes.npy", "generation_config.json",
          "README.md"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"), 1024)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tok):
    """A complete training checkpoint (model, optimizer and RNG state, meta) and a tokenizer folder."""
    root = tmp_path_factory.mktemp("export-src")
    model = tiny_gpt(tok.vocab_size, seed=4, sequence_len=256)
    optim = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}
    meta = {"kind": "sft", "model_config": model.config.to_dict(),
            "tokenizer": {"fingerprint": TOK_FP, "vocab_size": tok.vocab_size}, "loop_state": {"step": 7}}
    ckpt = save_checkpoint(root / "checkpoints", 7, rank=0, world_size=1, model_state=model.state_dict(),
                           optim_state=optim, rank_state={"dataloader": {}}, meta=meta)
    tok.save(root / "tokenizer")
    return ckpt, root / "tokenizer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, source):
    ckpt, tok_dir = source
    out = tmp_path_factory.mktemp("bundle")
    info = export_bundle(ckpt, tok_dir, out, tokenizer_fingerprint=TOK_FP, generation={"temperature": 0.7, "top_k": 40},
                         lineage={"model": "sft/d2-0123456789abcdef"}, card_sections=["## Extra\n\nhello card"])
    return out, info


def test_bundle_files_and_config(bundle, tok):
    out, info = bundle
    assert {p.name for p in out.iterdir()} == BUNDLE  # weights only: no optimizer, RNG or loop state
    assert set(info["files"]) == BUNDLE and info["files"]["model.safetensors"] == info["weights"]["bytes"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "nanorun-gpt" and cfg["format_version"] == 1
    assert cfg["kind"] == "sft" and cfg["step"] == 7 and cfg["architecture"]["n_layer"] == 2
    assert cfg["tokenizer"]["fingerprint"] == TOK_FP and cfg["tokenizer"]["vocab_size"] == tok.vocab_size
    assert cfg["num_params"] == cfg["param_counts"]["total"] > cfg["num_scaling_params"] > 0
    assert cfg["lineage"] == {"model": "sft/d2-0123456789abcdef"}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.7 and gen["top_k"] == 40 and gen["context_length"] == 256
    assert gen["stop_tokens"] == ["<|assistant_end|>", "<|bos|>"]
    assert gen["stop_token_ids"] == [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    assert gen["bos_token_id"] == tok.bos_token_id
    card = (out / "README.md").read_text()
    for needle in ("# nanorun GPT d2 (sft)", "## Architecture", "## Tokenizer", "## Generation defaults",
                   "## Lineage", "sft/d2-0123456789abcdef", "## How to load", "from core.export import load",
                   "## Extra", "hello card", f"{cfg['num_params']:,} total"):
        assert needle in card, needle


def test_load_matches_the_checkpoint(bundle, source, tok):
    out, _ = bundle
    ckpt, tok_dir = source
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    ref_model, _ = load_model(ckpt)
    model, tokenizer, gen = load(out)
    assert isinstance(gen, GenerationConfig) and gen.temperature == 0.7 and not model.training
    assert tokenizer.vocab_size == tok.vocab_size
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - ref_model(idx)).abs().max().item() <= 1e-6
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Tell me about the whale."}])
    ours, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=40, temperature=0.0)
    theirs, _ = Engine(ref_model, tok).generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert ours == theirs and len(ours[0]) > len(prompt) + 5


def test_bf16_bundle_is_half_the_size_and_rounds_the_weights(tmp_path, source, bundle):
    ckpt, tok_dir = source
    info = export_bundle(ckpt, tok_dir, tmp_path, dtype="bfloat16")
    fp32_bytes = bundle[1]["weights"]["bytes"]
    assert info["weights"]["dtype"] == "bfloat16" and info["weights"]["bytes"] < 0.55 * fp32_bytes
    model, _, _ = load(tmp_path)
    ref, _ = load_model(ckpt)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert p.dtype == torch.float32 and torch.equal(p, q.to(torch.bfloat16).float()), name


def test_export_is_reproducible(tmp_path, source, bundle):
    ckpt, tok_dir = source
    export_bundle(ckpt, tok_dir, tmp_path, tokenizer_fingerprint=TOK_FP, generation={"temperature": 0.7, "top_k": 40},
                  lineage={"model": "sft/d2-0123456789abcdef"}, card_sections=["## Extra\n\nhello card"])
    for name in BUNDLE:  # byte for byte: the same model exported twice is the same bundle
        assert (tmp_path / name).read_bytes() == (bundle[0] / name).read_bytes(), name


def test_export_refuses_another_tokenizer(tmp_path, source):
    ckpt, tok_dir = source
    with pytest.raises(TokenizerMismatchError, match="tokenizer/model mismatch"):
        export_bundle(ckpt, tok_dir, tmp_path, tokenizer_fingerprint="ffff0000ffff0000")
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        export_bundle(ckpt, tok_dir, tmp_path, dtype="int8")


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle[0], dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("nothing", "is not a directory"),
    ("empty", "has no config.json"),
    ("foreign", "is not a nanorun export bundle: config.json has format 'transformers'"),
    ("future", "format version 99, but this nanorun reads versions up to 1: upgrade nanorun"),
    ("badjson", "is not valid JSON"),
    ("no-weights", "incomplete export bundle: missing model.safetensors"),
    ("truncated", "truncated"),
    ("other-tokenizer", "is not the tokenizer this model was exported with"),
    ("other-architecture", "does not match config.json's architecture"),
])
def test_bad_bundles_are_refused(bundle, tmp_path, damage, message, tok):
    path = _copy(bundle, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    if damage == "nothing":
        path = tmp_path / "missing"
    elif damage == "empty":
        path = tmp_path / "empty"
        path.mkdir()
    elif damage == "foreign":
        (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "format": "transformers"}))
    elif damage == "future":
        (path / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    elif damage == "badjson":
        (path / "config.json").write_text("{not json")
    elif damage == "no-weights":
        (path / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "other-tokenizer":
        other = json.loads((path / "tokenizer.json").read_text())
        other["model"]["merges"] = other["model"]["merges"][::-1]
        (path / "tokenizer.json").write_text(json.dumps(other))
    elif damage == "other-architecture":
        cfg["architecture"]["n_layer"] = 3
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=message):
        load(path)
    if damage in ("foreign", "future", "empty"):
        with pytest.raises(BundleError):
            read_config(path)


def test_generation_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="same tokens"):
        GenerationConfig(stop_token_ids=[1])
    assert GenerationConfig.from_dict({"temperature": 0.1, "added_in_v2": 1}).temperature == 0.1
