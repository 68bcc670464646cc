"""Leases on both backends: exclusive, renewed by heartbeat, stale ones taken over exactly once."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from artifacts import LeaseLostError
from artifacts.lease import Lease, LeaseInfo, boot_id, live_holder, read_lease
from tests.artifacts.fixtures import make_ref, store  # noqa: F401 (fixture)


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


def test_live_owner_elsewhere_is_respected_until_it_expires(store):
    ref = make_ref("remote")
    _plant(store, ref, expires=time.time() + 60)  # another machine, heartbeating: we cannot see its pid
    lease = Lease(store, ref, ttl=30)
    assert not lease.try_acquire() and lease.holder.host == "elsewhere"
    ref2 = make_ref("expired")
    _plant(store, ref2, heartbeat=time.time() - 300, expires=time.time() - 180)
    lease2 = Lease(store, ref2, ttl=30)
    assert lease2.try_acquire() and "expired" in lease2.took_over.stale_reason()
    lease2.release()


def test_racing_takeovers_have_one_winner(store):
    ref = make_ref("race")
    _plant(store, ref, expires=time.time() - 1)
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
    lease = Lease(store, ref, ttl=0.6)
    assert lease.try_acquire()
    first = read_lease(store, ref)[0]
    time.sleep(0.9)  # longer than the ttl: only the heartbeat keeps it alive
    info, token, _ = read_lease(store, ref)
    assert info.owner == lease.owner and info.expires > first.expires
    assert not Lease(store, ref, ttl=0.6).try_acquire()
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
