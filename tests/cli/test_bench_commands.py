"""`nanorun bench-infer`: a bundle folder or a store ref through the chat loader, the sweep's rows in
the table and in the last JSON line, progress on stderr, bad options as one line (exit 2)."""
from __future__ import annotations

import json
import logging

import pytest

from cli.main import main
from tests.gpu._helpers import byte_tokenizer, random_gpt, small_config, write_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)
SMALL = ["--decode-tokens", "8", "--warmup-tokens", "2", "--device", "cpu", "--json"]
# the peaks are given: measuring them runs large matmuls, minutes in bf16 on a CPU that emulates it
PEAKS = ["--peak-flops", "1e12", "--peak-bandwidth", "1e10"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tok = byte_tokenizer()
    return write_bundle(tmp_path_factory.mktemp("bench"), random_gpt(small_config(tok.vocab_size)), tok)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_infer_on_a_bundle_folder(bundle, capsys):
    code, out, err = run(capsys, "bench-infer", str(bundle), "--prompt-lens", "16,600", "--batch-sizes", "1,3",
                         "--peak-flops", "1e11", "--peak-bandwidth", "1e10", *SMALL)
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["model"] == "bundle" and r["kind"] == "sft" and r["device"] == "cpu"
    assert r["notes"] == ["prompt + decode > the model's context 512: prompts clamped to 504 tokens"]
    assert [p["prompt_tokens"] for p in r["prefill"]] == [16, 504] and all(p["mfu_percent"] > 0 for p in r["prefill"])
    assert [(x["prompt_tokens"], x["batch_size"]) for x in r["rows"]] == [(16, 1), (16, 3), (504, 1), (504, 3)]
    for x in r["rows"]:
        assert x["decode_steps"] == 7 and x["ttft_s"] > 0 and x["tpot_s"] > 0 and x["peak_mem_bytes"] > 0, x
        assert x["mbu_percent"] > 0 and x["mfu_percent"] > 0 and x["tok_per_s"] > 0, x
    assert "TTFT ms" in out and "prefill (batch 1, 504 tokens)" in out       # the human table before the JSON
    assert "[bench-infer] prompt 504 batch 3: TTFT" in err                    # progress while it runs


def test_bench_infer_keeps_the_weights_in_the_compute_dtype(bundle, capsys):
    """--dtype bfloat16: the chat loader stores the fp32 weights in bf16 once (core.engine.inference_weights),
    so a decode step reads 2 bytes per matmul weight instead of converting the fp32 masters every step."""
    weight_bytes = {}
    for dtype in ("float32", "bfloat16"):
        code, out, err = run(capsys, "bench-infer", str(bundle), "--prompt-lens", "8", "--batch-sizes", "1",
                             "--dtype", dtype, *SMALL, *PEAKS)
        assert code == 0, err
        r = json.loads(out.strip().splitlines()[-1])
        assert r["dtype"] == dtype and r["rows"][0]["tok_per_s"] > 0
        weight_bytes[dtype] = r["matmul_weight_bytes"]
    assert weight_bytes["bfloat16"] * 2 == weight_bytes["float32"]


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0"], "--batch-sizes '0': give at least one number, each >= 1"),
    (["--prompt-lens", "a,b"], "--prompt-lens 'a,b': comma-separated whole numbers"),
    (["--decode-tokens", "1"], "decode tokens 1: at least 2"),
])
def test_bad_options_are_one_line(bundle, capsys, args, message):
    code, out, err = run(capsys, "bench-infer", str(bundle), *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_bench_infer_a_store_ref(tiny_run, capsys, caplog):
    store, steps = tiny_run
    with caplog.at_level(logging.WARNING, logger="nanorun.chat"):
        code, out, err = run(capsys, "--store", store.url, "bench-infer", str(steps["base"].ref), "--prompt-lens",
                             "8", "--batch-sizes", "2", *SMALL)
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["model"].startswith("pretrain/") and r["kind"] == "base" and len(r["rows"]) == 1
    assert r["peak_flops"] > 0 and r["peak_bandwidth"] is None and r["rows"][0]["mbu_percent"] is None
    assert "not chat-tuned" not in caplog.text    # beside the point for a benchmark
