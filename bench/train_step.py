"""Training-step throughput on CPU: tokens/s, ms/step, GFLOP/s, MFU and peak RSS per config.
A hand-assembled step (model-level experiments); what the pretrain stage runs is measured by
bench/pretrain_path.py.

    python -m bench.train_step                                   # d4 + d6, fp32 + bf16, our defaults
    python -m bench.train_step --depths 4 --dtypes bf16 --steps 8
    python -m bench.train_step --reference                       # also the reference-style step
    python -m bench.train_step --no-compile                      # eager everything

Setup: head_dim 64, window L, seq 256, device batch 16, vocab 32768, 2 threads, the real
optimizer (Muon + AdamW) and byte-level tokens of the real corpus when ../shared/data is there (so
loss@N is meaningful and comparable between dtypes). Each config runs in its own process (clean
peak RSS, own compile); the matmul peak used for MFU is measured in this run, per dtype, on the
model's own GEMM shapes and on a square 2048^3 GEMM (the larger of the two).

Variants: "ours" (fused chunked loss, fused AdamW, torch.compile unless --no-compile) and, with
--reference, "reference" (full logits + F.cross_entropy, per-tensor AdamW, eager), i.e. what the
straightforward nanochat-style step does on this machine. The machine is shared: variants run
back to back and the load average is printed; compare rows of the same run. The measured processes
get OMP_WAIT_POLICY=PASSIVE unless told otherwise: with the default (spinning) policy, 2-thread steps
ran 2-3x slower here whenever other jobs shared the two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NANORUN_SHARED_DATA", REPO.parent / "shared" / "data"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> float:
    """Best GFLOP/s over the given (m, k, n) GEMMs, each timed for ~`seconds`."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def corpus_tokens(n: int) -> torch.Tensor | None:
    shard = SHARED / "corpus" / "shard_00000.parquet"
    if not shard.exists():
        return None
    import pyarrow.parquet as pq
    text = "\n".join(pq.read_table(shard, columns=["text"]).column("text").to_pylist())
    data = torch.frombuffer(bytearray(text.encode("utf-8")[:n]), dtype=torch.uint8).long()
    return data


def run_one(a) -> dict:
    """One config in this process: build, warm up (compile), time `steps` optimizer steps."""
    from core.common import set_num_threads
    from core.gpt import build_model
    from core.optim import apply_schedule, build_optimizer
    from core.scaling import derive
    from core.train.config import PretrainConfig

    set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = DTYPES[a.dtype]
    plan = derive(PretrainConfig(depth=a.depth, aspect_ratio=64, head_dim=a.head_dim, max_seq_len=a.seq,
                                 window_pattern=a.window, num_iterations=1000, total_batch_size=a.batch * a.seq),
                  a.vocab)
    model = build_model(plan.model_config(), "cpu", dtype=dtype, seed=0)
    reference = a.variant == "reference"
    model.fused_loss = not reference
    opt = build_optimizer(model, plan, fused_adamw=not reference)
    step_fn = model
    if a.compile and not reference:
        step_fn = model.compile_for_training()
    need = (a.warmup + a.steps) * a.batch * (a.seq + 1)
    data = corpus_tokens(need)
    if data is None or len(data) < need:
        data = torch.randint(0, a.vocab, (need,), generator=torch.Generator().manual_seed(0))
    data = data.view(a.warmup + a.steps, a.batch, a.seq + 1)

    def step(i: int) -> float:
        loss = step_fn(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        apply_schedule(opt, plan, i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    first_loss = step(0)
    first = time.perf_counter() - t0
    for i in range(1, a.warmup):
        step(i)
    times, loss = [], first_loss
    for i in range(a.warmup, a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = step(i)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    tokens = a.batch * a.seq
    return dict(depth=a.depth, dtype=a.dtype, variant=a.variant, compile=bool(a.compile and not reference),
                first_step_s=first, ms_step=median * 1e3, best_ms=times[0] * 1e3, tok_s=tokens / median,
                gflops=model.estimate_flops() * tokens / median / 1e9, loss=loss,
                rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                params=model.num_params(), steps=a.warmup + a.steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", default="L")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first includes compile)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--reference", action="store_true", help="also run the reference-style step")
    ap.add_argument("--omp-wait-policy", default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                    help="for the measured processes; PASSIVE (default) keeps idle OpenMP threads from "
                         "spinning, 2-3x faster on a shared, oversubscribed CPU")
    ap.add_argument("--variant", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a)), flush=True)
        return

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__} | threads {a.threads} | cpu {torch.backends.cpu.get_cpu_capability()} | "
          f"load {os.getloadavg()[0]:.1f} | seq {a.seq} batch {a.batch} vocab {a.vocab} head_dim {a.head_dim} "
          f"window {a.window} | compile {a.compile} | OMP_WAIT_POLICY {a.omp_wait_policy}", flush=True)
    shapes = [(a.batch * a.seq, 64 * max(a.depths), a.vocab), (a.batch * a.seq, 64 * max(a.depths), 4 * 64 * max(a.depths)),
              (2048, 2048, 2048)]
    peaks = {name: matmul_peak(DTYPES[name], shapes) for name in a.dtypes}
    print("matmul peak (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), flush=True)
    variants = ["reference", "ours"] if a.reference else ["ours"]
    rows = []
    for depth in a.depths:
        for dtype in a.dtypes:
            for variant in variants:
                cmd = [sys.executable, "-m", "bench.train_step", "--one", "--depth", str(depth), "--dtype", dtype,
                       "--variant", variant, "--seq", str(a.seq), "--batch", str(a.batch), "--vocab", str(a.vocab),
                       "--head-dim", str(a.head_dim), "--window", a.window, "--threads", str(a.threads),
                       "--steps", str(a.steps), "--warmup", str(a.warmup),
                       "--compile" if a.compile else "--no-compile"]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": a.omp_wait_policy})
                if proc.returncode != 0:
                    print(f"d{depth} {dtype} {variant}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["mfu"] = 100 * row["gflops"] / peaks[dtype]
                rows.append(row)
                print(f"  done d{depth} {dtype} {variant}: {row['tok_s']:.0f} tok/s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    head = (f"{'model':>5} {'dtype':>5} {'variant':>9} {'compile':>7} {'tok/s':>7} {'ms/step':>8} {'best ms':>8} "
            f"{'GFLOP/s':>8} {'MFU%':>5} {'1st step s':>10} {'RSS MB':>7} {'loss@N':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{'d' + str(r['depth']):>5} {r['dtype']:>5} {r['variant']:>9} {str(r['compile']):>7} {r['tok_s']:>7.0f} "
              f"{r['ms_step']:>8.0f} {r['best_ms']:>8.0f} {r['gflops']:>8.1f} {r['mfu']:>5.1f} {r['first_step_s']:>10.1f} "
              f"{r['rss_mb']:>7.0f} {r['loss']:>7.3f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
