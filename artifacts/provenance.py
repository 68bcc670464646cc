"""Provenance recorded in every manifest: which code, on which machine, by whom, when, how.

Cheap by design (no torch import just to ask its version: importlib.metadata reads the installed
metadata; the git calls run once per process).
"""
from __future__ import annotations

import datetime as dt
import getpass
import os
import platform
import shlex
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from artifacts.redact import redact_value

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the nanorun source tree
PACKAGES = ("nanorun", "torch", "numpy", "prefect", "tokenizers", "pyarrow", "duckdb", "boto3", "wandb", "flash-attn")


@lru_cache(maxsize=1)
def git_state(root: Path = SOURCE_ROOT) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the nanorun source tree."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        # Untracked files are ignored: they do not change what `git checkout <commit>` reproduces,
        # while any modified tracked file does.
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@lru_cache(maxsize=1)
def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid{os.getuid()}"


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def collect(start: float, end: float, extra: dict | None = None) -> dict:
    """Provenance for a build that ran from `start` to `end` (time.time() values)."""
    git = git_state()
    prov = {
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "packages": package_versions(),
        "host": socket.gethostname(),
        "user": _user(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "duration_s": round(end - start, 3),
    }
    torch = sys.modules.get("torch")  # only if the stage already imported it
    if torch is not None:
        try:
            if torch.cuda.is_available():
                prov["cuda"] = {"version": torch.version.cuda, "devices": [
                    torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
        except Exception:
            pass
    attention = sys.modules.get("core.attention")  # the backend this process used (flash-attn 3/2, SDPA)
    if attention is not None:
        prov["attention_backend"] = attention.BACKEND
    if extra:
        prov.update(extra)
    return redact_value(prov)  # a command line may hold a URL with credentials
