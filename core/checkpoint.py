"""Training checkpoints that are valid only when complete.

Layout under a checkpoint root (one per training run, inside the stage's work dir):

    step_000500/            a complete checkpoint (the directory name appears only via rename)
        model.pt            model state_dict (rank 0; fp32 master weights)
        optim_rank{r}.pt    optimizer state of rank r (ZeRO-2 shards differ per rank)
        rank{r}.pt          per-rank resume state: dataloader state, torch/python/numpy RNG
        meta.json           model config, run config, step, loop state (rank 0)
    step_000750.tmp-…       an interrupted save: ignored, removed by the next save

Why this shape: every rank writes its own files into a shared temporary directory, a barrier
proves they all finished, and rank 0 renames the directory into place — the rename is the commit,
so a kill at any moment leaves either the previous checkpoint or the new one, never half of one
(torchtitan uses the same rule). Keeping the last K bounds disk use.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

_STEP_RE = re.compile(r"^step_(\d{6,})$")
META = "meta.json"
MODEL = "model.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict:
    """Every RNG's state as tensors and plain types, so that it loads with weights_only=True (a
    checkpoint file can then never run code when it is loaded)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded (corrupt, truncated, or not plain tensors and values)."""


def load_file(path: Path, device: str | torch.device = "cpu"):
    """torch.load with weights_only=True: tensors and plain values only, never code. A file that is
    truncated, corrupt or holds anything else (a crafted pickle) is refused with one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError, a broken zip (RuntimeError), EOFError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds objects other than tensors and plain values (refused: loading them could run code)"
        raise CheckpointError(f"checkpoint file {path} cannot be loaded: {reason[:200]}; it is corrupt, from an "
                              f"older nanorun, or not written by nanorun: delete {Path(path).parent} (or use another "
                              "output directory) to start over") from None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, *, rank: int, world_size: int,
                    model_state: dict | None, optim_state: dict | None, rank_state: dict,
                    meta: dict | None, keep_last: int = 2,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    model_state and meta are only needed on rank 0; optim_state and rank_state on every rank.
    `barrier` must synchronise all ranks (dist.barrier under torchrun). The shared temporary name
    is deterministic per step so that all ranks of one node agree on it without communicating.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{step_dir_name(step)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    # On a shared filesystem this is a no-op; multi-node resume needs the checkpoint root on shared
    # storage (each node would otherwise hold only its own ranks' files).
    tmp.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        assert model_state is not None and meta is not None, "rank 0 saves the model and meta"
        _atomic_torch_save(model_state, tmp / MODEL)
    if optim_state is not None:
        _atomic_torch_save(optim_state, tmp / f"optim_rank{rank}.pt")
    _atomic_torch_save(rank_state, tmp / f"rank{rank}.pt")
    barrier()
    if rank == 0:
        meta = dict(meta, step=step, world_size=world_size, saved_by=socket.gethostname())
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(root)
    for _, path in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob("step_*.tmp"):  # leftovers of interrupted saves
        shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict

    def model_state(self, device: str | torch.device = "cpu") -> dict:
        return load_file(self.path / MODEL, device)

    def optim_state(self, rank: int, device: str | torch.device = "cpu") -> dict:
        p = self.path / f"optim_rank{rank}.pt"
        if not p.exists():
            raise FileNotFoundError(
                f"checkpoint {self.path} has no optimizer state for rank {rank} (saved with "
                f"world_size={self.meta.get('world_size')}); resume with the same number of processes"
            )
        return load_file(p, device)

    def rank_state(self, rank: int) -> dict:
        return load_file(self.path / f"rank{rank}.pt")


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    m = _STEP_RE.match(path.name)
    if not m or not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint directory (step_NNNNNN with {META})")
    meta = json.loads((path / META).read_text())
    return Checkpoint(path=path, step=int(m.group(1)), meta=meta)


# ---- models for inference and fine-tuning ----------------------------------------------------------
# The meta record of a checkpoint that holds a model carries at least:
#   "model_config": GPTConfig.to_dict(),  "kind": "base" | "sft",
#   "tokenizer": {"fingerprint": <tokenizer artifact fingerprint>, "vocab_size": int}
# Consumers (CORE eval, SFT, chat, export) compare the tokenizer fingerprint with the tokenizer they
# were given and refuse a mismatch (check_tokenizer).


class TokenizerMismatchError(ValueError):
    pass


def load_model(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(GPT in eval mode, meta) from a complete checkpoint directory (step_NNNNNN)."""
    from core.gpt import GPTConfig, build_model

    ck = load_checkpoint(path)
    if "model_config" not in ck.meta:
        raise ValueError(f"checkpoint {path} has no model_config in its {META}: not a model checkpoint")
    config = GPTConfig.from_dict(ck.meta["model_config"])
    model = build_model(config, device=device, dtype=dtype, init=False)
    state = ck.model_state(device)  # a corrupt file: CheckpointError naming it
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match its own model config: {e}") from e
    model.eval()
    return model, ck.meta


def check_tokenizer(meta: dict, tokenizer_fingerprint: str | None, vocab_size: int, where: str) -> None:
    """Refuse to pair a model with a tokenizer it was not trained with."""
    tok = meta.get("tokenizer") or {}
    if tok.get("vocab_size") is not None and tok["vocab_size"] != vocab_size:
        raise TokenizerMismatchError(
            f"{where}: tokenizer/model mismatch: the model was trained with a {tok['vocab_size']}-token "
            f"vocabulary, the tokenizer given has {vocab_size}; pass the tokenizer artifact it was trained with")
    if tokenizer_fingerprint and tok.get("fingerprint") and tok["fingerprint"] != tokenizer_fingerprint:
        raise TokenizerMismatchError(
            f"{where}: tokenizer/model mismatch: the model was trained with tokenizer {tok['fingerprint']}, "
            f"got {tokenizer_fingerprint}; pass the tokenizer artifact it was trained with")
