"""`nanorun nightly`: the nightly leaderboard reproduction run by hand (registered in cli/main.py;
the flow: flows/leaderboard.py).

    nanorun nightly                                  # cpu-demo, tonight (UTC): one row a night
    nanorun nightly --preset d20 --rerun add         # another row for a night that has one
    nanorun nightly --rerun replace --date 2026-11-21   # rebuild that night (its old rows go)

The deployment does the same on its schedule, or by hand on a server with workers:
    prefect deployment run 'nightly-leaderboard/nightly-leaderboard' --param rerun=add --watch

A run for a night that already has a report is refused before anything starts (one line, exit 2)
unless --rerun says what it is for. A regression against the earlier nights fails the run (exit 1)
after the report is on the leaderboard.
"""
from __future__ import annotations


class Nightly:
    @staticmethod
    def add_arguments(p):
        from pipeline.recipes import PRESETS

        p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="recipe (default cpu-demo)")
        p.add_argument("--rerun", choices=("add", "replace"),
                       help="the night already has a report: add another row, or replace the night")
        p.add_argument("--date", metavar="YYYY-MM-DD", help="the night (default: today in UTC)")
        p.add_argument("--eval-bundle", help="CORE bundle: a local directory/zip or a URL")
        p.add_argument("--chat-data", help="directory of SFT / chat-eval files (identity conversations, GSM8K)")
        p.add_argument("--nproc", type=int, help="training processes per node")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="STEP.FIELD=VALUE",
                       help="override one config field of one step (repeatable)")

    @staticmethod
    def run(args) -> int:
        from artifacts import open_store
        from cli.commands import _prefect_env, _run_flow
        from pipeline.recipes import parse_set
        from stages.base import ConfigError

        _prefect_env()
        from flows.leaderboard import night_of, nightly_leaderboard, refusal

        try:
            night = night_of(args.date)
        except ValueError as e:
            raise ConfigError(f"--date {args.date!r}: {e}") from None
        rerun = args.rerun or "refuse"
        _, refused = refusal(open_store(args.store), args.preset, night, rerun, option="--rerun {}")
        if refused:  # the flow would refuse it too: say so before starting Prefect
            raise ConfigError(refused)
        result = _run_flow(nightly_leaderboard, f"nightly {args.preset}", preset=args.preset,
                           overrides=parse_set(args.sets) or None, store=args.store, eval_bundle=args.eval_bundle,
                           chat_data=args.chat_data, nproc=args.nproc, date=night, rerun=rerun)
        print(f"nightly {args.preset} {result['run']}: report {result['report']} (store {result['store']}); "
              f"compared with {result['nights_compared']} earlier night(s); regressions: "
              f"{'; '.join(result['regressions']) or 'none'}")
        return 0
