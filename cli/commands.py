"""CLI subcommands that run the Prefect flows locally (registered in cli/main.py).

    nanorun speedrun --preset cpu-demo [--depth N] [--set STEP.FIELD=VALUE ...] [--plan] [--force STEP]
    nanorun stage NAME [--input NAME=REF ...] [--set FIELD=VALUE ...] [--force] [--join] [--plan]

Without PREFECT_API_URL the flow runs against a temporary local Prefect server (started for the
run); with it, the run appears on that server's UI like a deployment run. `--plan` prints what
would be cached / run / waited for and runs nothing (no Prefect either); a run whose every step is
committed answers from the store alone. A failed run ends with its table of steps and one line;
Prefect's tracebacks are left off the terminal (the run's log on the server keeps them; -v prints
them), and trainer step lines are logged every N-th step (flows/tasks.py) beside the progress bar.
The temporary server is reached directly even when HTTP(S)_PROXY is set (loopback joins NO_PROXY).

One SIGTERM, SIGINT (Ctrl-C) or SIGHUP stops the run: trainers get TERM, then KILL after
stagekit.launch.INTERRUPT_GRACE; the temporary Prefect server is stopped; the command exits within
30 s with a line saying how to resume, code 128 + the signal (130 for Ctrl-C, 143 for TERM). A
second signal exits at once. See _run_interruptible for why the flow runs on a thread of its own.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

UNWIND_S = 18.0     # after a signal, how long the flow may take to unwind (trainers: 10 s grace)
HARD_EXIT_S = 27.0  # after a signal, the process exits whatever it is doing
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESUME_HINT = ("run the same command again to resume (committed stages are reused; training resumes from its "
               "newest checkpoint)")


def _prefect_env() -> None:
    """Defaults that keep a local run quiet and self-contained (docs/versions.md#prefect-3)."""
    from artifacts.store import nanorun_home

    os.environ.setdefault("PREFECT_HOME", str(nanorun_home() / "prefect"))
    # Prefect creates only the last directory of its home: on a fresh machine NANORUN_HOME does not
    # exist yet and the temporary server cannot open its database
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("NANORUN_PROGRESS_BAR", "1")
    bypass_proxy_for_loopback(os.environ)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bypass_proxy_for_loopback(env) -> None:
    """The temporary Prefect server listens on 127.0.0.1 and Prefect's client (httpx) honours
    HTTP(S)_PROXY: with a proxy set and no NO_PROXY its health checks went to the proxy, and the run
    failed with "Timed out while attempting to connect to ephemeral Prefect API server". Loopback is
    added to both spellings of NO_PROXY (httpx reads either), keeping what is already there."""
    for key in ("NO_PROXY", "no_proxy"):
        have = [h.strip() for h in env.get(key, "").split(",") if h.strip()]
        env[key] = ",".join(have + [h for h in LOOPBACK if h not in have])


def _run_flow(flow, what: str, **params):
    """Run a flow; a failure the user cannot fix by editing the command becomes one RunFailed line
    (Prefect has already logged the traceback) that says how to resume."""
    import logging

    from cli.main import RunFailed, one_line, user_error_types
    from cli.console import tidy_console

    from artifacts.redact import seal

    _check_prefect_server()
    tidy_console(tracebacks=logging.getLogger("nanorun").isEnabledFor(logging.DEBUG))  # -v keeps them
    try:  # the server records parameters for everyone to see: credentials stay in this process
        return _run_interruptible(what, flow, seal(params))
    except Exception as e:
        if isinstance(e, user_error_types()):
            raise
        # one line of at most ~200 characters: the details (the failed step's last log lines, the
        # table of every step) are in the log above it
        hint = " -- run the same command again to resume"
        reason = f"{what} failed: {type(e).__name__}: {one_line(e)}"
        raise RunFailed((reason if len(reason) <= 200 - len(hint) else reason[:200 - len(hint) - 1] + "…") + hint) from e


def _check_prefect_server() -> None:
    """With PREFECT_API_URL set, the run is recorded on that server: when it does not answer, say so
    in one line (exit 2) instead of failing inside Prefect's client retries."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    from artifacts.errors import StoreError

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as e:
        raise StoreError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(e).__name__}): "
                         "start it (bash deploy/server.sh) or unset PREFECT_API_URL to run on a temporary "
                         "local server") from None


def all_cached(rows) -> bool:
    """Every step of the plan committed and verified: then the command answers from the store alone
    (saying so) instead of starting (and stopping) Prefect's temporary server for a run of cache hits.
    Callers ask only without PREFECT_API_URL: with a server configured the run is recorded on it."""
    if not all(r.status == "cached" for r in rows):
        return False
    print(f"all {len(rows)} steps are committed and verified: nothing to run (no Prefect run started; with "
          "PREFECT_API_URL set the run is recorded on that server)", file=sys.stderr)
    return True


def _print_refs(refs: dict[str, str]) -> None:
    width = max(map(len, refs))
    for name, ref in refs.items():
        print(f"{name.ljust(width)}  {ref}")


def _run_interruptible(what: str, flow, params: dict):
    """flow(**params) on a thread of its own, the main thread keeping the signals.

    On the main thread Prefect's flow engine takes SIGTERM for itself (a handler raising
    TerminationSignal there) while submitted tasks run on worker threads that no signal reaches:
    one TERM then waited for the running stage to end, and a process-group TERM, which also stops
    the temporary server, left the engine retrying its API calls for minutes. Here a signal sets
    stagekit.launch's shutdown flag (every supervised trainer stops within its grace period), the
    flow gets UNWIND_S to fail its tasks and release its leases, then the temporary server is
    stopped and the command exits; a watchdog makes sure of it at HARD_EXIT_S."""
    from stagekit.launch import request_shutdown, supervising

    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        return flow(**params)
    outcome: dict = {}
    received: list[tuple[int, float]] = []

    def body():
        try:
            outcome["value"] = flow(**params)
        except BaseException as e:  # handed to the main thread below
            outcome["error"] = e

    def on_signal(signum, frame):
        if received:  # a second signal: the user means it
            _exit_now(what, signum)
        received.append((signum, time.monotonic()))
        print(f"nanorun: {signal.Signals(signum).name}: stopping the run (again to stop at once)",
              file=sys.stderr, flush=True)
        request_shutdown()
        watchdog = threading.Timer(HARD_EXIT_S, _exit_now, (what, signum))
        watchdog.daemon = True  # it must not be what the interpreter waits for at exit
        watchdog.start()

    worker = threading.Thread(target=body, name="nanorun-flow", daemon=True)
    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    worker.start()
    guarded: dict[int, object] = {}  # server pid -> its guard process
    while worker.is_alive():
        worker.join(0.2)
        _guard_temporary_servers(guarded)
        since = time.monotonic() - received[0][1] if received else 0.0
        # the server died with the process group and the trainers are stopped: the flow thread
        # only retries its API calls now (its leases went with the stages' exceptions)
        if since > UNWIND_S or (since > 2.0 and _temporary_server_gone() and not supervising()):
            break
    if not received:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    signum = received[0][0]
    if worker.is_alive() or _temporary_server_gone():  # Prefect would retry its API calls for minutes
        _exit_now(what, signum)
    print(_interrupted_line(what, signum), file=sys.stderr, flush=True)
    # atexit: Prefect ships the run's last logs, then stops its temporary server; the watchdog
    # (a Timer thread) still runs meanwhile
    raise SystemExit(128 + signum)


def _interrupted_line(what: str, signum: int) -> str:
    return f"nanorun {what}: interrupted by {signal.Signals(signum).name}: {RESUME_HINT}"


def _temporary_servers() -> list:
    """The subprocesses of the temporary Prefect servers this process started."""
    server = sys.modules.get("prefect.server.api.server")
    instances = getattr(getattr(server, "SubprocessASGIServer", None), "_instances", {})
    return [i.server_process for i in list(instances.values()) if getattr(i, "server_process", None) is not None]


def _guard_temporary_servers(guarded: dict) -> None:
    """Start cli/server_guard.py for each temporary server not guarded yet: it stops the server if
    this process dies without stopping it (a SIGKILL runs no handler; one server ran 17 minutes)."""
    import subprocess

    for proc in _temporary_servers():
        if proc.pid not in guarded and proc.poll() is None:
            # its own session: a Ctrl-C to the terminal's process group must not stop the guard first
            guarded[proc.pid] = subprocess.Popen([sys.executable, "-m", "cli.server_guard", str(os.getpid()), str(proc.pid)],
                             stdin=subprocess.DEVNULL, start_new_session=True)


def _temporary_server_gone() -> bool:
    """A process-group signal stopped the temporary server too."""
    return any(proc.poll() is not None for proc in _temporary_servers())


def _stop_temporary_servers() -> None:
    """Stop them (atexit would, but a hard exit must not leave them running)."""
    for proc in _temporary_servers():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except Exception:
                proc.kill()


def _exit_now(what: str, signum: int) -> None:
    """The last resort: kill trainers and temporary servers, say how to resume, exit."""
    from stagekit.launch import kill_running

    kill_running()
    _stop_temporary_servers()
    print(_interrupted_line(what, signum), file=sys.stderr, flush=True)
    os._exit(128 + signum)


class Speedrun:
    @staticmethod
    def add_arguments(p):
        from pipeline.recipes import PRESETS

        p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="recipe (default cpu-demo)")
        p.add_argument("--depth", type=int, help="model depth (overrides the preset's)")
        p.add_argument("--data-source", help="data source for data_shards (e.g. chitchat, climbmix, a directory)")
        p.add_argument("--nproc", type=int, help="training processes per node")
        p.add_argument("--eval-bundle", help="CORE bundle: a local directory/zip or a URL")
        p.add_argument("--chat-data", help="directory of SFT / chat-eval files (identity conversations, GSM8K)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="STEP.FIELD=VALUE",
                       help="override one config field of one step (repeatable), e.g. base.num_iterations=50")
        p.add_argument("--force", action="append", default=[], metavar="STEP", help="rebuild this step (repeatable)")
        p.add_argument("--plan", action="store_true", help="print the plan (cached / will run / locked) and exit")
        p.add_argument("--json", action="store_true", help="with --plan: the compiled plan as JSON (each step's stage, "
                                                            "full config, inputs, artifact and status)")

    @staticmethod
    def run(args) -> int:
        from pipeline.recipes import check_force, parse_set, speedrun_plan

        overrides = parse_set(args.sets)
        kwargs = dict(depth=args.depth, data_source=args.data_source, nproc=args.nproc, eval_bundle=args.eval_bundle,
                      chat_data=args.chat_data)
        plan = speedrun_plan(args.preset, overrides, **kwargs)  # compiled once here: a bad value is one line, exit 2
        check_force(args.force, plan.names)
        if args.plan or not (args.force or os.environ.get("PREFECT_API_URL")):
            if _plan_answers(args, plan, args.force):
                return 0
        _prefect_env()
        from flows.speedrun import speedrun

        refs = _run_flow(speedrun, f"speedrun {args.preset}", preset=args.preset, store=args.store,
                         overrides=overrides, force=args.force, plan=plan.to_dict(), **kwargs)
        _print_refs(refs)
        return 0


def _plan_answers(args, plan, force: list[str]) -> bool:
    """--plan: print the plan (a table, or with --json the plan itself plus each step's status) and
    answer; without it, answer from the store alone when every step is committed."""
    import json

    from artifacts import open_store
    from pipeline.plan import format_plan, plan_rows

    rows = plan_rows(plan, open_store(args.store), force=force)
    if args.plan and args.json:
        data = plan.to_dict()
        for step, row in zip(data["steps"], rows):
            step.update(status=row.status, action=row.action)
        print(json.dumps(data, indent=1, default=str))
        return True
    if args.plan:
        print(format_plan(rows))
        return True
    if all_cached(rows):
        _print_refs({r.step: str(r.ref) for r in rows})
        return True
    return False


class Stage:
    @staticmethod
    def add_arguments(p):
        p.add_argument("name", help="stage name (data_shards, tokenizer, pretrain, ...), or with --recipe also a "
                                    "step name (base, base_eval, ...)")
        p.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=REF",
                       help="an upstream artifact: stage/label-fp, a fingerprint prefix or stage@alias")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                       help="a config field (repeatable); values parse as JSON when they can")
        p.add_argument("--preset", help="the stage's own preset (e.g. pretrain: tiny, cpu-demo, d20)")
        p.add_argument("--recipe", metavar="SPEEDRUN_PRESET",
                       help="build the step exactly as `nanorun speedrun --preset SPEEDRUN_PRESET` does (same "
                            "config, its upstream artifacts as inputs): a single-stage rerun hits the same fingerprint")
        p.add_argument("--eval-bundle", help="with --recipe: as `nanorun speedrun --eval-bundle`")
        p.add_argument("--chat-data", help="with --recipe: as `nanorun speedrun --chat-data`")
        p.add_argument("--force", action="store_true", help="rebuild even if committed")
        p.add_argument("--join", action="store_true", help="multi-node: run this node's share of the run node 0 "
                                                           "builds (pretrain, node_rank >= 1); commits nothing")
        p.add_argument("--plan", action="store_true", help="say cached / will run / locked and exit")
        p.add_argument("--json", action="store_true", help="with --plan: the compiled one-step plan as JSON")

    @staticmethod
    def run(args) -> int:
        from artifacts import open_store
        from pipeline.execute import load_stage
        from pipeline.plan import Step, compile_plan
        from pipeline.recipes import parse_set, stage_config
        from stages.base import ConfigError

        fields = parse_set([f"x.{s}" for s in args.sets]).get("x", {})
        if args.recipe and args.preset:
            raise ConfigError("--recipe and --preset both say where the config comes from: give one")
        store = open_store(args.store)
        if args.recipe:
            mod, cfg, refs = _recipe_step(args, fields, store)
        else:
            mod = load_stage(args.name)
            cfg = stage_config(mod, fields, args.preset)
            refs = {}
        for item in args.inputs:
            name, eq, ref = item.partition("=")
            if not eq or not name or not ref:
                raise ConfigError(f"--input {item!r}: expected NAME=REF, e.g. data=data_shards@latest")
            refs[name] = store.resolve(ref)
        plan = compile_plan([Step(mod.NAME, mod.NAME, cfg, refs)], {"stage": mod.NAME, "fields": fields})
        if args.plan and not args.json:
            from pipeline.plan import plan_rows

            (row,) = plan_rows(plan, store, force=[mod.NAME] if args.force else [])
            print(f"{row.ref}  {row.action}")
            return 0
        if args.plan:
            _plan_answers(args, plan, [mod.NAME] if args.force else [])
            return 0
        _prefect_env()
        from flows.speedrun import stage

        print(_run_flow(stage, f"stage {mod.NAME}", name=mod.NAME, config=fields, preset=args.preset,
                        inputs={k: str(v) for k, v in refs.items()}, store=args.store, force=args.force,
                        join=args.join, plan=plan.to_dict()))
        return 0


def _recipe_step(args, fields: dict, store):
    """(stage module, Config, input refs) of one step of a speedrun recipe, built exactly as the
    speedrun builds it (each config once); its inputs are the recipe's upstream artifacts, which must
    be in the store (optional ones that are not are left out, as the speedrun leaves them out)."""
    from pipeline.execute import load_stage
    from pipeline.plan import compile_plan, plan_rows
    from pipeline.recipes import SPEEDRUN_GRAPH, TOGGLED_STAGES, speedrun_steps
    from stages.base import ConfigError, optional_inputs

    matches = [n for n in SPEEDRUN_GRAPH if args.name in (n.name, n.stage)]
    if len(matches) != 1:
        names = ", ".join(f"{n.name} ({n.stage})" for n in SPEEDRUN_GRAPH)
        raise ConfigError(f"recipe {args.recipe} has {'no' if not matches else 'more than one'} step {args.name!r}; "
                          f"its steps: {names}")
    name = matches[0].name
    # a step the recipe leaves off (rl in cpu-demo) is on when it is the step asked for
    toggled = {"enabled": True} if name in TOGGLED_STAGES else {}
    steps = speedrun_steps(args.recipe, {name: {**toggled, **fields}}, eval_bundle=args.eval_bundle,
                           chat_data=args.chat_data)
    rows = {r.step: r for r in plan_rows(compile_plan(steps), store)}
    step = next(s for s in steps if s.name == name)
    mod = load_stage(step.stage)
    refs = {}
    for role, upstream in step.inputs.items():
        row = rows[upstream]
        if row.status == "cached":
            refs[role] = row.ref
        elif role not in optional_inputs(mod):
            raise ConfigError(f"step {step.name}: its input {role} ({row.ref}) is not committed in {store.url}: "
                              f"run `nanorun speedrun --preset {args.recipe}` (or that step) first, or pass --input")
    return mod, step.cfg, refs
