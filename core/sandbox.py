"""Run model-written Python isolated by the operating system (HumanEval grading, RL rewards on code).

    from core.sandbox import execute_code, execute_many, describe_isolation
    r = execute_code("def f(x):\\n    return x + 1", tests="assert f(1) == 2")
    r.success, r.status, r.reason, r.isolation    # True, "passed", "", "bubblewrap"
    execute_code("while True: pass", timeout=1.0).status          # "timeout"
    execute_many([prog1, prog2, prog3], workers=2)                # results in order, 2 at a time
    describe_isolation()    # "sandbox: bubblewrap (...)" or "sandbox: python guards only (why)"
    python -m bench.humaneval_grading                             # 164 canonical solutions, timed

After the human-eval harness (openai/human-eval: execution.py) and the reference's
nanochat/execution.py; docs/sandbox.md has the threat model, the attacks it was tried with and
what is left. Two layers:
1. The operating system (bubblewrap, `bwrap`, Debian package `bubblewrap`; scripts/test.sh
   installs it). Each program runs in its own network, PID, IPC and UTS namespaces (no network,
   sees no other process, its parent is bwrap's init, never the evaluator), in a file system of
   read-only binds (/usr, Python's installation and site-packages) plus its own directory (the
   only writable place: a 64 MB tmpfs, nothing reaches the disk), no /proc, no capabilities: as
   uid 65534 when the evaluator is root, else in a user namespace (as uid 65534 inside it for a
   root without CAP_SYS_ADMIN); when it ends or is killed, its PID namespace goes and with it
   everything it started (setsid does not escape).
2. Python guards in the program's interpreter: an audit hook (sys.addaudithook: it sees the C
   modules too, posix, _io, _socket, and cannot be removed) refuses process calls, sockets,
   writes outside the directory, reads outside it and Python's installation, imports of ctypes
   and friends, and every way to reach a frame (sys._getframe, tracebacks' tb_frame, gc).
   rlimits: CPU time, address space, file size, core, and the process count (threads count too,
   so only for the uid-65534 identity, with room for threads).
Where bubblewrap cannot run (not installed, or no namespaces allowed) only the second layer is
there: describe_isolation() and every result's `isolation` say "python guards only", and
require_isolation() refuses to serve as an RL reward unless told to accept it.
The verdict cannot be forged by the program: the harness reads a one-time nonce from a pipe and
closes it before the program is compiled; the nonce lives only in the harness's frame (no frame
is reachable, see 2.) and is written to a second pipe after the tests returned normally. The
exit status, argv, environment and files say nothing. A program passes only when its tests ran to
their end: sys.exit(0), os._exit(0) halfway fail, as in human-eval. The program and its tests
are compiled separately, so a reply cannot swallow the tests into a string.
Every failure comes back as ExecutionResult(success=False, status, reason): the evaluator never
raises because of the program. The program runs in a subprocess of this process (under bwrap,
two levels down, in another PID namespace), so nothing it does reaches the evaluator.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
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
WORK_BYTES = 64 * 1024 * 1024      # its whole directory, under bubblewrap (a tmpfs: nothing reaches the disk)
NOBODY = 65534                     # the identity programs run as when the evaluator is root
PROCESSES = 512                    # RLIMIT_NPROC of that identity: threads count, a fork bomb stops here
BUBBLEWRAP, GUARDS_ONLY = "bubblewrap", "python guards only"
DROP, USERNS = "drop", "userns"    # bubblewrap as root dropping to NOBODY, or in a user namespace
ISOLATIONS = (BUBBLEWRAP, GUARDS_ONLY)


class SandboxUnavailable(RuntimeError):
    """The OS isolation is missing where it is required (an RL reward on code)."""


@dataclass
class ExecutionResult:
    success: bool
    status: str          # passed | error | timeout | cpu | memory | output | killed
    reason: str          # one line, "" when passed: the exception, or which limit stopped it
    stdout: str
    stderr: str
    seconds: float = 0.0
    isolation: str = ""  # bubblewrap | python guards only

    @property
    def timeout(self) -> bool:
        return self.status in ("timeout", "cpu")

    @property
    def memory_exceeded(self) -> bool:
        return self.status == "memory"


# The harness, run as `python -I -S -c RUNNER JOB_FD VERDICT_FD`. Everything it knows lives in the
# frame of harness(), which the program cannot reach once the audit hook is in (no frames, no gc).
RUNNER = r'''
import builtins, json, os, sys, types

def harness(job_fd, verdict_fd):
    chunks = []
    while chunk := os.read(job_fd, 1 << 16):
        chunks.append(chunk)
    os.close(job_fd)
    job = json.loads(b"".join(chunks))
    nonce, limits = job.pop("nonce").encode(), job["limits"]
    del chunks
    sys.path.extend(job["site_packages"])  # what site would add, without its .pth files (-S: half the start-up)
    if job["uid"] is not None and os.getuid() == 0:  # drop root for good before anything else
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
    import resource
    mem, cpu = limits["memory_bytes"], limits["cpu_seconds"]
    for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_STACK, mem),
                     (resource.RLIMIT_FSIZE, limits["file_bytes"]), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits["processes"])):
        soft, hard = val if isinstance(val, tuple) else (val, val)
        try:
            if soft is not None:
                resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):  # e.g. STACK above the current hard limit: keep the system's
            pass
    del resource
    for name in job["refused_imports"]:  # loaded ones too: the program imports them afresh, and the hook refuses
        sys.modules.pop(name, None)
    # the harness's own references, taken before the program can replace them (builtins.exec = a no-op
    # would skip the tests); the tests get the builtins as they were, whatever the program patched
    excepthook, stdout, stderr, write, exit_now = sys.__excepthook__, sys.stdout, sys.stderr, os.write, os._exit
    execute, pristine = exec, dict(builtins.__dict__)
    guard(os.path.realpath(os.getcwd()), tuple(job["readable"]), frozenset(job["refused_imports"]))
    main = types.ModuleType("__main__")  # `import __main__` gives the program its own namespace
    sys.modules["__main__"] = main
    main.__builtins__ = builtins
    try:
        program = compile(job["code"], "<program>", "exec")
        tests = compile(job["tests"], "<tests>", "exec")
        del job
        execute(program, main.__dict__)
        # a copy of the program's namespace, with the builtins as they were: the functions the tests
        # define look builtins up there, and the program's functions cannot reach it to patch it
        execute(tests, {**main.__dict__, "__builtins__": pristine})
    except SystemExit as exc:  # whatever came after the exit (the tests) never ran
        stdout.flush()
        stderr.write(f"\nsandbox: the program exited (code {exc.code!r}) before its end\n")
        stderr.flush()
        exit_now(1)
    except BaseException as exc:
        stdout.flush()
        excepthook(type(exc), exc, exc.__traceback__)
        stderr.flush()
        exit_now(1)
    stdout.flush()
    stderr.flush()
    write(verdict_fd, nonce)
    exit_now(0)

def guard(work, readable, refused_imports):
    """The audit hook: process calls, sockets, frames and gc refused; files read inside `readable`
    and written inside `work` only; `refused_imports` cannot be imported. The hook runs while the
    program runs, so it uses only what it holds itself: builtins and C functions taken now (the
    program may patch builtins, os, os.path), never os.path.realpath (Python, patchable)."""
    any, isinstance, OSError, ModuleNotFoundError = (builtins.any, builtins.isinstance, builtins.OSError,
                                                     builtins.ModuleNotFoundError)
    import posix
    fspath, lstat, stat, readlink, getcwd = posix.fspath, posix.lstat, posix.stat, posix.readlink, posix.getcwd
    PathLike = os.PathLike
    devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    process = {"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill",
               "os.killpg", "subprocess.Popen", "pty.spawn", "os.startfile"}
    introspection = {"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects",
                     "gc.get_referrers", "gc.get_referents", "sys._getframemodulename"}
    frames = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}
    writes = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.chflags",
              "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.move",
              "shutil.chown", "shutil.copytree", "shutil.make_archive"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    link_mode, dir_mode, type_mask = 0o120000, 0o040000, 0o170000

    class Refused(PermissionError, ValueError):  # ValueError: typing/namedtuple treat no frame as none
        __module__, __qualname__ = "builtins", "PermissionError"  # reads as the PermissionError it is

    def resolve(path):
        """realpath(path), symbolic links followed, from C calls only; relative to the current
        directory, wherever the program went with chdir."""
        path = fspath(path)
        path = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
        pending, done, links = (path if path.startswith("/") else getcwd() + "/" + path).split("/")[::-1], "", 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                done = done[:done.rfind("/")] if done else ""
                continue
            step = done + "/" + part
            try:
                mode = lstat(step).st_mode
            except OSError:  # missing (or not searchable): the rest is taken as written
                done = step
                continue
            if mode & type_mask != link_mode:
                done = step
                continue
            links += 1
            if links > 40:
                raise Refused(f"sandbox: too many symbolic links in {path}")
            target = readlink(step)
            done = "" if target.startswith("/") else done
            pending.extend(target.split("/")[::-1])
        return done or "/"

    def inside(path, roots):
        return any(path == r or path.startswith(r + "/") for r in roots)

    def is_dir(path):
        try:
            return stat(path).st_mode & type_mask == dir_mode
        except OSError:
            return False

    def check(path, writing, opening=False):
        if isinstance(path, int) or path is None:  # an already open descriptor
            return
        path = resolve(path)
        if opening and not inside(path, (work,)) and is_dir(path):  # its descriptor would be a dir_fd,
            raise Refused(f"sandbox: opening the directory {path} is disabled")  # and relative paths escape
        if path in devices or inside(path, (work,) if writing else readable):
            return
        raise Refused(f"sandbox: {'writing' if writing else 'reading'} {path} is outside the sandbox")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = flags & write_flags if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            check(path, writing, opening=True)
        elif event == "import":
            if args[0].partition(".")[0] in refused_imports:
                raise ModuleNotFoundError(f"sandbox: importing {args[0]} is disabled", name=args[0])
        elif event in process:
            raise Refused(f"sandbox: {event} is disabled")
        elif event.startswith("socket."):
            raise Refused("sandbox: network access is disabled")
        elif event in introspection or (event == "object.__getattr__" and args[1] in frames):
            raise Refused(f"sandbox: {event if event != 'object.__getattr__' else args[1]} is disabled")
        elif event in ("os.symlink", "os.link"):
            raise Refused(f"sandbox: {event} is disabled")
        elif event in writes:
            for arg in args:
                if isinstance(arg, (str, bytes, PathLike)):
                    check(arg, True)

    sys.addaudithook(hook)

harness(int(sys.argv[1]), int(sys.argv[2]))
'''
REFUSED_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "resource",
                   "_testcapi", "_testinternalcapi", "_testbuffer", "_xxsubinterpreters", "_xxinterpchannels",
                   "psutil", "ssl", "_ssl", "tkinter", "ipdb")
# Without bubblewrap the evaluator is the program's parent and visible: signal.pidfd_send_signal
# (no audit event) could stop it, so there signal is not importable either. Under bwrap it cannot
# see the evaluator, and PID 1 of its namespace ignores the signals it sends.
GUARDS_ONLY_REFUSED_IMPORTS = ("signal", "_signal")


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work,
            "OMP_NUM_THREADS": "1"}


def _python_roots() -> list[str]:
    """Python's installation and the virtualenv around it (site-packages included), outermost only."""
    paths = {p for base in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
             for p in (os.path.abspath(base), os.path.realpath(base))}
    paths |= {os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    roots = sorted(p for p in paths if p != "/")
    return [p for p in roots if not any(p.startswith(r + os.sep) for r in roots if r != p)]


def _site_packages() -> list[str]:
    """The evaluator's site-packages directories, read-only for the programs as in the reference."""
    return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def _bwrap_argv(bwrap: str, work: str, how: str) -> list[str]:
    """bwrap's command line: fresh namespaces, read-only system and Python, `work` the only writable place."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try"]
    if how == DROP:  # root: the harness drops to NOBODY itself, and with that every capability
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # a user namespace: no capabilities outside it; root is NOBODY inside
        argv += ["--unshare-user", "--cap-drop", "ALL"]
        argv += ["--uid", str(NOBODY), "--gid", str(NOBODY)] if os.getuid() == 0 else []
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--dev", "/dev", "--tmpfs", "/tmp"]
    made = {"/", "/tmp", "/usr", "/dev"}
    for path in [p for p in _python_roots() if p != "/usr" and not p.startswith("/usr/")] + [work]:  # /usr: bound
        parents = Path(path).parents
        for parent in reversed([str(p) for p in parents]):
            if parent not in made:  # bwrap would make it 0700, out of reach for NOBODY
                argv += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        argv += (["--perms", "0777", "--size", str(WORK_BYTES), "--tmpfs", path] if path == work
                 else ["--ro-bind", path, path])
    return argv + ["--chdir", work, "--"]


def _identity(how: str) -> str:
    if how == DROP:
        return f"uid {NOBODY}"
    return f"uid {NOBODY} in a user namespace, root outside it" if os.getuid() == 0 else "a user namespace"


@functools.cache
def _probe() -> tuple[str, str, tuple[str, ...]]:
    """(how, why, importable distributions): runs one program under bwrap, each way that may work
    here, best first (as root without CAP_SYS_ADMIN only a user namespace can be made)."""
    if shutil.which("bwrap") is None:
        return GUARDS_ONLY, "bwrap is not installed; Debian: apt-get install bubblewrap", ()
    listing = "import importlib.metadata as m\nprint(' '.join(sorted({d.metadata['Name'] for d in m.distributions()})))"
    for how in (DROP, USERNS) if os.getuid() == 0 else (USERNS,):
        r = _execute(listing, "", how, timeout=30.0)
        if r.success:
            return how, f"no network, own PID namespace, read-only system, {_identity(how)}", tuple(r.stdout.split())
    why = (r.stderr.strip().splitlines() or [r.reason or r.status])[-1][:200]
    return GUARDS_ONLY, f"bwrap does not run here: {why}", ()


def describe_isolation() -> str:
    """One line for logs and reports: which isolation programs get here, and why not the OS's."""
    how, why, packages = _probe()
    if how == GUARDS_ONLY:
        return f"sandbox: {GUARDS_ONLY} ({why})"
    return f"sandbox: {BUBBLEWRAP} ({why}; {len(packages)} distributions importable)"


def isolation() -> str:
    """bubblewrap, or python guards only where bwrap cannot run here."""
    return GUARDS_ONLY if _probe()[0] == GUARDS_ONLY else BUBBLEWRAP


def importable_packages() -> tuple[str, ...]:
    """The distributions a program can import (site-packages, read-only), as the sandbox sees them."""
    return _probe()[2]


def require_isolation(accept_guards_only: bool = False) -> str:
    """For an RL reward on code: the OS isolation, or SandboxUnavailable unless accepted explicitly."""
    kind = isolation()
    if kind != BUBBLEWRAP and not accept_guards_only:
        raise SandboxUnavailable(f"{describe_isolation()}: a reward on code needs the OS isolation (install "
                                 "bubblewrap), or accept the python guards only explicitly")
    return kind


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group; under bwrap its init dies and the namespace
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code: str, tests: str = "", timeout: float = 5.0, cpu_seconds: int | None = None,
                 memory_bytes: int | None = MEMORY_BYTES, output_bytes: int = OUTPUT_BYTES,
                 file_bytes: int = FILE_BYTES, isolation: str | None = None) -> ExecutionResult:
    """Run `code`, then `tests` in its namespace (compiled separately). timeout: wall seconds;
    cpu_seconds: CPU time (default: the wall timeout rounded up); memory_bytes: address space
    (None = unlimited); output_bytes: per stream; isolation: None = the best available here,
    or GUARDS_ONLY to skip the OS layer."""
    if timeout <= 0 or output_bytes < 1:
        raise ValueError(f"execute_code: need timeout > 0 and output_bytes >= 1, got {timeout} and {output_bytes}")
    if isolation not in (None, *ISOLATIONS):
        raise ValueError(f"execute_code: isolation is one of {ISOLATIONS}, got {isolation!r}")
    how = GUARDS_ONLY if isolation == GUARDS_ONLY else _probe()[0]
    return _execute(code, tests, how, timeout, cpu_seconds, memory_bytes, output_bytes, file_bytes)


def _execute(code: str, tests: str, how: str, timeout: float, cpu_seconds: int | None = None,
             memory_bytes: int | None = MEMORY_BYTES, output_bytes: int = OUTPUT_BYTES,
             file_bytes: int = FILE_BYTES) -> ExecutionResult:
    """execute_code's work; how: DROP or USERNS (bubblewrap's two ways) or GUARDS_ONLY."""
    kind, drop = GUARDS_ONLY if how == GUARDS_ONLY else BUBBLEWRAP, how == DROP
    unlimited = -1  # resource.RLIM_INFINITY on Linux (the evaluator need not import resource)
    limits = {"cpu_seconds": int(cpu_seconds or -(-timeout // 1)), "file_bytes": int(file_bytes),
              "memory_bytes": unlimited if memory_bytes is None else int(memory_bytes),
              # per uid and counting threads: only for the identity of our own (else no thread could start)
              "processes": PROCESSES if drop else None}
    nonce = secrets.token_hex(16)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanorun-sandbox-") as root:
        work = os.path.join(os.path.realpath(root), "work")
        os.mkdir(work)
        refused = REFUSED_IMPORTS + (GUARDS_ONLY_REFUSED_IMPORTS if kind == GUARDS_ONLY else ())
        job = json.dumps({"code": code, "tests": tests, "nonce": nonce, "limits": limits,
                          "uid": NOBODY if drop else None, "refused_imports": refused,
                          "readable": [work, *_python_roots()],
                          "site_packages": _site_packages()})
        job_r, job_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        python = [sys.executable, "-I", "-S", "-c", RUNNER, str(job_r), str(verdict_w)]
        argv = _bwrap_argv(shutil.which("bwrap") or "bwrap", work, how) + python if kind == BUBBLEWRAP else python
        try:
            proc = subprocess.Popen(argv, cwd=work, env=_env(work), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, pass_fds=(job_r, verdict_w))
        except BaseException:
            os.close(job_w)
            os.close(verdict_r)
            raise
        finally:
            os.close(job_r)
            os.close(verdict_w)
        try:
            out, verdict = _collect(proc, t0 + timeout, output_bytes, job_w, job.encode())
            os.set_blocking(verdict_r, False)
            try:
                said = os.read(verdict_r, 256)
            except BlockingIOError:
                said = b""
        finally:
            os.close(verdict_r)
    seconds = time.perf_counter() - t0
    stdout, stderr = (out[k].decode("utf-8", errors="replace") for k in ("stdout", "stderr"))
    result = functools.partial(ExecutionResult, stdout=stdout, stderr=stderr, seconds=seconds, isolation=kind)
    if verdict == "timeout":
        return result(False, "timeout", f"timed out after {timeout:g}s (killed)")
    if verdict == "output":
        return result(False, "output", f"output over {output_bytes} bytes (killed)")
    rc = proc.returncode
    if kind == BUBBLEWRAP and 128 < rc <= 128 + 64:  # bwrap reports its child's death by signal N as 128 + N
        rc = 128 - rc
    if rc == 0 and said == nonce.encode():
        return result(True, "passed", "")
    last = (stderr.strip().splitlines() or [""])[-1][:300]
    if rc == 0:
        return result(False, "error", "the program exited (status 0) before its end")
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and seconds >= limits["cpu_seconds"]):
        return result(False, "cpu", f"CPU time over {limits['cpu_seconds']}s (killed)")
    if "MemoryError" in stderr or rc == -signal.SIGSEGV:
        mb = "unlimited" if memory_bytes is None else f"{memory_bytes // 2**20} MB"
        return result(False, "memory", f"memory limit ({mb} address space): {last or 'crashed'}")
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:  # a real-time signal (or a program's own exit status past 128 under bwrap)
            name = str(-rc)
        return result(False, "killed", f"killed by signal {name}")
    return result(False, "error", last or f"exit status {rc}")


def _collect(proc: subprocess.Popen, deadline: float, cap: int, job_fd: int, job: bytes
             ) -> tuple[dict[str, bytes], str]:
    """Hand the job to the harness through `job_fd` and read both pipes until they close, the
    deadline passes or a stream goes over `cap` bytes (then the process group is killed):
    (outputs, "" | "timeout" | "output")."""
    bufs = {"stdout": bytearray(), "stderr": bytearray()}
    verdict = ""
    os.set_blocking(job_fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(job_fd, selectors.EVENT_WRITE, "job")
        while sel.get_map() and not verdict:
            left = deadline - time.perf_counter()
            if left <= 0:
                verdict = "timeout"
                break
            for key, _ in sel.select(left):
                if key.data == "job":
                    try:
                        job = job[os.write(job_fd, job):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it died before reading: its stderr says why
                        job = b""
                    if not job:
                        sel.unregister(job_fd)
                        os.close(job_fd)
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                buf += chunk[:cap + 1 - len(buf)]
                if len(buf) > cap:
                    verdict = "output"
        if job_fd in {k.fd for k in sel.get_map().values()}:
            sel.unregister(job_fd)
            os.close(job_fd)
    if not verdict:
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:  # closed its pipes but kept running
            verdict = "timeout"
    if verdict:
        _kill(proc)
        proc.wait()
    _kill(proc)  # anything left in its group
    proc.stdout.close()
    proc.stderr.close()
    return {k: bytes(v[:cap]) for k, v in bufs.items()}, verdict


def execute_many(programs: list[str], workers: int = 2, **limits) -> list[ExecutionResult]:
    """execute_code over many programs, at most `workers` at a time; results in input order."""
    if workers < 1:
        raise ValueError(f"execute_many: workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: execute_code(code, **limits), programs))
