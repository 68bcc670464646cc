"""Run model-written Python in a guarded subprocess (HumanEval grading, RL rewards on code).

    from core.sandbox import execute_code, execute_many
    r = execute_code("def f(x):\\n    return x + 1\\nassert f(1) == 2")
    r.success, r.status, r.reason          # True, "passed", ""
    execute_code("while True: pass", timeout=1.0).status          # "timeout"
    execute_many([prog1, prog2, prog3], workers=2)                # results in order, 2 at a time

After the human-eval harness (openai/human-eval: execution.py) and the reference's
nanochat/execution.py, which it follows; what this adds is marked (+). Each program:
- runs in a fresh interpreter (`python -I -S`: no site-packages, no PYTHON* variables, no user
  site), never in the evaluator's process; stdin is /dev/null, file descriptors are not inherited;
- gets a scrubbed environment (PATH, a UTF-8 locale, HOME and TMPDIR = its working directory) and
  a fresh temporary directory as cwd, deleted afterwards;
- limits: wall time (the parent kills the whole process group), CPU time (RLIMIT_CPU, +),
  address space (RLIMIT_AS, 256 MB by default; also DATA and STACK), written file size
  (RLIMIT_FSIZE, +: the write fails with 'File too large'), no child processes (RLIMIT_NPROC 0,
  +: the kernel enforces it for non-root users only), stdout/stderr capped (+: the parent stops
  reading and kills the program);
- guards installed before the untrusted code runs: destructive and process calls raise
  PermissionError (os.system/kill/fork/exec*/spawn*/remove/unlink/rmdir/rename/chmod/...,
  shutil.rmtree/move, subprocess.Popen); socket creation is refused (+); open()/os.open() may
  write only inside the working directory and read only there and in Python's own installation
  (+: so neither /proc/<parent>/environ nor ~/.ssh); ctypes, multiprocessing, resource, pty, ...
  cannot be imported (+).
A program passes only when it runs to its end: an exit halfway (sys.exit(0), os._exit(0)) skips
whatever followed, the tests, and fails, as in human-eval (the reference counts exit status 0).
Every failure comes back as ExecutionResult(success=False, status, reason): the evaluator never
raises because of the program. This is NOT a security boundary: the guards live in the same
interpreter as the code they guard, and a program that wants out (e.g. through gc or the
interpreter's internals) gets out; as root the rlimits can be raised again. It stops accidents
and the usual mistakes of generated code (infinite loops, huge allocations, stray writes, forks,
network calls); run untrusted models inside a container or VM as well.
"""
from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MEMORY_BYTES = 256 * 1024 * 1024   # the reference's default address-space limit
OUTPUT_BYTES = 64 * 1024           # per stream
FILE_BYTES = 16 * 1024 * 1024      # largest file the program may write


@dataclass
class ExecutionResult:
    success: bool
    status: str          # passed | error | timeout | cpu | memory | output | killed
    reason: str          # one line, "" when passed: the exception, or which limit stopped it
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def timeout(self) -> bool:
        return self.status in ("timeout", "cpu")

    @property
    def memory_exceeded(self) -> bool:
        return self.status == "memory"


# The runner: reads the program, installs the limits and guards, then executes it in fresh
# globals. Its own names are deleted before exec so the program sees a plain interpreter.
RUNNER = r'''
import builtins, faulthandler, io, json, os, resource, shutil, socket, subprocess, sys
_code_path, _limits = sys.argv[1], json.loads(sys.argv[2])
del sys.argv[1:]
with open(_code_path, encoding="utf-8") as _f:
    _code = _f.read()
_cpu = _limits["cpu_seconds"]
for _res, _val in ((resource.RLIMIT_AS, _limits["memory_bytes"]), (resource.RLIMIT_DATA, _limits["memory_bytes"]),
                   (resource.RLIMIT_STACK, _limits["memory_bytes"]), (resource.RLIMIT_FSIZE, _limits["file_bytes"]),
                   (resource.RLIMIT_CPU, (_cpu, _cpu + 1)), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    _soft, _hard = _val if isinstance(_val, tuple) else (_val, _val)
    try:
        resource.setrlimit(_res, (_soft, _hard))
    except (ValueError, OSError):  # e.g. STACK above the current hard limit: keep the system's
        pass
faulthandler.disable()

def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is disabled")
    return refused

for _name in ("system", "kill", "killpg", "fork", "forkpty", "vfork", "popen", "putenv", "unsetenv",
              "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate",
              "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "lchflags", "chflags", "chroot", "chdir",
              "fchdir", "setuid", "seteuid", "setgid", "setegid", "setsid", "setpgid", "symlink", "link",
              "mkfifo", "mknod", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
              "posix_spawn", "posix_spawnp", "plock", "nice"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse(f"os.{_name}"))
for _name in ("rmtree", "move", "chown", "copytree", "make_archive"):
    setattr(shutil, _name, _refuse(f"shutil.{_name}"))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _refuse(f"subprocess.{_name}"))
import _socket
for _mod in (socket, _socket):
    for _name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _refuse("network access"))

_work = os.path.realpath(os.getcwd())
_readable = (_work,) + tuple(sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                    sys.base_exec_prefix)}))
_devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")

def _inside(path, roots):
    return any(path == r or path.startswith(r + os.sep) for r in roots)

def _check(file, writing):
    if isinstance(file, int):  # an already open descriptor
        return
    path = os.path.realpath(os.path.join(_work, os.fsdecode(os.fspath(file))))
    if path in _devices or _inside(path, (_work,) if writing else _readable):
        return
    raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} {path} is outside the sandbox")

_open, _os_open = builtins.open, os.open

def _guarded_open(file, mode="r", *args, **kwargs):
    _check(file, any(c in mode for c in "wax+"))
    return _open(file, mode, *args, **kwargs)

def _guarded_os_open(path, flags, *args, **kwargs):
    _check(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)))
    return _os_open(path, flags, *args, **kwargs)

builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in ("mkdir", "makedirs"):
    _real = getattr(os, _name)
    setattr(os, _name, (lambda real: lambda path, *a, **k: (_check(path, True), real(path, *a, **k))[1])(_real))
builtins.exit = builtins.quit = _refuse("exit()")
builtins.help = _refuse("help()")
for _name in ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "_posixsubprocess", "pty", "resource",
              "psutil", "joblib", "ipdb", "tkinter", "_socket", "ssl", "_ssl"):
    sys.modules[_name] = None
_program = compile(_code, "<program>", "exec")
del _code
try:
    exec(_program, {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as _exit:  # whatever came after the exit (the tests) never ran
    sys.stderr.write(f"\nsandbox: the program exited (code {_exit.code!r}) before its end\n")
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
os._exit(_limits["done_status"])
'''


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work,
            "OMP_NUM_THREADS": "1"}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: whatever it started goes too
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code: str, timeout: float = 5.0, cpu_seconds: int | None = None,
                 memory_bytes: int | None = MEMORY_BYTES, output_bytes: int = OUTPUT_BYTES,
                 file_bytes: int = FILE_BYTES) -> ExecutionResult:
    """Run `code` in the sandbox. timeout: wall seconds; cpu_seconds: CPU time (default: the wall
    timeout rounded up); memory_bytes: address space (None = unlimited); output_bytes: per stream."""
    if timeout <= 0 or output_bytes < 1:
        raise ValueError(f"execute_code: need timeout > 0 and output_bytes >= 1, got {timeout} and {output_bytes}")
    unlimited = -1  # resource.RLIM_INFINITY on Linux (the evaluator need not import resource)
    limits = {"cpu_seconds": int(cpu_seconds or -(-timeout // 1)), "file_bytes": int(file_bytes),
              "memory_bytes": unlimited if memory_bytes is None else int(memory_bytes),
              # the runner exits with this status only when the program ran to its end, so an
              # os._exit(0) halfway (before the tests) is not a pass
              "done_status": random.SystemRandom().randrange(10, 250)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanorun-sandbox-") as root:
        work = Path(root) / "work"
        work.mkdir()
        program = Path(root) / "program.py"  # outside the program's cwd: it cannot rewrite itself
        program.write_text(code, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", RUNNER, str(program), json.dumps(limits)],
                                cwd=work, env=_env(str(work)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        out, verdict = _collect(proc, t0 + timeout, output_bytes)
    seconds = time.perf_counter() - t0
    stdout, stderr = (out[k].decode("utf-8", errors="replace") for k in ("stdout", "stderr"))
    if verdict == "timeout":
        return ExecutionResult(False, "timeout", f"timed out after {timeout:g}s (killed)", stdout, stderr, seconds)
    if verdict == "output":
        return ExecutionResult(False, "output", f"output over {output_bytes} bytes (killed)", stdout, stderr, seconds)
    rc = proc.returncode
    last = (stderr.strip().splitlines() or [""])[-1][:300]
    if rc == limits["done_status"]:
        return ExecutionResult(True, "passed", "", stdout, stderr, seconds)
    if rc == 0:
        return ExecutionResult(False, "error", "the program exited (status 0) before its end", stdout, stderr,
                               seconds)
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and seconds >= limits["cpu_seconds"]):
        return ExecutionResult(False, "cpu", f"CPU time over {limits['cpu_seconds']}s (killed)", stdout, stderr,
                               seconds)
    if "MemoryError" in stderr or rc == -signal.SIGSEGV:
        mb = "unlimited" if memory_bytes is None else f"{memory_bytes // 2**20} MB"
        return ExecutionResult(False, "memory", f"memory limit ({mb} address space): {last or 'crashed'}", stdout,
                               stderr, seconds)
    if rc < 0:
        return ExecutionResult(False, "killed", f"killed by signal {signal.Signals(-rc).name}", stdout, stderr,
                               seconds)
    return ExecutionResult(False, "error", last or f"exit status {rc}", stdout, stderr, seconds)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[dict[str, bytes], str]:
    """Read both pipes until they close, the deadline passes or a stream goes over `cap` bytes
    (then the process group is killed): (outputs, "" | "timeout" | "output")."""
    bufs = {"stdout": bytearray(), "stderr": bytearray()}
    verdict = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while sel.get_map() and not verdict:
            left = deadline - time.perf_counter()
            if left <= 0:
                verdict = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                buf += chunk[:cap + 1 - len(buf)]
                if len(buf) > cap:
                    verdict = "output"
    if not verdict:
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:  # closed its pipes but kept running
            verdict = "timeout"
    if verdict:
        _kill(proc)
        proc.wait()
    _kill(proc)  # anything left in its group (it could not fork, but be sure)
    proc.stdout.close()
    proc.stderr.close()
    return {k: bytes(v[:cap]) for k, v in bufs.items()}, verdict


def execute_many(programs: list[str], workers: int = 2, **limits) -> list[ExecutionResult]:
    """execute_code over many programs, at most `workers` at a time; results in input order."""
    if workers < 1:
        raise ValueError(f"execute_many: workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: execute_code(code, **limits), programs))
