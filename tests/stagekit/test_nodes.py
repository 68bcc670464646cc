"""stagekit/nodes.py: the beacons that name the node of a multi-node run that failed or went silent
(fast: beats of a few milliseconds, no training; the real thing is test_multinode_netns.py)."""
from __future__ import annotations

import json
import threading
import time

from stagekit.nodes import NodeBeacons, cause_line

BEAT = 0.02


def _beacons(tmp_path, rank, **kw):
    return NodeBeacons(tmp_path, node_rank=rank, nnodes=3, beat_s=BEAT, **kw)


def test_a_failed_node_is_named_with_its_reason_and_a_silent_one_as_lost(tmp_path, monkeypatch):
    monkeypatch.setattr("stagekit.nodes.SILENT_AFTER_S", 5 * BEAT)
    monkeypatch.setenv("PET_LOCAL_ADDR", "10.0.0.1")
    with _beacons(tmp_path, 0) as node0, _beacons(tmp_path, 1) as node1, _beacons(tmp_path, 2) as node2:
        time.sleep(3 * BEAT)
        node1.finish("RuntimeError: CUDA out of memory")
        node2.stopped.set()  # node 2's machine is gone: no more beats, no last words
        node2.thread.join()
        time.sleep(6 * BEAT)
        verdict = node0.finish("RuntimeError: Application timeout caused pair closure")
    assert verdict.startswith("node 1 (10.0.0.1) failed: RuntimeError: CUDA out of memory; node 2 (10.0.0.1) went "
                              "silent "), verdict
    assert verdict.endswith(" s before this node failed (lost?)")
    rec = json.loads((tmp_path / "nodes" / "node0.json").read_text())
    assert rec["state"] == "failed" and rec["error"].endswith("pair closure") and rec["node_rank"] == 0


def test_healthy_peers_and_a_previous_attempts_failure_are_not_blamed(tmp_path, monkeypatch):
    monkeypatch.setattr("stagekit.nodes.SILENT_AFTER_S", 5 * BEAT)
    (tmp_path / "nodes").mkdir()
    old = {"node_rank": 1, "host": "old", "seq": 9, "state": "failed", "error": "OSError: last time"}
    (tmp_path / "nodes" / "node1.json").write_text(json.dumps(old))
    with _beacons(tmp_path, 0) as node0, _beacons(tmp_path, 1), _beacons(tmp_path, 2):
        time.sleep(3 * BEAT)
        assert node0.finish("ValueError: this node's own bug") == ""  # the others still beat


def test_node_0_waits_for_the_others_last_word_before_it_commits(tmp_path):
    def node(rank, seconds):
        with NodeBeacons(tmp_path, node_rank=rank, nnodes=2, beat_s=BEAT):
            time.sleep(seconds)

    late = threading.Thread(target=node, args=(1, 10 * BEAT))
    with NodeBeacons(tmp_path, node_rank=0, nnodes=2, beat_s=BEAT):
        late.start()
        time.sleep(BEAT)
    assert json.loads((tmp_path / "nodes" / "node1.json").read_text())["state"] == "done"
    late.join()


def test_cause_line_is_the_workers_exception():
    tail = ["[rank1]: Traceback (most recent call last):", '[rank1]:   File "x.py", line 3, in f',
            "[rank1]: RuntimeError: Application timeout caused pair closure",
            "E1129 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 1) of binary: python"]
    assert cause_line(tail) == "RuntimeError: Application timeout caused pair closure"
    assert cause_line(["just some output", "the end"]) == "the end"
