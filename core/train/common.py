"""What every trainer needs besides the model: the step log line, MFU, metrics.jsonl, wandb, seeding
and the resume checks. Used by core/train/pretrain.py (and the SFT trainer).

    from core.train.common import (StepClock, format_step_line, parse_step_line, peak_flops, MetricsLog,
                                   setup_wandb, seed_everything, check_resume)
    peak, source = peak_flops(device, dtype)          # GPU table, or a measured matmul peak on CPU
    clock = StepClock(total_steps, done=start_step)
    ...one step of dt seconds...
    clock.tick(dt)
    print0(format_step_line(step, total, loss, lrm, dt, tok_per_s, mfu, clock.training_time, clock.eta(step)))
    metrics.append("train", step=step, loss=loss, ...)     # one JSON line (rank 0)

The step line is the contract with the stages: stages/pretrain.py parses it with parse_step_line to
report progress while torchrun runs, so change both together. The metrics.jsonl file is the
machine-readable record (one object per line with "kind": "train" | "val" | "core" | "sample" |
"start" | "done"); after a resume from step s, rows past s are dropped so the file reads as one run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.common import cleanup_distributed

# ---- the per-step log line -------------------------------------------------------------------------

STEP_LINE_RE = re.compile(
    r"^step (?P<step>\d+)/(?P<total>\d+) \([\d.]+%\) \| loss (?P<loss>\S+) \| lrm (?P<lrm>\S+) \| "
    r"dt (?P<dt_ms>[\d.]+)ms \| tok/s (?P<tok_per_s>[\d,]+) \| mfu (?P<mfu>\S+)% \| "
    r"time (?P<time>\S+) \| eta (?P<eta>\S+)")


def format_duration(seconds: float | None) -> str:
    """Compact: 42s, 3.5m, 2.25h; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def format_step_line(step: int, total: int, loss: float, lrm: float, dt: float, tok_per_s: float, mfu: float,
                     training_time: float, eta: float | None) -> str:
    """One dense line per optimizer step; `step` counts completed steps (1..total)."""
    return (f"step {step:05d}/{total:05d} ({100 * step / total:.1f}%) | loss {loss:.6f} | lrm {lrm:.3f} | "
            f"dt {dt * 1000:.1f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu:.2f}% | "
            f"time {format_duration(training_time)} | eta {format_duration(eta)}")


def parse_step_line(line: str) -> dict | None:
    """{step, total, loss, lrm, dt, tok_per_s, mfu} from a step line (None for any other line)."""
    m = STEP_LINE_RE.match(line.strip())
    if not m:
        return None
    return {"step": int(m["step"]), "total": int(m["total"]), "loss": float(m["loss"]), "lrm": float(m["lrm"]),
            "dt": round(float(m["dt_ms"]) / 1000, 6), "tok_per_s": float(m["tok_per_s"].replace(",", "")),
            "mfu": float(m["mfu"])}


class StepClock:
    """Training time and ETA. The first steps of a process (allocator warm-up, torch.compile, the
    loader's first tokenization) are not representative, so, like the reference, they are left out
    of the training time and of the average step time."""

    def __init__(self, total_steps: int, skip_first: int = 10, training_time: float = 0.0, timed_steps: int = 0):
        self.total = total_steps
        self.skip_first = skip_first
        self.training_time = training_time   # carried across resumes (loop state)
        self.timed_steps = timed_steps
        self._seen = 0                       # steps taken by this process

    def tick(self, dt: float, step: int) -> None:
        """Account for the step that just completed (`step` = completed steps, 1-based)."""
        self._seen += 1
        if step > self.skip_first and self._seen > 1:
            self.training_time += dt
            self.timed_steps += 1

    def eta(self, step: int) -> float | None:
        if self.timed_steps == 0:
            return None
        return (self.total - step) * self.training_time / self.timed_steps


# ---- peak FLOPs for MFU ------------------------------------------------------------------------------

# Dense bf16 tensor-core peak per GPU (vendor datasheets, without sparsity). Most specific names first.
GPU_PEAK_BF16 = (
    ("gb200", 2.5e15), ("b200", 2.25e15), ("b100", 1.75e15),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989.4e12), ("h200", 989.4e12), ("h800", 989.4e12),
    ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12),
    ("a10g", 70e12), ("a10", 125e12), ("rtx 6000 ada", 364e12), ("rtx 4090", 165e12), ("rtx 3090", 71e12),
    ("v100", 125e12), ("t4", 65e12), ("mi300x", 1307e12), ("mi250", 362e12),
)


def gpu_peak_flops(name: str) -> float | None:
    low = name.lower()
    for key, flops in GPU_PEAK_BF16:
        if key in low:
            return flops
    return None


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         n: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on this process's threads: the practical peak on a
    CPU, where no datasheet number applies (AMX, AVX-512 and thread counts vary by machine)."""
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    a @ b  # warm-up: first call pays for kernel selection
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one process's device, where the number comes from)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops is not None:
            return flops, f"{name} (datasheet bf16)"
        measured = measure_matmul_flops(device, dtype, n=4096)
        return measured, f"{name} (unknown GPU: measured {str(dtype).removeprefix('torch.')} matmul)"
    measured = measure_matmul_flops(device, dtype)
    return measured, (f"{device.type} measured {str(dtype).removeprefix('torch.')} matmul, "
                      f"{torch.get_num_threads()} thread(s)")


# ---- metrics.jsonl -------------------------------------------------------------------------------


def read_metrics(path: Path | str) -> list[dict]:
    """Rows of a metrics.jsonl (a torn last line from a killed writer is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """Append-only JSON lines, written by rank 0 only, flushed per row (a kill loses nothing written)."""

    def __init__(self, path: Path | str, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def append(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, **fields, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop rows recorded after `step` (they belong to the attempt that died after the checkpoint
        we resume from and will be recorded again). Returns how many rows were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        rows = read_metrics(self.path)
        keep = [r for r in rows if r.get("step") is None or r["step"] <= step or r.get("kind") == "start"]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)
        return len(rows) - len(keep)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# ---- wandb -----------------------------------------------------------------------------------------

WANDB_MODES = ("disabled", "offline", "online")


class _NoWandb:
    id = None

    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def setup_wandb(mode: str, *, project: str, name: str, config: dict, directory: Path | str, rank: int = 0,
                run_id: str | None = None):
    """A wandb run on rank 0 (offline by default: no network, `wandb sync DIR` uploads later), or a
    no-op. run_id continues a run across resumes. Never raises for a logging problem: training matters
    more than its dashboard."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode {mode!r}: use one of {', '.join(WANDB_MODES)}")
    if rank != 0 or mode == "disabled":
        return _NoWandb()
    try:
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        return wandb.init(project=project, name=name, config=config, dir=str(directory), mode=mode, id=run_id,
                          resume="allow" if run_id else None)
    except Exception as e:  # e.g. online without network or credentials
        print(f"wandb: could not start a {mode} run ({type(e).__name__}: {e}); continuing without wandb",
              flush=True)
        return _NoWandb()


# ---- seeding -----------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Model init uses its own generator (build_model)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---- tokenizer identity and resume checks ------------------------------------------------------------


def tokenizer_record(tokenizer_dir: Path | str, vocab_size: int, fingerprint: str | None = None) -> dict:
    """The meta record {"fingerprint", "vocab_size"} of the tokenizer a model is trained with.

    fingerprint: the tokenizer artifact's fingerprint (what stages pass; consumers compare it with
    core.checkpoint.check_tokenizer). Without one, a content hash of tokenizer.json stands in."""
    if not fingerprint:
        data = (Path(tokenizer_dir) / "tokenizer.json").read_bytes()
        fingerprint = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    return {"fingerprint": fingerprint, "vocab_size": int(vocab_size)}


class ResumeError(ValueError):
    """A checkpoint cannot be continued by this run; the message says why and what to do."""


def check_resume(meta: dict, *, where: Path | str, identity: dict, tokenizer: dict, world_size: int,
                 device_batch_size: int | None = None) -> list[str]:
    """Refuse to continue a checkpoint made by a different recipe, tokenizer or process count.

    Returns notes for changes that are allowed (a new device batch size: each rank's stream of
    packed rows does not depend on it, so every step sees the same tokens; only the split of the
    gradient sum into micro-batches changes, i.e. float rounding, as between two fresh runs)."""
    fresh = f"use another --out directory, or delete {where} to start over"
    saved = meta.get("identity")
    if not isinstance(saved, dict):
        raise ResumeError(f"checkpoint {where} has no identity record: it was not written by this trainer; {fresh}")
    diff = {k: (saved.get(k, "<absent>"), identity.get(k, "<absent>")) for k in sorted(set(saved) | set(identity))
            if saved.get(k, "<absent>") != identity.get(k, "<absent>")}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"refusing to resume from {where}: the identity config differs (saved -> now: {shown}); "
                          f"these settings change the weights, so the checkpoint belongs to another run; {fresh}")
    tok = meta.get("tokenizer") or {}
    if tok.get("vocab_size") != tokenizer["vocab_size"] or tok.get("fingerprint") != tokenizer["fingerprint"]:
        raise ResumeError(f"refusing to resume from {where}: it was trained with tokenizer {tok.get('fingerprint')} "
                          f"(vocab {tok.get('vocab_size')}), this run has {tokenizer['fingerprint']} (vocab "
                          f"{tokenizer['vocab_size']}); pass the tokenizer the checkpoint was trained with, or {fresh}")
    saved_world = meta.get("world_size")
    if saved_world != world_size:
        raise ResumeError(
            f"refusing to resume from {where}: it was saved by {saved_world} process(es), this run has {world_size}. "
            "Each rank's data stream (row groups dealt round-robin) and its ZeRO-2 optimizer shard depend on the "
            f"number of processes, so the run cannot continue exactly; rerun with {saved_world} process(es) in total "
            f"(nproc x nnodes), or {fresh}")
    notes = []
    old_dbs = meta.get("device_batch_size")
    if device_batch_size is not None and old_dbs is not None and old_dbs != device_batch_size:
        notes.append(f"device batch size {old_dbs} -> {device_batch_size}: every step trains on the same tokens "
                     "(the packed row stream does not depend on it) with a different micro-batch split, so "
                     "the result equals an uninterrupted run up to float rounding, not bit for bit")
    return notes


_loop_started = False  # set by the trainer once its loop starts: errors before it are configuration problems


def mark_loop_started() -> None:
    global _loop_started
    _loop_started = True


def run_entry_point(train: Callable, cfg) -> None:
    """train(cfg), as a torchrun worker's main. A ValueError / FileNotFoundError raised before the
    loop started means the run cannot start as configured (resume refused, batch does not divide,
    FP8 on CPU, missing inputs): one clear line and exit 2 instead of a traceback."""
    global _loop_started
    _loop_started = False  # a process may run several trainers (tests): each starts before its loop
    try:
        train(cfg)
    except (ValueError, FileNotFoundError) as e:
        if _loop_started:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(2)
