"""The supervised launcher: output streaming, failure messages, timeouts that kill the whole group."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from stagekit.launch import LaunchError, Rendezvous, failure_summary, launch, torchrun_cmd, worker_env
from tests.conftest import REPO


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(") ")[1][0] != "Z"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_streams_every_line_to_log_file_and_logger(tmp_path, caplog):
    log_path = tmp_path / "run.log"
    seen = []
    with caplog.at_level(logging.INFO, logger="nanorun.launch"):
        res = launch(_py("""
            import sys
            for i in range(5):
                print(f"step {i}", flush=True)
            print("progress 1\\rprogress 2", flush=True)
            print("to stderr", file=sys.stderr, flush=True)
        """), log_path=log_path, name="demo", on_line=seen.append)
    assert res.returncode == 0 and res.lines == 7
    text = log_path.read_text()
    assert "step 4" in text and "to stderr" in text
    assert "progress 2" in seen and "progress 1\rprogress 2" not in seen  # CR updates collapsed
    assert any("[demo] step 3" in r.getMessage() for r in caplog.records)


def test_failure_names_the_last_error_lines(tmp_path):
    with pytest.raises(LaunchError) as ei:
        launch(_py("""
            print("loading", flush=True)
            def f(): raise ValueError("tokenizer/model mismatch: vocab 100 vs 200")
            f()
        """), name="trainer")
    msg = str(ei.value)
    assert "trainer exited with code 1" in msg
    assert "Traceback" in msg and "ValueError: tokenizer/model mismatch" in msg
    assert ei.value.returncode == 1


def test_timeout_terminates_the_whole_process_group(tmp_path):
    # The child starts a grandchild (as torchrun starts workers); both must be gone after the timeout.
    pidfile = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        print("started", flush=True)
        time.sleep(600)
    """
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="timed out after 2 s"):
        launch(_py(code), timeout=2, kill_grace=2, name="sleeper")
    assert time.monotonic() - t0 < 15
    gpid = int(pidfile.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(gpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {gpid} survived the timeout")


def test_term_is_tried_before_kill(tmp_path):
    marker = tmp_path / "cleaned"
    code = f"""
        import signal, sys, time
        def bye(*_):
            open({str(marker)!r}, "w").write("ok"); sys.exit(143)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(600)
    """
    with pytest.raises(LaunchError):
        launch(_py(code), timeout=1.5, kill_grace=5, name="polite")
    assert marker.read_text() == "ok"


def test_heartbeat_while_silent(caplog):
    with caplog.at_level(logging.INFO, logger="nanorun.launch"):
        launch(_py("import time; time.sleep(2.5)"), heartbeat=1.0, name="quiet")
    assert any("still running" in r.getMessage() for r in caplog.records)


def test_torchrun_command_shapes():
    single = torchrun_cmd("core.train.pretrain", ["--depth", "4"], nproc=2)
    assert single[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=2" in single and single[-3:] == ["core.train.pretrain", "--depth", "4"]
    multi = torchrun_cmd("m", [], nproc=8, rdzv=Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.1:29500"))
    assert "--nnodes=2" in multi and "--node_rank=1" in multi and "--rdzv_endpoint=10.0.0.1:29500" in multi
    assert "--standalone" not in multi
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        Rendezvous(nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        Rendezvous(nnodes=2, node_rank=2, endpoint="h:1")


def test_worker_env_splits_cores():
    env = worker_env(2)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert worker_env(1, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_worker_env_passive_openmp_unless_the_user_chose(monkeypatch):
    """Workers' OpenMP threads sleep when idle (core/openmp.py); a wait policy in the user's environment wins."""
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    env = worker_env(1)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")  # a dedicated machine: the user opts into spinning
    env = worker_env(1)
    assert env["GOMP_SPINCOUNT"] == "20000" and "OMP_WAIT_POLICY" not in env


def test_torchrun_two_gloo_workers_really_run(tmp_path):
    """The real torchrun on CPU: two processes, a gloo all_reduce, output from both ranks."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        # one write per line: print() writes text and newline separately, and the two workers share a pipe
        sys.stdout.write(f"rank {dist.get_rank()} sum {t.item():.0f}\\n"); sys.stdout.flush()
        dist.destroy_process_group()
    """))
    lines = []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           "--nproc_per_node=2", str(script)]
    launch(cmd, env=worker_env(2), name="gloo", on_line=lines.append, timeout=120)
    assert sorted(l for l in lines if l.startswith("rank")) == ["rank 0 sum 3", "rank 1 sum 3"]


def test_returns_when_a_grandchild_keeps_stdout_open():
    code = """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # inherits stdout
        print("leader done", flush=True)
    """
    t0 = time.monotonic()
    res = launch(_py(code), name="leaky")
    assert res.returncode == 0 and time.monotonic() - t0 < 15


def test_failure_summary_skips_torchruns_own_traceback():
    tail = ["step 00003/00024 (12.5%) | loss 6.9", "[rank1]: Traceback (most recent call last):",
            '[rank1]:   File "pretrain.py", line 1', "[rank1]: ValueError: boom",
            "[rank0]: Traceback (most recent call last):", "[rank0]: RuntimeError: Connection closed by peer",
            "E1123 ... elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 9)",
            "Traceback (most recent call last):", "torch.distributed.elastic...ChildFailedError:"]
    text = failure_summary(tail)
    assert text.splitlines()[0] == "  | [rank1]: Traceback (most recent call last):"
    assert "ValueError: boom" in text and "failed (exitcode: 1)" in text and "ChildFailedError" not in text
    killed = failure_summary(["step 00009/00024 ...", "E1123 elastic/x.py] failed (exitcode: -9) local_rank: 0",
                                     "Traceback (most recent call last):"])
    assert killed.splitlines()[-1].endswith("failed (exitcode: -9) local_rank: 0")
    assert failure_summary([]) == "  | (no output)"


# ---- interruption: no child outlives a shutdown, an exception or a signal ------------------------
@pytest.fixture
def shutdown(monkeypatch):
    import stagekit.launch as launch_mod

    monkeypatch.setattr(launch_mod, "INTERRUPT_GRACE", 1.0)
    yield launch_mod
    launch_mod.SHUTDOWN.clear()


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("ignore_term", [False, True])
def test_shutdown_stops_a_child_running_on_another_thread(shutdown, tmp_path, ignore_term):
    """Prefect runs submitted tasks on worker threads, which a signal never reaches: the CLI's
    request_shutdown() must stop their children all the same (TERM, then KILL after the grace)."""
    import threading

    pidfile = tmp_path / "pids"
    code = f"""
        import os, signal, subprocess, sys, time
        if {ignore_term}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{p.pid}}")
        while True:                                   # chatty: lines must not starve the checks
            print("step", flush=True)
            time.sleep(0.001)
    """
    raised = []

    def run():
        try:
            launch(_py(code), kill_grace=30, name="worker-thread")
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and len(pidfile.read_text().split()) == 2):
        assert time.monotonic() < deadline and thread.is_alive(), raised
        time.sleep(0.05)
    t0 = time.monotonic()
    shutdown.request_shutdown()
    thread.join(15)
    assert not thread.is_alive() and time.monotonic() - t0 < 5      # grace 1 s, not kill_grace's 30 s
    assert isinstance(raised[0], shutdown.Interrupted) and "the run was interrupted" in str(raised[0])
    assert all(_gone(int(pid)) for pid in pidfile.read_text().split())
    with pytest.raises(shutdown.Interrupted, match="not started"):   # nothing new starts afterwards
        launch(_py("print('never')"), name="late")


def test_an_exception_on_the_callers_thread_kills_quickly(shutdown, tmp_path):
    """Ctrl-C on the main thread lands in launch(): TERM, then KILL after INTERRUPT_GRACE."""
    import threading

    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """
    seen = threading.Event()

    def on_line(line):
        if line == "ready":
            seen.set()
            raise_later.start()

    def interrupt():
        import _thread

        _thread.interrupt_main()

    raise_later = threading.Timer(0.2, interrupt)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch(_py(code), kill_grace=30, name="main-thread", on_line=on_line)
    assert seen.is_set() and time.monotonic() - t0 < 10


def test_a_signal_is_reported_as_such():
    with pytest.raises(LaunchError) as ei:
        launch(_py("""
            import os, signal
            print("step 3", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """), name="pretrain")
    assert ei.value.headline.startswith("pretrain killed by SIGKILL after ")
    assert str(ei.value).startswith("pretrain was killed by SIGKILL after ")
    # torchrun's leader exits 1 when a worker dies; its summary names the worker's signal
    from stagekit.launch import signal_name

    assert signal_name(1, ["  exitcode  : -9 (pid: 123)"]) == "SIGKILL" and signal_name(1, ["error: x"]) is None
    # a trainer that saved on SIGTERM and left with 128+15 (core.train.common.stop_run)
    assert signal_name(143, ["step 00005/00024 | stopped by SIGTERM: rerun to resume from the checkpoint of step 5"]) \
        == "SIGTERM"


def test_a_process_exiting_while_a_thread_supervises_a_child_stops_it(tmp_path):
    """A flow run cancelled from the UI: its process exits with launch() still running on a task
    thread; the trainer (in its own session) must not outlive it."""
    pidfile = tmp_path / "child.pid"
    script = f"""
        import sys, time
        from concurrent.futures import ThreadPoolExecutor
        from stagekit.launch import launch
        child = "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
        ThreadPoolExecutor(1).submit(launch, [sys.executable, "-c", child], name="child")
        while True:
            time.sleep(0.1)
            try:
                open({str(pidfile)!r}).read()
                break
            except OSError:
                pass
    """
    t0 = time.monotonic()
    subprocess.run(_py(script), cwd=REPO, timeout=60, check=True)
    assert time.monotonic() - t0 < 30
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def test_a_stopped_child_is_killed_and_reported_in_one_line():
    """A child stopped by SIGSTOP (say by a program it ran) would keep its caller waiting for ever:
    with stopped_limit it is killed once it has stayed stopped that long, and the failure is one line."""
    code = """
        import os, signal, time
        print("grading", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        print("resumed", flush=True)
    """
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as ei:
        launch(_py(code), name="chat_eval", stopped_limit=1.0)
    assert time.monotonic() - t0 < 15
    assert ei.value.headline.startswith("chat_eval stopped by a signal for ") and "\n" not in ei.value.headline
    assert "resumed" not in ei.value.tail and ei.value.returncode == -9
    # a pause shorter than the limit is not a failure (SIGCONT from the child's own helper)
    resumed = launch(_py("""
        import os, signal, subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import os, signal, time; time.sleep(1); os.kill(%d, signal.SIGCONT)"
                          % os.getpid()])
        os.kill(os.getpid(), signal.SIGSTOP)
        print("resumed", flush=True)
    """), name="chat_eval", stopped_limit=5.0)
    assert resumed.returncode == 0 and resumed.lines == 1
