"""The transport interface: a connection moves frames (lists of buffers) between two processes.

A transport registers a scheme ("tcp", later "shm", "tls"); :func:`listen` and
:func:`connect` pick it from the address (``"tcp://127.0.0.1:29500"``). The
agent never sees sockets, and nothing here knows what a frame means.
"""
from __future__ import annotations

import abc
import threading
from typing import Any, Callable, Optional, Sequence


class ConnectionClosed(ConnectionError):
    """The connection was closed, by either side, or broke."""


_hooks = threading.local()


def set_block_hook(hook: Optional[Callable[[], None]]) -> None:
    """In this thread, call ``hook()`` before a send would wait (for the send lock, or for
    room in the socket), then wait. The hook must neither block nor send."""
    _hooks.before_block = hook


def block_hook() -> Optional[Callable[[], None]]:
    """This thread's hook (see :func:`set_block_hook`), if any."""
    return getattr(_hooks, "before_block", None)


class Connection(abc.ABC):
    """A bidirectional, ordered, reliable channel of frames to one peer."""

    #: The address of the other end, for messages.
    peer: str = "?"
    #: Traffic counters, kept by the transport.
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0

    @abc.abstractmethod
    def send(self, frame: Sequence, defer: bool = False) -> None:
        """Send one frame. Thread-safe; frames from concurrent senders never interleave.
        A thread with a :func:`block_hook` calls it before it would have to wait.

        With ``defer``, a small frame is only queued (this never waits): it goes out, in
        order, with the next frame sent without ``defer``, or at :meth:`flush`. Many
        replies then leave in one system call and reach the peer in one wake-up."""

    @property
    def has_deferred(self) -> bool:
        """Whether frames queued by ``send(defer=True)`` wait for a flush."""
        return False

    def flush(self) -> None:
        """Send the deferred frames now (as ``send`` does: it may wait, calling the hook)."""

    @abc.abstractmethod
    def recv(self) -> list:
        """Block until the next frame arrives; raise :class:`ConnectionClosed` at the end."""

    def pending_input(self) -> bool:
        """Whether ``recv`` has input to read without waiting. Only the receiving thread
        may ask."""
        return False

    def fileno(self) -> Optional[int]:
        """A file descriptor that polls readable when input (or the end) arrives, for a thread
        that waits on many connections at once; None if the transport has none (its reader
        then blocks in ``recv``). Input already taken into the connection's own buffer does
        not show there: wait on it only while :meth:`idle`."""
        return None

    def idle(self) -> bool:
        """Whether nothing of a next frame has arrived yet (so :meth:`fileno` shows when it
        does). Only the receiving thread may ask."""
        return not self.pending_input()

    def wait_input(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for input (or the end of the connection); whether
        some came, so that ``recv`` will not wait long. Only the receiving thread may ask.
        A transport that cannot tell returns True at once (``recv`` then blocks)."""
        return True

    @abc.abstractmethod
    def close(self) -> None:
        """Close both directions; a blocked ``recv`` in another thread returns with ConnectionClosed."""


class Listener(abc.ABC):
    """Accepts connections at :attr:`address`."""

    address: str

    @abc.abstractmethod
    def accept(self) -> Connection:
        """Block until a peer connects; raise :class:`ConnectionClosed` once closed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting; a blocked ``accept`` returns with ConnectionClosed."""


_schemes: dict[str, tuple[Callable[..., Listener], Callable[..., Connection]]] = {}


def register_scheme(
    scheme: str,
    listen: Callable[..., Listener],
    connect: Callable[..., Connection],
) -> None:
    """Make ``scheme://`` addresses use these functions."""
    _schemes[scheme] = (listen, connect)


def _split(address: str) -> tuple[tuple, str]:
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(f"transport address {address!r} has no scheme (e.g. 'tcp://host:port')")
    if scheme not in _schemes:
        raise ValueError(f"unknown transport scheme {scheme!r} in {address!r}; known: {sorted(_schemes)}")
    return _schemes[scheme], rest


def listen(address: str, secret: Optional[bytes] = None, **options: Any) -> Listener:
    """Listen at ``address``; a port of 0 picks a free one (see ``Listener.address``).

    With a ``secret``, only connectors that prove they know it are accepted; the others
    are closed and logged before anything they sent is decoded. ``options`` are the
    scheme's own (``tls=TLSConfig(...)`` for ``tls://``).
    """
    (fn, _), rest = _split(address)
    return fn(rest, secret, **options)


def connect(address: str, timeout: float = 30.0, secret: Optional[bytes] = None, **options: Any) -> Connection:
    """Connect to a listener at ``address``, trying for up to ``timeout`` seconds; with a
    ``secret``, both sides prove knowledge of it before the connection is returned."""
    (_, fn), rest = _split(address)
    return fn(rest, timeout, secret, **options)
