"""Artifact layouts that more than one reader knows: where the files of one stage's artifact lie.

    from core.layouts import model_checkpoint, tokenizer_dir, shard_files
    ckpt = model_checkpoint(store.materialize(sft_ref))        # .../checkpoints/step_000800
    tok = tokenizer_dir(store.materialize(tokenizer_ref))      # the folder holding tokenizer.json
    train, val = shard_files(store.materialize(data_ref))      # sorted parquet shard paths

The stage that writes a layout and every stage, trainer or command that reads it use these names,
so that no stage imports another stage and a layout changes in one place. Plain pathlib and json:
the trainers (core/train) read the same layouts without importing stages/.
"""
from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_POINTER = "checkpoint.json"  # trainer artifacts: {"checkpoint": "checkpoints/step_N", "step": N}
CHAT_KINDS = ("sft", "rl")              # checkpoint meta "kind"s of a chat-tuned model (else "base")
TOKENIZER_FILE = "tokenizer.json"
SHARD_GLOB = "shard_*.parquet"          # data_shards artifacts: train/ and val/ hold the shards


class LayoutError(ValueError):
    """A file of an artifact is malformed or points outside the artifact (damaged or crafted)."""


def inside(root: Path | str, rel: object, what: str) -> Path:
    """root/rel for a path read from a file of the artifact at root, refused unless it is relative
    and stays inside root with symlinks followed: a manifest vouches for the artifact's own bytes
    only, so a pointer leading elsewhere would load files nobody verified."""
    base = Path(root).resolve()
    if not isinstance(rel, str) or not rel.strip() or Path(rel).is_absolute():
        raise LayoutError(f"{what} names {rel!r}: expected a path relative to {root}; the artifact is damaged "
                          "or not written by nanorun")
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise LayoutError(f"{what} names {rel!r}, which leads outside {root}; refusing to read it (the artifact "
                          "is damaged or crafted: rebuild it)")
    return Path(root) / rel


def model_checkpoint(artifact_dir: Path | str) -> Path:
    """The final checkpoint directory of a trainer artifact (pretrain, sft, rl) for core.checkpoint."""
    d = Path(artifact_dir)
    pointer = d / CHECKPOINT_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"{d} is not a trained-model artifact (pretrain, sft, rl): no {CHECKPOINT_POINTER}")
    try:
        rel = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as e:
        raise LayoutError(f"{pointer} is not {{\"checkpoint\": \"checkpoints/step_N\", ...}} ({e!r}): the "
                          "artifact is damaged; rebuild it") from None
    return inside(d, rel, str(pointer))


def tokenizer_dir(path: Path | str) -> Path:
    """Where tokenizer.json is inside a tokenizer artifact (its root, or tokenizer/)."""
    for d in (Path(path), Path(path) / "tokenizer"):
        if (d / TOKENIZER_FILE).is_file():
            return d
    raise FileNotFoundError(f"{path} holds no {TOKENIZER_FILE}: the 'tokenizer' input must be a tokenizer artifact")


def shard_files(artifact_dir: Path | str) -> tuple[list[Path], list[Path]]:
    """(train shard paths, validation shard paths) of a data_shards artifact, sorted."""
    d = Path(artifact_dir)
    train, val = sorted((d / "train").glob(SHARD_GLOB)), sorted((d / "val").glob(SHARD_GLOB))
    if not train or not val:
        raise FileNotFoundError(f"{d} is not a data_shards artifact: expected train/ and val/ {SHARD_GLOB} "
                                f"(found {len(train)} train, {len(val)} val)")
    return train, val
