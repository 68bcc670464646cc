"""core/sandbox.py against an attacker: every attack tried on the sandbox (forged passes, the C
modules under the Python guards, escapes from the process tree, the evaluator's secrets, resource
bombs) fails and does no harm, under each isolation that runs here (bubblewrap as root dropping to
uid 65534, bubblewrap in a user namespace, the python guards only); the OS layer is what it says."""
from __future__ import annotations

import os

import psutil
import pytest

from core import sandbox
from core.sandbox import (BUBBLEWRAP, DROP, GUARDS_ONLY, USERNS, SandboxUnavailable, execute_code, isolation,
                          require_isolation)
from core.tasks.humaneval import HumanEval

# every way this machine can run programs (the sandbox itself takes the first of them that works)
WAYS = [GUARDS_ONLY] + [how for how in ((DROP, USERNS) if os.getuid() == 0 else (USERNS,))
                        if sandbox._execute("pass", "", how, timeout=30.0).success]

# (name, program, what the result's reason says besides "did not pass"). The tests always fail
# (len('abc') is 3), so any pass is a forged one.
TESTS = "print('the tests ran')\nassert len('abc') == 4, 'the tests fail'"
ATTACKS = [
    ("forged exit status", "import __main__, os\nos._exit(__main__._limits['done_status'])", None),
    ("argv and /proc cmdline", "import sys, os\nprint(sys.argv, open('/proc/self/cmdline').read())\nos._exit(0)",
     None),
    ("junk on every descriptor", "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'0' * 32)\n"
                                 "    except OSError:\n        pass\nos._exit(0)", None),
    ("frame walk to the harness", "import sys\nprint(sys._getframe().f_back.f_locals)", "frame"),
    ("traceback frame", "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__.tb_frame.f_back.f_locals)",
     "frame"),
    ("gc walk", "import gc\nprint([o for o in gc.get_objects() if isinstance(o, bytes)])", "gc"),
    ("tracer", "import sys\nsys.settrace(lambda *a: print(a))", "settrace"),
    ("tests swallowed into a string", "x = '''", "SyntaxError"),
    ("a directory descriptor as dir_fd", "import os, sys\nfd = os.open(sys.base_prefix, os.O_RDONLY)\n"
                                         "print(os.listdir(fd))", "opening the directory"),
    ("fool the path checks: patch os.path and builtins",
     "import builtins, os.path\nbuiltins.any = lambda items: True\nos.path.realpath = lambda p, **k: '/dev/null'\n"
     "os.fspath = lambda p: '/dev/null'\nopen({victim!r}, 'w').write('owned')\nprint(open('/etc/passwd').read())",
     None),
    ("chdir out, then a relative path", "import os\nos.chdir('/')\nprint(open('etc/passwd').read())", None),
    ("read any file through _io", "import _io\nprint(_io.FileIO('/etc/passwd').read())", "passwd"),
    ("overwrite a file through _io", "import _io\n_io.FileIO({victim!r}, 'w').write(b'owned')", None),
    ("the evaluator's environment", "import _io, posix\nprint(_io.FileIO(f'/proc/{{posix.getppid()}}/environ').read())",
     None),
    ("exec a Python without guards", "import posix, sys\nposix.execv(sys.executable, [sys.executable, '-c', "
                                     "'print(\"escaped\")'])", None),
    ("posix.system", "import posix\nposix.system('echo escaped; id')", None),
    ("setsid child outlives the kill", "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n"
                                       "    while True:\n        time.sleep(0.1)", None),
    ("stop the evaluator", "import posix\nposix.kill(posix.getppid(), 19)\nposix.kill(1, 19)", None),
    ("stop the evaluator through a pidfd",
     "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGSTOP)", None),
    ("skip the tests: a no-op exec", "import builtins\nbuiltins.exec = lambda *args, **kwargs: None", "tests fail"),
    ("patch a builtin the tests use", "import builtins\nbuiltins.len = lambda s: 4", "tests fail"),
    ("_posixsubprocess", "import _posixsubprocess", "_posixsubprocess"),
    ("socket through _socket", "import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 53))", "network"),
    ("ctypes", "import ctypes\nctypes.CDLL(None).system(b'echo escaped')", "ctypes"),
    ("subprocess", "import subprocess\nprint(subprocess.check_output(['id']))", None),
    ("early sys.exit(0)", "import sys\nsys.exit(0)", "before its end"),
    ("an exit status that looks like a signal", "import os\nos._exit(128 + 40)", None),  # no ValueError here
    ("memory bomb", "x = bytearray(10 ** 10)", "memory"),
    ("5,000 threads", "import threading, time\nfor _ in range(5000):\n"
                      "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()", None),
    # killed by the hard CPU limit, or by the wall clock when the machine is too busy to give it 2 s of
    # CPU; with the python guards only, `signal` cannot be imported at all
    ("ignore SIGXCPU", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass", "time"),
]


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("precious")
    return path


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("name,code,expect", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_an_attack_fails_and_does_no_harm(how, name, code, expect, victim, monkeypatch):
    monkeypatch.setenv("NANORUN_TEST_SECRET", "hunter2")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cpu_bomb = name == "ignore SIGXCPU"  # 1 s soft, 2 s hard limit: killed within 3 s either way
    r = sandbox._execute(code.format(victim=str(victim)), TESTS, how, timeout=3.0 if cpu_bomb else 5.0,
                         cpu_seconds=1 if cpu_bomb else None)
    kind = GUARDS_ONLY if how == GUARDS_ONLY else BUBBLEWRAP
    assert (r.success, r.isolation) == (False, kind) and r.status != "passed", (name, r)
    if expect:
        assert expect in r.reason or expect in r.status or (expect == "time" and (r.timeout or (
            kind == GUARDS_ONLY and "importing signal is disabled" in r.reason))), (name, r.reason)
    out = r.stdout + r.stderr
    assert "escaped" not in out and "hunter2" not in out and "root:" not in out
    assert victim.read_text() == "precious"
    assert psutil.Process().status() != psutil.STATUS_STOPPED
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # nothing survives


@pytest.mark.parametrize("how", WAYS)
def test_what_honest_programs_need_still_works(how):
    """Threads (they count as processes for non-root rlimits), site-packages (numpy), typing and
    namedtuple (they look for a caller's frame), files in the working directory, tracebacks."""
    code = ("import threading, collections, typing, numpy\nfrom typing import NamedTuple\n"
            "P = collections.namedtuple('P', 'x y')\nclass Q(NamedTuple):\n    a: int\n"
            "out = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(16)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\nopen('f.txt', 'w').write('ok')\n")
    r = sandbox._execute(code, "assert sorted(out) == list(range(16)) and open('f.txt').read() == 'ok'\n"
                               "assert int(numpy.arange(4).sum()) == 6 and P(1, 2).y == 2 and Q(3).a == 3", how, 5.0)
    assert (r.success, r.status) == (True, "passed"), r.stderr
    r = sandbox._execute("def f():\n    raise KeyError('k')", "f()", how, 5.0)
    assert r.reason == "KeyError: 'k'" and "line 2, in f" in r.stderr


@pytest.mark.parametrize("how", [w for w in WAYS if w != GUARDS_ONLY] or [pytest.param(
    USERNS, marks=pytest.mark.skip(reason="bubblewrap does not run here"))])
def test_under_bubblewrap_the_program_is_alone_unprivileged_and_offline(how):
    r = sandbox._execute("import os, socket\nprint(os.getuid(), os.getppid(), os.path.exists('/proc/1'), "
                         "sorted(os.listdir('/')), os.path.exists(os.path.expanduser('~root/.bashrc')))\n"
                         "print(open('/proc/net/dev').read() if os.path.exists('/proc/net/dev') else 'no net')",
                         "", how, 5.0)
    assert r.success, r.stderr
    first, net = r.stdout.split("\n")[:2]
    uid, ppid, proc, rest = first.split(" ", 3)
    assert (uid == "65534") == (os.getuid() == 0) and ppid == "1" and proc == "False"
    assert "'home'" not in rest and rest.endswith("False") and net == "no net"  # no /home, no ~root/.bashrc
    # its directory is a tmpfs of WORK_BYTES: filling it fails there, and nothing reaches the disk
    r = sandbox._execute("import os\nfor i in range(100):\n    with open(f'f{i}', 'wb') as f:\n"
                         "        f.write(os.urandom(1 << 20))", "", how, 10.0)
    assert not r.success and "No space left on device" in r.reason, r.reason


def test_a_reward_needs_the_os_isolation_unless_accepted(monkeypatch):
    if isolation() == BUBBLEWRAP:
        assert require_isolation() == BUBBLEWRAP
    monkeypatch.setattr(sandbox, "_probe", lambda: (GUARDS_ONLY, "bwrap is not installed", ()))
    with pytest.raises(SandboxUnavailable, match="sandbox: python guards only"):
        require_isolation()
    assert require_isolation(accept_guards_only=True) == GUARDS_ONLY
    assert sandbox.describe_isolation() == "sandbox: python guards only (bwrap is not installed)"
    assert execute_code("pass").isolation == GUARDS_ONLY
    with pytest.raises(SandboxUnavailable, match="a reward on code needs the OS isolation"):
        HumanEval(reward=True)
    assert len(HumanEval(reward=True, accept_guards_only=True, stop=2)) == 2
