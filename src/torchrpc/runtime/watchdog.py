"""The watchdog: fails requests that ran past their deadline, and runs periodic chores."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from ..errors import RPCTimeoutError
from .pending import Pending, PendingTable

log = logging.getLogger("torchrpc")

#: Seconds between the watchdog's looks at the deadlines.
TICK_S = 0.05


class Watchdog:
    """Every ``TICK_S``: fail the expired entries of ``pending`` with an RPCTimeoutError
    (worded by ``describe``), then run each chore."""

    def __init__(self, pending: PendingTable, describe: Callable[[Pending], str]) -> None:
        self._pending = pending
        self._describe = describe
        self._chores: list[Callable[[], None]] = []

    def add_chore(self, chore: Callable[[], None]) -> None:
        """Run ``chore()`` on every tick (it must be quick: queue anything slow)."""
        self._chores.append(chore)

    def tick(self) -> None:
        """One look: what a tick of the thread does (tests call it directly)."""
        for chore in self._chores:
            chore()
        for entry in self._pending.expired():
            try:
                entry.callback(None, RPCTimeoutError(self._describe(entry)))
            except Exception:  # a failing callback must not cost the others their timeouts
                log.exception("torchrpc: unhandled error in the timeout of %s", entry.desc)

    def run(self, stop: threading.Event) -> None:
        """The watchdog thread's loop, until ``stop`` is set."""
        while not stop.wait(TICK_S):
            self.tick()
