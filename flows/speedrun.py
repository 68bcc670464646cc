"""Prefect flows: the speedrun and the single-stage (re)run. They only compose stages.

    nanorun speedrun --preset cpu-demo [--depth 6] [--set base.num_iterations=50] [--plan]
    nanorun stage tokenizer --input data=data_shards@latest --set vocab_size=4096 [--force]

Rerunning a flow with the same parameters (the UI's Retry, `prefect flow-run retry`, or the same
command again) skips every committed stage — each shows as Cached — and the stage that failed
resumes from what its work dir holds (pretraining: its last checkpoint). Stages with no path
between them run concurrently (the CORE bundle is fetched while the tokenizer trains).
"""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from artifacts import open_store
from artifacts.manifest import ArtifactRef
from artifacts.redact import seal, unseal
from flows.multinode import across_nodes
from flows.tasks import join_stage, run_stage
from pipeline import settings
from pipeline.plan import Plan, PlanStep, check_outcomes, format_outcomes, walk
from pipeline.recipes import PRESETS, check_force, speedrun_plan, stage_plan


# the UI's run form shows a dropdown of the known recipes (a typed parameter, checked before the run)
Preset = Literal[tuple(PRESETS)]


@flow(name="speedrun", log_prints=True, validate_parameters=True)
def speedrun(preset: Preset = "cpu-demo", store: str | None = None, depth: int | None = None,
             data_source: str | None = None, nproc: int | None = None, eval_bundle: str | None = None,
             chat_data: str | None = None, overrides: dict[str, dict] | None = None,
             force: list[str] | None = None, plan: dict | None = None) -> dict[str, str]:
    """The whole speedrun for a preset; returns {step: artifact ref} of the steps that have one.

    Every step whose inputs are available runs, even after another step failed; the run log ends
    with one table (committed / cached / failed / skipped / not run) and the flow fails if a step did.

    Args:
        preset: the recipe: cpu-demo (d4, minutes on 2 CPU cores), tiny (seconds, tests), d12, d20,
            d24-speedrun, d26 (8 GPUs).
        store: artifact store, a directory or s3://bucket/prefix (default: the settings' store,
            pipeline/settings.py: nanorun.toml, $NANORUN_STORE, else the local root $NANORUN_HOME).
        depth: model depth, overriding the preset's.
        data_source: data source for the data step (climbmix, fineweb-edu, chitchat, a directory).
        nproc: training processes per node.
        eval_bundle: the CORE bundle, a local directory/zip or a URL (default: the settings' eval_bundle,
            else its public URL; when it cannot be had, CORE is skipped and the run still succeeds).
        chat_data: directory of SFT / chat-eval files (identity conversations, GSM8K jsonl; default:
            the settings' chat_data).
        overrides: config fields per step, {step: {field: value}}, e.g. {"base": {"num_iterations": 50}}.
        force: step names to rebuild even if committed (data, tokenizer, base, sft, ...).
        plan: the compiled plan (pipeline/plan.py; `nanorun speedrun` passes the one it planned, and
            the recipe fields above are then only its label). Without it (a run from the UI or a
            schedule) the recipe is compiled here, once.
    """
    logger = get_run_logger()
    store, plan = unseal((store, plan))
    if plan is None:
        data_source, eval_bundle, chat_data, overrides = unseal((data_source, eval_bundle, chat_data, overrides))
        compiled = speedrun_plan(preset, overrides, depth=depth, data_source=data_source, nproc=nproc,
                                 eval_bundle=eval_bundle, chat_data=chat_data)
    else:
        compiled = Plan.from_dict(plan)
    force = list(force or [])
    check_force(force, compiled.names)
    store_url = open_store(settings.value("store", store)).url  # fail fast, with the store named, if unusable
    logger.info("speedrun %s -> %s: %s", preset, store_url, " -> ".join(compiled.names))
    outcomes = walk(compiled, prefect_step(compiled, store_url, force), on_outcome=lambda o: log_outcome(logger, o),
                    store=open_store(store_url))
    logger.info("speedrun %s:\n%s", preset, format_outcomes(outcomes))
    refs = {name: str(o.ref) for name, o in outcomes.items() if o.ref is not None}
    if "report" in refs:
        publish_report(refs, store_url, preset)
    check_outcomes(outcomes)
    return refs


def prefect_step(plan: Plan, store_url: str, force: list[str]):
    """walk()'s run_step for a flow: each step is a run_stage task run named after the step, waiting
    for its upstream task runs (so the UI draws the graph's edges)."""
    futures: dict[str, object] = {}

    def run_step(step: PlanStep, inputs: dict):
        # only upstreams that produced what this step takes: Prefect never starts a task whose
        # wait_for holds a failed run (an optional input the walker left out, say)
        upstream = [futures[v] for k, v in step.inputs.items() if k in inputs and v in futures]
        refs = {k: str(r) for k, r in inputs.items()}
        # credentials in a config stay out of the parameters the server records (artifacts/redact.py)
        params = seal({**step.to_dict(), "as_planned": inputs == plan.input_refs(step)})

        def node0():
            fut = futures[step.name] = run_stage.with_options(task_run_name=step.name).submit(
                params, refs, store_url, step.name in force, wait_for=upstream)
            return fut.result()  # raises the task's own exception when it failed

        # nnodes > 1: the other nodes join (flows/multinode.py); a one-node step is just its task
        ref = across_nodes(params, refs, store_url, node0) if int(step.config.get("nnodes") or 1) > 1 else node0()
        return open_store(store_url).require(ArtifactRef.parse(ref)), futures[step.name].state.name == "Cached"
    return run_step


def log_outcome(logger, o) -> None:
    if o.status == "skipped":
        logger.warning("%s skipped (optional evidence): %s; what needs it is not run, the rest goes on",
                       o.step, o.detail)
    elif o.status == "failed":
        logger.error("%s failed: %s; steps that need it will not run, the others go on", o.step, o.detail)
    elif o.status == "not run":
        logger.warning("%s not run (%s)", o.step, o.detail)


def publish_report(refs: dict[str, str], store_url: str, preset: str) -> None:
    """The run report, as a Markdown artifact on the flow run's page in the Prefect UI."""
    report = [ref for ref in refs.values() if ref.startswith("report/")]
    if not report:
        return
    st = open_store(store_url)
    ref = st.resolve(report[0])
    path = st.materialize(ref)
    publish_markdown((path / "report.md").read_text(), path, key=f"speedrun-report-{preset}",
                     description=f"speedrun {preset}: {ref}")


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([A-Za-z0-9_./-]+\.(png|svg))\)")


def publish_markdown(markdown: str, artifact_dir: Path, *, key: str, description: str) -> None:
    """A report of a committed artifact as a Markdown artifact in the Prefect UI. Its images are
    files of the artifact, which the UI's browser cannot fetch from a local or S3 store (file://
    and s3:// links render broken): they are embedded as data URIs instead."""
    from prefect.artifacts import create_markdown_artifact

    def embed(m: re.Match) -> str:
        f = Path(artifact_dir) / m.group(2)
        if not f.is_file():
            return m.group(0)
        mime = "image/svg+xml" if m.group(3) == "svg" else "image/png"
        return f"![{m.group(1)}](data:{mime};base64,{base64.b64encode(f.read_bytes()).decode()})"

    create_markdown_artifact(markdown=_IMAGE.sub(embed, markdown), description=description,
                             key="".join(c if c.isalnum() else "-" for c in key.lower()))


@flow(name="stage", log_prints=True, validate_parameters=True)
def stage(name: str, config: dict | None = None, inputs: dict[str, str] | None = None,
          store: str | None = None, force: bool = False, join: bool = False, preset: str | None = None,
          plan: dict | None = None) -> str:
    """Run or rerun one stage with explicit inputs (refs `stage/label-fp`, fingerprint prefixes or
    `stage@alias`); force rebuilds it even if committed. Returns the artifact ref.

    preset: the stage's own preset (pretrain: tiny, cpu-demo, d20, ...); config then holds only the
    fields that differ from it, so a rerun from the UI does not mean retyping the whole config.
    plan: the one-step plan `nanorun stage` compiled (the fields above are then only its label);
    without it the stage's config is built and resolved here, once.

    join: this node's share of a multi-node run that node 0 runs (pretrain with nnodes > 1 and
    node_rank >= 1): trains in the shared work dir, commits nothing. Node 0's run started from a
    deployment submits the other nodes' join runs itself (flows/multinode.py)."""
    store, config, plan = unseal((store, config, plan))
    st = open_store(settings.value("store", store))
    if plan is None:
        compiled = stage_plan(name, config, preset, {k: st.resolve(v) for k, v in (inputs or {}).items()})
    else:
        compiled = Plan.from_dict(plan)
    (step,) = compiled.steps
    params, refs = seal(step.to_dict()), {k: str(v) for k, v in compiled.input_refs(step).items()}
    if join:
        return join_stage.with_options(task_run_name=f"{step.stage_name}-join")(params, refs, st.url)
    return across_nodes(params, refs, st.url,  # nnodes > 1: the other nodes join
                        lambda: run_stage.with_options(task_run_name=step.stage_name)(params, refs, st.url, force))
