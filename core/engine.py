"""Inference engine: KV-cached sampling with tool use, for the chat CLI, the web server and evals.

    from core.engine import Engine, TextStreamer, render_chat
    engine = Engine(model, tokenizer)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 12*7?"}])
    streamer = TextStreamer(tokenizer)
    for column, masks in engine.generate(prompt, max_tokens=128, temperature=0.6, top_k=50):
        print(streamer.put(column[0]), end="", flush=True)
    results, masks = engine.generate_batch(prompt, num_samples=8, max_tokens=64, seed=1)

Everything works on token ids; the tokenizer is only needed for the special tokens and for the
calculator tool (decode the expression, encode its result). How a generation runs:
1. prefill the prompt once at batch 1 into a KV cache sized prompt + max_tokens;
2. replicate that cache to num_samples rows (`KVCache.expand`) and sample every row's first token
   independently from the prompt's last logits (the reference broadcasts one sample to all rows);
3. decode one token per row per step. A row finishes on <|assistant_end|> or <|bos|>. When a row
   writes <|python_start|> expr <|python_end|>, the expression goes to the calculator and
   <|output_start|> result <|output_end|> is forced into that row, token by token, with mask 0
   (the model did not choose them; SFT does not train on them either).
Sampling: temperature (0 = greedy), top-k (None or 0 = off), top-p nucleus (None or 1 = off),
from a torch.Generator seeded per call, so a (prompt, seed, settings) triple is reproducible.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from core.calculator import use_calculator
from core.common import compute_dtype
from core.gpt import GPT

SPECIAL_NAMES = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


def _kv_cache_class():
    # Imported lazily so the engine module (and its sampling/streaming helpers) import without
    # the model; tests of the engine's control flow can then run against any model-like module.
    from core.gpt import KVCache
    return KVCache


# --------------------------------------------------------------------------------------------
# Sampling


NUCLEUS_HEAD = 256  # top-p looks at the 256 most likely tokens first (full sort only if needed)


def _draw(probs: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row of unnormalised probs (B, K) -> (B, 1), by inverting the CDF
    with a single uniform number per row. torch.multinomial draws an exponential per entry: on
    CPU that is ~0.6 ms for 32k entries, more than the rest of the sampling step together."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.size(0), 1), generator=rng, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    # right=True: the first entry whose cdf exceeds u, so a zero-probability entry is never drawn
    return torch.searchsorted(cdf, u, right=True).clamp_max_(probs.size(-1) - 1)


def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Sample one token per row from logits (B, V); returns (B,) int64.

    top-k keeps the k most likely tokens; top-p then keeps the smallest set of most likely tokens
    whose probability reaches p (nucleus sampling, Holtzman et al. 2019, arXiv:1904.09751), over
    the top-k distribution when both are given. The most likely token always survives.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    vocab = logits.size(-1)
    logits = logits.float()
    index = None
    if top_k is not None and 0 < top_k < vocab:
        # dividing by a positive temperature keeps the order: select first, scale k values only
        logits, index = torch.topk(logits, top_k, dim=-1)        # sorted, descending
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        if index is None:
            probs, index = torch.topk(probs, min(NUCLEUS_HEAD, vocab), dim=-1)
            if not bool((probs.sum(dim=-1) >= top_p).all()):   # a flat distribution: sort it all
                probs, index = torch.sort(F.softmax(logits / temperature, dim=-1), dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, 0.0)
    choice = _draw(probs, rng)                                    # (B, 1)
    if index is not None:
        choice = index.gather(-1, choice)
    return choice.squeeze(-1)


# --------------------------------------------------------------------------------------------
# Chat prompts and streaming text


_TOOL_MARKUP = re.compile(r"<\|python_start\|>(.*?)(?:<\|python_end\|>|$)|<\|output_start\|>(.*?)(?:<\|output_end\|>|$)",
                          re.DOTALL)


def assistant_parts(text: str) -> list[dict]:
    """Split an assistant reply as streamed (tool calls spelled as their special-token names, the
    way TextStreamer and the web API emit them) back into parts, so that a reply sent back as
    history renders to the same tokens the model produced."""
    parts, last = [], 0
    for m in _TOOL_MARKUP.finditer(text):
        if m.start() > last:
            parts.append({"type": "text", "text": text[last:m.start()]})
        if m.group(1) is not None:
            parts.append({"type": "python", "text": m.group(1)})
        else:
            parts.append({"type": "python_output", "text": m.group(2)})
        last = m.end()
    if last < len(text):
        parts.append({"type": "text", "text": text[last:]})
    return parts


def render_chat(tokenizer, messages) -> list[int]:
    """Prompt tokens for the next assistant reply: <|bos|>, every turn, then <|assistant_start|>.

    messages: [{"role": "system"|"user"|"assistant", "content": str | list[part]}] in any order
    (the web API does not insist on alternation); a system message is merged into the next user
    message as in training. Assistant parts {"type": "text"|"python"|"python_output", "text"}
    render as the tool-call tokens they stand for; so do the tool markers inside an assistant
    string (see assistant_parts). User text is always encoded as plain text.
    """
    sp = tokenizer.encode_special
    ids = [tokenizer.bos_token_id]
    system = None
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            system = content if system is None else system + "\n\n" + content
            continue
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string")
            if system is not None:
                content, system = system + "\n\n" + content, None
            ids += [sp("<|user_start|>"), *tokenizer.encode(content), sp("<|user_end|>")]
        elif role == "assistant":
            ids.append(sp("<|assistant_start|>"))
            parts = assistant_parts(content) if isinstance(content, str) else content
            for part in parts:
                kind, text = part.get("type"), part.get("text", "")
                if kind == "text":
                    ids += tokenizer.encode(text)
                elif kind == "python":
                    ids += [sp("<|python_start|>"), *tokenizer.encode(text), sp("<|python_end|>")]
                elif kind == "python_output":
                    ids += [sp("<|output_start|>"), *tokenizer.encode(text), sp("<|output_end|>")]
                else:
                    raise ValueError(f"message {i}: unknown part type {kind!r} "
                                     "(use 'text', 'python' or 'python_output')")
            ids.append(sp("<|assistant_end|>"))
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (use 'system', 'user' or 'assistant')")
    if system is not None:  # a system message with no user message after it
        ids += [sp("<|user_start|>"), *tokenizer.encode(system), sp("<|user_end|>")]
    ids.append(sp("<|assistant_start|>"))
    return ids


class TextStreamer:
    """Turns a stream of token ids into text that never ends inside a UTF-8 character.

    A byte-level BPE token can hold part of a character (an emoji is often 2-4 tokens); decoding
    it alone gives U+FFFD. We hold tokens back until their text ends cleanly (lossy decoding of an
    incomplete trailing sequence always ends in U+FFFD), then emit. Decoding only the held tokens
    is exact because emitted text always ended on a character boundary. After more tokens than a
    character can span the model is producing invalid bytes: emit them (as U+FFFD) but keep the
    last three tokens, which may still start a valid character. Special tokens are emitted as
    their names, e.g. "<|python_start|>", whatever the tokenizer's decode does with them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_names = {tokenizer.encode_special(name): name for name in SPECIAL_NAMES}
        self.pending: list[int] = []

    def put(self, token: int) -> str:
        """Add one token; returns the text that is now complete (often "", never a broken char)."""
        name = self.special_names.get(token)
        if name is not None:
            return self.flush() + name
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd"):
            self.pending = []
            return text
        if len(self.pending) > 4:
            head, self.pending = self.pending[:-3], self.pending[-3:]
            return self.tokenizer.decode(head)
        return ""

    def flush(self) -> str:
        """Whatever is held back (at the end of a generation)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# --------------------------------------------------------------------------------------------
# The engine


class _Row:
    __slots__ = ("forced", "in_python", "expr", "stop")

    def __init__(self):
        self.forced: deque[int] = deque()  # tool output waiting to be forced into this row
        self.in_python = False
        self.expr: list[int] = []
        self.stop: int | None = None       # the token that finished this row


# Small-batch decode on CPU is a chain of tiny matmuls: with 2+ intra-op threads each one pays an
# OpenMP wake-up (worse with OMP_WAIT_POLICY=PASSIVE, which the shared CPU needs), and a d6 decodes
# at ~100 tok/s instead of ~134 on one thread here (bench/generate.py; d4: ~180 -> ~310). Prefill and
# larger batches keep every thread, and so does the lm_head of a GPT: one (n_embd x 32768) matvec
# that streams ~13-50 MB of weights per token, memory-bound, so two cores nearly halve it for the
# price of one wake-up. The thread count is process-wide, so concurrent generations (web workers)
# share one counter: one thread while any small decode is running.
SINGLE_THREAD_DECODE_ROWS = 2
_threads_lock = threading.Lock()
_threads_state = {"users": 0, "saved": None}


@contextlib.contextmanager
def _single_thread():
    with _threads_lock:
        if _threads_state["users"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_state["users"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["users"] -= 1
            if _threads_state["users"] == 0:
                torch.set_num_threads(_threads_state["saved"])


def inference_weights(model):
    """Store the model's weights in its compute dtype, once, for a model that only generates or scores
    (chat, serve, bench-infer, chat eval); returns it. fp32 master weights are for the optimizer: kept
    at inference, every Linear converts its weight to the activation dtype on every call (core.gpt.Linear),
    so each bf16 decode step reads 4 bytes per weight and writes and reads 2 more. The matmuls see the
    same values either way (one rounding to the compute dtype), so generation is unchanged. Never on a
    model that still trains: its updates need the fp32 copy."""
    if model.compute_dtype != torch.float32:
        model.to(model.compute_dtype)
    return model


class Engine:
    """Generation with a KV cache and the calculator tool. Holds no per-request state, but a model
    replica must serve one generation at a time (the web server gives each worker its own)."""

    def __init__(self, model, tokenizer, tool: Callable[[str], str | None] = use_calculator):
        self.model = model
        self.tokenizer = tokenizer
        self.tool = tool
        sp = tokenizer.encode_special
        self.bos = tokenizer.bos_token_id
        self.assistant_end = sp("<|assistant_end|>")
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.stop_tokens = frozenset((self.assistant_end, self.bos))
        self.device = next(model.parameters()).device
        # The cache holds activations, so it takes the model's compute dtype.
        self.dtype = getattr(model, "compute_dtype", None) or compute_dtype(self.device)
        # Prefill needs only the last position's logits: with a 32k vocab the full (T, vocab) head
        # would cost more than the whole network for a 512-token prompt on a small model.
        self._last_only = "last_only" in inspect.signature(model.forward).parameters
        self._split_head = isinstance(model, GPT)  # trunk and head can run with different thread counts

    @property
    def max_context(self) -> int:
        """Tokens the model was trained to attend over: prompt + generation should fit in it."""
        return int(self.model.config.sequence_len)

    def _new_cache(self, batch_size: int, max_seq_len: int):
        c = self.model.config
        return _kv_cache_class()(batch_size=batch_size, num_kv_heads=c.n_kv_head, head_dim=c.n_embd // c.n_head,
                                 max_seq_len=max_seq_len, num_layers=c.n_layer, device=self.device,
                                 dtype=self.dtype)

    def _step_row(self, row: _Row, sampled: int) -> tuple[int, int]:
        """Pick this row's next token (forced tool output first) and advance its tool state."""
        if row.stop is not None:
            return row.stop, 0             # finished rows repeat their stop token, unsampled
        if row.forced:
            token, mask = row.forced.popleft(), 0
        else:
            token, mask = sampled, 1
        if token in self.stop_tokens:
            row.stop = token
        elif token == self.python_start:
            row.in_python, row.expr = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            if row.expr:
                result = self.tool(self.tokenizer.decode(row.expr))
                if result is not None:
                    row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.expr = []
        elif row.in_python:
            row.expr.append(token)
        return token, mask

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = 256,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per step, (next token of every row, mask: 1 sampled / 0 forced).

        Stops after max_tokens steps (None: fill the model's context) or when every row has
        finished; a finished row repeats its stop token (mask 0) while the others go on, so a
        consumer reads a row up to and including its first stop token.
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints (the prompt), e.g. from render_chat()")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens is None:
            max_tokens = max(1, self.max_context - len(tokens))
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_k = top_k or None  # 0 means off, as in the web API
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)

        # 1) one batch-1 prefill of the prompt; the cache has room for everything we may decode.
        cache = self._new_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        extra = {"last_only": True} if self._last_only else {}
        logits = self.model(ids, kv_cache=cache, **extra)[:, -1, :]
        # 2) replicate to num_samples rows; each row samples its own first token.
        if num_samples > 1:
            cache = cache.expand(num_samples)
            logits = logits.expand(num_samples, -1)
        rows = [_Row() for _ in range(num_samples)]
        ids = torch.empty((num_samples, 1), dtype=torch.long, device=self.device)
        one_thread = _single_thread if (self.device.type == "cpu" and num_samples <= SINGLE_THREAD_DECODE_ROWS
                                        and torch.get_num_threads() > 1) else contextlib.nullcontext
        split_head = one_thread is _single_thread and self._split_head  # the lm_head outside it
        # 3) decode
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p).tolist()
            column, masks = [], []
            for row, s in zip(rows, sampled):
                token, mask = self._step_row(row, s)
                column.append(token)
                masks.append(mask)
            yield column, masks
            if step + 1 == max_tokens or all(row.stop is not None for row in rows):
                return
            ids.copy_(torch.tensor(column, dtype=torch.long).view(num_samples, 1))
            with one_thread():  # per step: never hold the setting across a yield to the consumer
                if split_head:
                    hidden = self.model.trunk(ids, cache)
                else:
                    logits = self.model(ids, kv_cache=cache)[:, -1, :]
            if split_head:
                logits = self.model.head(hidden)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming: per row the prompt followed by the generated tokens (stop token
        excluded) and a mask (0 for the prompt and forced tokens, 1 for sampled ones)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks
