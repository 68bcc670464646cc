"""core/chat_cli.py: the terminal chat loop, driven with scripted input and a real tiny GPT."""
from __future__ import annotations

import io

import pytest
import torch.nn as nn

from core.chat_cli import run_chat
from core.engine import Engine, render_chat
from tests._tok import small_tokenizer
from tests.core.test_engine import Scripted, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"), 1024)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt(tok.vocab_size, seed=1)


class Recorder(nn.Module):
    """Passes through to the GPT and records every prefill (the prompt of each turn)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.config, self.prompts = gpt, gpt.config, []

    def forward(self, idx, kv_cache=None):
        if idx.size(1) > 1:
            self.prompts.append(idx[0].tolist())
        return self.gpt(idx, kv_cache=kv_cache)


def feed(*lines):
    it = iter(lines)

    def input_fn(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return input_fn


def test_one_shot_streams_the_reply(tok, model):
    out = io.StringIO()
    messages = run_chat(Engine(model, tok), tok, prompt="Hello there", max_tokens=20, seed=3, output=out)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    reply = messages[1]["content"]
    assert reply and out.getvalue() == reply + "\n"
    # same seed, same answer
    again = run_chat(Engine(model, tok), tok, prompt="Hello there", max_tokens=20, seed=3, output=io.StringIO())
    assert again == messages


def test_multi_turn_history_clear_and_quit(tok, model):
    rec = Recorder(model)
    out = io.StringIO()
    messages = run_chat(Engine(rec, tok), tok, input_fn=feed("first question", "", "second", "clear", "fresh", "quit"),
                        max_tokens=8, seed=0, output=out)
    text = out.getvalue()
    assert "Type `quit` to leave" in text and "(new conversation)" in text
    assert len(rec.prompts) == 3
    first_reply_prompt, second_prompt, fresh_prompt = rec.prompts
    # the second turn's prompt holds the whole first exchange; after `clear` only the new message
    assert second_prompt[:len(first_reply_prompt)] == first_reply_prompt
    assert len(second_prompt) > len(first_reply_prompt) + 3
    assert fresh_prompt == render_chat(tok, [{"role": "user", "content": "fresh"}])
    assert [m["content"] for m in messages if m["role"] == "user"] == ["fresh"]


def test_eof_ends_the_session(tok, model):
    out = io.StringIO()
    assert run_chat(Engine(model, tok), tok, input_fn=feed(), output=out) == []


def test_tool_calls_are_shown_and_kept_in_history(tok, model):
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode("6*7"), sp("<|python_end|>")]
    forced = 2 + len(tok.encode("42"))
    script = call + [None] * forced + tok.encode(" done") + [sp("<|assistant_end|>")]
    out = io.StringIO()
    messages = run_chat(Engine(Scripted(model, script), tok), tok, prompt="6 times 7?", max_tokens=40,
                        seed=0, output=out)
    reply = messages[-1]["content"]
    assert reply == "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> done"
    assert out.getvalue() == reply + "\n"


def test_conversation_beyond_the_context_is_refused_clearly(tok):
    small = tiny_gpt(tok.vocab_size, sequence_len=64)
    out = io.StringIO()
    long_text = "the whale " * 100
    messages = run_chat(Engine(small, tok), tok, input_fn=feed(long_text, "hi", "quit"), max_tokens=4,
                        output=out, seed=0)
    assert "type `clear` to start a new one" in out.getvalue()
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi"]
    with pytest.raises(ValueError, match="context"):
        run_chat(Engine(small, tok), tok, prompt=long_text, output=io.StringIO())


def test_text_that_is_not_utf8_is_refused_clearly(tok, model):
    """A byte that is not UTF-8 (argv or a surrogate-escaping stdin makes it U+DC80..U+DCFF) or a lone
    surrogate: one message, the session goes on; a stdin that cannot be decoded at all likewise."""
    def undecodable(prompt):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    lines = iter(["caf\udce9", "\ud800", None, "hi", "quit"])

    def input_fn(prompt):
        line = next(lines)
        return undecodable(prompt) if line is None else line

    rec = Recorder(model)
    out = io.StringIO()
    messages = run_chat(Engine(rec, tok), tok, input_fn=input_fn, max_tokens=4, seed=0, output=out)
    text = out.getvalue()
    assert "[your message is not valid text: character 3 is the lone surrogate U+DCE9 (the byte 0xe9" in text
    assert "U+D800; send UTF-8]" in text and "[your message is not valid text: invalid start byte at byte 0" in text
    assert len(rec.prompts) == 1 and [m["content"] for m in messages if m["role"] == "user"] == ["hi"]
    with pytest.raises(ValueError, match=r"U\+DCFF"):
        run_chat(Engine(model, tok), tok, prompt="\udcff", output=io.StringIO())
