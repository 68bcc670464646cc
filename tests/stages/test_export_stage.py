"""export stage: bundles of the tiny speedrun's sft and pretrain models through execute (files, no
training state, the model card, metrics), the bundle generating what its checkpoint generates, and
refusals (another tokenizer, an artifact without a model)."""
from __future__ import annotations

import json

import pytest

from core.checkpoint import TokenizerMismatchError, load_model
from core.engine import Engine, render_chat
from core.export import load
from stages import export
from stages.base import ConfigError
from pipeline.execute import execute
from core.layouts import model_checkpoint, tokenizer_dir
from tests.conftest import png_size

BUNDLE = {"config.json", "model.safetensors", "tokenizer.json", "token_bytes.npy", "generation_config.json",
          "README.md"}


def test_config():
    cfg = export.Config()
    assert cfg.label() == "fp32" and export.Config(dtype="bfloat16").label() == "bf16"
    assert cfg.runtime_dict() == {} and cfg.identity_dict()["temperature"] == 0.6
    for kw, msg in [({"dtype": "int8"}, "export.dtype"), ({"temperature": 3}, "temperature"),
                    ({"top_k": -1}, "top_k"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(ConfigError, match=msg):
            export.Config(**kw)


@pytest.mark.slow
def test_export_of_the_sft_model(tiny_run):
    store, run = tiny_run
    sft, base, tok = run["sft"], run["base"], run["tokenizer"]
    inputs = {"model": sft.ref, "tokenizer": tok.ref, "base": base.ref, "base_eval": run["base_eval"].ref,
              "chat_eval": run["chat_eval"].ref}
    m = execute("export", export.Config(temperature=0.5, top_k=20, max_tokens=64), inputs, store)
    assert {f.path for f in m.files} == BUNDLE  # no checkpoints, optimizer or RNG state
    mt = m.metrics
    assert mt["kind"] == "sft" and mt["step"] == sft.metrics["iterations"] and mt["model"] == str(sft.ref)
    assert mt["num_params"] == base.metrics["num_params"] and mt["depth"] == 2 and mt["dtype"] == "float32"
    assert mt["total_bytes"] == m.total_bytes and mt["files"] == {f.path: f.size for f in m.files}
    assert mt["weights_bytes"] == m.file("model.safetensors").size

    path = store.materialize(m.ref)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["lineage"]["model"] == str(sft.ref) and cfg["lineage"]["sft.base"] == str(base.ref)
    assert cfg["lineage"]["base_eval"] == str(run["base_eval"].ref)
    assert cfg["tokenizer"]["fingerprint"] == tok.ref.fingerprint
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_k"], gen["top_p"], gen["max_tokens"]) == (0.5, 20, None, 64)
    card = (path / "README.md").read_text()
    core = run["base_eval"].metrics["core"]
    for needle in ("# nanorun GPT d2 (sft)", "A chat model (supervised fine-tuned)", "## Lineage",
                   str(sft.ref), str(base.ref), str(tok.ref),
                   "## Metrics", f"| base_eval (`core_eval`) | core | {core:.6g} |",
                   "## Training report", "CORE over 4/22 tasks", "| chat:", "## How to load"):
        assert needle in card, needle

    # the bundle generates exactly what the checkpoint it came from generates
    model, tokenizer, _ = load(path)
    ref_model, _ = load_model(model_checkpoint(store.materialize(sft.ref)))
    prompt = render_chat(tokenizer, [{"role": "user", "content": "hi, how are you today?"}])
    ours, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=24, temperature=0.0)
    from core.tokenizer import Tokenizer

    ref_tok = Tokenizer.from_directory(tokenizer_dir(store.materialize(tok.ref)))
    theirs, _ = Engine(ref_model, ref_tok).generate_batch(prompt, max_tokens=24, temperature=0.0)
    assert ours == theirs
    # the speedrun's own export step bundles the same sft model with the default sampling settings
    sp = run["export"]
    assert sp.inputs["model"] == sft.ref and sp.metrics["kind"] == "sft" and sp.ref.label == "fp32"
    assert sp.file("model.safetensors").sha256 == m.file("model.safetensors").sha256


@pytest.mark.slow
def test_export_of_the_base_model_embeds_the_report(tiny_run):
    store, run = tiny_run
    m = execute("export", export.Config(dtype="bfloat16", title="tiny base"),
                {"model": run["base"].ref, "tokenizer": run["tokenizer"].ref, "report": run["report"].ref}, store)
    assert m.ref.label == "bf16" and m.metrics["kind"] == "base" and m.metrics["dtype"] == "bfloat16"
    files = {f.path for f in m.files}
    assert files >= BUNDLE and {"report/loss.png", "report/core.png"} <= files
    path = store.materialize(m.ref)
    card = (path / "README.md").read_text()
    assert card.startswith("# tiny base\n") and "](report/loss.png)" in card and "## nanorun speedrun tiny" in card
    assert "A base (pretrained, not chat-tuned) model" in card
    w, h = png_size(path / "report" / "loss.png")
    assert w >= 800 and h >= 300
    n = run["base"].metrics["num_params"]
    assert m.metrics["weights_bytes"] < 2 * n + 64 * 1024  # bf16: two bytes a parameter (+ the header)


@pytest.mark.slow
def test_export_refusals(tiny_run):
    from stages import tokenizer as tok_stage

    store, run = tiny_run
    other = execute("tokenizer", tok_stage.Config(vocab_size=512, max_chars=200_000), {"data": run["data"].ref}, store)
    with pytest.raises(TokenizerMismatchError, match="tokenizer/model mismatch"):
        execute("export", export.Config(), {"model": run["base"].ref, "tokenizer": other.ref}, store)
    with pytest.raises(ConfigError, match="core_eval artifact without a checkpoint.json"):
        execute("export", export.Config(), {"model": run["base_eval"].ref, "tokenizer": run["tokenizer"].ref}, store)
    with pytest.raises(ConfigError, match="unexpected"):
        execute("export", export.Config(), {"model": run["base"].ref, "tokenizer": run["tokenizer"].ref,
                                            "data": run["data"].ref}, store)
