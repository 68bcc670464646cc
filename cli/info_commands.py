"""CLI subcommands that report on the project without running anything (registered in cli/main.py).

    nanorun leaderboard [--preset P] [--wide | --json | --csv] [--stats]   # pipeline/board.py
    nanorun config [--init] [--json]                                       # pipeline/settings.py
"""
from __future__ import annotations

from pathlib import Path

from pipeline.board import format_rows, format_stats, recipe_stats, rows
from pipeline.settings import CONFIG_ENV, FILE_NAME, KEYS, init_file, resolve


class Leaderboard:
    """`nanorun leaderboard`"""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--format", choices=("md", "csv", "json"), default="md")
        p.add_argument("--json", dest="format", action="store_const", const="json", help="= --format json")
        p.add_argument("--csv", dest="format", action="store_const", const="csv", help="= --format csv")
        p.add_argument("--wide", action="store_true", help="every column (hardware, each stage's time, cost); the "
                                                           "default view fits 120 columns")
        p.add_argument("--preset", help="only this recipe")
        p.add_argument("--limit", type=int, help="at most N rows")
        p.add_argument("--stats", action="store_true", help="mean ± sd per recipe over its runs instead of one "
                                                            "row per run")
        p.add_argument("--this-store", action="store_true", help="only runs of --store (default: every store "
                                                                 "this machine's run index knows)")

    @staticmethod
    def run(args) -> int:
        from artifacts import open_store
        from artifacts.index import RunIndex

        index = RunIndex()
        store = open_store(args.store)
        index.ensure(store)  # a fresh machine: rebuild the index from the store's manifests
        found = rows(index, store=store.url if args.this_store else None, preset=args.preset,
                     limit=None if args.stats else args.limit)
        print(format_stats(recipe_stats(found), args.format) if args.stats
              else format_rows(found, args.format, wide=args.wide), end="")
        return 0


class Config:
    """`nanorun config`"""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--init", action="store_true",
                       help=f"write ./{FILE_NAME} naming ../shared/data (the folders that exist; an existing "
                            "file is kept)")
        p.add_argument("--json", action="store_true", help="print the values and their sources as JSON")

    @staticmethod
    def run(args) -> int:
        import json

        if args.init:
            # run in the checkout (scripts/speedrun.sh, deploy/env.sh): ../shared/data beside it
            path, lines = init_file(Path.cwd(), Path.cwd().parent / "shared" / "data")
            print(f"kept {path} (it exists)" if lines is None else f"wrote {path}: {'; '.join(lines) or 'empty'}")
        # the global --store is a flag here too: what the other commands would use
        settings, used = resolve({"store": getattr(args, "store", None)})
        if args.json:
            print(json.dumps({"file": str(used) if used else None,
                              **{k: {"value": s.value, "source": s.source} for k, s in settings.items()}}))
            return 0
        print(f"settings file: {used or f'none (./{FILE_NAME}, ${CONFIG_ENV})'}")
        width = max(map(len, settings))
        for key, s in settings.items():
            shown = s.value if s.value is not None else KEYS[key][1]
            if key == "store" and s.value is None:
                from artifacts.store import nanorun_home

                shown = f"{nanorun_home()} ({shown})"
            print(f"{key.ljust(width)}  {shown}  ({s.source})")
        return 0
