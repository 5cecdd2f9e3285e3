"""Injected faults: dropped RRef control and cleanup messages are retried, and nothing is lost."""
from __future__ import annotations

import gc
import time

import pytest

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import Tracked, add, hold, init, make_tracked, release, wait_live
from harness import run_workers
from torchrpc.runtime.faults import Faults

pytestmark = pytest.mark.timeout(120)

CONTROL = ["RREF_USER_DELETE", "RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_ACK",
           "CLEANUP_AUTOGRAD_CONTEXT_REQ"]


def agent():
    return rpc.api.current.agent()


def owner_tables():
    a = agent()
    return len(a.ctx.owners), len(a.ctx.forks), len(a.autograd.contexts.ids())


def dropped():
    return list(agent()._faults.dropped)


def make_local_and_share(to_hold):
    """On the owner: an RRef of a local value, shared with ``to_hold`` (owner -> user)."""
    r = rpc.RRef(Tracked("local"))
    rpc.rpc_sync(to_hold, hold, args=("from-owner", r))
    return True


def _dropped_once(rank, world_size):
    init(rank, world_size, rpc_timeout=30, _faults={"drop": {name: 1 for name in CONTROL}})
    out = {}
    if rank == 0:
        creator = rpc.remote("worker1", make_tracked, args=("c",))
        creator.to_here()
        rpc.rpc_sync("worker2", hold, args=("from-user", creator))  # user -> user
        rpc.rpc_sync("worker1", hold, args=("back", creator))       # user -> owner
        rpc.rpc_sync("worker1", make_local_and_share, args=("worker2",))
        for _ in range(3):
            with dist_autograd.context():
                rpc.rpc_sync("worker1", add, args=(1, 2))
                rpc.rpc_sync("worker2", add, args=(1, 2))
        del creator
        gc.collect()
        for w, key in (("worker2", "from-user"), ("worker1", "back"), ("worker2", "from-owner")):
            rpc.rpc_sync(w, release, args=(key,))
        out["live"] = rpc.rpc_sync("worker1", wait_live, args=(0, 20))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tables = [owner_tables()] + [rpc.rpc_sync(f"worker{r}", owner_tables) for r in (1, 2)]
            if all(t == (0, 0, 0) for t in tables):
                break
            time.sleep(0.05)
        out["tables"] = tables
        out["dropped"] = sorted(set(dropped() + rpc.rpc_sync("worker1", dropped) + rpc.rpc_sync("worker2", dropped)))
    rpc.shutdown()
    return out


def test_each_control_message_dropped_once_still_frees_every_value_once():
    out = run_workers(_dropped_once, 3, env={"TORCHRPC_CONTROL_RETRY": "0.2"}, timeout=100)[0]
    assert out["dropped"] == sorted(CONTROL)  # every kind really was lost once somewhere
    assert out["live"] == 0
    assert out["tables"] == [(0, 0, 0)] * 3


def _delayed(rank, world_size):
    init(rank, world_size, _faults={"delay": {"PYTHON_CALL": 0.3}})
    out = {}
    if rank == 0:
        t0 = time.monotonic()
        out["value"] = rpc.rpc_sync("worker1", add, args=(2, 3))
        out["took"] = time.monotonic() - t0
    rpc.shutdown()
    return out


def test_delayed_calls_still_complete():
    out = run_workers(_delayed, 2)[0]
    assert out["value"] == 5 and out["took"] >= 0.3


def test_fault_spec_is_checked():
    with pytest.raises(ValueError, match="unknown message type"):
        Faults({"drop": {"NOPE": 1}})
    with pytest.raises(ValueError, match="drop"):
        Faults({"explode": {}})
