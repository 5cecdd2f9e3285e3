"""Multi-process tests of the reader's fast paths (runtime/reader.py).

* Replies a reader produces are deferred and flushed before it waits for input:
  nothing may stay behind, whatever mix of inline requests, requests handed to the
  pool and nested calls the connection carries.
* User deletes wait for the next request or the watchdog's tick: the owner frees the
  value even when no other message ever follows.
* A reader that served a request polls its socket before blocking (``SPIN_S``):
  results are the same with polling on and off.
"""
from __future__ import annotations

import gc
import time

import pytest

import torchrpc as rpc
import torchrpc.runtime.heartbeat as heartbeat_mod
import torchrpc.runtime.reader as reader_mod
from common import add, call, ident, init, make_tracked, wait_live
from harness import run_workers

pytestmark = pytest.mark.timeout(90)


def _delete_without_traffic(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        r = rpc.remote("worker1", make_tracked, args=("lonely",))
        assert r.to_here().tag == "lonely"
        # sent before the delete exists: after it, worker0 sends worker1 nothing at all
        waiting = rpc.rpc_async("worker1", wait_live, args=(0, 20.0))
        del r
        gc.collect()
        out["live_after"] = waiting.wait()
        out["queued"] = len(rpc.api.current.agent().endpoint._later)
    rpc.shutdown()
    return out


def test_user_delete_reaches_the_owner_without_further_traffic():
    out = run_workers(_delete_without_traffic, 2, timeout=60)[0]
    assert out == {"live_after": 0, "queued": 0}


def echo_back(caller, i):
    """Runs on worker1: a nested call back to the caller (the reader hands its reading on)."""
    return call(caller, add, args=(i, 1000))


def _mixed_traffic(rank, world_size, spin_s):
    reader_mod.SPIN_S = spin_s
    init(rank, world_size)
    out = {}
    if rank == 0:
        futs = []
        for i in range(400):
            if i % 25 == 0:
                futs.append(rpc.rpc_async("worker1", echo_back, args=("worker0", i)))
            else:
                futs.append(rpc.rpc_async("worker1", add, args=(i, i)))
        got = [f.wait() for f in futs]
        out["ok"] = got == [i + 1000 if i % 25 == 0 else 2 * i for i in range(400)]
        rrefs = [rpc.remote("worker1", make_tracked, args=(f"t{i}",)) for i in range(50)]
        out["tags"] = [r.to_here().tag for r in rrefs] == [f"t{i}" for i in range(50)]
        del rrefs
        gc.collect()
        out["live_after"] = rpc.rpc_sync("worker1", wait_live, args=(0, 20.0))
        out["sync"] = [rpc.rpc_sync("worker1", add, args=(i, 1)) for i in range(200)] == list(range(1, 201))
    rpc.shutdown()
    return out


@pytest.mark.parametrize("spin_s", [0.0, 0.0002], ids=["polling-off", "polling-on"])
def test_every_reply_arrives_with_deferred_replies_and_polling(spin_s):
    out = run_workers(_mixed_traffic, 2, args=(spin_s,), timeout=60)[0]
    assert out == {"ok": True, "tags": True, "live_after": 0, "sync": True}


def busy_then_big(seconds):
    """Runs on the reader for ``seconds``, then makes an 8 MiB tensor and its reply (a copy
    into shared memory): the monitor hands the reading on (at 4 ms) while the reply is made."""
    import time

    import torch

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return torch.ones(1 << 21)


def _replies_while_reading_changes_hands(rank, world_size):
    heartbeat_mod.HEARTBEAT_INTERVAL = 60.0  # no heartbeat traffic that would flush a stuck reply
    init(rank, world_size)
    out = {}
    if rank == 0:
        sums = [float(rpc.rpc_sync("worker1", busy_then_big, args=(0.003,), timeout=10).sum())
                for _ in range(150)]
        out["ok"] = sums == [float(1 << 21)] * 150
    rpc.shutdown()
    return out


def test_no_reply_stays_deferred_when_the_reading_changes_hands():
    # A reply deferred just as the monitor handed the reading on used to wait for the next
    # frame on the connection (here: none until a 10 s timeout).
    out = run_workers(_replies_while_reading_changes_hands, 2, timeout=80)[0]
    assert out == {"ok": True}


# --- the thread that waits for a reply reads it itself (Readers.wait_reply) ------------------


def _sync_calls_read_by_the_caller(rank, world_size):
    led = []
    orig = reader_mod.Readers._lead

    def counting_lead(self, lease, fut):
        led.append(lease.peer)
        return orig(self, lease, fut)

    reader_mod.Readers._lead = counting_lead
    init(rank, world_size)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()
        out["sums"] = [rpc.rpc_sync("worker1", add, args=(i, i)) for i in range(300)] == [2 * i for i in range(300)]
        out["left_free"] = 1 in agent.readers.leases.free
        r = rpc.remote("worker1", make_tracked, args=("mine",))
        out["to_here"] = [r.to_here().tag for _ in range(50)] == ["mine"] * 50
        out["led_by_worker0"] = sum(1 for p in led if p == 1)
    rpc.shutdown()
    return out


def test_a_thread_waiting_for_its_reply_reads_it_itself():
    out = run_workers(_sync_calls_read_by_the_caller, 2, timeout=60)[0]
    led = out.pop("led_by_worker0")
    assert out == {"sums": True, "left_free": True, "to_here": True}
    # the caller reads its own reply whenever nobody else reads the connection; the watcher
    # reads a reply that arrives before the caller waits for it (a descheduled caller, under load)
    assert led >= 150


FLAG = []


def set_flag(value):
    FLAG.append(value)
    return value


def call_back_later(caller, delay, value):
    """Runs on worker1: a thread calls ``set_flag`` on the caller ``delay`` s from now."""
    import threading
    import time

    def later():
        time.sleep(delay)
        rpc.rpc_sync(caller, set_flag, args=(value,))

    threading.Thread(target=later, daemon=True).start()
    return True


def _peer_request_while_free(rank, world_size):
    if rank == 0:
        reader_mod.LAZY_FOR = 1.0  # worker1's request (at 0.3 s) waits for the lazy arming
    init(rank, world_size)
    out = {}
    if rank == 0:
        import time

        agent = rpc.api.current.agent()
        assert rpc.rpc_sync("worker1", call_back_later, args=("worker0", 0.3, "hello"))
        out["free_after_call"] = left_free(agent, 1, within=0.2)  # nobody reads worker1's connection now
        # nothing is awaited from worker1: left free unarmed, for the next call to read in passing
        out["lazy_after_call"] = any(lease.peer == 1 for lease in list(agent.readers.idle.lazy))
        deadline = time.monotonic() + 20
        while not FLAG and time.monotonic() < deadline:
            time.sleep(0.01)
        out["flag"] = list(FLAG)
        # the watcher read worker1's request, served it and left the reading free again; the
        # request waited for the lazy arming, so worker1's connection is now left armed
        rpc.rpc_sync("worker1", add, args=(1, 2))
        out["free_after_that"] = left_free(agent, 1)
        out["lazy_after_that"] = any(lease.peer == 1 for lease in list(agent.readers.idle.lazy))
    rpc.shutdown()
    return out


def test_a_request_the_peer_starts_is_served_while_the_reading_is_free():
    # only the watcher can pick the free reading up here: worker0 sends nothing more
    out = run_workers(_peer_request_while_free, 2, timeout=60)[0]
    assert out == {"free_after_call": True, "lazy_after_call": True, "flag": ["hello"], "free_after_that": True,
                   "lazy_after_that": False}


def left_free(agent, peer: int, within: float = 2.0) -> bool:
    """Whether ``peer``'s reading is (or, within ``within`` s, becomes) free: a pool reader that
    completed the reply leaves it free just after the waiting thread has woken."""
    deadline = time.monotonic() + within
    while peer not in agent.readers.leases.free:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _async_after_sync(rank, world_size):
    heartbeat_mod.HEARTBEAT_INTERVAL = 60.0  # a heartbeat arriving with the reply would keep it read
    init(rank, world_size)
    out = {}
    if rank == 0:
        import torch

        agent = rpc.api.current.agent()
        rpc.rpc_sync("worker1", add, args=(1, 1))
        out["free"] = left_free(agent, 1)
        # torch's wait_all waits in C++: nobody leads, the watcher reads these
        futs = [rpc.rpc_async("worker1", add, args=(i, 1)) for i in range(20)]
        out["async"] = torch.futures.wait_all(futs) == list(range(1, 21))
        rpc.rpc_sync("worker1", add, args=(1, 1))
        done = []
        fut = rpc.rpc_async("worker1", add, args=(2, 2))
        fut.then(lambda f: done.append(f.value())).wait()  # a callback, nobody waiting on fut itself
        out["then"] = done
    rpc.shutdown()
    return out


def test_async_replies_are_read_when_the_reading_was_left_free():
    out = run_workers(_async_after_sync, 2, timeout=60)[0]
    assert out == {"free": True, "async": True, "then": [4]}


# --- the watcher: one thread waiting on every free connection (Readers._watch) ---------------

BLOCKED = None  # worker0's events, made in the worker process


def block_until_released(timeout):
    """Runs on worker0: block (as user code that waits on a lock would) until released."""
    BLOCKED["entered"].set()
    return BLOCKED["released"].wait(timeout)


def wait_entered(timeout):
    return BLOCKED["entered"].wait(timeout)


def release():
    BLOCKED["released"].set()
    return True


def _blocked_watcher(rank, world_size):
    import threading

    global BLOCKED
    BLOCKED = {"entered": threading.Event(), "released": threading.Event()}
    init(rank, world_size)
    out = {}
    if rank == 1:
        # served on worker0 by whoever reads this connection: the watcher, since it was free
        out["released"] = rpc.rpc_sync("worker0", block_until_released, args=(30.0,), timeout=60)
    elif rank == 2:
        # worker2's connection is free on worker0 and waits for the watcher; the thread that
        # held the role is stuck in worker1's call: the role must have passed on
        out["entered"] = rpc.rpc_sync("worker0", wait_entered, args=(20.0,), timeout=60)
        out["sums"] = [rpc.rpc_sync("worker0", add, args=(i, i), timeout=60) for i in range(50)]
        out["released"] = rpc.rpc_sync("worker0", release, timeout=60)
    rpc.shutdown()
    return out


def test_other_connections_are_read_while_user_code_blocks_the_watcher():
    out = run_workers(_blocked_watcher, 3, timeout=80)
    assert out[1] == {"released": True}
    assert out[2] == {"entered": True, "sums": [2 * i for i in range(50)], "released": True}


def _large_frames_both_ways(rank, world_size):
    import torch

    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        # frames larger than the connection's receive buffer arrive in pieces: a reader that
        # finds the start of one must read on, not leave it to the watcher (which only wakes
        # for bytes not yet taken in)
        ok = True
        for size in (64 << 10, 200 << 10, 3 << 20):
            t = torch.arange(size // 4, dtype=torch.float32)
            for _ in range(20):
                ok = ok and torch.equal(rpc.rpc_sync("worker1", ident, args=(t,)), t)
            futs = [rpc.rpc_async("worker1", ident, args=(t,)) for _ in range(8)]
            ok = ok and all(torch.equal(f.wait(), t) for f in futs)
        out["ok"] = ok
    rpc.shutdown()
    return out


@pytest.mark.parametrize("shm", ["1", "0"])
def test_frames_larger_than_the_receive_buffer_are_read_whole(shm):
    out = run_workers(_large_frames_both_ways, 2, timeout=80, env={"TORCHRPC_SHM": shm})[0]
    assert out == {"ok": True}


def _chained_by_callbacks(rank, world_size):
    import torch

    init(rank, world_size)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()

        def chain(n):
            """n calls in a row, each sent from the callback of the one before (as a pipeline
            chains its stages); the last one's result."""
            done = torch.futures.Future()

            def step(i, fut):
                v = fut.wait()
                if i == n:
                    done.set_result(v)
                else:
                    rpc.rpc_async("worker1", add, args=(v, 1)).then(lambda f: step(i + 1, f))

            rpc.rpc_async("worker1", add, args=(0, 1)).then(lambda f: step(1, f))
            return done.wait()

        chain(20)
        before = agent.readers._watcher  # the watcher role's generation: +1 per hand-over
        out["result"] = chain(200)
        out["hand_overs"] = agent.readers._watcher - before
    rpc.shutdown()
    return out


def test_requests_sent_from_reply_callbacks_keep_the_watcher_reading():
    """A request sent from a reply's callback, whose reply that thread does not wait for, does
    not pass the watcher's role on (that woke a pool thread for every stage of a pipeline)."""
    out = run_workers(_chained_by_callbacks, 2, timeout=60)[0]
    assert out["result"] == 200
    assert out["hand_overs"] < 20, out


def owned_value():
    return 21


def twice_of(rref):
    return 2 * rref.local_value()


def _control_in_passing(rank, world_size):
    from torchrpc.runtime.pool import Pool

    handed = []
    orig = Pool.submit

    def spying_submit(self, fn, *args):
        if getattr(fn, "__name__", "") == "_read_loop" and len(args) == 4 and args[3] is not None:
            handed.append(type(args[3][1][1]).__name__)  # a leader handing on a request it read
        return orig(self, fn, *args)

    Pool.submit = spying_submit
    init(rank, world_size)
    out = {}
    if rank == 0:
        param = rpc.remote("worker1", owned_value)
        param.to_here()
        # the owner answers each fork of ``param`` sent to it with an RRefChildAccept, which
        # arrives while this thread reads its own reply
        out["values"] = [rpc.remote("worker1", twice_of, args=(param,)).to_here() for _ in range(100)]
        out["handed"] = list(handed)
    rpc.shutdown()
    return out


def test_a_thread_reading_its_reply_serves_rref_bookkeeping_in_passing():
    """RRef protocol messages (Run.CONTROL) that arrive while a thread reads its own reply are
    served by that thread, not handed on with the reading (two thread wake-ups each)."""
    out = run_workers(_control_in_passing, 2, timeout=60)[0]
    assert out["values"] == [42] * 100
    assert "RRefChildAccept" not in out["handed"], out["handed"]
