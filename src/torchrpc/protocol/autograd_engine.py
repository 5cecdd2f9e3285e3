"""One worker's part of a distributed backward pass, run in torch's own engine.

The local autograd graph of a context is cut at its RPC boundaries:

* **sources** feed gradient in: the roots of the pass (on the worker that started
  it) and the *sends* (tensors this worker sent; their gradients come back from
  the peer that received them);
* **sinks** take gradient out: leaves (accumulated into the context) and *recvs*
  (tensors this worker received; their gradients go back to the sender).

SMART mode (PyTorch's design note): before anything runs, the pass learns which
sends will receive gradient at all, so a node waits only for sources that will
deliver; RPC outputs that the loss does not use are never waited for.

Sources deliver at different times, and a node reachable from several sources
must run once, after all of them. So nodes run one at a time, each in a
``torch.autograd.grad`` call that starts at the node's output edges and stops
at its next edges (``GradientEdge``), as soon as every edge into it has
delivered. Once every source has delivered, whatever remains runs in one
engine call. Leaf edges are captured, never executed, so ``.grad`` is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional

import torch
from torch.autograd.graph import GradientEdge

Edge = tuple[Any, int]  # (autograd node, output number)

try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - torch before 2.3
    _engine_run_backward = None


def engine_grad(outputs: list[GradientEdge], inputs: list[GradientEdge], grads: list[torch.Tensor],
                retain_graph: bool) -> tuple:
    """``torch.autograd.grad(outputs, inputs, grads, retain_graph, allow_unused=True)``, without the
    Python-side checks of ``grads`` (they fit by construction here): on first use those import
    sympy, 0.3-0.7 s in the first distributed backward of a process. Unreached inputs get None."""
    if _engine_run_backward is None:
        return torch.autograd.grad(outputs, inputs, grads, retain_graph=retain_graph, allow_unused=True,
                                   materialize_grads=False)
    return _engine_run_backward(tuple(outputs), tuple(grads), retain_graph, False, tuple(inputs), True,
                                accumulate_grad=False)


_NO_INDEX = torch.empty(0, dtype=torch.long)


def edge_of(t: torch.Tensor) -> Edge:
    """The gradient edge of ``t``: its grad_fn's output, or a leaf's gradient accumulator."""
    fn = t.grad_fn
    if fn is not None:  # what get_gradient_edge gives, without its checks (a send's hops pay each)
        return (fn, t.output_nr)
    if t.layout is not torch.strided and t.requires_grad:
        # torch finds a leaf's accumulator through view_as, which sparse tensors lack:
        # any op on the leaf names it (an empty index_select costs nothing at any nnz)
        with torch.enable_grad():
            out = t.index_select(0, _NO_INDEX) if t.dim() else t.clone()
        return (out.grad_fn.next_functions[0][0], 0)
    e = torch.autograd.graph.get_gradient_edge(t)
    return (e.node, e.output_nr)


def is_sink(node: Any) -> bool:
    return type(node).__name__ == "AccumulateGrad"


def walk(edges: Iterable[Edge], seen: Optional[set[int]] = None) -> tuple[list[Any], list[Any]]:
    """Nodes reachable from ``edges``: (inner nodes, sink nodes), skipping ids in ``seen``."""
    seen = set() if seen is None else seen
    stack = [n for n, _ in edges if n is not None]
    inner: list[Any] = []
    sinks: list[Any] = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if is_sink(node):
            sinks.append(node)
            continue
        inner.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return inner, sinks


@dataclass
class Outcome:
    """What a delivery produced: leaf gradients and finished recvs (key -> per-tensor grads)."""

    leaf_grads: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    recvs_done: dict[Hashable, list[Optional[torch.Tensor]]] = field(default_factory=dict)


def _tensor_hooks(t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` through the hooks registered on leaf ``t`` (``t.register_hook``), in order, as the
    engine runs them on a gradient it captures."""
    hooks = getattr(t, "_backward_hooks", None)
    for hook in list(hooks.values()) if hooks else ():
        changed = hook(grad)
        if changed is not None:
            grad = changed
    return grad


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return add_grads(a, b)


def add_grads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` for gradients of any layouts: torch adds a sparse tensor to a dense one but
    not the other way round, so a sparse ``a`` and a dense ``b`` add as ``b + a`` (dense)."""
    if a.layout is not torch.strided and b.layout is torch.strided:
        return b + a
    return a + b


class LocalBackward:
    """Runs this worker's share of one pass; feed it with :meth:`deliver`.

    Args:
        sources: key -> the edges of that source's tensors (None for a tensor that
            needs no gradient). Every key must be delivered exactly once.
        recv_of: maps a leaf tensor to ``(recv key, index)`` if it is a received
            tensor, else None.
        recv_size: recv key -> number of tensors in that recv.
        retain_graph: keep the graph's buffers for another pass.
    """

    def __init__(
        self,
        sources: dict[Hashable, list[Optional[Edge]]],
        recv_of: Callable[[torch.Tensor], Optional[tuple[Hashable, int]]],
        recv_size: Callable[[Hashable], int],
        retain_graph: bool,
    ) -> None:
        self.sources = sources
        self.retain_graph = retain_graph
        self._recv_of = recv_of
        self._undelivered = set(sources)
        self._incoming: set[int] = set()  # ids of the delivered gradients (see _finish_sink)
        self._nodes: dict[int, Any] = {}
        self._deps: dict[int, int] = {}
        self._buffers: dict[int, dict[int, torch.Tensor]] = {}
        self._done: set[int] = set()
        inner, sinks = walk([e for edges in sources.values() for e in edges if e is not None])
        for node in inner + sinks:
            self._nodes[id(node)] = node
            self._deps[id(node)] = 0
        for node in inner:
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    self._deps[id(nxt)] += 1
        for edges in sources.values():
            for e in edges:
                if e is not None:
                    self._deps[id(e[0])] += 1
        # recvs reached by this pass, and their partial gradients
        self._recv_grads: dict[Hashable, list[Optional[torch.Tensor]]] = {}
        self._recv_pending: dict[Hashable, int] = {}
        for sink in sinks:
            hit = recv_of(sink.variable)
            if hit is not None:
                key, _ = hit
                if key not in self._recv_grads:
                    self._recv_grads[key] = [None] * recv_size(key)
                    self._recv_pending[key] = 0
                self._recv_pending[key] += 1
        self.executed = 0

    @property
    def reached_recvs(self) -> list[Hashable]:
        return list(self._recv_grads)

    @property
    def finished(self) -> bool:
        return not self._undelivered

    def deliver(self, key: Hashable, grads: list[Optional[torch.Tensor]]) -> Outcome:
        """Source ``key`` delivers ``grads`` (one per edge); run everything that became ready."""
        return self.deliver_many([(key, grads)])

    def deliver_many(self, deliveries: list[tuple[Hashable, list[Optional[torch.Tensor]]]]) -> Outcome:
        """Several sources deliver at once (key, one gradient per edge); then run everything that
        became ready (in one engine call, if that was the last of the sources)."""
        for key, grads in deliveries:
            if key not in self._undelivered:
                raise ValueError(f"source {key!r} is not expected (or was already delivered) in this pass")
            if len(grads) != len(self.sources[key]):
                raise ValueError(f"source {key!r} has {len(self.sources[key])} tensors but {len(grads)} "
                                 f"gradients arrived")
        if len({key for key, _ in deliveries}) != len(deliveries):
            raise ValueError("a source delivers twice")
        out = Outcome()
        ready: list[int] = []
        for key, grads in deliveries:
            self._undelivered.discard(key)
            self._incoming.update(id(g) for g in grads if g is not None)
            for e, g in zip(self.sources[key], grads):
                if e is not None:
                    self._feed(e, g, ready, out, hooked=False)
        if not self._undelivered:
            self._run_rest(out)
        else:
            while ready:
                self._run_node(ready.pop(), ready, out)
        return out

    # --- internals ----------------------------------------------------------------

    def _feed(self, edge: Edge, grad: Optional[torch.Tensor], ready: list[int], out: Outcome,
              hooked: bool = True) -> None:
        """Add ``grad`` into ``edge``; ``hooked``: it came from an engine call, which ran the hooks of
        the tensor it reaches if that is a leaf (else they run here, as a local backward would)."""
        node, nr = edge
        nid = id(node)
        if grad is not None and not hooked and is_sink(node):
            grad = _tensor_hooks(node.variable, grad)
        if grad is not None:
            buf = self._buffers.setdefault(nid, {})
            buf[nr] = _add(buf.get(nr), grad)
        self._deps[nid] -= 1
        if self._deps[nid] == 0:
            if is_sink(node):
                self._finish_sink(node, out)
            else:
                ready.append(nid)

    def _finish_sink(self, node: Any, out: Outcome) -> None:
        grad = self._buffers.pop(id(node), {}).get(0)
        self._done.add(id(node))
        t = node.variable
        hit = self._recv_of(t)
        if hit is None:
            if grad is not None:
                if id(grad) in self._incoming:  # a delivered buffer (maybe a view of a message's) is not kept
                    grad = grad.clone()
                out.leaf_grads.append((t, grad))
            return
        key, idx = hit
        self._recv_grads[key][idx] = _add(self._recv_grads[key][idx], grad)
        self._recv_pending[key] -= 1
        if self._recv_pending[key] == 0:
            out.recvs_done[key] = self._recv_grads.pop(key)

    def _run_node(self, nid: int, ready: list[int], out: Outcome) -> None:
        node = self._nodes[nid]
        self._done.add(nid)
        buf = self._buffers.pop(nid, {})
        nexts = [(nxt, nr) for nxt, nr in node.next_functions if nxt is not None]
        if not buf or not nexts:
            for e in nexts:
                self._feed(e, None, ready, out)
            return
        self.executed += 1
        unique = list({(id(n), nr): (n, nr) for n, nr in nexts}.values())
        if not self._engine_safe(node, unique):
            with torch.no_grad():
                results = self._call(node, buf)
            for (n, nr), g in zip(node.next_functions, results):
                if n is not None:
                    self._feed((n, nr), g, ready, out, hooked=False)
            return
        grads = engine_grad([GradientEdge(node, nr) for nr in buf], [GradientEdge(n, nr) for n, nr in unique],
                            list(buf.values()), self.retain_graph)
        by_edge = {(id(n), nr): g for (n, nr), g in zip(unique, grads)}
        for n, nr in nexts:
            # the engine gives a repeated edge its total once; the repeats only count down
            self._feed((n, nr), by_edge.pop((id(n), nr), None), ready, out)

    def _engine_safe(self, node: Any, nexts: list[Edge]) -> bool:
        """Whether an engine call from ``node`` to its next edges runs ``node`` alone.

        It does not when one next node leads to another (``x + f(x)``): the engine
        would also run the nodes in between, which may not be ready yet.
        """
        targets = {id(n) for n, _ in nexts}
        if len(targets) < 2:
            return True
        for start, _ in nexts:
            stack, seen = [nxt for nxt, _ in start.next_functions if nxt is not None], set()
            while stack:
                cur = stack.pop()
                if id(cur) in targets:
                    return False
                if id(cur) in seen or is_sink(cur):
                    continue
                seen.add(id(cur))
                stack.extend(nxt for nxt, _ in cur.next_functions if nxt is not None)
        return True

    @staticmethod
    def _call(node: Any, buf: dict[int, torch.Tensor]) -> tuple:
        """Run one node by calling it, as the engine would, missing gradients as zeros for
        Python functions (C++ nodes take None as the engine's undefined gradient)."""
        meta = node._input_metadata
        python_fn = hasattr(node, "_forward_cls")
        grads = []
        for nr, md in enumerate(meta):
            g = buf.get(nr)
            if g is None and python_fn:
                g = torch.zeros(tuple(md.shape), dtype=md.dtype, device=md.device)
            grads.append(g)
        results = node.apply(*grads) if python_fn else node(*grads)
        return results if isinstance(results, tuple) else (results,)

    def _run_rest(self, out: Outcome) -> None:
        """Every source has delivered: run all remaining nodes in one engine call."""
        # every node not run yet that holds gradient starts the call; the engine adds
        # what flows into it from the others
        pending = [nid for nid in self._buffers if nid not in self._done and not is_sink(self._nodes[nid])]
        outs: list[GradientEdge] = []
        grads: list[torch.Tensor] = []
        for nid in pending:
            for nr, g in self._buffers.pop(nid, {}).items():
                outs.append(GradientEdge(self._nodes[nid], nr))
                grads.append(g)
            self._done.add(nid)
        remaining_sinks = [self._nodes[nid] for nid in self._nodes
                           if nid not in self._done and is_sink(self._nodes[nid])]
        if outs and remaining_sinks:
            results = engine_grad(outs, [GradientEdge(s, 0) for s in remaining_sinks], grads, self.retain_graph)
            self.executed += 1
        else:
            results = [None] * len(remaining_sinks)
        for sink, g in zip(remaining_sinks, results):
            if g is not None:
                buf = self._buffers.setdefault(id(sink), {})
                buf[0] = _add(buf.get(0), g)
            self._finish_sink(sink, out)
        for nid in self._nodes:
            self._done.add(nid)
