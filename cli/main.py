"""The `nanorun` command line.

    nanorun ls [STAGE]                    committed artifacts (from the run index), newest first
    nanorun show REF [--json]             manifest summary: config, inputs, files, metrics, provenance
    nanorun verify REF [--fast]           sha256 (sizes only with --fast) of every file; exit 1 if damaged
    nanorun pull REF --to DIR             verified copy of an artifact into DIR
    nanorun push REF --to URL             copy an artifact into another store (verified, manifest last)
    nanorun alias [STAGE@NAME [REF]]      list aliases, show one, or point one at REF (--delete removes)
    nanorun gc [--dry-run]                delete uncommitted leftovers, artifacts no alias reaches, old nights
    nanorun index [--rebuild]             (re)build the run index from the store's manifests
    nanorun plan FILE                     dry run of a pipeline file: cached / will run / locked
    nanorun speedrun --preset P [--plan]  the speedrun flow (data -> ... -> report), or its plan
    nanorun stage NAME --input N=REF ...  run or rerun one stage (--force rebuilds)
    nanorun leaderboard [--format F]      completed speedruns, fastest to GPT-2 CORE first
    nanorun nightly [--preset P] [--rerun add|replace]   the nightly leaderboard run, by hand
    nanorun chat [REF] [-p PROMPT]        chat with an export / sft artifact (streamed)
    nanorun serve [REF] [--port N]        the web chat UI on 127.0.0.1
    nanorun sweep --preset P [--plan]     a grid of pretrain runs with scaling fits and plots
    nanorun compare --b STEP.FIELD=V      A/B across depths x seeds: mean differences, CIs, verdicts
    nanorun import nanochat DIR           a nanochat checkpoint + tokenizer as pretrain/sft/rl + tokenizer artifacts
    nanorun export REF --format nanochat --to DIR   a trained model in nanochat's layout
    nanorun config [--init]               the settings in effect (nanorun.toml, env, defaults) and their sources
Global: --store URL (default: nanorun.toml's store, $NANORUN_STORE, else the local root $NANORUN_HOME), -q, -v.
REF = stage/label-fingerprint, a unique fingerprint prefix (>= 4 hex chars), or stage@alias.

Adding a subcommand: append (name, "module[:object]", help) to COMMANDS (or call register()); the
object (a module or class) provides add_arguments(parser) and run(args) -> int. Only the chosen
command's module is imported, so keep heavy imports (torch, prefect) inside run(). Errors a user can
fix (unknown ref, unreachable S3 endpoint, bad config...) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from artifacts.errors import USER_ERRORS
from core.openmp import wait_env

COMMANDS: list[tuple[str, str, str]] = [
    ("ls", "cli.main:Ls", "list committed artifacts"),
    ("show", "cli.main:Show", "show an artifact's manifest"),
    ("verify", "cli.main:Verify", "check an artifact's files against its manifest"),
    ("pull", "cli.main:Pull", "copy an artifact into a local directory (verified)"),
    ("push", "cli.main:Push", "copy an artifact into another store (verified)"),
    ("alias", "cli.main:Alias", "list, show or set named pointers (stage@name)"),
    ("gc", "cli.main:Gc", "delete uncommitted leftovers and unreferenced artifacts"),
    ("index", "cli.main:Index", "show or rebuild the run index"),
    ("plan", "cli.main:Plan", "dry-run plan of a pipeline file (JSON/YAML)"),
    ("speedrun", "cli.commands:Speedrun", "run the speedrun flow for a preset (or --plan it)"),
    ("stage", "cli.commands:Stage", "run or rerun one stage with explicit inputs"),
    ("leaderboard", "cli.info_commands:Leaderboard", "completed speedruns, fastest to GPT-2 first"),
    ("nightly", "cli.nightly_commands:Nightly", "the nightly leaderboard reproduction, run by hand"),
    ("chat", "cli.chat_commands:Chat", "chat with a model in the terminal (interactive, or -p for one shot)"),
    ("serve", "cli.chat_commands:Serve", "serve the web chat UI and API for a model"),
    ("bench-infer", "cli.bench_commands:BenchInfer", "inference benchmark of a model: TTFT, TPOT, tok/s, MFU/MBU"),
    ("sweep", "cli.sweep_commands:Sweep", "a grid of pretrain runs (depth x FLOPs or ratio x seeds), fits and plots"),
    ("compare", "cli.sweep_commands:Compare", "A/B of two recipes across depths and seeds: differences, CIs, verdicts"),
    ("research", "cli.research_commands:Research", "candidates promoted from small to larger depths only while "
                                                   "they beat the baseline"),
    ("import", "cli.nanochat_commands:Import", "import a nanochat checkpoint and tokenizer as artifacts"),
    ("export", "cli.nanochat_commands:Export", "write a trained model in another project's layout (nanochat)"),
    ("config", "cli.info_commands:Config", "the project's settings (store, eval bundle, chat data) and their sources"),
]


def register(name: str, target: str, help: str) -> None:
    """Add a subcommand (target = "module[:object]" with add_arguments(parser) and run(args))."""
    if any(n == name for n, _, _ in COMMANDS):
        raise ValueError(f"nanorun subcommand {name!r} is already registered")
    COMMANDS.append((name, target, help))


def _load(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def open_store_from(args):
    from artifacts import open_store

    return open_store(args.store)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _table(rows: list[tuple], head: tuple) -> str:
    rows = [tuple(str(c) for c in r) for r in [head, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _short_metrics(metrics: dict, n: int = 4) -> str:
    parts = []
    for k, v in list(metrics.items())[:n]:
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            continue
        parts.append(f"{k}={v}")
    return " ".join(parts)


# ---- subcommands ---------------------------------------------------------------------------------
class Ls:
    @staticmethod
    def add_arguments(p):
        p.add_argument("stage", nargs="?", help="only this stage")
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    @staticmethod
    def run(args) -> int:
        from artifacts.index import RunIndex

        store = open_store_from(args)
        idx = RunIndex()
        if idx.ensure(store):
            logging.getLogger("nanorun.index").info("indexed %s", store.url)
            committed = None
        else:  # the index is a cache: never list what the store no longer has (or has damaged)
            committed = idx.reconcile(store, args.stage)
        rows = [r for r in idx.artifacts(store=store.url, stage=args.stage)
                if committed is None or r["ref"] in committed]
        if args.json:
            for r in rows:
                print(json.dumps(r, default=str))
            return 0
        aliases: dict[str, list[str]] = {}
        for name, ref in store.aliases(args.stage).items():
            aliases.setdefault(str(ref), []).append("@" + name.partition("@")[2])
        table = [(r["ref"], _size(r["total_bytes"]), str(r["committed_at"] or "-")[:16],
                  ",".join(sorted(aliases.get(r["ref"], []))), _short_metrics(r["metrics"])) for r in rows]
        if table:
            print(_table(table, ("ARTIFACT", "SIZE", "COMMITTED", "ALIASES", "METRICS")))
        print(f"{len(rows)} artifact(s) in {store.url}", file=sys.stderr)
        return 0


class Show:
    @staticmethod
    def add_arguments(p):
        p.add_argument("ref")
        p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    @staticmethod
    def run(args) -> int:
        store = open_store_from(args)
        ref = store.resolve(args.ref)
        m = store.require(ref)
        if args.json:
            print(m.to_json(), end="")
            return 0
        aliases = [k.partition("@")[2] for k, r in store.aliases(ref.stage).items() if r == ref]
        prov = dict(m.provenance)
        print(f"artifact   {ref}")
        print(f"store      {store.url}")
        print(f"stage      {m.stage} (code_version {m.code_version})")
        print(f"committed  {prov.pop('committed_at', '-')}")
        print(f"aliases    {', '.join(sorted(aliases)) or '-'}")
        runtime = dict(m.runtime)
        resolved = runtime.pop("resolved", None) or []
        for title, d in (("identity config", m.identity), ("runtime config", runtime)):
            print(f"{title}:" + ("" if d else " none"))
            for k, v in d.items():
                print(f"  {k} = {json.dumps(v)}")
        if resolved:  # what this machine decided for values written as auto (stagekit/training.py)
            print("resolved when the plan was built:")
            for note in resolved:
                print(f"  {note}")
        print("inputs:" + ("" if m.inputs else " none"))
        for k, r in sorted(m.inputs.items()):
            print(f"  {k} <- {r}")
        print(f"files ({len(m.files)}, {m.total_bytes:,} bytes):")
        for f in m.files:
            print(f"  {f.path}  {f.size:,}  sha256:{f.sha256[:12]}")
        print("metrics:" + ("" if m.metrics else " none"))
        for k, v in m.metrics.items():
            print(f"  {k} = {json.dumps(v)}")
        print("provenance:")
        for k, v in prov.items():
            print(f"  {k} = {v if isinstance(v, str) else json.dumps(v)}")
        return 0


class Verify:
    @staticmethod
    def add_arguments(p):
        p.add_argument("ref")
        p.add_argument("--fast", action="store_true", help="check sizes only (default: every file's sha256, "
                                                           "which reads all the data)")
        p.add_argument("--deep", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts

    @staticmethod
    def run(args) -> int:
        store = open_store_from(args)
        result = store.verify(store.resolve(args.ref), fast=args.fast)
        print(result)
        return 0 if result.ok else 1


class Pull:
    @staticmethod
    def add_arguments(p):
        p.add_argument("ref")
        p.add_argument("--to", required=True, metavar="DIR", help="destination directory")

    @staticmethod
    def run(args) -> int:
        store = open_store_from(args)
        ref = store.resolve(args.ref)
        dest = store.pull(ref, args.to)
        m = store.require(ref)
        print(f"pulled {ref} ({len(m.files)} files, {m.total_bytes:,} bytes, sha256 verified) -> {dest}")
        return 0


class Push:
    @staticmethod
    def add_arguments(p):
        p.add_argument("ref")
        p.add_argument("--to", required=True, metavar="URL", help="destination store (path or s3://bucket/prefix)")
        p.add_argument("--with-inputs", action="store_true", help="also push the artifacts it was built from")

    @staticmethod
    def run(args) -> int:
        from artifacts import open_store

        store = open_store_from(args)
        other = open_store(args.to)
        ref = store.resolve(args.ref)
        m = store.push(ref, other, with_inputs=args.with_inputs)
        print(f"pushed {ref} ({len(m.files)} files, {m.total_bytes:,} bytes) -> {other.url}")
        return 0


class Alias:
    @staticmethod
    def add_arguments(p):
        p.add_argument("name", nargs="?", metavar="STAGE@NAME")
        p.add_argument("ref", nargs="?", metavar="REF", help="point the alias at this artifact")
        p.add_argument("--delete", action="store_true", help="remove the alias")

    @staticmethod
    def run(args) -> int:
        from artifacts.errors import StoreError

        store = open_store_from(args)
        if not args.name:
            rows = sorted(store.aliases().items())
            if rows:
                print(_table([(k, str(r)) for k, r in rows], ("ALIAS", "ARTIFACT")))
            return 0
        stage, at, name = args.name.partition("@")
        if not at or not stage or not name:
            raise StoreError(f"expected STAGE@NAME, got {args.name!r} (e.g. pretrain@leaderboard-2026-11-23)")
        if args.delete:
            store.delete_alias(stage, name)
            print(f"deleted alias {args.name}")
        elif args.ref:
            ref = store.resolve(args.ref)
            store.set_alias(stage, name, ref)
            print(f"{args.name} -> {ref}")
        else:
            print(store.resolve(args.name))
        return 0


class Gc:
    @staticmethod
    def add_arguments(p):
        p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
        p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                       help="leave uncommitted things touched more recently than this alone (default 3600)")
        p.add_argument("--keep-nights", type=int, metavar="N",
                       help="nightly runs: keep the newest N nights' store roots (default $NANORUN_KEEP_NIGHTS or 7)")

    @staticmethod
    def run(args) -> int:
        from artifacts import verified
        from artifacts.errors import StoreError
        from pipeline.retention import keep_nights_default, prune_nights

        store = open_store_from(args)
        try:
            keep = args.keep_nights if args.keep_nights is not None else keep_nights_default()
            nights = prune_nights(store, keep, dry_run=args.dry_run)
        except ValueError as e:
            raise StoreError(f"gc: {e}") from None
        print(store.gc(dry_run=args.dry_run, grace_s=args.grace).format())
        for key in nights:
            print(f"{'would remove' if args.dry_run else 'removed'} nightly root {key} (older than the newest {keep} nights)")
        forgotten = verified.forget_missing(dry_run=args.dry_run)
        if forgotten:
            print(f"{'would forget' if args.dry_run else 'forgot'} {forgotten} checked digest(s) of files that no "
                  f"longer exist ({verified.db_path()})")
        return 0


class Index:
    @staticmethod
    def add_arguments(p):
        p.add_argument("--rebuild", action="store_true", help="re-read every manifest of the store")

    @staticmethod
    def run(args) -> int:
        from artifacts.index import RunIndex

        store = open_store_from(args)
        idx = RunIndex()
        if args.rebuild:
            n = idx.rebuild(store)
            print(f"rebuilt the run index for {store.url}: {n} artifact(s) -> {idx.path}")
        else:
            idx.ensure(store)
            n = len(idx.artifacts(store=store.url))
            print(f"run index {idx.path}: {n} artifact(s) from {store.url}")
        return 0


class Plan:
    @staticmethod
    def add_arguments(p):
        p.add_argument("file", help="pipeline file (JSON or YAML): {steps: [{name, stage, config, inputs}]}")

    @staticmethod
    def run(args) -> int:
        from pipeline.plan import format_plan, load_steps, plan_rows

        store = open_store_from(args)
        print(format_plan(plan_rows(load_steps(args.file, store), store)))
        return 0


# ---- entry point ---------------------------------------------------------------------------------
def _selected(argv: list[str]) -> str | None:
    """The subcommand named in argv, found without importing any command module."""
    names = {n for n, _, _ in COMMANDS}
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--store":
            skip = True
        elif not tok.startswith("-"):
            return tok if tok in names else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanorun", description="nanorun: the nanochat speedrun as cached, "
                                     "versioned pipeline stages", formatter_class=argparse.RawDescriptionHelpFormatter)
    def add_global_options(p, defaults: bool) -> None:
        # accepted before or after the subcommand; the subcommand's copy only overrides when given
        kw = (lambda d: {"default": d}) if defaults else (lambda d: {"default": argparse.SUPPRESS})
        p.add_argument("--store", metavar="URL", **kw(None),
                       help="artifact store: a directory or s3://bucket/prefix (default: nanorun.toml's "
                            "store, env NANORUN_STORE, else the local root $NANORUN_HOME; `nanorun config`)")
        p.add_argument("-q", "--quiet", action="store_true", **kw(False), help="warnings and errors only")
        p.add_argument("-v", "--verbose", action="store_true", **kw(False), help="debug logging")

    add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _selected(argv)
    for name, target, help in COMMANDS:
        p = sub.add_parser(name, help=help, description=help)
        add_global_options(p, defaults=False)
        if name == chosen:
            obj = _load(target)
            obj.add_arguments(p)
            p.set_defaults(_run=obj.run)
    return parser


class RunFailed(Exception):
    """A flow run failed for a reason other than the user's input; its log says why."""


# Errors a user fixes by changing the command: (module, class) looked up only when that module is
# loaded (an exception of a class never imported cannot have been raised), so `nanorun ls` stays light.
_LAZY_USER_ERRORS = (("stages.base", "ConfigError"), ("core.checkpoint", "TokenizerMismatchError"),
                     ("core.eval.bundle", "BundleError"), ("core.export", "BundleError"),
                     ("core.train.common", "ResumeError"), ("core.layouts", "LayoutError"))


def user_error_types() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules[m], name) for m, name in _LAZY_USER_ERRORS if m in sys.modules)
    return (*USER_ERRORS, *loaded)


def one_line(e: BaseException) -> str:
    """The exception text on one line, credentials in any URL it quotes masked."""
    from artifacts.redact import redact

    return redact(" ".join(str(e).split()))


def _name_the_run(record: logging.LogRecord) -> bool:
    """Prefect's run loggers log "Finished in state Cached()" and the like: say which step (task
    run) or flow run it is about, as the UI does."""
    who = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
    if who and not getattr(record, "nanorun_named", False):
        record.name, record.nanorun_named = f"{record.name} {who}", True
    return True


def main(argv: list[str] | None = None) -> int:
    os.environ.update(wait_env(os.environ))  # before torch loads: in-process stages, chat and serve too
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("nanorun").setLevel(level)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    for handler in logging.getLogger().handlers:
        handler.addFilter(_name_the_run)
    try:
        if args.command != "config":  # config reports the settings even when one is wrong
            from pipeline import settings

            args.store = settings.value("store", args.store)
        return int(args._run(args) or 0)
    except Exception as e:
        if isinstance(e, user_error_types()):
            print(f"nanorun {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, RunFailed):
            print(f"nanorun {args.command}: {one_line(e)}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("nanorun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nanorun ls | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
