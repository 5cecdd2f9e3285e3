"""Who reads each connection: the watcher, the reader loop, the waiting thread that reads
its own reply, and the monitor that hands readings on.

Each connection has one read lease (:mod:`.lease`). Its holder, a pool thread, decodes
frames, completes the futures of replies and serves small requests itself, inline (no
thread hand-off per message). It hands the lease on to another pool thread
(leader/follower) before anything that may wait: a request whose policy says so, a
request it sends, a send the socket cannot take at once (a reader blocked in a send could
stop both peers reading: a deadlock when two large messages cross); and the monitor hands
it on for it when a request runs longer than ``HANDOFF_AFTER`` (user code that blocks).

Once nothing has arrived on a connection, its reader leaves the lease free and the
connection to the *watcher*: one thread that waits on every free connection at once
(``epoll``) and, when input arrives, takes that lease and reads it itself. A server with
many clients then has one thread doing the reading, not one blocked thread per client:
no thread wakes another, and no readers fight over the interpreter lock. The watcher is a
role, not a fixed thread: while it has been reading one connection for longer than
``HANDOFF_AFTER`` (user code that blocks, a long stream of frames), the monitor gives the
role to a pool thread and the old holder reads on as a plain reader.

A thread that sends a request and waits for the reply at once reads the connection itself
when nobody else does (:meth:`Readers.wait_reply`), polling before it blocks: no thread
has to wake another to hand it the reply.
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
from .idle import IdleSet
from .lease import Leases, ReadLease
from .peers import PeerTable
from .pending import CLAIM, WAITER, PendingTable
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
#: The watcher, after serving a request, and a thread waiting for its reply poll for input
#: this long before they block: the next frame often follows within a round trip, and
#: waking a blocked thread costs ~25 us on a VM whose idle CPU has halted (a Python TCP
#: ping-pong: 54 us blocking, 7 us polling). Only after a request: a reader that completed
#: a reply has woken the thread waiting for it, which needs the GIL that polling would
#: hold. Adaptive: polling stops once polls keep coming up empty, and starts again when a
#: frame follows the last one within this time. A poller yields its CPU between polls: with
#: more runnable threads than cores (a pipeline, many trainers on two cores) the peer it
#: waits for may need that CPU; with none, ``sched_yield`` returns at once. 0 turns polling off.
SPIN_S = float(os.environ.get("TORCHRPC_SPIN_US", "200")) / 1e6
MONITOR_PARK_AFTER = 0.25
#: A connection a waiting thread leaves free while only acks nobody waits for are expected
#: on it is armed for the watcher this much later: the thread's next call usually reads
#: them in passing, with no thread woken for them (see IdleSet.park).
LAZY_FOR = HANDOFF_AFTER
#: ... unless, within this many seconds, a request of the peer's waited for such a delay: a
#: peer that starts requests finds its connection watched.
EAGER_S = 1.0
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
                 pool: Pool, reply_error: Callable[[int, int, BaseException], None],
                 closing: Callable[[], bool]) -> None:
        self.name = name
        self.leases = Leases()
        self._peers = peers
        self._pending = pending
        self._registry = registry
        self._pool = pool
        self._reply_error = reply_error
        self._closing = closing
        self._monitor_wake = threading.Event()
        self._monitor_parked = False
        # the watcher: the set of free connections, and who holds the role
        self.idle = IdleSet(self.leases, pending.awaits)
        self._watch_lock = threading.Lock()
        self._watcher = 0  # the generation of the role; a holder of an older one steps down
        #: (generation, since) while the watcher reads a connection: the monitor looks at it
        self._watcher_reading: Optional[tuple[int, float]] = None
        self._watch_spin = 1
        self._eager_until: dict[int, float] = {}  # peer -> until when it is never left unarmed
        self._stopped = False

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
        must not wait for it); if it holds the watcher's role, pass that on too."""
        watcher = getattr(_tls, "watcher", None)
        if watcher is not None:
            self._replace_watcher(watcher)
        self._pass(getattr(_tls, "lease", None))

    def before_request(self, reader: str) -> None:
        """A request is about to go out from this thread, its reply to be read by ``reader``
        (see :class:`~torchrpc.runtime.pending.PendingTable`). A reader that sends one likely
        waits for the reply: the reading passes on first (:meth:`hand_off`). Not for an ack
        nobody waits for (``ANYONE``), nor for a request this thread does not wait for sent
        from a reply's callback (a pipeline's next stage, chained by futures): callbacks are
        not to block, and handing on would wake a thread for every stage. (A callback that
        does block is handed on by the monitor, after ``HANDOFF_AFTER``.)"""
        if reader is WAITER or (reader is CLAIM and not getattr(_tls, "in_reply", False)):
            self.hand_off()

    def wait_reply(self, fut: torch.futures.Future, dest: int) -> None:
        """Before waiting on ``fut``, the reply of a request to ``dest``: if nobody reads
        ``dest``'s connection now, read it on this thread until ``fut`` is done. The thread
        that needs the reply is then the one that wakes (or, polling, none does) instead of a
        reader that would have to wake it. Otherwise return at once: the reader completes
        ``fut`` and the caller waits on it as usual."""
        if not fut.done():
            lease = self.leases.take_free(dest)
            if lease is not None:
                self.idle.unwatch(lease)
                self._lead(lease, fut)

    def claim(self, peer: int) -> None:
        """A request to ``peer`` whose reply is needed as soon as it comes was registered: if
        ``peer``'s connection was left free unarmed, arm it now (see :meth:`IdleSet.park`)."""
        self.idle.claim(peer)

    def start_watching(self) -> None:
        """Give the watcher's role to a pool thread (it keeps it until :meth:`stop`, or until it
        passes the role on)."""
        if self.idle.available:
            self._pool.submit(self._watch, 0)

    def stop(self) -> None:
        """Wake the monitor and the watcher so that they see the stop; forget free leases."""
        self._stopped = True
        self.leases.clear()
        self._monitor_wake.set()
        self.idle.stop()

    def close(self) -> None:
        """Release the watcher's descriptors (after :meth:`stop`, once the threads are joined)."""
        self.idle.close()

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
        outer, _tls.in_reply = getattr(_tls, "in_reply", False), True  # see before_request
        try:
            pending.callback(msg, None)
        finally:
            _tls.in_reply = outer
        return LED if pending.reader is WAITER else None

    # --- the reader loop ---------------------------------------------------------------

    def _read_loop(self, peer: int, conn: Connection, lease: Optional[ReadLease] = None,
                   job: Optional[Job] = None) -> bool:
        """Hold the reading of ``conn`` until it is handed on or left free (see :meth:`_read`);
        ``lease`` and ``job`` are the reading and the request a leader handed over (see
        :meth:`_lead`). Whether a request was served here."""
        lease = lease or ReadLease(peer, conn)
        _tls.lease = lease
        set_block_hook(self.hand_off)
        try:
            return self._read(lease, job)
        finally:
            _tls.lease = None
            set_block_hook(None)

    def _read(self, lease: ReadLease, job: Any = None) -> bool:
        """Read frames; complete replies and serve small requests here, inline, until nothing
        has arrived: then leave the connection to the watcher (:meth:`IdleSet.park`).

        Leader/follower: before a request that may block, the reading is queued for
        another pool thread, so reading never waits for user code; this thread then
        serves the request and goes back to the pool. Whether this thread served a request
        (the watcher polls after one)."""
        peer, conn, leases = lease.peer, lease.conn, self.leases
        served = FLUSH_AFTER  # first flush what a reader before us left deferred
        served_any = False
        while True:
            if job is None:
                if conn.has_deferred and (served >= FLUSH_AFTER or not conn.pending_input()):
                    served = 0
                    leases.begin_frame(lease, lease.since)  # a flush that would wait hands the reading on first
                    flushed = self._flush(peer, conn)
                    if not leases.end_frame(lease) or not flushed:
                        return served_any
                if conn.idle() and self.idle.park(lease):
                    return served_any
                served += 1
                job = self._next_job(lease, poll=False)
                if job is NOTHING:
                    return served_any
            if job is not None and job is not LED:
                if job[2] is Run.HAND_OFF:
                    self.hand_off()
                served_any = True
                if _serve(job) > QUICK_S:
                    served = FLUSH_AFTER  # only quick requests' replies wait for company
            if not leases.end_frame(lease):
                # handed on: another thread reads now; replies this thread deferred after
                # its successor looked are ours to send
                if conn.has_deferred:
                    self._flush(peer, conn)
                return served_any
            job = None

    def _next_job(self, lease: ReadLease, poll: bool, wait: Optional[float] = None) -> Any:
        """Read the next frame of ``lease``'s connection (polling first if ``poll`` and polling
        pays off), mark the lease busy with it and dispatch it: a :data:`Job`, ``LED`` or None
        (see :meth:`dispatch`). ``NOTHING`` if the connection ended (reported lost) or broke,
        or if nothing came within ``wait`` s."""
        conn = lease.conn
        if poll and lease.spin > 0 and SPIN_S and conn.idle():
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
        if poll and lease.spin <= 0 and time.perf_counter() - blocked < SPIN_S:
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
                    if job[2] is not Run.CONTROL:
                        self._pool.submit(self._read_loop, peer, conn, lease, job)  # it is still busy: see _read
                        return
                    _serve(job)  # bookkeeping that never waits: served in passing
                    if conn.has_deferred and not self._flush(peer, conn):
                        return
                if not self.leases.end_frame(lease):
                    return  # a callback ran long and the monitor handed the reading on
            # nothing awaited from the peer: the acks still to come can wait for our next call
            lazy = not self._pending.awaits(peer) and time.monotonic() >= self._eager_until.get(peer, 0.0)
            if not conn.idle() or not self.idle.park(lease, lazy=lazy):
                self._pool.submit(self._read_loop, peer, conn, lease)
            elif lazy:
                self._wake_monitor()  # it arms the connection LAZY_FOR from now
        finally:
            _tls.lease = prev_lease
            set_block_hook(prev_hook)

    # --- the watcher -------------------------------------------------------------------

    def _watch(self, gen: int) -> None:
        """Hold the watcher's role of generation ``gen``: wait for input on the free
        connections and read each one that has some, here, until nothing more has arrived on
        it; poll a while after serving a request (see ``SPIN_S``). Returns once the role has
        passed on (see :meth:`_replace_watcher`) or the readers stopped."""
        idle = self.idle
        _tls.watcher = gen
        spin_until = blocked = 0.0
        try:
            while self._watcher == gen and not self._stopped:
                if not spin_until:
                    blocked = time.perf_counter()
                try:
                    came, lease = idle.wait(0 if spin_until else -1)
                except (OSError, ValueError):
                    return  # closed: the readers stopped
                if not came:
                    if time.perf_counter() < spin_until:
                        os.sched_yield()
                        continue
                    if spin_until:
                        self._watch_spin -= 1  # a poll in vain: poll less
                    spin_until = 0.0
                    continue
                if spin_until:
                    self._watch_spin = min(self._watch_spin + 1, 4)
                elif self._watch_spin <= 0 and time.perf_counter() - blocked < SPIN_S:
                    self._watch_spin = 1  # polling would have found this one
                if lease is None:
                    continue  # a waiting thread took it to read its reply itself, or a wake-up
                reading = self._watcher_reading = (gen, time.monotonic())
                self._wake_monitor()
                late = idle.armed_late(lease)
                served_request = self._read_loop(lease.peer, lease.conn, lease)
                if late and served_request:  # a request waited for the lazy arming: no more of that
                    self._eager_until[lease.peer] = time.monotonic() + EAGER_S
                with self._watch_lock:
                    if self._watcher_reading is reading:
                        self._watcher_reading = None
                spin_until = (time.perf_counter() + SPIN_S
                              if served_request and SPIN_S and self._watch_spin > 0 else 0.0)
        finally:
            _tls.watcher = None

    def _replace_watcher(self, gen: int) -> None:
        """The holder of the watcher's role ``gen`` is about to wait, or has read one connection
        too long: a pool thread takes the role (once per generation)."""
        with self._watch_lock:
            if self._watcher != gen or self._stopped:
                return
            self._watcher = gen + 1
            self._watcher_reading = None
        self._pool.submit(self._watch, gen + 1)

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
        """Take ``lease`` out of BUSY and give the reading on: to the watcher if nothing has
        arrived on it, else to a pool thread; unless someone else took it first (then they did)."""
        if lease is not None and self.leases.end_frame(lease):
            if lease.conn.has_deferred or not lease.conn.idle() or not self.idle.park(lease):
                self._pool.submit(self._read_loop, lease.peer, lease.conn)

    # --- the monitor -------------------------------------------------------------------

    def _wake_monitor(self) -> None:
        if self._monitor_parked:
            self._monitor_parked = False
            self._monitor_wake.set()

    def monitor(self, stop: threading.Event) -> None:
        """The monitor thread: hand the reading on for readers stuck in a frame (user code that
        blocks, a lock): the connection's other messages must not wait for them; and pass the
        watcher's role on when its holder has read one connection for ``HANDOFF_AFTER``: the
        other connections must not wait for it either. Polls while readers are busy; parks
        after ``MONITOR_PARK_AFTER`` s without any (waking it costs a switch)."""
        leases = self.leases
        quiet_since = time.monotonic()
        while not stop.is_set():
            time.sleep(HANDOFF_AFTER)
            now = time.monotonic()
            reading = self._watcher_reading
            if leases.active or reading is not None or self.idle.lazy:
                quiet_since = now
                if reading is not None and now - reading[1] >= HANDOFF_AFTER:
                    self._replace_watcher(reading[0])
                for lease in leases.overdue(now, HANDOFF_AFTER):
                    self._pass(lease)
                self.idle.arm_lazy(now, LAZY_FOR)
            elif now - quiet_since >= MONITOR_PARK_AFTER:
                self._monitor_wake.clear()
                self._monitor_parked = True
                if not leases.active and self._watcher_reading is None and not self.idle.lazy:
                    self._monitor_wake.wait()  # a reader that became busy before we parked has seen the flag
                self._monitor_parked = False
                quiet_since = time.monotonic()


def _serve(job: Job) -> float:
    """Run a request's handler; how long it took (s)."""
    fn, args, _ = job
    started = time.perf_counter()
    try:
        fn(*args)
    except BaseException:  # a handler bug must not stop the reading
        log.exception("torchrpc: unhandled error in %s", getattr(fn, "__qualname__", fn))
    return time.perf_counter() - started


def _poll(conn: Connection) -> bool:
    """Poll ``conn`` for input for up to ``SPIN_S``; whether some came. The start of a frame
    counts: a frame larger than the connection's buffer is never all there to poll for, and
    ``recv`` waits only for its rest."""
    end = time.perf_counter() + SPIN_S
    while time.perf_counter() < end:
        if not conn.idle():
            return True
        os.sched_yield()
    return False
