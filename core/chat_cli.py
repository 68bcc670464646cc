"""Terminal chat with a model: multi-turn with streamed output, or one shot.

    nanorun chat <artifact-ref-or-alias>                 # interactive
    nanorun chat <artifact-ref-or-alias> -p "Why is the sky blue?"

The CLI loads the model and calls run_chat(); from Python:

    from core.chat_cli import run_chat
    run_chat(Engine(model, tokenizer), tokenizer, prompt="Hello")

Commands at the prompt: `quit` / `exit` (or Ctrl-D) to leave, `clear` to start a new conversation.
"""
from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import TextIO

from core.engine import Engine, TextStreamer, render_chat

QUIT = ("quit", "exit", ":q")
CLEAR = ("clear", "/clear", "reset")


def check_text(text: str, what: str) -> None:
    """ValueError unless `text` encodes as UTF-8: a lone surrogate does not (a JSON "\\ud800" escape,
    or a byte that was not UTF-8 in argv or stdin, which Python decodes to U+DC80..U+DCFF)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f" (the byte 0x{code - 0xDC00:02x}, which is not UTF-8)" if 0xDC80 <= code <= 0xDCFF else ""
        raise ValueError(f"{what} is not valid text: character {e.start} is the lone surrogate U+{code:04X}{byte}; "
                         "send UTF-8") from None


def reply(engine: Engine, tokenizer, messages: list[dict], *, temperature: float, top_k: int | None,
          max_tokens: int, seed: int, write: Callable[[str], None]) -> str:
    """Generate one assistant reply to `messages`, writing text as it completes; returns it.
    ValueError (nothing generated) for text that is not UTF-8 or a conversation beyond the context."""
    for i, m in enumerate(messages):
        if isinstance(m["content"], str):
            check_text(m["content"], "your message" if i == len(messages) - 1 else f"message {i}")
    tokens = render_chat(tokenizer, messages)
    room = engine.max_context - len(tokens)
    if room < 1:
        raise ValueError(f"the conversation is {len(tokens)} tokens, the model's context is "
                         f"{engine.max_context}: type `clear` to start a new one")
    streamer, pieces = TextStreamer(tokenizer), []
    for column, _ in engine.generate(tokens, max_tokens=min(max_tokens, room), temperature=temperature,
                                     top_k=top_k, seed=seed):
        if column[0] in engine.stop_tokens:
            break
        text = streamer.put(column[0])
        if text:
            pieces.append(text)
            write(text)
    tail = streamer.flush()
    if tail:
        pieces.append(tail)
        write(tail)
    return "".join(pieces)


def run_chat(engine: Engine, tokenizer, *, prompt: str | None = None, temperature: float = 0.6,
             top_k: int | None = 50, max_tokens: int = 512, seed: int | None = None,
             input_fn: Callable[[str], str] = input, output: TextIO = sys.stdout) -> list[dict]:
    """Chat until the user quits (or answer `prompt` once); returns the last conversation.

    seed: the first turn's sampling seed (later turns use seed+1, seed+2, ...); None = random.
    """
    def write(text: str) -> None:
        output.write(text)
        output.flush()

    next_seed = random.randint(0, 2**31 - 1) if seed is None else seed
    messages: list[dict] = []
    if prompt is None:
        write(f"nanorun chat · context {engine.max_context} tokens · temperature {temperature} · "
              f"top-k {top_k or 'off'}\nType `quit` to leave, `clear` to start over.\n")
    while True:
        if prompt is not None:
            text = prompt
        else:
            try:
                text = input_fn("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                write("\n")
                return messages
            except UnicodeDecodeError as e:     # stdin in a strict UTF-8 locale
                write(f"[your message is not valid text: {e.reason} at byte {e.start}; type UTF-8]\n")
                continue
            if not text:
                continue
            if text.lower() in QUIT:
                return messages
            if text.lower() in CLEAR:
                messages = []
                write("(new conversation)\n")
                continue
        messages.append({"role": "user", "content": text})
        if prompt is None:
            write("\nAssistant: ")
        try:
            answer = reply(engine, tokenizer, messages, temperature=temperature, top_k=top_k,
                           max_tokens=max_tokens, seed=next_seed, write=write)
        except ValueError as e:
            messages.pop()
            write(f"\n[{e}]\n")
            if prompt is not None:
                raise
            continue
        except KeyboardInterrupt:      # Ctrl-C stops this reply, not the session
            answer = ""
            write(" [stopped]")
        next_seed += 1
        write("\n")
        if answer:
            messages.append({"role": "assistant", "content": answer})
        else:
            messages.pop()             # keep the history alternating: forget an unanswered turn
        if prompt is not None:
            return messages
