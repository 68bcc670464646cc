"""Multi-node steps: the flow on node 0 starts every other node's share itself.

A trainer step whose config has nnodes > 1 (node_rank 0) runs on node 0 as any step does (lease,
train, commit). Before that, the flow submits one run of the `stage` deployment per other node with
join=True and that node's node_rank, onto the work queue `nanorun-node-{rank}` where that node's
worker listens (deploy/README.md "Several nodes"); after node 0 is done it waits for them. A failure
on any node fails the step with that node's one-line reason; a retry of the flow submits every node
again and each resumes from the newest checkpoint in the shared work dir.

    ref = across_nodes(step, inputs, store_url, lambda: run_stage(...))   # step: a PlanStep's dict

When the nodes start: NANORUN_START_NODES=1 always, 0 never (every node started by hand with
`nanorun stage ... --join`), unset: when the flow itself runs from a deployment (the UI, a
schedule, `prefect deployment run`), not when the CLI runs it in-process.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

log = logging.getLogger("nanorun.flows")

DEPLOYMENT = "stage/stage"  # NANORUN_STAGE_DEPLOYMENT names another (a copy in a GPU pool, say)
QUEUE = "nanorun-node-{rank}"
FINISH_S = 300.0  # after node 0 is done: how long the others get to end (they end with it)
POLL_S = 2.0


class NodeFailed(RuntimeError):
    """Another node's share of a multi-node step failed (or never started)."""


def other_nodes(config: dict) -> list[int]:
    """The node ranks node 0 must start for this step's config ([] when it is not node 0 of a
    multi-node step)."""
    nnodes = int(config.get("nnodes") or 1)
    return list(range(1, nnodes)) if nnodes > 1 and int(config.get("node_rank") or 0) == 0 else []


def start_nodes_here() -> bool:
    setting = os.environ.get("NANORUN_START_NODES", "").strip().lower()
    if setting in ("0", "1", "true", "false", "no", "yes"):
        return setting in ("1", "true", "yes")
    from prefect.runtime import deployment

    return deployment.id is not None


def across_nodes(step: dict, inputs: dict[str, str], store_url: str | None, run_node0: Callable[[], Any],
                 *, submit: Callable | None = None, state_of: Callable | None = None,
                 cancel: Callable | None = None, to_build: Callable[[], bool] | None = None,
                 finish_s: float = FINISH_S, poll_s: float = POLL_S) -> Any:
    """run_node0() with the other nodes' join runs submitted first and awaited after; returns its
    result. step: the plan step (pipeline/plan.py PlanStep.to_dict()). submit(stage, config, inputs,
    store_url, rank) -> a run handle; state_of(handle) ->
    (state name, final?, message); cancel(handle); to_build() -> whether the artifact is neither
    committed nor being built elsewhere: the Prefect and store calls, replaceable in tests."""
    stage, config = step["stage"], step["config"]
    ranks = other_nodes(config)
    if not ranks or not start_nodes_here():
        return run_node0()
    if not (to_build or (lambda: _to_build(step, inputs, store_url)))():
        return run_node0()  # a cache hit, or another run builds it: no node has anything to do
    submit, state_of, cancel = submit or _submit, state_of or _state_of, cancel or _cancel
    runs = {}
    try:
        for rank in ranks:
            runs[rank] = submit(stage, {**config, "node_rank": rank}, inputs, store_url, rank)
    except Exception as e:
        for run in runs.values():
            cancel(run)
        raise NodeFailed(f"{stage}: could not start node {len(runs) + 1} of {config['nnodes']}: {_one_line(e)} "
                         f"(it needs the `{_deployment()}` deployment; or set NANORUN_START_NODES=0 and start "
                         "the nodes by hand with --join)") from e
    log.info("%s: started nodes %s as join runs of %s on work queues %s", stage, ranks, _deployment(),
             ", ".join(QUEUE.format(rank=r) for r in ranks))
    try:
        result = run_node0()
    except BaseException as e:
        # the others fail soon after node 0 (their collectives break): wait a little for their word,
        # then stop what still runs so no node waits in a rendezvous for the rest of its timeout
        interrupted = not isinstance(e, Exception)  # Ctrl-C, a cancelled flow: stop the rest at once
        states = _wait(runs, state_of, 0.0 if interrupted else min(finish_s, 30.0), poll_s)
        for rank, run in runs.items():
            if not states[rank][1]:
                cancel(run)
        failed = _failures(stage, states)
        if failed and not interrupted:
            raise NodeFailed(failed) from e
        raise
    states = _wait(runs, state_of, finish_s, poll_s)
    failed = _failures(stage, states)
    if failed:  # node 0 committed a verified artifact: the step stands, but say what went wrong
        log.warning("%s: committed by node 0, but %s", stage, failed)
    return result


def _wait(runs: dict, state_of: Callable, timeout: float, poll_s: float) -> dict[int, tuple]:
    deadline = time.monotonic() + timeout
    while True:
        states = {rank: state_of(run) for rank, run in runs.items()}
        if all(final for _, final, _ in states.values()) or time.monotonic() >= deadline:
            return states
        time.sleep(poll_s)


def _failures(stage: str, states: dict[int, tuple]) -> str:
    parts = []
    for rank, (name, final, message) in sorted(states.items()):
        queue = QUEUE.format(rank=rank)
        if name in ("Scheduled", "Pending", "Late"):
            parts.append(f"node {rank} never started (its join run is {name}: is a worker listening on work queue "
                         f"{queue}?)")
        elif final and name not in ("Completed", "Cancelled"):  # cancelled: stopped because of another
            parts.append(f"node {rank} {name.lower()}: {_one_line(message)}")
    return f"{stage}: " + "; ".join(parts) if parts else ""


def _one_line(x: Any, limit: int = 200) -> str:
    text = " ".join(str(x).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---- the Prefect and store calls -------------------------------------------------------------------
def _deployment() -> str:
    return os.environ.get("NANORUN_STAGE_DEPLOYMENT") or DEPLOYMENT


def _to_build(step: dict, inputs: dict[str, str], store_url: str | None) -> bool:
    from artifacts import open_store
    from artifacts.redact import unseal
    from flows.tasks import planned_ref
    from pipeline.execute import stage_status

    store = open_store(unseal(store_url))
    return stage_status(store, planned_ref(unseal(step), inputs, store))[0] == "run"


def _submit(stage: str, config: dict, inputs: dict[str, str], store_url: str | None, rank: int):
    from prefect.deployments import run_deployment

    from artifacts.redact import seal

    return run_deployment(_deployment(), parameters=seal({"name": stage, "config": config, "inputs": inputs,
                                                       "store": store_url, "join": True}),
                          work_queue_name=QUEUE.format(rank=rank), timeout=0,
                          flow_run_name=f"{stage}-node{rank}", tags=["nanorun-node"])


def _state_of(run) -> tuple[str, bool, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    return (state.name, state.is_final(), state.message or "") if state else ("Pending", False, "")


def _cancel(run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
            if state is None or not state.is_final():
                # a worker stops a running one (killing its torchrun); one not started just ends
                client.set_flow_run_state(run.id, Cancelling() if state and state.is_running() else Cancelled(),
                                          force=True)
    except Exception:
        log.warning("could not cancel the join run %s", getattr(run, "name", run), exc_info=True)
