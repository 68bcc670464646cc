"""Run a training entry point under torchrun as a subprocess, supervised.

Why a subprocess and not an in-process call: torchrun owns the worker processes (one per GPU or
CPU slot), and a Prefect task's own timeout cannot interrupt a running subprocess (docs/versions.md#prefect-3), so
the launcher enforces the timeout itself by signalling the whole process group (TERM, then KILL).

    result = launch(torchrun_cmd("core.train.pretrain", ["--config", "cfg.json"], nproc=2),
                    log_path=out / "train.log", timeout=3600, name="pretrain")

Every output line goes to the log file and to the `nanorun.launch` logger (the Prefect wrapper
forwards that logger to the run log); when the child is silent for `heartbeat` seconds a
"still running" line is logged; a non-zero exit raises LaunchError naming the last error lines.

Shutdown: request_shutdown() (the CLI calls it on SIGTERM / Ctrl-C) makes every launch() in the
process, on whatever thread (Prefect runs submitted tasks on worker threads, which never see a
signal), stop its child within INTERRUPT_GRACE seconds (TERM to the group, then KILL) and raise
Interrupted. An exception reaching launch() (KeyboardInterrupt on the main thread) does the same.

A child that must never pause (chat_eval's grader, whose model-written programs might try to stop
it) is launched with `stopped_limit`: a leader stopped (SIGSTOP / SIGTSTP) for that many seconds
is killed and reported as a failure in one line, instead of the caller waiting on it for ever.
"""
from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from artifacts.errors import LeaseLostError
from artifacts.lease import lost_lease
from core.openmp import wait_env

log = logging.getLogger("nanorun.launch")

INTERRUPT_GRACE = 10.0  # seconds between TERM and KILL when the run is interrupted (timeouts: kill_grace)
SHUTDOWN = threading.Event()  # set by request_shutdown(): every launch() in this process stops its child

_WORKER_SIGNAL = re.compile(r"exitcode\s*:\s*-(\d+)")
_ERROR_MARKERS = ("Error", "Exception", "Traceback", "error:", "FAILED", "Killed", "RuntimeError")


class LaunchError(RuntimeError):
    """The supervised process failed (non-zero exit, timeout or signal)."""

    def __init__(self, message: str, returncode: int | None, tail: list[str], headline: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.tail = tail
        self.headline = headline or message.split("\n", 1)[0]  # the one line for tables and the CLI


def signal_name(returncode: int | None, tail: list[str]) -> str | None:
    """The signal that killed the process, or (torchrun exits 1 when a worker dies) one of its
    workers ("exitcode: -9" in the agent's summary): "SIGKILL", or None for a plain failure."""
    num = -returncode if returncode is not None and returncode < 0 else None
    if num is None:
        num = next((int(m.group(1)) for line in reversed(tail) if (m := _WORKER_SIGNAL.search(line))), None)
    if num is None and any("stopped by SIGTERM" in line for line in tail):
        return "SIGTERM"  # the trainer saved a checkpoint and left with 128+15 (core.train.common.stop_run)
    if num is None:
        return None
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class Interrupted(LaunchError):
    """The run was interrupted (request_shutdown()): the child was stopped before it finished."""


_RUNNING: set[int] = set()  # process groups (= leader pids) of the children being supervised now


def request_shutdown() -> None:
    """Stop every supervised child of this process (called from a signal handler: only sets a flag)."""
    SHUTDOWN.set()


def supervising() -> bool:
    """Whether a launch() of this process still has a child running (or being stopped)."""
    return bool(_RUNNING)


def kill_running() -> None:
    """KILL every supervised process group at once: the last resort of a process about to exit."""
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A process that exits while launch() still supervises a child (a flow run a worker TERMs when the
# run is cancelled from the UI: Prefect turns the signal into an exception on the main thread and
# the task threads are abandoned) must not leave trainers running in their own sessions. At
# interpreter shutdown, threading joins executor threads (blocked in launch()) before atexit
# handlers run, so the stop request goes on threading's own exit hooks, which run first (newest
# first: after concurrent.futures' join hook was registered, so before it); atexit kills what is left.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(request_shutdown)
atexit.register(kill_running)


@dataclass
class LaunchResult:
    returncode: int
    seconds: float
    lines: int


@dataclass(frozen=True)
class Rendezvous:
    """Multi-node torchrun settings (all nodes run the same command with their own node_rank)."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = ""  # host:port of node 0's c10d store, e.g. "10.0.0.1:29500"
    run_id: str = "nanorun"

    def __post_init__(self):
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and ":" not in self.endpoint:
            raise ValueError(f"multi-node training needs rendezvous endpoint host:port, got {self.endpoint!r}")


def torchrun_cmd(module: str, args: list[str], *, nproc: int = 1, rdzv: Rendezvous | None = None,
                 python: str | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m module args` for one node or a multi-node job."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if rdzv is None or rdzv.nnodes == 1:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        # is_host: node 0 serves the rendezvous store; stating it keeps several "nodes" on one
        # machine (tests, a workstation) from all trying to serve it
        cmd += [f"--nnodes={rdzv.nnodes}", f"--node_rank={rdzv.node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rdzv.endpoint}", f"--rdzv_id={rdzv.run_id}",
                f"--rdzv_conf=is_host={str(rdzv.node_rank == 0).lower()}"]
    cmd += [f"--nproc_per_node={nproc}", "-m", module, *args]
    return cmd


def worker_env(nproc: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the workers: unbuffered output, CPU threads split between processes."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # torchrun sets OMP_NUM_THREADS=1 for nproc > 1 unless told otherwise; on a CPU box that wastes
    # cores, on a GPU box one thread per process is right. Split the cores we are allowed to use.
    # idle OpenMP threads sleep: spinning ones take the cores a neighbour needs (core/openmp.py)
    env.update(wait_env(env))
    if "OMP_NUM_THREADS" not in (extra or {}):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, nproc)))
    # The repo root must be importable by the workers even when not installed (tests, dev trees).
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def _stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal or a tracer (state T or t in /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1][:1] in (b"T", b"t")  # the name in (...) may hold spaces
    except (OSError, IndexError):
        return False


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """TERM the process group, wait `grace` seconds, then KILL whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # the leader may be gone while torchrun's workers linger: always sweep the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def launch(cmd: list[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
           cwd: Path | None = None, timeout: float | None = None, heartbeat: float = 60.0,
           kill_grace: float = 30.0, name: str = "process",
           on_line: Callable[[str], None] | None = None, stopped_limit: float | None = None) -> LaunchResult:
    """Run `cmd` in its own process group, streaming its output; raise LaunchError on failure
    (stopped_limit: kill the child once it has stayed stopped that many seconds)."""
    if SHUTDOWN.is_set():
        raise Interrupted(f"{name} was not started: the run is being interrupted", None, [])
    log.info("[%s] launching: %s", name, " ".join(cmd))
    t0 = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=200)
    state = {"last_output": t0, "lines": 0}
    logf = open(log_path, "a", encoding="utf-8", errors="replace") if log_path else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)  # own process group: we can signal all of it
    _RUNNING.add(proc.pid)

    lines: queue.Queue[str | None] = queue.Queue()

    def pump():  # reader thread: only reads; everything else happens on the caller's thread, so
        # that loggers and progress reporters bound to the caller (a Prefect task run) see the lines
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            # tqdm-style carriage-return updates: keep only the final state of the line
            lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1])
        lines.put(None)

    def handle(line: str) -> None:
        state["last_output"] = time.monotonic()
        state["lines"] += 1
        tail.append(line)
        if logf:
            logf.write(line + "\n")
            logf.flush()
        log.info("[%s] %s", name, line)
        if on_line:
            try:
                on_line(line)
            except Exception:
                log.debug("on_line callback failed", exc_info=True)

    reader = threading.Thread(target=pump, name=f"launch-{name}", daemon=True)
    reader.start()
    timed_out = False
    stopped_since: float | None = None  # when the leader was last seen running -> stopped
    stopped_for = 0.0
    eof = False
    try:
        while True:
            if (lost := lost_lease()) is not None:  # another builder owns the work dir now: stop ours
                _kill_group(proc, 0)  # at once: no checkpoint may land in someone else's work dir
                raise LeaseLostError(lost.lost_message())
            try:  # no `continue` after a line: a chatty child must not starve the checks below
                line = lines.get(timeout=0.5)
                if line is None:
                    eof = True
                else:
                    handle(line)
            except queue.Empty:
                pass
            if proc.poll() is not None:
                # a grandchild that inherited our stdout can keep the pipe open after the leader
                # exits: stop reading a few seconds after the exit instead of waiting for EOF
                exited_at = state.setdefault("exited_at", time.monotonic())
                if eof or time.monotonic() - exited_at > 3.0:
                    break
            now = time.monotonic()
            if SHUTDOWN.is_set():
                log.warning("[%s] the run is being interrupted: stopping the process group (pid %d)", name, proc.pid)
                _kill_group(proc, min(kill_grace, INTERRUPT_GRACE))
                raise Interrupted(f"{name} was stopped after {now - t0:.0f} s: the run was interrupted",
                                  proc.returncode, list(tail))
            if timeout is not None and now - t0 > timeout:
                timed_out = True
                log.error("[%s] timeout after %.0f s: sending SIGTERM to the process group", name, now - t0)
                _kill_group(proc, kill_grace)
                break
            if stopped_limit is not None and proc.returncode is None:
                if not _stopped(proc.pid):
                    stopped_since = None
                elif stopped_since is None:
                    stopped_since = now
                elif now - stopped_since > stopped_limit:
                    stopped_for = now - stopped_since
                    log.error("[%s] stopped by a signal for %.0f s: killing the process group (pid %d)",
                              name, stopped_for, proc.pid)
                    _kill_group(proc, 0)  # a stopped process cannot act on TERM: KILL at once
                    break
            if now - state["last_output"] > heartbeat:
                log.info("[%s] still running (pid %d, %.0f s elapsed, silent for %.0f s)",
                         name, proc.pid, now - t0, now - state["last_output"])
                state["last_output"] = now
    except Interrupted:
        raise
    except BaseException:
        # The caller is going away (Ctrl-C, task cancelled): never leave orphaned trainers behind,
        # and be quick about it (the CLI promises to exit within 30 s).
        _kill_group(proc, min(kill_grace, INTERRUPT_GRACE))
        raise
    finally:
        _RUNNING.discard(proc.pid)
        reader.join(timeout=1 if SHUTDOWN.is_set() else 10)
        while True:  # whatever arrived after the loop stopped (a timeout's last words)
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                handle(line)
        if logf:
            logf.close()

    seconds = time.monotonic() - t0
    rc = proc.returncode
    if timed_out:
        raise LaunchError(f"{name} timed out after {timeout:.0f} s and was killed; "
                          f"last lines:\n{failure_summary(tail)}", rc, list(tail))
    if stopped_for:
        raise LaunchError(f"{name} was stopped by a signal for {stopped_for:.0f} s and was killed after {seconds:.0f} s;"
                          f" last lines:\n{failure_summary(tail)}", rc, list(tail),
                          f"{name} stopped by a signal for {stopped_for:.0f} s, killed after {seconds:.0f} s")
    if rc != 0:
        sig = signal_name(rc, list(tail))
        how = f"was killed by {sig}" if rc < 0 else f"exited with code {rc}" + (f" (a worker was killed by {sig})" if sig else "")
        headline = f"{name} killed by {sig} after {seconds:.0f} s" if sig else f"{name} exited with code {rc} after {seconds:.0f} s"
        raise LaunchError(f"{name} {how} after {seconds:.0f} s; last error lines:\n{failure_summary(tail)}",
                          rc, list(tail), headline)
    log.info("[%s] finished in %.1f s", name, seconds)
    return LaunchResult(returncode=rc, seconds=seconds, lines=state["lines"])


def failure_summary(tail, n: int = 15, max_lines: int = 60) -> str:
    """The lines worth reading from the end of a failed run's output.

    torchrun's agent ends every failure with its own ChildFailedError traceback, which only says
    that a worker failed: the cause is in the workers' lines before it. Among those the first
    traceback wins (with several ranks the first is usually the root cause; the others fail on the
    dead peer), else the first error marker (a one-line `error:` of a refused start), else the last
    n lines. The agent's one-line verdict is kept at the end."""
    lines = list(tail)
    end = next((i for i, line in enumerate(lines) if "elastic" in line and "failed (exitcode" in line), len(lines))
    worker = lines[:end]
    start = next((i for i, line in enumerate(worker) if "Traceback (most recent call last)" in line), None)
    if start is None:
        start = next((i for i, line in enumerate(worker) if any(m in line for m in _ERROR_MARKERS)),
                     max(0, len(worker) - n))
    picked = worker[start:start + max_lines] + lines[end:end + 1]
    return "\n".join("  | " + line for line in picked) if picked else "  | (no output)"
