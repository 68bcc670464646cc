"""Pretraining speed on the path users run: the real trainer, launched as the pretrain stage launches
it, against a plain reference-style step measured in the same run.

    python -m bench.pretrain_path                                  # the table below (~10 min on 2 cores)
    python -m bench.pretrain_path --variants auto reference --steps 40 --budget 240   # + time-to-bpb
    python -m bench.pretrain_path --work /tmp/bench-pp             # keeps the 8192-token tokenizer between runs

Setup: the stage's cpu-demo preset with aspect_ratio 64 (d4, dim 256, head_dim 64, seq 256,
device batch 16, total batch 4,096 tokens), a vocab-8192 tokenizer trained on ../shared/data/corpus
(cached under --work), the corpus as a data_shards layout (last shard = val), 2 threads, --steps
optimizer steps and one val-bpb evaluation at the end (and at step 0, as the stage does).

Variants:
- auto (the stage's default dtype: bf16 where the CPU has native bf16, else fp32), fp32, bf16,
  and -compile: stages.pretrain.Config -> cfg.trainer_config() -> run.json -> launch_trainer()
  (torchrun -> core.train.pretrain), exactly the stage's launch; numbers from its metrics.jsonl.
- auto-flow: the same through `nanorun stage pretrain` (CLI, Prefect flow and temporary server,
  store), on data and tokenizer artifacts built once under --work.
- reference: what the reference's base_train does, in one process on the same data, tokenizer, model
  and schedule: torch.compile of the whole model, full logits + F.cross_entropy, and its optimizer's
  fused steps each under torch.compile(dynamic=False, fullgraph=True) with 0-D tensor hyperparameters
  (AdamW per tensor, Muon per stacked shape group: core.optim.compiled), the same OpenMP wait policy
  as the stage's trainer (core/openmp.py), the same val batches for bpb at the end.
tok/s is over steps 2..N (the first step, compile included, is its own column); MFU against the
trainer's own measured matmul peak. "overhead %": CPU time of every process other than the trainer
(torchrun, this launcher streaming the log; for auto-flow the CLI with the flow and Prefect's
server) while the trainer runs, over the trainer's. The "fp32 ceiling" line is the roofline: the
step's FLOPs at the measured fp32 matmul peak. --budget S: auto and the reference then train for
the steps their measured speeds fit in S seconds (first step and compile included) and the val bpb
each reaches is printed. The machine is shared: compare rows of one run, and read the load average
printed with each row.
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

from core.openmp import wait_env

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


def stage_config(a, dtype: str, compile_: bool | None, steps: int | None = None):
    from stages.pretrain import preset

    steps = steps or a.steps
    return preset("cpu-demo", aspect_ratio=64, num_iterations=steps, eval_every=steps, eval_tokens=a.eval_tokens,
                  sample_every=-1, save_every=-1, dtype=dtype, compile=compile_, wandb="disabled",
                  omp_threads=a.threads, warmup_steps=min(10, steps // 4))


class CpuSampler(threading.Thread):
    """CPU seconds while the trainer runs: the trainer's (with its own children: compile workers)
    and every other process's under `root` (torchrun, the launcher streaming the log, the sampling
    itself; for the flow variant also the nanorun CLI running the Prefect flow and Prefect's
    temporary server). The window opens when the trainer appears; the other processes count from
    there, the trainer from its start."""

    def __init__(self, root_pid: int | None = None):
        super().__init__(daemon=True)
        import psutil
        self.root = psutil.Process(root_pid)  # None: this process
        self.stop = threading.Event()
        self.base: dict[int, float] | None = None    # CPU of each process when the window opened
        self.last: dict[int, tuple[str, float]] = {}

    def sample(self) -> dict[int, tuple[str, float]]:
        import psutil
        out, trainers = {}, set()
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                cmd, parents, t = p.cmdline(), {q.pid for q in p.parents()}, p.cpu_times()
            except psutil.Error:
                continue
            if "core.train.pretrain" in cmd and "torch.distributed.run" not in cmd:
                trainers.add(p.pid)
            role = "trainer" if p.pid in trainers or parents & trainers else \
                "torchrun" if "torch.distributed.run" in cmd else \
                "launcher" if p.pid == self.root.pid else \
                "prefect server" if any("prefect" in c or "uvicorn" in c for c in cmd) else "other"
            out[p.pid] = (role, t.user + t.system)  # not children_*: torchrun reaps the trainer
        return out

    def run(self):
        while not self.stop.is_set():
            now = self.sample()
            if any(role == "trainer" for role, _ in now.values()):
                if self.base is None:
                    self.base = {pid: cpu for pid, (role, cpu) in now.items() if role != "trainer"}
                self.last.update(now)
            elif self.base is not None:
                return  # the trainer is gone: the window is closed
            self.stop.wait(0.5)

    def result(self) -> dict[str, float]:
        out = dict.fromkeys(("trainer", "torchrun", "launcher", "prefect server", "other"), 0.0)
        for pid, (role, cpu) in self.last.items():
            out[role] += cpu - (self.base or {}).get(pid, 0.0)
        return out


def summarise(name: str, out: Path, cpu: dict[str, float] | None, wall: float) -> dict:
    """One table row from a trainer's metrics.jsonl (and the CPU the sampler saw)."""
    from core.train.telemetry import read_metrics
    rows = read_metrics(out / "metrics.jsonl")
    start = next(r for r in rows if r["kind"] == "start")
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    others = cpu and sum(v for k, v in cpu.items() if k != "trainer")
    return {"variant": name, "dtype": start["derived"]["dtype"], "compile": start["derived"]["compile"],
            "tok_s": [r["tok_per_s"] for r in train[1:]], "mfu": statistics.median(r["mfu"] for r in train[1:]),
            "first_step_s": train[0]["dt"], "train_s": sum(r["dt"] for r in train), "steps": len(train),
            "val_bpb": val[-1]["val_bpb"], "eval0_s": val[0]["time"] - start["time"], "wall_s": wall,
            "peak_flops": start["derived"]["peak_flops"], "flops_per_token": start["derived"]["flops_per_token"],
            "overhead_pct": 100 * others / cpu["trainer"] if cpu and cpu["trainer"] else None,
            "cpu_s": cpu and {k: round(v, 1) for k, v in cpu.items()}}


def run_pipeline(a, name: str, data: Path, tok: Path, steps: int | None = None) -> dict:
    from stagekit.training import launch_trainer

    dtype, compile_ = VARIANTS[name]
    cfg = stage_config(a, dtype, compile_, steps)
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
    return summarise(name, out, sampler.result(), wall)


def run_flow(a, data: Path, tok: Path) -> dict:
    """`auto` through `nanorun stage pretrain`, as a user runs it: the CLI, the Prefect flow with its
    temporary server, the store and the log streaming, all counted in "overhead %". The data and
    tokenizer artifacts are built once in a store under --work (a vocab-8192 tokenizer of the stage,
    trained on 50M characters: not the same tokens as the other rows, so compare its tok/s and
    overhead, not its bpb)."""
    import dataclasses

    from stages.pretrain import preset

    store, home = a.work / "flow-store", a.work / "flow-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(NANORUN_HOME=str(home), NANORUN_PROGRESS_BAR="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(REPO), WANDB_MODE="disabled")

    def cli(*args) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--store", str(store), "-q", *args], cwd=a.work,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc

    def finish(proc: subprocess.Popen, what: str) -> str:
        out, _ = proc.communicate(timeout=a.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} exited {proc.returncode}: {out.strip().splitlines()[-1:] or ['?']}")
        return out

    finish(cli("stage", "data_shards", "--set", f"source={SHARED / 'corpus'}"), "data_shards")
    finish(cli("stage", "tokenizer", "--input", "data=data_shards@latest", "--set", f"vocab_size={a.vocab}",
               "--set", "max_chars=50000000"), "tokenizer")
    base, ours = preset("cpu-demo"), stage_config(a, "auto", None)
    sets = [f"{f.name}={json.dumps(getattr(ours, f.name))}" for f in dataclasses.fields(ours)
            if getattr(ours, f.name) != getattr(base, f.name)]
    proc = cli("stage", "pretrain", "--preset", "cpu-demo", "--input", "data=data_shards@latest", "--input",
               "tokenizer=tokenizer@latest", *[x for kv in sets for x in ("--set", kv)], "--force")
    sampler = CpuSampler(proc.pid)
    sampler.start()
    t0 = time.time()
    try:
        finish(proc, "nanorun stage pretrain")
    except RuntimeError as e:
        sampler.stop.set()
        return {"variant": "auto-flow", "error": str(e)[:160]}
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    newest = max((store / "pretrain").glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    return summarise("auto-flow", newest.parent, sampler.result(), wall)


def run_reference(a, data: Path, tok: Path) -> dict:
    """The reference-style loop, in this process (called with --one-reference in a subprocess)."""
    import torch

    from core.common import set_num_threads
    from core.dataloader import PackingLoader
    from core.eval.bpb import evaluate_bpb
    from core.gpt import build_model
    from core.optim import apply_schedule, build_optimizer
    from core.scaling import derive, recipe_of
    from core.tokenizer import Tokenizer
    from core.train.common import seed_everything
    from core.train.telemetry import peak_flops

    set_num_threads(a.threads)
    cfg = stage_config(a, "float32", True)  # --steps: the budget mode passes the reference's own count
    tokenizer = Tokenizer.from_directory(tok)
    plan = derive(recipe_of(cfg), tokenizer.vocab_size)
    seed_everything(cfg.seed)
    model = build_model(plan.model_config(), "cpu", torch.float32, seed=cfg.seed)
    model.fused_loss = False                                   # full logits + F.cross_entropy
    optimizer = build_optimizer(model, plan, distributed=False, fused_adamw=False, compile_steps=True)
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
            "first_step_s": times[0], "train_s": sum(times), "steps": len(times), "val_bpb": bpb, "eval0_s": None,
            "overhead_pct": None, "peak_flops": peak, "flops_per_token": plan.flops_per_token}


def measure(a, name: str, data: Path, tok: Path, steps: int | None = None) -> dict:
    if name == "auto-flow":
        row = run_flow(a, data, tok)
    elif name == "reference":
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
        env.update(wait_env(env))  # what launch_trainer gives the stage's trainer
        proc = subprocess.run([sys.executable, "-m", "bench.pretrain_path", "--one-reference", "--steps",
                               str(steps or a.steps), "--eval-tokens", str(a.eval_tokens), "--threads", str(a.threads),
                               "--vocab", str(a.vocab), "--work", str(a.work)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=a.timeout)
        row = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
               {"variant": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]})
    else:
        row = run_pipeline(a, name, data, tok, steps)
    row["load"] = os.getloadavg()[0]
    print(f"  {name}: " + (row["error"] if "error" in row else
                           f"median {statistics.median(row['tok_s']):,.0f} tok/s, val bpb {row['val_bpb']:.4f}")
          + f" (load {row['load']:.1f})", flush=True)
    return row


def steps_in_budget(row: dict, budget: float) -> int:
    """Optimizer steps that fit in `budget` seconds of training at this row's measured pace: its first
    step (compile included) at its own time, the others at their mean (slow steps count)."""
    rest = (row["train_s"] - row["first_step_s"]) / max(1, row["steps"] - 1)
    return max(2, 1 + int((budget - row["first_step_s"]) // rest))


def time_to_bpb(a, rows: list[dict], data: Path, tok: Path) -> None:
    """The fixed wall-clock comparison: the pipeline's default (auto) and the reference each get the
    steps their measured pace fits in --budget seconds (the LR schedule set for that horizon, as a
    user with a time budget would), then the val bpb each reaches. The machine's speed drifts: a run
    that overshoots the budget by more than 3% is run again with its step count scaled down."""
    tokens = stage_config(a, "auto", None).total_batch_size
    print(f"\ntime-to-bpb: {a.budget:.0f} s of training each (steps from the pace measured above)", flush=True)
    out = []
    for name in ("auto", "reference"):
        row = next((r for r in rows if r["variant"] == name and "error" not in r), None)
        if row is None:
            print(f"  {name}: not measured above, skipped")
            continue
        steps = steps_in_budget(row, a.budget)
        for _ in range(3):
            r = measure(a, name, data, tok, steps)
            if "error" in r or r["train_s"] <= 1.03 * a.budget:
                break
            steps = min(steps - 1, steps_in_budget(r, a.budget))
            print(f"  {name}: {r['train_s']:.0f} s is over the budget: again with {steps} steps", flush=True)
        out.append((name, steps, r))
    print(f"{'variant':>12} {'steps':>6} {'tokens':>10} {'train s':>8} {'val bpb':>8}")
    for name, steps, r in out:
        if "error" in r:
            print(f"{name:>12}  failed: {r['error']}")
        else:
            print(f"{name:>12} {steps:>6} {steps * tokens:>10,} {r['train_s']:>8.1f} {r['val_bpb']:>8.4f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["auto", "fp32", "fp32-compile", "bf16-compile", "reference",
                                                      "auto-flow"], choices=[*VARIANTS, "auto-flow"])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per variant")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="then train auto and the reference for this many seconds each and compare val bpb")
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
    rows = [measure(a, name, data, tok) for name in a.variants]
    print_table(rows)
    if a.budget > 0:
        time_to_bpb(a, rows, data, tok)


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
    fp32 = next((r for r in rows if r.get("dtype") == "float32" and r.get("peak_flops")), None)
    if ref and fp32:  # the roofline: no fp32 step with these FLOPs can beat the measured fp32 matmul peak
        ceiling = fp32["peak_flops"] / fp32["flops_per_token"]
        print(f"fp32 ceiling: {ceiling:,.0f} tok/s = {ceiling / statistics.median(ref['tok_s']):.2f}x the reference "
              f"(measured fp32 matmul peak {fp32['peak_flops'] / 1e9:.0f} GFLOP/s / "
              f"{fp32['flops_per_token'] / 1e6:.1f} MFLOP per token, i.e. every FLOP at peak)")


if __name__ == "__main__":
    main()
