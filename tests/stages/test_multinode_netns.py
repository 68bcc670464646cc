"""Multi-node pretraining proven on one machine with two "hosts": two network namespaces joined by a
veth pair (10.77.0.1 and 10.77.0.2), one node per namespace, 2 nodes x 1 gloo process with the
rendezvous on node 0's address and the store on the local filesystem both see.

Node 0 runs `nanorun stage pretrain` (the stage flow: lease, train, commit), node 1 runs the same
command with --join, each inside its namespace (`ip netns exec`), each with its own NANORUN_HOME and
Prefect home as on two machines. The result must equal a single-node 2-process run of the same
config bit for bit; a node killed mid-run fails node 0's step with one line naming it, and a rerun
of both nodes resumes from the last checkpoint to the same weights.

Needs root and iproute2 (`ip netns`); skips with the reason elsewhere. CI runs as root."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from stages import pretrain
from pipeline.execute import artifact_ref, execute
from tests.train_helpers import REPO, assert_states_equal, store_with_data_and_tokenizer

pytestmark = pytest.mark.slow

SEED = 23  # an artifact of its own (other tests build the tiny preset with other seeds)
PORT = 29517  # each namespace has its own port space: no clash with anything on the host
HOST0 = "10.77.0.1"


@dataclass
class Host:
    ns: str
    dev: str
    addr: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair; removed at the end, also on failure."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`, which is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (`ip netns add`); run the test as root")
    tag = uuid.uuid4().hex[:8]  # interface names are at most 15 characters
    hosts = [Host(f"nr{tag}a", f"nr{tag}x", HOST0), Host(f"nr{tag}b", f"nr{tag}y", "10.77.0.2")]
    made = []
    try:
        for h in hosts:
            _ip("netns", "add", h.ns)
            made.append(h.ns)
        _ip("link", "add", hosts[0].dev, "type", "veth", "peer", "name", hosts[1].dev)
        for h in hosts:
            _ip("link", "set", h.dev, "netns", h.ns)
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            _ip("-n", h.ns, "link", "set", h.dev, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")  # Prefect's temporary server binds loopback
            _ip("netns", "exec", h.ns, sys.executable, "-c", "")  # it also remounts /sys: allowed here?
    except subprocess.CalledProcessError as e:
        _remove(made, hosts[0].dev)
        pytest.skip(f"cannot create network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    try:
        yield hosts
    finally:
        _remove(made, hosts[0].dev)


def _remove(namespaces: list[str], veth: str) -> None:
    # deleting a namespace deletes the veth end inside it, and so the pair; one never moved into a
    # namespace (a failed setup) is deleted on its own
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", veth], capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    store, data, tok = store_with_data_and_tokenizer(tmp_path_factory.mktemp("netns"), shared_data / "corpus")
    return store, {"data": data.ref, "tokenizer": tok.ref}


@pytest.fixture(scope="module")
def single_node(built):
    """The reference: the same config on one node with 2 processes. Its final checkpoint and val
    curve are kept in memory and the artifact deleted, so the multi-node runs build it afresh."""
    store, inputs = built
    m = execute(pretrain, pretrain.preset("tiny", seed=SEED, nproc=2, omp_threads=1, timeout=240), inputs, store)
    result = _result(store, m)
    store.delete(m.ref)
    return result


def _result(store, m) -> dict:
    final = store.materialize(m.ref) / m.metrics["checkpoint"]
    return {"model": torch.load(final / "model.pt", weights_only=True),
            "optim": [torch.load(final / f"optim_rank{r}.pt", weights_only=True) for r in range(2)],
            "val": m.metrics["val_bpb_curve"], "world_size": m.metrics["world_size"]}


def _node(host: Host, rank: int, store, inputs, tmp: Path, run_id: str, *, cli: bool = True, port: int = PORT,
          env: dict | None = None, **sets) -> subprocess.Popen:
    """This node's process inside the host's namespace: `nanorun stage pretrain` (rank 0) or
    `... --join` (rank 1) when cli, else the same calls without Prefect (tests/stages/_node.py)."""
    fields = dict(seed=SEED, nnodes=2, node_rank=rank, rdzv_endpoint=f"{HOST0}:{port}", rdzv_id=run_id,
                  nproc=1, omp_threads=1, timeout=150, **sets)
    refs = {k: str(v) for k, v in inputs.items()}
    if cli:
        args = ["-m", "cli.main", "--store", str(store.root), "stage", "pretrain", "--preset", "tiny",
                *[f"--input={k}={v}" for k, v in refs.items()],
                *[f"--set={k}={json.dumps(v)}" for k, v in fields.items()], *(["--join"] if rank else [])]
    else:
        args = ["-m", "tests.stages._node", str(store.root), str(rank), json.dumps(fields), json.dumps(refs)]
    home = tmp / f"node{rank}"
    home.mkdir(exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},  # each node its own temporary server
           "PYTHONPATH": str(REPO), "NANORUN_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "NANORUN_PROGRESS_BAR": "0", "OMP_NUM_THREADS": "1",
           # Both "hosts" share one hostname, which resolves to neither of them: torchrun's
           # --local-addr (PET_ env form) names the address node 0's workers publish as
           # MASTER_ADDR; gloo and tensorpipe would pick the interface by the hostname too
           "PET_LOCAL_ADDR": host.addr, "GLOO_SOCKET_IFNAME": host.dev, "TP_SOCKET_IFNAME": host.dev, **(env or {})}
    log = open(tmp / f"node{rank}.log", "a")
    return subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: list[subprocess.Popen], tmp: Path, timeout: float = 400) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                _kill(q)
            pytest.fail(f"the nodes did not finish in {timeout:.0f} s:\n" + _logs(tmp))
    return [p.returncode for p in procs]


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {f.name}\n" + f.read_text()[-4000:] for f in sorted(tmp.glob("node*.log")))


def test_two_hosts_train_the_same_weights_as_one_host(built, single_node, two_hosts, tmp_path):
    store, inputs = built
    procs = [_node(h, rank, store, inputs, tmp_path, "netns-equal") for rank, h in enumerate(two_hosts)]
    try:
        assert _wait(procs, tmp_path) == [0, 0], _logs(tmp_path)
    finally:
        for p in procs:
            _kill(p)
    ref = artifact_ref(pretrain, pretrain.preset("tiny", seed=SEED, nproc=2), inputs)  # world size 2, as 2 x 1
    m = store.require(ref)
    got = _result(store, m)
    assert got["world_size"] == 2
    assert_states_equal(single_node["model"], got["model"], "model")
    for r in range(2):
        assert_states_equal(single_node["optim"][r], got["optim"][r], f"optim_rank{r}")
    assert got["val"] == single_node["val"] and len(got["val"]) == 4
    assert {"train-node1.log", "run-node1.json"} <= {f.path for f in m.files}


def test_a_lost_node_fails_the_step_in_seconds_and_both_nodes_resume(built, single_node, two_hosts, tmp_path):
    """Host 1 vanishes after the first checkpoint (its link goes down, then every process in it is
    killed: no FIN or RST reaches node 0). Node 0's collective times out after NANORUN_DIST_TIMEOUT
    seconds, its step fails with one line naming the lost node, and a rerun of both nodes resumes
    from the last checkpoint in the shared work dir to the single-node weights."""
    store, inputs = built
    ref = artifact_ref(pretrain, pretrain.preset("tiny", seed=SEED, nproc=2), inputs)  # world size 2, as 2 x 1
    if store.manifest(ref) is not None:  # the other test's: build it again
        store.delete(ref)
    first = store.work_dir(ref) / "checkpoints" / "step_000004" / "meta.json"
    timeout = {"NANORUN_DIST_TIMEOUT": "15"}
    procs = [_node(h, rank, store, inputs, tmp_path, "netns-kill", cli=False, port=PORT + 1, env=timeout,
                   save_every=4) for rank, h in enumerate(two_hosts)]
    try:
        deadline = time.time() + 200
        while not first.exists():
            assert all(p.poll() is None for p in procs), _logs(tmp_path)
            assert time.time() < deadline, "no checkpoint after 200 s:\n" + _logs(tmp_path)
            time.sleep(0.01)
        lost = two_hosts[1]
        _ip("-n", lost.ns, "link", "set", lost.dev, "down")
        for pid in _ip("netns", "pids", lost.ns).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        killed = time.time()
        procs[0].wait(timeout=150)
        noticed = time.time() - killed
    finally:
        for p in procs:
            _kill(p)
    assert procs[0].returncode == 1
    assert not (store.work_dir(ref) / "checkpoints" / "step_000024").exists()  # it was stopped mid-run
    # the collective's timeout, plus the beacons' wait for the other nodes' word and the teardown
    assert 15 <= noticed < 90, noticed
    (error,) = [line for line in (tmp_path / "node0.log").read_text().splitlines() if line.startswith("error: ")]
    assert re.fullmatch(r"error: LaunchError: pretrain: node 1 \(10\.77\.0\.2\) went silent \d+ s before this node "
                        r"failed \(lost\?\); rerun every node: pretrain exited with code 1 at step \d+; last "
                        r"checkpoint step (4|8|12|16|20)", error), error

    _ip("-n", two_hosts[1].ns, "link", "set", two_hosts[1].dev, "up")
    procs = [_node(h, rank, store, inputs, tmp_path, "netns-kill-rerun", cli=False, port=PORT + 2, env=timeout,
                   save_every=4) for rank, h in enumerate(two_hosts)]
    try:
        assert _wait(procs, tmp_path) == [0, 0], _logs(tmp_path)
    finally:
        for p in procs:
            _kill(p)
    got = _result(store, store.require(ref))
    assert_states_equal(single_node["model"], got["model"], "model")
    for r in range(2):
        assert_states_equal(single_node["optim"][r], got["optim"][r], f"optim_rank{r}")
    assert got["val"] == single_node["val"]
    assert "resuming from the checkpoint at step" in (tmp_path / "node0.log").read_text()
