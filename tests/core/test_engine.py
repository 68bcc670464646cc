"""core/engine.py with a real tiny GPT and a tokenizer trained on the shared corpus.

Greedy decoding with the KV cache must equal an argmax loop over full forwards; batches, stop
tokens, seeds, top-k/top-p, the calculator tool and UTF-8 streaming are checked on real tokens.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from torch.overrides import TorchFunctionMode

from core.engine import Engine, TextStreamer, assistant_parts, inference_weights, render_chat, sample_next_token
from core.gpt import GPTConfig, build_model
from tests._tok import small_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"), 1024)


def tiny_gpt(vocab_size: int, seed: int = 0, sequence_len: int = 512):
    """2 layers, 64 wide. Every weight random (the reference init zeroes the output projections,
    which would make attention, and so the cache, invisible) and peaked logits, so greedy choices
    are far from ties. sequence_len 512 gives a 128-token sliding window on layer 0."""
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg, "cpu", dtype=torch.float32, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        model.lm_head.weight.mul_(6.0)
        model.smear_lambda.fill_(0.5)          # exercise the smear state carried by the cache
    return model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt(tok.vocab_size)


def prompt_of(tok, text="The whale swam past the ship, and Ishmael"):
    return render_chat(tok, [{"role": "user", "content": text}])


class Scripted(nn.Module):
    """Wraps the real GPT and overrides the logits of chosen steps so that a given token wins:
    script[k] is the token (or a per-row list; None = leave the model's choice) for the k-th
    token the engine samples. Step 0 is sampled from the prefill."""

    def __init__(self, gpt, script):
        super().__init__()
        self.gpt, self.config, self.script, self.calls = gpt, gpt.config, script, 0

    def forward(self, idx, kv_cache=None):
        logits = self.gpt(idx, kv_cache=kv_cache)
        step, self.calls = self.calls, self.calls + 1
        if step < len(self.script) and self.script[step] is not None:
            wanted = self.script[step]
            for row in range(logits.size(0)):
                t = wanted[row] if isinstance(wanted, list) else wanted
                if t is not None:
                    logits[row, -1] = -1e4
                    logits[row, -1, t] = 1e4
        return logits


def argmax_loop(model, tokens, n, stop):
    """The slow, obviously correct reference: full forward (no cache) every step."""
    ids = list(tokens)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_greedy_equals_argmax_loop_without_cache(tok, model):
    prompt = prompt_of(tok, "Call me Ishmael. Some years ago, never mind how long precisely, having little "
                            "or no money in my purse, and nothing particular to interest me on shore, I thought "
                            "I would sail about a little and see the watery part of the world.")
    assert len(prompt) > 40
    n = 140 - len(prompt)        # past the 128-token window of layer 0
    engine = Engine(model, tok)
    results, masks = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)
    expected = argmax_loop(model, prompt, n, engine.stop_tokens)
    assert results[0][len(prompt):] == expected
    assert len(expected) > 20, "the model stopped too early for this test to mean anything"
    assert masks[0] == [0] * len(prompt) + [1] * len(expected)


def test_cached_logits_match_full_forward(tok, model):
    """The decode path's logits, step by step, equal the full forward's at the same position."""
    prompt = prompt_of(tok)
    engine = Engine(model, tok)
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.config = model, model.config

        def forward(self, idx, kv_cache=None):
            out = model(idx, kv_cache=kv_cache)
            seen.append(out[0, -1].clone())
            return out

    res, _ = Engine(Spy(), tok).generate_batch(prompt, max_tokens=12, temperature=0.0)
    with torch.inference_mode():
        full = model(torch.tensor([res[0]]))[0]
    for k, logits in enumerate(seen):
        torch.testing.assert_close(logits, full[len(prompt) - 1 + k], atol=2e-4, rtol=1e-4)
    assert engine.max_context == 512


def test_batch_rows_identical_when_greedy_and_reproducible_when_sampled(tok, model):
    prompt = prompt_of(tok)
    engine = Engine(model, tok)
    single, _ = engine.generate_batch(prompt, max_tokens=24, temperature=0.0)
    batch, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=24, temperature=0.0)
    assert batch == single * 3
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=24, temperature=1.0, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=24, temperature=1.0, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=24, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    # every row samples its own first token (the reference broadcasts row 0's to all rows)
    assert len({tuple(r) for r in a}) > 1


def test_each_batch_row_equals_its_own_decode(tok, model):
    """A sampled batch row continues exactly as a greedy batch-1 decode of its own prefix would
    score it: the cache rows are independent (no cross-row leakage through expand)."""
    prompt = prompt_of(tok)
    engine = Engine(model, tok)
    rows, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=1.5, seed=3)
    for row in rows:
        prefix = row[:len(prompt) + 5]
        greedy, _ = engine.generate_batch(prefix, max_tokens=4, temperature=0.0)
        assert greedy[0][len(prefix):] == argmax_loop(model, prefix, 4, engine.stop_tokens)


def test_top_k_1_and_tiny_top_p_are_greedy(tok, model):
    prompt = prompt_of(tok)
    engine = Engine(model, tok)
    greedy, _ = engine.generate_batch(prompt, max_tokens=16, temperature=0.0)
    assert engine.generate_batch(prompt, max_tokens=16, temperature=1.0, top_k=1, seed=5)[0] == greedy
    assert engine.generate_batch(prompt, max_tokens=16, temperature=1.0, top_p=1e-6, seed=5)[0] == greedy


def test_sample_next_token_top_k_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rng = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, rng, 1.0, top_p=0.7)) for _ in range(300)}
    assert draws == {0, 1}                 # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    draws = {int(sample_next_token(logits, rng, 1.0, top_k=3)) for _ in range(300)}
    assert draws == {0, 1, 2}
    draws = {int(sample_next_token(logits, rng, 1.0, top_k=3, top_p=0.9)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert int(sample_next_token(logits, rng, 0.0)) == 0
    # the inverse-CDF draw follows the distribution (temperature 1: the probabilities above)
    draws = sample_next_token(logits.expand(4000, -1), rng, 1.0)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    # temperature 0.5 squares and renormalises the probabilities
    freq = torch.bincount(sample_next_token(logits.expand(4000, -1), rng, 0.5), minlength=4).float() / 4000
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(freq, p2 / p2.sum(), atol=0.03, rtol=0)
    # a flat distribution over a big vocab: the nucleus needs the full sort (beyond the 256 head)
    flat = torch.zeros(1, 1000)
    draws = {int(sample_next_token(flat, rng, 1.0, top_p=0.9)) for _ in range(400)}
    assert len(draws) > 250 and max(draws) < 1000
    assert sample_next_token(logits.expand(5, -1), rng, 1.0).shape == (5,)


def test_stop_tokens_end_rows_and_finished_rows_repeat_them(tok, model):
    end, bos = tok.encode_special("<|assistant_end|>"), tok.bos_token_id
    prompt = prompt_of(tok)
    hello = tok.encode("Hello")
    script = [[hello[0], hello[0], hello[0]], [end, None, None], [None, bos, None]]
    engine = Engine(Scripted(model, script), tok)
    steps = list(engine.generate(prompt, num_samples=3, max_tokens=8, temperature=0.0))
    assert steps[1] == ([end, steps[1][0][1], steps[1][0][2]], [1, 1, 1])
    assert steps[2][0][0] == end and steps[2][1][0] == 0          # row 0 done: repeats, unsampled
    assert steps[2][0][1] == bos
    assert len(steps) == 8                                        # row 2 runs to max_tokens
    engine.model.calls = 0
    results, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=8, temperature=0.0)
    assert results[0] == prompt + hello[:1]
    assert results[1] == prompt + hello[:1] + [steps[1][0][1]]
    assert len(results[2]) == len(prompt) + 8
    # every row finishing ends the generation early
    engine = Engine(Scripted(model, [None, end]), tok)
    assert len(list(engine.generate(prompt, max_tokens=50, temperature=0.0))) == 2


def test_planted_tool_call_is_evaluated_and_injected_with_mask_0(tok, model):
    sp = tok.encode_special
    expr = tok.encode("12 * 7 + 1")
    call = [sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("85"), sp("<|output_end|>")]
    after = tok.encode(" so 85.")
    # the model's choices while forced tokens are injected are ignored (None = whatever it likes)
    script = call + [None] * len(forced) + after + [sp("<|assistant_end|>")]
    engine = Engine(Scripted(model, script), tok)
    prompt = prompt_of(tok, "What is 12*7+1?")
    results, masks = engine.generate_batch(prompt, max_tokens=64, temperature=0.0)
    gen, gmask = results[0][len(prompt):], masks[0][len(prompt):]
    assert gen == call + forced + after
    assert gmask == [1] * len(call) + [0] * len(forced) + [1] * len(after)
    assert TextStreamer(tok).put(gen[0]) == "<|python_start|>"


def test_refused_tool_call_injects_nothing(tok, model):
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    script = call + tok.encode(" ok") + [sp("<|assistant_end|>")]
    engine = Engine(Scripted(model, script), tok)
    results, masks = engine.generate_batch(prompt_of(tok), max_tokens=64, temperature=0.0)
    assert sp("<|output_start|>") not in results[0]
    assert results[0][-len(script) + 1:] == script[:-1]


def test_tool_output_is_per_row(tok, model):
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode("2+2"), sp("<|python_end|>")]
    # row 0 calls the tool, row 1 does not
    script = [[t, None] for t in call] + [[None, None]] * 4
    engine = Engine(Scripted(model, script), tok)
    steps = list(engine.generate(prompt_of(tok), num_samples=2, max_tokens=len(call) + 3, temperature=0.0))
    row0 = [c[0] for c, _ in steps]
    assert row0[len(call):] == [sp("<|output_start|>"), *tok.encode("4"), sp("<|output_end|>")]
    assert [m[1] for _, m in steps] == [1] * len(steps)


def test_generate_validates_arguments(tok, model):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="non-empty list"):
        next(engine.generate([]))
    with pytest.raises(ValueError, match="max_tokens"):
        next(engine.generate([1, 2], max_tokens=0))
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate([1, 2], temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        next(engine.generate([1, 2], top_p=0))
    assert len(list(engine.generate([tok.bos_token_id], max_tokens=5, temperature=0.0))) <= 5


# ---------------------------------------------------------------------------------------------- text


TRICKY = "Naïve café — 你好世界 🌍🐋 «ok» 👩‍👩‍👧 done"


def test_streamer_never_emits_a_broken_character(tok):
    ids = tok.encode(TRICKY)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs tokens that split characters"
    streamer, chunks = TextStreamer(tok), []
    for i in ids:
        chunk = streamer.put(i)
        assert "\ufffd" not in chunk
        chunks.append(chunk)
    chunks.append(streamer.flush())
    assert "".join(chunks) == TRICKY
    for c in chunks:                      # each chunk is valid UTF-8 on its own
        c.encode("utf-8")


def test_streamer_specials_and_invalid_bytes(tok):
    sp = tok.encode_special
    streamer = TextStreamer(tok)
    ids = tok.encode("a") + [sp("<|python_start|>")] + tok.encode("1+1") + [sp("<|python_end|>")]
    assert "".join(streamer.put(i) for i in ids) == "a<|python_start|>1+1<|python_end|>"
    # a stray continuation byte (id 0x80 is the byte 0x80) is not held back for ever
    stray = [0x80] * 5 + tok.encode("ok")
    out = "".join(streamer.put(i) for i in stray) + streamer.flush()
    assert out.endswith("ok") and out.count("\ufffd") == 5


def test_render_chat_matches_tokenizer_rendering(tok):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me see. "},
                                              {"type": "python", "text": "2+3"},
                                              {"type": "python_output", "text": "5"},
                                              {"type": "text", "text": "It is 5."}]},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "placeholder"}]
    expected = tok.render_for_completion({"messages": conv})
    assert render_chat(tok, conv[:-1]) == expected
    # the same assistant turn as streamed text (markers spelled out) renders to the same tokens
    as_text = "Let me see. <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>It is 5."
    conv[2] = {"role": "assistant", "content": as_text}
    assert render_chat(tok, conv[:-1]) == expected
    assert assistant_parts(as_text)[1:3] == [{"type": "python", "text": "2+3"},
                                            {"type": "python_output", "text": "5"}]
    # user text is never parsed for specials
    ids = render_chat(tok, [{"role": "user", "content": "<|assistant_end|>"}])
    assert ids.count(tok.encode_special("<|assistant_end|>")) == 0
    with pytest.raises(ValueError, match="unknown role"):
        render_chat(tok, [{"role": "tool", "content": "x"}])


def test_small_batch_cpu_decode_runs_on_one_thread_and_restores_the_setting(tok):
    import core.engine as engine_mod

    model = tiny_gpt(tok.vocab_size)
    seen = []  # (part, intra-op threads) per call
    real_trunk, real_head = model.trunk, model.head

    def spy(part, fn):
        def wrapped(*a, **kw):
            seen.append((part, torch.get_num_threads()))
            return fn(*a, **kw)
        return wrapped

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.trunk, model.head = spy("trunk", real_trunk), spy("head", real_head)
        eng = Engine(model, tok)
        list(eng.generate(tok.encode("hello", prepend=tok.bos_token_id), num_samples=1, max_tokens=4, seed=0))
        # prefill on every thread; decode: the trunk's small matmuls on one, the lm_head matvec on all
        assert seen[:2] == [("trunk", 2), ("head", 2)]
        assert seen[2:] == [("trunk", 1), ("head", 2)] * 3
        assert torch.get_num_threads() == 2 and engine_mod._threads_state["users"] == 0
        seen.clear()
        list(eng.generate(tok.encode("hello", prepend=tok.bos_token_id), num_samples=4, max_tokens=3, seed=0))
        assert {threads for _, threads in seen} == {2}  # a bigger batch keeps the threads
    finally:
        del model.trunk, model.head
        torch.set_num_threads(before)


class ParamCasts(TorchFunctionMode):
    """Counts the calls that convert one of `params` into a new tensor (weight.to(dtype), .float()...)."""

    CASTS = (torch.Tensor.to, torch.Tensor.float, torch.Tensor.bfloat16, torch.Tensor.half, torch.Tensor.type)

    def __init__(self, params):
        super().__init__()
        self.ids, self.n = {id(p) for p in params}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.CASTS and args and id(args[0]) in self.ids and out is not args[0]:
            self.n += 1
        return out


def test_inference_weights_cast_once_then_decode_casts_no_weight_and_generates_the_same(tok):
    """bf16 compute with fp32 master weights converts every matmul weight on every decode step;
    inference_weights stores them in bf16 once, and the tokens and logits stay bit for bit the same."""
    per_step = tiny_gpt(tok.vocab_size).set_compute_dtype(torch.bfloat16)
    once = inference_weights(tiny_gpt(tok.vocab_size).set_compute_dtype(torch.bfloat16))
    assert {p.dtype for p in once.parameters()} == {torch.bfloat16}
    prompt, steps = prompt_of(tok), 24
    out, casts = {}, {}
    for name, m in (("per_step", per_step), ("once", once)):
        counter = ParamCasts(list(m.parameters()))
        with counter:
            out[name] = Engine(m, tok).generate_batch(prompt, num_samples=2, max_tokens=steps, temperature=0.0)
        casts[name] = counter.n
    assert casts["per_step"] >= steps * (2 * 4 + 1)   # each layer's 4+ matmul weights and lm_head, each step
    assert casts["once"] == 0
    assert len(out["once"][0][0]) > len(prompt) + steps // 2
    assert out["once"] == out["per_step"]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        assert torch.equal(once(ids), per_step(ids))


def test_inference_weights_leaves_an_fp32_model_alone(tok):
    model = tiny_gpt(tok.vocab_size)
    weights = {n: p for n, p in model.named_parameters()}
    assert inference_weights(model) is model
    assert all(p is weights[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
