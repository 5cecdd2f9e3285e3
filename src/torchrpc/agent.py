"""The per-process agent: wires the runtime's parts and the services, and runs start-up and shutdown.

The parts, each in its own module:

* ``runtime/peers.py``: the job's workers, a connection per peer, liveness;
* ``runtime/pending.py``: requests waiting for replies, with their deadlines;
* ``runtime/registry.py``: each request type's handler and how it runs;
* ``runtime/reader.py`` and ``runtime/lease.py``: who reads each connection;
* ``runtime/endpoint.py``: what services use to talk to peers;
* ``runtime/watchdog.py``, ``runtime/heartbeat.py``, ``runtime/pool.py``, ``runtime/faults.py``;
* ``services/calls.py``, ``services/rrefs.py``, ``services/autograd.py``: the handlers;
* ``services/membership.py`` (with ``group.py``): joining and leaving a dynamic group.

Threads: the pool (user functions and handlers; readers are pool threads), the autograd
pool (gradient deliveries), the heartbeat thread, the watchdog, the reader monitor, and
an acceptor that takes the connections of higher-ranked workers during start-up (in a
dynamic group: of the members that join later).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

import torch

from . import job_secret
from . import rendezvous as rdzv
from .group import MAX_RANK, GroupRecord
from .services.autograd import DistAutograd
from .errors import ProtocolError, RPCError, RPCTimeoutError, WorkerUnavailableError
from .options import RpcBackendOptions
from .protocol import messages as m
from .protocol.rref_context import RRefContext, UserRRef
from .runtime.endpoint import Endpoint
from .runtime.faults import Faults
from .runtime.heartbeat import Heartbeats
from .runtime.peers import PeerTable
from .runtime.pending import Pending, PendingTable
from .runtime.pool import Pool
from .runtime.reader import Readers
from .runtime.registry import HandlerRegistry
from .runtime.watchdog import Watchdog
from .services.calls import CallService
from .services.membership import Membership
from .services.payloads import Payloads
from .services.rrefs import Outbox, RRefService
from .transport import Connection, ConnectionClosed, connect, listen
from .transport.loopback import LoopbackConnection
from .transport.tls import TLSConfig
from .worker_info import WorkerInfo

log = logging.getLogger("torchrpc")


class _Relayed(Exception):
    """The worker that answered proved it listens at ``address``, not where we connected."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


class Agent:
    """One worker's RPC machinery. Create with :meth:`start`; end with :meth:`shutdown`."""

    def __init__(self, name: str, rank: int, world_size: Optional[int], options: RpcBackendOptions,
                 rv: rdzv.Rendezvous, secret_source: Optional[job_secret.SecretSource] = None):
        self.name = name
        self.rank = rank
        self.world_size = world_size  # None: a dynamic group
        self.dynamic = world_size is None
        self.membership: Optional[Membership] = None  # a dynamic group's, made at start
        self.options = options
        self.rpc_timeout = options.rpc_timeout
        self._rv = rv
        self._closing = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: Any = None
        self._secret_source = secret_source or job_secret.choose(options, rv.master_host)
        self._identity = b""
        faults = getattr(options, "_faults", None)
        self._faults = Faults(faults) if faults else None

        # the runtime
        self.peers = PeerTable(rank, name)
        self.pending = PendingTable()
        self.registry = HandlerRegistry()
        self._pool = Pool(options.num_worker_threads, f"torchrpc-{name}")
        self._autograd_pool = Pool(1, f"torchrpc-{name}-autograd")
        self.readers = Readers(name, self.peers, self.pending, self.registry, self._pool,
                               reply_error=lambda *a: self.endpoint.reply_error(*a), closing=lambda: self._closing)
        self.endpoint = Endpoint(name, rank, self.rpc_timeout, self.peers, self.pending, self.readers, self._pool)
        self.heartbeats = Heartbeats(self.peers, self.peers.lost)
        self.watchdog = Watchdog(self.pending, self._timeout_message)
        self.watchdog.add_chore(self.endpoint.chore)
        self.peers.on_lost(self._on_lost)

        # the services
        self.ctx = RRefContext(rank, Outbox(self.endpoint))
        self.autograd = DistAutograd(self.endpoint, self.ctx, self._autograd_pool)
        payloads = Payloads(self.endpoint, self.ctx, self.autograd, world_size or MAX_RANK)
        self.calls = CallService(self.endpoint, payloads, self.ctx, self._pool)
        self.rrefs = RRefService(self.endpoint, self.ctx, payloads, self.autograd, self._pool)
        for service in (self.calls, self.rrefs, self.autograd):
            service.register(self.registry)

    # --- start-up ------------------------------------------------------------------

    def start(self) -> None:
        """Listen, publish our address, learn everyone's, and connect to every peer (in a dynamic
        group: join it, connecting to every member)."""
        timeout = self.options.startup_timeout
        try:
            secret = self._secret_source.obtain(self._rv.store, self.rank)
            opts = self.options
            tls = (TLSConfig(opts.tls_certfile, opts.tls_keyfile, opts.tls_cafile)
                   if getattr(opts, "tls_certfile", None) else None)
            extra = {"tls": tls} if tls else {}
            self._listener = listen(f"{'tls' if tls else 'tcp'}://{rdzv.listen_host(self._rv.master_host)}:0",
                                    secret, **extra)
            # who we are, as every handshake proves it: a relay cannot present us as anyone else
            self._identity = self._listener.identity = m.Hello(0, self.rank, self.name,
                                                               self._listener.address).identity()
            self._add_connection(self.rank, LoopbackConnection(self.name))
            if self.dynamic:
                self.peers.dynamic = True
                self.membership = Membership(self.endpoint, GroupRecord(self._rv.store, self.rank, self.name),
                                             self._listener.address, timeout)
                self.membership.register(self.registry)
            self._spawn(self.watchdog.run, "watchdog", self._stop)
            self._spawn(self.readers.monitor, "monitor", self._stop)
            self.readers.start_watching()
            self._spawn(self.heartbeats.run, "heartbeat", self._stop)
            self._spawn(self._accept_loop, "acceptor")
            if self.membership is not None:
                # rank 0 keeps the private secret file until it shuts down: later members need it
                self.membership.join(lambda peer, info, t: self._connect_to(peer, info, t, secret, extra),
                                     self._add_connection, time.monotonic() + timeout)
                return
            rdzv.publish(self._rv.store, self.rank, {"name": self.name, "address": self._listener.address})
            infos = rdzv.gather(self._rv.store, self.world_size, timeout)
            self.peers.set_workers([i["name"] for i in infos])
            for peer in range(self.rank):
                self._add_connection(peer, self._connect_to(peer, infos[peer], timeout, secret, extra))
            self.peers.wait_connected(timeout)
            # Start-up ends with a barrier, as torch's does: no worker returns before every worker
            # has all its connections, so one that finishes its work and leaves at once cannot
            # leave another waiting for a connection that will never come.
            gone = rdzv.barrier(self._rv.store, "init/connected", self.rank, range(self.world_size), timeout,
                                self.is_alive)
            if gone:
                raise RPCError(f"worker(s) {[self.peers.name_of(r) for r in gone]} lost during start-up")
            # rank 0 hosts the store: it returns last, once no worker polls the barrier any more
            # (one that shuts down at once must not take the store from under the others)
            if self.rank == 0:
                rdzv.barrier(self._rv.store, "init/done", 0, range(self.world_size), timeout, self.is_alive)
            else:
                self._rv.store.set(f"barrier/init/done/{self.rank}", b"1")
            self._secret_source.forget()  # everyone has it now
        except BaseException:
            self._close(graceful=False)
            raise

    def _spawn(self, target: Callable, what: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=f"torchrpc-{self.name}-{what}", daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _connect_to(self, peer: int, info: dict, timeout: float, secret: Optional[bytes], extra: dict) -> Connection:
        """Connect to ``peer`` at the address the store gave. If the worker that answers proves
        (in the handshake, with the secret or inside TLS) that it is ``peer`` but listens
        elsewhere, something between us relays (the store's address was rewritten): connect
        to the proven address instead."""
        address, name = info["address"], info["name"]

        def expect(identity: bytes) -> None:
            hello = m.Hello.from_identity(identity)
            if hello.worker_id != peer or hello.name != name:
                raise ProtocolError(f"the worker at {address} is {hello.name!r} (id {hello.worker_id}), not {name!r} "
                                    f"(id {peer}): the rendezvous store's address is wrong")
            if hello.address != address:
                raise _Relayed(hello.address)

        try:
            try:
                return connect(address, timeout, secret, identity=self._identity, check_peer=expect, **extra)
            except _Relayed as r:
                if secret is None and not extra:
                    raise ProtocolError(f"worker {name!r} claims to listen at {r.address}, not at {address}; "
                                        "without a secret or TLS that claim proves nothing") from None
                log.warning("torchrpc %s: the store gives %s as worker %r's address, but that worker proved it "
                            "listens at %s: something relays between (was the store rewritten?); connecting to "
                            "the proven address", self.name, address, name, r.address)
                address = r.address
                return connect(address, timeout, secret, identity=self._identity, check_peer=expect, **extra)
        except ConnectionClosed as e:
            raise RPCError(f"cannot connect to worker {name!r}: {e}") from e
        except _Relayed as r:
            raise RPCError(f"worker {name!r} answered at {address} but claims {r.address}") from None

    def _accept_loop(self) -> None:
        """Take the connections of higher-ranked workers, each as the worker its handshake proved."""
        while True:
            try:
                conn = self._listener.accept()
            except ConnectionClosed:
                return
            try:
                hello = m.Hello.from_identity(conn.peer_identity)
                peer = self.membership.admit(hello) if self.membership is not None else self._admit(hello)
            except Exception as e:  # whatever the first frame was, the acceptor carries on
                log.warning("torchrpc %s: rejected connection from %s: %s", self.name, conn.peer, e)
                conn.close()
                continue
            self._add_connection(peer, conn)

    def _admit(self, hello: m.Hello) -> int:
        """A static job's check of an incoming connection: a higher rank, by its published name."""
        peer = hello.worker_id
        self.peers.wait_workers(60)  # the mesh is only built after every address is known
        workers = self.peers.workers
        if not (self.rank < peer < len(workers)) or workers[peer].name != hello.name:
            raise ProtocolError(f"unexpected HELLO from {hello.name!r} claiming id {peer}")
        if peer in self.peers.conns:
            raise ProtocolError(f"worker {hello.name!r} is already connected")
        return peer

    def _add_connection(self, peer: int, conn: Connection) -> None:
        if self._faults is not None and peer != self.rank:
            conn = self._faults.wrap(conn)
        self.peers.add(peer, conn)
        self.readers.start(peer, conn)

    def _on_lost(self, peer: int, err: WorkerUnavailableError) -> None:
        left = self.peers.has_left(peer)  # a member that left a dynamic group: no failure
        if not self._closing and not left:
            log.warning("torchrpc %s: lost worker %r: %s", self.name, self.peers.name_of(peer), self.peers.dead[peer])
        self.ctx.forget_worker(peer, err)
        if self.membership is not None:
            self.ctx.forget_owner(peer)  # its rank may come back: no delete may reach the new member
            if not left and not self._closing:
                self._pool.submit(self.membership.lost, peer)
        self.endpoint.fail_peer(peer, err)

    def _timeout_message(self, p: Pending) -> str:
        return self.endpoint.timeout_message(p, self.heartbeats.last_heard, time.monotonic())

    # --- what the public API calls ---------------------------------------------------

    @property
    def info(self) -> WorkerInfo:
        return self.peers.me

    @property
    def workers(self) -> list[WorkerInfo]:
        return self.peers.workers

    @property
    def _closed(self) -> bool:
        return self.endpoint.closed

    def worker_info(self, to: Any = None) -> WorkerInfo:
        """Resolve a worker name, id or WorkerInfo (None: this worker)."""
        return self.peers.resolve(to)

    def call(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> torch.futures.Future:
        return self.calls.call(to, func, args, kwargs, timeout)

    def call_sync(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> Any:
        return self.calls.call_sync(to, func, args, kwargs, timeout)

    def remote(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> tuple[Any, torch.futures.Future]:
        return self.calls.remote(to, func, args, kwargs, timeout)

    def fetch(self, user: UserRRef, timeout: float, created: Optional[torch.futures.Future] = None) -> torch.futures.Future:
        return self.rrefs.fetch(user, timeout, created)

    def control(self, dest: int, msg: m.Message, lead: bool = False) -> torch.futures.Future:
        return self.endpoint.control(dest, msg, lead)

    def is_alive(self, peer: int) -> bool:
        return self.peers.is_alive(peer)

    def stats(self, peer: int) -> dict[str, int]:
        return self.peers.stats(peer)

    def debug_info(self) -> dict[str, Any]:
        """A snapshot for people: pending calls, RRefs, autograd contexts and traffic, per peer."""
        pending: dict[str, list[str]] = {}
        for dest, desc in self.pending.descriptions():
            pending.setdefault(self.peers.name_of(dest), []).append(desc)
        return {
            "worker": self.name,
            "rank": self.rank,
            "pending_calls": {k: sorted(v) for k, v in sorted(pending.items())},
            "rrefs": self.ctx.debug_info(),
            "autograd_contexts": sorted(self.autograd.contexts.ids()),
            "peers": {w.name: {**self.stats(w.id), "alive": self.is_alive(w.id),
                               "shared_memory": bool(getattr(self.peers.conns.get(w.id), "uses_shm", False))}
                      for w in self.workers if w.id != self.rank},
            "pool_threads": len(self._pool.threads),
        }

    # --- shutdown ---------------------------------------------------------------------

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
                if self.membership is not None:
                    self._leave_group(time.monotonic() + budget)
                else:
                    self._coordinate_shutdown(time.monotonic() + budget)
        except RuntimeError as e:
            if self.is_alive(0) or isinstance(e, RPCError):
                raise
            log.warning("torchrpc %s: rank 0, which hosts the store, is gone (%s); closing without the "
                        "others", self.name, e)
        finally:
            self._close(graceful=graceful)

    def _wait_quiet(self, deadline: float, what: str) -> None:
        delay = 0.001
        while True:
            self.endpoint.send_later()
            if not (self.endpoint.busy() or self.ctx.has_pending()):
                return
            if time.monotonic() > deadline:
                descs = sorted({f"{desc} to {self.peers.name_of(dest)}" for dest, desc in self.pending.descriptions()})
                raise RPCTimeoutError(f"shutdown timed out {what}: still waiting for {descs or 'RRef confirmations'}")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _coordinate_shutdown(self, deadline: float) -> None:
        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        store, ranks = self._rv.store, range(self.world_size)
        self._wait_quiet(deadline, "finishing this worker's calls")
        rdzv.barrier(store, "shutdown/drained", self.rank, ranks, left(), self.is_alive)
        self._begin_closing()
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
            self.peers.wait_gone(0, min(10.0, left()))

    def _leave_group(self, deadline: float) -> None:
        """A dynamic group's graceful shutdown: leave it (rank 0, which hosts the store: once
        every other member has left), as ``services/membership.py`` says."""
        def finish() -> None:  # every member knows we leave and sends us nothing new
            self._begin_closing()
            self._wait_quiet(deadline, "finishing RRef confirmations")
            self.ctx.delete_all_users()
            self._wait_quiet(deadline, "deleting RRefs")

        assert self.membership is not None
        self._wait_quiet(deadline, "finishing this worker's calls")
        if self.rank == 0:
            self.membership.close_group(deadline, finish)
        else:
            self.membership.leave(deadline, finish)
        self.membership.record.store = None  # type: ignore[assignment]
        self._rv = None  # type: ignore[assignment]  # drops the store (rank 0: stops its server)

    def _begin_closing(self) -> None:
        """From here on, silence and lost connections are expected: no warnings, no free readings."""
        self._closing = True
        self.heartbeats.quiet = True

    def _close(self, graceful: bool) -> None:
        self._begin_closing()
        self.endpoint.closed = True
        if not graceful:
            self.ctx.detach_all()
        if self._listener is not None:
            self._listener.close()
        self._secret_source.forget()
        for conn in self.peers.close():
            conn.close()
        self._stop.set()
        self.readers.stop()  # forgets free readings; wakes the monitor to see the stop
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(10)
        self.endpoint.fail_all(RPCError(f"RPC on worker {self.name!r} was shut down"))
        self._pool.stop()
        self._autograd_pool.stop()
        self.readers.close()
        self.autograd.close()
        if self.membership is not None:
            self.membership.record.store = None  # type: ignore[assignment]
        self._rv = None  # type: ignore[assignment]  # drops the store (rank 0: stops its server)
