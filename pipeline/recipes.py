"""Speedrun recipes as data: the stage graph, the presets, and overrides -> a compiled Plan.

No Prefect here: `nanorun speedrun --plan` compiles the plan the flow then receives (a run started
from the UI compiles it inside the flow, once).

    plan = speedrun_plan("cpu-demo", {"base": {"num_iterations": 50}}, eval_bundle="../shared/data/eval_bundle",
                         chat_data="../shared/data/chat")   # configs built and resolved once, refs computed
    print(format_plan(plan_rows(plan, store)))

A preset maps each step of the graph to config overrides for that step's stage. Overrides given by
the user are layered on top, as {step: {field: value}} (the CLI spells them `--set base.depth=6`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from artifacts.manifest import ArtifactRef
from pipeline.execute import load_stage
from pipeline.plan import Plan, Step, compile_plan
from stages.base import ConfigError


# The speedrun: data -> tokenizer -> pretrain -> CORE (base) -> SFT -> [RL] -> chat eval -> export -> report.
# The CORE bundle has no upstream, so the flow fetches it while the tokenizer and pretraining run.
# The bundle is optional evidence: offline, with no --eval-bundle, its fetch fails, CORE is "not run
# (needs eval_bundle)", the stages that take it as an optional input run without it, and the run
# still succeeds; a rerun with the bundle runs exactly what it adds. The graph's steps carry no
# config: speedrun_steps() fills it in from the preset and the overrides.
SPEEDRUN_GRAPH: list[Step] = [
    Step("data", "data_shards"),
    Step("tokenizer", "tokenizer", inputs={"data": "data"}),
    Step("eval_bundle", "eval_bundle", optional=True),
    # eval_bundle: only when the pretrain config scores CORE during training (core_metric_every > 0)
    Step("base", "pretrain", inputs={"data": "data", "tokenizer": "tokenizer", "eval_bundle": "eval_bundle"}),
    Step("base_eval", "core_eval", inputs={"model": "base", "tokenizer": "tokenizer", "bundle": "eval_bundle"}),
    Step("sft", "sft", inputs={"base": "base", "tokenizer": "tokenizer"}),
    # optional (a step with `enabled` off is dropped, see speedrun_steps): when on, chat_eval and
    # export take its model instead of the sft one
    Step("rl", "rl", inputs={"base": "sft", "tokenizer": "tokenizer"}),
    Step("chat_eval", "chat_eval", inputs={"model": "sft", "tokenizer": "tokenizer", "eval_bundle": "eval_bundle"}),
    Step("export", "export", inputs={"model": "sft", "tokenizer": "tokenizer", "base": "base",
                                     "base_eval": "base_eval", "chat_eval": "chat_eval"}),
    Step("report", "report", inputs={"base": "base", "data": "data", "tokenizer": "tokenizer",
                                     "eval_bundle": "eval_bundle", "base_eval": "base_eval", "sft": "sft",
                                     "rl": "rl", "chat_eval": "chat_eval", "export": "export"}),
]

_GPU = {"base_eval": {"preset": "gpu"}, "chat_eval": {"preset": "reference"}}
# Steps that a preset or `--set STEP.enabled=true|false` turns on or off (default: off).
TOGGLED_STAGES = ("rl",)
PRESETS: dict[str, dict[str, dict]] = {
    # The offline demo: PyPI's chitchat corpus, a small vocabulary, a d4 model, minutes on 2 cores.
    "cpu-demo": {
        "data": {"source": "chitchat"},
        "tokenizer": {"vocab_size": 8192},
        "base": {"preset": "cpu-demo"},
        "base_eval": {"preset": "cpu-demo"},
        "sft": {"preset": "cpu-demo"},
        "rl": {"preset": "cpu-demo"},  # off: --set rl.enabled=true adds a few minutes of RL
        "chat_eval": {"preset": "cpu-demo"},
    },
    # Seconds on a CPU: what the end-to-end tests run.
    "tiny": {
        "data": {"source": "chitchat", "val_docs": 256},
        "tokenizer": {"vocab_size": 1024, "max_chars": 2_000_000},
        "base": {"preset": "tiny"},
        "base_eval": {"preset": "tiny"},
        "sft": {"preset": "tiny"},
        "rl": {"preset": "tiny"},
        "chat_eval": {"preset": "tiny"},
    },
    # The reference GPU recipes (8 GPUs; stage presets carry batch sizes and cadences).
    "d12": {"data": {"source": "climbmix", "train_shards": 240}, "base": {"preset": "d12"},
            "sft": {"preset": "d12"}, "rl": {"preset": "d12", "enabled": True}, **_GPU},
    "d20": {"data": {"source": "climbmix", "train_shards": 240}, "base": {"preset": "d20"},
            "sft": {"preset": "d20"}, "rl": {"preset": "d20", "enabled": True}, **_GPU},
    "d24-speedrun": {"data": {"source": "climbmix", "train_shards": 170}, "base": {"preset": "d24-speedrun"},
                     "sft": {"preset": "d24"}, "rl": {"preset": "d24", "enabled": True}, **_GPU},
    "d26": {"data": {"source": "climbmix", "train_shards": 370}, "base": {"preset": "d26"},
            "sft": {"preset": "d26"}, "rl": {"preset": "d26", "enabled": True}, **_GPU},
}


def parse_set(items: list[str]) -> dict[str, dict]:
    """`step.field=value` strings -> {step: {field: value}}; values parse as JSON when they can."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        step, dot, name = key.partition(".")
        if not eq or not dot or not step or not name:
            raise ConfigError(f"--set {item!r}: expected STEP.FIELD=VALUE, e.g. base.num_iterations=50")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        out.setdefault(step, {})[name] = value
    return out


def check_force(force: list[str] | None, names: list[str]) -> None:
    """force names steps of the plan: a typo is one line (the CLI: exit 2, before any server starts)."""
    unknown = [f for f in force or [] if f not in names]
    if unknown:
        raise ConfigError(f"--force {' '.join(unknown)}: not a step of this run; its steps: {', '.join(names)}")


def merge(*layers: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for layer in layers:
        for step, fields in (layer or {}).items():
            out.setdefault(step, {}).update(fields)
    return out


def _config(node: Step, fields: dict):
    mod = load_stage(node.stage)
    fields = dict(fields)
    stage_preset = fields.pop("preset", None)
    try:  # resolved here, once: the plan and every runner take the digests from this config
        if stage_preset is not None:
            return mod.Config.from_preset(stage_preset, **fields)
        return mod.Config.from_dict(fields).resolve()
    except ConfigError as e:
        raise ConfigError(f"step {node.name!r}: {e}") from None


def speedrun_steps(preset: str = "cpu-demo", overrides: dict[str, dict] | None = None, *,
                   depth: int | None = None, data_source: str | None = None, nproc: int | None = None,
                   eval_bundle: str | None = None, chat_data: str | None = None,
                   graph: list[Step] | None = None) -> list[Step]:
    """The speedrun pipeline for a preset plus overrides, validated (ConfigError names the step).

    eval_bundle / chat_data default to the project's settings (pipeline/settings.py: nanorun.toml, then
    $NANORUN_EVAL_BUNDLE / $NANORUN_CHAT_DATA): the CLI and a worker's flow runs (the scheduled
    nightly one included) read the same file, so the same recipe plans the same fingerprints."""
    from pipeline import settings

    eval_bundle = settings.value("eval_bundle", eval_bundle)
    chat_data = settings.value("chat_data", chat_data)
    if preset not in PRESETS:
        raise ConfigError(f"unknown speedrun preset {preset!r}; presets: {', '.join(PRESETS)}")
    graph = graph or SPEEDRUN_GRAPH
    names = [n.name for n in graph]
    shortcuts: dict[str, dict] = {}
    if depth is not None:
        shortcuts.setdefault("base", {})["depth"] = int(depth)
    if data_source:
        shortcuts.setdefault("data", {})["source"] = data_source
    if nproc is not None:
        for n in graph:
            if n.stage in ("pretrain", "sft", "rl"):
                shortcuts.setdefault(n.name, {})["nproc"] = int(nproc)
    if eval_bundle:
        key = "url" if eval_bundle.startswith(("http://", "https://", "s3://")) else "local_path"
        shortcuts.setdefault("eval_bundle", {})[key] = str(Path(eval_bundle).expanduser()) if key == "local_path" else eval_bundle
    if chat_data:  # the directory of SFT / chat-eval files (identity conversations, GSM8K, ...)
        for n in graph:
            if n.stage in ("sft", "rl", "chat_eval"):
                shortcuts.setdefault(n.name, {})["data_dir"] = str(Path(chat_data).expanduser())
    for n in graph:  # the report names the recipe it reports on
        if n.stage == "report":
            shortcuts.setdefault(n.name, {})["recipe"] = preset
    layers = merge(PRESETS[preset], shortcuts, overrides or {})
    unknown = sorted(set(layers) - set(names))
    if unknown:
        raise ConfigError(f"overrides name unknown step(s) {unknown}; the speedrun's steps are {', '.join(names)}")
    graph = _toggle(graph, layers)
    steps = []
    for n in graph:
        cfg = _config(n, layers.get(n.name, {}))
        inputs = dict(n.inputs)
        if n.stage == "pretrain" and cfg.core_metric_every <= 0:
            # an optional input is hashed when given: don't tie the model to a bundle it never reads
            inputs.pop("eval_bundle", None)
        steps.append(dataclasses.replace(n, cfg=cfg, inputs=inputs))
    return steps


def speedrun_plan(preset: str = "cpu-demo", overrides: dict[str, dict] | None = None, **recipe) -> Plan:
    """The speedrun recipe compiled once (speedrun_steps' arguments): what the CLI prints with
    --plan, what the flow receives, what every task runs from."""
    steps = speedrun_steps(preset, overrides, **recipe)
    given = {k: v for k, v in recipe.items() if v is not None}
    return compile_plan(steps, {"preset": preset, "overrides": overrides or {}, **given})


def stage_config(mod, fields: dict, preset: str | None):
    """A stage's Config from its own preset plus fields (or the fields alone), validated and resolved."""
    return mod.Config.from_preset(preset, **fields) if preset else mod.Config.from_dict(fields).resolve()


def stage_plan(stage: str, fields: dict | None, preset: str | None, inputs: dict[str, ArtifactRef]) -> Plan:
    """One stage with explicit inputs (`nanorun stage`), as a one-step plan: its config from the
    stage's own preset plus fields (or the fields alone), validated and resolved here, once."""
    mod, fields = load_stage(stage), dict(fields or {})
    return compile_plan([Step(mod.NAME, mod.NAME, stage_config(mod, fields, preset), dict(inputs))],
                        {"stage": mod.NAME, **({"preset": preset} if preset else {}), "fields": fields})


def _toggle(graph: list[Step], layers: dict[str, dict]) -> list[Step]:
    """The graph without the toggled steps that are off (and the inputs naming them); a step that is
    on stands in for its `base` as the `model` of the steps after it (rl: chat_eval and export
    evaluate and ship the RL model). Pops `enabled` from the layers (it is not a stage field)."""
    off, replaces = set(), {}
    for n in graph:
        if n.stage not in TOGGLED_STAGES:
            continue
        on = layers.get(n.name, {}).pop("enabled", False)
        if not isinstance(on, bool):
            raise ConfigError(f"{n.name}.enabled={on!r}: expected true or false")
        if on:
            replaces[n.inputs["base"]] = n.name
        else:
            off.add(n.name)
    out = []
    for n in graph:
        if n.name in off:
            continue
        inputs = {role: src for role, src in n.inputs.items() if src not in off}
        if "model" in inputs:
            inputs["model"] = replaces.get(inputs["model"], inputs["model"])
        out.append(dataclasses.replace(n, inputs=inputs))
    return out
