"""Fault injection for tests (like PyTorch's faulty agent): a connection that drops or delays
chosen message types on their way out."""
from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from ..protocol import messages as m
from ..transport import Connection


class Faults:
    """What to drop and delay. ``spec``: ``{"drop": {"RREF_USER_DELETE": 1, ...},
    "delay": {"PYTHON_CALL": 0.5, ...}}`` (counts, and seconds), shared by every connection
    of a worker."""

    def __init__(self, spec: dict) -> None:
        known = {t.name for t in m.MessageType}
        for kind in spec:
            if kind not in ("drop", "delay"):
                raise ValueError(f"fault kind must be 'drop' or 'delay', not {kind!r}")
            for name in spec[kind]:
                if name not in known:
                    raise ValueError(f"unknown message type {name!r} in faults; known: {sorted(known)}")
        self._drops = dict(spec.get("drop", {}))
        self._delays = dict(spec.get("delay", {}))
        self._lock = threading.Lock()
        self.dropped: list[str] = []

    def drop(self, frame: Sequence) -> bool:
        """Whether to lose ``frame`` (after sleeping its delay, if any)."""
        mtype = frame[0][0]
        if mtype == m.MessageType.FORWARD_AUTOGRAD and len(frame) > 1:
            mtype = frame[1][0]
        name = m.MessageType(mtype).name
        with self._lock:
            if self._drops.get(name, 0) > 0:
                self._drops[name] -= 1
                self.dropped.append(name)
                return True
        delay = self._delays.get(name)
        if delay:
            time.sleep(delay)
        return False

    def wrap(self, conn: Connection) -> Connection:
        return FaultyConnection(conn, self)


class FaultyConnection(Connection):
    """``conn``, but frames that ``faults`` drops are lost on the wire."""

    def __init__(self, conn: Connection, faults: Faults) -> None:
        self._conn = conn
        self._faults = faults
        self.peer = conn.peer

    def send(self, frame: Sequence, defer: bool = False) -> None:
        if not self._faults.drop(frame):
            self._conn.send(frame, defer)

    def recv(self) -> list:
        return self._conn.recv()

    @property
    def has_deferred(self) -> bool:
        return self._conn.has_deferred

    def flush(self) -> None:
        self._conn.flush()

    def pending_input(self) -> bool:
        return self._conn.pending_input()

    def wait_input(self, timeout: float) -> bool:
        return self._conn.wait_input(timeout)

    def close(self) -> None:
        self._conn.close()

    frames_sent = property(lambda self: self._conn.frames_sent)
    bytes_sent = property(lambda self: self._conn.bytes_sent)
    frames_received = property(lambda self: self._conn.frames_received)
    bytes_received = property(lambda self: self._conn.bytes_received)

    def __getattr__(self, name: str) -> Any:  # uses_shm, bytes_arriving, ...
        return getattr(self._conn, name)
