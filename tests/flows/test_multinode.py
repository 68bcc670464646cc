"""flows/multinode.py: node 0's flow submits the other nodes' join runs, waits for them, and fails
with the failed node's reason. The Prefect calls (run_deployment, reading and cancelling flow runs)
are replaced by fakes here: a real server with one worker per node and a training run would cost
minutes of CI. The training across two "hosts" itself is tests/stages/test_multinode_netns.py."""
from __future__ import annotations

import os

import pytest

from flows import multinode
from flows.multinode import NodeFailed, across_nodes, other_nodes

CONFIG = {"nnodes": 3, "node_rank": 0, "rdzv_endpoint": "10.0.0.1:29500", "seed": 1}


class FakePrefect:
    """submit / state_of / cancel over an in-memory table of join runs."""

    def __init__(self, final=("Completed", True, "")):
        self.submitted, self.cancelled, self.final = [], [], final
        self.states: dict[int, tuple] = {}

    def submit(self, stage, config, inputs, store_url, rank):
        self.submitted.append((stage, config, inputs, store_url, rank))
        self.states[rank] = ("Running", False, "")
        return rank

    def state_of(self, run):
        return self.states[run]

    def cancel(self, run):
        self.cancelled.append(run)

    def kw(self, **extra):
        return {**dict(submit=self.submit, state_of=self.state_of, cancel=self.cancel, to_build=lambda: True,
                       poll_s=0.001, finish_s=0.05), **extra}


@pytest.fixture(autouse=True)
def _start_nodes(monkeypatch):
    monkeypatch.setenv("NANORUN_START_NODES", "1")


def test_node_0_starts_the_others_on_their_queues_and_waits_for_them():
    fake = FakePrefect()

    def node0():
        assert [s[4] for s in fake.submitted] == [1, 2]  # submitted before node 0 trains
        for rank in (1, 2):
            fake.states[rank] = ("Completed", True, "")
        return "pretrain/d2-abc"

    assert across_nodes({"stage": "pretrain", "config": CONFIG}, {"data": "d/x"}, "/store", node0, **fake.kw()) == "pretrain/d2-abc"
    (stage, config, inputs, store, rank), _ = fake.submitted
    assert (stage, inputs, store, rank) == ("pretrain", {"data": "d/x"}, "/store", 1)
    assert config == {**CONFIG, "node_rank": 1} and fake.submitted[1][1]["node_rank"] == 2
    assert fake.cancelled == []
    assert [multinode.QUEUE.format(rank=r) for r in (1, 2)] == ["nanorun-node-1", "nanorun-node-2"]


def test_a_failed_node_fails_the_step_with_its_reason_and_the_rest_are_stopped():
    fake = FakePrefect()

    def node0():
        fake.states[1] = ("Failed", True, "Flow run encountered an exception: LaunchError: pretrain-node1: CUDA OOM\n"
                                          "more lines")
        fake.states[2] = ("Scheduled", False, "")  # no worker on its queue
        raise RuntimeError("pretrain: node 1 (10.0.0.2) failed: ...")

    with pytest.raises(NodeFailed) as exc:
        across_nodes({"stage": "pretrain", "config": CONFIG}, {}, None, node0, **fake.kw())
    msg = str(exc.value)
    assert msg.startswith("pretrain: node 1 failed: Flow run encountered an exception: LaunchError: pretrain-node1: "
                          "CUDA OOM more lines; node 2 never started (its join run is Scheduled: is a worker "
                          "listening on work queue nanorun-node-2?)"), msg
    assert "\n" not in msg and isinstance(exc.value.__cause__, RuntimeError)
    assert fake.cancelled == [2]  # nobody waits in a rendezvous for the rest of its timeout


def test_node_0_failing_alone_keeps_its_own_error():
    fake = FakePrefect()

    def node0():
        fake.states[1] = fake.states[2] = ("Cancelled", True, "cancelled")
        raise ValueError("pretrain: bad config")

    with pytest.raises(ValueError, match="bad config"):
        across_nodes({"stage": "pretrain", "config": CONFIG}, {}, None, node0, **fake.kw())


def test_an_interrupt_stops_the_other_nodes_at_once():
    fake = FakePrefect()

    def node0():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        across_nodes({"stage": "pretrain", "config": CONFIG}, {}, None, node0, **fake.kw(finish_s=60))
    assert fake.cancelled == [1, 2]


def test_no_submission_for_one_node_a_joining_node_a_cache_hit_or_by_hand(monkeypatch):
    fake = FakePrefect()
    assert other_nodes({"nnodes": 1}) == [] and other_nodes({"nnodes": 2, "node_rank": 1}) == []
    assert other_nodes({"vocab_size": 4096}) == []  # stages without nodes
    assert across_nodes({"stage": "pretrain", "config": {"nnodes": 1}}, {}, None, lambda: "one", **fake.kw()) == "one"
    assert across_nodes({"stage": "pretrain", "config": CONFIG}, {}, None, lambda: "hit", **fake.kw(to_build=lambda: False)) == "hit"
    monkeypatch.setenv("NANORUN_START_NODES", "0")
    assert across_nodes({"stage": "pretrain", "config": CONFIG}, {}, None, lambda: "by hand", **fake.kw()) == "by hand"
    assert fake.submitted == []


def test_a_missing_deployment_is_one_line_saying_what_to_do():
    fake = FakePrefect()

    def submit(stage, config, inputs, store_url, rank):
        if rank == 2:
            raise ValueError("Deployment 'stage/stage' not found")
        return fake.submit(stage, config, inputs, store_url, rank)

    with pytest.raises(NodeFailed, match=r"could not start node 2 of 3: Deployment 'stage/stage' not found .*"
                                         r"NANORUN_START_NODES=0"):
        across_nodes({"stage": "pretrain", "config": CONFIG}, {}, None, lambda: pytest.fail("node 0 ran"), **fake.kw(submit=submit))
    assert fake.cancelled == [1]


def test_the_stage_flow_runs_node_0_through_across_nodes(monkeypatch, tmp_path):
    import flows.speedrun

    seen = {}

    def fake_across(step, inputs, store_url, run_node0):
        seen.update(stage=step["stage"], config=step["config"], store=store_url)
        return "pretrain/d2-fake"

    monkeypatch.setattr(flows.speedrun, "across_nodes", fake_across)
    from artifacts.manifest import ArtifactRef
    from pipeline.recipes import stage_plan

    config = {"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500"}
    inputs = {"data": ArtifactRef("data_shards", "x", "a" * 16), "tokenizer": ArtifactRef("tokenizer", "v", "b" * 16)}
    plan = stage_plan("pretrain", config, "tiny", inputs)  # as `nanorun stage` compiles it
    ref = flows.speedrun.stage.fn("pretrain", config=config, preset="tiny", store=str(tmp_path / "store"),
                                  plan=plan.to_dict())
    assert ref == "pretrain/d2-fake" and seen["stage"] == "pretrain"
    assert (seen["config"]["nnodes"], seen["config"]["node_rank"], seen["config"]["depth"]) == (2, 0, 2)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NANORUN_MULTINODE_E2E"),
                    reason="~3 minutes on 2 cores (a server, two workers, two runs): set NANORUN_MULTINODE_E2E=1")
def test_a_stage_deployment_run_starts_node_1_on_its_queue_end_to_end(tmp_path, shared_data):
    """The real thing, opt-in: a Prefect server, the deployments, one worker on the stage deployment's
    queue (node 0) and one on nanorun-node-1. Without node 1's worker the step fails naming its
    queue and node 1's run is cancelled; with it, a 2-node pretrain triggered through the API trains
    on both and commits once."""
    import httpx

    from stages import pretrain
    from pipeline.execute import artifact_ref
    from tests.conftest import free_port
    from tests.flows.prefect_server import BIN, background, prefect_server, run, wait_flow_run
    from tests.train_helpers import store_with_data_and_tokenizer

    store, data, tok = store_with_data_and_tokenizer(tmp_path / "inputs", shared_data / "corpus")
    inputs = {"data": str(data.ref), "tokenizer": str(tok.ref)}
    config = {"seed": 31, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}", "rdzv_id": "e2e-2nodes",
              "omp_threads": 1, "timeout": 300}
    with prefect_server(tmp_path) as (api, env):
        env = {**env, "OMP_NUM_THREADS": "1"}
        run([str(BIN / "prefect"), "work-pool", "create", "nanorun-local", "--type", "process"], env)
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
        dep = httpx.get(f"{api}/deployments/name/stage/stage", timeout=10).json()

        def worker(queue):
            return background([str(BIN / "prefect"), "worker", "start", "--pool", "nanorun-local",
                               "--work-queue", queue, "--name", queue], env, tmp_path / f"worker-{queue}.log")

        def trigger(**overrides):
            fr = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", timeout=10, json={"parameters": {
                "name": "pretrain", "preset": "tiny", "config": {**config, **overrides}, "inputs": inputs,
                "store": str(store.root)}})
            return wait_flow_run(api, fr.json()["id"], timeout=600)

        def joins():
            return [(j["name"], j["state"]["type"], j["parameters"]["join"], j["parameters"]["config"]["node_rank"])
                    for j in httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                        "flow_runs": {"tags": {"all_": ["nanorun-node"]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()]

        with worker("default"):
            # nobody listens on node 1's queue: node 0 gives up (its launcher's timeout here), the
            # step fails naming the queue, and node 1's run is cancelled instead of left waiting
            failed = trigger(timeout=20, rdzv_id="e2e-nobody")
            assert failed["state"]["type"] == "FAILED"
            message = failed["state"]["message"]  # its join run is Scheduled, or Late by now
            assert "NodeFailed: pretrain: node 1 never started (its join run is " in message, message
            assert message.endswith(": is a worker listening on work queue nanorun-node-1?)"), message
            assert joins() == [("pretrain-node1", "CANCELLED", True, 1)]
            with worker("nanorun-node-1"):
                done = trigger()
                logs = "\n".join(p.read_text()[-4000:] for p in sorted(tmp_path.glob("worker-*.log")))
                assert done["state"]["type"] == "COMPLETED", logs
        assert joins()[1:] == [("pretrain-node1", "COMPLETED", True, 1)]
    m = store.require(artifact_ref(pretrain, pretrain.preset("tiny", **{**config, "node_rank": 0}),
                                   {"data": data.ref, "tokenizer": tok.ref}))
    assert m.metrics["world_size"] == 2 and "train-node1.log" in {f.path for f in m.files}
