"""`nanorun sweep` and `nanorun compare` (registered in cli/main.py; the flow: flows/sweep_flow.py).

    nanorun sweep --preset tiny --eval-bundle ../shared/data/eval_bundle   # 3 depths x 2 budgets on a CPU
    nanorun sweep --preset tiny --depths 1 2 3 4 ...                       # + d4: only its points run
    nanorun sweep --preset scaling-laws [--flops 1e18 2e18] [--plan]       # runs/scaling_laws.sh, 8 GPUs
    nanorun sweep --preset miniseries --ratios 8 12                        # runs/miniseries.sh, x2 ratios
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --b base.matrix_lr=0.4
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --a baseline --b backout=git:my-branch
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --b lr=base.matrix_lr=0.4,base.embedding_lr=2
    nanorun compare --csv A/results.csv --csv B/results.csv                # two sweeps' tables

A comparison is a sweep with two arms over the preset's grid x seeds: A = the recipe (+ --a), B =
the recipe + --b. Each arm is a candidate (pipeline/candidates.py: baseline, NAME=STEP.FIELD=VALUE,...,
NAME=git:REF, NAME=patch:FILE) and/or STEP.FIELD=VALUE overrides layered on it. Two config arms run
as one sweep through the Prefect flow; an arm with code (git:, patch:) runs its points from a
checkout of that code into the same store (docs/research.md#candidates), in this process without
Prefect, and the sweep_report stage compares the two.
"""
from __future__ import annotations

import json
import sys


def _values(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_grid_arguments(p, compare: bool = False) -> None:
    from pipeline.sweep import PRESETS

    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="the grid and recipe (default tiny)")
    p.add_argument("--name", help="the sweep's name (default: the preset's; names the report artifact)")
    p.add_argument("--depths", type=int, nargs="+", metavar="N", help="the depth axis (replaces the preset's)")
    p.add_argument("--flops", type=float, nargs="+", metavar="F", help="the target_flops axis (FLOP budgets)")
    p.add_argument("--ratios", type=float, nargs="+", metavar="R", help="the target_param_data_ratio axis")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="any pretrain identity field as an axis (repeatable), e.g. matrix_lr=0.01,0.02")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help="seeds per point (default: the recipe's; "
                                                                      "compare: 1 2 3)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STEP.FIELD=VALUE",
                   help="override a recipe step's field for every point, e.g. base.eval_tokens=4096")
    if compare:
        for arm in "ab":
            p.add_argument(f"--{arm}", dest=arm, action="append", default=[], metavar="CANDIDATE|STEP.FIELD=VALUE",
                           help=f"arm {arm.upper()}: baseline, NAME=STEP.FIELD=VALUE[,...], NAME=git:REF or "
                                "NAME=patch:FILE, and/or STEP.FIELD=VALUE overrides (repeatable)")
        p.add_argument("--csv", action="append", default=[], metavar="FILE",
                       help="compare two sweeps' results.csv instead of running anything (give it twice: A then B)")
    p.add_argument("--no-core", action="store_true", help="skip the CORE evaluation of each point")
    p.add_argument("--max-parallel", type=int, help="stage runs at once (default: the preset's)")
    p.add_argument("--eval-bundle", help="CORE bundle: a local directory/zip or a URL")
    p.add_argument("--data-source", help="data source for data_shards")
    p.add_argument("--nproc", type=int, help="training processes per point")
    p.add_argument("--plan", action="store_true", help="print what is cached / will run, and exit")


def build_sweep(args, compare: bool = False):
    from pipeline.recipes import parse_set as _parse_sets
    from pipeline.sweep import preset
    from stages.base import ConfigError

    grid = {}
    for flag, name in (("depths", "depth"), ("flops", "target_flops"), ("ratios", "target_param_data_ratio")):
        if getattr(args, flag):
            grid[name] = tuple(getattr(args, flag))
    for item in args.grid:
        field, eq, values = item.partition("=")
        if not eq or not field or not values:
            raise ConfigError(f"--grid {item!r}: expected FIELD=V1,V2, e.g. depth=10,12")
        grid[field] = tuple(_values(v) for v in values.split(","))
    changes = dict(grid=grid, overrides=_parse_sets(args.sets), name=args.name,
                   core=False if args.no_core else None, max_parallel=args.max_parallel,
                   seeds=tuple(args.seeds) if args.seeds else None)
    if compare:
        a, b = arms(args)
        if not (a.code or b.code):  # both in this process: one sweep with two arms
            changes["arms"] = {"A": a.overrides, "B": b.overrides}
        changes["seeds"] = changes["seeds"] or (1, 2, 3)
        changes["name"] = args.name or f"{args.preset}-compare"
        if len(changes["seeds"]) < 2:
            raise ConfigError("compare: give at least 2 seeds per arm (--seeds 1 2 3): the test needs their spread")
        if a == b and not a.code:
            raise ConfigError("compare: A and B are the same recipe; give B's changes, e.g. --b base.matrix_lr=0.03")
    return preset(args.preset, **changes)


def arms(args):
    """compare's (A, B) candidates from --a / --b."""
    from pipeline.candidates import arm_candidate

    return arm_candidate("A", args.a), arm_candidate("B", args.b)


def _core_without_bundle(args, sw, steps) -> str | None:
    """Why CORE, a metric of this sweep, could not be computed, or None. Offline, the public URL
    fails and every point would report no CORE while the command exits 0: a comparison of nothing.
    So a sweep with CORE needs a bundle it was given (flag, env, nanorun.toml) or one committed."""
    from artifacts import open_store
    from pipeline import settings
    from pipeline.execute import status

    if not sw.core or settings.value("eval_bundle", args.eval_bundle):
        return None
    step = next((s for s in steps.steps if s.name == "eval_bundle"), None)
    if step is None or status(step.stage, step.cfg, {}, open_store(args.store))[0] == "cached":
        return None
    return ("CORE needs the eval bundle and none is given or committed: pass --eval-bundle DIR|URL (or set "
            "eval_bundle in nanorun.toml / NANORUN_EVAL_BUNDLE; see `nanorun config`), or --no-core for val_bpb only")


def run_sweep(args, sw) -> int:
    import os

    from artifacts import open_store
    from cli.commands import _prefect_env, _run_flow
    from pipeline.sweep import sweep_steps
    from pipeline.execute import format_plan, plan

    kwargs = dict(eval_bundle=args.eval_bundle, data_source=args.data_source, nproc=args.nproc)
    steps = sweep_steps(sw, **kwargs)  # validate here: one clear line, exit 2
    missing = _core_without_bundle(args, sw, steps)
    if missing and not args.plan:
        from stages.base import ConfigError

        raise ConfigError(f"{sw.kind}: {missing}; nothing was trained")
    if missing:
        print(f"note: {missing}", file=sys.stderr)
    if args.plan:
        print(format_plan(plan(steps.steps, open_store(args.store))))
        print(f"then: sweep_report {sw.name} (the table, fits and plots of the {len(steps.points)} points)")
        return 0
    result = None if os.environ.get("PREFECT_API_URL") else cached_report(sw, steps, open_store(args.store))
    if result is None:
        _prefect_env()
        from flows.sweep_flow import sweep

        result = _run_flow(sweep, f"{sw.kind} {sw.name}", spec=sw.to_dict(), store=args.store, **kwargs)
    print("\n".join(line for line in result["markdown"].splitlines() if not line.startswith("![")).rstrip())
    print(f"\nreport {result['report']}: {result['path']}")
    return 0


def cached_report(sw, steps, store) -> dict | None:
    """The flow's answer ({"report", "path", "markdown"}) read from the store when every point and
    the report of exactly these points are committed; None when anything would run (then the flow
    runs). The report's config is built as the flow builds it (point_row of each point's manifests),
    so its fingerprint is the one the flow would look up."""
    from cli.commands import all_cached
    from pipeline.sweep import point_row, report_config
    from pipeline.execute import PlanRow, load_stage, plan, status

    rows = {r.step: r for r in plan(steps.steps, store)}
    if any(r.status != "cached" for r in rows.values()):
        return None
    manifest = {name: store.require(r.ref) for name, r in rows.items()}
    table = [point_row(p, manifest[p.pretrain], manifest.get(p.core)) for p in steps.points]
    mod = load_stage("sweep_report")
    state, ref = status(mod, mod.Config.from_dict(report_config(sw, table)), {}, store)
    if not all_cached([*rows.values(), PlanRow("report", mod.NAME, ref, state)]):
        return None
    path = store.materialize(ref)
    return {"report": str(ref), "path": str(path), "markdown": (path / "report.md").read_text()}


class Sweep:
    """`nanorun sweep`"""

    @staticmethod
    def add_arguments(p):
        add_grid_arguments(p)

    @staticmethod
    def run(args) -> int:
        return run_sweep(args, build_sweep(args))


class Compare:
    """`nanorun compare`"""

    @staticmethod
    def add_arguments(p):
        add_grid_arguments(p, compare=True)

    @staticmethod
    def run(args) -> int:
        if args.csv:
            return compare_csv(args.csv)
        sw = build_sweep(args, compare=True)
        a, b = arms(args)
        return compare_code(args, sw, a, b) if a.code or b.code else run_sweep(args, sw)


def compare_code(args, sw, a, b) -> int:
    """compare with a code candidate in an arm: each arm's points from its own checkout, then the report."""
    from artifacts import open_store
    from artifacts.manifest import ArtifactRef
    from pipeline import candidates
    from pipeline.execute import PlanRow, format_plan

    from pipeline.sweep import sweep_steps

    kwargs = dict(eval_bundle=args.eval_bundle, data_source=args.data_source, nproc=args.nproc)
    missing = _core_without_bundle(args, sw, sweep_steps(sw, **kwargs))
    kwargs["store"] = args.store
    if missing and not args.plan:
        from stages.base import ConfigError

        raise ConfigError(f"compare: {missing}; nothing was trained")
    if args.plan:
        for arm, c in (("A", a), ("B", b)):
            rows = candidates.plan_rows(c, sw, **kwargs)
            print(f"arm {arm} = {c.name}: {c.describe()}")
            print(format_plan([PlanRow(r["step"], r["stage"], ArtifactRef.parse(r["ref"]), r["status"]) for r in rows]))
        print(f"then: sweep_report {sw.name} (B vs A) in {open_store(args.store).url}")
        return 0
    result = candidates.compare(a, b, sw, **kwargs)
    print("\n".join(line for line in result["markdown"].splitlines() if not line.startswith("![")).rstrip())
    print(f"\nreport {result['report']}: {result['path']}")
    if result["failed"]:
        print(f"nanorun compare: {len(result['failed'])} point(s) failed "
              f"({'; '.join(f'{k}: {v}' for k, v in result['failed'].items())[:400]}); run the same command again "
              "to retry only them", file=sys.stderr)
        return 1
    return 0


def compare_csv(paths: list[str]) -> int:
    """Verdict table of two sweeps' results.csv (A, B): rows are matched by their grid cell."""
    import csv

    from stages.base import ConfigError
    from stages.sweep_report import analyze_compare, compare_markdown

    if len(paths) != 2:
        raise ConfigError(f"compare --csv: give exactly two results.csv files (A then B), got {len(paths)}")
    rows = []
    for arm, path in zip("AB", paths):
        try:
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({k: _number(v) for k, v in r.items()} | {"arm": arm, "status": r.get("status")})
        except OSError as e:
            raise ConfigError(f"compare --csv: cannot read {path}: {e.strerror}") from None
    a = analyze_compare(rows, 0.95, {"A": f"results of {paths[0]}", "B": f"results of {paths[1]}"})
    print(compare_markdown(f"{paths[0]} vs {paths[1]}", rows, a, None).rstrip())
    return 0


def _number(v: str):
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
