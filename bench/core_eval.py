"""CORE evaluation speed: examples/s per task type for a d4 GPT on CPU, three ways.

    .venv/bin/python -m bench.core_eval                                  # 32 examples of 8 tasks
    .venv/bin/python -m bench.core_eval --max-per-task 64 --tasks arc_easy,lambada_openai --threads 2
    .venv/bin/python -m bench.core_eval --tokenizer path/to/tokenizer_dir   # a trained tokenizer

Modes: `per-example` = the reference's schedule (one padded forward per item holding all its
choices); `batched` = length-sorted padded batches across items; `auto` = batched plus the KV
prefix sharing for items whose choices share a long token prefix (what evaluate_core does for a
core.gpt.GPT). The model is a random d4 (n_layer 4, n_embd 256, 2 heads of 128, vocab 32768, seq
2048): speed does not depend on the weights. Without --tokenizer a 32768-token BPE is trained on
the first corpus shards (a few seconds). Prompt rendering and tokenization are done once, outside
the timings; each time is the best of --repeat runs (modes interleaved: the CPU is shared); every
mode's accuracies must agree (checked).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from core.common import set_num_threads
from core.eval.core import Scorer, build_examples, judge, load_bundle, load_task_data
from core.gpt import GPTConfig, build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_TASKS = "copa,arc_easy,piqa,commonsense_qa,winogrande,lambada_openai,jeopardy,bigbench_qa_wikidata"


def get_tokenizer(path: str | None):
    from core.tokenizer import Tokenizer
    if path:
        return Tokenizer.from_directory(path)
    import pyarrow.parquet as pq
    texts = []
    for shard in sorted((SHARED / "corpus").glob("shard_*.parquet"))[:2]:
        texts += pq.read_table(shard).column("text").to_pylist()
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, vocab_size=32768)
    print(f"trained a {tok.vocab_size}-token BPE on {sum(map(len, texts)) / 1e6:.1f}M chars in "
          f"{time.perf_counter() - t0:.1f}s")
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=str(SHARED / "eval_bundle"))
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--max-per-task", type=int, default=32)
    ap.add_argument("--modes", default="per-example,batched,auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--share-prefix-min", type=int, default=32)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timings per mode")
    args = ap.parse_args()
    print(f"threads: {set_num_threads(args.threads)}")

    tok = get_tokenizer(args.tokenizer)
    cfg = GPTConfig(sequence_len=2048, vocab_size=tok.vocab_size, n_layer=4, n_head=args.n_head,
                    n_kv_head=args.n_head, n_embd=256)
    model = build_model(cfg, "cpu", seed=0).eval()
    print(f"model: d4 n_embd 256, {args.n_head} heads, vocab {cfg.vocab_size}, dtype {model.compute_dtype}")
    bundle = load_bundle(args.bundle)
    modes = args.modes.split(",")
    by_type = {}
    for label in args.tasks.split(","):
        task = bundle.task(label)
        if label in bundle.missing:
            print(f"skip {label}: no data file in the bundle")
            continue
        data = load_task_data(bundle, task, args.max_per_task)
        examples = build_examples(data, task, tok, list(range(len(data))))
        ref_tokens = sum(sum(ex.ends) for ex in examples)
        accs, best = {}, {}
        for _ in range(args.repeat):          # modes interleaved, best of N: the CPU is shared
            for mode in modes:
                scorer = Scorer(model, torch.device("cpu"), tok.bos_token_id, args.batch_size,
                                 args.max_batch_tokens, args.share_prefix_min, use_kv=(mode == "auto"))
                t0 = time.perf_counter()
                with torch.no_grad():
                    if mode == "per-example":
                        out = [scorer.score([ex]) for ex in examples]
                        losses, exact = [o[0][0] for o in out], [o[1][0] for o in out]
                    else:
                        losses, exact = scorer.score(examples)
                best[mode] = min(best.get(mode, math.inf), time.perf_counter() - t0)
                accs[mode] = [judge(task.task_type, ex, lo, xa) for ex, lo, xa in zip(examples, losses, exact)]
        for mode in modes:
            dt = best[mode]
            t = by_type.setdefault((task.task_type, mode), [0, 0.0])
            t[0] += len(data)
            t[1] += dt
            print(f"{label:<22} {task.task_type:<17} {task.num_fewshot:>2}-shot n={len(data):<4} {mode:<12} "
                  f"{dt:7.2f}s {len(data) / dt:8.1f} ex/s {ref_tokens / dt:9.0f} tok/s", flush=True)
        if len({tuple(v) for v in accs.values()}) != 1:
            print(f"  WARNING {label}: modes disagree on some examples: "
                  + ", ".join(f"{m}={sum(v)}/{len(v)}" for m, v in accs.items()))
    print("\nexamples/s per task type (tok/s = tokens of the full sequences, the reference's work, per second)")
    print(f"{'task type':<18}" + "".join(f"{m:>14}" for m in modes))
    for tt in ("multiple_choice", "schema", "language_modeling"):
        if any((tt, m) in by_type for m in modes):
            print(f"{tt:<18}" + "".join(f"{by_type[(tt, m)][0] / by_type[(tt, m)][1]:>14.1f}"
                                        if (tt, m) in by_type else f"{'-':>14}" for m in modes))


if __name__ == "__main__":
    main()
