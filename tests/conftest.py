"""Shared fixtures: isolated homes, the shared data folder, a real S3-compatible server on loopback.

Nothing here touches the network: the S3 server is moto's, started on 127.0.0.1 for the session.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NANORUN_SHARED_DATA", REPO.parent / "shared" / "data"))

# Isolate every tool that writes under $HOME, before anything imports it (docs/versions.md#prefect-3, #wandb).
_session_tmp = Path(tempfile.mkdtemp(prefix="nanorun-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_session_tmp / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_DIR", str(_session_tmp / "wandb"))
os.environ["NANORUN_HOME"] = str(_session_tmp / "home")
# An empty settings file: a nanorun.toml in the checkout (written by scripts/speedrun.sh) must not
# change what the tests plan; tests that exercise settings set their own.
(_session_tmp / "nanorun.toml").write_text("")
os.environ["NANORUN_CONFIG"] = str(_session_tmp / "nanorun.toml")
# Fake credentials so boto3 never looks for real ones (and never reaches AWS).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# moto's server logs every request through werkzeug: keep failing tests' output readable
logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors: a second OpenMP thread only adds synchronisation, and on a busy machine
    a 2-thread parallel region stalls until both threads get a core (50x slower here under load).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (corpus/, eval_bundle/, chat/): real files, never copied into the repo."""
    if not (SHARED_DATA / "corpus").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: clone the project next to ../shared "
                    "or set NANORUN_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def corpus_files(shared_data) -> list[Path]:
    files = sorted((shared_data / "corpus").glob("shard_*.parquet"))
    assert len(files) == 8, files
    return files


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the test S3 server; yields (endpoint_url, bucket_name)."""
    import boto3

    name = "nr-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{os.getpid() % 10000}-{free_port()}"[:63]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield s3_server, name


@pytest.fixture
def nanorun_home(tmp_path, monkeypatch) -> Path:
    """A fresh $NANORUN_HOME for one test."""
    home = tmp_path / "nanorun-home"
    monkeypatch.setenv("NANORUN_HOME", str(home))
    return home


@pytest.fixture
def pretrain_launches(monkeypatch) -> list:
    """The command lines of every pretraining process this test starts (subprocess.Popen watched)."""
    import subprocess

    launched, real_popen = [], subprocess.Popen

    def spy(*a, **kw):
        cmd = kw.get("args", a[0] if a else None)
        if isinstance(cmd, (list, tuple)) and "core.train.pretrain" in cmd:
            launched.append(cmd)
        return real_popen(*a, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    return launched


CHROMIUM = "/usr/bin/chromium"
# without the background-networking flags Chromium keeps dialling Google (docs/versions.md#browser-tests)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian Chromium driven by Playwright (PyPI); Playwright's own browser download fails here.

    Module-scoped on purpose: Playwright's sync API keeps an asyncio loop running in the main thread
    while it is open, and Prefect then treats every later call as async (State.result() returns a
    coroutine), so the browser must be closed before other modules' tests run."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (scripts/test.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; fails if it is not one."""
    import struct

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shared_data):
    """The `tiny` speedrun built once per session through pipeline.execute (no Prefect):
    (store, {step name: Manifest}). Tests that only read these artifacts share it."""
    from artifacts import open_store
    from pipeline.recipes import speedrun_steps
    from pipeline.plan import run_pipeline

    store = open_store(str(tmp_path_factory.mktemp("tiny-store")))
    steps = speedrun_steps("tiny", eval_bundle=str(shared_data / "eval_bundle"), chat_data=str(shared_data / "chat"))
    return store, run_pipeline(steps, store)


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's streams are still open (its own atexit hook
    logs after they are closed and prints a 'Logging error' traceback at the end of every run)."""
    import sys

    if "prefect.server.api.server" not in sys.modules:
        return
    import logging

    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler
    from prefect.server.api.server import SubprocessASGIServer

    # Prefect's console handlers were created while pytest captured output and still hold the
    # (now closed) capture stream: give them the real stderr back before anything else logs.
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, PrefectConsoleHandler):
                h.console.file = sys.__stderr__
            elif isinstance(h, APILogHandler):
                h.flush()  # ship queued run logs while the server can still take them
    for server in list(SubprocessASGIServer._instances.values()):
        if server.running:
            server.stop()


@pytest.fixture
def toy_stages(monkeypatch):
    """Register the toy stages (tests/artifacts/toy_*.py) under their names for one test: a plan file
    or a flow parameter names only registered stages."""
    from stages.registry import STAGE_MODULES

    for name, module in {"toy": "tests.artifacts.toy_stage", "toy_sum": "tests.artifacts.toy_consumer"}.items():
        monkeypatch.setitem(STAGE_MODULES, name, module)
