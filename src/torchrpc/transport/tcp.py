"""TCP transport: one socket per connection, frames with a length prefix.

Frame layout: ``u32 count`` then ``count`` × ``u64 length`` (little-endian), then
the buffers back to back. Sends gather all buffers in one ``sendmsg`` (no join,
so tensor memory goes to the kernel straight from its storage); receives read
each buffer into its own freshly allocated ``bytearray``, which the
deserializer then uses as tensor storage.
"""
from __future__ import annotations

import collections
import logging
import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from . import auth, shm
from .tls import TLSConfig
from .base import Connection, ConnectionClosed, Listener, block_hook, register_scheme

log = logging.getLogger("torchrpc")


class HandshakeError(ConnectionClosed):
    """The peer failed authentication or the TLS handshake: not worth retrying."""

_COUNT = struct.Struct("<I")
_IOV_MAX = 512
#: Frames claiming more buffers, or more bytes, than this are rejected before any allocation.
MAX_BUFFERS = 1 << 16
MAX_FRAME_BYTES = 1 << 36
#: In a length, this bit says the buffer is in shared memory: a descriptor travels instead.
_SHM_BIT = 1 << 63
_HANDSHAKE_TIMEOUT = 10.0
_LAZY_BYTES = 1 << 20
_RBUF_BYTES = 1 << 16
#: Frames up to this size are joined into one bytes object and may be deferred.
_SMALL_BYTES = 1 << 16


def _parse(hostport: str) -> tuple[str, int]:
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"TCP address {hostport!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _views(frame: Sequence) -> list[memoryview]:
    """Flat byte views of a frame's buffers, zero-length ones included (the count keeps them)."""
    views = []
    for b in frame:
        v = memoryview(b)
        views.append(v if v.ndim == 1 and v.format == "B" else v.cast("B"))
    return views


class TCPConnection(Connection):
    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self._sock = sock
        # Received bytes not yet taken: _rbuf[_r0:_r1]. Small buffers of a frame are copied
        # out of it; large ones are read straight into their own memory.
        self._rbuf = bytearray(_RBUF_BYTES)
        self._rview = memoryview(self._rbuf)
        self._r0 = self._r1 = 0
        self._send_lock = threading.Lock()
        #: small frames held back by ``send(defer=True)``, joined, in order
        self._deferred: collections.deque = collections.deque()
        self._closed = False
        self.peer = peer
        self.frames_sent = self.bytes_sent = self.frames_received = self.bytes_received = 0
        #: bytes read so far, frames in progress included: a long frame is not silence
        self.bytes_arriving = 0
        #: set when the peer shares this host's memory (see :func:`_negotiate`)
        self._shm_tx: Optional[shm.ShmSender] = None
        self._shm_rx: Optional[shm.ShmReceiver] = None
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    @property
    def uses_shm(self) -> bool:
        return self._shm_tx is not None

    def send(self, frame: Sequence, defer: bool = False) -> None:
        views = _views(frame)
        lengths = [v.nbytes for v in views]
        if self._shm_tx is not None and max(lengths, default=0) >= shm.THRESHOLD:
            views, wire = self._through_shm(views, lengths)
        else:
            wire = lengths
        views = [v for v in views if v.nbytes]
        views.insert(0, memoryview(struct.pack(f"<I{len(wire)}Q", len(wire), *wire)))
        small = sum(v.nbytes for v in views) <= _SMALL_BYTES and len(views) <= 8
        self.frames_sent += 1
        self.bytes_sent += sum(lengths)
        if small:
            data = b"".join(views)
            if defer:
                if self._closed:
                    raise ConnectionClosed(f"connection to {self.peer} is closed")
                self._deferred.append(data)
                return
            self._transmit([data], True)
        else:
            self._transmit(views, False)

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def flush(self) -> None:
        if self._deferred:
            self._transmit([], True)

    def _take_deferred(self) -> list:
        out = []
        q = self._deferred
        while q:
            try:
                out.append(q.popleft())
            except IndexError:  # taken by a concurrent flush
                break
        return out

    def _transmit(self, views: list, small: bool) -> None:
        """Send the deferred frames, then ``views``, under the send lock."""
        hook = block_hook()
        if hook is not None and (not small or isinstance(self._sock, ssl.SSLSocket)):
            hook()  # a large send, or TLS (no non-blocking try): may wait
            hook = None
        if hook is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(blocking=False):
            hook()
            self._send_lock.acquire()
        try:
            if self._closed:
                raise ConnectionClosed(f"connection to {self.peer} is closed")
            if self._deferred:
                views = [*self._take_deferred(), *views]
            if not views:
                return
            try:
                if small:
                    data = views[0] if len(views) == 1 else b"".join(views)
                    if hook is not None:
                        data = self._send_nowait(data, hook)
                    if data:
                        self._sock.sendall(data)
                elif isinstance(self._sock, ssl.SSLSocket):  # no sendmsg through TLS
                    for v in views:
                        self._sock.sendall(v)
                else:
                    self._sendmsg_all([memoryview(v) for v in views])
            except OSError as e:
                raise ConnectionClosed(f"send to {self.peer} failed: {e}") from e
        finally:
            self._send_lock.release()

    def _send_nowait(self, data: bytes, hook: Callable[[], None]) -> memoryview | bytes:
        """Send what the socket takes without waiting; call ``hook`` if some is left (returned)."""
        try:
            n = self._sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == len(data):
            return b""
        hook()
        return memoryview(data)[n:]

    def _through_shm(self, views: list[memoryview], lengths: list[int]) -> tuple[list[memoryview], list[int]]:
        """Move the large buffers of a frame into shared memory; (views to send, wire lengths)."""
        out, wire = [], []
        for v, n in zip(views, lengths):
            desc = self._shm_tx.put(v) if n >= shm.THRESHOLD else None  # type: ignore[union-attr]
            if desc is None:
                out.append(v)
                wire.append(n)
            else:
                out.append(memoryview(desc))
                wire.append(_SHM_BIT | len(desc))
        return out, wire

    def _sendmsg_all(self, views: list[memoryview]) -> None:
        sock = self._sock
        while views:
            n = sock.sendmsg(views[:_IOV_MAX])
            while n:
                first = views[0]
                if n >= first.nbytes:
                    n -= first.nbytes
                    views.pop(0)
                else:
                    views[0] = first[n:]
                    n = 0

    def _recv_some(self, view: memoryview, flags: int = 0) -> int:
        """One read from the socket into ``view``: bytes read (0 when ``MSG_DONTWAIT`` finds
        nothing). Raises ConnectionClosed at the end of the connection."""
        try:
            n = self._sock.recv_into(view, 0, flags)
        except BlockingIOError:
            return 0
        except (OSError, ValueError) as e:
            raise ConnectionClosed(f"connection to {self.peer} broke: {e}") from e
        if not n:
            raise ConnectionClosed(f"connection to {self.peer} closed")
        self.bytes_arriving += n
        return n

    def _compact(self) -> None:
        """Move the unread bytes to the front of the receive buffer."""
        left = self._r1 - self._r0
        self._rbuf[:left] = self._rview[self._r0:self._r1]
        self._r0, self._r1 = 0, left

    def _fill(self, flags: int = 0) -> int:
        """One read into the free end of the receive buffer (see :meth:`_recv_some`)."""
        if self._r1 == _RBUF_BYTES or self._r0 == self._r1:
            self._compact()
        n = self._recv_some(self._rview[self._r1:], flags)
        self._r1 += n
        return n

    def _read_exact(self, buf: memoryview) -> None:
        """Fill ``buf``: from the receive buffer first, then straight from the socket when
        what is missing is large, else through the buffer."""
        total, got = buf.nbytes, 0
        while True:
            take = min(self._r1 - self._r0, total - got)
            if take:
                buf[got:got + take] = self._rview[self._r0:self._r0 + take]
                self._r0 += take
                got += take
            if got == total:
                return
            if total - got >= _RBUF_BYTES // 2:
                got += self._recv_some(buf[got:])
            else:
                self._fill()

    def _take(self, n: int) -> bytearray:
        """The next ``n`` bytes (n <= the buffer's size), as a copy."""
        while self._r1 - self._r0 < n:
            if _RBUF_BYTES - self._r0 < n:
                self._compact()
            self._fill()
        b = self._rbuf[self._r0:self._r0 + n]
        self._r0 += n
        return b

    def pending_input(self) -> bool:
        """Whether a whole frame has arrived, so that ``recv`` returns without waiting (the end
        of the connection counts). Only the thread that calls ``recv`` may call this."""
        if self._frame_ready():
            return True
        if self._r1 - self._r0 == _RBUF_BYTES:
            return False  # a frame larger than the buffer: recv reads it
        if isinstance(self._sock, ssl.SSLSocket):
            return self._sock.pending() > 0
        try:
            return self._fill(socket.MSG_DONTWAIT) > 0 and self._frame_ready()
        except ConnectionClosed:
            return True

    def wait_input(self, timeout: float) -> bool:
        if self._closed or self._r1 > self._r0:
            return True
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0:
            return True
        try:
            return bool(self._poller.poll(timeout * 1000))
        except (OSError, ValueError):
            return True  # recv reports what broke

    def _frame_ready(self) -> bool:
        avail = self._r1 - self._r0
        if avail < 4:
            return False
        (count,) = _COUNT.unpack_from(self._rbuf, self._r0)
        if count > MAX_BUFFERS:
            return True  # recv rejects it at once
        need = 4 + 8 * count
        if avail < need:
            return False
        lengths = struct.unpack_from(f"<{count}Q", self._rbuf, self._r0 + 4)
        return avail >= need + sum(n & ~_SHM_BIT for n in lengths)

    def _recv_shm(self, n: int) -> object:
        if self._shm_rx is None or n != shm.DESCRIPTOR.size:
            raise ConnectionClosed(f"unexpected shared-memory buffer from {self.peer}; closing")
        desc = bytearray(n)
        self._read_exact(memoryview(desc))
        try:
            return self._shm_rx.get(bytes(desc))
        except (OSError, ValueError) as e:
            raise ConnectionClosed(f"bad shared-memory buffer from {self.peer}: {e}; closing") from e

    def recv_limited(self, max_bytes: int) -> list:
        """Receive a frame during the handshake, refusing one bigger than ``max_bytes``."""
        head = bytearray(4)
        self._read_exact(memoryview(head))
        (count,) = _COUNT.unpack(head)
        if count > 8:
            raise ConnectionClosed(f"handshake frame from {self.peer} claims {count} buffers")
        lens_raw = bytearray(8 * count)
        self._read_exact(memoryview(lens_raw))
        lengths = struct.unpack(f"<{count}Q", lens_raw)
        if sum(lengths) > max_bytes:
            raise ConnectionClosed(f"handshake frame from {self.peer} is too large")
        frame = []
        for n in lengths:
            b = bytearray(n)
            self._read_exact(memoryview(b))
            frame.append(b)
        return frame

    def recv(self) -> list:
        (count,) = _COUNT.unpack(self._take(4))
        if count > MAX_BUFFERS:
            raise ConnectionClosed(f"frame from {self.peer} claims {count} buffers; closing")
        if 8 * count <= _RBUF_BYTES:
            lens_raw = self._take(8 * count)
        else:
            lens_raw = bytearray(8 * count)
            self._read_exact(memoryview(lens_raw))
        lengths = struct.unpack(f"<{count}Q", lens_raw)
        if sum(n & ~_SHM_BIT for n in lengths) > MAX_FRAME_BYTES:
            raise ConnectionClosed(f"frame from {self.peer} claims {sum(lengths)} bytes; closing")
        frame = []
        for n in lengths:
            if n & _SHM_BIT:
                frame.append(self._recv_shm(n & ~_SHM_BIT))
                continue
            if n <= self._r1 - self._r0:  # all here already: one copy out of the buffer
                frame.append(self._take(n))
                continue
            try:
                # A large buffer comes from numpy.empty: its pages are only committed as the
                # data arrives, so a length claimed in a header costs nothing until then.
                b = bytearray(n) if n < _LAZY_BYTES else np.empty(n, np.uint8)
            except MemoryError:
                raise ConnectionClosed(f"frame from {self.peer} needs {n} bytes, more than this process can "
                                       "allocate; closing") from None
            self._read_exact(memoryview(b))
            frame.append(b)
        self.frames_received += 1
        self.bytes_received += sum(lengths)
        return frame

    def close(self) -> None:
        with_lock = self._send_lock.acquire(timeout=1.0)
        try:
            self._closed = True
        finally:
            if with_lock:
                self._send_lock.release()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        if self._shm_tx is not None:
            self._shm_tx.close()
        if self._shm_rx is not None:
            self._shm_rx.close()


class TCPListener(Listener):
    def __init__(self, hostport: str, secret: Optional[bytes] = None, tls: Optional[TLSConfig] = None) -> None:
        self._secret = secret
        self._tls = tls.server_context() if tls is not None else None
        host, port = _parse(hostport)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        bound = self._sock.getsockname()
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.address = f"{'tls' if tls is not None else 'tcp'}://{shown}:{bound[1]}"
        self._closed = False

    def accept(self) -> Connection:
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError as e:
                raise ConnectionClosed(f"listener {self.address} closed") from e
            if self._closed:
                sock.close()
                raise ConnectionClosed(f"listener {self.address} closed")
            if self._tls is not None:
                try:
                    sock.settimeout(_HANDSHAKE_TIMEOUT)
                    sock = self._tls.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as e:
                    log.warning("torchrpc: TLS handshake with %s failed: %s", addr, e)
                    sock.close()
                    continue
            conn = TCPConnection(sock, f"tcp://{addr[0]}:{addr[1]}")
            try:
                _negotiate(conn, initiator=False, secret=self._secret)
                return conn
            except (ConnectionClosed, OSError, ValueError) as e:
                log.warning("torchrpc: connection from %s failed the transport handshake: %s", conn.peer, e)
                conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _connect(hostport: str, timeout: float, secret: Optional[bytes] = None,
             tls: Optional[TLSConfig] = None) -> Connection:
    host, port = _parse(hostport)
    ctx = tls.client_context() if tls is not None else None
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            if ctx is not None:
                try:
                    sock = ctx.wrap_socket(sock)
                except ssl.SSLError as e:
                    sock.close()
                    raise HandshakeError(f"TLS handshake with tls://{hostport} failed: {e}") from e
            conn = TCPConnection(sock, f"tcp://{hostport}")
            try:
                _negotiate(conn, initiator=True, secret=secret)
            except (OSError, ValueError) as e:
                conn.close()
                raise HandshakeError(f"handshake with tcp://{hostport} failed: {e}") from e
            return conn
        except HandshakeError:
            raise  # a wrong secret or certificate does not get better by retrying
        except OSError as e:
            if time.monotonic() + delay >= deadline:
                raise ConnectionClosed(f"could not connect to tcp://{hostport}: {e}") from e
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _tls_listener(hostport: str, secret: Optional[bytes] = None, tls: Optional[TLSConfig] = None) -> Listener:
    if tls is None:
        raise ValueError("a tls:// address needs a TLS configuration (certificate, key, CA)")
    return TCPListener(hostport, secret, tls)


def _tls_connect(hostport: str, timeout: float, secret: Optional[bytes] = None,
                 tls: Optional[TLSConfig] = None) -> Connection:
    if tls is None:
        raise ValueError("a tls:// address needs a TLS configuration (certificate, key, CA)")
    return _connect(hostport, timeout, secret, tls)


register_scheme("tcp", TCPListener, _connect)
register_scheme("tls", _tls_listener, _tls_connect)


_HELLO = b"torchrpc-tcp/2"


def _negotiate(conn: TCPConnection, initiator: bool, secret: Optional[bytes]) -> None:
    """The transport handshake: mutual authentication (:mod:`.auth`), then the shared-memory
    path, on only if both want it and the acceptor can open a probe segment the connector
    made (then they share this host's memory). Frames are size-capped throughout."""
    conn._sock.settimeout(_HANDSHAKE_TIMEOUT)
    try:
        if initiator:
            nonce_c = auth.new_nonce()
            conn.send([_HELLO, nonce_c])
            reply = conn.recv_limited(128)
            if len(reply) != 2:
                raise auth.AuthenticationError(f"{conn.peer} answered the handshake with {len(reply)} buffers")
            nonce_s = bytes(reply[0])
            auth.check(secret, b"acceptor", nonce_c, nonce_s, reply[1], f"listener {conn.peer}")
            tls = isinstance(conn._sock, ssl.SSLSocket)  # with TLS, all data stays inside TLS
            probe = shm.make_probe() if shm.enabled() and not tls else None
            try:
                conn.send([auth.mac(secret, b"connector", nonce_c, nonce_s),
                           probe[0].encode() if probe else b"", probe[1] if probe else b""])
                answer = conn.recv_limited(64)
            finally:
                if probe:
                    shm.remove_probe(probe[0])
            use = answer == [b"shm"]
        else:
            hello = conn.recv_limited(64)
            if len(hello) != 2 or bytes(hello[0]) != _HELLO:
                raise ValueError("not a torchrpc connection")
            nonce_c, nonce_s = bytes(hello[1]), auth.new_nonce()
            if len(nonce_c) != auth.NONCE_BYTES:
                raise auth.AuthenticationError("malformed challenge")
            conn.send([nonce_s, auth.mac(secret, b"acceptor", nonce_c, nonce_s)])
            proof = conn.recv_limited(256)
            if len(proof) != 3:
                raise auth.AuthenticationError(f"{conn.peer} sent a malformed proof")
            auth.check(secret, b"connector", nonce_c, nonce_s, proof[0], f"connection from {conn.peer}")
            name = bytes(proof[1]).decode("ascii", "replace")
            use = (bool(name) and shm.enabled() and not isinstance(conn._sock, ssl.SSLSocket)
                   and shm.check_probe(name, bytes(proof[2])))
            conn.send([b"shm" if use else b"tcp"])
    finally:
        conn._sock.settimeout(None)
    conn.frames_sent = conn.bytes_sent = conn.frames_received = conn.bytes_received = 0
    if use:
        conn._shm_tx, conn._shm_rx = shm.ShmSender(), shm.ShmReceiver()
