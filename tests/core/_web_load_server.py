"""A chat server on 127.0.0.1 in its own process, so a load test can read its descriptors and RSS.

    python -m tests.core._web_load_server PORT SHARED_DATA_DIR [HEADER_TIMEOUT]

A tiny random GPT and the small test tokenizer, one worker, a queue of 64, the bounds of
core/web_server.py (default connection cap). Runs until killed.
"""
from __future__ import annotations

import sys

import torch

from core.engine import Engine
from core.web import create_app
from core.web_server import make_server
from tests._tok import small_tokenizer
from tests.core.test_engine import tiny_gpt

if __name__ == "__main__":
    port, data = int(sys.argv[1]), sys.argv[2]
    header_timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    torch.set_num_threads(1)
    tok = small_tokenizer(f"{data}/corpus", 1024)
    model = tiny_gpt(tok.vocab_size, seed=2)
    app = create_app([(Engine(model, tok), tok)], model_name="load", max_queue=64)
    make_server(app, "127.0.0.1", port, log_level="warning", header_timeout=header_timeout).run()
