"""End to end: the chat page in headless Chromium (Debian's, driven by Playwright from PyPI).

Starts the server on 127.0.0.1, sends a message, watches the answer stream in and render as
markdown (code block, list, bold, the calculator call), stops a long answer with the Stop button
(the server's worker is freed), starts a new chat, reloads (conversations persist in
localStorage) and saves screenshots under the test's tmp dir.
"""
from __future__ import annotations

import time

import httpx
import pytest
import torch.nn as nn

from core.engine import Engine
from core.web import create_app
from tests._tok import small_tokenizer
from tests.conftest import png_size
from tests.core.test_engine import tiny_gpt
from tests.core.test_web import running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tiny models: one intra-op thread

ANSWER = ("Sure! Here is **the answer** with some code:\n\n```python\ndef area(r):\n    return 3.14159 * r * r\n```\n\n"
          "- first, the radius\n- then the formula\n\nAnd the sum: <|python_start|>12*7<|python_end|>")
AFTER_TOOL = " so it is `84`."


class Author(nn.Module):
    """The real tiny GPT, with its logits overridden so that it writes ANSWER (a readable page for
    the screenshot), slowly enough to watch it stream. A prompt mentioning 'forever' gets an
    answer that never ends, for the Stop button."""

    def __init__(self, gpt, tok, delay=0.02):
        super().__init__()
        self.gpt, self.config, self.tok, self.delay = gpt, gpt.config, tok, delay
        sp = tok.encode_special
        head, tail = ANSWER.split("<|python_start|>")
        expr = tail.split("<|python_end|>")[0]
        self.script = tok.encode(head) + [sp("<|python_start|>")] + tok.encode(expr) + [sp("<|python_end|>")]
        self.tool_gap = 2 + len(tok.encode("84"))
        self.script += [None] * self.tool_gap + tok.encode(AFTER_TOOL) + [sp("<|assistant_end|>")]
        self.forever = tok.encode(" forever")
        self.step, self.endless = 0, False

    def forward(self, idx, kv_cache=None):
        logits = self.gpt(idx, kv_cache=kv_cache)
        if idx.size(1) > 1:  # a new request
            ids = idx[0].tolist()
            n = len(self.forever)
            self.endless = any(ids[i:i + n] == self.forever for i in range(len(ids) - n + 1))
            self.step = 0
        else:
            time.sleep(self.delay)
        k, self.step = self.step, self.step + 1
        script = self.script[:-1] * 50 if self.endless else self.script
        token = script[k] if k < len(script) else script[-1]
        if token is not None:
            logits[:, -1] = -1e4
            logits[:, -1, token] = 1e4
        return logits


def test_chat_page_end_to_end(chromium, shared_data, tmp_path):
    tok = small_tokenizer(str(shared_data / "corpus"), 1024)
    author = Author(tiny_gpt(tok.vocab_size, seed=4, sequence_len=4096), tok)
    app = create_app([(Engine(author, tok), tok)], model_name="nanorun d2 (test)", max_queue=2)
    with running(app) as base:
        page = chromium.new_page(viewport={"width": 1200, "height": 820})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        assert page.locator("#model-name").inner_text() == "nanorun d2 (test)"
        assert "nanorun d2 (test)" in page.title()

        # 1) a message streams in and renders as markdown
        page.fill("#input", "What is the area of a circle?")
        page.keyboard.press("Enter")
        bubble = page.locator(".msg.assistant .bubble").last
        wait_for(lambda: len(bubble.inner_text()) > 5, timeout=20)
        partial = bubble.inner_text()
        assert page.locator("#stop").is_visible()              # streaming: Stop replaces Send
        page.wait_for_selector(".actions .regenerate", timeout=30_000)   # finished
        final = bubble.inner_text()
        assert len(final) > len(partial) and final.startswith(partial[:5])
        assert bubble.locator("strong").inner_text() == "the answer"
        assert "def area(r):" in bubble.locator(".codeblock code").inner_text()
        assert bubble.locator("li").count() == 2
        assert bubble.locator(".tool").first.inner_text().replace("\n", " ").strip().endswith("12*7")
        assert bubble.locator(".tool.output").inner_text().endswith("84")
        assert "<|" not in final
        assert page.locator(".chat-item .title").first.inner_text() == "What is the area of a circle?"
        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot), full_page=True)
        w, h = png_size(shot)
        assert (w, h) >= (1200, 820) and shot.stat().st_size > 20_000, "screenshot looks empty"

        # 2) a never-ending answer is stopped by the button, and the server's worker is freed
        page.fill("#input", "Now go on forever please")
        page.click("#send")
        wait_for(lambda: len(page.locator(".msg.assistant .bubble").last.inner_text()) > 20, timeout=20)
        assert httpx.get(base + "/stats").json()["busy_workers"] == 1
        page.click("#stop")
        page.wait_for_selector(".msg.assistant .note", timeout=10_000)
        assert page.locator(".msg.assistant .note").last.inner_text() == "stopped"
        assert page.locator("#send").is_visible()
        wait_for(lambda: httpx.get(base + "/stats").json()["busy_workers"] == 0, timeout=10)
        page.screenshot(path=str(tmp_path / "stopped.png"), full_page=True)

        # 3) new chat: empty conversation, the old one kept in the list; both survive a reload
        page.click("#new-chat")
        assert page.locator("#empty").is_visible()
        assert page.locator(".msg").count() == 0
        page.fill("#input", "Second conversation")
        page.keyboard.press("Enter")
        page.wait_for_selector(".actions .regenerate", timeout=30_000)
        page.reload()
        titles = page.locator(".chat-item .title").all_inner_texts()
        assert titles == ["Second conversation", "What is the area of a circle?"]
        page.locator(".chat-item").nth(1).click()
        assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2

        # 4) the markdown renderer escapes HTML and only links http(s)
        html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> [a](javascript:alert(1)) [b](https://x.org)')")
        assert "<img" not in html and "&lt;img" in html and 'href="javascript' not in html
        assert '<a href="https://x.org"' in html
        assert errors == [], errors
        page.close()
