"""Pretraining speed on the path users run: the real trainer, launched as the pretrain stage launches
it, against a plain reference-style step measured in the same run.

    python -m bench.pretrain_path                                  # fp32 eager, fp32 compiled, bf16, reference
    python -m bench.pretrain_path --variants fp32 reference --steps 40
    python -m bench.pretrain_path --work /tmp/bench-pp             # keeps the 8192-token tokenizer between runs

Setup (issue 13): the stage's cpu-demo preset with aspect_ratio 64 (d4, dim 256, head_dim 64, seq 256,
device batch 16, total batch 4,096 tokens), a vocab-8192 tokenizer trained on ../shared/data/corpus
(cached under --work), the corpus as a data_shards layout (last shard = val), 2 threads, --steps
optimizer steps and one val-bpb evaluation at the end (and at step 0, as the stage does).

Variants:
- pipeline variants: stages.pretrain.Config -> cfg.trainer_config() -> run.json -> launch_trainer()
  (torchrun -> core.train.pretrain), exactly the stage's launch; numbers from its metrics.jsonl.
  While it runs, the CPU time of every other process of the launch (torchrun, this launcher
  streaming the log) is sampled: "overhead %" = their CPU / the trainer's CPU.
- reference: a plain nanochat-style loop in one process on the same data, tokenizer, model and
  schedule: full logits + F.cross_entropy, per-tensor AdamW (+ Muon), torch.compile of the whole
  model (what the reference does on CPU), the same val batches for bpb at the end.
tok/s is over steps 2..N (the first step, compile included, is its own column); MFU against the
trainer's own measured matmul peak. The machine is shared: compare rows of one run, and read the
load average printed with each row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NANORUN_SHARED_DATA", REPO.parent / "shared" / "data"))
VARIANTS = {  # name: (dtype, compile)
    "fp32": ("float32", False), "fp32-compile": ("float32", True), "bf16": ("bfloat16", False),
    "bf16-compile": ("bfloat16", True), "auto": ("auto", None), "reference": ("float32", True),
}


def prepare(work: Path, vocab: int) -> tuple[Path, Path]:
    """(data dir in the data_shards layout, tokenizer dir), built once under `work`."""
    from core.tokenizer import Tokenizer

    data = work / "data"
    if not (data / "val").is_dir():
        shards = sorted((SHARED / "corpus").glob("shard_*.parquet"))
        if len(shards) < 2:
            sys.exit(f"no corpus shards in {SHARED / 'corpus'}: set NANORUN_SHARED_DATA to the shared data directory")
        for split, picked in (("train", shards[:-1]), ("val", shards[-1:])):
            (data / split).mkdir(parents=True, exist_ok=True)
            for f in picked:
                (data / split / f.name).symlink_to(f)
    tok = work / f"tok-{vocab}"
    if not (tok / "tokenizer.json").is_file():
        import pyarrow.parquet as pq
        texts = [t for f in sorted((data / "train").glob("shard_*.parquet"))[:2]
                 for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
        Tokenizer.train(texts, vocab_size=vocab).save(tok)
    return data, tok


def stage_config(a, dtype: str, compile_: bool | None):
    from stages.pretrain import preset

    return preset("cpu-demo", aspect_ratio=64, num_iterations=a.steps, eval_every=a.steps, eval_tokens=a.eval_tokens,
                  sample_every=-1, save_every=-1, dtype=dtype, compile=compile_, wandb="disabled",
                  omp_threads=a.threads, warmup_steps=min(10, a.steps // 4))


class CpuSampler(threading.Thread):
    """CPU seconds of the trainer (with its own children: compile workers) vs torchrun and this
    launcher process (streaming the log; the sampling itself is counted too)."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil
        self.me = psutil.Process()
        self.stop = threading.Event()
        self.last: dict[int, tuple[str, float]] = {}
        self.me_start = sum(self.me.cpu_times()[:2])
        self.me_end = self.me_start

    def run(self):
        import psutil
        while not self.stop.is_set():
            trainers = set()
            for p in self.me.children(recursive=True):
                try:
                    cmd, parents, t = p.cmdline(), {q.pid for q in p.parents()}, p.cpu_times()
                except psutil.Error:
                    continue
                if "core.train.pretrain" in cmd and "torch.distributed.run" not in cmd:
                    trainers.add(p.pid)
                role = "trainer" if p.pid in trainers or parents & trainers else \
                    "torchrun" if "torch.distributed.run" in cmd else "other"
                self.last[p.pid] = (role, t.user + t.system)  # not children_*: torchrun reaps the trainer
            self.me_end = sum(self.me.cpu_times()[:2])
            self.stop.wait(1.0)

    def result(self) -> dict[str, float]:
        out = {"trainer": 0.0, "torchrun": 0.0, "other": 0.0, "launcher": self.me_end - self.me_start}
        for role, cpu in self.last.values():
            out[role] += cpu
        return out


def run_pipeline(a, name: str, data: Path, tok: Path) -> dict:
    from stages.training import launch_trainer

    dtype, compile_ = VARIANTS[name]
    cfg = stage_config(a, dtype, compile_)
    out = a.work / "runs" / name
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run_json = out / "run.json"
    run_json.write_text(json.dumps(cfg.trainer_config(data_dir=data, tok_dir=tok, out=out, tokenizer_fingerprint="",
                                                      eval_bundle_dir=None)))
    sampler = CpuSampler()
    sampler.start()
    t0 = time.time()
    try:
        launch_trainer("core.train.pretrain", run_json, out, name=f"bench-{name}", nproc=1, omp_threads=a.threads,
                       timeout=a.timeout, heartbeat=600.0)
    except Exception as e:  # a refused config (e.g. bf16 on CPU) is a row, not the end of the benchmark
        sampler.stop.set()
        tail = (out / "train.log").read_text().strip().splitlines()[-1:] if (out / "train.log").exists() else [str(e)]
        return {"variant": name, "error": tail[0][:160]}
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    from core.train.common import read_metrics
    rows = read_metrics(out / "metrics.jsonl")
    start = next(r for r in rows if r["kind"] == "start")
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    cpu = sampler.result()
    others = cpu["torchrun"] + cpu["launcher"] + cpu["other"]
    return {"variant": name, "dtype": start["derived"]["dtype"], "compile": start["derived"]["compile"],
            "tok_s": [r["tok_per_s"] for r in train[1:]], "mfu": statistics.median(r["mfu"] for r in train[1:]),
            "first_step_s": train[0]["dt"], "val_bpb": val[-1]["val_bpb"],
            "eval0_s": val[0]["time"] - start["time"], "wall_s": wall,
            "overhead_pct": 100 * others / cpu["trainer"] if cpu["trainer"] else None,
            "cpu_s": {k: round(v, 1) for k, v in cpu.items()}}


def run_reference(a, data: Path, tok: Path) -> dict:
    """The reference-style loop, in this process (called with --one-reference in a subprocess)."""
    import torch

    from core.common import set_num_threads
    from core.dataloader import PackingLoader
    from core.eval.bpb import evaluate_bpb
    from core.gpt import build_model
    from core.optim import apply_schedule, build_optimizer
    from core.scaling import derive
    from core.tokenizer import Tokenizer
    from core.train.common import peak_flops, seed_everything

    set_num_threads(a.threads)
    cfg = stage_config(a, "float32", True)
    tokenizer = Tokenizer.from_directory(tok)
    plan = derive(cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len, tokenizer.vocab_size,
                  cfg.target_param_data_ratio, cfg.target_flops, cfg.num_iterations, cfg.total_batch_size,
                  window_pattern=cfg.window_pattern, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                  matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay,
                  warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio, final_lr_frac=cfg.final_lr_frac)
    seed_everything(cfg.seed)
    model = build_model(plan.model_config(), "cpu", torch.float32, seed=cfg.seed)
    model.fused_loss = False                                   # full logits + F.cross_entropy
    optimizer = build_optimizer(model, plan, distributed=False, fused_adamw=False)  # per-tensor AdamW
    compiled = torch.compile(model, dynamic=False)
    train_files = sorted((data / "train").glob("shard_*.parquet"))
    val_files = sorted((data / "val").glob("shard_*.parquet"))
    loader = PackingLoader(train_files, tokenizer, cfg.device_batch_size, cfg.max_seq_len, 0, 1,
                           buffer_size=cfg.loader_buffer)
    grad_accum = plan.grad_accum_steps(cfg.device_batch_size, 1)
    times = []
    for step in range(plan.num_iterations):
        t0 = time.perf_counter()
        for _ in range(grad_accum):
            x, y = next(loader)
            (compiled(x, y) / grad_accum).backward()
        apply_schedule(optimizer, plan, step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len))
    val = PackingLoader(val_files, tokenizer, cfg.device_batch_size, cfg.max_seq_len, 0, 1, infinite=False,
                        max_batches=eval_steps, buffer_size=cfg.loader_buffer)
    model.eval()
    bpb = evaluate_bpb(model, val, tokenizer.token_bytes(), steps=eval_steps)
    peak, _ = peak_flops("cpu", torch.float32)
    tokens = plan.total_batch_size
    return {"variant": "reference", "dtype": "float32", "compile": True, "tok_s": [tokens / t for t in times[1:]],
            "mfu": 100 * plan.flops_per_token * tokens / statistics.median(times[1:]) / peak,
            "first_step_s": times[0], "val_bpb": bpb, "eval0_s": None, "overhead_pct": None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["fp32", "fp32-compile", "bf16", "reference"],
                    choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per variant")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per variant")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "nanorun-bench-pretrain")
    ap.add_argument("--one-reference", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    data, tok = prepare(a.work, a.vocab)
    if a.one_reference:
        print(json.dumps(run_reference(a, data, tok)), flush=True)
        return
    import torch
    print(f"torch {torch.__version__} | cpu {torch.backends.cpu.get_cpu_capability()} | threads {a.threads} | "
          f"steps {a.steps} | vocab {a.vocab} | load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name in a.variants:
        if name == "reference":
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
            proc = subprocess.run([sys.executable, "-m", "bench.pretrain_path", "--one-reference", "--steps", str(a.steps),
                                   "--eval-tokens", str(a.eval_tokens), "--threads", str(a.threads), "--vocab",
                                   str(a.vocab), "--work", str(a.work)], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=a.timeout)
            row = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                   {"variant": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]})
        else:
            row = run_pipeline(a, name, data, tok)
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        print(f"  {name}: " + (row["error"] if "error" in row else
                               f"median {statistics.median(row['tok_s']):,.0f} tok/s, val bpb {row['val_bpb']:.4f}")
              + f" (load {row['load']:.1f})", flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["variant"] == "reference" and "error" not in r), None)
    head = (f"{'variant':>12} {'dtype':>8} {'compile':>7} {'tok/s min':>9} {'median':>7} {'max':>7} {'vs ref':>6} "
            f"{'MFU%':>5} {'1st step s':>10} {'to eval0 s':>10} {'val bpb':>7} {'overhead%':>9} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:>12}  refused/failed: {r['error']}")
            continue
        med = statistics.median(r["tok_s"])
        vs = f"{med / statistics.median(ref['tok_s']):.2f}x" if ref else "-"
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['variant']:>12} {r['dtype']:>8} {str(r['compile']):>7} {min(r['tok_s']):>9,.0f} {med:>7,.0f} "
              f"{max(r['tok_s']):>7,.0f} {vs:>6} {r['mfu']:>5.2f} {r['first_step_s']:>10.1f} "
              f"{fmt(r['eval0_s'], '10.1f'):>10} {r['val_bpb']:>7.4f} {fmt(r['overhead_pct'], '9.2f'):>9} "
              f"{r['load']:>5.1f}")
    for r in rows:
        if r.get("cpu_s"):
            print(f"CPU seconds while {r['variant']} trained: " + ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items()))


if __name__ == "__main__":
    main()
