"""deploy/local.sh as an operator runs it: server, pool, deployments and worker on loopback; a speedrun
that fails at its first step, retried the way the UI's Retry button does it; then one signal stops
everything the script started within 15 s, a speedrun in progress included.

What it checks: every task run of the retried flow run, in the API and in the run graph,
is named after its step (no `stage-5e0` ghost bars); the worker's console prints each log line of
the run once; SIGTERM to the script, or SIGINT to its process group (a terminal's Ctrl-C), leaves no
server, worker or child of theirs behind.

Slow (about a minute and a half here): two real servers and workers; the flow runs cost a failed
data step, the CORE bundle's copy and the first seconds of a tiny speedrun.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port
from tests.flows.prefect_server import BIN, call, prefect_env, task_runs, wait_flow_run

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 15


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: no dependency for a Linux-only check)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
    return out


@contextlib.contextmanager
def local_sh(tmp: Path, port: int):
    """`bash deploy/local.sh` in its own session, on `port`; yields (proc, api, console log) once the
    server answers and the worker has reported to the pool. Whatever is left is killed at the end."""
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(tmp, api, PREFECT_HOST="127.0.0.1", PREFECT_PORT=str(port), NANORUN_VENV=str(BIN.parent))
    console = tmp / "local-sh.log"
    with open(console, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "deploy" / "local.sh")], env=env, cwd=tmp, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, f"local.sh exited early ({proc.returncode}):\n{console.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                workers = call("POST", f"{api}/work_pools/nanorun-local/workers/filter", json={})
                if workers.status_code == 200 and workers.json():
                    break
            time.sleep(1)
        else:
            raise AssertionError(f"no worker in pool nanorun-local after 240 s:\n{console.read_text()[-3000:]}")
        yield proc, api, console
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stops_within(proc: subprocess.Popen, started: set[int], limit: float) -> float:
    """Seconds until the script and everything it started are gone; fails past `limit`."""
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None and not _alive(started):
            return time.time() - t0
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in _alive(started)}
    raise AssertionError(f"still running {limit:.0f} s after the signal: script rc={proc.poll()}, {left}")


def _graph_labels(api: str, flow_run_id: str) -> list[str]:
    graph = call("GET", f"{api}/flow_runs/{flow_run_id}/graph-v2").json()
    return [n["label"] for _, n in graph["nodes"]]


def test_local_sh_retry_names_console_and_ctrl_c(tmp_path, shared_data):
    from pipeline.recipes import speedrun_steps

    bad = tmp_path / "bad-corpus"  # a data source that passes the flow's checks and fails when read
    bad.mkdir()
    (bad / "docs.jsonl").write_text('{"no_text_field": 1}\n')
    params = {"preset": "tiny", "store": str(tmp_path / "store"), "data_source": str(bad),
              "eval_bundle": str(shared_data / "eval_bundle"), "chat_data": str(shared_data / "chat")}
    steps = {s.name for s in speedrun_steps("tiny", data_source=str(bad), eval_bundle=params["eval_bundle"],
                                            chat_data=params["chat_data"])}
    with local_sh(tmp_path, free_port()) as (proc, api, console):
        run_id = _speedrun(api, params)
        first = wait_flow_run(api, run_id, timeout=300)
        assert first["state"]["type"] == "FAILED", console.read_text()[-5000:]
        attempt1 = task_runs(api, run_id)
        assert {t["name"] for t in attempt1} == {"data", "eval_bundle"}, attempt1

        # the UI's Retry button: AwaitingRetry, not forced (prefect-ui-library's retryFlowRun)
        retry = call("POST", f"{api}/flow_runs/{run_id}/set_state", json={"state": {
            "type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": False})
        assert retry.json()["status"] == "ACCEPT", retry.text
        second = wait_flow_run(api, run_id, timeout=300)
        assert second["run_count"] == 2 and second["state"]["type"] == "FAILED", console.read_text()[-5000:]
        names = [t["name"] for t in task_runs(api, run_id)]
        assert len(names) > len(attempt1) and set(names) <= steps, names
        labels = _graph_labels(api, run_id)
        assert labels and set(labels) <= steps, labels

        query = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
        logs = call("POST", f"{api}/logs/filter", json=query).json()

        # a terminal's Ctrl-C: SIGINT to the whole foreground process group at once
        _signal_and_wait(proc, console, lambda: os.killpg(proc.pid, signal.SIGINT), 130)

    # each log line the run sent to the API once is on the worker's console once, not twice (the
    # stage's own logger and the task run's logger both printing it); read once the worker is gone
    messages = [" ".join(m["message"].split()) for m in logs]
    once = [m for m in messages if messages.count(m) == 1 and len(m) > 30]
    text = " ".join(console.read_text(errors="replace").split())  # undo the console's line wrapping
    assert once, messages
    assert {m: text.count(m) for m in once} == {m: 1 for m in once}, text[-5000:]


def test_local_sh_stops_a_running_speedrun_on_sigterm(tmp_path, shared_data):
    """`kill PID` (or a service manager's TERM to the main process): only the script hears it, and
    it must stop what it started, a flow run in progress and its stage's children included."""
    params = {"preset": "tiny", "store": str(tmp_path / "store"), "eval_bundle": str(shared_data / "eval_bundle"),
              "chat_data": str(shared_data / "chat")}
    with local_sh(tmp_path, free_port()) as (proc, api, console):
        run_id = _speedrun(api, params)
        deadline = time.time() + 180
        while not any(t["state"]["type"] == "RUNNING" for t in task_runs(api, run_id)):
            assert time.time() < deadline, f"no step of the speedrun started in 180 s:\n{console.read_text()[-3000:]}"
            time.sleep(0.5)
        _signal_and_wait(proc, console, lambda: proc.send_signal(signal.SIGTERM), 143)


def _speedrun(api: str, params: dict) -> str:
    """A run of the speedrun deployment (the nightly one paused: its 03:00 run stays out of this worker)."""
    deployments = {d["name"]: d for d in call("POST", f"{api}/deployments/filter", json={}).json()}
    nightly = deployments["nightly-leaderboard"]["id"]
    call("PATCH", f"{api}/deployments/{nightly}", json={"paused": True}).raise_for_status()
    fr = call("POST", f"{api}/deployments/{deployments['speedrun']['id']}/create_flow_run", json={"parameters": params})
    assert fr.status_code in (200, 201), fr.text
    return fr.json()["id"]


def _signal_and_wait(proc: subprocess.Popen, console: Path, send, returncode: int) -> None:
    started = _descendants(proc.pid)
    assert len(started) >= 2, started  # at least the server and the worker
    send()
    took = _stops_within(proc, started, STOP_WITHIN_S)
    assert proc.returncode == returncode, console.read_text()[-3000:]
    print(f"local.sh: stopped with its {len(started)} processes in {took:.1f} s")
