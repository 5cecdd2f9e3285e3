"""Distributed autograd contexts: what one worker recorded for each context id.

A context holds the *sends* (tensors that required grad and left this worker in
a message, keyed by that message's autograd message id) and *recvs* (tensors
that arrived that way), the gradients accumulated for this worker's leaves, the
workers it exchanged such messages with (for cleanup), and the state of its
backward passes. Plain objects: no I/O.
"""
from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import RPCError
from .autograd_engine import Edge, LocalBackward, add_grads, edge_of, walk

_tls = threading.local()


def current_context_id() -> Optional[int]:
    """The context id of ``with torchrpc.autograd.context()`` on this thread, if any."""
    return getattr(_tls, "context_id", None)


class use_context:
    """Make ``context_id`` current on this thread for a block (None: no context)."""

    def __init__(self, context_id: Optional[int]) -> None:
        self.context_id = context_id

    def __enter__(self) -> Optional[int]:
        self._prev = getattr(_tls, "context_id", None)
        _tls.context_id = self.context_id
        return self.context_id

    def __exit__(self, *exc: Any) -> None:
        _tls.context_id = self._prev


class UnknownContextError(RPCError, KeyError):
    """No distributed autograd context with that id exists on this worker."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown context"


@dataclass
class Exchange:
    """The tensors of one message that required grad, and the worker at the other end.

    For a send, ``edges`` are the tensors' gradient edges taken when it was sent: an
    in-place change to a tensor after sending it must not move its edge.
    """

    peer: int
    tensors: list[torch.Tensor]
    edges: Optional[list[Edge]] = None


@dataclass
class PassState:
    """One worker's state in one backward pass."""

    retain_graph: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: sends that this pass reaches (found by discovery); each gets exactly one delivery
    active_sends: set[int] = field(default_factory=set)
    #: autograd node ids already walked by discovery
    walked: set[int] = field(default_factory=set)
    roots: Optional[list[Edge]] = None
    engine: Optional[LocalBackward] = None


class DistAutogradContext:
    """Everything one worker holds for one context id.

    ``converges`` is True once two of this worker's sends reach a common autograd
    node (other than the leaf of a tensor of its own, whose gradients simply add
    up), or once a recv arrives from a worker where that holds. It travels on
    every send, so it flows forward along the data: if a backward pass could reach
    two converging sends anywhere, the worker that starts it has the flag too.
    Without it (and with no root converging with a send there), the starter skips
    discovery and each send's gradient runs on arrival (:meth:`may_skip_discovery`).
    """

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        self.lock = threading.RLock()
        self.sends: dict[int, Exchange] = {}
        self.recvs: dict[int, Exchange] = {}
        self._recv_index: dict[int, tuple[int, int]] = {}
        self.grads: dict[torch.Tensor, torch.Tensor] = {}
        self.known_workers: set[int] = set()
        self.passes: dict[int, PassState] = {}
        self.converges = False
        #: ids of the nodes this worker's sends reach (see :meth:`reach`), while no two overlap
        self._send_reach: set[int] = set()
        #: (pass id, send id) of the deliveries of passes that skipped discovery
        self.direct_deliveries: set[tuple[int, int]] = set()
        #: bytes of the tensors sent and received, counted once each as they are recorded
        self._exchanged_nbytes = 0

    def add_send(self, autograd_message_id: int, peer: int, tensors: list[torch.Tensor]) -> None:
        with self.lock:
            edges = [edge_of(t) for t in tensors]
            self.sends[autograd_message_id] = Exchange(peer, tensors, edges)
            self._exchanged_nbytes += sum(tensor_nbytes(t) for t in tensors)
            self.known_workers.add(peer)
            if not self.converges:
                # the sends so far reach disjoint sets of nodes, so each node is walked once
                # in the whole forward pass: a send costs the size of its own new subgraph
                new = self.reach(edges)
                if new.isdisjoint(self._send_reach):
                    self._send_reach |= new
                else:
                    self.converges = True
                    self._send_reach = set()

    def add_recv(self, autograd_message_id: int, peer: int, tensors: list[torch.Tensor],
                 converges: bool = False) -> None:
        with self.lock:
            self.recvs[autograd_message_id] = Exchange(peer, tensors)
            self._exchanged_nbytes += sum(tensor_nbytes(t) for t in tensors)
            self.known_workers.add(peer)
            self.converges = self.converges or converges
            for i, t in enumerate(tensors):
                self._recv_index[id(t)] = (autograd_message_id, i)

    def reach(self, edges: list[Optional[Edge]]) -> frozenset[int]:
        """Ids of the autograd nodes a gradient into ``edges`` runs, with the recvs it reaches.

        Leaves of this worker's own tensors are left out: gradients that reach one by
        two ways add up in the context whichever way they come."""
        inner, sinks = walk([e for e in edges if e is not None])
        return frozenset([id(n) for n in inner] + [id(s) for s in sinks if self.recv_of(s.variable) is not None])

    def may_skip_discovery(self, roots: list[Optional[Edge]]) -> bool:
        """Whether a pass from ``roots`` started here can run each gradient on arrival.

        It can when no sends converge (here or upstream, see the class) and the
        roots reach no node that a send of this worker reaches (``x + f(x)``)."""
        with self.lock:
            if self.converges:
                return False
            return not self.sends or self.reach(roots).isdisjoint(self._send_reach)

    def recv_of(self, t: torch.Tensor) -> Optional[tuple[int, int]]:
        hit = self._recv_index.get(id(t))
        if hit is None:
            return None
        ag_id, i = hit
        ex = self.recvs.get(ag_id)
        return hit if ex is not None and ex.tensors[i] is t else None

    def send_edges(self, autograd_message_id: int) -> list[Optional[Edge]]:
        """The gradient edges of a send's tensors, taken when it was sent (not to be changed)."""
        ex = self.sends.get(autograd_message_id)
        if ex is None:
            raise RPCError(f"distributed autograd context {self.context_id} has no send with autograd "
                           f"message id {autograd_message_id}")
        return ex.edges or []

    def accumulate(self, grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add one step's leaf gradients, as AccumulateGrad would: a gradient is kept as it is
        only if it is contiguous and no other leaf's gradient shares its memory; else a copy."""
        if not grads:
            return
        ptrs = collections.Counter(_memory_of(g) for _, g in grads)
        with self.lock:
            for tensor, grad in grads:
                prev = self.grads.get(tensor)
                if prev is not None:
                    self.grads[tensor] = add_grads(prev, grad)
                elif grad.layout is not torch.strided:
                    self.grads[tensor] = grad.clone() if ptrs[_memory_of(grad)] > 1 else grad
                elif ptrs[_memory_of(grad)] > 1 or not grad.is_contiguous():
                    self.grads[tensor] = grad.clone(memory_format=torch.contiguous_format)
                else:
                    self.grads[tensor] = grad

    def build_engine(self, state: PassState) -> LocalBackward:
        """The pass's local engine, from its roots (if any) and the sends discovery found."""
        sources: dict[Any, list[Optional[Edge]]] = {}
        if state.roots is not None:
            sources["root"] = list(state.roots)
        for ag_id in sorted(state.active_sends):
            sources[("send", ag_id)] = self.send_edges(ag_id)
        return self.engine(sources, state.retain_graph)

    def engine(self, sources: dict[Any, list[Optional[Edge]]], retain_graph: bool) -> LocalBackward:
        """A local engine fed by ``sources`` (key -> edges); recvs are this context's."""
        return LocalBackward(sources, self.recv_of, self.recv_size, retain_graph)

    def recv_size(self, autograd_message_id: int) -> int:
        """How many tensors recv ``autograd_message_id`` holds."""
        return len(self.recvs[autograd_message_id].tensors)

    def nbytes(self) -> int:
        """Bytes of the tensors held: accumulated gradients and the tensors sent and received."""
        with self.lock:
            grads, exchanged = list(self.grads.values()), self._exchanged_nbytes
        return exchanged + sum(tensor_nbytes(g) for g in grads)

    def clear(self) -> None:
        with self.lock:
            self.sends.clear()
            self.recvs.clear()
            self._recv_index.clear()
            self.grads.clear()
            self.passes.clear()
            self._send_reach.clear()
            self.direct_deliveries.clear()
            self._exchanged_nbytes = 0


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a sparse one, those of its indices and values."""
    if t.layout is torch.sparse_coo:
        return tensor_nbytes(t._indices()) + tensor_nbytes(t._values())
    return t.numel() * t.element_size()


def _memory_of(t: torch.Tensor) -> Any:
    """What tells two tensors' memory apart: the data pointer of a dense tensor, the object of
    any other (a sparse tensor has none)."""
    return t.data_ptr() if t.layout is torch.strided else id(t)


class ContextContainer:
    """This worker's contexts, by id. Ids are unique across workers: (worker id << 48) | counter."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._contexts: dict[int, DistAutogradContext] = {}

    def new_id(self) -> int:
        return (self.worker_id << 48) | next(self._ids)

    def create(self) -> DistAutogradContext:
        ctx = DistAutogradContext(self.new_id())
        with self._lock:
            self._contexts[ctx.context_id] = ctx
        return ctx

    def get(self, context_id: int) -> DistAutogradContext:
        ctx = self._contexts.get(context_id)
        if ctx is None:
            raise UnknownContextError(f"Could not find autograd context with id: {context_id} (no distributed "
                                      "autograd context with that id on this worker)")
        return ctx

    def find(self, context_id: int) -> Optional[DistAutogradContext]:
        return self._contexts.get(context_id)

    def get_or_create(self, context_id: int) -> DistAutogradContext:
        with self._lock:
            ctx = self._contexts.get(context_id)
            if ctx is None:
                ctx = self._contexts[context_id] = DistAutogradContext(context_id)
            return ctx

    def pop(self, context_id: int) -> Optional[DistAutogradContext]:
        with self._lock:
            return self._contexts.pop(context_id, None)

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._contexts)
