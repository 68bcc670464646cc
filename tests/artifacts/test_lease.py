"""Leases on both backends: exclusive, renewed by heartbeat, stale ones taken over exactly once."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

import artifacts.lease
import artifacts.local
import artifacts.s3
from artifacts import LeaseLostError
from artifacts.lease import Lease, LeaseInfo, boot_id, live_holder, read_lease
from tests.artifacts.fixtures import make_ref, store  # noqa: F401 (fixture)


_real_time = time.time


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(store, ref, **over) -> None:
    now = time.time()
    info = dict(owner="ghost@elsewhere:1:abcd", ref=str(ref), host="elsewhere", boot_id="x", pid=1,
                pid_start=None, acquired=now, heartbeat=now, expires=now + 60)
    info.update(over)
    assert store._lease_create(ref, LeaseInfo(**info).to_bytes()) is not None


def _backdate(store, ref, seconds: float, monkeypatch) -> None:
    """Make ref's lease record `seconds` older by the store's clock (its last heartbeat long ago)."""
    if hasattr(store, "root"):
        path = store._lease_paths(ref)[0]
        t = path.stat().st_mtime - seconds
        os.utime(path, (t, t))
    else:  # S3 sets LastModified itself: shift the age the store reports for this record version
        real, planted = store._lease_read, store._lease_read(ref)[1]

        def aged(r):
            got = real(r)
            return got if got is None or got[1] != planted else (got[0], got[1], got[2] + seconds)
        monkeypatch.setattr(store, "_lease_read", aged)


def test_exclusive_then_free(store):
    ref = make_ref("l")
    a, b = Lease(store, ref, ttl=30), Lease(store, ref, ttl=30)
    assert a.try_acquire()
    assert not b.try_acquire() and b.holder.owner == a.owner
    assert live_holder(store, ref).owner == a.owner
    a.release()
    assert live_holder(store, ref) is None
    assert b.try_acquire()
    b.release()
    assert read_lease(store, ref) is None


def test_dead_owner_on_this_machine_is_taken_over(store):
    ref = make_ref("dead")
    _plant(store, ref, host=socket.gethostname(), boot_id=boot_id(), pid=_dead_pid())
    assert live_holder(store, ref) is None
    lease = Lease(store, ref, ttl=30)
    assert lease.try_acquire() and lease.took_over.owner == "ghost@elsewhere:1:abcd"
    lease.release()


def test_live_owner_elsewhere_is_respected_until_it_expires(store, monkeypatch):
    ref = make_ref("remote")
    _plant(store, ref, expires=time.time() + 60)  # another machine, heartbeating: we cannot see its pid
    lease = Lease(store, ref, ttl=30)
    assert not lease.try_acquire() and lease.holder.host == "elsewhere"
    ref2 = make_ref("expired")
    _plant(store, ref2)
    _backdate(store, ref2, 180, monkeypatch)
    lease2 = Lease(store, ref2, ttl=30)
    assert lease2.try_acquire() and "expired" in lease2.took_over.stale_reason()
    lease2.release()


def test_racing_takeovers_have_one_winner(store, monkeypatch):
    ref = make_ref("race")
    _plant(store, ref)
    _backdate(store, ref, 61, monkeypatch)
    leases = [Lease(store, ref, ttl=30) for _ in range(4)]
    barrier = threading.Barrier(len(leases))
    won = []

    def go(lease):
        barrier.wait()
        won.append(lease.try_acquire())

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False, False, False, True]
    for lease in leases:
        lease.release()


def test_heartbeat_renews_and_detects_loss(store):
    ref = make_ref("hb")
    ttl = 0.6 if hasattr(store, "root") else 2.5  # S3 timestamps have 1 s resolution
    lease = Lease(store, ref, ttl=ttl)
    assert lease.try_acquire()
    first = read_lease(store, ref)[0]
    time.sleep(0.9)  # locally longer than the ttl: only the heartbeat keeps it alive
    info, token, _ = read_lease(store, ref)
    assert info.owner == lease.owner and info.expires > first.expires
    assert not Lease(store, ref, ttl=ttl).try_acquire()
    lease.check()
    # Someone takes the lease from under us (as if we had been presumed dead).
    thief = LeaseInfo(**{**info.__dict__, "owner": "thief@x:2:ffff", "expires": time.time() + 60})
    for _ in range(50):  # compare-and-swap against the heartbeat: retry with the fresh token
        if store._lease_replace(ref, thief.to_bytes(), read_lease(store, ref)[1]) is not None:
            break
    else:
        pytest.fail("could not replace the lease record")
    deadline = time.time() + 3
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    assert lease.lost
    with pytest.raises(LeaseLostError):
        lease.check()
    lease.release()  # must not delete the thief's lease
    assert read_lease(store, ref)[0].owner == "thief@x:2:ffff"


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_skewed_reader_clock_cannot_take_a_live_lease(store, monkeypatch, skew):
    """Staleness is the record's age by the store's clock: a reader whose clock runs an hour ahead
    must not take a lease renewed a moment ago (it did: two trainers shared one work dir), and one
    an hour behind still takes a lease whose owner stopped heartbeating."""
    live, dead = make_ref("live"), make_ref("dead_owner")
    _plant(store, live)  # written by the owner's (correct) clock: ttl 60 s, renewed just now
    _plant(store, dead)
    _backdate(store, dead, 120, monkeypatch)
    # This host's clock only (moto's server runs in this process and keeps the true time).
    skewed = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    skewed.time = lambda: _real_time() + skew
    for mod in (artifacts.lease, artifacts.local, artifacts.s3):
        monkeypatch.setattr(mod, "time", skewed)
    lease = Lease(store, live, ttl=30)
    assert not lease.try_acquire() and lease.holder.owner.startswith("ghost@")
    assert live_holder(store, live) is not None
    taker = Lease(store, dead, ttl=30)
    assert taker.try_acquire() and "by the store's clock" in taker.took_over.stale_reason()
    taker.release()


def test_renewals_failing_for_a_ttl_lose_the_lease(store, monkeypatch):
    ref = make_ref("flaky")
    lease = Lease(store, ref, ttl=0.4)
    assert lease.try_acquire()

    def down(*a, **kw):
        raise OSError("store unreachable")
    monkeypatch.setattr(store, "_lease_replace", down)
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.02)
    assert lease.lost and "could not renew" in lease.lost_message()
    with pytest.raises(LeaseLostError):
        lease.check()
    lease.release()


def test_lost_lease_kills_the_trainer(store, tmp_path):
    """The holder that loses its lease stops its trainer (the whole process group) at once and
    execute() raises one clear line, instead of training on until commit."""
    import psutil

    from pipeline.execute import artifact_ref, execute
    from tests.artifacts import toy_trainer

    cfg = toy_trainer.Config(seconds=60)
    ref = artifact_ref(toy_trainer, cfg, {})
    ttl = 0.8 if hasattr(store, "root") else 2.5  # S3 timestamps have 1 s resolution
    pid_file = store.work_dir(ref) / "child.pid"

    def steal():  # another builder takes the lease once the trainer runs
        while not pid_file.exists():
            time.sleep(0.02)
        for _ in range(200):
            got = read_lease(store, ref)
            thief = LeaseInfo(**{**got[0].__dict__, "owner": "thief@x:2:ffff", "age": None})
            if store._lease_replace(ref, thief.to_bytes(), got[1]) is not None:
                return
        raise AssertionError("could not take the lease")

    thread = threading.Thread(target=steal)
    thread.start()
    t0 = time.time()
    with pytest.raises(LeaseLostError, match="lost the build lease .*taken over") as e:
        execute(toy_trainer, cfg, {}, store, lease_ttl=ttl)
    thread.join()
    assert "\n" not in str(e.value) and time.time() - t0 < 15
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert store.manifest(ref) is None and read_lease(store, ref)[0].owner == "thief@x:2:ffff"
