"""Which node of a multi-node run failed or went silent: beacons in the shared work dir.

When a node is lost, the others learn it only as a collective that times out ("Application
timeout caused pair closure" from gloo, a watchdog timeout from NCCL): neither names the peer. So
while torchrun runs, every node's launcher rewrites `nodes/node{rank}.json` in the shared work dir
every BEAT_S seconds (a counter, its host, and at the end "done" or "failed" with the reason), and
watches the others' files. Staleness is measured on the watcher's own clock (when a file last
changed), so clock skew between machines does not matter.

    with NodeBeacons(out, node_rank=0, nnodes=2) as beacons:
        ...                                   # launch torchrun; it failed:
        beacons.finish("RuntimeError: ...")   # "node 1 (10.0.0.2) went silent 21 s before this node failed (lost?)"
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

BEAT_S = 2.0
SILENT_AFTER_S = 3 * BEAT_S  # missed beats before a node counts as silent
DIR = "nodes"


def host_name() -> str:
    """The address this node takes part with (torchrun's --local-addr, as PET_LOCAL_ADDR), else
    its hostname: what an operator needs to find the machine."""
    return os.environ.get("PET_LOCAL_ADDR") or socket.gethostname()


class NodeBeacons:
    """This node's beacon (rewritten every beat_s seconds by a thread) and its watch on the others'."""

    def __init__(self, out: Path, node_rank: int, nnodes: int, beat_s: float = BEAT_S):
        self.dir = Path(out) / DIR
        self.rank, self.nnodes, self.beat_s = node_rank, nnodes, beat_s
        self.seq = 0
        self.seen: dict[int, tuple[str, float]] = {}  # rank -> (last content, when it changed, monotonic)
        self.before: dict[int, str] = {}
        self.stopped = threading.Event()
        self.finished = False
        self.thread = threading.Thread(target=self._run, name="node-beacons", daemon=True)

    def __enter__(self) -> "NodeBeacons":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat("running")
        self._look()
        self.before = {r: text for r, (text, _) in self.seen.items()}  # a previous attempt's last words
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.finish()
        else:  # the caller reports the failure with finish(reason); until then this node is silent
            self.stopped.set()
            self.thread.join(timeout=10)

    def finish(self, error: str | None = None) -> str:
        """Stop beating and write the final state ("done", or "failed" with the one-line reason).
        After a failure, give the others a few beats to report theirs, then return verdict()."""
        self.finished = True
        self.stopped.set()
        self.thread.join(timeout=10)
        self._beat("failed" if error else "done", error or "")
        deadline = time.monotonic() + SILENT_AFTER_S + self.beat_s
        while True:
            self._look()
            if error and (found := self.verdict()):
                return found
            # node 0 commits the work dir next: wait for the others' last writes (their "done"
            # beacon, the end of their logs), so that nothing changes under the commit
            if not error and (self.rank != 0 or all(_state(text) == "done" and text != self.before.get(r)
                                                    for r, (text, _) in self.seen.items())):
                return ""
            if time.monotonic() > deadline:
                return ""
            time.sleep(self.beat_s / 4)

    def _run(self) -> None:
        while not self.stopped.wait(self.beat_s):
            self._beat("running")
            self._look()

    def _beat(self, state: str, error: str = "") -> None:
        self.seq += 1
        record = {"node_rank": self.rank, "host": host_name(), "pid": os.getpid(), "seq": self.seq, "state": state}
        if error:
            record["error"] = error
        path = self.dir / f"node{self.rank}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, path)
        except OSError:  # a hiccup of the shared filesystem must not fail the training
            pass

    def _look(self) -> None:
        now = time.monotonic()
        for r in range(self.nnodes):
            if r == self.rank:
                continue
            try:
                text = (self.dir / f"node{r}.json").read_text()
            except OSError:
                text = ""
            if r not in self.seen or self.seen[r][0] != text:
                self.seen[r] = (text, now)

    def verdict(self) -> str:
        """One line naming the nodes that failed (with their reason) or went silent; "" if none."""
        now = time.monotonic()
        parts = []
        for r, (text, changed) in sorted(self.seen.items()):
            rec = _record(text)
            who = f"node {r} ({rec.get('host', 'never reported')})"
            if rec.get("state") == "failed" and text != self.before.get(r):
                parts.append(f"{who} failed: {rec.get('error') or 'no reason given'}")
            elif (rec.get("state") != "done" or text == self.before.get(r)) and now - changed > SILENT_AFTER_S:
                parts.append(f"{who} went silent {now - changed:.0f} s before this node failed (lost?)")
        return "; ".join(parts)


def _record(text: str) -> dict:
    try:
        rec = json.loads(text)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _state(text: str) -> str:
    return _record(text).get("state", "")


def cause_line(tail: list[str]) -> str:
    """The exception line of the first worker traceback in a failed run's output (what another
    node's operator needs to read), else the last line; `[rank0]: ` prefixes dropped."""
    from stagekit.launch import failure_summary

    lines = [line.strip(" |").split("]: ", 1)[-1] if line.lstrip(" |").startswith("[rank") else line.strip(" |")
             for line in failure_summary(tail).splitlines()]
    for line in lines:
        head = line.split(":", 1)[0]
        if ":" in line and not line.startswith(("File ", "Traceback")) and head.endswith(("Error", "Exception")):
            return " ".join(line.split())[:200]
    return " ".join(lines[-1].split())[:200] if lines else "no output"
