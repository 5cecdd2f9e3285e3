"""The requests this worker has sent and waits on: ids, deadlines, callbacks, counts per peer."""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable, Optional

from ..protocol import messages as m

ReplyCallback = Callable[[Optional[m.Message], Optional[BaseException]], None]

#: Who reads a request's reply: the thread that waits for it, when nobody else reads the
#: connection (WAITER); a reader or the watcher of free connections, as soon as it arrives
#: (CLAIM: a future or a callback needs it); or whoever reads the connection next, within a
#: few milliseconds (ANYONE: an ack nobody waits for). See runtime/reader.py.
WAITER, CLAIM, ANYONE = "waiter", "claim", "anyone"


class Pending:
    """One request waiting for its reply."""

    __slots__ = ("dest", "desc", "deadline", "timeout", "callback", "reader")

    def __init__(self, dest: int, desc: str, deadline: float, timeout: float, callback: ReplyCallback,
                 reader: str = CLAIM) -> None:
        self.dest = dest
        self.desc = desc
        self.deadline = deadline  # 0: none
        self.timeout = timeout
        self.callback = callback  # callback(reply, error), run exactly once by whoever pops the entry
        self.reader = reader


class PendingTable:
    """Pending requests by message id. Whoever pops an entry (the reply, the watchdog at its
    deadline, a lost peer, shutdown) runs its callback: each runs once. Thread-safe.

    ``clock`` is injected (``time.monotonic`` by default) so deadlines are tested without
    threads or sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._ids = itertools.count(1)
        self._entries: dict[int, Pending] = {}
        self._per_peer: dict[int, int] = {}
        self._awaited: dict[int, int] = {}  # per peer, the entries that are not ANYONE's
        self._deadlines: list[tuple[float, int]] = []  # a heap; entries popped early stay until due
        self._lock = threading.Lock()

    def add(self, dest: int, desc: str, timeout: float, callback: ReplyCallback, reader: str = CLAIM) -> int:
        """Register a request to ``dest`` that times out after ``timeout`` s (0: never); its id."""
        msg_id = next(self._ids)
        deadline = self.clock() + timeout if timeout > 0 else 0.0
        entry = Pending(dest, desc, deadline, timeout, callback, reader)
        with self._lock:
            self._entries[msg_id] = entry
            self._count(entry, 1)
            if deadline:
                heapq.heappush(self._deadlines, (deadline, msg_id))
        return msg_id

    def pop(self, msg_id: int) -> Optional[Pending]:
        """Take the entry of ``msg_id`` (None if another taker was first)."""
        with self._lock:
            entry = self._entries.pop(msg_id, None)
            if entry is not None:
                self._count(entry, -1)
        return entry

    def pop_reply(self, msg_id: int, src: int) -> Optional[Pending]:
        """Take the entry a reply from ``src`` answers; None if there is none or it went to
        another worker (then it stays)."""
        with self._lock:
            entry = self._entries.get(msg_id)
            if entry is None or entry.dest != src:
                return None
            del self._entries[msg_id]
            self._count(entry, -1)
        return entry

    def get(self, msg_id: int) -> Optional[Pending]:
        return self._entries.get(msg_id)

    def expired(self) -> list[Pending]:
        """Take the entries whose deadline has passed."""
        now, out = self.clock(), []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                entry = self._entries.pop(heapq.heappop(self._deadlines)[1], None)
                if entry is not None:
                    self._count(entry, -1)
                    out.append(entry)
        return out

    def take_peer(self, peer: int) -> list[Pending]:
        """Take every entry waiting on ``peer``."""
        with self._lock:
            ids = [i for i, e in self._entries.items() if e.dest == peer]
            out = [self._entries.pop(i) for i in ids]
            self._per_peer[peer] = self._awaited[peer] = 0
        return out

    def take_all(self) -> list[Pending]:
        with self._lock:
            out = list(self._entries.values())
            self._entries.clear()
            self._per_peer.clear()
            self._awaited.clear()
            self._deadlines.clear()
        return out

    def _count(self, entry: Pending, delta: int) -> None:
        self._per_peer[entry.dest] = self._per_peer.get(entry.dest, 0) + delta
        if entry.reader is not ANYONE:
            self._awaited[entry.dest] = self._awaited.get(entry.dest, 0) + delta

    def expects(self, peer: int) -> bool:
        """Whether a request to ``peer`` waits for its reply."""
        return self._per_peer.get(peer, 0) > 0

    def awaits(self, peer: int) -> bool:
        """Whether a reply from ``peer`` is needed as soon as it comes (a request to it that is
        not an ack nobody waits for)."""
        return self._awaited.get(peer, 0) > 0

    def descriptions(self, peer: Optional[int] = None) -> list[tuple[int, str]]:
        """(destination, description) of every entry, or of those to ``peer``."""
        return [(e.dest, e.desc) for e in list(self._entries.values()) if peer is None or e.dest == peer]

    def __len__(self) -> int:
        return len(self._entries)
