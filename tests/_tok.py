"""A small tokenizer trained once per test session on the real shared corpus (for loader/stage tests)."""
from __future__ import annotations

import functools
from pathlib import Path

import pyarrow.parquet as pq


def corpus_texts(corpus_dir: Path, files: int = 1) -> list[str]:
    paths = sorted(Path(corpus_dir).glob("shard_*.parquet"))[:files]
    return [t for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]


def val_texts(corpus_dir: Path) -> list[str]:
    """The documents of the last shard (the validation shard by convention)."""
    last = sorted(Path(corpus_dir).glob("shard_*.parquet"))[-1]
    return pq.read_table(last, columns=["text"]).column("text").to_pylist()


@functools.lru_cache(maxsize=4)
def small_tokenizer(corpus_dir: str, vocab_size: int = 1024):
    """vocab 1024 on the first shard (~2M chars): under a second, real merges, real specials."""
    from core.tokenizer import Tokenizer

    return Tokenizer.train(corpus_texts(Path(corpus_dir)), vocab_size=vocab_size)
