"""The connections nobody reads: left free by their readers, watched together.

A reader leaves a connection free once nothing of a next frame has arrived on it
(``Connection.idle()``). Its descriptor then goes into one ``epoll`` set, armed one-shot:
the watcher (runtime/reader.py) waits on the set and takes the lease of the first
connection that has input, exactly once per arrival; the descriptor is armed again only
when that lease is left free again. A thread that waits for a reply may take a free lease
first and read the reply itself: it disarms the descriptor (:meth:`IdleSet.unwatch`).

A connection may also be left free *unarmed* (lazy): see :meth:`IdleSet.park`.
"""
from __future__ import annotations

import os
import select
import time
from typing import Callable, Optional

from .lease import Leases, ReadLease

#: what the set waits for on a free connection: input or its end, once
_WATCH = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT if hasattr(select, "epoll") else 0


class IdleSet:
    """The free connections of one worker, in an ``epoll`` set (Linux; elsewhere
    :attr:`available` is False and readers block in ``recv`` as before)."""

    def __init__(self, leases: Leases, awaits: Callable[[int], bool]) -> None:
        self._leases = leases
        self._awaits = awaits  # peer -> whether a reply from it is needed at once
        self.available = bool(_WATCH)
        self._epoll = select.epoll() if self.available else None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if self.available else -1
        if self._epoll is not None:
            self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._watched: dict[int, ReadLease] = {}  # fd -> the lease left free with it
        #: leases left free unarmed -> since when (see park)
        self.lazy: dict[ReadLease, float] = {}
        self._late: set[ReadLease] = set()  # armed by arm_lazy, not taken since
        self._stopped = False

    def park(self, lease: ReadLease, lazy: bool = False) -> bool:
        """Leave ``lease``'s connection free: call only while it is idle. False if it cannot be
        watched (the caller keeps reading: it blocks in ``recv``).

        With ``lazy`` (a waiting thread leaves it, and nothing but acks nobody waits for is
        expected), it is armed only by :meth:`arm_lazy` (the monitor, a few milliseconds
        later), or at once when a request whose reply is needed registers (:meth:`claim`): in
        a loop of calls the next call reads those acks itself, and no thread wakes for them."""
        conn = lease.conn
        fd = conn.fileno() if self._epoll is not None and not self._stopped and not conn.has_deferred else None
        if fd is None:
            return False
        self._watched[fd] = lease
        now = time.monotonic()
        if lazy:
            self.lazy[lease] = now
            self._leases.leave_free(lease, now)
            # a request registered after the caller looked may have missed the mark: look again
            if self._awaits(lease.peer) and self.lazy.pop(lease, None) is not None:
                return self.arm(lease)
            return True
        self._leases.leave_free(lease, now)
        return self.arm(lease)  # armed only now that the lease is free: the wake-up finds it so

    def arm(self, lease: ReadLease) -> bool:
        """Arm a free lease's descriptor; False if the connection closed meanwhile and the caller
        took the lease back (it reads on: ``recv`` reports the end)."""
        fd = lease.conn.fileno()
        try:
            if fd is None or self._epoll is None:
                raise ValueError("closed")
            try:
                self._epoll.modify(fd, _WATCH)
            except FileNotFoundError:
                self._epoll.register(fd, _WATCH)
        except (OSError, ValueError):
            return not self._leases.take(lease)
        return True

    def unwatch(self, lease: ReadLease) -> None:
        """A thread took a free lease to read it itself: no wake-up for it."""
        if self.lazy.pop(lease, None) is not None:
            return  # never armed
        self._late.discard(lease)
        fd = lease.conn.fileno()
        if fd is not None and self._epoll is not None:
            try:
                self._epoll.modify(fd, 0)
            except (OSError, ValueError):
                pass

    def claim(self, peer: int) -> None:
        """A reply from ``peer`` is needed as soon as it comes: arm its connection if it was left
        free unarmed."""
        if self.lazy:
            lease = self._leases.free.get(peer)
            if lease is not None and self.lazy.pop(lease, None) is not None:
                self.arm(lease)

    def arm_lazy(self, now: float, after: float) -> None:
        """Arm the connections left free unarmed ``after`` seconds ago or earlier."""
        for lease, since in list(self.lazy.items()):
            if now - since >= after and self.lazy.pop(lease, None) is not None:
                self._late.add(lease)
                self.arm(lease)

    def armed_late(self, lease: ReadLease) -> bool:
        """Whether ``lease``, just taken from :meth:`wait`, was armed by :meth:`arm_lazy` (what
        arrived on it waited for that)."""
        if lease in self._late:
            self._late.discard(lease)
            return True
        return False

    def wait(self, timeout: float) -> tuple[bool, Optional[ReadLease]]:
        """Wait up to ``timeout`` s (-1: no limit, 0: a poll) for input on a free connection:
        (whether anything came, the lease taken for the caller: None if a waiting thread took
        it first, or if it was :meth:`wake`). Raises ``OSError`` once closed."""
        assert self._epoll is not None
        try:
            events = self._epoll.poll(timeout, 1)
        except InterruptedError:
            return False, None
        if not events:
            return False, None
        lease = self._watched.get(events[0][0])
        if lease is None or not self._leases.take(lease):
            return True, None
        return True, lease

    def wake(self) -> None:
        """End a :meth:`wait` of another thread now (it returns (True, None))."""
        if self._epoll is not None:
            os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        """Park nothing more; wake the waiting thread."""
        self._stopped = True
        self.wake()

    def close(self) -> None:
        """Release the descriptors (after :meth:`stop`, once no thread waits)."""
        if self._epoll is not None:
            self._epoll.close()
            os.close(self._wake_fd)
            self._wake_fd = -1
