"""Real hosts on one machine: workers in their own Linux network namespaces, joined by a veth
pair, so that a link can be cut with ``ip link set ... down``.

Skipped, with the reason, where namespaces cannot be created (not root, no iproute2).
The addresses are on the test's own veth pair inside namespaces it creates and removes.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
import uuid

import pytest

import torchrpc as rpc
from common import init, sleep_then, whoami
from harness import KILLED, get_context, start_workers

pytestmark = pytest.mark.timeout(120)

CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """Namespaces a (10.77.x.1) and b (10.77.x.2) joined by a veth pair; yields their names and addresses."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"trpc-a-{tag}", f"trpc-b-{tag}"
    probe = _ip("netns", "add", ns_a)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    subnet = 100 + int(tag[:2], 16) % 100
    addr_a, addr_b = f"10.77.{subnet}.1", f"10.77.{subnet}.2"
    veth_a, veth_b = f"va{tag}", f"vb{tag}"
    try:
        steps = [
            ("netns", "add", ns_b),
            ("link", "add", veth_a, "type", "veth", "peer", "name", veth_b),
            ("link", "set", veth_a, "netns", ns_a),
            ("link", "set", veth_b, "netns", ns_b),
            ("-n", ns_a, "addr", "add", f"{addr_a}/24", "dev", veth_a),
            ("-n", ns_b, "addr", "add", f"{addr_b}/24", "dev", veth_b),
            ("-n", ns_a, "link", "set", veth_a, "up"),
            ("-n", ns_b, "link", "set", veth_b, "up"),
            ("-n", ns_a, "link", "set", "lo", "up"),
            ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the test network ({' '.join(step)}): {r.stderr.strip()}")
        yield {"ns": (ns_a, ns_b), "addr": (addr_a, addr_b), "veth": (veth_a, veth_b)}
    finally:
        _ip("netns", "del", ns_a)
        _ip("netns", "del", ns_b)


def enter_netns(name: str) -> None:
    """Move this (still single-threaded) worker into network namespace ``name``."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")
    finally:
        os.close(fd)


def _cut_link(rank, world_size, hosts, ready, cut):
    # worker0 and worker2 on host a, worker1 on host b
    host = 1 if rank == 1 else 0
    enter_netns(hosts["ns"][host])
    os.environ.update(MASTER_ADDR=hosts["addr"][0], TORCHRPC_ADDR=hosts["addr"][host], TORCHRPC_SHM="0",
                      TORCHRPC_SECRET="cut-link-test")  # across hosts a job needs a secret
    init(rank, world_size, rpc_timeout=60)
    out = {"before": rpc.rpc_sync(f"worker{(rank + 1) % world_size}", whoami)}
    if rank == 0:
        fut = rpc.rpc_async("worker1", sleep_then, args=(40, "never"))
        ready.set()
        cut.wait(30)
        t0 = time.monotonic()
        try:
            fut.wait()
            out["error"] = "no error"
        except RuntimeError as e:
            out["error"] = str(e)
        out["took"] = time.monotonic() - t0
        out["others"] = rpc.rpc_sync("worker2", whoami)
    elif rank == 1:
        ready.wait(30)
        time.sleep(60)  # cut off; the test kills it
    else:
        ready.wait(30)
        cut.wait(30)
    if rank != 1:
        t0 = time.monotonic()
        rpc.shutdown()
        out["shutdown_took"] = time.monotonic() - t0
    return out


def test_cut_link_fails_pending_calls_within_5s_and_the_rest_carry_on(two_hosts):
    ctx = get_context()
    ready, cut = ctx.Event(), ctx.Event()
    with start_workers(_cut_link, 3, args=(two_hosts, ready, cut)) as group:
        assert ready.wait(60)
        r = _ip("-n", two_hosts["ns"][1], "link", "set", two_hosts["veth"][1], "down")
        assert r.returncode == 0, r.stderr
        cut.set()
        time.sleep(6)
        group.kill(1)
        results = group.join(60)
    out = results[0]
    assert results[1] is KILLED
    assert out["before"] == "worker1"
    assert "worker1" in out["error"] and "heartbeat" in out["error"], out["error"]
    assert out["took"] < 5.0
    assert out["others"] == "worker2"
    assert out["shutdown_took"] < 10 and results[2]["shutdown_took"] < 10
