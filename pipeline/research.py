"""Research: candidates tried on small models and promoted only while they keep beating the baseline
at larger ones. No Prefect here (flows/research_flow.py runs it; `--plan` and the tests use it directly).

    nanorun research --preset tiny --depths 1 2 3 --seeds 1 2 3 \\
        --candidate lr=base.matrix_lr=0.4 --candidate code=git:my-branch [--keep 1] [--alpha 0.05]
    nanorun research --preset tiny --search base.matrix_lr=0.1,0.4 --search base.embedding_lr=1,6 --samples 3
    nanorun research --preset tiny --candidate lr=base.matrix_lr=0.4 --budget 0.5 --plan
    nanorun research --preset tiny --propose "python my_proposer.py" --rounds 2

    r = Research(recipe="tiny", depths=(1, 2, 3), seeds=(1, 2, 3), candidates=("lr=base.matrix_lr=0.4",))
    results = research(r, store="/tmp/store")      # the dict the research_report stage and a proposer read

The method, exactly (docs/research.md says why):
- A rung is a depth with the research's seeds. Every candidate of a round starts at the first rung;
  the baseline (the recipe + --set, the code of this checkout) runs at every rung someone reaches.
- At a rung, per candidate and metric (val_bpb: lower is better; core: higher), Welch's t-test of
  candidate vs baseline over the seeds gives a one-sided p that the candidate is better, and one that
  it is worse. With two metrics the candidate must be better on both (p_better = the larger p) and is
  worse if worse on either (p_worse = 2 x the smaller p, capped at 1). Both are Holm-corrected across
  the candidates tested at that rung in that round (stagekit.stats.holm).
- "better": Holm p_better < alpha; "worse": Holm p_worse < alpha; else "not significant". At most
  --keep of the better ones (smallest p, then largest effect) go up a rung; the others stop there.
- Verdicts: "holds at every depth tried" (better at every rung it ran: it reached the last rung, or
  was held back by --keep or the budget, said in its reason), "fails at dN" (worse than the baseline
  at dN, or a point of it failed to run at dN: the reason says which), "not significant at dN"
  (neither), "not run" (the budget did not reach its first rung). A failed point stops only its own
  candidate; failed baseline points stop the rung (no candidate can be judged there).
- Cost: each point's device-hours are estimated from its FLOPs (core/scaling.py's derive: FLOPs per
  token x tokens) over the store's measured FLOP/s (committed pretrain manifests of the same platform
  and dtype, median) plus their median start-up overhead; without any, a stated default. Cached points
  cost nothing. A rung that would take the spend past --budget is not started.
- Proposers: the built-in one adds the grid (or --samples random points of it, seed 0) over the
  --search fields to the first round; --propose CMD runs after each round with the results so far
  as JSON on stdin and prints one JSON object per line, {"candidate": "NAME=FORM"} in --candidate's
  forms; its candidates form the next round (at most --rounds proposer rounds; none printed: done).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shlex
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from pipeline.recipes import PRESETS as RECIPES
from pipeline.recipes import merge
from pipeline.sweep import Sweep, describe_overrides
from stages.base import ConfigError
from stagekit.stats import holm, one_sided_p, welch

METRICS = {"val_bpb": True, "core": False}  # metric -> lower is better
# depth ladders when --depths is not given: the CPU recipes' small models, else the GPU miniseries'
LADDERS = {"tiny": (1, 2, 3), "cpu-demo": (2, 4, 6)}
GPU_LADDER = (12, 16, 20)
# Cost without a measurement on this platform: FLOP/s per device and start-up seconds per point.
# CPU: a 2-core box trains the tiny models at ~1e10 FLOP/s after ~15 s of launch and evaluation;
# CUDA: an H100 at 40% of its 989 TFLOP/s bf16 peak, two minutes of launch and compile.
DEFAULT_FLOPS = {"cpu": 1e10, "cuda": 4e14}
DEFAULT_OVERHEAD_S = {"cpu": 15.0, "cuda": 120.0}
PROPOSER_TIMEOUT_S = 600


@dataclass(frozen=True)
class Research:
    name: str = "research"
    recipe: str = "tiny"                          # the speedrun preset (pipeline/recipes.py) of every point
    depths: tuple = ()                            # the rungs, smallest first; () = the recipe's ladder
    seeds: tuple = (1, 2, 3)                      # seeds per rung, every candidate and the baseline
    candidates: tuple = ()                        # "NAME=FORM" as --candidate (pipeline/candidates.py)
    metrics: tuple = ("val_bpb",)                 # val_bpb and/or core
    alpha: float = 0.05                           # one-sided, after Holm across a rung's candidates
    keep: int = 0                                 # at most this many promoted per rung; 0 = no limit
    budget: float | None = None                   # device-hours for the points this run builds
    overrides: dict = field(default_factory=dict)  # {step: {field: value}} for the baseline and everyone
    search: dict = field(default_factory=dict)    # built-in proposer: "step.field" -> values
    samples: int = 0                              # 0: the whole search grid; N: N random points of it
    propose: str = ""                             # a proposer command (JSON in, JSON lines out)
    rounds: int = 3                               # proposer rounds at most
    max_parallel: int = 1                         # points trained at once

    def __post_init__(self):
        where = f"research {self.name}"
        if self.recipe not in RECIPES:
            raise ConfigError(f"{where}: unknown recipe {self.recipe!r}; speedrun presets: {', '.join(RECIPES)}")
        depths = tuple(self.depths) or LADDERS.get(self.recipe, GPU_LADDER)
        if any(not isinstance(d, int) or d < 1 for d in depths) or list(depths) != sorted(set(depths)):
            raise ConfigError(f"{where}: depths must be distinct integers >= 1, smallest first, got {list(depths)}")
        object.__setattr__(self, "depths", depths)
        seeds = tuple(self.seeds)
        if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) for s in seeds):
            raise ConfigError(f"{where}: give at least 2 distinct integer seeds (--seeds 1 2 3): the test needs "
                              f"their spread, got {list(seeds)}")
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "candidates", tuple(self.candidates))
        metrics = tuple(self.metrics)
        if not metrics or set(metrics) - set(METRICS) or len(set(metrics)) != len(metrics):
            raise ConfigError(f"{where}: metrics are val_bpb and/or core, got {list(metrics)}")
        object.__setattr__(self, "metrics", metrics)
        if not 0 < self.alpha <= 0.25:
            raise ConfigError(f"{where}: alpha={self.alpha}: in (0, 0.25] (the intervals shown are 1 - 2 alpha)")
        if not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError(f"{where}: keep={self.keep}: an integer >= 0 (0: every significant candidate goes up)")
        if self.budget is not None and not self.budget > 0:
            raise ConfigError(f"{where}: budget={self.budget}: device-hours > 0")
        for key, values in self.search.items():
            step, dot, name = key.partition(".")
            if not dot or not step or not name or not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"{where}: search {key!r}: STEP.FIELD=V1,V2, e.g. base.matrix_lr=0.1,0.2")
        object.__setattr__(self, "search", {k: tuple(v) for k, v in self.search.items()})
        if not isinstance(self.samples, int) or self.samples < 0 or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ConfigError(f"{where}: samples and rounds are integers >= 0")
        if not isinstance(self.max_parallel, int) or self.max_parallel < 1:
            raise ConfigError(f"{where}: max_parallel must be an integer >= 1")
        if not self.candidates and not self.search and not self.propose:
            raise ConfigError(f"{where}: nothing to try: give --candidate NAME=FORM (repeatable), --search "
                              "STEP.FIELD=V1,V2 or --propose CMD")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **{k: list(getattr(self, k)) for k in ("depths", "seeds", "candidates",
                                                                                     "metrics")},
                "search": {k: list(v) for k, v in self.search.items()}}


# ---- candidates: given, searched, proposed --------------------------------------------------------------
def search_candidates(r: Research) -> list[str]:
    """The built-in proposer: one candidate per point of the grid over r.search (every point, or
    r.samples of them drawn with seed 0), named after what it sets, e.g. "matrix_lr-0.4"."""
    if not r.search:
        return []
    keys = list(r.search)
    combos = list(itertools.product(*r.search.values()))
    if r.samples and r.samples < len(combos):
        combos = random.Random(0).sample(combos, r.samples)
    out = []
    for combo in combos:
        name = "_".join(f"{k.partition('.')[2]}-{v}" for k, v in zip(keys, combo))
        name = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in name)  # a candidate name's letters
        out.append(f"{name}=" + ",".join(f"{k}={v}" for k, v in zip(keys, combo)))
    return out


def propose(cmd: str, results: dict) -> list[str]:
    """Run a proposer: the results so far as JSON on stdin; each stdout line a JSON object with the
    new candidate in --candidate's form, {"candidate": "NAME=FORM"} (blank lines are skipped)."""
    try:
        done = subprocess.run(shlex.split(cmd), input=json.dumps(results, default=str), capture_output=True,
                              text=True, timeout=PROPOSER_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"proposer {cmd!r} did not run: {e}") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-300:]
        raise ConfigError(f"proposer {cmd!r} exited {done.returncode}: {tail}")
    out = []
    for line in done.stdout.splitlines():
        if not line.strip():
            continue
        try:
            spec = json.loads(line)["candidate"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise ConfigError(f"proposer {cmd!r} printed {line[:120]!r}: each line must be "
                              '{"candidate": "NAME=FORM"}') from None
        if not isinstance(spec, str):
            raise ConfigError(f"proposer {cmd!r}: candidate {spec!r} is not a string")
        out.append(spec)
    return out


# ---- the points of one candidate at one rung ----------------------------------------------------------
def rung_sweep(r: Research, c, depth: int) -> Sweep:
    """Candidate c's points at one rung: the recipe + --set + its overrides at this depth, every seed."""
    return Sweep(f"{r.name}-{c.name}-d{depth}", recipe=r.recipe, grid={"depth": (depth,)}, seeds=r.seeds,
                 overrides=merge(r.overrides, c.overrides), core="core" in r.metrics, max_parallel=r.max_parallel)


def reproduce(r: Research, spec: str, depth: int) -> str:
    """The command that builds (or finds cached) candidate `spec`'s points at one rung with the
    baseline's beside them: a point with its rung's other seeds, as the test needs them."""
    sets = "".join(f" --set {shlex.quote(f'{s}.{k}={json.dumps(v)}')}" for s, kv in r.overrides.items()
                   for k, v in kv.items())
    metrics = "" if r.metrics == ("val_bpb",) else " --metrics " + " ".join(r.metrics)
    cand = f" --candidate {shlex.quote(spec)}"
    seeds = " ".join(map(str, r.seeds))
    return f"nanorun research --preset {r.recipe} --depths {depth} --seeds {seeds}{sets}{metrics}{cand}"


class CostModel:
    """Device-hours of a point from its FLOPs and what the store measured on the same platform."""

    def __init__(self, store):
        self.runs = []  # (platform, dtype, FLOP/s per device, overhead s)
        for m in store.list("pretrain") if store is not None else []:
            met, ident = m.metrics, m.identity
            world = met.get("world_size") or 1
            try:
                flops = met["flops_per_token"] * met["tokens"] / met["training_time_s"] / world
                overhead = max(0.0, met["wall_time_s"] - met["training_time_s"])
            except (KeyError, TypeError, ZeroDivisionError):
                continue
            self.runs.append((ident.get("platform"), ident.get("dtype"), flops, overhead))

    def rate(self, platform: str, dtype: str) -> tuple[float, float, str]:
        """(FLOP/s per device, overhead s, where they come from) for this platform and dtype."""
        same = [(f, o) for p, d, f, o in self.runs if p == platform and d == dtype]
        if same:
            return (statistics.median(f for f, _ in same), statistics.median(o for _, o in same),
                    f"measured: median of {len(same)} {platform} {dtype} run(s) in the store")
        kind = "cuda" if str(platform).startswith("cuda") else "cpu"
        return DEFAULT_FLOPS[kind], DEFAULT_OVERHEAD_S[kind], f"default for {kind} (no {platform} {dtype} run measured)"

    def point(self, cfg, vocab_size: int) -> tuple[float, float, str]:
        """(device-hours, training FLOPs, basis) of one pretrain step config."""
        from stages.pretrain import _plan

        plan = _plan(cfg, vocab_size)
        flops = plan.flops_per_token * plan.total_tokens
        rate, overhead, basis = self.rate(cfg.platform, cfg.dtype)
        world = cfg.world_size
        return (flops / (rate * world) + overhead) * world / 3600, flops, basis


def point_estimates(r: Research, c, depth: int, store, cost: CostModel, *, eval_bundle=None,
                    data_source=None) -> list[dict]:
    """Per point of c at this rung: {"point", "seed", "hours", "flops", "basis", "cached"}. Whether it
    is cached comes from its fingerprints under its own code (pipeline.candidates.plan_rows: a code
    candidate's are computed in its checkout); its FLOPs from the recipe, which code does not change."""
    from pipeline.candidates import plan_rows
    from pipeline.plan import plan_rows as step_rows
    from pipeline.sweep import sweep_steps

    sw = rung_sweep(r, c, depth)
    sp = sweep_steps(sw, eval_bundle=eval_bundle, data_source=data_source)
    steps = {s.name: s for s in sp.steps}
    if c.code:
        status = {row["step"]: row["status"] for row in plan_rows(c, sw, store=store.url, eval_bundle=eval_bundle,
                                                                   data_source=data_source)}
    else:  # this checkout's code: the steps just made are the ones point_rows runs
        status = {row.step: row.status for row in step_rows(sp.steps, store)}
    vocab = steps["tokenizer"].cfg.vocab_size
    out = []
    for p in sp.points:
        hours, flops, basis = cost.point(steps[p.pretrain].cfg, vocab)
        cached = all(status.get(n) == "cached" for n in (p.pretrain, p.core) if n)
        out.append({"point": p.key, "seed": p.seed, "hours": hours, "flops": flops, "basis": basis, "cached": cached,
                    "devices": steps[p.pretrain].cfg.world_size})
    return out


# ---- one rung's statistics ----------------------------------------------------------------------------
def _values(rows, metric):
    return [row[metric] for row in rows]


def _broken(rows, metrics) -> str | None:
    """Why these rows cannot be judged (a point failed, or a metric is missing), or None."""
    for row in rows:
        if row.get("status") != "ok":
            return f"point {row.get('point')} {row.get('status')}"
        missing = [m for m in metrics if row.get(m) is None]
        if missing:
            return f"point {row.get('point')} has no {' or '.join(missing)}"
    return None if rows else "no points"


def judge(r: Research, base_rows: list[dict], cand_rows: dict[str, list[dict]]) -> dict[str, dict]:
    """{candidate: {"decision": better|worse|not significant|failed|held back, "reason", "tests": {metric:
    Welch dict + p_better/p_worse}, "p_better", "p_worse", "p_better_holm", "p_worse_holm"}} at one rung."""
    out: dict[str, dict] = {}
    bad = _broken(base_rows, r.metrics)
    if bad:
        return {name: {"decision": "not significant", "reason": f"the baseline could not be judged: {bad}"}
                for name in cand_rows}
    judged = {}
    for name, rows in cand_rows.items():
        bad = _broken(rows, r.metrics)
        if bad:
            out[name] = {"decision": "failed", "reason": bad}
            continue
        tests = {}
        for m in r.metrics:
            w = welch(_values(base_rows, m), _values(rows, m), 1 - 2 * r.alpha)
            tests[m] = {**w.to_dict(), "p_better": one_sided_p(w, lower_is_better=METRICS[m]),
                        "p_worse": one_sided_p(w, lower_is_better=not METRICS[m])}
        judged[name] = {"tests": tests, "p_better": max(t["p_better"] for t in tests.values()),
                        "p_worse": min(1.0, len(tests) * min(t["p_worse"] for t in tests.values()))}
    names = list(judged)
    for key in ("p_better", "p_worse"):
        for name, adj in zip(names, holm([judged[n][key] for n in names])):
            judged[name][f"{key}_holm"] = adj
    for name, j in judged.items():
        if j["p_better_holm"] < r.alpha:
            j["decision"], j["reason"] = "better", f"better than the baseline (Holm p {j['p_better_holm']:.3g})"
        elif j["p_worse_holm"] < r.alpha:
            j["decision"], j["reason"] = "worse", f"worse than the baseline (Holm p {j['p_worse_holm']:.3g})"
        else:
            j["decision"] = "not significant"
            j["reason"] = f"Holm p {j['p_better_holm']:.3g} (better) / {j['p_worse_holm']:.3g} (worse) >= {r.alpha}"
    first = r.metrics[0]
    sign = 1 if METRICS[first] else -1
    better = sorted((n for n in names if judged[n]["decision"] == "better"),
                    key=lambda n: (judged[n]["p_better_holm"], sign * judged[n]["tests"][first]["diff"]))
    if r.keep:
        for n in better[r.keep:]:
            judged[n]["decision"] = "held back"
            judged[n]["reason"] = f"better, but --keep {r.keep} promoted {', '.join(better[:r.keep])}"
    return {**out, **judged}


# ---- the loop -----------------------------------------------------------------------------------------
def _default_runner(store: str, eval_bundle, data_source):
    def rows(c, sw):
        from pipeline.candidates import point_rows

        return point_rows(c, sw, store=store, eval_bundle=eval_bundle, data_source=data_source)
    return rows


class NotCached(Exception):
    """research(only_cached=True) met a point that would have to be built."""


def research(r: Research, *, store: str, eval_bundle: str | None = None, data_source: str | None = None,
             point_rows: Callable | None = None, log: Callable[[str], None] = print, only_cached: bool = False) -> dict:
    """Run the ladder for every candidate (and the proposers' rounds); returns the results dict (the
    research_report stage's config, a proposer's stdin). point_rows(candidate, sweep) -> point rows
    (pipeline.sweep.point_row dicts): pipeline.candidates.point_rows unless given (tests).
    only_cached: raise NotCached instead of building a point (the CLI answers a cached rerun so)."""
    from artifacts import open_store
    from pipeline.candidates import Candidate, parse_candidate

    st = open_store(store)
    run = point_rows or _default_runner(st.url, eval_bundle, data_source)
    cost = CostModel(st)
    baseline = Candidate(name="baseline", kind="baseline", overrides={}, source="")
    changes = describe_overrides(r.overrides) if r.overrides else ""
    res = {"research": {**r.to_dict(), "changes": changes}, "candidates": [], "rungs": [], "rows": [], "spent_hours": 0.0,
           "total_hours": 0.0, "stopped": None, "errors": [], "specs": {"baseline": ""}}
    base_rows: dict[int, list[dict]] = {}
    seen = res["specs"]
    # every given candidate is parsed (a bad one refused) before anything runs
    cands = _parse_all([*r.candidates, *search_candidates(r)], seen, parse_candidate)
    rnd, asked = 0, 0
    while True:
        if not cands:  # the proposer's turn: the first round too when nothing else was given
            if not r.propose or asked == r.rounds or res["stopped"]:
                break
            asked += 1
            try:
                cands = _parse_all(propose(r.propose, res), seen, parse_candidate)
            except ConfigError as e:
                res["errors"].append(str(e))
                break
            if not cands:
                break
        _ladder(r, rnd, cands, baseline, base_rows, run, st, cost, res, log, eval_bundle, data_source, only_cached)
        rnd, cands = rnd + 1, []
    return res


def _parse_all(specs, seen: dict, parse) -> list:
    """Candidates from their specs; seen: name -> spec as given (the reproducing command quotes it)."""
    out = []
    for spec in specs:
        c = parse(spec)
        if c.name in seen:
            raise ConfigError(f"research: candidate name {c.name!r} is used twice (or is the baseline's): "
                              "give each candidate its own name")
        seen[c.name] = spec
        out.append(c)
    return out


def _entry(res, c, rnd):
    e = {"name": c.name, "kind": c.kind, "spec": res["specs"][c.name], "changes": c.describe(), "round": rnd,
         "depths": [], "verdict": "not run", "reason": ""}
    res["candidates"].append(e)
    return e


def _ladder(r, rnd, cands, baseline, base_rows, run, st, cost, res, log, eval_bundle, data_source,
            only_cached) -> None:
    entries = {c.name: _entry(res, c, rnd) for c in cands}
    alive = list(cands)
    for i, depth in enumerate(r.depths):
        if not alive:
            return
        arms = ([] if depth in base_rows else [baseline]) + alive
        est, refused = {}, {}
        for c in arms:
            try:
                est[c.name] = point_estimates(r, c, depth, st, cost, eval_bundle=eval_bundle, data_source=data_source)
            except ConfigError as e:  # its config or its checkout cannot be made at this depth
                if c is baseline or not res["rungs"]:
                    raise  # before anything ran: the command is refused, one line
                refused[c.name] = str(e)
        for name, why in refused.items():  # stops only this candidate's line
            entries[name].update(verdict=f"fails at d{depth}", reason=f"its points cannot be planned: {why}")
            entries[name]["depths"].append(depth)
            log(f"  {name}: failed ({why})")
        alive = [c for c in alive if c.name not in refused]
        if not alive:
            return
        need = sum(p["hours"] for pts in est.values() for p in pts if not p["cached"])
        if r.budget is not None and res["spent_hours"] + need > r.budget:
            left = r.budget - res["spent_hours"]
            why = (f"budget: rung d{depth} needs ~{need:.3g} device-hours for its uncached points, "
                   f"{left:.3g} of {r.budget:g} left")
            if not res["rungs"]:
                raise ConfigError(f"research {r.name}: {why}; nothing was run: raise --budget, or use fewer "
                                  "candidates, seeds or depths (--plan shows the cost per rung)")
            res["stopped"] = why
            for c in alive:
                entries[c.name]["reason"] = why
            return
        if only_cached and not all(p["cached"] for pts in est.values() for p in pts):
            raise NotCached(f"rung d{depth} has points to build")
        log(f"research {r.name}: round {rnd} rung d{depth}: {', '.join(c.name for c in arms)} "
            f"(~{need:.3g} device-hours to build)")
        rung = {"round": rnd, "depth": depth, "candidates": [c.name for c in alive], "estimate_hours": need,
                "spent_hours": 0.0, "results": {}}
        if depth not in base_rows:
            # the baseline alone is no research: its points are reproduced beside the first candidate's
            base_rows[depth] = _run(r, run, baseline, depth, est["baseline"], rung, res, alive[0].name)
        rows = {c.name: _run(r, run, c, depth, est[c.name], rung, res, c.name) for c in alive}
        rung["results"] = judge(r, base_rows[depth], rows)
        res["rungs"].append(rung)
        promoted = []
        for c in alive:
            j, e = rung["results"][c.name], entries[c.name]
            e["depths"].append(depth)
            e["reason"] = j["reason"]
            if j["decision"] == "better":
                e["verdict"] = "holds at every depth tried"
                if i + 1 < len(r.depths):
                    promoted.append(c)
            elif j["decision"] == "held back":
                e["verdict"] = "holds at every depth tried"
            elif j["decision"] in ("worse", "failed"):
                e["verdict"] = f"fails at d{depth}"
            else:
                e["verdict"] = f"not significant at d{depth}"
            log(f"  {c.name}: {j['decision']} ({j['reason']})")
        alive = promoted


def _run(r, run, c, depth, estimates, rung, res, beside: str) -> list[dict]:
    """c's rows at this rung, each with its candidate, rung, cost and reproducing command (that of
    candidate `beside`); adds the measured device-hours of the points that were not cached to what
    this run spent."""
    rows = run(c, rung_sweep(r, c, depth))
    by_seed = {p["seed"]: p for p in estimates}
    out = []
    for row in rows:
        est = by_seed.get(row.get("seed"), {})
        wall = row.get("wall_time_s")
        hours = wall * est.get("devices", 1) / 3600 if wall is not None else est.get("hours", 0.0)
        row = {**row, "candidate": c.name, "rung": depth, "round": rung["round"], "cached": est.get("cached"),
               "hours": hours, "command": reproduce(r, res["specs"][beside], depth)}
        if not est.get("cached"):
            rung["spent_hours"] += hours
            res["spent_hours"] += hours
        res["total_hours"] += hours
        res["rows"].append(row)
        out.append(row)
    return out


# ---- the plan ---------------------------------------------------------------------------------------
def plan_research(r: Research, store, *, eval_bundle=None, data_source=None) -> dict:
    """What the ladder would cost if every candidate went up every rung (the most it can cost; the
    proposer's rounds are not known in advance): per rung the points, which are cached, the hours."""
    from pipeline.candidates import Candidate, parse_candidate

    cost = CostModel(store)
    cands = [Candidate(name="baseline", kind="baseline", overrides={}, source="")]
    cands += _parse_all([*r.candidates, *search_candidates(r)], {"baseline": ""}, parse_candidate)
    rungs = []
    for depth in r.depths:
        pts = {c.name: point_estimates(r, c, depth, store, cost, eval_bundle=eval_bundle, data_source=data_source)
               for c in cands}
        need = sum(p["hours"] for ps in pts.values() for p in ps if not p["cached"])
        rungs.append({"depth": depth, "points": pts, "hours": need})
    return {"research": r, "candidates": cands, "rungs": rungs, "hours": sum(x["hours"] for x in rungs)}


def format_plan(p: dict) -> str:
    r = p["research"]
    lines = [f"research {r.name}: recipe {r.recipe}, rungs {' -> '.join(f'd{d}' for d in r.depths)}, "
             f"seeds {' '.join(map(str, r.seeds))}, metrics {', '.join(r.metrics)}, alpha {r.alpha} (Holm), "
             f"keep {r.keep or 'all significant'}", "",
             f"{'RUNG':<6}{'CANDIDATE':<24}{'POINTS':<34}{'CACHED':<10}{'DEVICE-H':>10}  BASIS"]
    for rung in p["rungs"]:
        for c in p["candidates"]:
            pts = rung["points"][c.name]
            cached = [x["cached"] for x in pts]
            says = f"{sum(cached)}/{len(cached)}"
            hours = sum(x["hours"] for x in pts if not x["cached"])
            lines.append(f"d{rung['depth']:<5}{c.name[:23]:<24}{', '.join(x['point'] for x in pts)[:33]:<34}"
                         f"{says:<10}{hours:>10.4f}  {pts[0]['basis']}")
        lines.append(f"{'':<6}{'rung total (if every candidate gets here)':<68}{rung['hours']:>10.4f}")
    budget = "" if r.budget is None else f" of a {r.budget:g} device-hour budget"
    lines += ["", f"at most {p['hours']:.4f} device-hours to build{budget} (cached points cost nothing)"]
    if r.budget is not None and p["rungs"] and p["rungs"][0]["hours"] > r.budget:
        lines.append(f"refused as it stands: the first rung alone needs {p['rungs'][0]['hours']:.4f}")
    if r.propose:
        lines.append(f"then: proposer {r.propose!r}, up to {r.rounds} round(s) of new candidates (not costed here)")
    return "\n".join(lines)
