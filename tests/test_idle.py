"""The set of free connections (runtime/idle.py), over real loopback TCP connections, one thread."""
from __future__ import annotations

import threading
import time

import pytest

from torchrpc import transport
from torchrpc.runtime.idle import IdleSet
from torchrpc.runtime.lease import Leases, LeaseState, ReadLease

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def setup():
    lst = transport.listen("tcp://127.0.0.1:0")
    box = {}
    t = threading.Thread(target=lambda: box.update(conn=lst.accept()))
    t.start()
    client = transport.connect(lst.address, timeout=10)
    t.join(10)
    server = box["conn"]
    leases, awaited = Leases(), set()
    idle = IdleSet(leases, lambda peer: peer in awaited)
    lease = ReadLease(1, server)
    yield idle, leases, lease, client, awaited
    idle.stop()
    idle.close()
    client.close()
    server.close()
    lst.close()


def test_a_parked_connection_wakes_the_wait_once_per_arrival(setup):
    idle, leases, lease, client, _ = setup
    assert idle.available
    assert idle.park(lease) and lease.state is LeaseState.FREE
    assert idle.wait(0) == (False, None)  # nothing yet
    client.send([b"x"])
    assert idle.wait(5) == (True, lease)
    assert lease.state is LeaseState.READING  # taken for the caller
    assert idle.wait(0.2) == (False, None)  # one-shot: no second wake-up for the same input
    assert [bytes(b) for b in lease.conn.recv()] == [b"x"]
    assert idle.park(lease)  # armed again
    client.send([b"y"])
    assert idle.wait(5) == (True, lease)


def test_a_waiting_thread_that_takes_the_lease_disarms_it(setup):
    idle, leases, lease, client, _ = setup
    assert idle.park(lease)
    assert leases.take_free(1) is lease
    idle.unwatch(lease)
    client.send([b"reply"])
    assert idle.wait(0.2) == (False, None)  # the waiting thread reads it, nobody is woken


def test_a_lazy_connection_is_armed_later_or_when_a_reply_is_needed(setup):
    idle, leases, lease, client, awaited = setup
    assert idle.park(lease, lazy=True) and lease in idle.lazy
    client.send([b"ack"])
    assert idle.wait(0.2) == (False, None)  # unarmed: the next call reads it in passing
    idle.arm_lazy(time.monotonic(), after=60.0)
    assert idle.wait(0.1) == (False, None)  # not yet due
    idle.arm_lazy(time.monotonic() + 61.0, after=60.0)
    assert not idle.lazy and idle.wait(5) == (True, lease)
    lease.conn.recv()
    # a request whose reply is needed arms it at once
    assert idle.park(lease, lazy=True)
    idle.claim(1)
    client.send([b"reply"])
    assert idle.wait(5) == (True, lease)
    lease.conn.recv()
    # ... and so does one registered before the lease was left free
    awaited.add(1)
    assert idle.park(lease, lazy=True) and not idle.lazy
    client.send([b"reply"])
    assert idle.wait(5) == (True, lease)
    lease.conn.recv()
    # a waiting thread that takes a lazy lease leaves nothing behind
    awaited.clear()
    assert idle.park(lease, lazy=True)
    assert leases.take_free(1) is lease
    idle.unwatch(lease)
    assert not idle.lazy


def test_stop_wakes_the_wait_and_parks_nothing_more(setup):
    idle, leases, lease, client, _ = setup
    idle.stop()
    assert idle.wait(5) == (True, None)
    assert not idle.park(lease)  # the caller keeps reading
