"""Stop a child process when its parent dies, SIGKILL included: the CLI's temporary Prefect server.

    python -m cli.server_guard PARENT_PID CHILD_PID     # started by the CLI (cli/commands.py)

A CLI that is SIGKILLed runs no atexit hook and no signal handler, so the temporary Prefect server it
started (a uvicorn subprocess) was left running, orphaned, for as long as nobody noticed. This guard
is a separate, tiny process: it polls its own parent pid (the CLI's); once the CLI is gone (it was
reparented), it stops the server with TERM, then KILL after 5 s. The server is recognised by its start
time as well as its pid, so a recycled pid is never signalled. After a normal exit the CLI has already
stopped the server and the guard just exits. Linux (/proc).
"""
from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.25
KILL_AFTER_S = 5.0


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def guard(parent: int, child: int) -> None:
    born = start_time(child)
    while born is not None and os.getppid() == parent:
        time.sleep(POLL_S)
        if start_time(child) != born:
            return  # the server stopped on its own (the CLI's normal exit)
    deadline = time.monotonic() + KILL_AFTER_S
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if born is None or start_time(child) != born:
            return
        os.kill(child, sig)
        while time.monotonic() < deadline and start_time(child) == born:
            time.sleep(0.1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or not all(a.isdigit() for a in sys.argv[1:]):
        print("usage: python -m cli.server_guard PARENT_PID CHILD_PID", file=sys.stderr)
        sys.exit(2)
    guard(int(sys.argv[1]), int(sys.argv[2]))
