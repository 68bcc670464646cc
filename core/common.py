"""Device, precision, threads and process-group plumbing shared by every core entry point.

    from core.common import autodetect_device, compute_dtype, init_distributed, print0
    info = init_distributed()            # torchrun env -> NCCL (cuda) / gloo (cpu); else single process
    dtype = compute_dtype(info.device.type)
    ...
    cleanup_distributed()

Precision policy (docs/reference.md#precision): master weights are always fp32; the *compute*
dtype is bf16 on CUDA with SM >= 80 and fp32 on CPU/MPS, overridable with
NANORUN_DTYPE=bfloat16|float32|float16. On a CPU with AMX/avx512_bf16 (this machine) bf16 matmuls
run 4-10x faster than fp32, so the CPU benchmarks and trainers may opt in with the env override.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
           "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def autodetect_device() -> str:
    """'cuda' if a GPU is visible, else 'mps' on Apple silicon, else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of bfloat16, float32, float16") from None


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The activation/matmul dtype for `device` (weights stay fp32). Env NANORUN_DTYPE overrides."""
    override = os.environ.get("NANORUN_DTYPE", "").strip()
    if override:
        return parse_dtype(override)
    device_type = torch.device(device).type
    if device_type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return torch.bfloat16 if major >= 8 else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Distributed


@dataclass(frozen=True)
class DistInfo:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def get_dist_info() -> DistInfo:
    """What this process is, from torchrun's environment (works before and after init)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    return DistInfo(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world,
                    device=torch.device("cpu"))


def init_distributed(device_type: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group when run under torchrun; a no-op for a plain process.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. The default process group is shared by the
    whole program, so calling this twice is harmless.
    """
    device_type = device_type or autodetect_device()
    info = get_dist_info()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no GPU is visible: pass --device-type cpu")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if info.ddp and info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        # how long a collective waits for a silent peer (a lost node) before failing the step;
        # multi-node runs and their tests shorten it without a new flag in every trainer
        timeout_s = float(os.environ.get("NANORUN_DIST_TIMEOUT") or timeout_s)
        kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    ddp = info.ddp and info.world_size > 1
    return DistInfo(ddp=ddp, rank=info.rank, local_rank=info.local_rank,
                    world_size=info.world_size, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (torchrun pipes stdout)."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Threads


def get_num_threads() -> int:
    return torch.get_num_threads()



def set_num_threads(n: int | None = None) -> int:
    """Set intra-op threads: n, else $OMP_NUM_THREADS, else the cores this process may use.

    Under torchrun each process should get cores/nproc threads (torchrun sets OMP_NUM_THREADS=1 by
    default, which silently makes CPU training 2x slower on this 2-core machine). Launchers should
    also give CPU workers core.openmp.wait_env."""
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS")
        if env:
            n = int(env)
        else:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, int(n))
    torch.set_num_threads(n)
    return n
