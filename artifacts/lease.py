"""Leases: at most one builder per artifact, on one machine or many.

A lease is a small JSON record next to the store's artifacts (local: `{root}/.leases/{stage}/{name}.json`,
S3: the same key in the bucket) naming its owner (user@host, pid, process start time, boot id), its
last heartbeat and its ttl. The builder's background thread renews it every ttl/4. A waiter
treats a lease as stale when it has expired (the owner stopped heartbeating: crash, kill -9, lost
machine) or when the owner is on this very machine and its process is gone; a stale lease is taken
over with a compare-and-swap (local: under a flock; S3: put_object IfMatch=<etag>), so of several
waiters exactly one wins. Creation is atomic too (local O_CREAT|O_EXCL, S3 IfNoneMatch='*').

Expiry is judged by the store's clock only: the record's age is the store's "now" (the mtime of a
file touched just now / the Date of the S3 response) minus the record's mtime / LastModified, and
the ttl is a difference of two times the owner wrote. The reader's wall clock never enters, so a
host whose clock runs ahead cannot take a live lease (it did: two trainers shared one work dir).

A builder that can no longer renew (another builder took over after presuming it dead, or renewing
failed for most of a ttl, by its own monotonic clock) has *lost* its lease: someone else may be
building the same artifact in the same work dir. It must stop: Lease.check() raises before commit,
and while a stage runs inside `building(lease)` (pipeline/execute.py), stagekit/launch.py's supervision
loop polls lost_lease() and kills the trainer's process group.

    lease = Lease(store, ref)
    if lease.try_acquire():
        with lease:            # heartbeats while inside, releases on exit
            ...build, lease.check(), commit...
    else:
        print("busy:", lease.holder.describe())
"""
from __future__ import annotations

import contextlib
import contextvars
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from artifacts.errors import LeaseLostError
from artifacts.manifest import ArtifactRef

log = logging.getLogger("nanorun.lease")

DEFAULT_TTL = float(os.environ.get("NANORUN_LEASE_TTL", "120"))
# A holder gives up after this fraction of the ttl without a successful renewal, so that it stops
# before a waiter (which needs the whole ttl, by the store's clock) can take over.
LOSS_FRACTION = 0.9
UNREADABLE_GRACE = 30.0  # a lease file still empty after this long was left by a crashed creator


@lru_cache(maxsize=1)
def boot_id() -> str:
    # Two containers can share a hostname; the kernel's boot id tells whether "same host" really
    # means the same kernel (only then is a pid check meaningful).
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def pid_alive(pid: int, start_time: float | None) -> bool:
    """Is process `pid` (started at start_time, guarding against pid reuse) still running here?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_time is not None:
        now_start = process_start_time(pid)
        if now_start is not None and abs(now_start - start_time) > 1.0:
            return False  # the pid was reused by a different process
    try:
        import psutil

        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except Exception:
        pass
    return True


@dataclass
class LeaseInfo:
    owner: str
    ref: str
    host: str
    boot_id: str
    pid: int
    pid_start: float | None
    acquired: float
    heartbeat: float
    expires: float
    inputs: list[str] = field(default_factory=list)  # refs the build reads (gc must keep them)
    age: float | None = field(default=None, compare=False)  # seconds since written, by the store's clock (not stored)

    def to_bytes(self) -> bytes:
        d = asdict(self)
        del d["age"]
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, age: float | None = None) -> "LeaseInfo | None":
        try:
            d = json.loads(data)
            d.pop("age", None)
            return cls(**d, age=age)
        except (ValueError, TypeError):
            return None

    @property
    def ttl(self) -> float:
        return self.expires - self.heartbeat  # both written by the owner's clock: skew cancels

    def same_machine(self) -> bool:
        return self.host == socket.gethostname() and self.boot_id == boot_id()

    def stale_reason(self) -> str | None:
        """Why this lease (as read from the store) no longer protects anything, or None while its
        owner is alive. Expiry compares the record's age by the store's clock with its ttl."""
        if self.age is not None and self.age > self.ttl:
            return f"expired: last heartbeat {self.age:.0f}s ago by the store's clock (ttl {self.ttl:.0f}s)"
        if self.same_machine() and not pid_alive(self.pid, self.pid_start):
            return f"owner process {self.pid} on this machine is gone"
        return None

    def describe(self) -> str:
        beat = f", heartbeat {self.age:.0f}s ago" if self.age is not None else ""
        return f"{self.owner.rsplit(':', 1)[0]} (pid {self.pid}{beat})"


def read_lease(store, ref: ArtifactRef) -> tuple[LeaseInfo | None, object, float] | None:
    """(info or None if unreadable, token, age in s by the store's clock) of the lease record at ref, or None."""
    got = store._lease_read(ref)
    if got is None:
        return None
    data, token, age = got
    return LeaseInfo.from_bytes(data, age), token, age


def live_holder(store, ref: ArtifactRef) -> LeaseInfo | None:
    """The live owner of ref's lease, if any (cheap: one small read)."""
    got = read_lease(store, ref)
    if got is None:
        return None
    info, _, age = got
    if info is None:
        return None if age > UNREADABLE_GRACE else LeaseInfo("(being created)", str(ref), "?", "", 0, None, 0, 0, 0)
    return None if info.stale_reason() else info


class Lease:
    """One attempt to own the build of `ref` in `store` (see the module docstring)."""

    def __init__(self, store, ref: ArtifactRef, *, ttl: float | None = None, inputs: list[str] | tuple = ()):
        self.store, self.ref = store, ref
        self.ttl = float(ttl if ttl is not None else DEFAULT_TTL)
        if self.ttl <= 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {self.ttl}")
        self.inputs = [str(r) for r in inputs]
        self.owner = f"{_user()}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.holder: LeaseInfo | None = None  # the other live owner when try_acquire() fails
        self.took_over: LeaseInfo | None = None  # the stale lease we replaced, if any
        self._lost: str | None = None  # why we lost it
        self._renewed = 0.0  # time.monotonic() when the last successful write of our record began
        self._token = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        """True once we may no longer own the lease: taken over, or not renewed for LOSS_FRACTION of
        the ttl (also while a renewal hangs: a waiter may take over once the record is ttl old)."""
        if self._lost is None and self._token is not None and time.monotonic() - self._renewed > LOSS_FRACTION * self.ttl:
            self._lost = f"could not renew it for {time.monotonic() - self._renewed:.0f}s (ttl {self.ttl:.0f}s)"
        return self._lost is not None

    def lost_message(self) -> str:
        return (f"{self.ref}: lost the build lease ({self._lost}); another builder may be using the work dir, "
                "so this build was stopped and not committed. Rerun to use or rebuild the artifact.")

    @property
    def held(self) -> bool:
        return self._token is not None and not self.lost

    def _info(self, acquired: float | None = None) -> LeaseInfo:
        now = time.time()
        pid = os.getpid()
        return LeaseInfo(self.owner, str(self.ref), socket.gethostname(), boot_id(), pid, process_start_time(pid),
                         acquired or now, now, now + self.ttl, self.inputs)

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; False (and self.holder set) if someone live has it."""
        if self.held:
            return True
        for _ in range(20):  # each pass either decides or lost a race that changed the record
            self._renewed = time.monotonic()
            token = self.store._lease_create(self.ref, self._info().to_bytes())
            if token is not None:
                self._acquired(token)
                return True
            got = read_lease(self.store, self.ref)
            if got is None:
                continue  # released between our create and read: try again
            info, token, age = got
            if info is None:
                if age <= UNREADABLE_GRACE:  # being written right now by its creator
                    self.holder = LeaseInfo("(being created)", str(self.ref), "?", "", 0, None, 0, 0, 0)
                    return False
                reason = f"unreadable lease record {age:.0f}s old"
            else:
                reason = info.stale_reason()
                if reason is None:
                    self.holder = info
                    return False
            self._renewed = time.monotonic()
            new_token = self.store._lease_replace(self.ref, self._info().to_bytes(), token)
            if new_token is not None:
                log.warning("%s: took over stale lease of %s: %s", self.ref,
                            info.describe() if info else "an unknown owner", reason)
                self.took_over = info
                self._acquired(new_token)
                return True
        raise RuntimeError(f"{self.ref}: lease record keeps changing under us; is something rewriting it in a loop?")

    def _acquired(self, token) -> None:
        self._token, self.holder, self._lost = token, None, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.ref.fingerprint}", daemon=True)
        self._thread.start()

    def _lose(self, reason: str) -> None:
        self._lost = reason
        log.error("%s: lost the build lease (%s); stopping this build, it will not be committed", self.ref, reason)

    def _heartbeat(self) -> None:
        acquired = time.time()
        while not self._stop.wait(self.ttl / 4):
            with self._lock:
                if self._token is None or self.lost:
                    return
                started = time.monotonic()
                try:
                    token = self.store._lease_replace(self.ref, self._info(acquired).to_bytes(), self._token)
                except Exception as e:  # network blip: try again next tick, until `lost` says it is too late
                    if self.lost:
                        return self._lose(f"{self._lost}: {e}")
                    log.warning("%s: lease heartbeat failed (%s); retrying", self.ref, e)
                    continue
                if token is None:
                    return self._lose("taken over by another builder that presumed us dead")
                self._token, self._renewed = token, started

    def add_inputs(self, refs) -> None:
        """Pin more refs (gc keeps a live lease's inputs): written now, not at the next heartbeat."""
        new = [str(r) for r in refs if str(r) not in self.inputs]
        if not new:
            return
        with self._lock:
            self.inputs.extend(new)
            if self._token is not None and not self.lost:
                token = self.store._lease_replace(self.ref, self._info().to_bytes(), self._token)
                if token is not None:
                    self._token, self._renewed = token, time.monotonic()

    def check(self) -> None:
        """Raise LeaseLostError unless we still own the lease (call right before committing)."""
        if not self.held:
            raise LeaseLostError(self.lost_message())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.ttl)
        with self._lock:
            token, self._token = self._token, None
        if token is not None and not self.lost:
            try:
                self.store._lease_delete(self.ref, token)
            except Exception as e:  # it will expire on its own
                log.warning("%s: could not delete the lease record (%s); it expires in %.0fs", self.ref, e, self.ttl)

    def __enter__(self) -> "Lease":
        if not self.held and not self.try_acquire():
            raise RuntimeError(f"{self.ref}: lease is held by {self.holder.describe()}")
        return self

    def __exit__(self, *exc) -> None:
        self.release()


PLAN_PIN_STAGE = "running_plan"  # .leases/running_plan/run-{random}.json: one record per running plan


@contextlib.contextmanager
def pinned(store, refs=(), ttl: float | None = None):
    """Keep `refs` (and those added through the yielded Lease's add_inputs) from gc while the block
    runs: a lease record of its own on the store, so gc on any machine keeps them (it keeps a live
    lease's inputs), renewed like a build lease and expiring a ttl after a crash. A running plan
    pins everything it will produce or read: gc during a speedrun once deleted its committed CORE
    artifact (its alias had moved on) and the steps after it failed."""
    lease = Lease(store, ArtifactRef(PLAN_PIN_STAGE, "run", uuid.uuid4().hex[:16]), ttl=ttl, inputs=list(refs))
    with lease:
        yield lease


_BUILDING: contextvars.ContextVar["Lease | None"] = contextvars.ContextVar("nanorun_building", default=None)
_ACTIVE: dict[ArtifactRef, Lease] = {}  # by ref, for helper threads that do not share the context


@contextlib.contextmanager
def building(lease: Lease):
    """Mark the code inside (and, by ref, this process's helper threads) as working under `lease`."""
    token = _BUILDING.set(lease)
    _ACTIVE[lease.ref] = lease
    try:
        yield lease
    finally:
        _BUILDING.reset(token)
        if _ACTIVE.get(lease.ref) is lease:
            del _ACTIVE[lease.ref]


def lost_lease(ref: ArtifactRef | None = None) -> Lease | None:
    """The lease of the build this code runs for (or of `ref`, from any thread), if it has been
    lost: the caller must stop at once (stagekit/launch.py kills the trainer; artifacts/staging.py
    stops writing resume checkpoints). Cheap enough to poll every fraction of a second."""
    lease = _ACTIVE.get(ref) if ref is not None else _BUILDING.get()
    return lease if lease is not None and lease.lost else None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid{os.getuid()}"
