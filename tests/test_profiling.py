"""torch.profiler on the caller: each RPC is an event; rpc_sync also gets the callee's execution time,
carried back in the reply."""
from __future__ import annotations

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import torchrpc as rpc
from common import init, sleep_then
from harness import run_workers

pytestmark = pytest.mark.timeout(120)  # above the harness timeout, so a hang gets stack dumps


def _profiled(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rpc.rpc_sync("worker1", sleep_then, args=(0.2, 1))
            fut = rpc.rpc_async("worker1", sleep_then, args=(0.1, 2))
            fut.wait()
        out["events"] = [(e.name, e.cpu_time_total) for e in prof.events() if e.name.startswith("rpc_")]
        out["unprofiled_type"] = type(rpc.rpc_async("worker1", sleep_then, args=(0, 3))).__name__
    rpc.shutdown()
    return out


def test_each_rpc_is_a_profiler_event_with_its_remote_execution_time():
    out = run_workers(_profiled, 2)[0]
    events = dict(out["events"])
    assert "rpc_sync#sleep_then(worker0 -> worker1)" in events, out
    sync, async_ = "rpc_sync#sleep_then(worker0 -> worker1)", "rpc_async#sleep_then(worker0 -> worker1)"
    assert events[sync] >= 200_000 and events[async_] >= 100_000  # us, the whole round trip
    remote = {name: int(re.search(r"remote_execution_us=(\d+)$", name).group(1))
              for name in events if "#remote_execution_us=" in name}
    by_call = {name.split("#remote_execution")[0]: us for name, us in remote.items()}
    assert 200_000 <= by_call[sync] <= events[sync]  # ran remotely at least as long as it slept
    assert set(by_call) == {sync}
    assert out["unprofiled_type"] == "Future"
