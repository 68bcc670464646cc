"""What a trainer reports, apart from its loop: the step log line (the contract with the stages:
stagekit/training.py and flows/tasks.py parse it with parse_step_line while torchrun runs, so change
both together), the step clock, the peak FLOP/s that MFU divides by (measured once per hardware and
kept for every attempt of a run), metrics.jsonl (one object per line with "kind": "train" | "val" |
"core" | "sample" | "start" | "done") and wandb. The loop itself is core/train/common.py."""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.train.config import WANDB_MODES

if TYPE_CHECKING:
    from core.train.common import Run
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


def peak_flops(device: torch.device | str, dtype: torch.dtype, cache: Path | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one process's device, where the number comes from). With `cache` (a file in
    the run's output directory) the first attempt's number is kept and every resumed attempt on the
    same hardware reuses it: a re-measured CPU peak varies by tens of percent between launches, which
    would make the MFU curve jump at a resume while the throughput did not."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = f"{name}|{str(dtype).removeprefix('torch.')}|{torch.get_num_threads()} thread(s)"
    try:
        saved = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    except (OSError, json.JSONDecodeError):
        saved = {}
    if saved.get("hardware") == key:
        return float(saved["flops"]), saved["source"]
    flops, source = _peak_flops(device, dtype)
    if cache is not None:  # written whole (os.replace): a run killed here leaves no torn file
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"hardware": key, "flops": flops, "source": source}) + "\n")
        os.replace(tmp, cache)
    return flops, source


def run_peak_flops(run: "Run") -> tuple[float, str]:
    """The peak MFU divides by in this trainer: rank 0 (the one that logs MFU) keeps the first
    attempt's number in the run directory; other ranks need it only for their start-up table."""
    return peak_flops(run.device, run.dtype, cache=run.out / "peak_flops.json" if run.rank == 0 else None)


def _peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
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
