"""Sweeps and A/B comparisons as data: a grid over pretrain fields x seeds (x arms), turned into
ordinary pipeline Steps that share one data, tokenizer and CORE-bundle artifact. No Prefect here
(flows/sweep_flow.py runs the Steps; `--plan` and the tests use them directly).

    nanorun sweep --preset tiny --eval-bundle ../shared/data/eval_bundle     # 3 depths x 2 FLOP budgets, CPU
    nanorun sweep --preset scaling-laws --plan                              # runs/scaling_laws.sh (8 GPUs)
    nanorun sweep --preset miniseries --depths 12 14 16                     # runs/miniseries.sh
    nanorun sweep --preset tiny --depths 1 2 3 4                            # adds d4: only its points run
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --b base.matrix_lr=0.4

    sw = Sweep("mine", recipe="tiny", grid={"depth": (1, 2), "target_flops": (1e10,)}, seeds=(1, 2))
    plan = sweep_steps(sw)                    # plan.steps: Steps for pipeline.execute / the flow
    print(format_plan(plan_steps(plan.steps, store)))

Every point is a pretrain step (+ a core_eval step) of the speedrun recipe `recipe` with the
point's grid values, its seed and the arm's overrides: fingerprinted and cached like any other, so
a rerun builds only the points it has not seen. A grid over target_flops or
target_param_data_ratio clears the recipe's num_iterations (which would win over both, see
core/scaling.py) unless the overrides set it. Two points that name the same artifact are refused.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from pipeline.recipes import PRESETS as RECIPES
from pipeline.recipes import merge, speedrun_steps
from stages.base import ConfigError
from pipeline.execute import Step, artifact_ref

SHARED_STEPS = ("data", "tokenizer", "eval_bundle")
HORIZON_FIELDS = ("target_flops", "target_param_data_ratio")
_ABBREV = {"depth": "d", "target_flops": "F", "target_param_data_ratio": "r"}


@dataclass(frozen=True)
class Sweep:
    name: str
    recipe: str = "tiny"  # the speedrun preset (pipeline/recipes.py) every point starts from
    grid: dict = field(default_factory=dict)       # pretrain field -> values (an axis of the grid)
    seeds: tuple = ()                              # () = the recipe's seed
    overrides: dict = field(default_factory=dict)  # {step: {field: value}} on top of the recipe, every arm
    arms: dict = field(default_factory=dict)       # compare: {"A": {step: {...}}, "B": {...}}; {} = one arm
    core: bool = True                              # a core_eval step per point
    max_parallel: int = 1                          # points trained at once

    def __post_init__(self):
        from stages.pretrain import Config as Pretrain

        if self.recipe not in RECIPES:
            raise ConfigError(f"sweep {self.name}: unknown recipe {self.recipe!r}; speedrun presets: {', '.join(RECIPES)}")
        if not isinstance(self.grid, dict) or not self.grid:
            raise ConfigError(f"sweep {self.name}: the grid is empty; give at least one axis, e.g. depth=[10, 12]")
        kinds = {f.name: f.metadata.get("kind") for f in dataclasses.fields(Pretrain)}
        grid = {}
        for name, values in self.grid.items():
            if name == "seed":
                raise ConfigError(f"sweep {self.name}: seeds are their own axis: use seeds=[...] (--seeds), not grid.seed")
            if name not in kinds:
                raise ConfigError(f"sweep {self.name}: unknown grid field {name!r}: not a pretrain config field "
                                  f"(e.g. {', '.join(['depth', *HORIZON_FIELDS])})")
            if kinds[name] != "identity":
                raise ConfigError(f"sweep {self.name}: grid field {name!r} is a runtime field: it does not change the "
                                  "model, so every value would be the same point; set it with --set base.FIELD=V")
            values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            if not values:
                raise ConfigError(f"sweep {self.name}: grid axis {name!r} is empty")
            dup = sorted({str(v) for v in values if values.count(v) > 1})
            if dup:
                raise ConfigError(f"sweep {self.name}: duplicate points: {name} lists {', '.join(dup)} more than once")
            grid[name] = values
        object.__setattr__(self, "grid", grid)
        seeds = tuple(self.seeds)
        if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
            raise ConfigError(f"sweep {self.name}: seeds must be integers, got {list(seeds)}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"sweep {self.name}: duplicate points: a seed is listed twice in {list(seeds)}")
        object.__setattr__(self, "seeds", seeds)
        for arm, layer in self.arms.items():
            if not str(arm).isidentifier() or not isinstance(layer, dict):
                raise ConfigError(f"sweep {self.name}: arm {arm!r}: a name (letters, digits, _) with "
                                  "{step: {field: value}} overrides")
        if self.arms and len(self.arms) != 2:
            raise ConfigError(f"sweep {self.name}: a comparison has exactly two arms (A and B), got {list(self.arms)}")
        if not isinstance(self.max_parallel, int) or self.max_parallel < 1:
            raise ConfigError(f"sweep {self.name}: max_parallel must be an integer >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"sweep: unknown key(s) {unknown}; keys: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": {k: list(v) for k, v in self.grid.items()},
                "seeds": list(self.seeds)}

    @property
    def kind(self) -> str:
        return "compare" if self.arms else "sweep"


# The reference's two research scripts and a CPU sweep small enough for the tests.
PRESETS: dict[str, dict] = {
    # runs/scaling_laws.sh: 6 depths x 4 FLOP budgets on 8 GPUs, ~100M eval tokens, full CORE at the end
    "scaling-laws": dict(recipe="d20", grid={"depth": (10, 12, 14, 16, 18, 20),
                                             "target_flops": (1e18, 2.15e18, 4.64e18, 1e19)},
                         overrides={"data": {"train_shards": 1000},
                                    "base": {"eval_tokens": 100 * 524288, "core_metric_every": -1, "sample_every": -1}}),
    # runs/miniseries.sh: d12..d26 at the default tokens:params ratio, 8 GPUs (d26's device batch)
    "miniseries": dict(recipe="d26", grid={"depth": (12, 14, 16, 18, 20, 22, 24, 26), "target_param_data_ratio": (12.0,)},
                       overrides={"data": {"train_shards": 1000}, "base": {"core_metric_every": -1, "sample_every": -1}}),
    # 3 depths x 2 budgets of the `tiny` speedrun (chitchat, 1024-token vocab): ~10 s a point on a CPU.
    # Far below 1 token per parameter, so the smallest model wins every budget: it exercises the
    # machinery (points, cache, fits, plots), not the science.
    "tiny": dict(recipe="tiny", grid={"depth": (1, 2, 3), "target_flops": (1e10, 3e10)},
                 overrides={"base": {"save_every": -1}}, max_parallel=2),
}


def preset(preset_name: str, **changes) -> Sweep:
    """A preset's Sweep; `grid` axes replace the preset's, `overrides` layer on its own, other keys
    (name, seeds, arms, core, max_parallel) replace its values unless None."""
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown sweep preset {preset_name!r}; presets: {', '.join(PRESETS)}")
    spec = {"name": preset_name, **PRESETS[preset_name]}
    spec["grid"] = {**spec["grid"], **changes.pop("grid", {})}
    spec["overrides"] = merge(spec.get("overrides", {}), changes.pop("overrides", {}))
    return Sweep(**{**spec, **{k: v for k, v in changes.items() if v is not None}})


# ---- points and steps -------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float) and (abs(v) >= 1e5 or v.is_integer()):
        return f"{v:.3g}".replace("e+", "e") if abs(v) >= 1e5 else str(int(v))
    return str(v)


def point_key(arm: str, values: dict, seed: int | None) -> str:
    parts = [f"{_ABBREV.get(k, k + '=')}{_fmt(v)}" for k, v in values.items()]
    if seed is not None:
        parts.append(f"s{seed}")
    return "-".join(([arm] if arm else []) + parts)


@dataclass
class Point:
    key: str
    arm: str
    values: dict           # grid field -> value
    seed: int
    pretrain: str          # step names
    core: str | None


@dataclass
class SweepPlan:
    sweep: Sweep
    steps: list[Step]      # shared steps first, then every pretrain, then every core_eval
    points: list[Point]

    @property
    def shared(self) -> list[Step]:
        names = {p.pretrain for p in self.points} | {p.core for p in self.points}
        return [s for s in self.steps if s.name not in names]


def sweep_steps(sw: Sweep, *, eval_bundle: str | None = None, data_source: str | None = None,
                nproc: int | None = None) -> SweepPlan:
    """The sweep's Steps: shared artifacts once (per arm only where an arm changes them), then one
    pretrain (+ core_eval) step per point. Refuses two points that would be the same artifact."""
    shared: list[Step] = []
    shared_by_fp: dict[str, str] = {}
    pretrains, cores, points = [], [], []
    seen: dict[str, str] = {}
    for arm, arm_layer in (sw.arms.items() if sw.arms else [("", {})]):
        layer = merge(sw.overrides, arm_layer)
        try:
            rec = {s.name: s for s in speedrun_steps(sw.recipe, layer, eval_bundle=eval_bundle,
                                                     data_source=data_source, nproc=nproc)}
        except ConfigError as e:
            raise ConfigError(f"sweep {sw.name}{f' arm {arm}' if arm else ''}: {e}") from None
        names, refs = {}, {}  # recipe step -> sweep step name / ArtifactRef
        for nm in SHARED_STEPS:
            if nm == "eval_bundle" and not sw.core and "eval_bundle" not in rec["base"].inputs:
                continue
            s = rec[nm]
            refs[nm] = artifact_ref(s.stage, s.cfg, {k: refs[v] for k, v in s.inputs.items()})
            if refs[nm].fingerprint not in shared_by_fp:
                name = nm if not any(x.name == nm for x in shared) else f"{nm}-{arm}"
                shared.append(Step(name, s.stage, s.cfg, {k: names[v] for k, v in s.inputs.items()}, s.optional))
                shared_by_fp[refs[nm].fingerprint] = name
            names[nm] = shared_by_fp[refs[nm].fingerprint]
        base = rec["base"]
        reset = {}
        if set(sw.grid) & set(HORIZON_FIELDS) and "num_iterations" not in {**sw.grid, **layer.get("base", {})}:
            reset["num_iterations"] = -1  # it would win over target_flops / the ratio
        if "target_param_data_ratio" in sw.grid and "target_flops" not in {**sw.grid, **layer.get("base", {})}:
            reset["target_flops"] = -1.0
        fixed = layer.get("base", {}).get("num_iterations", -1)
        if reset.get("num_iterations") is None and fixed > 0 and set(sw.grid) & set(HORIZON_FIELDS):
            raise ConfigError(f"sweep {sw.name}: duplicate points: num_iterations={fixed} wins over "
                              f"{' and '.join(sorted(set(sw.grid) & set(HORIZON_FIELDS)))}, so every value on that axis "
                              "trains the same model; drop base.num_iterations")
        for combo in itertools.product(*sw.grid.values(), *([sw.seeds] if sw.seeds else [])):
            values = dict(zip(sw.grid, combo))
            seed = combo[-1] if sw.seeds else base.cfg.seed
            key = point_key(arm, values, seed)
            try:
                cfg = dataclasses.replace(base.cfg, **reset, **values, seed=seed)
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"sweep {sw.name}: point {key}: {e}") from None
            inputs = {k: names[v] for k, v in base.inputs.items()}
            ref = artifact_ref("pretrain", cfg, {k: refs[v] for k, v in base.inputs.items()})
            if ref.fingerprint in seen:
                raise ConfigError(f"sweep {sw.name}: duplicate points: {seen[ref.fingerprint]} and {key} are the same "
                                  f"pretrain artifact {ref} (does the recipe fix num_iterations, or an arm change nothing?)")
            seen[ref.fingerprint] = key
            point = Point(key, arm, values, seed, f"pretrain {key}", f"core {key}" if sw.core else None)
            pretrains.append(Step(point.pretrain, "pretrain", cfg, inputs))
            if sw.core:
                cores.append(Step(point.core, "core_eval", rec["base_eval"].cfg,
                                  {"model": point.pretrain, "tokenizer": names["tokenizer"],
                                   "bundle": names["eval_bundle"]}))
            points.append(point)
    return SweepPlan(sw, shared + pretrains + cores, points)


# ---- results: one row per point -------------------------------------------------------------------
COLUMNS = ("point", "arm", "depth", "seed", "target_flops", "ratio", "model_dim", "params", "scaling_params",
           "iterations", "batch_tokens", "tokens", "flops", "tokens_per_param", "val_bpb", "core",
           "training_time_s", "wall_time_s", "status", "pretrain", "core_eval")


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def point_row(point: Point, pretrain=None, core=None, error: str | None = None) -> dict:
    """One results row from a point's manifests (None when not built) and the error that stopped it."""
    cfg = None
    m = pretrain.metrics if pretrain is not None else {}
    if pretrain is not None:
        cfg = pretrain.identity
    flops = (m.get("flops_per_token") or 0) * (m.get("tokens") or 0) or None
    scaling = m.get("num_scaling_params")
    depth = point.values.get("depth", (cfg or {}).get("depth"))
    aspect, head = (cfg or {}).get("aspect_ratio"), (cfg or {}).get("head_dim")
    row = {
        "point": point.key, "arm": point.arm, "depth": depth, "seed": point.seed,
        "target_flops": _num(point.values.get("target_flops", (cfg or {}).get("target_flops"))),
        "ratio": _num(point.values.get("target_param_data_ratio", (cfg or {}).get("target_param_data_ratio"))),
        "model_dim": -(-depth * aspect // head) * head if depth and aspect and head else None,
        "params": m.get("num_params"), "scaling_params": scaling, "iterations": m.get("iterations"),
        "batch_tokens": m.get("total_batch_size"), "tokens": m.get("tokens"), "flops": _num(flops),
        "tokens_per_param": round(m["tokens"] / scaling, 4) if scaling and m.get("tokens") else None,
        "val_bpb": _num(m.get("final_val_bpb")), "core": _num(core.metrics.get("core")) if core is not None else None,
        "training_time_s": _num(m.get("training_time_s")), "wall_time_s": _num(m.get("wall_time_s")),
        "status": "ok" if error is None else f"failed: {' '.join(str(error).split())[:300]}",
        "pretrain": str(pretrain.ref) if pretrain is not None else None,
        "core_eval": str(core.ref) if core is not None else None,
    }
    if row["target_flops"] is not None and row["target_flops"] <= 0:
        row["target_flops"] = None
    # other grid axes get a column each; `cell` names the grid point without arm and seed (A/B pairs)
    extra = {k: v for k, v in point.values.items() if k not in ("depth", "target_flops", "target_param_data_ratio")}
    return {**row, **extra, "cell": point_key("", point.values, None)}


def sweep_rows(plan: SweepPlan, outcomes: dict) -> tuple[list[dict], dict[str, str]]:
    """One row per point from the walked steps' outcomes (pipeline.execute.walk), and {point: error}
    of the failed ones. A core_eval step "not run" for want of a bundle is no error: CORE is optional."""
    rows, errors = [], {}
    for p in plan.points:
        pre, core = outcomes[p.pretrain], outcomes.get(p.core)
        if pre.manifest is None:
            errors[p.key] = pre.detail or pre.status
        elif core is not None and core.status == "failed":
            errors[p.key] = f"CORE failed: {core.detail}"
        rows.append(point_row(p, pre.manifest, core.manifest if core else None, errors.get(p.key)))
    return rows, errors


def describe_overrides(layer: dict) -> str:
    """{step: {field: value}} as the command line writes it: "base.matrix_lr=0.02, sft.seed=1"."""
    return ", ".join(f"{step}.{k}={v}" for step, fields in layer.items() for k, v in fields.items()) or "no overrides"


def report_config(sw: Sweep, rows: list[dict]) -> dict:
    """The sweep_report stage's config for these rows (stages/sweep_report.py); a comparison's arms
    with what each changes (on top of recipe {sw.recipe} and the sweep's own overrides)."""
    arms = [(arm, describe_overrides(layer)) for arm, layer in sw.arms.items()]
    return {"name": sw.name, "kind": sw.kind, "rows": rows, **({"arms": arms} if arms else {})}
