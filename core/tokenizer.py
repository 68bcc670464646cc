"""Byte-level BPE tokenizer in the GPT-4 style (HF `tokenizers` under the hood), plus chat rendering.

    tok = Tokenizer.train(texts, vocab_size=32768)      # texts: any iterable of str
    tok.save("out/tokenizer")                           # tokenizer.json + token_bytes.npy
    tok = Tokenizer.from_directory("out/tokenizer")
    ids = tok.encode(["doc one", "doc two"], prepend="<|bos|>")
    ids, mask = tok.render_conversation({"messages": [...]})

Training uses rustbpe, the reference's own BPE trainer (Rust, parallel; ~3x less CPU per
character than the HF trainer here), so the merges are the reference's for the same text; the
result is stored as a plain HF `tokenizers` BPE (tokenizer.json) used for all encoding. Token id
layout (the reference's): ids 0..255 are the raw bytes (id == byte value), then the merged tokens
in the order they were learned, then the 9 special tokens, so vocab_size == 256 + merges + 9
exactly. rustbpe reports each token's bytes but not the pair it was merged from; the pair is
recovered by running BPE on the token's bytes with the earlier merges (it always splits into
exactly the two parts it was built from; a tokenizer test checks HF and rustbpe encode alike).

Special tokens are never parsed out of text: a document containing the characters "<|bos|>" is
encoded as those characters (tiktoken's encode_ordinary behaviour); specials enter only through
prepend/append/encode_special and render_conversation.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document (and every packed row)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call written by the assistant (trained on)
    "<|output_start|>", "<|output_end|>",  # the tool's output, injected at run time (not trained on)
]

# GPT-4's pre-split regex with numbers split into groups of 1-2 digits instead of 1-3 (the
# reference's choice: fewer vocab slots spent on numbers at small vocab sizes).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what HF's ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_LATIN1_TO_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in _BYTE_TO_CHAR.items()})  # bytes -> HF token string


def _configure(hf: HFTokenizer) -> HFTokenizer:
    # Split isolates the regex pieces; ByteLevel (without its own GPT-2 regex) maps each piece's
    # UTF-8 bytes to printable characters so that BPE runs over bytes, never over Unicode chars.
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = None
    return hf


def _capped(texts: Iterable[str], doc_cap: int | None, max_chars: int | None, stats: dict) -> Iterator[str]:
    """Crop each document to doc_cap chars; stop once more than max_chars were yielded (reference)."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.train expects an iterable of str, got an item of type {type(text).__name__}")
        if doc_cap and len(text) > doc_cap:
            text = text[:doc_cap]
        stats["docs"] += 1
        stats["chars"] += len(text)
        yield text
        if max_chars is not None and stats["chars"] > max_chars:
            return


_NO_MERGE = 1 << 62


def _bpe(data: bytes, merges: dict[int, int]) -> list[int]:
    """Token ids of `data` under `merges` ((left << 20 | right) -> (rank << 20 | result id)): the
    lowest-ranked adjacent pair is merged first (leftmost among equals), as in training."""
    parts = list(data)  # single bytes: id == byte value
    get = merges.get
    ranks = [get(parts[i] << 20 | parts[i + 1], _NO_MERGE) for i in range(len(parts) - 1)]
    while ranks:
        best = min(ranks)
        if best == _NO_MERGE:
            break
        i = ranks.index(best)
        parts[i] = best & 0xFFFFF
        del parts[i + 1], ranks[i]
        if i > 0:
            ranks[i - 1] = get(parts[i - 1] << 20 | parts[i], _NO_MERGE)
        if i < len(ranks):
            ranks[i] = get(parts[i] << 20 | parts[i + 1], _NO_MERGE)
    return parts


def _only_split(data: bytes, id_of: dict[bytes, int]) -> int:
    """The split point k with both data[:k] and data[k:] known tokens if there is exactly one, else 0."""
    found = 0
    for k in range(1, len(data)):
        if data[:k] in id_of and data[k:] in id_of:
            if found:
                return 0
            found = k
    return found


def _merges_from_ranks(ranks: list[tuple[bytes, int]], n_tokens: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """(token bytes by id, merges as (left id, right id) in rank order) from rustbpe's (bytes, id) list.

    rustbpe may learn a second merge that yields bytes it already has (a+bc after ab+c): HF keeps one
    id per string, so such a merge is kept as a merge into the existing token, and rustbpe is asked
    for a few spare merges so that n_tokens distinct tokens remain."""
    tokens = [bytes([b]) for b in range(256)]
    id_of = {t: i for i, t in enumerate(tokens)}
    merges: dict[int, int] = {}  # packed as in _bpe (ids < 2**20)
    order: list[tuple[int, int]] = []
    for data, rid in sorted(ranks, key=lambda r: r[1]):
        if rid < 256:
            continue
        if len(tokens) >= n_tokens:
            break
        # Fast path: if one split point has two known halves, BPE (which ends in exactly two known
        # tokens) must end there; otherwise run BPE with the merges so far.
        split = _only_split(data, id_of)
        parts = [id_of[data[:split]], id_of[data[split:]]] if split else _bpe(data, merges)
        if len(parts) == 1:
            continue  # already reachable through earlier merges
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the merge behind token {rid} ({data!r}): BPE with the earlier "
                               f"merges splits it into {len(parts)} parts; please report this")
        if data not in id_of:
            id_of[data] = len(tokens)
            tokens.append(data)
        merges[parts[0] << 20 | parts[1]] = len(order) << 20 | id_of[data]
        order.append((parts[0], parts[1]))
    return tokens, order


class Tokenizer:
    """A trained byte-level BPE tokenizer: encode/decode, special tokens, chat rendering."""

    def __init__(self, hf: HFTokenizer, token_bytes: np.ndarray | None = None):
        self.hf = hf
        # Never split specials out of ordinary text (not persisted in tokenizer.json: set on load).
        self.hf.encode_special_tokens = True
        self.vocab_size: int = hf.get_vocab_size()
        self._special = {name: hf.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [n for n, i in self._special.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}: it was not made by Tokenizer.train")
        self.bos_token_id: int = self._special["<|bos|>"]
        self._token_bytes = token_bytes if token_bytes is not None else self._compute_token_bytes()
        if len(self._token_bytes) != self.vocab_size:
            raise ValueError(f"token_bytes has {len(self._token_bytes)} entries but the vocab has {self.vocab_size}: "
                             "the two files come from different tokenizers; re-run the tokenizer stage")
        self.train_stats: dict = {}
        self._id_bytes: list[bytes] | None = None

    # ---- training, saving, loading ---------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 32768, doc_cap: int = 10_000,
              max_chars: int | None = None) -> "Tokenizer":
        """Train on `texts` (each cropped to doc_cap chars; stop after max_chars chars in total)."""
        n_regular = vocab_size - len(SPECIAL_TOKENS)
        if n_regular < 256:
            raise ValueError(f"vocab_size {vocab_size} is too small: need at least 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} specials = {256 + len(SPECIAL_TOKENS)}")
        try:
            import rustbpe
        except ImportError:
            raise ImportError("Tokenizer.train needs rustbpe (the reference's BPE trainer): pip install rustbpe "
                              "(it is in the project's dependencies: reinstall with scripts/install.sh)") from None
        stats = {"docs": 0, "chars": 0}
        t0 = time.perf_counter()
        trainer = rustbpe.Tokenizer()
        spare = 32 + n_regular // 256  # for merges that rebuild an existing token (see _merges_from_ranks)
        trainer.train_from_iterator(_capped(texts, doc_cap, max_chars, stats), n_regular + spare,
                                    pattern=SPLIT_PATTERN)
        tokens, merges = _merges_from_ranks(trainer.get_mergeable_ranks(), n_regular)
        if len(tokens) < n_regular:
            raise ValueError(
                f"the training text ({stats['docs']:,} documents, {stats['chars']:,} chars) yields only "
                f"{len(tokens) - 256} merges but vocab_size {vocab_size} needs {n_regular - 256}: "
                "train on more text (raise max_chars / add shards) or lower vocab_size")
        tok = cls._from_merges(tokens, merges)
        seconds = time.perf_counter() - t0
        assert tok.vocab_size == vocab_size and tok.bos_token_id == n_regular, (tok.vocab_size, tok.bos_token_id)
        tok.train_stats = {**stats, "seconds": seconds, "chars_per_sec": stats["chars"] / max(seconds, 1e-9),
                           "merges": len(merges)}
        return tok

    @classmethod
    def _from_merges(cls, tokens: list[bytes], merges: list[tuple[int, int]]) -> "Tokenizer":
        """The HF BPE of tokens (bytes by id) and merges (id pairs in rank order), specials last."""
        as_str = [t.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL) for t in tokens]
        bpe = BPE(vocab={s: i for i, s in enumerate(as_str)}, merges=[(as_str[a], as_str[b]) for a, b in merges],
                  unk_token=None, fuse_unk=False)
        hf = _configure(HFTokenizer(bpe))
        hf.add_special_tokens(SPECIAL_TOKENS)
        return cls(hf)

    @classmethod
    def from_mergeable_ranks(cls, ranks: dict[bytes, int]) -> "Tokenizer":
        """The tokenizer of a tiktoken-style {token bytes: id} table (ids 0..n-1, 0..255 the bytes),
        with the 9 specials at n..n+8: what a rustbpe/tiktoken tokenizer of the reference encodes
        as. ValueError when the table is not such a BPE."""
        n = len(ranks)
        by_id = sorted(ranks.items(), key=lambda r: r[1])
        if n < 256 or [i for _, i in by_id] != list(range(n)) or any(by_id[b][0] != bytes([b]) for b in range(256)):
            raise ValueError("the mergeable ranks are not ids 0..n-1 with the 256 single bytes first")
        try:
            tokens, merges = _merges_from_ranks(by_id, n)
        except RuntimeError:  # a token that BPE over the earlier merges does not split in two
            tokens = []
        if tokens != [t for t, _ in by_id]:
            raise ValueError("the mergeable ranks are not a byte-pair encoding (a token is not the merge of two "
                             "earlier ones)")
        return cls._from_merges(tokens, merges)

    def save(self, directory) -> None:
        """Write tokenizer.json and token_bytes.npy (int32 UTF-8 byte length per id, 0 for specials)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / TOKENIZER_FILE))
        np.save(d / TOKEN_BYTES_FILE, self._token_bytes.astype(np.int32))

    @classmethod
    def from_directory(cls, path) -> "Tokenizer":
        d = Path(path)
        f = d / TOKENIZER_FILE
        if not f.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {d}: point at a tokenizer artifact (run the tokenizer stage)")
        tb = d / TOKEN_BYTES_FILE
        return cls(HFTokenizer.from_file(str(f)), np.load(tb) if tb.is_file() else None)

    def _compute_token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=np.int32)
        specials = set(self._special.values())
        for i in range(self.vocab_size):
            if i not in specials:
                out[i] = len(self.hf.id_to_token(i))  # one byte-level char per byte
        return out

    # ---- encoding ---------------------------------------------------------------------------------
    def encode_special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None

    def _special_id(self, tok: int | str | None) -> int | None:
        if tok is None or isinstance(tok, int):
            return tok
        return self.encode_special(tok)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Token ids of `text` (a str) or of each text in a list.

        A list is encoded in parallel on the `tokenizers` thread pool (size: RAYON_NUM_THREADS, default
        all cores; fixed per process); num_threads=1 encodes sequentially in the calling thread.
        """
        pre, post = self._special_id(prepend), self._special_id(append)
        head = [pre] if pre is not None else []
        tail = [post] if post is not None else []
        if isinstance(text, str):
            return head + self.hf.encode(text, add_special_tokens=False).ids + tail
        if not isinstance(text, list):
            raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")
        if num_threads == 1:
            encs = [self.hf.encode(t, add_special_tokens=False) for t in text]
        else:
            encs = self.hf.encode_batch_fast(text, add_special_tokens=False)
        return [head + e.ids + tail for e in encs]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of the tokens (a token may end inside a UTF-8 character; specials by name)."""
        if self._id_bytes is None:
            names = {i: n.encode() for n, i in self._special.items()}
            self._id_bytes = [names.get(i) or bytes(_CHAR_TO_BYTE[c] for c in self.hf.id_to_token(i))
                              for i in range(self.vocab_size)]
        return b"".join(self._id_bytes[i] for i in ids)

    def id_to_token(self, i: int) -> str:
        """The decoded text of one token (specials by name)."""
        return self.decode([i])

    def token_bytes(self):
        """int32 tensor (vocab_size,): UTF-8 byte length of each token, 0 for specials (for bits/byte)."""
        import torch  # lazy: loading a tokenizer must not pay for torch

        return torch.from_numpy(self._token_bytes.astype(np.int32))

    # ---- chat -------------------------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = trained on) of a conversation, cut to max_tokens.

        Mask: 1 on assistant content, on <|assistant_end|> and on python tool calls including their
        <|python_start|>/<|python_end|>; 0 on BOS, user turns, <|assistant_start|> and tool output.
        A leading system message is merged into the first user message.
        """
        messages = _messages(conversation)
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = dict(messages[1], content=_text(messages[0]) + "\n\n" + _text(messages[1]))
            messages = [merged] + messages[2:]
        if not messages:
            raise ValueError("conversation has no messages")
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens, m: int):
            if isinstance(tokens, int):
                tokens = [tokens]
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self._special
        add(self.bos_token_id, 0)
        for i, msg in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if msg.get("role") != expected:
                raise ValueError(f"message {i} has role {msg.get('role')!r} but must be {expected!r}: "
                                 "turns alternate user/assistant, starting with user (after an optional system)")
            content = msg.get("content")
            if expected == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(_text(msg)), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, value = part.get("type"), self.encode(part.get("text", ""))
                    if kind == "text":
                        add(value, 1)
                    elif kind == "python":
                        add(sp["<|python_start|>"], 1)
                        add(value, 1)
                        add(sp["<|python_end|>"], 1)
                    elif kind == "python_output":
                        # Produced by the tool at inference time: the model must not learn to write it.
                        add(sp["<|output_start|>"], 0)
                        add(value, 0)
                        add(sp["<|output_end|>"], 0)
                    else:
                        raise ValueError(f"message {i}: unknown part type {kind!r} (text, python, python_output)")
            else:
                raise ValueError(f"message {i}: content must be a str or a list of parts, got {type(content).__name__}")
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """The prompt for the last assistant turn: the conversation without it, then <|assistant_start|>."""
        messages = _messages(conversation)
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation ending with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self._special["<|assistant_start|>"]]


def _messages(conversation) -> list[dict]:
    if isinstance(conversation, dict):
        conversation = conversation.get("messages")
    if not isinstance(conversation, list):
        raise ValueError("a conversation is {'messages': [...]} or a list of {'role', 'content'} messages")
    return copy.copy(conversation)


def _text(msg: dict) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise ValueError(f"{msg.get('role')} content must be a string (only assistant messages carry tool parts)")
