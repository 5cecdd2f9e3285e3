"""The read lease: who reads a connection now.

Each connection has one lease, and at any moment it is in one of three states:

* ``READING``: one thread holds it and reads frames (a pool thread in its read loop, or a
  thread reading its own reply);
* ``BUSY``: its holder is handling a frame it read. Whoever takes it out of ``BUSY`` decides
  who reads next: the holder, done with the frame (back to ``READING``), or a hand-off
  (the holder is about to wait, or the monitor found it stuck): then a pool thread reads
  on, and the old holder, when it looks, finds the lease gone;
* ``FREE``: nobody reads it, since nothing is expected on it. The next thread that waits
  for a reply from that peer, a request whose reply nobody waits for, or the monitor
  takes it.

Every transition that two threads may race for is one atomic ``dict.pop`` (under the GIL,
no lock): exactly one of the racers wins it. Nothing here does I/O.
"""
from __future__ import annotations

import enum
from typing import Optional

from ..transport import Connection


class LeaseState(enum.Enum):
    READING = "reading"
    BUSY = "busy"
    FREE = "free"


class ReadLease:
    """The reading of one connection (see the module's docstring)."""

    __slots__ = ("peer", "conn", "since", "spin", "state")

    def __init__(self, peer: int, conn: Connection) -> None:
        self.peer = peer
        self.conn = conn
        self.since = 0.0  # when its holder took the frame it handles, or when it was left free
        self.spin = 1  # polls while the last polls found input (see reader.SPIN_S)
        self.state = LeaseState.READING

    def __repr__(self) -> str:
        return f"ReadLease(peer={self.peer}, {self.state.value})"


class Leases:
    """The leases that are ``BUSY`` or ``FREE``, and the transitions between the states."""

    def __init__(self) -> None:
        self.busy: dict[ReadLease, ReadLease] = {}
        self.free: dict[int, ReadLease] = {}  # peer -> its lease
        self._keep_read: dict[int, float] = {}  # peer -> until when its lease is not left free

    def begin_frame(self, lease: ReadLease, now: float) -> None:
        """READING -> BUSY: the holder handles a frame it read."""
        lease.since = now
        lease.state = LeaseState.BUSY
        self.busy[lease] = lease

    def end_frame(self, lease: ReadLease) -> bool:
        """BUSY -> READING, for whoever calls it first: the holder done with its frame, or a
        hand-off (which then gives the lease to another thread). False if someone else was first."""
        if self.busy.pop(lease, None) is None:
            return False
        lease.state = LeaseState.READING
        return True

    def holds(self, lease: Optional[ReadLease], peer: int) -> bool:
        """Whether ``lease`` (this thread's) is ``peer``'s and still BUSY with this thread's frame."""
        return lease is not None and lease.peer == peer and lease in self.busy

    def may_leave_free(self, peer: int, now: float) -> bool:
        return now >= self._keep_read.get(peer, 0.0)

    def leave_free(self, lease: ReadLease, now: float) -> None:
        """READING -> FREE."""
        lease.since = now
        lease.state = LeaseState.FREE
        self.free[lease.peer] = lease

    def take_free(self, peer: int) -> Optional[ReadLease]:
        """FREE -> READING for the caller, if ``peer``'s lease is free and nobody was first."""
        lease = self.free.pop(peer, None) if self.free else None
        if lease is not None:
            lease.state = LeaseState.READING
        return lease

    def keep_read(self, peer: int, until: float) -> None:
        """Do not leave ``peer``'s lease free before ``until`` (the peer starts requests)."""
        self._keep_read[peer] = until

    def overdue(self, now: float, busy_after: float, free_after: float) -> tuple[list[ReadLease], list[int]]:
        """The BUSY leases whose frame has taken ``busy_after`` s, and the peers whose lease has
        been FREE for ``free_after`` s (taken by nobody yet: the caller races for them)."""
        busy = [lease for lease in list(self.busy) if now - lease.since >= busy_after]
        free = [peer for peer, lease in list(self.free.items()) if now - lease.since >= free_after]
        return busy, free

    @property
    def active(self) -> bool:
        """Whether any lease is BUSY or FREE (the monitor has work)."""
        return bool(self.busy or self.free)

    def clear(self) -> None:
        self.free.clear()
