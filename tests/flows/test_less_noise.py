"""The CLI's output around its messages: the temporary Prefect server is reached directly under a
proxy, a failed run ends with its table and one line (the traceback only with -v), trainer step
lines reach Prefect's log every N steps, the nightly runs by hand and a refused one says why in
its final state, and a fully cached sweep answers without Prefect."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import httpx
import pytest

from tests.conftest import REPO, free_port
from tests.flows.prefect_server import prefect_env

NANORUN = ("import sys, stages; stages.STAGE_MODULES['sleepy'] = 'tests.flows.sleepy_stage'; "
           "from flows.cli import main; sys.exit(main(sys.argv[1:]))")


def _proxied(env: dict) -> dict:
    """Every proxy variable at a closed loopback port and no NO_PROXY: anything sent through the
    proxy fails at once."""
    bogus = f"http://127.0.0.1:{free_port()}"
    for key in ("NO_PROXY", "no_proxy"):
        env.pop(key, None)
    return env | {k: bogus for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                     "all_proxy")}


def test_loopback_bypasses_a_proxy_without_no_proxy(monkeypatch):
    import os

    from flows.commands import _prefect_env

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        for key, value in _proxied({}).items():
            monkeypatch.setenv(key, value)
        for key in ("NO_PROXY", "no_proxy", "NANORUN_PROGRESS_BAR"):
            monkeypatch.setenv(key, "")  # restored after the test (the command sets them for its process)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=5)  # what Prefect's client did: to the proxy, which is not there
        monkeypatch.setenv("NO_PROXY", "example.org")
        _prefect_env()
        assert os.environ["NO_PROXY"] == "example.org,127.0.0.1,localhost,::1"
        assert httpx.get(url, timeout=5).status_code == 200
        assert httpx.get(url.replace("127.0.0.1", "localhost"), timeout=5).status_code == 200
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_run_on_the_temporary_server_under_a_proxy(tmp_path):
    env = _proxied(prefect_env(tmp_path, PYTHONPATH=str(REPO), NANORUN_PROGRESS_BAR="0"))
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-c", NANORUN, "--store", str(tmp_path / "store"), "stage", "sleepy",
                        "--set", "seconds=0", "--set", f"pid_file={tmp_path / 'pids'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("sleepy/"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
