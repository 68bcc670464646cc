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

NANORUN = ("import sys, stages.registry; stages.registry.STAGE_MODULES['sleepy'] = 'tests.flows.sleepy_stage'; "
           "from cli.main import main; sys.exit(main(sys.argv[1:]))")


def _proxied(env: dict) -> dict:
    """Every proxy variable at a closed loopback port and no NO_PROXY: anything sent through the
    proxy fails at once."""
    bogus = f"http://127.0.0.1:{free_port()}"
    for key in ("NO_PROXY", "no_proxy"):
        env.pop(key, None)
    return env | {k: bogus for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                     "all_proxy")}


def _kill_marked(mark: str) -> None:
    """Kill the processes whose environment holds `mark` (the test's own leftovers)."""
    import os
    import signal

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark.encode() in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile, or not ours to read


def test_loopback_bypasses_a_proxy_without_no_proxy(monkeypatch):
    import os

    from cli.commands import _prefect_env

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
def test_runs_on_the_temporary_server_under_a_proxy_and_a_failure_without_traceback(tmp_path):
    """Under a dead proxy (today: "Timed out while attempting to connect to ephemeral Prefect API
    server"), a failing run ends with its one-line reason and no traceback, a good one succeeds."""
    mark = f"NANORUN_TEST_RUN={tmp_path}"  # inherited by the sleepy trainer's worker, which outlives it
    env = _proxied(prefect_env(tmp_path, PYTHONPATH=str(REPO), NANORUN_PROGRESS_BAR="0",
                               NANORUN_TEST_RUN=str(tmp_path)))
    env.pop("PREFECT_API_URL", None)

    def sleepy(pid_file):
        try:
            return subprocess.run([sys.executable, "-c", NANORUN, "--store", str(tmp_path / "store"), "stage",
                                   "sleepy", "--set", "seconds=0", "--set", f"pid_file={pid_file}"], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=300)
        finally:
            _kill_marked(mark)

    r = sleepy(tmp_path / "missing" / "pids")  # the trainer cannot write its pid file: it exits 1
    said = [line for line in r.stderr.splitlines() if line.startswith("nanorun")]
    assert r.returncode == 1 and len(said) == 1, r.stderr[-3000:]
    assert said[0].startswith("nanorun stage: stage sleepy failed: LaunchError: sleepy exited with code 1")
    # the trainer's own traceback is its output (quoted in the reason); Prefect's are not printed
    assert "prefect/flow_engine.py" not in r.stderr and "prefect/task_engine.py" not in r.stderr, r.stderr[-3000:]
    assert "Encountered exception during execution: LaunchError(" in r.stderr and "Timed out" not in r.stderr
    r = sleepy(tmp_path / "pids")
    assert r.returncode == 0 and r.stdout.startswith("sleepy/"), r.stderr[-3000:]


def test_the_terminal_gets_no_traceback_unless_verbose_and_the_server_log_keeps_it(capsys):
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from cli.console import tidy_console

    terminal, server = io.StringIO(), []
    console = PrefectConsoleHandler(stream=terminal)
    keeper = logging.Handler()  # stands in for Prefect's API handler: the run's log on the server
    keeper.emit = lambda record: server.append(logging.Formatter().format(record))
    logger = logging.getLogger("prefect.flow_runs.test-less-noise")
    logger.propagate = False
    for h in (console, keeper):
        logger.addHandler(h)
    try:
        def fail():
            try:
                raise RuntimeError("pretrain: torchrun exited with code 1")
            except RuntimeError as e:
                logger.exception("Encountered exception during execution: %r", e)

        tidy_console(tracebacks=False)
        fail()
        printed = terminal.getvalue()
        assert "Encountered exception during execution: RuntimeError(" in printed and "Traceback" not in printed
        assert len(printed.strip().splitlines()) == 1
        assert "Traceback" in server[-1] and "raise RuntimeError" in server[-1]
        tidy_console(tracebacks=True)  # -v
        fail()
        assert "Traceback" in terminal.getvalue()[len(printed):]
    finally:
        for h in (console, keeper):
            logger.removeHandler(h)


def test_a_log_line_does_not_land_inside_the_progress_bar(capsys):
    import logging
    import sys

    from tqdm import tqdm

    from cli.console import tidy_console

    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("nanorun.test-less-noise")
    logger.addHandler(handler)
    try:
        tidy_console(tracebacks=False)
        bar = tqdm(total=10, desc="pretrain", file=sys.stderr, dynamic_ncols=False, ncols=60)
        bar.update(3)
        logger.warning("step 3 val bpb 2.1")
        bar.update(1)
        bar.close()
    finally:
        logger.removeHandler(handler)
    screen = capsys.readouterr().err
    line = next(part for part in screen.replace("\r", "\n").split("\n") if "val bpb" in part)
    assert line == "step 3 val bpb 2.1"  # on a line of its own, not after the bar's text
    assert "pretrain:  40%" in screen.split("step 3 val bpb 2.1\n", 1)[1]  # the bar is drawn again below it


def test_nanorun_nightly_refuses_a_second_run_of_a_night_before_starting_prefect(tmp_path, capsys, monkeypatch):
    import cli.main as cli
    import cli.commands as commands
    from artifacts import ArtifactRef, open_store
    from tests.artifacts.fixtures import put

    store = open_store(str(tmp_path / "main"))
    ref = put(store, ArtifactRef("report", "tiny", "ab" * 8), {"report.md": b"# r"}).ref
    store.set_alias("report", "nightly-tiny-2026-11-21", ref)
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")
    monkeypatch.setattr(commands, "_run_flow", lambda *a, **k: pytest.fail("ran the flow of a refused night"))
    code = cli.main(["--store", store.url, "nightly", "--preset", "tiny", "--date", "2026-11-21"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("nanorun")]
    assert code == 2 and lines == ["nanorun nightly: error: nightly tiny 2026-11-21 already has a report "
                                   "(2026-11-21): set --rerun add for another row of that night or --rerun "
                                   "replace to rebuild it"], err
    assert cli.main(["--store", store.url, "nightly", "--preset", "tiny", "--date", "2026-21-11"]) == 2
    assert "--date '2026-21-11': month must be in 1..12" in capsys.readouterr().err


def test_a_1500_step_run_logs_about_100_step_lines_into_prefect():
    import logging

    from core.train.telemetry import format_step_line
    from flows.tasks import _ForwardToRunLogger

    run_log = []
    run_logger = logging.getLogger("test-less-noise.run")  # stands in for the Prefect task run's logger
    run_logger.propagate = False
    run_logger.setLevel(logging.DEBUG)
    collect = logging.Handler()
    collect.emit = lambda record: run_log.append(record.getMessage())
    run_logger.addHandler(collect)
    nanorun, launch = logging.getLogger("nanorun"), logging.getLogger("nanorun.launch")
    level = nanorun.level
    forward = _ForwardToRunLogger(run_logger)
    launch.addHandler(forward)
    try:
        for verbose in (False, True):
            run_log.clear()
            nanorun.setLevel(logging.DEBUG if verbose else logging.INFO)
            launch.info("[pretrain] launching: torchrun ...")
            for step in range(1, 1501):
                line = format_step_line(step, 1500, 3.0, 1.0, 0.1, 1000.0, 1.0, 10.0, 5.0)
                launch.info("[%s] %s", "pretrain", line)
                if step % 250 == 0:
                    launch.info("[pretrain] step %d | val bpb 2.1", step)
            steps = [m for m in run_log if m.startswith("[pretrain] step ") and "val bpb" not in m]
            if verbose:  # -v: every line
                assert len(steps) == 1500
                continue
            assert len(steps) == 101 and len(run_log) == 101 + 1 + 6  # + the launch line + the eval lines
            assert steps[0].startswith("[pretrain] step 00001/01500")
            assert steps[-1].startswith("[pretrain] step 01500/01500")
            assert steps[1].startswith("[pretrain] step 00015/01500")
    finally:
        launch.removeHandler(forward)
        nanorun.setLevel(level)
        run_logger.removeHandler(collect)
