"""Heartbeats: keep quiet connections alive and notice peers that went silent."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

from ..protocol import messages as m
from ..transport import Connection, ConnectionClosed
from .peers import PeerTable

#: Seconds between heartbeats on a quiet connection, and how many may be missed.
HEARTBEAT_INTERVAL = float(os.environ.get("TORCHRPC_HEARTBEAT_INTERVAL", "0.8"))
HEARTBEAT_MISSES = 3.5


class Heartbeats:
    """Send a heartbeat on every connection quiet for an interval; report a peer lost when
    nothing at all has come from it for ``HEARTBEAT_MISSES`` intervals (a frozen process or a
    cut link, which TCP alone would notice only after minutes)."""

    def __init__(self, peers: PeerTable, lost: Callable[[int, Connection, str], None],
                 interval: float | None = None) -> None:
        self._peers = peers
        self._lost = lost
        self.interval = HEARTBEAT_INTERVAL if interval is None else interval
        #: peer -> (frames sent, bytes arrived, when the sent count last moved, when input last moved,
        #: the connection counted)
        self._seen: dict[int, tuple[int, int, float, float, Connection]] = {}
        self.last_heard: dict[int, float] = {}  # peer -> when a frame last came from it
        self.quiet = False  # set during shutdown: silence is then expected
        self._beat = m.Heartbeat(0).encode()

    def check(self, now: float) -> None:
        """One round: what the thread does each quarter interval (tests call it directly)."""
        interval = self.interval
        for peer, conn in self._peers.peers():
            sent, received = conn.frames_sent, getattr(conn, "bytes_arriving", conn.frames_received)
            prev = self._seen.get(peer)
            if prev is not None and prev[4] is not conn:  # a dynamic group's new member with the same id
                prev = None
            t_sent = now if prev is None or sent != prev[0] else prev[2]
            t_recv = now if prev is None or received != prev[1] else prev[3]
            self._seen[peer] = (sent, received, t_sent, t_recv, conn)
            self.last_heard[peer] = t_recv
            if now - t_recv > interval * HEARTBEAT_MISSES and not self.quiet:
                self._lost(peer, conn, f"no heartbeat for {now - t_recv:.1f} s")
                continue
            if now - t_sent >= interval:
                try:
                    conn.send(self._beat)
                except ConnectionClosed:
                    pass

    def run(self, stop: threading.Event) -> None:
        """The heartbeat thread's loop, until ``stop`` is set."""
        while not stop.wait(self.interval / 4):
            self.check(time.monotonic())
