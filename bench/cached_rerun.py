"""How much a fully cached speedrun rerun costs over an empty Prefect flow run, side by side.

    python -m bench.cached_rerun                    # builds the tiny speedrun once, then measures
    python -m bench.cached_rerun --store DIR --preset cpu-demo --repeat 7

Both flows run in this process against the same Prefect API (the temporary local server unless
PREFECT_API_URL is set), alternating, after one warm-up each. The target: the cached
speedrun costs < 2 s more than the empty flow, and launches no subprocess. Then the CLI as a user
runs it, a fresh process each time: a fully cached `nanorun speedrun` <= 5 s (decided from the plan,
no Prefect server started), `--plan` <= 3 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="a store holding the finished speedrun (default: build the tiny one in a temp dir)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--eval-bundle", default=str(REPO.parent / "shared" / "data" / "eval_bundle"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="nanorun-bench-"))
    os.environ.setdefault("NANORUN_HOME", str(tmp / "home"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("WANDB_MODE", "disabled")

    from prefect import flow

    from artifacts import open_store
    from pipeline.recipes import speedrun_steps
    from flows.speedrun import speedrun
    from pipeline.plan import run_pipeline

    store = open_store(args.store or str(tmp / "store"))
    kwargs = dict(preset=args.preset, store=store.url, eval_bundle=args.eval_bundle)
    if not args.store:
        print(f"building the {args.preset} speedrun in {store.url} (once) ...", flush=True)
        t0 = time.time()
        run_pipeline(speedrun_steps(args.preset, eval_bundle=args.eval_bundle), store)
        print(f"built in {time.time() - t0:.0f} s", flush=True)

    @flow(name="empty")
    def empty() -> None:
        return None

    launched = []
    real_popen = subprocess.Popen

    def spy(*a, **kw):
        cmd = kw.get("args", a[0] if a else "")
        launched.append(" ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd))
        return real_popen(*a, **kw)

    subprocess.Popen = spy
    empty()  # warm-up: starts the temporary server, imports, first-run caches
    speedrun(**kwargs)  # warm-up: leaves Prefect's cache records, so every later run is all Cached
    warm = len(launched)
    times = {"empty flow": [], "cached speedrun": []}
    for _ in range(args.repeat):
        for name, fn in (("empty flow", lambda: empty()), ("cached speedrun", lambda: speedrun(**kwargs))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    subprocess.Popen = real_popen
    stage_procs = [c for c in launched[warm:] if any(m in c for m in ("torch.distributed.run", "core.train", "stages."))]

    print(f"\n{'flow run':<18} {'median s':>9} {'min s':>7} {'max s':>7}   (n={args.repeat}, alternating)")
    for name, ts in times.items():
        print(f"{name:<18} {statistics.median(ts):>9.2f} {min(ts):>7.2f} {max(ts):>7.2f}")
    extra = statistics.median(times["cached speedrun"]) - statistics.median(times["empty flow"])
    ok = extra < 2.0 and not stage_procs
    print(f"\ncached speedrun - empty flow: {extra:+.2f} s (target < 2 s); stage subprocesses launched: "
          f"{len(stage_procs)}  -> {'OK' if ok else 'MISSED'}")

    # What a user waits for: the whole `nanorun` process, fresh each time, no PREFECT_API_URL. A
    # fully cached speedrun is decided from the plan and starts no Prefect server.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base = [sys.executable, "-m", "cli.main", "--store", store.url, "speedrun", "--preset", args.preset,
            "--eval-bundle", args.eval_bundle]
    print(f"\n{'nanorun command':<32} {'median s':>9} {'min s':>7} {'max s':>7} {'target':>8}")
    for label, cmd, target in (("speedrun (fully cached)", base, 5.0), ("speedrun --plan", base + ["--plan"], 3.0)):
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        ok = ok and med <= target
        print(f"{label:<32} {med:>9.2f} {min(ts):>7.2f} {max(ts):>7.2f} {'<= ' + str(target):>8}  "
              f"{'OK' if med <= target else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
