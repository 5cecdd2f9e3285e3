"""The per-process agent: wires transport, protocol and the threads that run user code.

Threads, and what each may do:

* the pool (``num_worker_threads`` threads, growing when all are busy): runs user
  functions and every handler. Each connection has one *reading* thread at a time,
  taken from the pool: it decodes frames, completes the futures of replies and
  serves small requests itself, inline (no thread hand-off per message). It hands
  the reading on to another pool thread (leader/follower) before anything that
  may wait: a request of a kind that may block, a request it sends, a send the
  socket cannot take at once (a reader blocked in a send could stop both peers
  reading: a deadlock when two large messages cross); and a monitor hands it on
  for it when a request runs longer than ``HANDOFF_AFTER`` (user code that blocks).
* the autograd pool (one thread, growing like the pool when all are busy): runs the
  gradient deliveries of backward passes (``_ON_AUTOGRAD_POOL``).
* a heartbeat thread: keeps quiet connections alive and declares silent peers gone.
* a watchdog: fails calls that ran past their timeout.
* an acceptor: takes the connections of higher-ranked workers during start-up.

Calls are sent from the caller's own thread. A thread that then waits for the
reply (``rpc_sync``, ``to_here``, an RRef's future, a backward request) reads the
connection itself when nobody else does (:meth:`Agent.wait_reply`), polling before
it blocks: no thread has to wake another to hand it the reply. Once nothing is
expected on a connection, the reading is left free for the next such thread; a
request that nobody will wait for at once takes it for a pool thread, and the
monitor gives a reading left free to a pool thread after ``FREE_FOR`` (for
requests the peer starts).
"""
from __future__ import annotations

import collections
import heapq
import os
import itertools
import logging
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import rendezvous as rdzv
from . import profiling, serialization
from .errors import (
    ProtocolError,
    RemoteError,
    RPCError,
    RPCTimeoutError,
    SerializationError,
    WorkerUnavailableError,
)
from .options import UNSET_RPC_TIMEOUT, RpcBackendOptions
from .protocol import messages as m
from .autograd.context import current_context_id, use_context
from .autograd.service import DistAutograd
from .protocol.rref_context import ForkData, OwnerRRef, RRefContext, UserRRef
from .transport import Connection, ConnectionClosed, connect, listen
from .transport.base import block_hook, set_block_hook
from .transport.tls import TLSConfig
from .worker_info import WorkerInfo

log = logging.getLogger("torchrpc")

_tls = threading.local()

ReplyCallback = Callable[[Optional[m.Message], Optional[BaseException]], None]
#: (context id, autograd message id or 0) of a message sent inside a distributed autograd context
class AutogradTag(NamedTuple):
    """What a FORWARD_AUTOGRAD wrapper says of the message inside it."""

    context_id: int
    autograd_message_id: int = 0  # the message's send, 0 if it carries no tensor that requires grad
    converges: bool = False  # the sender's sends may converge (see DistAutogradContext.converges)

    @classmethod
    def of(cls, fa: m.ForwardAutograd) -> "AutogradTag":
        return cls(fa.context_id, fa.autograd_message_id, fa.converges)

    def wrap(self, msg: m.Message) -> m.ForwardAutograd:
        return m.ForwardAutograd(msg.msg_id, self.context_id, self.autograd_message_id, msg, self.converges)


#: Control messages (RRef, autograd cleanup) are resent if unacknowledged after this many
#: seconds (doubling each time), up to this many attempts.
CONTROL_RETRY_INTERVAL = float(os.environ.get("TORCHRPC_CONTROL_RETRY", "2.0"))
CONTROL_ATTEMPTS = 5


class _Faults:
    """Fault injection for tests (like PyTorch's faulty agent): drop or delay the next sends of
    chosen message types. ``spec``: ``{"drop": {"RREF_USER_DELETE": 1, ...},
    "delay": {"PYTHON_CALL": 0.5, ...}}`` (counts, and seconds)."""

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

    def drop(self, frame: list) -> bool:
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


#: Seconds between heartbeats on a quiet connection, and how many may be missed.
HEARTBEAT_INTERVAL = float(os.environ.get("TORCHRPC_HEARTBEAT_INTERVAL", "0.8"))
HEARTBEAT_MISSES = 3.5


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
#: A connection's reading left free (Agent._leave_free) goes to a pool thread once it has
#: stayed free this long, for requests the peer starts; the monitor looks every HANDOFF_AFTER.
FREE_FOR = HANDOFF_AFTER
#: ... and, if a frame was waiting there, the connection is not left free for this long.
KEEP_READ_S = 1.0
#: A thread reading its own reply (Agent._lead) looks at its future this often while no
#: frame comes: a timeout or a failure may end it without one.
LEAD_WAIT_S = 0.05


class UnknownWorkerError(RPCError, ValueError):
    """No worker has that name or id."""


#: Who reads a request's reply (Agent._request): a pool thread, found at once if nobody
#: reads the connection (CLAIM); the thread that waits for it (WAITER); or whoever reads
#: the connection next (ANYONE: an ack nobody waits for).
CLAIM, WAITER, ANYONE = "claim", "waiter", "anyone"


class _Pending:
    __slots__ = ("dest", "desc", "deadline", "timeout", "callback", "reader")

    def __init__(self, dest: int, desc: str, deadline: float, timeout: float, callback: ReplyCallback,
                 reader: str = CLAIM) -> None:
        self.dest = dest
        self.desc = desc
        self.deadline = deadline
        self.timeout = timeout
        self.callback = callback
        self.reader = reader  # who reads the reply: see Agent._request


class ReplyFuture(torch.futures.Future):
    """The Future of a request whose reply the thread that waits for it may read itself:
    ``wait()`` takes the reading of the destination's connection when nobody holds it
    (see :meth:`Agent.wait_reply`)."""

    def __init__(self, agent: "Agent", dest: int) -> None:
        super().__init__()
        self._agent = agent
        self._dest = dest

    def wait(self) -> Any:
        if not self.done():
            self._agent.wait_reply(self, self._dest)
        return super().wait()


class _ReadRole:
    """The reading of one connection, held by the pool thread in its read loop. While the
    holder handles a frame the role is in ``Agent._busy``; whoever pops it from there
    (the holder, done; or a hand-off) decides who reads next."""

    __slots__ = ("peer", "conn", "since", "spin")

    def __init__(self, peer: int, conn: Connection) -> None:
        self.peer = peer
        self.conn = conn
        self.since = 0.0  # when its holder took the frame it handles, or when it was left free
        self.spin = 1  # polls while the last polls found input (see SPIN_S)


class _Idle:
    """A parked pool thread: woken by releasing ``wake`` after setting ``item``."""

    __slots__ = ("wake", "item")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.item: Any = None


class _Pool:
    """Threads that run queued callables; ``stop`` runs what is queued, then joins.

    Starts ``size`` threads and adds one whenever work is queued while none is idle
    (up to ``max_size``): user functions that block in nested RPCs then cannot
    starve the pool into a deadlock, however deep the nesting.

    Work goes to the thread that went idle last. Keeping work on few threads keeps
    their caches warm and, above all, their malloc arenas (glibc gives each thread
    its own): spread over many threads, a training step's large tensors came from a
    different arena each time, each arena growing and handing its pages back to the
    kernel in turn -- ~2,400 page faults and 10 ms of system time per step on each
    W5 stage worker, a third of its CPU time (docs/performance.md).
    """

    def __init__(self, size: int, name: str, max_size: int = 1024) -> None:
        self._name = name
        self._max = max(size, max_size)
        self._lock = threading.Lock()
        self._work: collections.deque = collections.deque()
        self._idle: list[_Idle] = []  # a stack: the last to park is woken first
        self._starting = 0  # threads spawned that have not looked for work yet
        self._threads: list[threading.Thread] = []
        with self._lock:
            for _ in range(size):
                self._spawn()

    def _spawn(self) -> None:
        self._starting += 1
        t = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        t.start()

    def submit(self, fn: Callable, *args: Any) -> None:
        with self._lock:
            if self._idle:
                idle = self._idle.pop()
                idle.item = (fn, args)
                idle.wake.release()
                return
            self._work.append((fn, args))
            if len(self._work) > self._starting and len(self._threads) < self._max:
                self._spawn()

    def _run(self) -> None:
        _tls.in_pool = True
        me = _Idle()
        lock, work, idle = self._lock, self._work, self._idle
        with lock:
            self._starting -= 1
        while True:
            with lock:
                item = work.popleft() if work else None
                if item is None:
                    idle.append(me)
            if item is None:
                me.wake.acquire()
                item, me.item = me.item, None
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # a handler bug must not kill the thread
                log.exception("torchrpc: unhandled error in %s", getattr(fn, "__qualname__", fn))
            del item, fn, args

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            threads = list(self._threads)
            self._max = 0  # no more growth
            busy = len(threads) - len(self._idle)
            while self._idle:  # nothing is queued while a thread is idle
                idle = self._idle.pop()
                idle.item = _STOP
                idle.wake.release()
            self._work.extend([_STOP] * busy)  # after the queued work
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join(timeout)


_STOP = object()
#: Requests run on the autograd pool while the reader reads on: a training step's backward
#: work then runs on the same thread each step, as torch runs it on its engine's thread,
#: and its gradients come from one malloc arena. Spread over the threads that happened to be
#: reading, W5's stage workers took ~1,500 page faults per step (~400 this way).
_ON_AUTOGRAD_POOL = frozenset({m.PropagateGradients})
_LED: Any = object()
_NOTHING: Any = object()

#: Requests a reader serves inline (until they wait: see Agent._read); the others, which
#: may wait on other messages (the autograd passes), are served after the reader hands
#: the reading on, or on the autograd pool (_ON_AUTOGRAD_POOL).
_INLINE = frozenset({m.PythonCall, m.RemoteCall, m.RRefFetchCall, m.RRefUserDelete, m.RRefForkRequest, m.RRefBackward,
                     m.RRefChildAccept, m.CleanupAutogradContext})


class _SendSession(serialization.Session):
    """Pickling state of one outgoing message: the RRef forks it made, and, inside a
    distributed autograd context, the tensors that require grad (its *send*)."""

    __slots__ = ("ctx", "forks", "context_id", "grad_tensors", "dest")

    def __init__(self, ctx: RRefContext, context_id: Optional[int] = None, dest: Optional[int] = None) -> None:
        self.ctx = ctx
        self.forks: list[ForkData] = []
        self.context_id = context_id
        self.grad_tensors: list[torch.Tensor] = []
        self.dest = dest

    def on_send_tensor(self, tensor: torch.Tensor) -> None:
        if self.context_id is not None:
            self.grad_tensors.append(tensor)

    def fork_rref(self, handle: OwnerRRef | UserRRef) -> ForkData:
        fork = self.ctx.fork_for_send(handle, self.dest)
        self.forks.append(fork)
        return fork

    def cancel(self) -> None:
        for fork in self.forks:
            self.ctx.cancel_fork(fork)
        self.forks.clear()


class _RecvSession(serialization.Session):
    __slots__ = ("ctx", "src", "recording", "grad_tensors", "world_size")

    def __init__(self, ctx: RRefContext, src: int, recording: bool = False, world_size: int = 1 << 32) -> None:
        self.world_size = world_size
        self.ctx = ctx
        self.src = src
        self.recording = recording
        self.grad_tensors: list[torch.Tensor] = []

    def on_recv_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.grad_tensors.append(tensor)
        return tensor

    def rref_from_fork(self, fork: ForkData) -> OwnerRRef | UserRRef:
        if fork.owner_id >= self.world_size:
            raise ProtocolError(f"RRef fork names owner {fork.owner_id}, not a worker of this job")
        if fork.parent_id != self.src:
            raise ProtocolError(f"RRef fork names parent {fork.parent_id} but came from worker {self.src}")
        return self.ctx.receive_fork(fork)


def func_name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def is_async_function(func: Any) -> bool:
    return getattr(func, "_wrapped_async_rpc_function", None) is not None


class Agent:
    """One worker's RPC machinery. Create with :meth:`start`; end with :meth:`shutdown`."""

    def __init__(self, name: str, rank: int, world_size: int, options: RpcBackendOptions, rv: rdzv.Rendezvous):
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.options = options
        self.rpc_timeout = options.rpc_timeout
        self._rv = rv
        self.info = WorkerInfo(name, rank)
        self.workers: list[WorkerInfo] = []
        self._by_name: dict[str, WorkerInfo] = {}
        self._conns: dict[int, Connection] = {}
        self._dead: dict[int, str] = {}
        self._pending: dict[int, _Pending] = {}
        self._retrying = 0  # control messages between a lost ack and their next attempt
        self._deletes: collections.deque = collections.deque()  # (dest, RRefUserDelete) to send
        self._last_heard: dict[int, float] = {}  # peer -> when a frame last came from it (heartbeat loop)
        self._faults = _Faults(options._faults) if getattr(options, "_faults", None) else None
        self._deadlines: list[tuple[float, int]] = []
        self._deadline_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closing = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._conn_ready = threading.Condition()
        self.ctx = RRefContext(rank, self._emit)
        self.autograd = DistAutograd(self)
        self._handlers: dict[type, Callable[[int, Any], None]] = {
            m.PythonCall: self._handle_call,
            m.RemoteCall: self._handle_remote,
            m.RRefFetchCall: self._handle_fetch,
            m.RRefUserDelete: self._handle_user_delete,
            m.RRefForkRequest: self._handle_fork_request,
            m.RRefChildAccept: self._handle_child_accept,
            m.BackwardDiscover: self.autograd.handle_discover,
            m.PropagateGradients: self.autograd.handle_propagate,
            m.CleanupAutogradContext: self.autograd.handle_cleanup,
            m.RRefBackward: self.autograd.handle_rref_backward,
        }
        self._pool = _Pool(options.num_worker_threads, f"torchrpc-{name}")
        self._autograd_pool = _Pool(1, f"torchrpc-{name}-autograd")
        self._listener = None
        self._busy: dict[_ReadRole, _ReadRole] = {}  # readers handling a frame (see _read)
        self._free: dict[int, _ReadRole] = {}  # peer -> the reading of a connection nobody reads now
        self._keep_read: dict[int, float] = {}  # peer -> until when its reading is not left free
        self._monitor_wake = threading.Event()
        self._monitor_parked = False

    # --- start-up ------------------------------------------------------------------

    def start(self) -> None:
        """Listen, publish our address, learn everyone's, and connect to every peer."""
        timeout = self.rpc_timeout or 300.0
        try:
            self._secret = rdzv.job_secret(self._rv.store, self.rank, getattr(self.options, "secret", None))
            opts = self.options
            self._tls = (TLSConfig(opts.tls_certfile, opts.tls_keyfile, opts.tls_cafile)
                         if getattr(opts, "tls_certfile", None) else None)
            scheme = "tls" if self._tls else "tcp"
            self._listener = listen(f"{scheme}://{rdzv.listen_host(self._rv.master_host)}:0", self._secret,
                                    **({"tls": self._tls} if self._tls else {}))
            self._spawn(self._watchdog, "watchdog")
            self._spawn(self._reader_monitor, "monitor")
            self._spawn(self._heartbeat_loop, "heartbeat")
            self._spawn(self._accept_loop, "acceptor")
            rdzv.publish(self._rv.store, self.rank, {"name": self.name, "address": self._listener.address})
            infos = rdzv.gather(self._rv.store, self.world_size, timeout)
            names = [i["name"] for i in infos]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"worker names must be unique; {dupes} used by ranks "
                                 f"{[r for r, n in enumerate(names) if n in dupes]}")
            with self._conn_ready:
                self.workers = [WorkerInfo(n, r) for r, n in enumerate(names)]
                self._by_name = {w.name: w for w in self.workers}
                self._conn_ready.notify_all()  # the acceptor may be waiting for the names
            for peer in range(self.rank):
                try:
                    conn = connect(infos[peer]["address"], timeout, self._secret,
                                   **({"tls": self._tls} if self._tls else {}))
                except ConnectionClosed as e:
                    raise RPCError(f"cannot connect to worker {infos[peer]['name']!r}: {e}") from e
                conn.send(m.Hello(0, self.rank, self.name).encode())
                self._add_connection(peer, conn)
            deadline = time.monotonic() + timeout
            with self._conn_ready:
                while len(self._conns) < self.world_size - 1:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = [w.name for w in self.workers if w.id != self.rank and w.id not in self._conns]
                        raise RPCError(f"timed out after {timeout:.0f} s waiting for workers {missing} to connect")
                    self._conn_ready.wait(left)
        except BaseException:
            self._close(graceful=False)
            raise

    def _spawn(self, target: Callable, what: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=f"torchrpc-{self.name}-{what}", daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except ConnectionClosed:
                return
            try:
                hello = m.decode(conn.recv())
                if not isinstance(hello, m.Hello):
                    raise ProtocolError(f"expected HELLO, got {type(hello).__name__}")
                peer = hello.worker_id
                if not self.workers:
                    # the mesh is only built after every address is known; wait for that
                    with self._conn_ready:
                        self._conn_ready.wait_for(lambda: bool(self.workers) or self._closing, 60)
                if not (self.rank < peer < len(self.workers)) or self.workers[peer].name != hello.name:
                    raise ProtocolError(f"unexpected HELLO from {hello.name!r} claiming id {peer}")
                if peer in self._conns:
                    raise ProtocolError(f"worker {hello.name!r} is already connected")
            except Exception as e:  # whatever the first frame was, the acceptor carries on
                log.warning("torchrpc %s: rejected connection from %s: %s", self.name, conn.peer, e)
                conn.close()
                continue
            self._add_connection(peer, conn)

    def _add_connection(self, peer: int, conn: Connection) -> None:
        with self._conn_ready:
            self._conns[peer] = conn
            self._conn_ready.notify_all()
        self._pool.submit(self._read_loop, peer, conn)

    # --- names --------------------------------------------------------------------

    def worker_info(self, to: Any = None) -> WorkerInfo:
        """Resolve a worker name, id or WorkerInfo (None: this worker)."""
        if to is None:
            return self.info
        if isinstance(to, WorkerInfo):
            if 0 <= to.id < len(self.workers) and self.workers[to.id] == to:
                return to
            raise UnknownWorkerError(f"unknown worker {to!r}")
        if isinstance(to, str):
            w = self._by_name.get(to)
            if w is None:
                raise UnknownWorkerError(f"unknown worker name {to!r}; workers are {sorted(self._by_name)}")
            return w
        if isinstance(to, int) and not isinstance(to, bool):
            if 0 <= to < len(self.workers):
                return self.workers[to]
            raise UnknownWorkerError(f"unknown worker id {to}; ids are 0..{len(self.workers) - 1}")
        raise TypeError(f"a destination worker is a name, an id or a WorkerInfo, not {type(to).__name__}")

    def _timeout(self, timeout: float) -> float:
        if timeout is None or timeout == UNSET_RPC_TIMEOUT:
            return self.rpc_timeout
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0 (0: none) or -1 (the default), got {timeout}")
        return float(timeout)

    # --- sending --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RPCError("RPC has been shut down on this worker; call init_rpc again to use it")

    def _send(self, dest: int, frame: list, defer: bool = False) -> None:
        if dest == self.rank:
            # to ourselves: copy, as the wire would, and dispatch in this thread
            job = self._dispatch(dest, [bytearray(b) for b in frame])
            if job is not None:
                self._pool.submit(job[0], *job[1])
            return
        if self._faults is not None and self._faults.drop(frame):
            return  # injected fault: lost on the wire
        conn = self._conns.get(dest) or self._await_connection(dest)
        if conn is None:
            why = self._dead.get(dest, "not connected")
            raise WorkerUnavailableError(f"worker {self.workers[dest].name!r} (id {dest}) is unavailable: {why}")
        try:
            conn.send(frame, defer)
        except ConnectionClosed as e:
            raise WorkerUnavailableError(f"worker {self.workers[dest].name!r} (id {dest}) is unavailable: {e}") from e

    def _await_connection(self, dest: int) -> Optional[Connection]:
        """During start-up a peer may call us before every peer has connected: wait for it."""
        with self._conn_ready:
            self._conn_ready.wait_for(
                lambda: dest in self._conns or dest in self._dead or self._closed, self.rpc_timeout or 300.0)
            return self._conns.get(dest)

    def _request(self, dest: int, msg: m.Message, timeout: float, desc: str, callback: ReplyCallback,
                 autograd: Optional[AutogradTag] = None, defer: bool = False, reader: str = CLAIM) -> int:
        """Send a request; ``callback(reply, error)`` runs exactly once (reply, timeout or failure).

        If nobody reads ``dest``'s connection now (see :meth:`_leave_free`), ``CLAIM`` gives
        the reading to a pool thread at once. Otherwise the reply waits for the thread that
        waits for it (``WAITER``: :meth:`wait_reply`), or for whoever reads next (``ANYONE``),
        the monitor at the latest (``FREE_FOR``)."""
        if not defer:
            self.hand_off_reading()  # a reader that sends a request likely waits for the reply
            if self._deletes:
                self._send_deletes(dest)
        msg_id = msg.msg_id = next(self._ids)
        deadline = time.monotonic() + timeout if timeout > 0 else 0.0
        self._pending[msg_id] = _Pending(dest, desc, deadline, timeout, callback, reader)
        if reader is CLAIM and self._free:  # after the entry above: see _leave_free
            role = self._free.pop(dest, None)
            if role is not None:
                self._pool.submit(self._read_loop, dest, role.conn, role)
        if deadline:
            with self._deadline_lock:
                heapq.heappush(self._deadlines, (deadline, msg_id))
        try:
            self._send(dest, (autograd.wrap(msg) if autograd else msg).encode(), defer)
        except BaseException:
            self._pending.pop(msg_id, None)
            raise
        return msg_id

    def _fail(self, msg_id: int, error: BaseException) -> None:
        """Fail a pending request now, unless its reply already came."""
        p = self._pending.pop(msg_id, None)
        if p is not None:
            p.callback(None, error)

    def call(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> torch.futures.Future:
        """Run ``func(*args, **kwargs)`` on worker ``to``; a Future of its result.

        Under torch.profiler the call is an event on the caller (see :mod:`torchrpc.profiling`).
        """
        dest, timeout = self._call_target(to, timeout)
        if not profiling.enabled():
            return self._call(dest, func, args, kwargs, timeout, False)
        return profiling.profiled_async(self._event("async", func, dest),
                                        lambda: self._call(dest, func, args, kwargs, timeout, True))

    def call_sync(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> Any:
        """Run ``func(*args, **kwargs)`` on worker ``to`` and return its result."""
        dest, timeout = self._call_target(to, timeout)
        if not profiling.enabled():
            return self._call(dest, func, args, kwargs, timeout, False, lead=True).wait()
        return profiling.profiled_sync(self._event("sync", func, dest),
                                       lambda: self._call(dest, func, args, kwargs, timeout, True))

    def _event(self, kind: str, func: Callable, dest: int) -> str:
        return f"rpc_{kind}#{func_name(func)}({self.name} -> {self.workers[dest].name})"

    def _call_target(self, to: Any, timeout: float) -> tuple[int, float]:
        """The destination's id and the effective timeout of a call (raises if shut down)."""
        self._check_open()
        return self.worker_info(to).id, self._timeout(timeout)

    def _call(self, dest: int, func: Callable, args: tuple, kwargs: dict, timeout: float,
              profiled: bool, lead: bool = False) -> torch.futures.Future:
        """Send the call; with ``lead``, the caller waits for it at once and reads the reply itself."""
        session = _SendSession(self.ctx, current_context_id(), dest)
        payload = self._dumps_request(func, args, kwargs, session, dest)
        fut: torch.futures.Future = ReplyFuture(self, dest) if lead else torch.futures.Future()
        try:
            self._request(dest, m.PythonCall(0, payload, profiled), timeout, func_name(func),
                          self._value_reply(fut, dest, m.PythonReturn), self._autograd_tag(session, dest),
                          reader=WAITER if lead else CLAIM)
        except BaseException:
            session.cancel()
            raise
        return fut

    def _value_reply(self, fut: torch.futures.Future, dest: int, reply_cls: type) -> ReplyCallback:
        """A reply callback that completes ``fut`` with the unpickled ``reply_cls`` payload or the error."""

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            tag: Optional[AutogradTag] = None
            if isinstance(reply, m.ForwardAutograd):
                tag, reply = AutogradTag.of(reply), reply.inner
            if error is None:
                if isinstance(reply, reply_cls):
                    if getattr(reply, "remote_ns", 0):
                        fut._remote_ns = reply.remote_ns  # type: ignore[attr-defined]
                    try:
                        fut.set_result(self._loads(reply.payload, dest, tag))
                        return
                    except BaseException as e:
                        error = e
                else:
                    error = self._reply_error(reply, dest)
            fut.set_exception(error)

        return on_reply

    def _autograd_tag(self, session: _SendSession, dest: int) -> Optional[AutogradTag]:
        """Record the message's send (if it carries tensors that require grad) in its context."""
        cid = session.context_id
        if cid is None:
            return None
        if session.grad_tensors:
            ag_id = self.autograd.record_send(cid, dest, session.grad_tensors)
            return AutogradTag(cid, ag_id, self.autograd.converges(cid))
        self.autograd.touch(cid, dest)
        return AutogradTag(cid)

    def _loads(self, payload: m.Payload, src: int, tag: Optional[AutogradTag]) -> Any:
        """Unpickle a payload from ``src``, recording its recv if it came inside a context."""
        session = _RecvSession(self.ctx, src, recording=bool(tag and tag.autograd_message_id),
                               world_size=self.world_size)
        value = serialization.loads(payload, session)
        if tag is not None:
            if tag.autograd_message_id:
                self.autograd.record_recv(tag.context_id, src, tag.autograd_message_id, session.grad_tensors,
                                          tag.converges)
            else:
                self.autograd.touch(tag.context_id, src)
        return value

    def _dumps_request(self, func: Callable, args: tuple, kwargs: dict, session: _SendSession, dest: int) -> m.Payload:
        try:
            return serialization.dumps((func, args, kwargs), session)
        except SerializationError as e:
            session.cancel()
            raise SerializationError(
                f"arguments of {func_name(func)} for worker {self.workers[dest].name!r} cannot be sent: {e}"
            ) from e.__cause__

    def remote(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> tuple[Any, torch.futures.Future]:
        """Start ``func`` on ``to`` keeping its result there; (handle, creation future)."""
        self._check_open()
        dest = self.worker_info(to).id
        timeout = self._timeout(timeout)
        context_id = current_context_id()
        created: torch.futures.Future = ReplyFuture(self, dest) if dest != self.rank else torch.futures.Future()
        if dest == self.rank:
            owner = OwnerRRef(self.ctx.new_id())
            self._pool.submit(self._run_into_owner, func, args, kwargs, owner, created, context_id)
            return owner, created
        user = self.ctx.create_user_for_remote(dest)
        session = _SendSession(self.ctx, context_id, dest)
        try:
            payload = self._dumps_request(func, args, kwargs, session, dest)
        except BaseException:
            self.ctx.confirm_remote_user(user.fork_id, RPCError("never sent"))
            raise
        fork_id = user.fork_id

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if error is not None:
                # timeout or dead owner: it may never have registered our fork
                self.ctx.confirm_remote_user(fork_id, error)
                created.set_exception(error)
                return
            self.ctx.confirm_remote_user(fork_id)
            if isinstance(reply, m.RemoteReturn):
                created.set_result(True)
            else:
                created.set_exception(self._reply_error(reply, dest))

        try:
            # the creation is awaited by to_here() or the RRef's future, which read the reply
            self._request(dest, m.RemoteCall(0, user.rref_id, user.fork_id, payload), timeout, func_name(func), on_reply,
                          self._autograd_tag(session, dest), reader=WAITER)
        except BaseException as e:
            session.cancel()
            self.ctx.confirm_remote_user(fork_id, e)
            raise
        return user, created

    def _run_into_owner(self, func: Callable, args: tuple, kwargs: dict, owner: OwnerRRef,
                        created: torch.futures.Future, context_id: Optional[int]) -> None:
        """remote() to ourselves: run through pickle (value semantics), keep the result locally."""
        try:
            session = _SendSession(self.ctx, context_id)
            payload = serialization.dumps((func, args, kwargs), session)
            func, args, kwargs = self._loads(_copy_payload(payload), self.rank, self._autograd_tag(session, self.rank))
            with use_context(context_id):
                self._run_user(func, args, kwargs, lambda v, e: self._fill_owner(owner, v, e, created))
        except BaseException as e:
            self._fill_owner(owner, None, e, created)

    @staticmethod
    def _fill_owner(owner: OwnerRRef, value: Any, error: Optional[BaseException], created: torch.futures.Future) -> None:
        if error is not None:
            owner.set_error(error)
            created.set_exception(error)
        else:
            owner.set_value(value)
            created.set_result(True)

    def fetch(self, user: UserRRef, timeout: float, created: Optional[torch.futures.Future] = None) -> torch.futures.Future:
        """The value of a UserRRef from its owner (``to_here``).

        ``created`` is the Future of the remote() that makes the value: if that
        fails (an error, a timeout), the fetch fails with its error at once.
        """
        self._check_open()
        timeout = self._timeout(timeout)
        fut: torch.futures.Future = ReplyFuture(self, user.owner_id)
        if user.error is not None:
            fut.set_exception(user.error)
            return fut
        dest = user.owner_id

        cid = current_context_id()
        if cid is not None:
            self.autograd.touch(cid, dest)
        msg_id = self._request(dest, m.RRefFetchCall(0, user.rref_id), timeout, "RRef.to_here",
                               self._value_reply(fut, dest, m.RRefFetchReturn), None if cid is None else AutogradTag(cid),
                               reader=WAITER)
        if created is not None:
            def creation_done(f: torch.futures.Future) -> None:
                try:
                    f.wait()
                except BaseException as e:
                    self._fail(msg_id, e)

            created.add_done_callback(creation_done)
        return fut

    def _emit(self, dest: int, msg: m.Message, on_done: Optional[Callable[[Optional[BaseException]], None]]) -> None:
        """The RRef context's outbox: send a control message from the pool (never inline).

        User deletes (a UserRRef was collected) are not urgent: they wait in
        ``_deletes`` for the next request to any worker, which sends them first (those for
        its own destination in the same system call), or for the watchdog's next tick.
        """
        if self._closed:
            return
        if type(msg) is m.RRefUserDelete and on_done is None:
            self._deletes.append((dest, msg))
            return
        self._pool.submit(self._send_control, dest, msg, on_done)

    def _send_deletes(self, defer_to: Optional[int] = None) -> None:
        """Send the queued user deletes; those for ``defer_to`` are deferred onto its next frame."""
        q = self._deletes
        while q:
            try:
                dest, msg = q.popleft()
            except IndexError:  # taken by another thread
                return
            self._send_control(dest, msg, None, defer=dest == defer_to)

    def _send_control(self, dest: int, msg: m.Message, on_done: Optional[Callable], attempt: int = 1,
                      defer: bool = False) -> None:
        """Send an RRef or cleanup control message; they are idempotent, so one whose ack does not
        come in time is sent again (``CONTROL_ATTEMPTS`` times, the wait doubling each time)."""

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if isinstance(error, RPCTimeoutError) and attempt < CONTROL_ATTEMPTS and not self._closed:
                self._retrying += 1
                self._pool.submit(self._retry_control, dest, msg, on_done, attempt + 1)
                return
            if error is None and not isinstance(reply, m.RRefAck):
                error = self._reply_error(reply, dest)
            if error is not None:
                log.debug("torchrpc %s: %s to %d failed: %s", self.name, type(msg).__name__, dest, error)
            if on_done is not None:
                self._on_pool(on_done, error)

        timeout = CONTROL_RETRY_INTERVAL * 2 ** (attempt - 1)
        if self.rpc_timeout:
            timeout = min(timeout, self.rpc_timeout)
        try:
            # an ack nobody waits for (a delete, a cleanup) can wait for the next reader
            self._request(dest, msg, timeout, type(msg).__name__, on_reply, defer=defer,
                          reader=ANYONE if on_done is None else CLAIM)
        except BaseException as e:
            on_reply(None, e)

    def _retry_control(self, dest: int, msg: m.Message, on_done: Optional[Callable], attempt: int) -> None:
        try:
            self._send_control(dest, msg, on_done, attempt)
        finally:
            self._retrying -= 1

    def _on_pool(self, fn: Callable, *args: Any) -> None:
        """Run ``fn`` now if this is a pool thread, else queue it for the pool."""
        if getattr(_tls, "in_pool", False):
            fn(*args)
        else:
            self._pool.submit(fn, *args)

    # --- receiving --------------------------------------------------------------------

    def _read_loop(self, peer: int, conn: Connection, role: Optional[_ReadRole] = None,
                   job: Optional[tuple[Callable, tuple]] = None) -> None:
        """Hold the reading of ``conn`` until it is handed on (see :meth:`_read`); ``role`` and
        ``job`` are the reading and the request a leader handed over (see :meth:`_lead`)."""
        role = role or _ReadRole(peer, conn)
        _tls.role = role
        set_block_hook(self.hand_off_reading)
        try:
            self._read(role, job)
        finally:
            _tls.role = None
            set_block_hook(None)

    def _read(self, role: _ReadRole, job: Optional[tuple[Callable, tuple]] = None) -> None:
        """Read frames; complete replies and serve small requests here, inline.

        Leader/follower: before a request that may block, the reading is queued for
        another pool thread, so reading never waits for user code; this thread then
        serves the request and goes back to the pool. After a reply that a waiting
        thread reads for itself next time, the reading may be left free (:meth:`_leave_free`).
        """
        peer, conn, busy = role.peer, role.conn, self._busy
        served = FLUSH_AFTER  # first flush what a reader before us left deferred
        served_request = job is not None
        while True:
            if job is None:
                if conn.has_deferred and (served >= FLUSH_AFTER or not conn.pending_input()):
                    served = 0
                    busy[role] = role  # a flush that would wait hands the reading on first
                    flushed = self._flush(peer, conn)
                    if busy.pop(role, None) is None or not flushed:
                        return
                served += 1
                job = self._next_job(role, poll=served_request)
                if job is _NOTHING:
                    return
            served_request = job is not None and job is not _LED
            if served_request and type(job[1][1]) in _ON_AUTOGRAD_POOL:
                self._autograd_pool.submit(job[0], *job[1])  # see _ON_AUTOGRAD_POOL
                job = None
                served_request = False
            if served_request:
                handler, args = job
                if type(args[1]) not in _INLINE:
                    self.hand_off_reading()
                started = time.perf_counter()
                try:
                    handler(*args)
                except BaseException:  # a handler bug must not stop the reading
                    log.exception("torchrpc: unhandled error in %s", getattr(handler, "__qualname__", handler))
                if time.perf_counter() - started > QUICK_S:
                    served = FLUSH_AFTER  # only quick requests' replies wait for company
                del handler, args
            if busy.pop(role, None) is None:
                # handed on: another thread reads now; replies this thread deferred after
                # its successor looked are ours to send
                if conn.has_deferred:
                    self._flush(peer, conn)
                return
            if job is _LED and self._leave_free(role):
                return
            job = None

    def _next_job(self, role: _ReadRole, poll: bool, wait: Optional[float] = None) -> Any:
        """Read the next frame of ``role``'s connection (polling first if ``poll`` and polling
        pays off), mark the role busy with it and dispatch it: a request's job, ``_LED`` or
        None (see :meth:`_dispatch`). ``_NOTHING`` if the connection ended (reported lost) or
        broke, or if nothing came within ``wait`` s."""
        conn = role.conn
        if poll and role.spin > 0 and SPIN_S and not conn.pending_input():
            role.spin = min(role.spin + 1, 4) if self._poll(conn) else role.spin - 1
        blocked = time.perf_counter()
        try:
            if wait is not None and not conn.pending_input() and not conn.wait_input(wait):
                return _NOTHING
            frame = conn.recv()
        except ConnectionClosed as e:
            self._on_connection_lost(role.peer, conn, str(e))
            return _NOTHING
        except BaseException as e:  # pragma: no cover - a bug
            self._reader_failed(role.peer, conn, e)
            return _NOTHING
        if role.spin <= 0 and time.perf_counter() - blocked < SPIN_S:
            role.spin = 1  # polling would have found this one
        role.since = time.monotonic()
        self._busy[role] = role
        self._wake_monitor()
        try:
            return self._dispatch(role.peer, frame)
        except BaseException as e:  # pragma: no cover - a bug
            self._busy.pop(role, None)
            self._reader_failed(role.peer, conn, e)
            return _NOTHING

    def _wake_monitor(self) -> None:
        if self._monitor_parked:
            self._monitor_parked = False
            self._monitor_wake.set()

    def wait_reply(self, fut: torch.futures.Future, dest: int) -> None:
        """Before waiting on ``fut``, the reply of a request to ``dest``: if nobody reads
        ``dest``'s connection now, read it on this thread until ``fut`` is done. The thread
        that needs the reply is then the one that wakes (or, polling, none does) instead of a
        reader that would have to wake it. Otherwise return at once: the reader completes
        ``fut`` and the caller waits on it as usual."""
        if not fut.done() and self._free:
            role = self._free.pop(dest, None)
            if role is not None:
                self._lead(role, fut)

    def _lead(self, role: _ReadRole, fut: torch.futures.Future) -> None:
        """Read ``role``'s connection on this (waiting) thread until ``fut`` is done, then let
        the reading go. A request that arrives first goes to a pool thread with the reading,
        to be served as a reader serves it; this thread then just waits."""
        peer, conn, busy = role.peer, role.conn, self._busy
        prev_role, prev_hook = getattr(_tls, "role", None), block_hook()
        _tls.role = role
        set_block_hook(self.hand_off_reading)
        try:
            while not fut.done():
                # in slices: the future may also end without a frame (a timeout, a failure)
                job = self._next_job(role, poll=True, wait=LEAD_WAIT_S)
                if job is _NOTHING:
                    if self._conns.get(peer) is conn:
                        continue
                    return  # the connection is gone; its calls have failed
                if job is not None and job is not _LED:
                    self._pool.submit(self._read_loop, peer, conn, role, job)  # it is still busy: see _read
                    return
                if busy.pop(role, None) is None:
                    return  # a callback ran long and the monitor handed the reading on
            if not self._leave_free(role):
                self._pool.submit(self._read_loop, peer, conn, role)
        finally:
            _tls.role = prev_role
            set_block_hook(prev_hook)

    def _leave_free(self, role: _ReadRole) -> bool:
        """Leave ``role``'s connection without a reader if nothing is expected on it: no
        request of ours to that peer is waiting for a reply, and nothing has arrived. The
        next request to the peer takes the reading (:meth:`_request`, :meth:`wait_reply`);
        the monitor gives it to a pool thread after ``FREE_FOR`` (for requests the peer
        starts; where one was waiting, the connection stays read for ``KEEP_READ_S``).
        Whether the reading was left (False: the caller keeps reading)."""
        conn, peer = role.conn, role.peer
        if (conn.has_deferred or self._closing or self._expects(peer) or conn.pending_input()
                or time.monotonic() < self._keep_read.get(peer, 0.0)):
            return False
        role.since = time.monotonic()
        self._free[peer] = role
        # A request registered after the check above may have looked for a free reading
        # before it was there: look again, and take the reading back if one did. (Not at
        # the connection: once the reading is free, another thread may be reading it.)
        if self._expects(peer):
            return self._free.pop(peer, None) is not role
        self._wake_monitor()
        return True

    def _expects(self, peer: int) -> bool:
        """Whether a request of ours to ``peer`` waits for its reply (assumed, past 64 requests)."""
        pending = list(self._pending.values())
        return len(pending) > 64 or any(p.dest == peer for p in pending)

    def _flush(self, peer: int, conn: Connection) -> bool:
        """Send ``conn``'s deferred frames; False if the connection broke (reported lost)."""
        try:
            conn.flush()
            return True
        except ConnectionClosed as e:
            self._on_connection_lost(peer, conn, str(e))
            return False

    @staticmethod
    def _poll(conn: Connection) -> bool:
        """Poll ``conn`` for input for up to ``SPIN_S``; whether some came."""
        end = time.perf_counter() + SPIN_S
        while time.perf_counter() < end:
            if conn.pending_input():
                return True
        return False

    def _reader_failed(self, peer: int, conn: Connection, e: BaseException) -> None:
        """A bug in reading: report it, and treat the peer as lost."""
        log.exception("torchrpc %s: reader for worker %d failed", self.name, peer)
        self._on_connection_lost(peer, conn, f"reader failed: {e!r}")

    def hand_off_reading(self) -> None:
        """If this thread is a reader handling a frame, pass the reading to another pool thread
        (a handler about to do something slow calls this: the connection's other messages
        must not wait for it)."""
        self._pass_reading(getattr(_tls, "role", None))

    def _pass_reading(self, role: Optional[_ReadRole]) -> None:
        """Take ``role`` out of the busy table and give the reading to a pool thread,
        unless someone else took it first (then they did)."""
        if role is not None and self._busy.pop(role, None) is not None:
            self._pool.submit(self._read_loop, role.peer, role.conn)

    def _reader_monitor(self) -> None:
        """Hand the reading on for readers stuck in a frame (user code that blocks, a lock):
        the connection's other messages must not wait for them; and give readings left free
        to pool threads once they stayed free ``HANDOFF_AFTER`` s (for requests the peer
        starts). Polls while readers are active or readings free; parks after
        ``MONITOR_PARK_AFTER`` s without either (waking it costs a switch)."""
        busy, free = self._busy, self._free
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            time.sleep(HANDOFF_AFTER)
            now = time.monotonic()
            if busy or free:
                quiet_since = now
                for role in list(busy):
                    if now - role.since >= HANDOFF_AFTER:
                        self._pass_reading(role)
                for peer, role in list(free.items()):
                    if now - role.since >= FREE_FOR:
                        taken = free.pop(peer, None)
                        if taken is not None:
                            if not self._expects(peer) and taken.conn.pending_input():
                                # the peer starts requests here: keep its connection read
                                self._keep_read[peer] = now + KEEP_READ_S
                            self._pool.submit(self._read_loop, peer, taken.conn, taken)
            elif now - quiet_since >= MONITOR_PARK_AFTER:
                self._monitor_wake.clear()
                self._monitor_parked = True
                if not busy and not free:  # a reader that became busy before we parked has seen the flag
                    self._monitor_wake.wait()
                self._monitor_parked = False
                quiet_since = time.monotonic()

    def _dispatch(self, src: int, frame: list) -> Any:
        """Decode a frame; complete a reply's future here, or return the request's handler to
        run (``_LED`` after a reply whose waiter reads its replies itself, see _leave_free)."""
        tag: Optional[AutogradTag] = None
        try:
            msg = m.decode(frame)
            handler = None
            if type(msg) is m.Heartbeat:
                return None
            if not msg.IS_REPLY:
                if isinstance(msg, m.ForwardAutograd):
                    tag, msg = AutogradTag.of(msg), msg.inner
                handler = self._handlers.get(type(msg))
                if handler is None:
                    raise ProtocolError(f"{type(msg).__name__} is not a request")
        except ProtocolError as e:
            msg_id = None if m.is_reply_frame(frame) else m.peek_msg_id(frame)
            log.warning("torchrpc %s: malformed message from worker %d: %s", self.name, src, e)
            if msg_id is not None:
                return self._reply_exception, (src, msg_id, e)
            return None
        if msg.IS_REPLY:
            pending = self._pending.pop(msg.msg_id, None)
            if pending is None:
                return None  # timed out already, or a stray reply
            if pending.dest != src:
                log.warning("torchrpc %s: worker %d replied to a request sent to %d", self.name, src, pending.dest)
                self._pending[msg.msg_id] = pending
                return None
            pending.callback(msg, None)
            return _LED if pending.reader is WAITER else None
        return handler, (src, msg, tag)

    def _on_connection_lost(self, peer: int, conn: Connection, reason: str) -> None:
        with self._conn_ready:
            first = self._conns.get(peer) is conn  # the reader and the heartbeat may both report it
            if first:
                del self._conns[peer]
            self._conn_ready.notify_all()
        conn.close()
        if not first or self._closed:
            return
        name = self.workers[peer].name if peer < len(self.workers) else str(peer)
        self._dead.setdefault(peer, reason)
        if not self._closing:
            log.warning("torchrpc %s: lost worker %r: %s", self.name, name, reason)
        err = WorkerUnavailableError(f"worker {name!r} (id {peer}) is gone: {reason}")
        self.ctx.forget_worker(peer, err)
        for msg_id, p in list(self._pending.items()):
            if p.dest == peer and self._pending.pop(msg_id, None) is not None:
                p.callback(None, WorkerUnavailableError(f"{err} (while waiting for {p.desc})"))

    def _timeout_message(self, p: _Pending) -> str:
        """What timed out, and what this worker was still waiting on from that peer."""
        name = self.workers[p.dest].name
        others = sorted(q.desc for q in list(self._pending.values()) if q.dest == p.dest)
        heard = self._last_heard.get(p.dest)
        heard_text = f"; last heard from {name!r} {time.monotonic() - heard:.1f} s ago" if heard else ""
        waiting = (f"; still waiting on {len(others)} other call(s) to {name!r}: {', '.join(others[:5])}"
                   + (" ..." if len(others) > 5 else "")) if others else ""
        return f"RPC to worker {name!r} running {p.desc} timed out after {p.timeout:g} s{waiting}{heard_text}"

    def debug_info(self) -> dict[str, Any]:
        """A snapshot for people: pending calls, RRefs, autograd contexts and traffic, per peer."""
        pending: dict[str, list[str]] = {}
        for p in list(self._pending.values()):
            pending.setdefault(self.workers[p.dest].name, []).append(p.desc)
        return {
            "worker": self.name,
            "rank": self.rank,
            "pending_calls": {k: sorted(v) for k, v in sorted(pending.items())},
            "rrefs": self.ctx.debug_info(),
            "autograd_contexts": sorted(self.autograd.contexts.ids()),
            "peers": {w.name: {**self.stats(w.id), "alive": self.is_alive(w.id),
                               "shared_memory": bool(getattr(self._conns.get(w.id), "uses_shm", False))}
                      for w in self.workers if w.id != self.rank},
            "pool_threads": len(self._pool._threads),
        }

    def stats(self, peer: int) -> dict[str, int]:
        """Messages and bytes exchanged with ``peer`` over its current connection."""
        conn = self._conns.get(peer)
        return {
            "msgs_sent": conn.frames_sent if conn else 0,
            "bytes_sent": conn.bytes_sent if conn else 0,
            "msgs_received": conn.frames_received if conn else 0,
            "bytes_received": conn.bytes_received if conn else 0,
        }

    def is_alive(self, peer: int) -> bool:
        return peer == self.rank or peer not in self._dead

    def _heartbeat_loop(self) -> None:
        """Send a heartbeat on every connection quiet for an interval; declare a peer gone
        when nothing at all has come from it for ``HEARTBEAT_MISSES`` intervals (a frozen
        process or a cut link, which TCP alone would notice only after minutes)."""
        interval = HEARTBEAT_INTERVAL
        seen: dict[int, tuple[int, int, float, float]] = {}  # peer -> (sent, arrived, t_sent, t_received)
        beat = m.Heartbeat(0).encode()
        while not self._stop.wait(interval / 4):
            now = time.monotonic()
            for peer, conn in list(self._conns.items()):
                sent, received = conn.frames_sent, getattr(conn, "bytes_arriving", conn.frames_received)
                prev = seen.get(peer)
                t_sent = now if prev is None or sent != prev[0] else prev[2]
                t_recv = now if prev is None or received != prev[1] else prev[3]
                seen[peer] = (sent, received, t_sent, t_recv)
                self._last_heard[peer] = t_recv
                if now - t_recv > interval * HEARTBEAT_MISSES and not self._closing:
                    self._on_connection_lost(peer, conn, f"no heartbeat for {now - t_recv:.1f} s")
                    continue
                if now - t_sent >= interval:
                    try:
                        conn.send(beat)
                    except ConnectionClosed:
                        pass

    def _watchdog(self) -> None:
        while not self._stop.wait(0.05):
            if self._deletes:
                self._pool.submit(self._send_deletes)
            now = time.monotonic()
            expired = []
            with self._deadline_lock:
                while self._deadlines and self._deadlines[0][0] <= now:
                    expired.append(heapq.heappop(self._deadlines)[1])
            for msg_id in expired:
                p = self._pending.pop(msg_id, None)
                if p is not None:
                    p.callback(None, RPCTimeoutError(self._timeout_message(p)))

    # --- replying -----------------------------------------------------------------

    def _reply_error(self, reply: Optional[m.Message], src: int) -> BaseException:
        if not isinstance(reply, m.ExceptionReply):
            return ProtocolError(f"unexpected reply {type(reply).__name__} from worker {src}")
        where = f"On {self.workers[src]!r}:\n{reply.traceback}"
        exc: Any = None
        if reply.payload.data:
            try:
                exc = serialization.loads(reply.payload)
            except BaseException:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(f"{reply.type_name}: {reply.message}\n{where}", reply.type_name, reply.traceback)
        else:
            exc.add_note(where)
        exc.remote_traceback = reply.traceback
        return exc

    def _holds_reading(self, peer: int) -> bool:
        """Whether this thread reads ``peer``'s connection now: then its replies are deferred,
        and it flushes them before it waits for input (see :meth:`_read`)."""
        role = getattr(_tls, "role", None)
        return role is not None and role.peer == peer and role in self._busy

    def _reply(self, dest: int, msg: m.Message) -> None:
        try:
            self._send(dest, msg.encode(), self._holds_reading(dest))
        except WorkerUnavailableError as e:
            log.debug("torchrpc %s: reply to %d lost: %s", self.name, dest, e)

    def _reply_exception(self, dest: int, msg_id: int, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            payload = serialization.dumps(exc)
        except BaseException:
            payload = m.Payload(b"")
        t = type(exc)
        self._reply(dest, m.ExceptionReply(msg_id, payload, f"{t.__module__}.{t.__qualname__}", str(exc), tb))

    def _reply_value(self, dest: int, msg_id: int, value: Any, reply_cls: type = m.PythonReturn,
                     context_id: Optional[int] = None, remote_ns: int = 0) -> None:
        session = _SendSession(self.ctx, context_id, dest)
        try:
            payload = serialization.dumps(value, session)
        except BaseException as e:
            session.cancel()
            self._reply_exception(dest, msg_id, e)
            return
        reply: m.Message = reply_cls(msg_id, payload, remote_ns) if remote_ns else reply_cls(msg_id, payload)
        tag = self._autograd_tag(session, dest)
        if tag is not None:
            reply = tag.wrap(reply)
        try:
            self._send(dest, reply.encode(), self._holds_reading(dest))
        except WorkerUnavailableError as e:
            session.cancel()
            log.debug("torchrpc %s: reply to %d lost: %s", self.name, dest, e)

    def _run_user(self, func: Callable, args: tuple, kwargs: dict, done: Callable[[Any, Optional[BaseException]], None]) -> None:
        """Run a user function; ``done(value, error)`` once it (or its Future, if async) finishes."""
        try:
            result = func(*args, **kwargs)
        except BaseException as e:
            done(None, e)
            return
        if not is_async_function(func):
            done(result, None)
            return
        if not isinstance(result, torch._C.Future):  # Future.then() returns the C base class
            done(None, TypeError(f"async_execution function {func_name(func)} must return a "
                                 f"torch.futures.Future, not {type(result).__name__}"))
            return

        def finished(f: torch.futures.Future) -> None:
            try:
                value = f.wait()
            except BaseException as e:
                self._on_pool(done, None, e)
                return
            self._on_pool(done, value, None)

        result.add_done_callback(finished)

    def _handle_call(self, src: int, msg: m.PythonCall, tag: Optional[AutogradTag] = None) -> None:
        cid = tag.context_id if tag else None
        started = time.perf_counter_ns()

        def done(value: Any, error: Optional[BaseException]) -> None:
            if error is not None:
                self._reply_exception(src, msg.msg_id, error)
            else:
                ran = (time.perf_counter_ns() - started) if msg.profile else 0
                self._reply_value(src, msg.msg_id, value, context_id=cid, remote_ns=ran)

        try:
            func, args, kwargs = self._load_call(src, msg.payload, tag)
        except BaseException as e:
            done(None, e)
            return
        with use_context(cid):  # the callee runs inside the caller's context
            self._run_user(func, args, kwargs, done)

    def _load_call(self, src: int, payload: m.Payload, tag: Optional[AutogradTag]) -> tuple:
        call = self._loads(payload, src, tag)
        if not (isinstance(call, tuple) and len(call) == 3 and callable(call[0])
                and isinstance(call[1], tuple) and isinstance(call[2], dict)):
            raise ProtocolError("a call payload must be (callable, args tuple, kwargs dict)")
        return call

    def _handle_remote(self, src: int, msg: m.RemoteCall, tag: Optional[AutogradTag] = None) -> None:
        if msg.fork_id.created_on != src or msg.rref_id.created_on != src:
            self._reply_exception(src, msg.msg_id, ProtocolError("remote call ids must be created by the caller"))
            return
        owner = self.ctx.on_remote_call(msg.rref_id, msg.fork_id)

        def done(value: Any, error: Optional[BaseException]) -> None:
            if owner.done():
                error = error or ProtocolError(f"RRef {msg.rref_id} was already created")
            elif error is not None:
                owner.set_error(error)
            else:
                owner.set_value(value)
            if error is not None:
                self._reply_exception(src, msg.msg_id, error)
            else:
                self._reply(src, m.RemoteReturn(msg.msg_id, msg.rref_id, msg.fork_id))

        try:
            func, args, kwargs = self._load_call(src, msg.payload, tag)
        except BaseException as e:
            done(None, e)
            return
        with use_context(tag.context_id if tag else None):
            self._run_user(func, args, kwargs, done)

    def _handle_fetch(self, src: int, msg: m.RRefFetchCall, tag: Optional[AutogradTag] = None) -> None:
        owner = self.ctx.get_or_create_owner(msg.rref_id)
        cid = tag.context_id if tag else None
        if cid is not None:
            self.autograd.touch(cid, src)

        def ready(o: OwnerRRef) -> None:
            try:
                value = o.value(0)
            except BaseException as e:
                self._reply_exception(src, msg.msg_id, e)
                return
            self._reply_value(src, msg.msg_id, value, m.RRefFetchReturn, context_id=cid)

        owner.add_done_callback(lambda o: self._on_pool(ready, o))

    def _handle_user_delete(self, src: int, msg: m.RRefUserDelete, tag: Optional[AutogradTag] = None) -> None:
        released = self.ctx.on_user_delete(msg.rref_id, msg.fork_id)
        self._reply(src, m.RRefAck(msg.msg_id))
        del released  # the value goes here, outside any lock

    def _handle_fork_request(self, src: int, msg: m.RRefForkRequest, tag: Optional[AutogradTag] = None) -> None:
        self.ctx.on_fork_request(msg.rref_id, msg.fork_id)
        self._reply(src, m.RRefAck(msg.msg_id))

    def _handle_child_accept(self, src: int, msg: m.RRefChildAccept, tag: Optional[AutogradTag] = None) -> None:
        self.ctx.on_child_accept(msg.fork_id)
        self._reply(src, m.RRefAck(msg.msg_id))

    # --- helpers for the protocol services ---------------------------------------------

    def control(self, dest: int, msg: m.Message, lead: bool = False) -> torch.futures.Future:
        """Send a control request; a Future that completes on its ack (None) or its
        BackwardReturn (the message), or fails with the error. With ``lead``, the caller
        waits for it at once (and reads the reply itself)."""
        fut: torch.futures.Future = ReplyFuture(self, dest) if lead else torch.futures.Future()

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if error is None and not isinstance(reply, (m.RRefAck, m.BackwardReturn)):
                error = self._reply_error(reply, dest)
            if error is None:
                fut.set_result(reply if isinstance(reply, m.BackwardReturn) else None)
            else:
                fut.set_exception(error)

        try:
            self._check_open()
            self._request(dest, msg, self.rpc_timeout, type(msg).__name__, on_reply,
                          reader=WAITER if lead else CLAIM)
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def send_control(self, dest: int, msg: m.Message) -> None:
        """Send a control request from the pool without waiting (shutdown waits for its ack)."""
        self._emit(dest, msg, None)

    def reply_ack(self, dest: int, msg_id: int) -> None:
        self._reply(dest, m.RRefAck(msg_id))

    def reply(self, dest: int, msg: m.Message) -> None:
        self._reply(dest, msg)

    def reply_error(self, dest: int, msg_id: int, error: BaseException) -> None:
        self._reply_exception(dest, msg_id, error)

    # --- shutdown ---------------------------------------------------------------------

    def _wait_quiet(self, deadline: float, what: str) -> None:
        delay = 0.001
        while True:
            self._send_deletes()
            if not (self._pending or self._retrying or self.ctx.has_pending()):
                return
            if time.monotonic() > deadline:
                descs = sorted({f"{p.desc} to {self.workers[p.dest].name}" for p in list(self._pending.values())})
                raise RPCTimeoutError(f"shutdown timed out {what}: still waiting for {descs or 'RRef confirmations'}")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def shutdown(self, graceful: bool = True, timeout: float = 0) -> None:
        """Stop this worker; if graceful, first wait for every worker's outstanding work.

        Like torch, a graceful shutdown waits for every worker to arrive, however long
        that takes (``timeout`` > 0 bounds it); workers that died are skipped, so it
        cannot hang on one that is gone.
        """
        if self._closed:
            return
        try:
            if graceful:
                budget = timeout if timeout and timeout > 0 else float("inf")
                self._coordinate_shutdown(time.monotonic() + budget)
        except RuntimeError as e:
            if self.is_alive(0) or isinstance(e, RPCError):
                raise
            log.warning("torchrpc %s: rank 0, which hosts the store, is gone (%s); closing without the "
                        "others", self.name, e)
        finally:
            self._close(graceful=graceful)

    def _coordinate_shutdown(self, deadline: float) -> None:
        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        store, ranks = self._rv.store, range(self.world_size)
        self._wait_quiet(deadline, "finishing this worker's calls")
        rdzv.barrier(store, "shutdown/drained", self.rank, ranks, left(), self.is_alive)
        self._closing = True
        self._wait_quiet(deadline, "finishing RRef confirmations")
        self.ctx.delete_all_users()
        self._wait_quiet(deadline, "deleting RRefs")
        rdzv.barrier(store, "shutdown/done", self.rank, ranks, left(), self.is_alive)
        # Rank 0 hosts the store: it closes it once everyone is past using it, then
        # closes its connections. The others wait for that, since a new init_rpc on
        # the same port must not find the old store.
        if self.rank == 0:
            rdzv.barrier(store, "shutdown/exit", self.rank, ranks, max(1.0, left()), self.is_alive)
        else:
            store.set(f"barrier/shutdown/exit/{self.rank}", b"1")
        del store
        self._rv = None  # type: ignore[assignment]  # drops the store (rank 0: stops its server)
        if self.rank != 0:
            with self._conn_ready:
                self._conn_ready.wait_for(lambda: 0 not in self._conns, min(10.0, left()))

    def _close(self, graceful: bool) -> None:
        self._closing = True
        self._closed = True
        if not graceful:
            self.ctx.detach_all()
        if self._listener is not None:
            self._listener.close()
        with self._conn_ready:
            conns = list(self._conns.values())
            self._conns.clear()
            self._conn_ready.notify_all()
        self._free.clear()
        for conn in conns:
            conn.close()
        self._stop.set()
        self._monitor_wake.set()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(10)
        err = RPCError(f"RPC on worker {self.name!r} was shut down")
        for msg_id in list(self._pending):
            p = self._pending.pop(msg_id, None)
            if p is not None:
                p.callback(None, err)
        self._pool.stop()
        self._autograd_pool.stop()
        self.autograd.close()
        self._rv = None  # type: ignore[assignment]  # drops the store (rank 0: stops its server)


def _copy_payload(payload: m.Payload) -> m.Payload:
    return m.Payload(bytearray(payload.data), [bytearray(b) for b in payload.buffers])
