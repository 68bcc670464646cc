"""GPU acceptance kit: proves (or disproves) every CUDA code path of core on one GPU in minutes.

    bash scripts/gpu_check.sh                    # one H100/H200: <= 9 min wall, ends with one JSON line
    bash scripts/gpu_check.sh --cpu-dry-run      # the same sections at tiny sizes on CPU (CI runs this)
    python -m bench.gpu_check --only stage train --depths 12      # some sections (tests | stage | train | infer)
    python -m bench.gpu_plan                     # the shape check and the budget plan alone

Needs only what a GPU node has: Python 3.12, CUDA torch, numpy, pyarrow, tokenizers, safetensors,
triton, pytest (no prefect, duckdb, boto3 or wandb: they are blocked from import in this process and
in its pytest child, so a dependency on them fails here as it would there). It drives core directly.

Printed as they finish, then one JSON line (`ok`, env, plan, tests, stage, sft_rl, train, infer).
The user's path comes first; (a)-(c) are never skipped, (d) and (e) only run while their estimate fits:
0. env, then the plan (bench/gpu_plan.py): the d12/d20 shapes checked on the meta device (parameters,
   FP8 eligibility, memory against 80 GB) and each section's time estimate against the budget.
1. (a) tests: `pytest -m gpu tests/gpu` (flash-attn vs SDPA incl. sliding windows and grads; bf16 vs
   fp32; FP8 tensorwise/rowwise linears, FP8 training, FP8 under torch.compile; a compiled training
   step; the ZeRO-2 optimizer on NCCL with one process; KV-cache generation; export bundle round
   trip; the fused chunked loss), each test's outcome in the JSON.
2. (b)+(c) stage (bench/gpu_stage.py): core.train.pretrain under torchrun as the stage launches it
   (d12, 30 steps, bf16, compiled), SIGTERM after step 14, exact resume, compared with an
   uninterrupted run; then one SFT step and one RL step from its checkpoint.
3. (d) train: d12 and d20 pretraining steps with the reference flags (head_dim 128, seq 2048, vocab
   32768, SSSL windows, Muon+AdamW, compiled, random tokens), bf16 then FP8 tensorwise and rowwise
   where supported: tok/s, MFU vs the GPU's bf16 datasheet peak, peak memory, first-step (compile)
   time, recompiles after it (must be 0), and the reference's per-GPU tok/s beside each as a ratio
   (REFERENCE below: the reference ran flash-attn 3; see scripts/gpu_wheels/README.md for why SDPA
   runs here).
4. (e) infer: a d12 (reference shape, random weights) through core.engine at batch 1, 8, 32: TTFT
   and per-token latency (core/bench_infer.py, the code behind `nanorun bench-infer`).

Sizes: --budget-s (520 s) is when the kit must be done; scripts/gpu_check.sh kills at 560 s (the
JSON line still comes), under a device session's 10-minute command limit. Each training config
compiles once and runs 3 untimed + 6 timed steps of one micro-batch (d12: 32 x 2048 tokens; d20:
16 x 2048); device batch halved on out-of-memory (recorded).
The dry run: the GPU plan, then d2/d3 at head_dim 64, seq 128, vocab 512, eager, fp32, and the stage
path at d2 (bitwise resume on CPU), CUDA-only parts skipped with why.
"""
from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from bench.gpu_plan import budget_plan, plan_lines, shape_check, trace_s
from bench.gpu_stage import BYTE_VOCAB, DRY_STAGE, GPU_STAGE, make_inputs, pretrain_resume, sft_and_rl
from core.attention import BACKEND

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "duckdb", "boto3", "wandb")   # absent on a GPU node: core must not need them
PRECISION = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}  # the compute dtype's label
H100_BF16_PEAK = 989.4e12                               # the reference's hardware (H100 SXM, dense bf16)
SECTIONS = ("tests", "stage", "train", "infer")        # the user's path first: (a) tests, (b)+(c) stage, (d), (e)

# The reference's per-GPU training throughput (karpathy/nanochat, fetched 2026-11; files at its HEAD
# 92d63d4). Only MFUs and tok/s at other depths are published, so a figure for depth d is implied as
# MFU x H100 peak / FLOPs-per-token(d) (ours, core.gpt.estimate_flops), and FP8 as bf16 x a ratio.
REFERENCE = {
    (12, "bf16"): (0.41, 1.0, "nanochat dev/LOG.md, multi-token-prediction entry, 'Results (d12)': baseline "
                             "MFU 41% (8xH100)"),
    (20, "bf16"): (0.4997, 1.0, "nanochat dev/LEADERBOARD.md Run 1 (d24, bf16, 8xH100): 16,704 steps x 524,288 "
                                "tokens in 10,949 s = 99,980 tok/s/GPU, 4.33e19 FLOPs = 50.0% MFU; no d20 figure "
                                "is published, so d24's MFU is applied to d20"),
    (12, "fp8"): (0.41, 1.0, "nanochat dev/LOG.md FP8 entry: 'd12 was still slower with FP8' (no number): the "
                             "bf16 d12 figure is the bar"),
    (20, "fp8"): (0.4997, 1.17, "d20 bf16 figure x 1.17, nanochat dev/LOG.md FP8 entry: d26 tensorwise 740K vs "
                                "bf16 630K tok/s on 8xH100"),
}


def reference_tok_s(depth: int, precision: str, flops_per_token: float) -> tuple[float | None, str]:
    ref = REFERENCE.get((depth, precision))
    if ref is None:
        return None, f"no reference figure for d{depth} {precision}"
    mfu, factor, source = ref
    return mfu * H100_BF16_PEAK / flops_per_token * factor, source


@dataclass(frozen=True)
class Sizes:
    depths: tuple[int, ...]
    head_dim: int
    seq: int
    vocab: int
    device_batch: dict            # depth -> rows per micro-batch (halved on out-of-memory)
    warmup_steps: int             # untimed, the first one compiles
    timed_steps: int              # the median is reported
    compile: bool
    infer_depth: int
    infer_prompt: int
    infer_decode: int
    infer_batches: tuple[int, ...]
    budget_s: float               # seconds since start by which everything should be done
    config_reserve_s: float       # what one training config may take, compile included
    pytest_timeout_s: float


GPU = Sizes(depths=(12, 20), head_dim=128, seq=2048, vocab=32768, device_batch={12: 32, 20: 16}, warmup_steps=3,
            timed_steps=6, compile=True, infer_depth=12, infer_prompt=512, infer_decode=64, infer_batches=(1, 8, 32),
            budget_s=520, config_reserve_s=80, pytest_timeout_s=200)
DRY = Sizes(depths=(2, 3), head_dim=64, seq=128, vocab=512, device_batch={2: 4, 3: 4}, warmup_steps=1,
            timed_steps=2, compile=False, infer_depth=2, infer_prompt=32, infer_decode=8, infer_batches=(1, 8, 32),
            budget_s=600, config_reserve_s=10, pytest_timeout_s=60)


class _BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in FORBIDDEN:
            raise ImportError(f"{name} is not installed on a GPU node: the GPU kit and core must not need it")
        return None


def block_forbidden_imports() -> None:
    loaded = [m for m in FORBIDDEN if m in sys.modules]
    if loaded:
        raise RuntimeError(f"already imported before the kit started: {loaded}")
    sys.meta_path.insert(0, _BlockImports())


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:500]


# ---- 1. environment ----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import core.attention as attention
    from core.bench_infer import gpu_peak_bandwidth
    from core.fp8 import fp8_available
    from core.train.telemetry import gpu_peak_flops

    packages = {}
    for dist_name in ("numpy", "pyarrow", "tokenizers", "safetensors", "triton", "pytest", "flash-attn",
                      "flash_attn_3"):
        try:
            packages[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            packages[dist_name] = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "attention_backend": attention.BACKEND, "attention": attention.describe_backend(),
           "fp8": fp8_available(device), "packages": packages}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        env.update(gpu=name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1),
                   peak_bf16_flops=gpu_peak_flops(name), peak_bandwidth=gpu_peak_bandwidth(name))
    else:
        env.update(gpu=None, threads=torch.get_num_threads())
    return env


# ---- 2. pytest -m gpu ---------------------------------------------------------------------------------


def pytest_child(args: list[str]) -> int:
    """Run pytest in this process with the GPU node's missing packages blocked (the kit's child)."""
    import pytest

    block_forbidden_imports()
    return int(pytest.main(args))


def run_gpu_tests(timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--pytest-child", "--", "-m", "gpu", "tests/gpu", "-q",
               "-rA", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestConfigWarning", f"--junitxml={junit}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-3000:]
            print(tail.decode() if isinstance(tail, bytes) else tail, flush=True)
            return {"error": f"pytest -m gpu did not finish in {timeout_s:.0f} s", "wall_s": round(timeout_s, 1)}
        print(proc.stdout[-6000:], end="", flush=True)
        if proc.returncode not in (0, 1, 5):  # 5: nothing collected
            print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        result = {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
        if not junit.is_file():
            return {**result, "error": f"pytest wrote no report (exit {proc.returncode}): {proc.stderr[-300:]}"}
        return {**result, **parse_junit(junit)}


def parse_junit(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        outcome = "passed"
        for tag, label in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome = label
                reason = " ".join((node.get("message") or "").split())[:200]
                cases[name] = f"{label}: {reason}" if reason else label
                break
        else:
            cases[name] = "passed"
        counts[outcome] += 1
    return {**counts, "cases": cases}


# ---- 3. training throughput ---------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _train_once(depth: int, precision: str, recipe: str | None, rows: int, sizes: Sizes, device: torch.device,
                peak: float) -> dict:
    from core.common import compute_dtype
    from core.fp8 import convert_to_fp8
    from core.gpt import build_model
    from core.optim import apply_schedule, build_optimizer
    from core.scaling import derive
    from core.train.config import PretrainConfig

    dtype = compute_dtype(device)  # bf16 on SM >= 80, fp32 on CPU (and older GPUs), as the trainers
    plan = derive(PretrainConfig(depth=depth, head_dim=sizes.head_dim, max_seq_len=sizes.seq, num_iterations=1000,
                                 total_batch_size=rows * sizes.seq), sizes.vocab)
    model = build_model(plan.model_config(), device, dtype, seed=0)
    n_fp8 = convert_to_fp8(model, recipe) if recipe else 0
    optimizer = build_optimizer(model, plan)
    graphs = CompileCounterWithBackend("inductor")    # counts dynamo's graphs: a recompile adds some
    step_model = torch.compile(model, dynamic=False, backend=graphs) if sizes.compile else model   # as the trainers
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> float:
        data = torch.randint(0, sizes.vocab, (rows, sizes.seq + 1), device=device, generator=gen)
        loss = step_model(data[:, :-1], data[:, 1:])
        loss.backward()
        apply_schedule(optimizer, plan, i)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    first_loss = step(0)
    first_s = time.perf_counter() - t0
    graphs_first = graphs.frame_count
    for i in range(1, sizes.warmup_steps):
        step(i)
    times, loss = [], first_loss
    for i in range(sizes.warmup_steps, sizes.warmup_steps + sizes.timed_steps):
        sync()
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        times.append(time.perf_counter() - t0)
    if not (math.isfinite(first_loss) and math.isfinite(loss)):
        raise FloatingPointError(f"d{depth} {precision}: loss {first_loss} -> {loss} is not finite")
    dt = sorted(times)[len(times) // 2]
    tok_s = rows * sizes.seq / dt
    ref, source = reference_tok_s(depth, precision, plan.flops_per_token)
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"depth": depth, "precision": precision, "fp8_recipe": recipe, "device_batch": rows, "seq": sizes.seq,
            "fp8_layers": n_fp8, "compile": sizes.compile,
            "recompiles": graphs.frame_count - graphs_first if sizes.compile else None, "first_step_s": round(first_s, 2), "step_ms": round(dt * 1e3, 2),
            "tok_s": round(tok_s, 1), "mfu_percent": round(100 * plan.flops_per_token * tok_s / peak, 2),
            "peak_mem_gib": None if mem is None else round(mem / 2 ** 30, 2), "loss_first": round(first_loss, 4),
            "loss_last": round(loss, 4), "reference_tok_s": None if ref is None else round(ref),
            "ratio_to_reference": None if ref is None else round(tok_s / ref, 3), "reference_source": source,
            "attention": BACKEND, "reference_attention": "fa3"}   # an SDPA run against FA3: a lower bound


def train_throughput(depth: int, precision: str, recipe: str | None, sizes: Sizes, device: torch.device,
                     peak: float) -> dict:
    rows = sizes.device_batch[depth]
    notes = []
    while True:
        try:
            row = _train_once(depth, precision, recipe, rows, sizes, device, peak)
            row["notes"] = notes
            return row
        except torch.OutOfMemoryError:
            _free(device)
            if rows == 1:
                raise
            notes.append(f"out of memory at device batch {rows}: halved")
            rows //= 2
        finally:
            _free(device)


# ---- 4. inference -------------------------------------------------------------------------------------


def inference(sizes: Sizes, device: torch.device, peak_flops: float, peak_bw: float | None) -> dict:
    from bench.generate import SpecialsOnlyTokenizer
    from core.bench_infer import InferSweep, run_sweep
    from core.engine import Engine
    from core.gpt import build_model
    from core.scaling import derive
    from core.train.config import PretrainConfig

    plan = derive(PretrainConfig(depth=sizes.infer_depth, head_dim=sizes.head_dim, max_seq_len=sizes.seq), sizes.vocab)
    model = build_model(plan.model_config(), device, seed=0).eval()
    tokenizer = SpecialsOnlyTokenizer(sizes.vocab)
    tokenizer.bos_token_id = 0  # the prompt's first token must be a row of the embedding (its specials are not)
    engine = Engine(model, tokenizer)
    sweep = InferSweep(prompt_lens=(sizes.infer_prompt,), batch_sizes=sizes.infer_batches,
                       decode_tokens=sizes.infer_decode)
    with torch.inference_mode():
        r = run_sweep(engine, sweep, peak_flops=peak_flops, peak_bandwidth=peak_bw, progress=say)
    del model, engine
    _free(device)
    return {"depth": sizes.infer_depth, "dtype": r["dtype"], "prefill": r["prefill"], "rows": r["rows"]}


# ---- the kit ------------------------------------------------------------------------------------------


class Kit:
    """The sections in order, the report they fill, the errors that make `ok` false, the deadline."""

    def __init__(self, sizes: Sizes, dry: bool, budget: float, depths: tuple[int, ...]):
        self.sizes, self.dry, self.budget, self.depths = sizes, dry, budget, depths
        self.start = time.perf_counter()
        self.device = torch.device("cpu" if dry else "cuda")
        self.report = {"kit": "nanorun-gpu-check", "mode": "cpu-dry-run" if dry else "gpu", "ok": False,
                       "skipped": []}
        self.errors: list[str] = []
        self.peak = self.peak_bw = self.dtype = None
        self.stage_sizes = DRY_STAGE if dry else GPU_STAGE
        self.estimates: dict[str, float] = {}     # the GPU plan's seconds per section (bench/gpu_plan.py)

    def need_s(self, key: str) -> float:
        """What a skippable section must have left to start: its GPU estimate, or the dry run's reserve."""
        return self.sizes.config_reserve_s if self.dry else self.estimates.get(key, self.sizes.config_reserve_s)

    def fits(self, key: str, what: str) -> bool:
        need = self.need_s(key)
        if self.left() >= need:
            return True
        self.skip(what, f"budget: needs ~{need:.0f} s, {self.left():.0f} s left of {self.budget:.0f} s")
        return False

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def skip(self, what: str, why: str) -> None:
        self.report["skipped"].append(f"{what}: {why}")
        say(f"skipped {what}: {why}")

    def env(self) -> None:
        from core.bench_infer import gpu_peak_bandwidth
        from core.common import compute_dtype
        from core.train.telemetry import peak_flops

        env = self.report["env"] = environment(self.device)
        say(f"torch {torch.__version__} | {env.get('gpu') or 'cpu'} | attention: {env['attention']} | "
            f"fp8: {env['fp8']}")
        self.dtype = compute_dtype(self.device)
        self.peak, source = peak_flops(self.device, self.dtype)
        if self.device.type == "cuda":
            self.peak_bw = gpu_peak_bandwidth(torch.cuda.get_device_name(self.device))
        env.update(mfu_peak_flops=self.peak, mfu_peak_source=source)

    def plan(self) -> None:
        """The GPU run's shapes and budget (the dry run prints the GPU plan too: that is what it is for)."""
        from core.scaling import derive
        from core.train.config import PretrainConfig

        shapes = {d: shape_check(d, GPU.head_dim, GPU.seq, GPU.vocab, GPU.device_batch[d]) for d in GPU.depths}
        trace = {12: trace_s(12, GPU.head_dim, GPU.seq, GPU.vocab, GPU.device_batch[12])} if self.dry else {}
        z = GPU_STAGE
        stage_flops = derive(PretrainConfig(depth=z.depth, head_dim=z.head_dim, max_seq_len=z.seq),
                             BYTE_VOCAB).flops_per_token
        fp8 = self.dry or self.report["env"]["fp8"]
        plan = budget_plan(GPU, z, shapes, stage_flops, fp8, self.peak if not self.dry else H100_BF16_PEAK, trace)
        self.estimates = {s.key: s.estimate_s for s in plan}
        budget = GPU.budget_s if self.dry else self.budget
        for line in plan_lines(plan, budget, shapes, trace):
            say(line)
        self.report["plan"] = {"sections": [vars(s) for s in plan], "shapes": shapes, "trace_s": trace}
        bad = [f"d{d}: {'FP8 cannot convert every block matrix' if not s['fp8_ok'] else 'over 80 GB'}"
               for d, s in shapes.items() if not (s["fp8_ok"] and s["fits_80gb"])]
        if bad:
            self.errors.append(f"plan: {'; '.join(bad)}")

    def stage(self) -> None:
        """(b) and (c): never skipped (the user's path); each failure is reported and the kit goes on."""
        z, cuda = self.stage_sizes, not self.dry
        timeout = max(self.left(), 120)
        with tempfile.TemporaryDirectory(prefix="gpu-check-stage-") as tmp:
            root = Path(tmp)
            inputs = make_inputs(root, z)
            for key, title, run in (("stage", f"pretrain d{z.depth} under torchrun, SIGTERM + resume", pretrain_resume),
                                    ("sft_rl", "one SFT step + one RL step", sft_and_rl)):
                say(f"{title} ...")
                t0 = time.perf_counter()
                try:
                    self.report[key] = {**run(root, inputs, z, cuda, timeout), "wall_s": round(time.perf_counter() - t0, 1)}
                    say(f"  {key}: " + ", ".join(f"{k}={_short(v)}" for k, v in self.report[key].items()))
                except Exception as e:
                    traceback.print_exc()
                    self.report[key] = {"error": one_line(e)}
                    self.errors.append(f"{key}: {self.report[key]['error']}")
                    if key == "stage":     # SFT starts from the pretrained checkpoint
                        self.report["sft_rl"] = {"error": "not run: the pretrain stage failed"}
                        self.errors.append("sft_rl: not run: the pretrain stage failed")
                        break

    def tests(self) -> None:
        say("pytest -m gpu tests/gpu" + (" (on CPU every test skips: they need CUDA)" if self.dry else ""))
        t = self.report["tests"] = run_gpu_tests(min(self.sizes.pytest_timeout_s, max(self.left(), 30)))
        if t.get("error") or t.get("failed") or t.get("errors") or (not self.dry and not t.get("passed")):
            self.errors.append(f"tests: {t.get('error') or t.get('cases')}")
        say(f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
            f"{t.get('skipped', 0)} skipped in {t.get('wall_s')} s")

    def infer(self) -> None:
        z = self.sizes
        if not self.fits("infer", "infer"):
            return
        say(f"infer d{z.infer_depth}: prompt {z.infer_prompt}, {z.infer_decode} tokens, batches {list(z.infer_batches)}")
        try:
            self.report["infer"] = inference(z, self.device, self.peak, self.peak_bw)
        except Exception as e:
            traceback.print_exc()
            self.report["infer"] = {"error": one_line(e)}
            self.errors.append(f"infer: {self.report['infer']['error']}")

    def train(self) -> None:
        z, rows = self.sizes, self.report.setdefault("train", [])
        label = PRECISION.get(self.dtype, str(self.dtype))
        precisions = [(label, None)]
        if self.report["env"]["fp8"]:
            precisions += [("fp8", "tensorwise"), ("fp8", "rowwise")]
        else:
            self.skip("fp8 training throughput", "needs a CUDA GPU with compute capability >= 8.9 (H100/Ada)"
                      if self.device.type == "cuda" else "needs CUDA (FP8 tensor cores)")
        if not z.compile:
            self.skip("torch.compile in the throughput runs", "the dry run is eager (inductor's C++ build takes "
                      "minutes on a small CPU); the GPU run compiles")
        for precision, recipe in precisions:  # every depth in bf16 first: the figures that matter most
            for depth in self.depths:
                name = f"{precision}-{recipe}" if recipe else precision
                what = f"train d{depth} {name}"
                if depth not in z.device_batch:
                    self.skip(what, f"no device batch chosen for d{depth} (sizes: {z.device_batch})")
                    continue
                if not self.fits(f"train:{depth}:{'bf16' if recipe is None else name}", what):
                    continue
                say(f"{what}: {z.device_batch[depth]} x {z.seq} tokens a step, {z.warmup_steps} + "
                    f"{z.timed_steps} steps")
                try:
                    row = train_throughput(depth, precision, recipe, z, self.device, self.peak)
                except Exception as e:  # report and go on: the other configs still say something
                    traceback.print_exc()
                    row = {"depth": depth, "precision": precision, "fp8_recipe": recipe, "error": one_line(e)}
                    self.errors.append(f"{what}: {row['error']}")
                rows.append(row)
                if row.get("recompiles"):   # each one is another full compile in every real run (docs/compile.md)
                    self.errors.append(f"{what}: {row['recompiles']} recompile(s) after the first step")
                if "error" not in row:
                    say("  " + train_line(row))

    def finish(self) -> dict:
        leaked = [m for m in FORBIDDEN if m in sys.modules]
        if leaked:
            self.errors.append(f"imported {leaked}, which a GPU node does not have")
        self.report.update(ok=not self.errors, errors=self.errors,
                           wall_s=round(time.perf_counter() - self.start, 1))
        return self.report


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def train_line(r: dict) -> str:
    mem = f" | mem {r['peak_mem_gib']} GiB" if r["peak_mem_gib"] is not None else ""
    ref = (f"reference (FA3) {r['reference_tok_s']:,} tok/s/GPU -> x{r['ratio_to_reference']:.2f} on {r['attention']}"
           if r["reference_tok_s"] else "no reference figure")
    return (f"d{r['depth']} {r['precision']}: {r['tok_s']:,.0f} tok/s | MFU {r['mfu_percent']:.1f}%{mem} | first step "
            f"{r['first_step_s']:.1f} s | {ref}")


def summary(report: dict) -> str:
    lines = ["summary:"]
    t = report.get("tests")
    if t:
        lines.append(f"  tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
                     f"{t.get('skipped', 0)} skipped")
    for row in (report.get("infer") or {}).get("rows", []):
        lines.append(f"  infer d{report['infer']['depth']} batch {row['batch_size']:>2}: TTFT "
                     f"{row['ttft_s'] * 1e3:.1f} ms | per token {row['tpot_s'] * 1e3:.2f} ms | {row['tok_per_s']:,.0f} tok/s")
    lines += ["  " + (train_line(r) if "error" not in r else f"d{r['depth']} {r['precision']}: {r['error']}")
              for r in report.get("train", [])]
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU, skipping what needs CUDA")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections (the plan always prints)")
    ap.add_argument("--depths", type=int, nargs="+", help="training depths (default: 12 20; dry run: 2 3)")
    ap.add_argument("--budget-s", type=float, help="be done by this many seconds (default 440; dry run 120)")
    ap.add_argument("--pytest-child", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.pytest_child:
        return pytest_child([a for a in rest if a != "--"])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    block_forbidden_imports()
    signal.signal(signal.SIGTERM, _interrupt)  # the shell wrapper's timeout: still print what finished
    sizes = DRY if args.cpu_dry_run else GPU
    kit = Kit(sizes, args.cpu_dry_run, args.budget_s or sizes.budget_s, tuple(args.depths or sizes.depths))
    sections = args.only or SECTIONS
    try:
        if not kit.dry and not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible: run on a GPU node, or pass --cpu-dry-run")
        if kit.dry:
            torch.set_num_threads(1)  # tiny models: a second thread only adds OpenMP waits (tests/conftest.py)
        kit.env()
        try:
            kit.plan()
        except Exception as e:  # the plan informs; the sections must still run (fixed reserves then)
            traceback.print_exc()
            kit.errors.append(f"plan: {one_line(e)}")
        for name in SECTIONS:
            if name in sections:
                getattr(kit, name)()
        if kit.dry:
            kit.skip("CUDA-only paths", "flash-attn, FP8 GEMMs, NCCL, bf16 tensor cores and torch.compile on CUDA "
                     "need a GPU: run `bash scripts/gpu_check.sh` on one")
    except KeyboardInterrupt:
        kit.errors.append("interrupted (timeout or Ctrl-C): the sections above are what finished")
    except Exception as e:
        traceback.print_exc()
        kit.errors.append(one_line(e))
    report = kit.finish()
    print(summary(report), flush=True)
    print(json.dumps(report, default=str), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
