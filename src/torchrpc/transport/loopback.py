"""A connection from a worker to itself: what is sent is received by the same object.

A worker's calls to itself go through it like any other peer's, read by the same reader
loop, so they need no path of their own. Frames are copied on send, as the wire would:
the receiver never shares memory with the sender's objects.
"""
from __future__ import annotations

import collections
import threading
from typing import Sequence

from .base import Connection, ConnectionClosed


class LoopbackConnection(Connection):
    """Frames sent are received, in order, from the same connection."""

    def __init__(self, name: str = "self") -> None:
        self.peer = f"loopback:{name}"
        self._frames: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self.frames_sent = self.bytes_sent = self.frames_received = self.bytes_received = 0

    def send(self, frame: Sequence, defer: bool = False) -> None:
        copied = [bytearray(b) for b in frame]
        with self._ready:
            if self._closed:
                raise ConnectionClosed(f"{self.peer} is closed")
            self._frames.append(copied)
            self.frames_sent += 1
            self.bytes_sent += sum(len(b) for b in copied)
            self._ready.notify()

    def recv(self) -> list:
        with self._ready:
            while not self._frames:
                if self._closed:
                    raise ConnectionClosed(f"{self.peer} is closed")
                self._ready.wait()
            frame = self._frames.popleft()
            self.frames_received += 1
            self.bytes_received += sum(len(b) for b in frame)
            return frame

    def pending_input(self) -> bool:
        return bool(self._frames) or self._closed

    def wait_input(self, timeout: float) -> bool:
        with self._ready:
            return self._ready.wait_for(lambda: bool(self._frames) or self._closed, timeout)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
