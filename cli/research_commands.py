"""`nanorun research` (registered in cli/main.py; the method: pipeline/research.py; the flow: flows/research_flow.py).

    nanorun research --preset tiny --depths 1 2 3 --seeds 1 2 3 \\
        --candidate lr=base.unembedding_lr=0.3 --candidate code=git:my-branch [--keep 1] [--alpha 0.05]
    nanorun research --preset tiny --candidate lr=base.unembedding_lr=0.3 --budget 0.2 --plan
    nanorun research --preset tiny --search base.unembedding_lr=0.05,0.2 --search base.matrix_lr=0.1,0.4 --samples 2
    nanorun research --preset tiny --candidate lr=base.unembedding_lr=0.3 --propose "python my_proposer.py"

Candidates take the forms of pipeline/candidates.py (config overrides, git:REF, patch:FILE). A
rerun with one more candidate or seed builds only the new points; a rerun with everything committed
answers from the store without starting Prefect. Exits 1 (after the report) when a point or the
proposer failed; a bad command or a budget too small for the first rung: one line, exit 2.
"""
from __future__ import annotations

import os
import sys


def _values(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class Research:
    """`nanorun research`"""

    @staticmethod
    def add_arguments(p):
        from pipeline.recipes import PRESETS

        p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="the speedrun recipe (default tiny)")
        p.add_argument("--name", default="research", help="the research's name (labels the report artifact)")
        p.add_argument("--candidate", dest="candidates", action="append", default=[], metavar="NAME=FORM",
                       help="a candidate (repeatable): NAME=STEP.FIELD=VALUE[,...], NAME=git:REF or NAME=patch:FILE")
        p.add_argument("--depths", type=int, nargs="+", metavar="N", help="the rungs, smallest first "
                                                                          "(default: tiny 1 2 3, cpu-demo 2 4 6, GPU 12 16 20)")
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="S", help="seeds per rung (default 1 2 3)")
        p.add_argument("--metrics", nargs="+", default=["val_bpb"], choices=["val_bpb", "core"],
                       help="what must improve (default val_bpb; core needs the CORE bundle)")
        p.add_argument("--alpha", type=float, default=0.05, help="one-sided significance after Holm (default 0.05)")
        p.add_argument("--keep", type=int, default=0, metavar="K", help="at most K promoted per rung (0: all significant)")
        p.add_argument("--budget", type=float, metavar="HOURS", help="device-hours (GPU- or CPU-hours) to build with")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="STEP.FIELD=VALUE",
                       help="override a recipe step's field for the baseline and every candidate")
        p.add_argument("--search", action="append", default=[], metavar="STEP.FIELD=V1,V2",
                       help="built-in proposer: a candidate per point of the grid over these fields (repeatable)")
        p.add_argument("--samples", type=int, default=0, metavar="N", help="with --search: N random grid points (seed 0)")
        p.add_argument("--propose", default="", metavar="CMD", help="a proposer command: results JSON on stdin, "
                                                                    '{"candidate": "NAME=FORM"} lines on stdout')
        p.add_argument("--rounds", type=int, default=3, help="proposer rounds at most (default 3)")
        p.add_argument("--max-parallel", type=int, default=1, help="points trained at once (default 1)")
        p.add_argument("--eval-bundle", help="CORE bundle: a local directory/zip or a URL")
        p.add_argument("--data-source", help="data source for data_shards")
        p.add_argument("--plan", action="store_true", help="print the points, which are cached and the cost per rung; "
                                                           "run nothing")

    @staticmethod
    def run(args) -> int:
        from artifacts import open_store
        from pipeline import settings
        from pipeline.recipes import parse_set
        from pipeline.research import Research as Spec
        from pipeline.research import format_plan, plan_research
        from stages.base import ConfigError

        search = {}
        for item in args.search:
            key, eq, values = item.partition("=")
            if not eq or not values:
                raise ConfigError(f"--search {item!r}: expected STEP.FIELD=V1,V2, e.g. base.matrix_lr=0.1,0.4")
            search[key] = [_values(v) for v in values.split(",")]
        r = Spec(name=args.name, recipe=args.preset, depths=tuple(args.depths or ()), seeds=tuple(args.seeds),
                 candidates=tuple(args.candidates), metrics=tuple(args.metrics), alpha=args.alpha, keep=args.keep,
                 budget=args.budget, overrides=parse_set(args.sets), search=search, samples=args.samples,
                 propose=args.propose, rounds=args.rounds, max_parallel=args.max_parallel)
        eval_bundle = settings.value("eval_bundle", args.eval_bundle)
        if "core" in r.metrics and not eval_bundle:
            raise ConfigError("research: --metrics core needs the CORE bundle: pass --eval-bundle DIR|URL (or set "
                              "eval_bundle in nanorun.toml; see `nanorun config`)")
        kw = dict(eval_bundle=eval_bundle, data_source=args.data_source)
        store = open_store(args.store)
        if args.plan:
            print(format_plan(plan_research(r, store, **kw)))
            return 0
        result = None if os.environ.get("PREFECT_API_URL") else cached_answer(r, store, kw)
        if result is None:
            from cli.commands import _prefect_env, _run_flow

            _prefect_env()
            from flows.research_flow import research

            result = _run_flow(research, f"research {r.name}", candidates=list(r.candidates), recipe=r.recipe,
                               depths=list(r.depths), seeds=list(r.seeds), metrics=list(r.metrics), alpha=r.alpha,
                               keep=r.keep, budget=r.budget, overrides=r.overrides,
                               search={k: list(v) for k, v in r.search.items()}, samples=r.samples, propose=r.propose,
                               rounds=r.rounds, name=r.name, max_parallel=r.max_parallel, store=args.store, **kw)
        md = result["markdown"]
        print(md[:md.index("## Δ vs the baseline")].rstrip() if "## Δ vs the baseline" in md else md.rstrip())
        print(f"\nreport {result['report']}: {result['path']} (built {result['spent_hours']:.4f} device-hours)")
        return 0


def cached_answer(r, store, kw) -> dict | None:
    """The flow's answer read from the store when every point the ladder reaches and the report of
    exactly these results are committed (the ladder is replayed on cache hits only); None when
    anything would run (then the flow runs)."""
    from pipeline.execute import load_stage, status
    from pipeline.research import NotCached, research
    from stages.research_report import report_config

    try:
        res = research(r, store=store.url, log=lambda line: None, only_cached=True, **kw)
    except NotCached:
        return None
    if res["errors"] or any(x.get("status") != "ok" for x in res["rows"]):
        return None  # the flow retries what failed and says so
    mod = load_stage("research_report")
    state, ref = status(mod, mod.Config.from_dict(report_config(res)), {}, store)
    if state != "cached":
        return None
    print(f"all {len(res['rows'])} points and the report are committed and verified: nothing to run (no Prefect "
          "run started; with PREFECT_API_URL set the run is recorded on that server)", file=sys.stderr)
    path = store.materialize(ref)
    return {"report": str(ref), "path": str(path), "markdown": (path / "report.md").read_text(), "spent_hours": 0.0}
