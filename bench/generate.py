"""Generation speed of core.engine.Engine on a randomly initialised GPT (CPU unless told).

    .venv/bin/python -m bench.generate                       # d4 and d6, batch 1 and 8, prompts 7 and 512
    .venv/bin/python -m bench.generate --depths 4 --batches 1 --prompts 7 --new 64 --profile

Models follow the depth dial at head_dim 64 (d4 = 256 wide / 4 heads, d6 = 384 / 6 heads) with
the reference vocab of 32768. Targets on the 2-core CI machine at batch 1: d4 >= 200 tok/s,
d6 >= 120 tok/s (the reference engine: 133 and 80). Stop tokens are mapped outside the vocab so
every run decodes exactly --new tokens. Columns: prefill = time to the first token; decode tok/s
= tokens generated after the first per second, summed over the batch (per row = / batch);
tok/cpu-s = the same per CPU-second of this process. On a shared machine the wall clock
measures the neighbours too: with --threads 1, tok/cpu-s is what one idle core would do (with
2 threads it also counts the OpenMP spin-waiting, so read the wall clock on a quiet machine).
"""
from __future__ import annotations

import argparse
import time

import torch

from core.common import set_num_threads
from core.engine import SPECIAL_NAMES, Engine
from core.gpt import GPTConfig, build_model


class SpecialsOnlyTokenizer:
    """What the engine needs from a tokenizer when no tool call can happen: special ids (here
    beyond the vocab, so a random model never stops early) and a decode for tool expressions."""

    def __init__(self, vocab_size: int):
        self.ids = {name: vocab_size + i for i, name in enumerate(SPECIAL_NAMES)}
        self.bos_token_id = self.ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        return self.ids[name]

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int]) -> str:
        return ""


def depth_config(depth: int, vocab_size: int, sequence_len: int) -> GPTConfig:
    n_embd = depth * 64
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_embd // 64, n_kv_head=n_embd // 64, n_embd=n_embd)


def run_one(engine: Engine, prompt: list[int], batch: int, new: int, temperature: float,
            top_k: int) -> tuple[float, float, float]:
    """(prefill seconds, decode tok/s wall clock, decode tok/s per CPU-second of this process)."""
    t0 = time.perf_counter()
    gen = engine.generate(prompt, num_samples=batch, max_tokens=new, temperature=temperature, top_k=top_k, seed=0)
    next(gen)
    t1, c1 = time.perf_counter(), time.process_time()
    steps = 1 + sum(1 for _ in gen)
    t2, c2 = time.perf_counter(), time.process_time()
    assert steps == new, (steps, new)
    tokens = (steps - 1) * batch
    return t1 - t0, tokens / (t2 - t1), tokens / max(c2 - c1, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="4,6")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="7,512")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the best is reported (shared CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one decode run")
    args = ap.parse_args()
    threads = set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} · {threads} threads · vocab {args.vocab} · {args.new} new tokens · "
          f"temperature {args.temperature} top-k {args.top_k} · best of {args.repeat}")
    print(f"{'model':>5} {'batch':>5} {'prompt':>6} {'prefill ms':>10} {'decode tok/s':>12} {'per row':>8} "
          f"{'tok/cpu-s':>9}")
    for depth in map(int, args.depths.split(",")):
        model = build_model(depth_config(depth, args.vocab, args.sequence_len), "cpu", seed=0).eval()
        engine = Engine(model, SpecialsOnlyTokenizer(args.vocab))
        run_one(engine, list(range(7)), 1, 8, args.temperature, args.top_k)   # warm-up (allocator, rope table)
        for batch in map(int, args.batches.split(",")):
            for plen in map(int, args.prompts.split(",")):
                prompt = torch.randint(0, args.vocab, (plen,), generator=torch.Generator().manual_seed(plen)).tolist()
                runs = [run_one(engine, prompt, batch, args.new, args.temperature, args.top_k)
                        for _ in range(args.repeat)]
                prefill = min(r[0] for r in runs)
                tps = max(r[1] for r in runs)
                cpu = max(r[2] for r in runs)
                print(f"{'d' + str(depth):>5} {batch:>5} {plen:>6} {prefill * 1e3:>10.1f} {tps:>12.1f} "
                      f"{tps / batch:>8.1f} {cpu:>9.1f}", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            prompt = list(range(7))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_one(engine, prompt, 1, args.new, args.temperature, args.top_k)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
