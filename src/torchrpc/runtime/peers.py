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
    """Workers by id and name, a connection per peer, and liveness. Thread-safe.

    A static job's workers are set once (:meth:`set_workers`); a dynamic group's come and go
    (:meth:`add_worker`, :meth:`depart`)."""

    def __init__(self, rank: int, name: str) -> None:
        self.rank = rank
        self.me = WorkerInfo(name, rank)
        self._by_id: dict[int, WorkerInfo] = {}
        self._by_name: dict[str, WorkerInfo] = {}
        self._former: dict[int, str] = {}  # names of the workers that left, for messages
        self.conns: dict[int, Connection] = {}
        self.dead: dict[int, str] = {}  # peer -> why it was lost
        self.leaving: set[int] = set()  # peers that announced they leave: their loss is no failure
        self.changed = threading.Condition()  # notified whenever names or connections change
        self._lost_listeners: list[LostListener] = []
        self.closed = False
        self.dynamic = False

    # --- names --------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers of the job (of the group, as this worker knows it now), by id."""
        return sorted(self._by_id.values(), key=lambda w: w.id)

    def set_workers(self, names: list[str]) -> None:
        """The job's workers, by rank; names must be unique."""
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DuplicateNameError(f"worker name {dupes[0]!r} is not unique: {dupes} used by ranks "
                                     f"{[r for r, n in enumerate(names) if n in dupes]}")
        with self.changed:
            self._by_id = {r: WorkerInfo(n, r) for r, n in enumerate(names)}
            self._by_name = {w.name: w for w in self._by_id.values()}
            self.changed.notify_all()

    def add_worker(self, rank: int, name: str) -> WorkerInfo:
        """A member joined a dynamic group (or was there when this worker joined). Its name must
        not be another member's (DuplicateNameError, a RuntimeError, torch's phrase); a rank that
        left or died before is taken by the new member."""
        with self.changed:
            other = self._by_name.get(name)
            if other is not None and other.id != rank:
                raise DuplicateNameError(f"RPC worker name {name!r} is not unique: worker {other.id} has it "
                                         f"already, so worker {rank} cannot join with it")
            old = self._by_id.get(rank)
            if old is not None and old.name != name:
                raise RPCError(f"RPC worker id {rank} is not unique: worker {old.name!r} has it already, so "
                               f"{name!r} cannot join with it")
            info = self._by_id[rank] = self._by_name[name] = WorkerInfo(name, rank)
            self.dead.pop(rank, None)
            self.leaving.discard(rank)
            self._former.pop(rank, None)
            self.changed.notify_all()
            return info

    def depart(self, peer: int) -> None:
        """``peer`` leaves a dynamic group: its name no longer resolves, and the end of its
        connection is no failure. The connection stays until the peer closes it."""
        with self.changed:
            self.leaving.add(peer)
            info = self._by_id.pop(peer, None)
            if info is not None:
                self._former[peer] = info.name
                self._by_name.pop(info.name, None)
            if peer not in self.conns:
                self.dead.setdefault(peer, "left the group")
            self.changed.notify_all()

    def has_left(self, peer: int) -> bool:
        """Whether ``peer`` left the group (rather than died)."""
        return peer in self.leaving

    def wait_workers(self, timeout: float) -> bool:
        """Wait until the workers are known (or the table is closed); whether they are."""
        with self.changed:
            return self.changed.wait_for(lambda: bool(self._by_id) or self.closed, timeout) and bool(self._by_id)

    def resolve(self, to: Any = None) -> WorkerInfo:
        """Resolve a worker name, id or WorkerInfo (None: this worker). UnknownWorkerError (a
        RuntimeError and a ValueError) for one that is not in the job; ValueError for another type."""
        if to is None:
            return self.me
        if isinstance(to, WorkerInfo):
            if self._by_id.get(to.id) == to:
                return to
            raise UnknownWorkerError(f"could not find destination {to!r}: no such worker in this job"
                                     + self._gone(to.id))
        if isinstance(to, str):
            w = self._by_name.get(to)
            if w is None:
                raise UnknownWorkerError(f"could not find destination {to!r}: unknown worker name; workers are "
                                         f"{sorted(self._by_name)}")
            return w
        if isinstance(to, int) and not isinstance(to, bool):
            w = self._by_id.get(to)
            if w is not None:
                return w
            raise UnknownWorkerError(f"could not find destination {to}: unknown worker id; ids are "
                                     f"{self._ids()}" + self._gone(to))
        raise ValueError(f"Cannot get WorkerInfo from name {to!r}: a destination worker is a name, an id or a "
                         f"WorkerInfo, not {type(to).__name__}")

    def _ids(self) -> str:
        ids = sorted(self._by_id)
        return f"0..{ids[-1]}" if ids == list(range(len(ids))) and ids else str(ids)

    def _gone(self, peer: int) -> str:
        return f" (worker {self._former[peer]!r} left the group)" if peer in self._former else ""

    def name_of(self, peer: int) -> str:
        w = self._by_id.get(peer)
        return w.name if w is not None else self._former.get(peer, str(peer))

    # --- connections ----------------------------------------------------------------

    def add(self, peer: int, conn: Connection) -> None:
        with self.changed:
            self.conns[peer] = conn
            self.changed.notify_all()

    def connection(self, peer: int, wait: float) -> Connection:
        """The connection to ``peer``. During start-up a peer may call us before every peer has
        connected: wait up to ``wait`` s for it. Raises WorkerUnavailableError."""
        conn = self.conns.get(peer)
        if conn is None and self.dynamic and peer not in self._by_id:
            raise self.unavailable(peer, self.dead.get(peer, "not a member of the group"))
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
        return [w.name for w in self._by_id.values() if w.id != self.rank and w.id not in self.conns]

    def wait_connected(self, timeout: float) -> None:
        """Wait until every peer is connected; RPCError naming the missing ones after ``timeout``,
        or at once if one was connected and lost."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not self._by_id or self.missing():
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
                    self.dead.setdefault(peer, "left the group" if peer in self.leaving else reason)
            self.changed.notify_all()
        conn.close()
        if not first or self.closed:
            return False
        err = WorkerUnavailableError(f"worker {self.name_of(peer)!r} (id {peer}) is gone: {self.dead[peer]}")
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
