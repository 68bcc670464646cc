"""One SIGTERM / Ctrl-C stops a run: the trainer's process group is stopped, the temporary Prefect
server too, and the command exits within 30 s with a resume hint (128 + the signal)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO
from tests.flows.prefect_server import prefect_env

# `nanorun` with the test stage registered (a subprocess cannot be monkeypatched)
NANORUN = ("import sys, stages.registry; stages.registry.STAGE_MODULES['sleepy'] = 'tests.flows.sleepy_stage'; "
           "from cli.main import main; sys.exit(main(sys.argv[1:]))")


def _stat(pid) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie is dead, only not yet reaped


def _members(sessions: set[int]) -> list[str]:
    """Live processes whose session is one of `sessions`, with their command lines."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(entry)
        if fields is not None and fields[0] != "Z" and int(fields[3]) in sessions:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f"{entry}: " + f.read().replace(bytes(1), b" ").decode(errors="replace")[:120])
            except OSError:
                pass  # exited while we looked
    return found


def _wait_for(path, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"nanorun exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the trainer never started"
        time.sleep(0.1)


@pytest.mark.slow
def test_one_sigterm_stops_trainer_and_prefect_server_and_exits_with_a_hint(tmp_path):
    pids = tmp_path / "trainer.pids"
    env = prefect_env(tmp_path, PYTHONPATH=str(REPO), NANORUN_PROGRESS_BAR="0")
    env.pop("PREFECT_API_URL", None)  # a temporary server, started (and to be stopped) by the run
    proc = subprocess.Popen([sys.executable, "-c", NANORUN, "stage", "sleepy", "--set", f"pid_file={pids}"],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(pids, proc, 180)  # the temporary Prefect server takes most of that
        trainer, worker = map(int, pids.read_text().split())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    hint = [line for line in err.splitlines() if line.startswith("nanorun stage sleepy: interrupted by SIGTERM")]
    assert len(hint) == 1 and "run the same command again to resume" in hint[0], err[-3000:]
    assert seconds < 30
    # nothing of the run is left: not the CLI's session (its temporary Prefect server), not the
    # trainer's (launch() starts it in a session of its own) nor its worker
    left = _members({proc.pid, trainer})
    assert not left and not _alive(trainer) and not _alive(worker), left


def test_a_signal_stops_the_flow_thread_and_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys):
    """In-process, no Prefect: the signal reaches the main thread while the 'flow' runs launch() on
    another thread (as Prefect's task workers do); the child is stopped, the exit code is 130."""
    import cli.commands as commands
    import stagekit.launch as launch_mod

    exits = []
    monkeypatch.setattr(commands, "_exit_now", lambda what, signum: exits.append(signum))  # the watchdog's
    monkeypatch.setattr(launch_mod, "INTERRUPT_GRACE", 1.0)
    pid_file = tmp_path / "child.pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('up', flush=True); time.sleep(600)"

    def flow():
        launch_mod.launch([sys.executable, "-c", code], name="child")

    def interrupt():
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    handlers = {s: signal.getsignal(s) for s in commands.SIGNALS}
    try:
        with pytest.raises(SystemExit) as exit_:
            commands._run_interruptible("stage child", flow, {})
    finally:
        launch_mod.SHUTDOWN.clear()
        for s, handler in handlers.items():  # the interrupted path leaves its handlers for the exit
            signal.signal(s, handler)
    assert exit_.value.code == 130 and exits == []
    assert "nanorun stage child: interrupted by SIGINT: run the same command again" in capsys.readouterr().err
    assert not _alive(int(pid_file.read_text()))


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live children of `pid`."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(entry)
        if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().replace(bytes(1), b" ").decode(errors="replace")
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_a_sigkilled_cli_takes_its_temporary_prefect_server_with_it(tmp_path):
    """SIGKILL runs no handler and no atexit: the server must still stop within seconds."""
    pids = tmp_path / "trainer.pids"
    env = prefect_env(tmp_path, PYTHONPATH=str(REPO), NANORUN_PROGRESS_BAR="0")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", NANORUN, "stage", "sleepy", "--set", f"pid_file={pids}"],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    servers: list[int] = []
    try:
        _wait_for(pids, proc, 180)
        servers = [pid for pid, cmd in _children(proc.pid).items() if "uvicorn" in cmd and "prefect" in cmd]
        assert len(servers) == 1, _children(proc.pid)
        time.sleep(0.5)  # the CLI's loop guards a new server within 0.2 s
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(servers[0]), "the temporary Prefect server outlived its SIGKILLed CLI"
    finally:
        for pid in _members({proc.pid}):  # the trainer the dead CLI left behind
            os.kill(int(pid.split(":")[0]), signal.SIGKILL)
        for pid in [p for p in servers if _alive(p)]:
            os.kill(pid, signal.SIGKILL)
