"""The demo (the README's main job), debug_info, and what a timeout error says."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

import torchrpc as rpc
from common import init, make_tracked, sleep_then
from harness import run_workers

pytestmark = pytest.mark.timeout(120)


def test_demo_trains_across_workers_and_writes_a_valid_png(tmp_path):
    png = tmp_path / "loss.png"
    proc = subprocess.run(
        [sys.executable, "-m", "torchrpc", "demo", "--workers", "3", "--steps", "150", "--no-progress",
         "--plot", str(png)],
        capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    first, final = map(float, re.search(r"loss\s+([\d.]+) -> ([\d.]+)", out).groups())
    assert final < first * 0.8, out  # the loss fell
    assert re.search(r"steps\s+150\s+\(\d+(\.\d+)? steps/s\)", out), out
    for w in ("worker0", "worker1", "worker2"):
        assert re.search(rf"{w}: sent [\d.]+ (KiB|MiB), received", out), out
    from PIL import Image

    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 200


def test_demo_rejects_bad_flags():
    proc = subprocess.run([sys.executable, "-m", "torchrpc", "demo", "--workers", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "at least 2" in proc.stderr


def _debug_info(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        keep = rpc.remote("worker1", make_tracked)
        keep._get_future().wait()  # the remote() itself is answered, not only to_here
        slow = rpc.rpc_async("worker1", sleep_then, args=(1.0, "ok"))
        info = rpc.debug_info()
        out["pending"] = info["pending_calls"]
        out["users"] = info["rrefs"]["num_confirmed_users"]
        out["peer"] = info["peers"]["worker1"]
        out["owner_side"] = rpc.rpc_sync("worker1", rpc.debug_info)["rrefs"]["num_owner_rrefs"]
        slow.wait()
        # a timeout names what this worker was still waiting on
        others = [rpc.rpc_async("worker1", sleep_then, args=(2.0,)) for _ in range(2)]
        try:
            rpc.rpc_sync("worker1", sleep_then, args=(3.0,), timeout=0.5)
        except rpc.RPCTimeoutError as e:
            out["timeout"] = str(e)
        for f in others:
            f.wait()
    rpc.shutdown()
    return out


def test_debug_info_and_timeout_message():
    out = run_workers(_debug_info, 2)[0]
    assert out["pending"] == {"worker1": ["sleep_then"]}
    assert out["users"] == 1 and out["owner_side"] == 1
    assert out["peer"]["alive"] and out["peer"]["msgs_sent"] > 0 and out["peer"]["bytes_received"] > 0
    msg = out["timeout"]
    assert "worker1" in msg and "timed out after 0.5 s" in msg
    assert "still waiting on 2 other call(s) to 'worker1': sleep_then, sleep_then" in msg
