"""Multi-node pretraining on one machine: node 0 runs the stage (lease, commit), node 1 joins the
same torchrun job through the c10d rendezvous and commits nothing."""
from __future__ import annotations

import threading

import pytest

from stages import pretrain
from stages.base import ConfigError
from pipeline.execute import artifact_ref, execute, join
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_two_nodes_train_one_artifact(tiny_run):
    store, run = tiny_run
    inputs = {"data": run["data"].ref, "tokenizer": run["tokenizer"].ref}
    endpoint = f"127.0.0.1:{free_port()}"
    common = dict(seed=11, nnodes=2, rdzv_endpoint=endpoint, rdzv_id="test-2nodes", nproc=1, omp_threads=1,
                  timeout=240)
    node0 = pretrain.preset("tiny", node_rank=0, **common)
    node1 = pretrain.preset("tiny", node_rank=1, **common)
    assert artifact_ref(pretrain, node0, inputs) == artifact_ref(pretrain, node1, inputs)  # runtime fields only

    errors = []

    def joiner():
        try:
            join(pretrain, node1, inputs, store)
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=joiner)
    t.start()
    m = execute(pretrain, node0, inputs, store)
    t.join(timeout=300)
    assert not errors, errors
    assert m.metrics["world_size"] == 2 and m.metrics["iterations"] == run["base"].metrics["iterations"]
    files = {f.path for f in m.files}
    assert "train-node1.log" in files and "run-node1.json" in files and "train.log" in files
    assert m.metrics["final_val_bpb"] is not None


def test_join_is_refused_where_it_makes_no_sense(tiny_run):
    store, run = tiny_run
    inputs = {"data": run["data"].ref, "tokenizer": run["tokenizer"].ref}
    with pytest.raises(ConfigError, match="nnodes > 1 and node_rank >= 1"):
        join(pretrain, pretrain.preset("tiny"), inputs, store)
    with pytest.raises(ConfigError, match="run `nanorun stage pretrain ... --join` on this node"):
        execute(pretrain, pretrain.preset("tiny", seed=12, nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:1"),
                inputs, store)
