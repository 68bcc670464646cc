"""core/sandbox.py: a correct program passes; every way generated code goes wrong (runaway loops,
huge allocations, forks, network, writes outside its directory, reading the evaluator's secrets,
floods of output) is contained, reported as a failure with a reason, and this process survives."""
from __future__ import annotations

import json
import os
import socket
import time

import psutil
import pytest

from core.sandbox import execute_code, execute_many


@pytest.fixture
def no_stray_processes():
    """Nothing the sandboxed programs started outlives them (other tests' servers may be running)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_a_correct_program_passes_and_its_directory_goes_away():
    r = execute_code("import os\ndef add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"
                     "open('scratch.txt', 'w').write('x')\nprint(os.getcwd(), open('scratch.txt').read())")
    assert (r.success, r.status, r.reason, r.stderr) == (True, "passed", "", "")
    cwd, text = r.stdout.split()
    assert text == "x" and not os.path.exists(cwd)
    r = execute_code("assert 1 + 1 == 3, 'arithmetic'")
    assert (r.success, r.status, r.reason) == (False, "error", "AssertionError: arithmetic")


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_a_program_that_exits_before_its_tests_fails(exit_call):
    r = execute_code(f"{exit_call}\nassert False, 'the tests'")
    assert (r.success, r.status) == (False, "error") and "before its end" in r.reason


def test_an_infinite_loop_is_killed_on_the_wall_clock_and_on_cpu_time(no_stray_processes):
    t0 = time.perf_counter()
    r = execute_code("while True:\n    pass", timeout=1.0, cpu_seconds=30)
    assert (r.success, r.status, r.timeout) == (False, "timeout", True) and "timed out after 1s" in r.reason
    r = execute_code("while True:\n    pass", timeout=30.0, cpu_seconds=1)
    assert (r.success, r.status) == (False, "cpu") and "CPU time over 1s" in r.reason
    assert time.perf_counter() - t0 < 10


def test_a_1gb_allocation_hits_the_address_space_limit():
    r = execute_code("x = bytearray(1024 ** 3)\nprint('allocated')")
    assert (r.success, r.status, r.memory_exceeded, r.stdout) == (False, "memory", True, "")
    assert "256 MB" in r.reason and "MemoryError" in r.reason


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",                           # the classic fork bomb
    "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'pass'])",
    "import os\nos.system('echo pwned')",
    "import os\nos.posix_spawn('/bin/sh', ['sh'], {})",
    "import os\nos.kill(os.getppid(), 9)",                              # kill the evaluator
])
def test_process_calls_are_refused(code, no_stray_processes):
    r = execute_code(code)
    assert (r.success, r.status) == (False, "error")
    assert r.reason.startswith(("PermissionError: sandbox:", "ModuleNotFoundError: sandbox:"))
    assert "is disabled" in r.reason
    assert "pwned" not in r.stdout


@pytest.mark.parametrize("module", ["multiprocessing", "ctypes", "resource"])
def test_escape_hatch_modules_do_not_import(module):
    r = execute_code(f"import {module}")
    assert not r.success and "ModuleNotFoundError" in r.reason and module in r.reason


def test_a_socket_connect_to_localhost_is_refused():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for code in (f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                     f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
                     f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')"):
            r = execute_code(code)
            assert (r.success, r.status) == (False, "error") and "network access is disabled" in r.reason, code
        server.settimeout(0)
        with pytest.raises(BlockingIOError):  # nobody ever connected
            server.accept()


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    target = tmp_path / "escape.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                 f"open({str(victim)!r}, 'a').write('x')",
                 f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 "import os\nos.symlink('/etc', 'etc')"):
        r = execute_code(code)
        assert (r.success, r.status) == (False, "error") and r.reason.startswith("PermissionError: sandbox:"), code
    assert not target.exists() and victim.read_text() == "precious"


def test_the_evaluators_secrets_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("NANORUN_TEST_SECRET", "hunter2")
    r = execute_code("import json, os\nprint(json.dumps(dict(os.environ)))")
    env = json.loads(r.stdout)
    assert r.success and "NANORUN_TEST_SECRET" not in env and "hunter2" not in r.stdout
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "OMP_NUM_THREADS", "LC_CTYPE", "PWD"}
    for code in ("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
                 f"print(open('/proc/{os.getpid()}/environ', 'rb').read())",
                 f"print(open({os.path.expanduser('~/.bashrc')!r}).read())"):
        r = execute_code(code)
        assert (r.success, r.stdout) == (False, "") and "is outside the sandbox" in r.reason, code


def test_output_is_capped(no_stray_processes):
    r = execute_code("while True:\n    print('x' * 1000)", output_bytes=10_000)
    assert (r.success, r.status) == (False, "output") and len(r.stdout) == 10_000
    assert "output over 10000 bytes" in r.reason
    r = execute_code("import sys\nsys.stderr.write('e' * 5000)\nraise SystemExit(3)", output_bytes=100)
    assert r.status == "output" and len(r.stderr) == 100


def test_many_programs_run_in_order_at_most_workers_at_a_time():
    stamp = "import time\nt0 = time.time()\ntime.sleep(0.3)\nprint(t0, time.time())\n"
    programs = [stamp, stamp + "1/0", "while True:\n    pass", stamp, stamp]
    results = execute_many(programs, workers=2, timeout=1.5)
    assert [r.status for r in results] == ["passed", "error", "timeout", "passed", "passed"]
    spans = [tuple(map(float, r.stdout.split())) for r in results if r.stdout]
    assert len(spans) == 4
    for t in (s for span in spans for s in span):  # never more than 2 running at once
        assert sum(a <= t <= b for a, b in spans) <= 2
    with pytest.raises(ValueError, match="workers"):
        execute_many(["pass"], workers=0)
