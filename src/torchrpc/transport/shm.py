"""Shared memory for large buffers between two processes on the same host.

The sender copies a large buffer into a segment of its own pool (a file in the
shared-memory directory, mapped) and sends only a small descriptor over the
socket; the receiver maps the segment and hands out a buffer over it, which
becomes the received tensor's storage, so the data is copied once in all. The
first 64 bytes of a segment hold its state: the sender sets it busy when it
fills it, the receiver sets it free when the last user of that buffer is gone,
and the sender then reuses it: warm pages, so page faults do not dominate.

Whether two processes share memory is tested at connection time (a probe
segment the other side must be able to open), so across hosts, or with
``TORCHRPC_SHM=0``, everything goes over the socket.
"""
from __future__ import annotations

import mmap
import os
import secrets
import struct
import threading
import weakref
from typing import Any, Optional

import numpy as np

#: Buffers at least this large go through shared memory.
THRESHOLD = int(os.environ.get("TORCHRPC_SHM_THRESHOLD", str(256 * 1024)))
#: The most shared memory one sender keeps per connection; past it, buffers go over the socket.
MAX_POOL_BYTES = int(os.environ.get("TORCHRPC_SHM_MAX_BYTES", str(2 << 30)))
_HEADER = 64
_FREE, _BUSY = 0, 1
DESCRIPTOR = struct.Struct("<32sQQ")  # segment name, offset, length


def shm_dir() -> str:
    return os.environ.get("TORCHRPC_SHM_DIR", "/dev/shm")


def enabled() -> bool:
    return os.environ.get("TORCHRPC_SHM", "1") not in ("0", "false", "no") and os.path.isdir(shm_dir())


def _new_name() -> str:
    return "torchrpc-" + secrets.token_hex(11)  # 31 characters


class _Segment:
    __slots__ = ("name", "size", "mm", "path")

    def __init__(self, size: int) -> None:
        self.name = _new_name()
        self.path = os.path.join(shm_dir(), self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, _HEADER + size)
            self.mm = mmap.mmap(fd, _HEADER + size)
        finally:
            os.close(fd)
        self.size = size

    @property
    def free(self) -> bool:
        return self.mm[0] == _FREE

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            self.mm.close()
        except BufferError:
            pass  # a buffer over it is still in use here; the mapping goes with it


class ShmSender:
    """The segments one connection's sender fills."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._bytes = 0

    def put(self, view: memoryview) -> Optional[bytes]:
        """Copy ``view`` into a free segment; its descriptor, or None to send it inline."""
        n = view.nbytes
        with self._lock:
            seg = next((s for s in self._segments if s.size >= n and s.free), None)
            if seg is None:
                size = 1 << max(20, (n - 1).bit_length())
                if self._bytes + size > MAX_POOL_BYTES:
                    return None
                try:
                    seg = _Segment(size)
                except OSError:
                    return None
                self._segments.append(seg)
                self._bytes += size
            seg.mm[0] = _BUSY
        np.frombuffer(seg.mm, np.uint8, n, _HEADER)[:] = np.frombuffer(view, np.uint8)
        return DESCRIPTOR.pack(seg.name.encode(), _HEADER, n)

    def close(self) -> None:
        with self._lock:
            for seg in self._segments:
                seg.close()
            self._segments.clear()


def _release(mm: mmap.mmap) -> None:
    try:
        mm[0] = _FREE
    except ValueError:
        pass  # the mapping was closed


class ShmReceiver:
    """Maps the peer's segments and turns descriptors into buffers over them."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, descriptor: bytes) -> Any:
        raw_name, offset, n = DESCRIPTOR.unpack(descriptor)
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        if not name.startswith("torchrpc-") or "/" in name or offset != _HEADER:
            raise ValueError(f"bad shared memory descriptor for segment {name!r}")
        mm = self._maps.get(name)
        if mm is None:
            fd = os.open(os.path.join(shm_dir(), name), os.O_RDWR)
            try:
                mm = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            self._maps[name] = mm
        if offset + n > len(mm):
            raise ValueError(f"descriptor overruns shared memory segment {name!r}")
        buf = np.frombuffer(mm, np.uint8, n, offset)
        # free the segment for reuse once nothing here uses this buffer any more
        weakref.finalize(buf, _release, mm)
        return buf

    def close(self) -> None:
        self._maps.clear()  # mappings close when their last buffer goes


def make_probe() -> tuple[str, bytes]:
    """A small segment with a random token: the other side proves it sees our shared memory."""
    name = _new_name()
    token = secrets.token_bytes(16)
    fd = os.open(os.path.join(shm_dir(), name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token)
    return name, token


def check_probe(name: str, token: bytes) -> bool:
    if not name.startswith("torchrpc-") or "/" in name:
        return False
    try:
        with open(os.path.join(shm_dir(), name), "rb") as f:
            return f.read(64) == token
    except OSError:
        return False


def remove_probe(name: str) -> None:
    try:
        os.unlink(os.path.join(shm_dir(), name))
    except OSError:
        pass
