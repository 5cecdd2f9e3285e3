"""Distributed autograd on one worker: recording sends and recvs, backward passes, cleanup.

A backward pass runs in two phases, both over RPC (the first only when needed):

1. **Discovery** (SMART mode): from the roots, find the recvs they reach; ask
   each recv's sender which of *its* recvs that send reaches, and so on. Each
   ``BackwardDiscover`` is answered once everything below it is known, so when
   the starter's discovery returns, every worker knows exactly which of its sends
   will receive gradient in this pass.
2. **Execution**: the starter runs its local part from the roots; each recv that
   completes sends its gradients to the matching send (``PropagateGradients``),
   whose worker runs its part, and so on. A ``PropagateGradients`` is answered
   once all the work it set off has finished everywhere, so the starter's
   ``backward`` returns when the whole pass has.

Discovery matters only where gradients converge: two sends of one worker that
reach a common node must both deliver before that node runs. Contexts track
whether that can happen (``DistAutogradContext.converges``); when it cannot,
the starter skips discovery and every delivery runs on arrival, alone
(``direct`` passes: one round trip per RPC boundary instead of two).

Every message is validated; a malformed one or an unknown context, RRef, pass or
send id gets an error reply naming it, and the worker carries on.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, NamedTuple, Optional

import torch

from .. import profiling
from ..errors import RPCError
from ..futures import wait_all
from ..protocol import messages as m
from ..protocol.rref_context import RRefContext
from ..runtime.endpoint import Endpoint
from ..runtime.pool import Pool
from ..runtime.registry import HandlerRegistry, Run
from ..protocol.autograd_context import (ContextContainer, DistAutogradContext, PassState, UnknownContextError,
                                        tensor_nbytes)
from ..protocol.autograd_engine import Outcome, edge_of, walk



Returned = tuple[int, list]  # gradients going back to the requester: (its send's id, per-tensor grads)


#: A context holding this many bytes of tensors is large: a cleanup request for it is not
#: served by the connection's reader (see runtime/reader.py), freeing them takes a while;
#: and gradients delivered in it run on the autograd pool (see handle_propagate).
LARGE_CONTEXT_BYTES = 1 << 20


class PassResult(NamedTuple):
    """A finished backward pass started here: its id, whether it skipped discovery, and the
    gradients for the requester's sends that go back in the reply."""

    pass_id: int
    direct: bool
    returned: list


class DistBackwardError(RPCError):
    """A distributed backward pass failed; the message names the worker where it did."""


class DistAutograd:
    """Distributed autograd on one worker: its contexts, and the passes it takes part in.
    Talks to peers through an :class:`~torchrpc.runtime.endpoint.Endpoint`; finds the values
    of RRefs (for ``RRef.backward``) in the worker's RRef context; runs large gradient
    deliveries on ``pool`` (the autograd pool)."""

    def __init__(self, endpoint: Endpoint, rrefs: RRefContext, pool: Pool) -> None:
        self.endpoint = endpoint
        self.rrefs = rrefs
        self.pool = pool
        #: whether the last context released here held LARGE_CONTEXT_BYTES: training steps
        #: repeat their shape, and a step's gradients are not in its context before they run
        self._steps_large = False
        self.rank, self.name = endpoint.rank, endpoint.name
        self.contexts = ContextContainer(endpoint.rank)
        self._ids = itertools.count(1)
        self._pass_ids = itertools.count(1)

    def register(self, registry: HandlerRegistry) -> None:
        # a discovery round waits on other workers' rounds: the reader hands the reading on first
        registry.register(m.BackwardDiscover, self.handle_discover, Run.HAND_OFF)
        # inline, unless the context is large: then handle_propagate queues it on the autograd pool
        registry.register(m.PropagateGradients, self.handle_propagate, Run.INLINE)
        # inline, unless the context holds large tensors: then handle_cleanup hands the reading on
        registry.register(m.CleanupAutogradContext, self.handle_cleanup, Run.INLINE)
        # the pass it starts sends requests, and sending one hands the reading on
        registry.register(m.RRefBackward, self.handle_rref_backward, Run.INLINE)

    # --- recording the forward pass ---------------------------------------------------

    def record_send(self, context_id: int, peer: int, tensors: list[torch.Tensor]) -> int:
        """Record tensors that require grad leaving for ``peer``; their autograd message id."""
        ag_id = (self.rank << 48) | next(self._ids)
        self.contexts.get_or_create(context_id).add_send(ag_id, peer, tensors)
        return ag_id

    def record_recv(self, context_id: int, peer: int, ag_id: int, tensors: list[torch.Tensor],
                    converges: bool = False) -> None:
        self.contexts.get_or_create(context_id).add_recv(ag_id, peer, tensors, converges)

    def converges(self, context_id: int) -> bool:
        """Whether sends of this context may converge here or upstream (sent with every send)."""
        return self.contexts.get_or_create(context_id).converges

    def touch(self, context_id: int, peer: int) -> None:
        """A message of this context was exchanged with ``peer``: it must hear of cleanup."""
        ctx = self.contexts.get_or_create(context_id)
        with ctx.lock:
            ctx.known_workers.add(peer)

    # --- cleanup -------------------------------------------------------------------

    def release(self, context_id: int, from_peer: Optional[int] = None) -> None:
        """Drop the context here and tell every worker it touched (except ``from_peer``).

        Leaving a context sends the cleanups from this thread, at once: the peers drop their
        parts while this thread goes on to its next step (sent from the pool, they woke a
        thread that then competed with the step for the interpreter). Those forwarded for
        ``from_peer`` go with this worker's next request, or within a watchdog tick."""
        ctx = self.contexts.pop(context_id)
        if ctx is None:
            return
        self._steps_large = ctx.nbytes() >= LARGE_CONTEXT_BYTES
        if self._steps_large and from_peer is not None:
            self.endpoint.hand_off_reading()  # a reader serving a cleanup: freeing a step's tensors takes a while
        with ctx.lock:
            peers = sorted(ctx.known_workers - {from_peer, self.rank})
            ctx.clear()
        tell = self.endpoint.notify if from_peer is None else self.endpoint.notify_later
        for peer in peers:
            tell(peer, m.CleanupAutogradContext(0, context_id))

    def handle_cleanup(self, src: int, msg: m.CleanupAutogradContext, ag: Any = None) -> None:
        self.release(msg.context_id, from_peer=src)
        self.endpoint.reply_ack(src, msg.msg_id)

    # --- backward ------------------------------------------------------------------

    def backward(self, context_id: int, roots: Iterable[torch.Tensor], retain_graph: bool = False,
                 requester: Optional[int] = None) -> PassResult:
        """Run a distributed backward pass from ``roots`` (scalars) in ``context_id``; block until done.

        Started for another worker's request (``requester``), gradients for that worker's
        sends are not sent but returned, to go back in the reply (see :meth:`_apply`).
        """
        if (not isinstance(context_id, int) or isinstance(context_id, bool) or not isinstance(roots, (list, tuple))
                or not all(isinstance(r, torch.Tensor) for r in roots)):
            raise TypeError("backward(): incompatible function arguments. The following argument types are "
                            "supported: (context_id: int, roots: list[torch.Tensor], retain_graph: bool = False); "
                            f"got ({type(context_id).__name__}, {type(roots).__name__})")
        if not roots:
            raise RuntimeError("No tensors provided for gradient computation (backward needs at least one root)")
        for i, r in enumerate(roots):
            if not r.requires_grad:
                raise RuntimeError(f"requires_grad not set on root {i} of the backward pass (it has no grad_fn)")
            if r.numel() != 1:
                raise RuntimeError(f"Root {i} is not a scalar, all roots need to be scalar (shape {list(r.shape)})")
        ctx = self.contexts.get(context_id)
        for i, r in enumerate(roots):
            if r.grad_fn is None and ctx.recv_of(r) is None:  # a received tensor is a leaf here, but a valid root
                raise RuntimeError(f"Root {i} does not have a valid gradient function (a leaf tensor is not the "
                                   "output of a computation to start a backward pass from)")
        try:
            return self._run_pass(ctx, roots, bool(retain_graph), requester)
        except Exception as e:
            named = self._named(e)
            if named is e:
                raise
            raise named from e

    def _run_pass(self, ctx: DistAutogradContext, roots: list, retain_graph: bool,
                  requester: Optional[int]) -> PassResult:
        pass_id = (self.rank << 48) | next(self._pass_ids)
        edges = [edge_of(r) for r in roots]
        ones = [torch.ones_like(r) for r in roots]
        state = PassState(retain_graph=retain_graph, roots=edges)  # kept for views (graph) in both modes
        with ctx.lock:
            ctx.passes[pass_id] = state
        direct = ctx.may_skip_discovery(edges)
        if direct:
            outcome = ctx.engine({"root": edges}, retain_graph).deliver("root", ones)
        else:
            self._discover(ctx, pass_id, state, state.roots)
            with state.lock:
                state.engine = ctx.build_engine(state)
                outcome = state.engine.deliver("root", ones)
        return PassResult(pass_id, direct, self._apply(ctx, pass_id, outcome, direct, retain_graph, requester))

    def _discover(self, ctx: DistAutogradContext, pass_id: int, state: PassState, edges: list) -> None:
        """Walk from ``edges`` (under the pass lock) and discover the peers' parts; wait for them."""
        with state.lock:
            _, sinks = walk([e for e in edges if e is not None], state.walked)
            by_peer: dict[int, list[int]] = {}
            for sink in sinks:
                hit = ctx.recv_of(sink.variable)
                if hit is not None:
                    ag_id = hit[0]
                    ids = by_peer.setdefault(ctx.recvs[ag_id].peer, [])
                    if ag_id not in ids:
                        ids.append(ag_id)
        futs = [self.endpoint.control(peer, m.BackwardDiscover(0, ctx.context_id, pass_id, state.retain_graph, ids))
                for peer, ids in by_peer.items()]
        wait_all(futs)

    def handle_discover(self, src: int, msg: m.BackwardDiscover, ag: Any = None) -> None:
        try:
            ctx = self.contexts.get(msg.context_id)
            with ctx.lock:
                state = ctx.passes.get(msg.pass_id)
                if state is None:
                    state = ctx.passes[msg.pass_id] = PassState(retain_graph=msg.retain_graph)
            with state.lock:
                if state.engine is not None:
                    raise RPCError(f"backward pass {msg.pass_id} of context {msg.context_id} is already running")
                new = [i for i in msg.autograd_message_ids if i not in state.active_sends]
                edges = []
                for ag_id in new:
                    ex = ctx.sends.get(ag_id)
                    if ex is None or ex.peer != src:
                        raise RPCError(f"context {msg.context_id} has no send with autograd message id {ag_id} "
                                       f"to worker {src}")
                    edges.extend(ctx.send_edges(ag_id))
                state.active_sends.update(new)
            self._discover(ctx, msg.pass_id, state, edges)
        except BaseException as e:
            self.endpoint.reply_error(src, msg.msg_id, self._named(e))
            return
        self.endpoint.reply_ack(src, msg.msg_id)

    def handle_propagate(self, src: int, msg: m.PropagateGradients, ag: Any = None) -> None:
        """Gradients for this worker's sends: run its part of the pass, and answer once all the
        work that set off has finished everywhere.

        A small pass runs here, on the reader: no thread is woken for it (a nested chain's
        backward crosses every worker twice). A large one (``LARGE_CONTEXT_BYTES`` in the
        context and the gradients, or in the last context released here) runs on the
        autograd pool while the reader reads on: a training step's backward work then runs
        on the same thread each step, as torch runs it on its engine's thread, and its
        tensors come from one malloc arena (spread over the threads that happened to be
        reading, W5's stage workers took ~1,500 page faults per step, ~400 so)."""
        ctx = self.contexts.find(msg.context_id)
        if ctx is not None and (self._steps_large or ctx.nbytes() + sum(
                tensor_nbytes(g) for g in msg.grads if g is not None) >= LARGE_CONTEXT_BYTES):
            self.pool.submit(self._propagate, src, msg)
        else:
            self._propagate(src, msg)

    def _propagate(self, src: int, msg: m.PropagateGradients) -> None:
        try:
            ctx = self.contexts.get(msg.context_id)
            parts = self._split(ctx, src, msg.autograd_message_ids, msg.grads)
            outcome, retain_graph = self._run_deliveries(ctx, msg.pass_id, msg.direct, msg.retain_graph, parts)
            back = self._apply(ctx, msg.pass_id, outcome, msg.direct, retain_graph, requester=src)
        except BaseException as e:
            self.endpoint.reply_error(src, msg.msg_id, self._named(e))
            return
        self._reply_done(src, msg.msg_id, ctx, msg.pass_id, msg.direct, retain_graph, back)

    @staticmethod
    def _split(ctx: DistAutogradContext, src: int, ag_ids: list[int], grads: list, how: str = "sent") -> list[Returned]:
        """``grads`` for this worker's sends ``ag_ids`` to ``src`` (one per tensor of each, in
        order), split by send, each as that send's dtypes. All checked before any runs: a
        message that does not fit (an RPCError) changes nothing."""
        if len(set(ag_ids)) != len(ag_ids):
            raise RPCError(f"worker {src} delivered gradients for one send twice")
        parts, i = [], 0
        for ag_id in ag_ids:
            ex = ctx.sends.get(ag_id)
            if ex is None or ex.peer != src:
                raise RPCError(f"context {ctx.context_id} has no send with autograd message id {ag_id} "
                               f"to worker {src}")
            n = len(ex.tensors)
            mine = grads[i:i + n]
            if len(mine) != n:
                raise RPCError(f"send {ag_id} has {n} tensors but {len(mine)} gradients arrived")
            for t, g in zip(ex.tensors, mine):
                if g is not None and g.shape != t.shape:
                    raise RPCError(f"gradient of shape {list(g.shape)} for a tensor of shape {list(t.shape)}")
            parts.append((ag_id, [g if g is None or g.dtype == t.dtype else g.to(t.dtype)
                                  for t, g in zip(ex.tensors, mine)]))
            i += n
        if i != len(grads):
            raise RPCError(f"worker {src} {how} {len(grads)} gradients for sends of {i} tensors")
        return parts

    @staticmethod
    def _run_deliveries(ctx: DistAutogradContext, pass_id: int, direct: bool, retain_graph: bool,
                        parts: list[Returned]) -> tuple[Outcome, bool]:
        """Run what checked gradients for these sends make ready here, in one engine call where
        they complete the pass's sources; the outcome and the pass's retain_graph."""
        keyed = [(("send", ag_id), grads) for ag_id, grads in parts]
        profiling.mark(profiling.SEND_RPC_BACKWARD, len(parts))  # where torch's engine runs each send's node
        if direct:  # a pass without discovery: these sends' part runs now, from them alone
            with ctx.lock:
                for ag_id, _ in parts:
                    if (pass_id, ag_id) in ctx.direct_deliveries:
                        raise RPCError(f"send {ag_id} already received its gradients in backward pass {pass_id}")
                ctx.direct_deliveries.update((pass_id, ag_id) for ag_id, _ in parts)
            engine = ctx.engine({key: ctx.send_edges(key[1]) for key, _ in keyed}, retain_graph)
            return engine.deliver_many(keyed), retain_graph
        state = ctx.passes.get(pass_id)
        if state is None:
            raise RPCError(f"context {ctx.context_id} has no backward pass {pass_id} (not discovered)")
        for ag_id, _ in parts:
            if ag_id not in state.active_sends:
                raise RPCError(f"send {ag_id} is not part of backward pass {pass_id}")
        with state.lock:
            if state.engine is None:
                state.engine = ctx.build_engine(state)
            return state.engine.deliver_many(keyed), state.retain_graph

    def _apply(self, ctx: DistAutogradContext, pass_id: int, outcome: Outcome, direct: bool,
               retain_graph: bool, requester: Optional[int] = None) -> list[Returned]:
        """Accumulate leaf gradients; send finished recvs' gradients on and wait for that work.

        The gradients of all the recvs from one peer travel in one request. Those bound for
        ``requester`` (the worker whose request this work serves) are returned instead, to
        travel back in its reply: a nested request to a worker that is waiting for us anyway
        would cost a round trip. Likewise the replies to our own requests may bring
        gradients for our sends: they run here, in turn.
        """
        ctx.accumulate(outcome.leaf_grads)
        # where torch's engine runs each recv's node (which sends its gradients on)
        profiling.mark(profiling.RECV_RPC_BACKWARD, len(outcome.recvs_done))
        back: list[Returned] = []
        by_peer: dict[int, list[Returned]] = {}
        for ag_id, grads in outcome.recvs_done.items():
            peer = ctx.recvs[ag_id].peer
            if peer == requester:
                back.append((ag_id, grads))
            else:
                by_peer.setdefault(peer, []).append((ag_id, grads))
        calls = [(peer, self.endpoint.control(peer, m.PropagateGradients(
            0, ctx.context_id, pass_id, [ag_id for ag_id, _ in sends], [g for _, gs in sends for g in gs],
            direct, retain_graph), lead=len(by_peer) == 1))  # one request alone: this thread reads its reply
            for peer, sends in by_peer.items()]
        replies = wait_all([fut for _, fut in calls])
        for (peer, _), reply in zip(calls, replies):
            if reply is not None:
                back += self._take_returned(ctx, peer, reply, requester, pass_id)
        return back

    def _take_returned(self, ctx: DistAutogradContext, peer: int, reply: m.BackwardReturn,
                       requester: Optional[int], pass_id: Optional[int] = None) -> list[Returned]:
        """Run this worker's part from the gradients a reply from ``peer`` brought back."""
        if reply.context_id != ctx.context_id or (pass_id is not None and reply.pass_id != pass_id):
            raise RPCError(f"worker {peer} returned gradients of context {reply.context_id} pass {reply.pass_id} "
                           f"to a request of context {ctx.context_id} pass {pass_id}")
        parts = self._split(ctx, peer, reply.autograd_message_ids, reply.grads, "returned")
        outcome, retain_graph = self._run_deliveries(ctx, reply.pass_id, reply.direct, reply.retain_graph, parts)
        return self._apply(ctx, reply.pass_id, outcome, reply.direct, retain_graph, requester)

    def _reply_done(self, src: int, msg_id: int, ctx: DistAutogradContext, pass_id: int, direct: bool,
                    retain_graph: bool, back: list[Returned]) -> None:
        """Answer a finished request: an ack, or the gradients that go back to ``src``."""
        if not back:
            self.endpoint.reply_ack(src, msg_id)
            return
        grads = [g for _, gs in back for g in gs]
        self.endpoint.reply(src, m.BackwardReturn(msg_id, ctx.context_id, pass_id, direct, retain_graph,
                                               [ag_id for ag_id, _ in back], grads))

    def _named(self, e: BaseException) -> BaseException:
        if isinstance(e, (DistBackwardError, UnknownContextError)):
            return e
        err = DistBackwardError(f"Error on Node {self.rank}: {e} ({type(e).__name__}; the distributed backward "
                                f"failed on worker {self.name!r})")
        err.__cause__ = e
        return err

    def rref_backward(self, rref_id: m.GloballyUniqueId, value: Any, context_id: int, retain_graph: bool,
                      requester: Optional[int] = None) -> PassResult:
        """On the owner: backward from an RRef's value, locally (-1) or in a context (see :meth:`backward`)."""
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"RRef should contain a tensor for .backward(); RRef {rref_id} holds "
                               f"{type(value).__name__}")
        if not value.requires_grad:
            raise RuntimeError(f"element 0 of tensors does not require grad and does not have a grad_fn (the value "
                               f"of RRef {rref_id})")
        if value.numel() != 1:
            raise RuntimeError(f"grad can be implicitly created only for scalar outputs; RRef {rref_id} holds a "
                               f"tensor of shape {list(value.shape)}")
        if context_id == -1:
            value.backward(retain_graph=retain_graph)
            return PassResult(0, True, [])
        return self.backward(context_id, [value], retain_graph, requester)

    def remote_rref_backward(self, owner: int, rref_id: m.GloballyUniqueId, context_id: int,
                             retain_graph: bool) -> None:
        """From a user of an RRef: ask its owner to run backward from its value, and run this
        worker's part from the gradients that come back in the reply."""
        reply = self.endpoint.control(owner, m.RRefBackward(0, rref_id, context_id, retain_graph), lead=True).wait()
        if reply is not None:
            try:
                self._take_returned(self.contexts.get(context_id), owner, reply, requester=None)
            except BaseException as e:
                raise self._named(e) from None

    def handle_rref_backward(self, src: int, msg: m.RRefBackward, ag: Any = None) -> None:
        try:
            if msg.context_id < 0:
                raise RPCError("RRef.backward with context id -1 (a local backward) can only run on the "
                               "owner; give a distributed autograd context id")
            owner = self.rrefs.owners.get(msg.rref_id)
            if owner is None:
                raise RPCError(f"worker {self.name!r} owns no RRef with id {msg.rref_id}")
            ctx = self.contexts.get(msg.context_id)
            if not owner.done():  # the caller waits for creation first, so this id is not a real RRef
                raise RPCError(f"RRef {msg.rref_id} on worker {self.name!r} has no value (it was never created)")
            done = self.rref_backward(msg.rref_id, owner.value(), msg.context_id, msg.retain_graph, requester=src)
        except BaseException as e:
            self.endpoint.reply_error(src, msg.msg_id, self._named(e))
            return
        self._reply_done(src, msg.msg_id, ctx, done.pass_id, done.direct, msg.retain_graph, done.returned)

    # --- views -------------------------------------------------------------------

    def get_gradients(self, context_id: int) -> dict[torch.Tensor, torch.Tensor]:
        ctx = self.contexts.get(context_id)
        with ctx.lock:
            return dict(ctx.grads)

    def close(self) -> None:
        for cid in self.contexts.ids():
            ctx = self.contexts.pop(cid)
            if ctx is not None:
                ctx.clear()

