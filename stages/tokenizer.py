"""Stage tokenizer: train the byte-level BPE tokenizer on the train shards and measure its compression.

    nanorun stage tokenizer --input data=data_shards@latest                          # vocab 32,768 on up to 2B chars (the reference)
    nanorun stage tokenizer --input data=data_shards@latest --set vocab_size=8192    # e.g. for a small CPU run

Input `data`: a data_shards artifact. Training reads the train shards in order, each document cut to
doc_cap characters, and stops after max_chars characters (the reference: 2B chars, docs capped at
10,000). Output: tokenizer.json (HF tokenizers; load with core.tokenizer.Tokenizer.from_directory)
and token_bytes.npy (UTF-8 bytes per token id, 0 for the specials: the bits-per-byte denominator).
Metrics: training throughput and, like the reference's tok_eval, the compression (bytes per token)
on the first documents (up to 1M chars) of the train and of the validation shards and on a code
sample, printed as a table. A GPT-2/GPT-4 comparison needs their vocabularies, which are downloads; not done here.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stages.base import ConfigError, Input, StageConfig, identity, progress, runtime, stage_logger

NAME = "tokenizer"
code_version = "1"
INPUTS = ("data",)

log = stage_logger(NAME)

_SANITY = ("Hello world! This is a test.\nNumbers: 123, 4567, 89\nContractions: I'm, you're, it's\n"
           "Special chars: @#$%^&*()\nUnicode: 你好世界 🌍")


@dataclass(frozen=True)
class Config(StageConfig):
    vocab_size: int = identity(32768, help="tokens including the 256 bytes and the 9 specials")
    max_chars: int = identity(2_000_000_000, help="train on at most this many characters (then stop)")
    doc_cap: int = identity(10_000, help="cut each training document to this many characters")
    threads: int = runtime(0, help="tokenizers threads (RAYON_NUM_THREADS; 0 = all cores); fixed per "
                                   "process once the first parallel call ran")

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 256 + 9 + 1:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size!r}: need an integer >= 266 (256 bytes, "
                              "9 specials and at least one merge)")
        if self.max_chars < 1 or self.doc_cap < 1:
            raise ConfigError(f"tokenizer: max_chars and doc_cap must be >= 1 (got {self.max_chars}, {self.doc_cap})")
        if self.threads < 0:
            raise ConfigError(f"tokenizer.threads={self.threads}: expected >= 0 (0 = all cores)")

    def label(self) -> str:
        return f"v{self.vocab_size}"


def _texts(files: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for f in files:  # consumed from the tokenizers thread pool: no progress() calls in here
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


EVAL_CHARS = 1_000_000  # per sample: ~250k tokens pin the ratio to 3 digits; a whole row group can be 5 MB


def _first_docs(f: Path, max_chars: int = EVAL_CHARS) -> list[str]:
    """The first documents of a shard's first row group, up to max_chars characters."""
    import pyarrow.parquet as pq

    docs, n = [], 0
    for d in pq.ParquetFile(f).read_row_group(0, columns=["text"]).column("text").to_pylist():
        if n >= max_chars:
            break
        docs.append(d)
        n += len(d)
    return docs


def compression_table(tok, samples: dict[str, list[str]]) -> dict[str, dict]:
    """bytes / token over each sample's documents (higher = better compression), round trip checked.

    Documents are encoded as a batch (in parallel) rather than joined into one string as the
    reference does: one huge string encodes on a single thread, ~10x slower here."""
    out = {}
    for name, docs in samples.items():
        ids = tok.encode(docs)
        if tok.hf.decode_batch(ids, skip_special_tokens=False) != docs:
            raise RuntimeError(f"tokenizer does not round-trip the {name} sample: encode/decode is broken")
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        n_tokens = sum(map(len, ids))
        out[name] = {"docs": len(docs), "bytes": n_bytes, "tokens": n_tokens, "ratio": round(n_bytes / max(1, n_tokens), 4)}
    return out


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    import numpy as np

    from core.tokenizer import Tokenizer
    from core.layouts import shard_files

    if cfg.threads and "RAYON_NUM_THREADS" not in os.environ:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # nothing to resume: a previous attempt's files are not trusted
        p.unlink() if p.is_file() else None
    train, val = shard_files(inputs["data"].path)
    log.info("training vocab %d on up to %s chars (docs capped at %d) from %d train shard(s)",
             cfg.vocab_size, f"{cfg.max_chars:,}", cfg.doc_cap, len(train))
    progress(0, 2, phase="train")
    tok = Tokenizer.train(_texts(train), vocab_size=cfg.vocab_size, doc_cap=cfg.doc_cap, max_chars=cfg.max_chars)
    st = tok.train_stats
    log.info("trained on %s chars in %d docs in %.1fs: %.2f M chars/s", f"{st['chars']:,}", st["docs"],
             st["seconds"], st["chars_per_sec"] / 1e6)
    if tok.decode(tok.encode(_SANITY)) != _SANITY:
        raise RuntimeError("the trained tokenizer does not round-trip its sanity text")
    tok.save(out)

    progress(1, 2, phase="evaluate")
    t0 = time.perf_counter()
    samples = {"train": _first_docs(train[0]), "val": _first_docs(val[0]),
               "code": [p.read_text(encoding="utf-8") for p in (Path(__file__).with_name("data_shards.py"),
                                                            Path(__file__).parents[1] / "stagekit" / "fetch.py")]}
    table = compression_table(tok, samples)
    encode_s = time.perf_counter() - t0
    lines = [f"{'text':<8} {'bytes':>12} {'tokens':>11} {'bytes/token':>12}"]
    lines += [f"{k:<8} {v['bytes']:>12,} {v['tokens']:>11,} {v['ratio']:>12.3f}" for k, v in table.items()]
    log.info("compression\n%s", "\n".join(lines))

    tb = np.load(out / "token_bytes.npy")
    nz = tb[tb > 0].astype(np.float64)
    n_bytes = sum(v["bytes"] for v in table.values())
    progress(2, 2, phase="done")
    return {
        "vocab_size": tok.vocab_size,
        "train_docs": st["docs"], "train_chars": st["chars"], "train_seconds": round(st["seconds"], 2),
        "train_chars_per_sec": round(st["chars_per_sec"]),
        "encode_mb_per_sec": round(n_bytes / 1e6 / max(encode_s, 1e-9), 2),
        "compression": table,
        "token_bytes": {"min": int(nz.min()), "max": int(nz.max()), "mean": round(float(nz.mean()), 3),
                        "std": round(float(nz.std()), 3)},
    }
