"""A worker that dies: its peers' pending calls fail fast, naming it, and the rest carry on."""
from __future__ import annotations

import os
import time

import pytest

import torchrpc as rpc
from common import add, init, make_tracked, sleep_then, whoami
from harness import KILLED, get_context, run_workers, start_workers

pytestmark = pytest.mark.timeout(90)


def _survivor(rank, world_size, ready, killed):
    init(rank, world_size, rpc_timeout=60)  # far longer than the 5 s the failures must take
    out = {}
    if rank == 0:
        futs = [rpc.rpc_async("worker1", sleep_then, args=(50, i)) for i in range(3)]
        rref = rpc.remote("worker1", sleep_then, args=(50, "never"))
        ready.set()
        killed.wait(30)
        t0 = time.monotonic()
        errors = []
        for f in futs:
            try:
                f.wait()
                errors.append("no error")
            except RuntimeError as e:
                errors.append(str(e))
        try:
            rref.to_here()
        except RuntimeError as e:
            errors.append(str(e))
        out["errors"] = errors
        out["took"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            rpc.rpc_sync("worker1", add, args=(1, 1))
        except RuntimeError as e:
            out["new_call"] = (str(e), time.monotonic() - t0)
        # the others keep working among themselves, RRefs included
        out["others"] = (rpc.rpc_sync("worker2", whoami), rpc.remote("worker2", make_tracked, args=("x",)).to_here().tag)
    elif rank == 1:
        # not ready.wait(): stopped while holding the event's lock, it would block worker2 in it
        time.sleep(60)  # killed by the test meanwhile
    else:
        ready.wait(30)
        killed.wait(30)
    rpc.shutdown()  # graceful; must not wait for the dead worker
    return out


def test_dead_worker_fails_pending_futures_within_5s_and_others_carry_on():
    ctx = get_context()
    ready, killed = ctx.Event(), ctx.Event()
    with start_workers(_survivor, 3, args=(ready, killed)) as group:
        assert ready.wait(30)
        time.sleep(0.2)
        group.kill(1)
        killed.set()
        results = group.join(60)
    out = results[0]
    assert results[1] is KILLED
    assert len(out["errors"]) == 4
    for e in out["errors"]:
        assert "worker1" in e and "gone" in e, e
    assert out["took"] < 5.0
    msg, took = out["new_call"]
    assert "worker1" in msg and took < 1.0
    assert out["others"] == ("worker2", "x")


_SERVED = []


def whoami_served():
    _SERVED.append(True)
    return whoami()


def _caller_dies(rank, world_size, ready):
    init(rank, world_size)
    if rank == 0:
        # a call in flight on worker1 when its caller disappears: worker1 must go on serving
        rpc.rpc_async("worker1", sleep_then, args=(0.5, "late"))
        ready.set()
        time.sleep(60)
    else:
        ready.wait(30)
        time.sleep(1.0)  # the reply to worker0 fails; that must not break worker1 or worker2
        out = rpc.rpc_sync(f"worker{3 - rank}", whoami_served)
        # rank 0 hosted the store, so shutdown cannot wait for the other worker: wait here
        # until its call has been served, else closing may beat its request
        deadline = time.monotonic() + 30
        while not _SERVED and time.monotonic() < deadline:
            time.sleep(0.01)
        rpc.shutdown()
        return out


def test_worker_survives_its_caller_dying():
    ready = get_context().Event()
    with start_workers(_caller_dies, 3, args=(ready,)) as group:
        assert ready.wait(30)
        time.sleep(0.1)
        group.kill(0)
        results = group.join(60)
    assert results == [KILLED, "worker2", "worker1"]


def _frozen_peer(rank, world_size, ready, started):
    init(rank, world_size, rpc_timeout=60)
    started.release()  # every worker is connected: freezing worker1 cannot break a start-up
    out = {}
    if rank == 0:
        fut = rpc.rpc_async("worker1", sleep_then, args=(30, "never"))
        ready.set()  # the test now freezes worker1 with SIGSTOP: its sockets stay open and silent
        t0 = time.monotonic()
        try:
            fut.wait()
            out["error"] = "no error"
        except RuntimeError as e:
            out["error"] = str(e)
        out["took"] = time.monotonic() - t0
        out["others"] = rpc.rpc_sync("worker2", whoami)
    elif rank == 1:
        # not ready.wait(): stopped while holding the event's lock, it would block worker2 in it
        time.sleep(60)
    else:
        ready.wait(30)
        time.sleep(8)
    rpc.shutdown()
    return out


def test_frozen_worker_is_detected_by_heartbeats_within_5s():
    import signal

    ready, started = get_context().Event(), get_context().Semaphore(0)
    with start_workers(_frozen_peer, 3, args=(ready, started)) as group:
        assert ready.wait(30)
        for _ in range(3):
            assert started.acquire(timeout=30)
        os.kill(group.procs[1].pid, signal.SIGSTOP)
        try:
            time.sleep(7)
        finally:
            group.kill(1)  # SIGKILL works on a stopped process
        results = group.join(60)
    out = results[0]
    assert "worker1" in out["error"] and "heartbeat" in out["error"], out
    assert out["took"] < 5.0
    assert out["others"] == "worker2"


def _one_leaves_right_after_start_up(rank, world_size):
    if rank == 0:
        # rank 0 takes worker2's connection slowly: without a barrier at the end of start-up,
        # worker1 (which has all its connections by then) returns from init_rpc and leaves
        # while worker0 still waits, for a connection count that can no longer be reached
        from torchrpc.agent import Agent

        add_connection = Agent._add_connection

        def slow(self, peer, conn):
            if peer == 2:
                time.sleep(1.0)
            add_connection(self, peer, conn)

        Agent._add_connection = slow
    if rank == 2:
        # ... and worker2 connects after worker1 has (else worker0's acceptor, busy with
        # worker2, would hold worker1's connection back too)
        import torchrpc.agent as agent_module

        connect = agent_module.connect

        def late(*args, **kwargs):
            time.sleep(0.3)
            return connect(*args, **kwargs)

        agent_module.connect = late
    t0 = time.monotonic()
    init(rank, world_size, rpc_timeout=20)
    out = {"init_s": time.monotonic() - t0}
    if rank == 1:
        rpc.shutdown(graceful=False)  # its work is done: it leaves at once
        return out
    other = "worker2" if rank == 0 else "worker0"
    out["call"] = rpc.rpc_sync(other, add, args=(rank, 10))
    rpc.shutdown()
    return out


def test_init_rpc_returns_when_a_peer_leaves_right_after_start_up():
    outs = run_workers(_one_leaves_right_after_start_up, 3, timeout=60)
    assert outs[0]["call"] == 10 and outs[2]["call"] == 12
    assert all(o["init_s"] < 15 for o in outs), outs  # not the 20 s rpc_timeout
