"""The read lease: who reads a connection now.

Each connection has one lease, and at any moment it is in one of three states:

* ``READING``: one thread holds it and reads frames (a pool thread in its read loop, or a
  thread reading its own reply);
* ``BUSY``: its holder is handling a frame it read. Whoever takes it out of ``BUSY`` decides
  who reads next: the holder, done with the frame (back to ``READING``), or a hand-off
  (the holder is about to wait, or the monitor found it stuck): then a pool thread reads
  on, and the old holder, when it looks, finds the lease gone;
* ``FREE``: nobody reads it, since nothing has arrived on it. The reader's watcher (one
  thread waiting on every free connection at once) takes it when input arrives, unless
  a thread that waits for a reply from that peer took it first to read the reply itself.

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

    def take(self, lease: ReadLease) -> bool:
        """FREE -> READING for the caller, if ``lease`` itself is free and nobody was first."""
        if self.free.get(lease.peer) is not lease:
            return False
        got = self.free.pop(lease.peer, None)
        if got is lease:
            lease.state = LeaseState.READING
            return True
        if got is not None:  # a newer connection's lease, left free in between: not ours to take
            self.free.setdefault(got.peer, got)
        return False

    def overdue(self, now: float, busy_after: float) -> list[ReadLease]:
        """The BUSY leases whose frame has taken ``busy_after`` s (the caller races for them)."""
        return [lease for lease in list(self.busy) if now - lease.since >= busy_after]

    @property
    def active(self) -> bool:
        """Whether any lease is BUSY (the monitor has work)."""
        return bool(self.busy)

    def clear(self) -> None:
        self.free.clear()
