"""Unit tests of the transports (src/torchrpc/transport): TCP on the loopback interface.

Every blocking call runs with a timeout or in a thread that is joined with one,
and every socket is closed, so nothing can hang or leak.
"""
from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest

from torchrpc import transport
from torchrpc.transport import ConnectionClosed, auth, tcp

pytestmark = pytest.mark.timeout(60)

JOIN_S = 20.0


class Bg:
    """Run ``fn`` in a thread; ``result()`` joins it and returns or re-raises."""

    def __init__(self, fn, *args, name="test-bg"):
        self._value = None
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self._error = e

    def join(self, timeout=JOIN_S):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background thread did not finish"

    def alive(self):
        return self._thread.is_alive()

    def result(self, timeout=JOIN_S):
        self.join(timeout)
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture
def listener():
    lst = transport.listen("tcp://127.0.0.1:0")
    yield lst
    lst.close()


@pytest.fixture
def pair(listener):
    """(client, server) connections over loopback TCP."""
    acc = Bg(listener.accept)
    client = transport.connect(listener.address, timeout=10)
    server = acc.result()
    yield client, server
    client.close()
    server.close()


def _read_n(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "listener closed during the handshake"
        data += chunk
    return data


def client_handshake(sock):
    """Do the connector's side of the transport handshake by hand (no secret, no shared memory,
    empty identities: the listener fixture has none)."""
    hello, nonce = auth.PROTOCOL, bytes(32)
    sock.sendall(struct.pack("<I3Q", 3, len(hello), len(nonce), 0) + hello + nonce)
    _read_n(sock, 4 + 24 + 32)  # [nonce_s, empty identity, empty proof]
    sock.sendall(struct.pack("<I3Q", 3, 0, 0, 0))  # [empty proof, no probe]
    assert _read_n(sock, 4 + 16 + 3)[-3:] == b"tcp"  # [answer, empty proof]


@contextlib.contextmanager
def raw_client(listener):
    """A plain socket connected to ``listener`` (handshake done), and the accepted Connection;
    both closed at the end of the block."""
    host, port = tcp._parse(listener.address.partition("://")[2])
    acc = Bg(listener.accept)
    sock = socket.create_connection((host, port), timeout=10)
    try:
        client_handshake(sock)
        conn = acc.result()
        try:
            yield sock, conn
        finally:
            conn.close()
    finally:
        sock.close()


def as_bytes(frame):
    return [bytes(b) for b in frame]


# --- addresses -----------------------------------------------------------------------


def test_listen_picks_a_port(listener):
    scheme, _, hostport = listener.address.partition("://")
    assert scheme == "tcp"
    host, port = tcp._parse(hostport)
    assert host == "127.0.0.1" and 0 < port < 65536


@pytest.mark.parametrize("address", ["udp://127.0.0.1:1", "nope://x", "TCP://127.0.0.1:1", "shm://name"])
def test_unknown_scheme(address):
    with pytest.raises(ValueError, match="scheme"):
        transport.listen(address)
    with pytest.raises(ValueError, match="scheme"):
        transport.connect(address, timeout=0.1)


@pytest.mark.parametrize("address", [
    "127.0.0.1:0",              # no scheme
    "tcp://127.0.0.1",          # no port
    "tcp://127.0.0.1:",         # empty port
    "tcp://127.0.0.1:http",     # port not a number
    "tcp://127.0.0.1:-1",
    "tcp://",
])
def test_malformed_address(address):
    with pytest.raises(ValueError):
        transport.listen(address)
    with pytest.raises(ValueError):
        transport.connect(address, timeout=0.1)


def test_connect_to_nothing_fails_with_connection_closed():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    t0 = time.monotonic()
    with pytest.raises(ConnectionClosed):
        transport.connect(f"tcp://127.0.0.1:{port}", timeout=0.3)
    assert time.monotonic() - t0 < 5


def test_ipv6_loopback():
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    lst = transport.listen("tcp://[::1]:0")
    try:
        assert lst.address.startswith("tcp://[::1]:")
        acc = Bg(lst.accept)
        c = transport.connect(lst.address, timeout=10)
        s = acc.result()
        try:
            c.send([b"six"])
            assert as_bytes(s.recv()) == [b"six"]
        finally:
            c.close()
            s.close()
    finally:
        lst.close()


# --- frames ---------------------------------------------------------------------------


def test_frames_roundtrip_including_zero_length_buffers(pair):
    client, server = pair
    frames = [
        [b"hello"],
        [b"", b"a", b"", bytearray(b"bc"), b""],
        [b""],
        [],
        [memoryview(b"view"), bytearray(0), b"x" * 100_000],
        [np.arange(10, dtype=np.float64)],  # non-byte formats count in bytes
        [memoryview(np.arange(6, dtype=np.int32).reshape(2, 3))],
        [b"%d" % i for i in range(600)],  # more buffers than one sendmsg takes
    ]
    expect = [[bytes(memoryview(b).cast("B")) if memoryview(b).format != "B" or memoryview(b).ndim != 1
               else bytes(b) for b in f] for f in frames]
    for f in frames:
        client.send(f)
    for want in expect:
        got = server.recv()
        assert isinstance(got, list)
        assert all(isinstance(b, bytearray) for b in got)  # writable, for tensor storage
        assert as_bytes(got) == want
    # and the other way
    server.send([b"", b"back"])
    assert as_bytes(client.recv()) == [b"", b"back"]


def test_traffic_counters(pair):
    client, server = pair
    client.send([b"abc", b""])
    client.send([b"de"])
    server.recv()
    server.recv()
    assert (client.frames_sent, client.bytes_sent) == (2, 5)
    assert (server.frames_received, server.bytes_received) == (2, 5)


def test_64_mib_buffer(pair):
    client, server = pair
    big = np.random.default_rng(0).integers(0, 256, size=64 << 20, dtype=np.uint8)
    digest = hashlib.sha256(big).hexdigest()
    sender = Bg(client.send, [b"head", big, b"tail"])
    got = server.recv()
    sender.result()
    assert [len(b) for b in got] == [4, 64 << 20, 4]
    assert bytes(got[0]) == b"head" and bytes(got[2]) == b"tail"
    assert hashlib.sha256(got[1]).hexdigest() == digest


def test_concurrent_senders_never_interleave(pair):
    client, server = pair
    n_threads, n_frames = 4, 150
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 200_000, size=(n_threads, n_frames))

    def frame_for(t, i):
        size = int(sizes[t, i])
        body = bytes([t * 50 + i % 50]) * size
        n_small = i % 12  # sometimes more than the 8 buffers of the join path
        return [struct.pack("<II", t, i), body] + [bytes([t, i % 256, k]) for k in range(n_small)]

    def send_all(t):
        for i in range(n_frames):
            client.send(frame_for(t, i))

    senders = [Bg(send_all, t, name=f"sender{t}") for t in range(n_threads)]
    next_seq = [0] * n_threads
    try:
        for _ in range(n_threads * n_frames):
            got = server.recv()
            t, i = struct.unpack("<II", got[0])
            assert i == next_seq[t], "frames of one sender arrive in order"
            next_seq[t] += 1
            assert as_bytes(got) == frame_for(t, i)
    finally:
        for s in senders:
            s.result()
    assert next_seq == [n_frames] * n_threads


# --- closing --------------------------------------------------------------------------


# --- deferred sends, the receive buffer, pending input ---------------------------------


def wait_for_input(conn, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not conn.pending_input():
        assert time.monotonic() < deadline, "no input arrived"
        time.sleep(0.001)


def test_deferred_frames_wait_for_the_next_send_and_keep_their_order(pair):
    client, server = pair
    client.send([b"a"], defer=True)
    client.send([b"b", b"c"], defer=True)
    assert client.has_deferred
    time.sleep(0.2)
    assert not server.pending_input()  # nothing went out
    client.send([b"d"])
    assert not client.has_deferred
    assert [as_bytes(server.recv()) for _ in range(3)] == [[b"a"], [b"b", b"c"], [b"d"]]
    assert client.frames_sent == server.frames_received == 3


def test_idle_until_the_first_byte_of_a_frame_and_fileno_shows_it(listener):
    # The reader's watcher waits on fileno() only while the connection is idle: a frame whose
    # start is already in the connection's buffer must not count as idle (epoll would not show
    # it), or a reader would leave a half-read frame to a watcher that never wakes for it.
    import select

    with raw_client(listener) as (sock, conn):
        fd = conn.fileno()
        assert fd is not None and fd >= 0
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert conn.idle() and not poller.poll(0)
        payload = bytes(range(256)) * 1024  # 256 KiB: larger than the receive buffer
        frame = struct.pack("<IQ", 1, len(payload)) + payload
        sock.sendall(frame[:1000])  # the header and the start of the buffer
        deadline = time.monotonic() + 5
        while conn.idle():
            assert time.monotonic() < deadline, "the start of the frame never arrived"
            time.sleep(0.001)
        assert not conn.pending_input() and not conn.idle()  # begun, not whole
        rest = Bg(sock.sendall, frame[1000:])
        assert as_bytes(conn.recv()) == [payload]
        rest.result()
        assert conn.idle() and not poller.poll(0)
        sock.sendall(struct.pack("<IQ", 1, 1) + b"x")
        assert poller.poll(5000)  # something arrived: the descriptor says so
        assert not conn.idle() and conn.pending_input()
        assert as_bytes(conn.recv()) == [b"x"]


def test_flush_sends_deferred_frames(pair):
    client, server = pair
    for i in range(100):
        client.send([b"%d" % i], defer=True)
    client.flush()
    assert not client.has_deferred
    assert [as_bytes(server.recv()) for _ in range(100)] == [[b"%d" % i] for i in range(100)]
    client.flush()  # nothing deferred: a no-op
    assert not server.pending_input()


def test_a_large_frame_is_never_deferred_and_goes_after_the_deferred_ones(tcp_pair):
    client, server = tcp_pair
    big = bytes(range(256)) * 1024  # 256 KiB: more than a small frame
    client.send([b"first"], defer=True)
    sender = Bg(client.send, [big], True)
    assert as_bytes(server.recv()) == [b"first"]
    assert as_bytes(server.recv()) == [big]
    sender.result()
    assert not client.has_deferred


def test_deferring_on_a_closed_connection_raises(pair):
    client, _ = pair
    client.close()
    with pytest.raises(ConnectionClosed):
        client.send([b"late"], defer=True)


def test_pending_input_means_a_whole_frame(listener):
    with raw_client(listener) as (sock, conn):
        assert not conn.pending_input()
        frame = struct.pack("<I2Q", 2, 3, 5) + b"abc" + b"defgh"
        sock.sendall(frame[:9])  # header and part of the lengths
        time.sleep(0.1)
        assert not conn.pending_input()
        sock.sendall(frame[9:-1])  # all but the last byte
        time.sleep(0.1)
        assert not conn.pending_input()
        sock.sendall(frame[-1:])
        wait_for_input(conn)
        assert as_bytes(conn.recv()) == [b"abc", b"defgh"]
        assert not conn.pending_input()
        sock.close()  # the end of the connection counts as input: recv reports it
        wait_for_input(conn)
        with pytest.raises(ConnectionClosed):
            conn.recv()


def test_wait_input_returns_on_input_on_buffered_bytes_and_at_the_end(listener):
    with raw_client(listener) as (sock, conn):
        assert not conn.wait_input(0.05)  # nothing came
        waiter = Bg(conn.wait_input, 10.0)
        time.sleep(0.05)
        sock.sendall(struct.pack("<I1Q", 1, 2) + b"ab" + struct.pack("<I1Q", 1, 1))
        assert waiter.result() is True
        assert as_bytes(conn.recv()) == [b"ab"]
        assert conn.wait_input(0.0)  # the next frame's start is in the receive buffer already
        sock.sendall(b"c")
        assert as_bytes(conn.recv()) == [b"c"]
        sock.close()
        assert conn.wait_input(10.0)  # the end of the connection counts: recv reports it
        with pytest.raises(ConnectionClosed):
            conn.recv()
    assert conn.wait_input(0.0)  # closed here: recv reports it at once


def test_receive_buffer_many_frames_in_one_read_and_frames_split_byte_by_byte(listener):
    with raw_client(listener) as (sock, conn):
        frames = [[b"x" * (i % 7), b"%d" % i] for i in range(2000)]
        frames.insert(1000, [bytes(200_000), b"big"])  # larger than the receive buffer
        wire = b"".join(struct.pack(f"<I{len(f)}Q", len(f), *map(len, f)) + b"".join(f) for f in frames)
        sender = Bg(sock.sendall, wire)
        assert [as_bytes(conn.recv()) for _ in frames] == frames
        sender.result()
        one = struct.pack("<I2Q", 2, 4, 2) + b"abcd" + b"ef"
        sender = Bg(lambda: [sock.sendall(one[i:i + 1]) for i in range(len(one))])
        assert as_bytes(conn.recv()) == [b"abcd", b"ef"]
        sender.result()


def test_close_unblocks_recv(pair):
    client, server = pair
    blocked = Bg(server.recv)
    time.sleep(0.2)
    assert blocked.alive()
    t0 = time.monotonic()
    server.close()
    with pytest.raises(ConnectionClosed):
        blocked.result(5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConnectionClosed):
        server.send([b"after close"])
    with pytest.raises(ConnectionClosed):
        server.recv()


@pytest.fixture
def tcp_pair(listener, monkeypatch):
    """(client, server) connections with the shared-memory path off: everything on the socket."""
    monkeypatch.setenv("TORCHRPC_SHM", "0")
    acc = Bg(listener.accept)
    client = transport.connect(listener.address, timeout=10)
    server = acc.result()
    assert not client.uses_shm and not server.uses_shm
    yield client, server
    client.close()
    server.close()


def test_close_unblocks_a_sender_stuck_on_a_full_socket(tcp_pair):
    client, server = tcp_pair
    stuck = Bg(client.send, [bytes(64 << 20)])  # nobody reads: fills the socket buffers
    time.sleep(0.3)
    client.close()
    with pytest.raises(ConnectionClosed):
        stuck.result(10)


def test_peer_close_gives_connection_closed(pair):
    client, server = pair
    client.send([b"last words"])
    client.close()
    assert as_bytes(server.recv()) == [b"last words"]  # what was sent still arrives
    with pytest.raises(ConnectionClosed):
        server.recv()


def test_peer_close_while_blocked_in_recv(pair):
    client, server = pair
    blocked = Bg(server.recv)
    time.sleep(0.2)
    client.close()
    with pytest.raises(ConnectionClosed):
        blocked.result(5)


def test_close_twice_is_harmless(pair):
    client, _ = pair
    client.close()
    client.close()


def test_listener_close_unblocks_accept():
    lst = transport.listen("tcp://127.0.0.1:0")
    blocked = Bg(lst.accept)
    time.sleep(0.2)
    lst.close()
    with pytest.raises(ConnectionClosed):
        blocked.result(5)


@pytest.mark.parametrize("cut", [2, 4, 10, 14, 15])
def test_peer_dies_mid_frame(listener, cut):
    with raw_client(listener) as (sock, conn):
        wire = struct.pack("<IQ", 1, 5) + b"hello"
        sock.sendall(wire[:cut])
        sock.close()
        with pytest.raises(ConnectionClosed):
            conn.recv()


# --- hostile headers ------------------------------------------------------------------


def _recv_hostile(listener, raw: bytes):
    with raw_client(listener) as (sock, conn):
        sock.sendall(raw)
        tracemalloc.start()
        try:
            with pytest.raises(ConnectionClosed):
                conn.recv()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak


@pytest.mark.parametrize("count", [2**32 - 1, 2**31, tcp.MAX_BUFFERS + 1])
def test_huge_buffer_count_rejected_without_allocating(listener, count):
    # only the 4-byte count is sent: a recv that believed it would wait for 8*count more bytes
    peak = _recv_hostile(listener, struct.pack("<I", count))
    assert peak < 1 << 20


@pytest.mark.parametrize("lengths", [
    [2**63],
    [2**64 - 1],
    [tcp.MAX_FRAME_BYTES + 1],
    [tcp.MAX_FRAME_BYTES // 2 + 1, tcp.MAX_FRAME_BYTES // 2 + 1],  # only the sum is too big
    [0, 2**62, 2**62, 2**62],
])
def test_huge_frame_size_rejected_without_allocating(listener, lengths):
    raw = struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths) + b"some bytes"
    peak = _recv_hostile(listener, raw)
    assert peak < 1 << 20


def test_frame_size_limit_is_enforced(listener, monkeypatch):
    # the limit itself (1 TiB by default) is checked before allocating: with a
    # small limit, a frame just over it is refused and one at it is accepted
    monkeypatch.setattr(tcp, "MAX_FRAME_BYTES", 1000)
    with raw_client(listener) as (sock, conn):
        sock.sendall(struct.pack("<IQQ", 2, 500, 500) + b"a" * 1000)
        got = conn.recv()
        assert [len(b) for b in got] == [500, 500]
        sock.sendall(struct.pack("<IQQ", 2, 500, 501))
        with pytest.raises(ConnectionClosed):
            conn.recv()


def test_buffer_count_limit_is_accepted_at_the_limit(listener):
    with raw_client(listener) as (sock, conn):
        n = tcp.MAX_BUFFERS
        sock.sendall(struct.pack("<I", n) + bytes(8 * n))
        got = conn.recv()
        assert len(got) == n and all(len(b) == 0 for b in got)


def test_random_garbage_never_hangs_or_raises_other_errors(listener):
    rng = np.random.default_rng(2)
    for trial in range(20):
        with raw_client(listener) as (sock, conn):
            sock.sendall(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes())
            sock.shutdown(socket.SHUT_WR)  # and then the peer is done
            try:
                while True:
                    frame = conn.recv()
                    assert isinstance(frame, list)
            except ConnectionClosed:
                pass



def _overcommit_always() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"
    except OSError:
        return True


@pytest.mark.skipif(_overcommit_always(), reason="with overcommit_memory=1 the allocation would succeed and "
                    "zero-filling 64 GiB would get the test process killed")
def test_frame_claiming_more_memory_than_exists_is_rejected(listener):
    claim = tcp.MAX_FRAME_BYTES  # at the limit: passes the check, more than this machine can hold
    assert claim > 24 << 30
    _recv_hostile(listener, struct.pack("<IQ", 1, claim) + b"x")
