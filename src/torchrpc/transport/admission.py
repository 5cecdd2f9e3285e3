"""Which unauthenticated connections a listener keeps while they handshake.

Each incoming connection handshakes in its own thread, so a silent or slow one holds
up no other. The :class:`Gate` bounds what strangers can hold: at most ``total``
connections in flight, at most ``per_source`` from one address, each with one deadline
for its whole handshake. When a new connection would pass a cap, the *oldest* one in
flight (from that address, else from anyone) is cut: a real peer's handshake takes
milliseconds, so it is the silent and the dripping ones that go, and a job on a
loopback address, where strangers and workers share the source address, still starts.
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("torchrpc")

#: Unauthenticated connections one listener keeps in flight, in all and per source address.
MAX_IN_FLIGHT = 64
MAX_PER_SOURCE = 16
#: Seconds between two warnings about failed handshakes (the others are counted).
WARN_EVERY = 5.0


@dataclass
class _Entry:
    sock: socket.socket
    source: str
    deadline: float


class Gate:
    """Unauthenticated connections in flight, their caps and deadlines (see the module)."""

    def __init__(self, timeout: float, total: int = MAX_IN_FLIGHT, per_source: int = MAX_PER_SOURCE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.total = total
        self.per_source = per_source
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: dict[int, _Entry] = {}  # ticket -> entry, oldest first
        self._tickets = itertools.count()
        self._closed = False
        self.evicted = 0
        self.expired = 0
        self._failures = 0
        self._last_warning = float("-inf")

    def admit(self, sock: socket.socket, source: str) -> int:
        """Take ``sock`` in; cut the oldest connections in flight that would pass a cap.
        Returns the ticket to :meth:`release` when its handshake ends."""
        with self._cond:
            same = [t for t, e in self._entries.items() if e.source == source]
            while len(same) >= self.per_source:
                self._cut(same.pop(0), "evicted")
            while len(self._entries) >= self.total:
                self._cut(next(iter(self._entries)), "evicted")
            ticket = next(self._tickets)
            self._entries[ticket] = _Entry(sock, source, self._clock() + self.timeout)
            self._cond.notify()
            return ticket

    def deadline(self, ticket: int) -> float:
        with self._cond:
            e = self._entries.get(ticket)
            return e.deadline if e is not None else self._clock()

    def replace(self, ticket: int, sock: socket.socket) -> None:
        """The handshake now runs on ``sock`` (a TLS socket over the accepted one)."""
        with self._cond:
            if ticket in self._entries:
                self._entries[ticket].sock = sock

    def release(self, ticket: int) -> bool:
        """The handshake of ``ticket`` is over (or about to be): whether it was still in flight,
        i.e. not cut. Once released, it can no longer be cut."""
        with self._cond:
            return self._entries.pop(ticket, None) is not None

    def expire(self) -> Optional[float]:
        """Cut the connections past their deadline; seconds until the next deadline (None: none)."""
        with self._cond:
            now = self._clock()
            for t in [t for t, e in self._entries.items() if e.deadline <= now]:
                self._cut(t, "expired")
            return min((e.deadline for e in self._entries.values()), default=now + 3600) - now

    def run_reaper(self) -> None:
        """Cut connections as their deadlines pass, until :meth:`close`."""
        with self._cond:
            while not self._closed:
                wait = self.expire()
                self._cond.wait(max(0.01, wait if wait is not None else 1.0))

    def close(self) -> None:
        """Cut every connection in flight and stop the reaper."""
        with self._cond:
            self._closed = True
            for t in list(self._entries):
                self._cut(t, None)
            self._cond.notify_all()

    def failed(self, peer: str, why: object) -> None:
        """Log a failed handshake: the first at once, then at most one line every WARN_EVERY s."""
        with self._cond:
            self._failures += 1
            now = self._clock()
            if now - self._last_warning < WARN_EVERY:
                return
            count, self._failures, self._last_warning = self._failures, 0, now
        more = f" ({count - 1} more since the last such warning)" if count > 1 else ""
        log.warning("torchrpc: connection from %s failed the transport handshake: %s%s", peer, why, more)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._entries)

    def _cut(self, ticket: int, why: Optional[str]) -> None:
        e = self._entries.pop(ticket)
        if why == "evicted":
            self.evicted += 1
        elif why == "expired":
            self.expired += 1
        try:
            e.sock.shutdown(socket.SHUT_RDWR)  # wakes the handshake thread blocked on it
        except OSError:
            pass
