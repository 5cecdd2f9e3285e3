"""How TCP (and TLS) connections begin: a listener that admits and handshakes each incoming
connection on its own, and a connector that retries until its deadline.

Registers the ``tcp://`` and ``tls://`` schemes. The handshake itself is in
:mod:`.handshake`, the bounds on strangers in :mod:`.admission`, the framing of an
established connection in :mod:`.tcp`.
"""
from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from typing import Callable, Optional

from . import auth, handshake
from .admission import Gate
from .base import Connection, ConnectionClosed, Listener, register_scheme
from .tcp import TCPConnection, _parse
from .tls import TLSConfig


class HandshakeError(ConnectionClosed):
    """The peer failed authentication or the TLS certificate check: not worth retrying."""


class TCPListener(Listener):
    """Accepts connections; each handshakes in its own thread under an admission :class:`Gate`,
    and :meth:`accept` hands out those that completed it."""

    def __init__(self, hostport: str, secret: Optional[bytes] = None, tls: Optional[TLSConfig] = None,
                 identity: bytes = b"", handshake_timeout: float = handshake.HANDSHAKE_TIMEOUT) -> None:
        self._secret = secret
        self._tls = tls.server_context() if tls is not None else None
        #: what this side proves about itself in each handshake; may be set after creation
        self.identity = identity
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
        self.gate = Gate(handshake_timeout)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._handshakes: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=fn, name=f"torchrpc-listener-{what}", daemon=True)
                         for fn, what in ((self._accept_loop, "accept"), (self.gate.run_reaper, "reaper"))]
        for t in self._threads:
            t.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._sock.accept()
            except OSError:
                break
            if self._closed:
                sock.close()
                break
            ticket = self.gate.admit(sock, addr[0])
            t = threading.Thread(target=self._handshake, args=(sock, addr, ticket),
                                 name="torchrpc-listener-handshake", daemon=True)
            with self._lock:
                self._handshakes.add(t)
            t.start()
        self._ready.put(None)

    def _handshake(self, sock: socket.socket, addr: tuple, ticket: int) -> None:
        peer = f"tcp://{addr[0]}:{addr[1]}"
        conn: Optional[TCPConnection] = None
        try:
            deadline = self.gate.deadline(ticket)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                self.gate.replace(ticket, sock)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.do_handshake()
            conn = TCPConnection(sock, peer)
            handshake.acceptor_side(conn, self._secret, self.identity, deadline,
                                    admit=lambda: self.gate.release(ticket))
        except Exception as e:  # whatever a stranger sent, the listener carries on
            self.gate.failed(peer, e)
            if conn is not None:
                conn.close()
            else:
                sock.close()
            conn = None
        finally:
            self.gate.release(ticket)
            with self._lock:
                self._handshakes.discard(threading.current_thread())
        if conn is not None:
            if self._closed:
                conn.close()
            else:
                self._ready.put(conn)

    def accept(self) -> Connection:
        conn = self._ready.get()
        if conn is None:
            self._ready.put(None)  # for any other caller
            raise ConnectionClosed(f"listener {self.address} closed")
        return conn

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self.gate.close()
        with self._lock:
            threads = [*self._threads, *self._handshakes]
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join(2.0)
        while True:  # connections that completed their handshake but were never taken
            try:
                conn = self._ready.get_nowait()
            except queue.Empty:
                break
            if conn is not None:
                conn.close()
        self._ready.put(None)


def _connect(hostport: str, timeout: float, secret: Optional[bytes] = None, tls: Optional[TLSConfig] = None,
             identity: bytes = b"", check_peer: Optional[Callable[[bytes], None]] = None) -> Connection:
    """Connect and handshake, retrying (refused, reset, or a handshake that timed out or was
    cut) until ``timeout``; a wrong proof or certificate is final, and so is whatever
    ``check_peer`` raises."""
    host, port = _parse(hostport)
    ctx = tls.client_context() if tls is not None else None
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            try:
                if ctx is not None:
                    sock = ctx.wrap_socket(sock)
                conn = TCPConnection(sock, f"tcp://{hostport}")
            except BaseException:
                sock.close()
                raise
            try:
                handshake.connector_side(conn, secret, identity,
                                         min(deadline, handshake.deadline_in()), check_peer)
            except BaseException:
                conn.close()
                raise
            return conn
        except ssl.SSLCertVerificationError as e:
            raise HandshakeError(f"TLS handshake with tls://{hostport} failed: {e}") from e
        except auth.AuthenticationError as e:
            raise HandshakeError(f"handshake with tcp://{hostport} failed: {e}") from e
        except OSError as e:
            if time.monotonic() + delay >= deadline:
                raise ConnectionClosed(f"could not connect to tcp://{hostport}: {e}") from e
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _tls_listener(hostport: str, secret: Optional[bytes] = None, tls: Optional[TLSConfig] = None,
                  **options: object) -> Listener:
    if tls is None:
        raise ValueError("a tls:// address needs a TLS configuration (certificate, key, CA)")
    return TCPListener(hostport, secret, tls, **options)  # type: ignore[arg-type]


def _tls_connect(hostport: str, timeout: float, secret: Optional[bytes] = None,
                 tls: Optional[TLSConfig] = None, **options: object) -> Connection:
    if tls is None:
        raise ValueError("a tls:// address needs a TLS configuration (certificate, key, CA)")
    return _connect(hostport, timeout, secret, tls, **options)  # type: ignore[arg-type]


register_scheme("tcp", TCPListener, _connect)
register_scheme("tls", _tls_listener, _tls_connect)
