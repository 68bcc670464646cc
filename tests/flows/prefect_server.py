"""A real Prefect server (and workers) on 127.0.0.1 for end-to-end tests, started and stopped here."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent


def prefect_env(tmp: Path, api_url: str | None = None, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", NANORUN_REPO=str(REPO),
               NANORUN_HOME=str(tmp / "home"), WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def background(cmd: list[str], env: dict, log: Path, cwd: Path = REPO):
    """A long-running command in its own process group, stopped (INT, then KILL) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            _stop(proc)


@contextlib.contextmanager
def prefect_server(tmp: Path):
    """`prefect server start` on a free loopback port; yields (api_url, env)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(tmp, api)
    log = tmp / "prefect-server.log"
    with background([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env, log) as proc:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"prefect server not healthy after 120 s:\n{log.read_text()[-3000:]}")
        yield api, env


def run(cmd: list[str], env: dict, cwd: Path = REPO, timeout: float = 180) -> str:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def call(method: str, url: str, **kwargs) -> httpx.Response:
    """One API request, repeated while the server answers 503: Prefect's "busy, retry" (SQLite
    locked by the scheduler or a worker a moment), which Prefect's own client retries too."""
    for _ in range(20):
        res = httpx.request(method, url, timeout=10, **kwargs)
        if res.status_code != 503:
            break
        time.sleep(0.5)
    return res


def wait_flow_run(api: str, flow_run_id: str, timeout: float) -> dict:
    """Poll a flow run until it reaches a final state; returns the flow run JSON."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = call("GET", f"{api}/flow_runs/{flow_run_id}").json()
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout:.0f} s (state {fr['state']['name']})")


def task_runs(api: str, flow_run_id: str) -> list[dict]:
    body = {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    return call("POST", f"{api}/task_runs/filter", json=body).json()
