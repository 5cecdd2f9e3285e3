"""Who reads each connection: the reader loop, the waiting thread that reads its own reply,
and the monitor that hands readings on.

Each connection has one read lease (:mod:`.lease`). Its holder, a pool thread, decodes
frames, completes the futures of replies and serves small requests itself, inline (no
thread hand-off per message). It hands the lease on to another pool thread
(leader/follower) before anything that may wait: a request whose policy says so, a
request it sends, a send the socket cannot take at once (a reader blocked in a send could
stop both peers reading: a deadlock when two large messages cross); and the monitor hands
it on for it when a request runs longer than ``HANDOFF_AFTER`` (user code that blocks).

A thread that sends a request and waits for the reply at once reads the connection itself
when nobody else does (:meth:`Readers.wait_reply`), polling before it blocks: no thread
has to wake another to hand it the reply. Once nothing is expected on a connection, the
lease is left free for the next such thread; a request nobody will wait for at once
takes it for a pool thread, and the monitor gives a lease left free to a pool thread
after ``FREE_FOR`` (for requests the peer starts).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import torch

from ..errors import ProtocolError
from ..protocol import messages as m
from ..transport import Connection, ConnectionClosed
from ..transport.base import block_hook, set_block_hook
from .lease import Leases, ReadLease
from .peers import PeerTable
from .pending import WAITER, PendingTable
from .pool import Pool
from .registry import HandlerRegistry, Run

log = logging.getLogger("torchrpc")

#: A reader running a request inline for longer than this (seconds) passes the reading on
#: (the monitor polls this often while readers are active, and parks after a quiet spell).
HANDOFF_AFTER = 0.004
#: A reader flushes its deferred replies before it would wait for input, after serving
#: this many frames in a row, and after a request that ran longer than QUICK_S: a reply
#: waits for company only behind other quick requests (or, when a quick request is
#: followed by one that runs long, until the monitor hands the reading on).
FLUSH_AFTER = 64
QUICK_S = 200e-6
#: A reader that has just served a request polls its socket this long before it blocks:
#: the next request often follows within a round trip, and waking a blocked thread costs
#: ~25 us on a VM whose idle CPU has halted (a Python TCP ping-pong: 54 us blocking, 7 us
#: polling). Only after a request: a reader that completed a reply has woken the thread
#: waiting for it, which needs the GIL that polling would hold. Adaptive: a reader stops
#: polling once polls keep coming up empty, and starts again when a request follows its
#: last one within this time. 0 turns polling off.
SPIN_S = float(os.environ.get("TORCHRPC_SPIN_US", "200")) / 1e6
MONITOR_PARK_AFTER = 0.25
#: A lease left free goes to a pool thread once it has stayed free this long, for requests
#: the peer starts; the monitor looks every HANDOFF_AFTER.
FREE_FOR = HANDOFF_AFTER
#: ... and, if a frame was waiting there, the connection is not left free for this long.
KEEP_READ_S = 1.0
#: A thread reading its own reply looks at its future this often while no frame comes:
#: a timeout or a failure may end it without one.
LEAD_WAIT_S = 0.05

#: A request read and to be served: (handler function, its arguments, its run policy).
Job = tuple[Callable, tuple, Run]
#: what dispatch returns after a reply whose waiter reads its replies itself
LED: Any = object()
#: what reading returns when there is nothing to serve (the connection ended, or a wait ran out)
NOTHING: Any = object()

_tls = threading.local()


class Readers:
    """The read leases of one worker's connections and the threads that hold them."""

    def __init__(self, name: str, peers: PeerTable, pending: PendingTable, registry: HandlerRegistry,
                 pool: Pool, autograd_pool: Pool, reply_error: Callable[[int, int, BaseException], None],
                 closing: Callable[[], bool]) -> None:
        self.name = name
        self.leases = Leases()
        self._peers = peers
        self._pending = pending
        self._registry = registry
        self._pool = pool
        self._autograd_pool = autograd_pool
        self._reply_error = reply_error
        self._closing = closing
        self._monitor_wake = threading.Event()
        self._monitor_parked = False

    # --- what other parts ask --------------------------------------------------------

    def start(self, peer: int, conn: Connection) -> None:
        """Start reading a new connection on a pool thread."""
        self._pool.submit(self._read_loop, peer, conn)

    def holds(self, peer: int) -> bool:
        """Whether this thread reads ``peer``'s connection now: then its replies are deferred,
        and it flushes them before it waits for input (see :meth:`_read`)."""
        return self.leases.holds(getattr(_tls, "lease", None), peer)

    def hand_off(self) -> None:
        """If this thread is a reader handling a frame, pass the reading to another pool thread
        (a handler about to do something slow calls this: the connection's other messages
        must not wait for it)."""
        self._pass(getattr(_tls, "lease", None))

    def claim_free(self, peer: int) -> None:
        """A request to ``peer`` whose reply nobody waits for at once was registered: if nobody
        reads ``peer``'s connection, a pool thread takes it (after the registration: see
        :meth:`_leave_free`)."""
        lease = self.leases.take_free(peer)
        if lease is not None:
            self._pool.submit(self._read_loop, peer, lease.conn, lease)

    def wait_reply(self, fut: torch.futures.Future, dest: int) -> None:
        """Before waiting on ``fut``, the reply of a request to ``dest``: if nobody reads
        ``dest``'s connection now, read it on this thread until ``fut`` is done. The thread
        that needs the reply is then the one that wakes (or, polling, none does) instead of a
        reader that would have to wake it. Otherwise return at once: the reader completes
        ``fut`` and the caller waits on it as usual."""
        if not fut.done():
            lease = self.leases.take_free(dest)
            if lease is not None:
                self._lead(lease, fut)

    def stop(self) -> None:
        """Wake the monitor so that it sees the stop event; forget free leases."""
        self.leases.clear()
        self._monitor_wake.set()

    # --- dispatch --------------------------------------------------------------------

    def dispatch(self, src: int, frame: list) -> Any:
        """Decode a frame; complete a reply's future here, or return the request's :data:`Job`
        (``LED`` after a reply whose waiter reads its replies itself; None when nothing is
        left to do)."""
        tag: Optional[m.AutogradTag] = None
        try:
            msg = m.decode(frame)
            if type(msg) is m.Heartbeat:
                return None
            if not msg.IS_REPLY:
                if isinstance(msg, m.ForwardAutograd):
                    tag, msg = m.AutogradTag.of(msg), msg.inner
                handler = self._registry.get(type(msg))
                if handler is None:
                    raise ProtocolError(f"{type(msg).__name__} is not a request")
                return handler.fn, (src, msg, tag), handler.run
        except ProtocolError as e:
            msg_id = None if m.is_reply_frame(frame) else m.peek_msg_id(frame)
            log.warning("torchrpc %s: malformed message from worker %d: %s", self.name, src, e)
            if msg_id is not None:
                return self._reply_error, (src, msg_id, e), Run.INLINE
            return None
        pending = self._pending.pop_reply(msg.msg_id, src)
        if pending is None:
            other = self._pending.get(msg.msg_id)
            if other is not None:
                log.warning("torchrpc %s: worker %d replied to a request sent to %d", self.name, src, other.dest)
            return None  # else timed out already, or a stray reply
        pending.callback(msg, None)
        return LED if pending.reader is WAITER else None

    # --- the reader loop ---------------------------------------------------------------

    def _read_loop(self, peer: int, conn: Connection, lease: Optional[ReadLease] = None,
                   job: Optional[Job] = None) -> None:
        """Hold the reading of ``conn`` until it is handed on (see :meth:`_read`); ``lease`` and
        ``job`` are the reading and the request a leader handed over (see :meth:`_lead`)."""
        lease = lease or ReadLease(peer, conn)
        _tls.lease = lease
        set_block_hook(self.hand_off)
        try:
            self._read(lease, job)
        finally:
            _tls.lease = None
            set_block_hook(None)

    def _read(self, lease: ReadLease, job: Any = None) -> None:
        """Read frames; complete replies and serve small requests here, inline.

        Leader/follower: before a request that may block, the reading is queued for
        another pool thread, so reading never waits for user code; this thread then
        serves the request and goes back to the pool. After a reply that a waiting
        thread reads for itself next time, the reading may be left free (:meth:`_leave_free`).
        """
        peer, conn, leases = lease.peer, lease.conn, self.leases
        served = FLUSH_AFTER  # first flush what a reader before us left deferred
        served_request = job is not None
        while True:
            if job is None:
                if conn.has_deferred and (served >= FLUSH_AFTER or not conn.pending_input()):
                    served = 0
                    leases.begin_frame(lease, lease.since)  # a flush that would wait hands the reading on first
                    flushed = self._flush(peer, conn)
                    if not leases.end_frame(lease) or not flushed:
                        return
                served += 1
                job = self._next_job(lease, poll=served_request)
                if job is NOTHING:
                    return
            served_request = job is not None and job is not LED
            if served_request:
                fn, args, run = job
                if run is Run.AUTOGRAD_POOL:
                    self._autograd_pool.submit(fn, *args)
                    served_request = False
                else:
                    if run is Run.HAND_OFF:
                        self.hand_off()
                    started = time.perf_counter()
                    try:
                        fn(*args)
                    except BaseException:  # a handler bug must not stop the reading
                        log.exception("torchrpc: unhandled error in %s", getattr(fn, "__qualname__", fn))
                    if time.perf_counter() - started > QUICK_S:
                        served = FLUSH_AFTER  # only quick requests' replies wait for company
                del fn, args
            if not leases.end_frame(lease):
                # handed on: another thread reads now; replies this thread deferred after
                # its successor looked are ours to send
                if conn.has_deferred:
                    self._flush(peer, conn)
                return
            if job is LED and self._leave_free(lease):
                return
            job = None

    def _next_job(self, lease: ReadLease, poll: bool, wait: Optional[float] = None) -> Any:
        """Read the next frame of ``lease``'s connection (polling first if ``poll`` and polling
        pays off), mark the lease busy with it and dispatch it: a :data:`Job`, ``LED`` or None
        (see :meth:`dispatch`). ``NOTHING`` if the connection ended (reported lost) or broke,
        or if nothing came within ``wait`` s."""
        conn = lease.conn
        if poll and lease.spin > 0 and SPIN_S and not conn.pending_input():
            lease.spin = min(lease.spin + 1, 4) if _poll(conn) else lease.spin - 1
        blocked = time.perf_counter()
        try:
            if wait is not None and not conn.pending_input() and not conn.wait_input(wait):
                return NOTHING
            frame = conn.recv()
        except ConnectionClosed as e:
            self._peers.lost(lease.peer, conn, str(e))
            return NOTHING
        except BaseException as e:  # pragma: no cover - a bug
            self._reader_failed(lease.peer, conn, e)
            return NOTHING
        if lease.spin <= 0 and time.perf_counter() - blocked < SPIN_S:
            lease.spin = 1  # polling would have found this one
        self.leases.begin_frame(lease, time.monotonic())
        self._wake_monitor()
        try:
            return self.dispatch(lease.peer, frame)
        except BaseException as e:  # pragma: no cover - a bug
            self.leases.end_frame(lease)
            self._reader_failed(lease.peer, conn, e)
            return NOTHING

    def _lead(self, lease: ReadLease, fut: torch.futures.Future) -> None:
        """Read ``lease``'s connection on this (waiting) thread until ``fut`` is done, then let
        the reading go. A request that arrives first goes to a pool thread with the reading,
        to be served as a reader serves it; this thread then just waits."""
        peer, conn = lease.peer, lease.conn
        prev_lease, prev_hook = getattr(_tls, "lease", None), block_hook()
        _tls.lease = lease
        set_block_hook(self.hand_off)
        try:
            while not fut.done():
                # in slices: the future may also end without a frame (a timeout, a failure)
                job = self._next_job(lease, poll=True, wait=LEAD_WAIT_S)
                if job is NOTHING:
                    if self._peers.conns.get(peer) is conn:
                        continue
                    return  # the connection is gone; its calls have failed
                if job is not None and job is not LED:
                    self._pool.submit(self._read_loop, peer, conn, lease, job)  # it is still busy: see _read
                    return
                if not self.leases.end_frame(lease):
                    return  # a callback ran long and the monitor handed the reading on
            if not self._leave_free(lease):
                self._pool.submit(self._read_loop, peer, conn, lease)
        finally:
            _tls.lease = prev_lease
            set_block_hook(prev_hook)

    def _leave_free(self, lease: ReadLease) -> bool:
        """Leave ``lease``'s connection without a reader if nothing is expected on it: no
        request of ours to that peer is waiting for a reply, and nothing has arrived. The
        next request to the peer takes the reading (:meth:`claim_free`, :meth:`wait_reply`);
        the monitor gives it to a pool thread after ``FREE_FOR`` (for requests the peer
        starts; where one was waiting, the connection stays read for ``KEEP_READ_S``).
        Whether the reading was left (False: the caller keeps reading)."""
        conn, peer, now = lease.conn, lease.peer, time.monotonic()
        if (conn.has_deferred or self._closing() or self._pending.expects(peer) or conn.pending_input()
                or not self.leases.may_leave_free(peer, now)):
            return False
        self.leases.leave_free(lease, now)
        # A request registered after the check above may have looked for a free reading
        # before it was there: look again, and take the reading back if one did. (Not at
        # the connection: once the reading is free, another thread may be reading it.)
        if self._pending.expects(peer):
            return self.leases.take_free(peer) is not lease
        self._wake_monitor()
        return True

    def _flush(self, peer: int, conn: Connection) -> bool:
        """Send ``conn``'s deferred frames; False if the connection broke (reported lost)."""
        try:
            conn.flush()
            return True
        except ConnectionClosed as e:
            self._peers.lost(peer, conn, str(e))
            return False

    def _reader_failed(self, peer: int, conn: Connection, e: BaseException) -> None:
        """A bug in reading: report it, and treat the peer as lost."""
        log.exception("torchrpc %s: reader for worker %d failed", self.name, peer)
        self._peers.lost(peer, conn, f"reader failed: {e!r}")

    def _pass(self, lease: Optional[ReadLease]) -> None:
        """Take ``lease`` out of BUSY and give the reading to a pool thread, unless someone
        else took it first (then they did)."""
        if lease is not None and self.leases.end_frame(lease):
            self._pool.submit(self._read_loop, lease.peer, lease.conn)

    # --- the monitor -------------------------------------------------------------------

    def _wake_monitor(self) -> None:
        if self._monitor_parked:
            self._monitor_parked = False
            self._monitor_wake.set()

    def monitor(self, stop: threading.Event) -> None:
        """The monitor thread: hand the reading on for readers stuck in a frame (user code that
        blocks, a lock): the connection's other messages must not wait for them; and give
        leases left free to pool threads once they stayed free ``FREE_FOR`` s (for requests the
        peer starts). Polls while leases are busy or free; parks after ``MONITOR_PARK_AFTER`` s
        without either (waking it costs a switch)."""
        leases = self.leases
        quiet_since = time.monotonic()
        while not stop.is_set():
            time.sleep(HANDOFF_AFTER)
            now = time.monotonic()
            if leases.active:
                quiet_since = now
                stuck, free = leases.overdue(now, HANDOFF_AFTER, FREE_FOR)
                for lease in stuck:
                    self._pass(lease)
                for peer in free:
                    taken = leases.take_free(peer)
                    if taken is not None:
                        if not self._pending.expects(peer) and taken.conn.pending_input():
                            # the peer starts requests here: keep its connection read
                            leases.keep_read(peer, now + KEEP_READ_S)
                        self._pool.submit(self._read_loop, peer, taken.conn, taken)
            elif now - quiet_since >= MONITOR_PARK_AFTER:
                self._monitor_wake.clear()
                self._monitor_parked = True
                if not leases.active:  # a reader that became busy before we parked has seen the flag
                    self._monitor_wake.wait()
                self._monitor_parked = False
                quiet_since = time.monotonic()


def _poll(conn: Connection) -> bool:
    """Poll ``conn`` for input for up to ``SPIN_S``; whether some came."""
    end = time.perf_counter() + SPIN_S
    while time.perf_counter() < end:
        if conn.pending_input():
            return True
    return False
