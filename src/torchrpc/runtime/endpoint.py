"""The endpoint: what services use to talk to peers.

Request (a reply callback or a Future), notify (a control message, resent until acked),
reply, reply with an error, and hand the reading on. Services see this and nothing else of
the runtime: they never see the agent.
"""
from __future__ import annotations

import collections
import logging
import os
import traceback
from typing import Any, Callable, Optional

import torch

from .. import serialization
from ..errors import ProtocolError, RemoteError, RPCError, RPCTimeoutError, WorkerUnavailableError
from ..options import UNSET_RPC_TIMEOUT
from ..protocol import messages as m
from ..transport import ConnectionClosed
from .peers import PeerTable
from .pending import ANYONE, CLAIM, WAITER, Pending, PendingTable, ReplyCallback
from .pool import Pool
from .reader import Readers

log = logging.getLogger("torchrpc")

#: Control messages (RRef, autograd cleanup) are resent if unacknowledged after this many
#: seconds (doubling each time), up to this many attempts.
CONTROL_RETRY_INTERVAL = float(os.environ.get("TORCHRPC_CONTROL_RETRY", "2.0"))
CONTROL_ATTEMPTS = 5

OnDone = Callable[[Optional[BaseException]], None]


class ReplyFuture(torch.futures.Future):
    """The Future of a request whose reply the thread that waits for it may read itself:
    ``wait()`` takes the reading of the destination's connection when nobody holds it
    (see :meth:`Readers.wait_reply`)."""

    def __init__(self, readers: Readers, dest: int) -> None:
        super().__init__()
        self._readers = readers
        self._dest = dest

    def wait(self) -> Any:
        if not self.done():
            self._readers.wait_reply(self, self._dest)
        return super().wait()


class Endpoint:
    """One worker's way of sending requests, notifications and replies to its peers."""

    def __init__(self, name: str, rank: int, rpc_timeout: float, peers: PeerTable, pending: PendingTable,
                 readers: Readers, pool: Pool) -> None:
        self.name = name
        self.rank = rank
        self.rpc_timeout = rpc_timeout
        self.peers = peers
        self.pending = pending
        self.readers = readers
        self.pool = pool
        self.closed = False
        self.retrying = 0  # control messages between a lost ack and their next attempt
        self._later: collections.deque = collections.deque()  # (dest, msg): see notify_later

    # --- state --------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise RPCError("RPC has been shut down on this worker; call init_rpc again to use it")

    def timeout(self, timeout: Optional[float]) -> float:
        """The effective timeout of a call (``UNSET_RPC_TIMEOUT``: the default; 0: none)."""
        if timeout is None or timeout == UNSET_RPC_TIMEOUT:
            return self.rpc_timeout
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0 (0: none) or -1 (the default), got {timeout}")
        return float(timeout)

    def future(self, dest: int, lead: bool) -> torch.futures.Future:
        """A Future for the reply of a request to ``dest``; with ``lead``, its waiter reads the
        reply itself (see :class:`ReplyFuture`)."""
        return ReplyFuture(self.readers, dest) if lead else torch.futures.Future()

    def busy(self) -> bool:
        """Whether requests or notifications of this worker are still unanswered."""
        return bool(len(self.pending) or self.retrying or self._later)

    # --- sending ------------------------------------------------------------------

    def send(self, dest: int, frame: list, defer: bool = False) -> None:
        """Send a frame to ``dest`` (this worker too); WorkerUnavailableError if it is gone."""
        conn = self.peers.connection(dest, self.rpc_timeout or 300.0)
        try:
            conn.send(frame, defer)
        except ConnectionClosed as e:
            raise self.peers.unavailable(dest, e) from e

    def request(self, dest: int, msg: m.Message, timeout: float, desc: str, callback: ReplyCallback,
                tag: Optional[m.AutogradTag] = None, defer: bool = False, reader: str = CLAIM) -> int:
        """Send a request; ``callback(reply, error)`` runs exactly once (reply, timeout or
        failure). Its message id.

        The reply is read by the thread that waits for it if nobody else reads ``dest``'s
        connection then (``WAITER``: :meth:`Readers.wait_reply`), else by whoever reads it: a
        reader, or the watcher of free connections, at once (``CLAIM``) or within a few
        milliseconds (``ANYONE``: an ack nobody waits for; see :meth:`Readers.claim`)."""
        if not defer:
            self.readers.before_request(reader)
            if self._later:
                self.send_later(dest)
        msg_id = msg.msg_id = self.pending.add(dest, desc, timeout, callback, reader)
        if reader is CLAIM:  # after the entry above: see Readers._park
            self.readers.claim(dest)
        try:
            self.send(dest, (tag.wrap(msg) if tag else msg).encode(), defer)
        except BaseException:
            self.pending.pop(msg_id)
            raise
        return msg_id

    def fail(self, msg_id: int, error: BaseException) -> None:
        """Fail a pending request now, unless its reply already came."""
        entry = self.pending.pop(msg_id)
        if entry is not None:
            entry.callback(None, error)

    def control(self, dest: int, msg: m.Message, lead: bool = False) -> torch.futures.Future:
        """Send a control request; a Future that completes on its ack (None) or its
        BackwardReturn (the message), or fails with the error. With ``lead``, the caller
        waits for it at once (and reads the reply itself)."""
        fut = self.future(dest, lead)

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if error is None and not isinstance(reply, (m.RRefAck, m.BackwardReturn)):
                error = self.remote_error(reply, dest)
            if error is None:
                fut.set_result(reply if isinstance(reply, m.BackwardReturn) else None)
            else:
                fut.set_exception(error)

        try:
            self.check_open()
            self.request(dest, msg, self.rpc_timeout, type(msg).__name__, on_reply, reader=WAITER if lead else CLAIM)
        except BaseException as e:
            fut.set_exception(e)
        return fut

    # --- notifications: control messages resent until acked ---------------------------

    def notify(self, dest: int, msg: m.Message, on_done: Optional[OnDone] = None, attempt: int = 1,
               defer: bool = False) -> None:
        """Send an idempotent control message (RRef protocol, autograd cleanup); one whose ack
        does not come in time is sent again (``CONTROL_ATTEMPTS`` times, the wait doubling each
        time). ``on_done(error)`` runs on the pool once it is acked or given up."""

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if isinstance(error, RPCTimeoutError) and attempt < CONTROL_ATTEMPTS and not self.closed:
                self.retrying += 1
                self.pool.submit(self._retry, dest, msg, on_done, attempt + 1)
                return
            if error is None and not isinstance(reply, m.RRefAck):
                error = self.remote_error(reply, dest)
            if error is not None:
                log.debug("torchrpc %s: %s to %d failed: %s", self.name, type(msg).__name__, dest, error)
            if on_done is not None:
                self.pool.run_here_or_submit(on_done, error)

        timeout = CONTROL_RETRY_INTERVAL * 2 ** (attempt - 1)
        if self.rpc_timeout:
            timeout = min(timeout, self.rpc_timeout)
        try:
            # an ack nobody waits for (a delete, a cleanup) may wait for the next reader
            self.request(dest, msg, timeout, type(msg).__name__, on_reply, defer=defer,
                         reader=ANYONE if on_done is None else CLAIM)
        except BaseException as e:
            on_reply(None, e)

    def notify_soon(self, dest: int, msg: m.Message, on_done: Optional[OnDone] = None) -> None:
        """:meth:`notify` from the pool (never on this thread); nothing once shut down."""
        if not self.closed:
            self.pool.submit(self.notify, dest, msg, on_done)

    def _retry(self, dest: int, msg: m.Message, on_done: Optional[OnDone], attempt: int) -> None:
        try:
            self.notify(dest, msg, on_done, attempt)
        finally:
            self.retrying -= 1

    def notify_later(self, dest: int, msg: m.Message) -> None:
        """Notify ``dest`` of ``msg`` when convenient: with the next request to any worker
        (in the same system call, for its own destination) or the watchdog's next tick;
        nothing once shut down."""
        if not self.closed:
            self._later.append((dest, msg))

    def send_later(self, defer_to: Optional[int] = None) -> None:
        """Send the notifications :meth:`notify_later` queued; those for ``defer_to`` are
        deferred onto its next frame."""
        q = self._later
        while q:
            try:
                dest, msg = q.popleft()
            except IndexError:  # taken by another thread
                return
            self.notify(dest, msg, None, defer=dest == defer_to)

    def chore(self) -> None:
        """The watchdog's tick: queued notifications go out from the pool."""
        if self._later:
            self.pool.submit(self.send_later)

    # --- replying -----------------------------------------------------------------

    def reply(self, dest: int, msg: m.Message) -> bool:
        """Send a reply; a reader's reply is deferred until it would wait for input. Whether it
        went (False: the requester is gone, and nobody waits for the reply any more)."""
        try:
            self.send(dest, msg.encode(), self.readers.holds(dest))
            return True
        except WorkerUnavailableError as e:
            log.debug("torchrpc %s: reply to %d lost: %s", self.name, dest, e)
            return False

    def reply_ack(self, dest: int, msg_id: int) -> None:
        self.reply(dest, m.RRefAck(msg_id))

    def reply_error(self, dest: int, msg_id: int, exc: BaseException) -> None:
        """Reply to request ``msg_id`` with ``exc`` (pickled if it can be, and its texts)."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            payload = serialization.dumps(exc)
        except BaseException:
            payload = m.Payload(b"")
        t = type(exc)
        self.reply(dest, m.ExceptionReply(msg_id, payload, f"{t.__module__}.{t.__qualname__}", str(exc), tb))

    def remote_error(self, reply: Optional[m.Message], src: int) -> BaseException:
        """The exception an ExceptionReply from ``src`` carries (any other reply: a
        ProtocolError): its own type where it unpickles, with the remote traceback as a note."""
        if not isinstance(reply, m.ExceptionReply):
            return ProtocolError(f"unexpected reply {type(reply).__name__} from worker {src}")
        where = f"On {self.peers.resolve(src)!r}:\n{reply.traceback}"
        exc: Any = None
        if reply.payload.data:
            try:
                exc = serialization.loads(reply.payload)
            except BaseException:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(f"Original exception on remote side was {reply.type_name}: {reply.message} (it could "
                              f"not be rebuilt here)\n{where}", reply.type_name, reply.traceback)
        else:
            exc.add_note(where)
        exc.remote_traceback = reply.traceback
        return exc

    def hand_off_reading(self) -> None:
        """If this thread reads a connection, pass the reading on (before something slow)."""
        self.readers.hand_off()

    # --- failures -----------------------------------------------------------------

    def fail_peer(self, peer: int, err: WorkerUnavailableError) -> None:
        """``peer`` is gone: fail every request waiting on it."""
        for entry in self.pending.take_peer(peer):
            entry.callback(None, WorkerUnavailableError(f"{err} (while waiting for {entry.desc})"))

    def fail_all(self, err: BaseException) -> None:
        for entry in self.pending.take_all():
            entry.callback(None, err)

    def timeout_message(self, p: Pending, last_heard: dict[int, float], now: float) -> str:
        """What timed out, and what this worker was still waiting on from that peer."""
        name = self.peers.name_of(p.dest)
        others = sorted(desc for _, desc in self.pending.descriptions(p.dest))
        heard = last_heard.get(p.dest)
        heard_text = f"; last heard from {name!r} {now - heard:.1f} s ago" if heard else ""
        waiting = (f"; still waiting on {len(others)} other call(s) to {name!r}: {', '.join(others[:5])}"
                   + (" ..." if len(others) > 5 else "")) if others else ""
        return f"RPC to worker {name!r} running {p.desc} timed out after {p.timeout:g} s{waiting}{heard_text}"
