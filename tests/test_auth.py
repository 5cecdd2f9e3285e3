"""Authenticated connections: only workers that know the job's secret get in."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

import torchrpc as rpc
from common import init, whoami
from harness import run_workers
from torchrpc import transport
from torchrpc.transport import auth

pytestmark = pytest.mark.timeout(120)  # above the harness timeout, so a hang gets stack dumps


def _accept_in_background(lst):
    box = {}

    def run():
        try:
            box["conn"] = lst.accept()
        except transport.ConnectionClosed as e:
            box["closed"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_same_secret_connects_and_wrong_or_missing_secret_is_refused():
    lst = transport.listen("tcp://127.0.0.1:0", secret=b"s3cret")
    t, box = _accept_in_background(lst)
    try:
        for bad in (b"wrong", None):
            with pytest.raises(transport.ConnectionClosed, match="failed authentication"):
                transport.connect(lst.address, timeout=5, secret=bad)
        good = transport.connect(lst.address, timeout=5, secret=b"s3cret")
        t.join(5)
        assert "conn" in box  # the listener skipped the impostors and accepted the real peer
        good.send([b"hello"])
        assert [bytes(b) for b in box["conn"].recv()] == [b"hello"]
        good.close()
        box["conn"].close()
    finally:
        lst.close()
        t.join(5)


def test_a_listener_that_does_not_know_the_secret_is_not_trusted():
    lst = transport.listen("tcp://127.0.0.1:0", secret=b"impostor")
    t, _ = _accept_in_background(lst)
    try:
        with pytest.raises(transport.ConnectionClosed, match="failed authentication"):
            transport.connect(lst.address, timeout=5, secret=b"real")
    finally:
        lst.close()
        t.join(5)


def test_nothing_is_decoded_before_authentication(tmp_path):
    """A raw client that skips the handshake and sends a pickle never gets it unpickled."""
    marker = tmp_path / "pwned"
    lst = transport.listen("tcp://127.0.0.1:0", secret=b"k")
    t, box = _accept_in_background(lst)
    host, port = lst.address[len("tcp://"):].rsplit(":", 1)
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(struct.pack("<IQ", 1, len(evil)) + evil)  # a frame: the listener must refuse it
            s.settimeout(5)
            assert s.recv(100) == b""  # closed without an answer
        # and a frame claiming a huge size is refused without allocating it
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(struct.pack("<IQ", 1, 1 << 40))
            s.settimeout(5)
            assert s.recv(100) == b""
        time.sleep(0.2)
        assert not marker.exists()
        assert "conn" not in box  # still waiting for a real peer
    finally:
        lst.close()
        t.join(5)


def test_proof_depends_on_secret_role_both_nonces_and_both_identities():
    a, b = auth.new_nonce(), auth.new_nonce()
    t = auth.transcript(a, b, b"worker1", b"worker0")
    base = auth.proof(b"k", b"acceptor", t)
    assert len(base) == 32
    others = [
        auth.proof(b"k2", b"acceptor", t),
        auth.proof(b"k", b"connector", t),
        auth.proof(b"k", b"acceptor", auth.transcript(b, a, b"worker1", b"worker0")),
        auth.proof(b"k", b"acceptor", auth.transcript(a, b, b"worker2", b"worker0")),  # another claimed identity
        auth.proof(b"k", b"acceptor", auth.transcript(a, b, b"worker0", b"worker1")),  # roles' identities swapped
        auth.proof(b"k", b"acceptor", auth.transcript(a, b, b"worker1w", b"orker0")),  # same bytes, other split
        auth.proof(b"k", b"acceptor", t, b"extra"),
    ]
    assert base not in others and len(set(others)) == len(others)
    auth.check(b"k", b"acceptor", t, base, "peer")
    with pytest.raises(auth.AuthenticationError):
        auth.check(b"k", b"acceptor", t, base[:-1] + bytes([base[-1] ^ 1]), "peer")


def test_frame_tags_depend_on_key_sequence_and_every_byte():
    key = b"x" * 32
    for size in (10, auth.LARGE_FRAME - 10, auth.LARGE_FRAME + 10):  # GMAC in one call, and as it comes
        data = bytes(range(256)) * (size // 256 + 1)
        data = data[:size]

        def tag(k=key, seq=0, d=data):
            m = auth.FrameMac(k)
            m.seq = seq
            h = m.start(len(d))
            h.update(d)
            return h.digest()

        t = tag()
        assert len(t) == auth.TAG_BYTES and t == tag()
        assert t != tag(k=b"y" * 32) and t != tag(seq=1)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 1
        assert t != tag(d=bytes(flipped))
    m = auth.FrameMac(key)
    assert [m.start(1) and m.seq for _ in range(3)] == [1, 2, 3]


def test_a_frame_tagged_in_one_call_or_piece_by_piece_gets_the_same_tag():
    """Each side picks how it computes a frame's tag (in one call under LARGE_FRAME, as the
    pieces come above): the tags must not depend on it, nor on how the bytes were split."""
    key = bytes(range(32))
    data = bytes(range(256)) * 600  # 150 KiB
    one = auth.FrameMac(key)
    one.seq = 7
    whole = one.tag(data)
    streamed = auth.FrameMac(key)
    streamed.seq = 7
    h = streamed.start(auth.LARGE_FRAME + 1)
    for i in range(0, len(data), 1000):
        h.update(memoryview(data)[i:i + 1000])
    assert h.digest() == whole and len(whole) == auth.TAG_BYTES
    pieces = auth.FrameMac(key)
    pieces.seq = 7
    h = pieces.start(10)
    h.update(data[:3])
    h.update(bytearray(data[3:]))
    assert h.digest() == whole
    assert one.seq == streamed.seq == pieces.seq == 8


def _with_secrets(rank, world_size, secrets):
    if secrets is not None:
        os.environ["TORCHRPC_SECRET"] = secrets[rank]
    try:
        init(rank, world_size, rpc_timeout=4)
    except RuntimeError as e:
        return f"init failed: {e}"
    out = rpc.rpc_sync(f"worker{(rank + 1) % world_size}", whoami)
    rpc.shutdown()
    return out


def test_job_secret_from_store_or_env_and_mismatch_fails_clearly():
    assert run_workers(_with_secrets, 2, args=(None,)) == ["worker1", "worker0"]  # generated, via the store
    assert run_workers(_with_secrets, 2, args=(["same", "same"],)) == ["worker1", "worker0"]
    outs = run_workers(_with_secrets, 2, args=(["one", "two"],), timeout=60)
    assert all(o.startswith("init failed") for o in outs), outs
    assert any("failed authentication" in o for o in outs), outs
