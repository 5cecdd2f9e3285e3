"""The same-host shared-memory path for large buffers: on, off, and falling back to the socket."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

import torchrpc as rpc
from common import ident, init
from harness import run_workers
from torchrpc import transport
from torchrpc.transport import shm, tcp

pytestmark = pytest.mark.timeout(120)  # above the harness timeout, so a hang gets stack dumps


def shm_backed(buf):
    """A received buffer is a view of a mapped segment (shared memory), not memory of its own."""
    return isinstance(buf, np.ndarray) and buf.base is not None


def connect_pair():
    lst = transport.listen("tcp://127.0.0.1:0")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("server", lst.accept()))
    t.start()
    client = transport.connect(lst.address, timeout=10)
    t.join(10)
    lst.close()
    return client, box["server"]


def test_large_buffers_travel_through_reused_shared_memory():
    client, server = connect_pair()
    try:
        assert client.uses_shm and server.uses_shm
        small = b"header"
        big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
        for round_ in range(3):
            client.send([small, big])
            got = server.recv()
            assert bytes(got[0]) == small
            assert shm_backed(got[1])  # a view of the segment, not a socket copy
            assert np.array_equal(np.frombuffer(got[1], np.float32), big)
            t = torch.frombuffer(got[1], dtype=torch.float32)
            assert t[12345].item() == 12345.0
            del got, t  # the receiver is done: the segment becomes free
        assert len(client._shm_tx._segments) == 1  # one segment, reused every round
    finally:
        client.close()
        server.close()


def test_segment_stays_busy_while_the_received_tensor_lives():
    client, server = connect_pair()
    try:
        client.send([np.ones(1 << 18, dtype=np.float32)])
        kept = torch.frombuffer(server.recv()[0], dtype=torch.float32)
        view = kept[10:20]
        del kept
        client.send([np.full(1 << 18, 2.0, dtype=np.float32)])  # needs a second segment
        second = server.recv()[0]
        assert len(client._shm_tx._segments) == 2
        assert view.sum().item() == 10.0  # the first buffer was not overwritten
        assert np.frombuffer(second, np.float32)[0] == 2.0
    finally:
        client.close()
        server.close()


def test_small_buffers_and_disabled_path_use_the_socket(monkeypatch):
    monkeypatch.setenv("TORCHRPC_SHM", "0")
    client, server = connect_pair()
    try:
        assert not client.uses_shm and not server.uses_shm
        big = np.arange(1 << 20, dtype=np.float32)
        box = {}
        reader = threading.Thread(target=lambda: box.setdefault("got", server.recv()))
        reader.start()
        client.send([big])  # 4 MiB over the socket: the reader must drain it meanwhile
        reader.join(10)
        got = box["got"]
        assert not shm_backed(got[0]) and np.array_equal(np.frombuffer(got[0], np.float32), big)
    finally:
        client.close()
        server.close()


def test_probe_from_another_shared_memory_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHRPC_SHM_DIR", str(tmp_path))
    name, token = shm.make_probe()
    try:
        assert shm.check_probe(name, token)
        assert not shm.check_probe(name, b"x" * 16)
        assert not shm.check_probe("../etc/passwd", token)
    finally:
        shm.remove_probe(name)
    assert not shm.check_probe(name, token)


def shm_in_use():
    agent = rpc.api.current.agent()
    return {peer: conn.uses_shm for peer, conn in agent.peers.peers()}


def big_tensor(n, fill):
    return torch.full((n,), float(fill))


def _roundtrip(rank, world_size, dirs, mode):
    if dirs is not None:
        os.environ["TORCHRPC_SHM_DIR"] = dirs[rank]
    if mode == "off":
        os.environ["TORCHRPC_SHM"] = "0"
    init(rank, world_size)
    out = {"shm": shm_in_use()}
    if rank == 0:
        ok = []
        for i in range(4):
            t = torch.randn(1 << 20)  # 4 MiB
            ok.append(torch.equal(rpc.rpc_sync("worker1", ident, args=(t,)), t))
            r = rpc.remote("worker1", big_tensor, args=(1 << 19, i))
            ok.append(torch.equal(r.to_here(), torch.full((1 << 19,), float(i))))
        out["ok"] = all(ok)
    rpc.shutdown()
    return out


@pytest.mark.parametrize("mode", ["on", "off", "fallback"])
def test_rpc_with_shared_memory_on_off_and_falling_back(mode, tmp_path):
    dirs = None
    if mode == "fallback":  # as two hosts: each worker has a shared-memory directory of its own
        dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
        for d in dirs:
            os.makedirs(d)
    def segments():
        return {f for f in os.listdir(shm.shm_dir()) if f.startswith("torchrpc-")}

    before = segments()  # a killed worker of another run may have left some behind
    outs = run_workers(_roundtrip, 2, args=(dirs, mode))
    assert outs[0]["ok"]
    expect = mode == "on"
    assert outs[0]["shm"] == {1: expect} and outs[1]["shm"] == {0: expect}
    assert segments() - before == set()


def test_descriptor_for_a_missing_segment_closes_the_connection():
    client, server = connect_pair()
    try:
        desc = shm.DESCRIPTOR.pack(b"torchrpc-doesnotexist", 64, 100)
        with client._send_lock:
            client._sock.sendall(tcp.struct.pack("<IQ", 1, tcp._SHM_BIT | len(desc)) + desc)
        with pytest.raises(transport.ConnectionClosed, match="bad shared-memory buffer"):
            server.recv()
    finally:
        client.close()
        server.close()
