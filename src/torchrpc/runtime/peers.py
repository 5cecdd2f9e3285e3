"""The peer table: the workers of the job, their connections, and which are alive.

This is where membership lives: names and ids, the connection to each peer, the peers
that were lost and why, and the listeners told when one is lost.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from ..errors import DuplicateNameError, RPCError, UnknownWorkerError, WorkerUnavailableError
from ..transport import Connection
from ..worker_info import WorkerInfo

LostListener = Callable[[int, WorkerUnavailableError], None]


class PeerTable:
    """Workers by id and name, a connection per peer, and liveness. Thread-safe."""

    def __init__(self, rank: int, name: str) -> None:
        self.rank = rank
        self.me = WorkerInfo(name, rank)
        self.workers: list[WorkerInfo] = []
        self._by_name: dict[str, WorkerInfo] = {}
        self.conns: dict[int, Connection] = {}
        self.dead: dict[int, str] = {}  # peer -> why it was lost
        self.changed = threading.Condition()  # notified whenever names or connections change
        self._lost_listeners: list[LostListener] = []
        self.closed = False

    # --- names --------------------------------------------------------------------

    def set_workers(self, names: list[str]) -> None:
        """The job's workers, by rank; names must be unique."""
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DuplicateNameError(f"worker name {dupes[0]!r} is not unique: {dupes} used by ranks "
                                     f"{[r for r, n in enumerate(names) if n in dupes]}")
        with self.changed:
            self.workers = [WorkerInfo(n, r) for r, n in enumerate(names)]
            self._by_name = {w.name: w for w in self.workers}
            self.changed.notify_all()

    def wait_workers(self, timeout: float) -> bool:
        """Wait until the workers are known (or the table is closed); whether they are."""
        with self.changed:
            return self.changed.wait_for(lambda: bool(self.workers) or self.closed, timeout) and bool(self.workers)

    def resolve(self, to: Any = None) -> WorkerInfo:
        """Resolve a worker name, id or WorkerInfo (None: this worker). UnknownWorkerError (a
        RuntimeError and a ValueError) for one that is not in the job; ValueError for another type."""
        if to is None:
            return self.me
        if isinstance(to, WorkerInfo):
            if 0 <= to.id < len(self.workers) and self.workers[to.id] == to:
                return to
            raise UnknownWorkerError(f"could not find destination {to!r}: no such worker in this job")
        if isinstance(to, str):
            w = self._by_name.get(to)
            if w is None:
                raise UnknownWorkerError(f"could not find destination {to!r}: unknown worker name; workers are "
                                         f"{sorted(self._by_name)}")
            return w
        if isinstance(to, int) and not isinstance(to, bool):
            if 0 <= to < len(self.workers):
                return self.workers[to]
            raise UnknownWorkerError(f"could not find destination {to}: unknown worker id; ids are "
                                     f"0..{len(self.workers) - 1}")
        raise ValueError(f"Cannot get WorkerInfo from name {to!r}: a destination worker is a name, an id or a "
                         f"WorkerInfo, not {type(to).__name__}")

    def name_of(self, peer: int) -> str:
        return self.workers[peer].name if 0 <= peer < len(self.workers) else str(peer)

    # --- connections ----------------------------------------------------------------

    def add(self, peer: int, conn: Connection) -> None:
        with self.changed:
            self.conns[peer] = conn
            self.changed.notify_all()

    def connection(self, peer: int, wait: float) -> Connection:
        """The connection to ``peer``. During start-up a peer may call us before every peer has
        connected: wait up to ``wait`` s for it. Raises WorkerUnavailableError."""
        conn = self.conns.get(peer)
        if conn is None:
            with self.changed:
                self.changed.wait_for(lambda: peer in self.conns or peer in self.dead or self.closed, wait)
                conn = self.conns.get(peer)
            if conn is None:
                raise self.unavailable(peer, self.dead.get(peer, "not connected"))
        return conn

    def unavailable(self, peer: int, why: Any) -> WorkerUnavailableError:
        return WorkerUnavailableError(f"worker {self.name_of(peer)!r} (id {peer}) is unavailable: {why}")

    def missing(self) -> list[str]:
        """Names of the peers not connected (yet)."""
        return [w.name for w in self.workers if w.id != self.rank and w.id not in self.conns]

    def wait_connected(self, timeout: float) -> None:
        """Wait until every peer is connected; RPCError naming the missing ones after ``timeout``,
        or at once if one was connected and lost."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not self.workers or self.missing():
                lost = [f"{self.name_of(p)!r} ({why})" for p, why in sorted(self.dead.items())]
                if lost:
                    raise RPCError(f"worker(s) {', '.join(lost)} lost during start-up")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RPCError(f"timed out after {timeout:.0f} s waiting for workers "
                                       f"{self.missing()} to connect")
                self.changed.wait(left)

    def wait_gone(self, peer: int, timeout: float) -> None:
        """Wait until ``peer``'s connection is gone (it closed it)."""
        with self.changed:
            self.changed.wait_for(lambda: peer not in self.conns, timeout)

    def peers(self) -> list[tuple[int, Connection]]:
        """(peer, connection) of every connected peer other than this worker."""
        return [(p, c) for p, c in list(self.conns.items()) if p != self.rank]

    # --- liveness -------------------------------------------------------------------

    def on_lost(self, listener: LostListener) -> None:
        """Call ``listener(peer, error)`` once for each peer that is lost."""
        self._lost_listeners.append(listener)

    def lost(self, peer: int, conn: Connection, reason: str) -> bool:
        """``conn``, the connection to ``peer``, ended: forget it and, the first time, tell the
        listeners. Whether this call was the first to report it."""
        with self.changed:
            first = self.conns.get(peer) is conn  # the reader and the heartbeat may both report it
            if first:
                del self.conns[peer]
                if not self.closed:  # before waking senders, so that they fail at once
                    self.dead.setdefault(peer, reason)
            self.changed.notify_all()
        conn.close()
        if not first or self.closed:
            return False
        err = WorkerUnavailableError(f"worker {self.name_of(peer)!r} (id {peer}) is gone: {reason}")
        for listener in self._lost_listeners:
            listener(peer, err)
        return True

    def is_alive(self, peer: int) -> bool:
        return peer == self.rank or peer not in self.dead

    def stats(self, peer: int) -> dict[str, int]:
        """Messages and bytes exchanged with ``peer`` over its current connection."""
        conn = self.conns.get(peer)
        return {
            "msgs_sent": conn.frames_sent if conn else 0,
            "bytes_sent": conn.bytes_sent if conn else 0,
            "msgs_received": conn.frames_received if conn else 0,
            "bytes_received": conn.bytes_received if conn else 0,
        }

    def close(self) -> list[Connection]:
        """Forget every connection (returned, to be closed) and wake every waiter."""
        with self.changed:
            self.closed = True
            conns = list(self.conns.values())
            self.conns.clear()
            self.changed.notify_all()
        return conns
