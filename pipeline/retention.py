"""Nightly retention: each nightly run reproduces the recipe into its own store root
(`{store}/@nightly/{preset}/{run}`, flows/leaderboard.py), so without a bound the store grows by
a whole speedrun a night. The newest N nights of each preset are kept (default 7,
$NANORUN_KEEP_NIGHTS); older roots are deleted. Their reports stay: the nightly flow copies each
report into the main store (alias report@nightly-{preset}-{run}), so the leaderboard keeps its
history while the models, checkpoints and shards of old nights go.

A run is named after its night, `2026-11-21`; a second row deliberately added for the same night
(the flow's rerun="add") is `2026-11-21-2`, and so on.

    nanorun gc [--keep-nights 7] [--dry-run]       # also run at the end of every nightly flow
"""
from __future__ import annotations

import os
import re

NIGHTLY_ROOT = "@nightly"  # not a stage name: stage listings and the artifact gc never see it
DEFAULT_KEEP_NIGHTS = 7


_RUN = re.compile(r"(\d{4}-\d{2}-\d{2})(?:-(\d+))?")


def night_run(night: str, n: int = 1) -> str:
    """The name of the night's n-th nightly run: its store root, the suffix of its report alias."""
    return night if n == 1 else f"{night}-{n}"


def run_order(run: str) -> tuple[str, int] | None:
    """(night, n) of a nightly run's name, None for any other name: sorts runs (`-10` after `-9`)."""
    m = _RUN.fullmatch(run)
    return (m[1], int(m[2] or 1)) if m else None


def keep_nights_default() -> int:
    raw = os.environ.get("NANORUN_KEEP_NIGHTS", str(DEFAULT_KEEP_NIGHTS))
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"NANORUN_KEEP_NIGHTS={raw!r}: expected a whole number of nights (>= 1)") from None
    if n < 1:
        raise ValueError(f"NANORUN_KEEP_NIGHTS={n}: keep at least the newest night (>= 1)")
    return n


def night_store_url(main_url: str, preset: str, run: str) -> str:
    return "/".join([main_url.rstrip("/"), NIGHTLY_ROOT, preset, run])


def prune_nights(store, keep: int, *, dry_run: bool = False) -> list[str]:
    """Delete the run roots of every preset's nights but the newest `keep` nights (all the runs of
    a night go together); returns the keys removed (or that would be, with dry_run). Roots whose
    name is not a run's are left alone."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 night, got {keep}")
    removed = []
    for preset in store._dirs(NIGHTLY_ROOT):
        runs = sorted((r for r in store._dirs(f"{NIGHTLY_ROOT}/{preset}") if run_order(r)), key=run_order)
        kept = sorted({run_order(r)[0] for r in runs})[-keep:]
        for run in runs:
            if run_order(run)[0] not in kept:
                key = f"{NIGHTLY_ROOT}/{preset}/{run}"
                if not dry_run:
                    store._remove_tree(key)
                removed.append(key)
    return removed
