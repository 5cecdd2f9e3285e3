"""torch.profiler on the caller: each RPC is an event; rpc_sync also gets the callee's execution time,
carried back in the reply."""
from __future__ import annotations

import re

import pytest
from torch.profiler import ProfilerActivity, profile

import torchrpc as rpc
from common import init, raise_value_error, sleep_then
from harness import run_workers

pytestmark = pytest.mark.timeout(120)  # above the harness timeout, so a hang gets stack dumps


def _profiled(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rpc.rpc_sync("worker1", sleep_then, args=(0.2, 1))
            fut = rpc.rpc_async("worker1", sleep_then, args=(0.1, 2))
            out["async_value"] = fut.wait()
            out["async_then"] = rpc.rpc_async("worker1", sleep_then, args=(0, 5)).then(lambda f: f.value() + 1).wait()
            failing = rpc.rpc_async("worker1", raise_value_error, args=("boom",))
            try:
                failing.wait()
            except Exception as e:  # noqa: BLE001 (the type is checked below)
                out["async_error_type"] = type(e).__name__
                out["async_error"] = str(e)
        out["events"] = [(e.name, e.cpu_time_total) for e in prof.events() if e.name.startswith("rpc_")]
        out["unprofiled_type"] = type(rpc.rpc_async("worker1", sleep_then, args=(0, 3))).__name__
    rpc.shutdown()
    return out


def test_each_rpc_is_a_profiler_event_with_its_remote_execution_time():
    out = run_workers(_profiled, 2)[0]
    sync, async_ = "rpc_sync#sleep_then(worker0 -> worker1)", "rpc_async#sleep_then(worker0 -> worker1)"
    calls = {}  # event name -> durations (us) of its events, in order
    for name, us in out["events"]:
        calls.setdefault(name, []).append(us)
    assert len(calls[sync]) == 1 and calls[sync][0] >= 200_000, calls  # the whole round trip
    assert len(calls[async_]) == 2 and calls[async_][0] >= 100_000, calls
    assert len(calls["rpc_async#raise_value_error(worker0 -> worker1)"]) == 1, calls
    remote = [(name.split("#remote_execution_us=")[0], int(re.search(r"remote_execution_us=(\d+)$", name).group(1)))
              for name, _ in out["events"] if "#remote_execution_us=" in name]
    # One remote event per call that returned a value, recorded when the caller waited;
    # the failed call has none.
    assert [call for call, _ in remote] == [sync, async_, async_], remote
    assert 200_000 <= remote[0][1] <= calls[sync][0]  # ran remotely at least as long as it slept
    assert 100_000 <= remote[1][1] <= calls[async_][0]
    assert out["async_value"] == 2 and out["async_then"] == 6 and "boom" in out["async_error"]
    assert out["async_error_type"] == "ValueError"
    assert out["unprofiled_type"] == "Future"
