"""Packing loader throughput on the shared corpus: tokens/s at T=256 and T=2048.

    .venv/bin/python -m bench.dataloader                          # trains a 32768 tokenizer first (~5 s)
    .venv/bin/python -m bench.dataloader --tokenizer out/tok --batch 8 --batches 100 --seq 256,2048

For each T: a PackingLoader over the 7 train shards (background tokenizing + packing thread, as in
training) is drained for --batches batches; tokens/s = B*T*batches / wall time including the
tokenization it needed (the buffer starts empty, like a fresh run). Also printed: the share of
loaded tokens cropped away, the time to the first batch, and the time a restore from a mid-run
state takes to deliver its first batch (it re-tokenizes the buffered documents).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq

from core.dataloader import PackingLoader
from core.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="", help="a tokenizer directory (default: train vocab 32768 here)")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--seq", default="256,2048")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=100)
    args = ap.parse_args()

    files = sorted(Path(args.corpus).glob("shard_*.parquet"))[:-1]
    if args.tokenizer:
        tok = Tokenizer.from_directory(args.tokenizer)
    else:
        t0 = time.perf_counter()
        tok = Tokenizer.train((t for f in files for t in pq.read_table(f).column("text").to_pylist()), 32768)
        print(f"trained a {tok.vocab_size}-token tokenizer in {time.perf_counter() - t0:.1f}s")
    print(f"{'T':>5} {'B':>3} {'batches':>7} {'tokens/s':>10} {'first batch':>11} {'cropped':>8} {'restore':>8} {'epoch':>5}")
    for T in (int(s) for s in args.seq.split(",")):
        loader = PackingLoader(files, tok, args.batch, T)
        t0 = time.perf_counter()
        next(loader)
        first = time.perf_counter() - t0
        mid = None
        for i in range(args.batches - 1):
            if i == args.batches // 2:
                mid = loader.state_dict()
            next(loader)
        dt = time.perf_counter() - t0
        s = loader.stats()
        loader.close()
        t1 = time.perf_counter()
        resumed = PackingLoader(files, tok, args.batch, T, state=mid)
        next(resumed)
        restore = time.perf_counter() - t1
        resumed.close()
        print(f"{T:>5} {args.batch:>3} {args.batches:>7} {args.batch * T * args.batches / dt:>10,.0f} "
              f"{first:>10.2f}s {s['cropped_frac']:>8.1%} {restore:>7.2f}s {s['epoch']:>5}")


if __name__ == "__main__":
    main()
