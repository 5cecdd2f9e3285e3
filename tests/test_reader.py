"""Multi-process tests of the reader's fast paths (agent.py, ``Agent._read``).

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

import pytest

import torchrpc as rpc
import torchrpc.agent as agent_mod
from common import add, call, init, make_tracked, wait_live
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
        out["queued"] = len(rpc.api.current.agent()._deletes)
    rpc.shutdown()
    return out


def test_user_delete_reaches_the_owner_without_further_traffic():
    out = run_workers(_delete_without_traffic, 2, timeout=60)[0]
    assert out == {"live_after": 0, "queued": 0}


def echo_back(caller, i):
    """Runs on worker1: a nested call back to the caller (the reader hands its reading on)."""
    return call(caller, add, args=(i, 1000))


def _mixed_traffic(rank, world_size, spin_s):
    agent_mod.SPIN_S = spin_s
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
    agent_mod.HEARTBEAT_INTERVAL = 60.0  # no heartbeat traffic that would flush a stuck reply
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
