"""Nightly retention: each night reproduces the recipe into its own store root
(`{store}/@nightly/{preset}/{YYYY-MM-DD}`, flows/leaderboard.py), so without a bound the store grows by
a whole speedrun a night. The newest N nights of each preset are kept (default 7,
$NANORUN_KEEP_NIGHTS); older roots are deleted. Their reports stay: the nightly flow copies each
report into the main store (alias report@nightly-{preset}-{night}), so the leaderboard keeps its
history while the models, checkpoints and shards of old nights go.

    nanorun gc [--keep-nights 7] [--dry-run]       # also run at the end of every nightly flow
"""
from __future__ import annotations

import os

NIGHTLY_ROOT = "@nightly"  # not a stage name: stage listings and the artifact gc never see it
DEFAULT_KEEP_NIGHTS = 7


def keep_nights_default() -> int:
    raw = os.environ.get("NANORUN_KEEP_NIGHTS", str(DEFAULT_KEEP_NIGHTS))
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"NANORUN_KEEP_NIGHTS={raw!r}: expected a whole number of nights (>= 1)") from None
    if n < 1:
        raise ValueError(f"NANORUN_KEEP_NIGHTS={n}: keep at least the newest night (>= 1)")
    return n


def night_store_url(main_url: str, preset: str, night: str) -> str:
    return "/".join([main_url.rstrip("/"), NIGHTLY_ROOT, preset, night])


def prune_nights(store, keep: int, *, dry_run: bool = False) -> list[str]:
    """Delete every preset's night roots but the newest `keep`; returns the keys removed (or that
    would be, with dry_run). Nights sort by name: they are ISO dates."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 night, got {keep}")
    removed = []
    for preset in store._dirs(NIGHTLY_ROOT):
        nights = sorted(store._dirs(f"{NIGHTLY_ROOT}/{preset}"))
        for night in nights[:-keep]:
            key = f"{NIGHTLY_ROOT}/{preset}/{night}"
            if not dry_run:
                store._remove_tree(key)
            removed.append(key)
    return removed
