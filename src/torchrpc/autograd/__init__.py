"""Distributed autograd, as torch.distributed.autograd.

Inside ``with torchrpc.autograd.context() as context_id:``, every RPC that carries
tensors requiring grad (arguments, results, ``to_here`` values) is recorded as a
send/recv pair, so that :func:`backward` flows back across every worker boundary.
Gradients accumulate in the context (:func:`get_gradients`), never in ``.grad``.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .. import current, profiling
from ..errors import RPCError
from ..protocol.autograd_context import UnknownContextError, _tls, current_context_id
from .graph import graph
from ..services.autograd import DistBackwardError

__all__ = ["DistBackwardError", "UnknownContextError", "backward", "context", "current_context_id", "graph",
           "get_gradients"]


class context:
    """A distributed autograd context; ``with context() as context_id:``.

    Leaving the block releases the context here and on every worker it reached,
    also when the block raised.
    """

    def __enter__(self) -> int:
        if current_context_id() is not None:
            raise RPCError(f"Already have an autograd context id for this thread: {current_context_id()} "
                           "(distributed autograd contexts do not nest)")
        self._service = current.agent().autograd
        self.context_id = self._service.contexts.create().context_id
        _tls.context_id = self.context_id
        return self.context_id

    def __exit__(self, *exc: object) -> None:
        _tls.context_id = None
        self._service.release(self.context_id)


def backward(context_id: int, roots: Iterable[torch.Tensor], retain_graph: bool = False) -> None:
    """Run a distributed backward pass from ``roots`` (scalar tensors) in context ``context_id``.

    Returns once the whole pass has finished on every worker it reached. Only the
    send/recv pairs that the roots actually reach are waited for, so RPC outputs
    the loss does not use never stall it. Errors on any worker are raised here,
    naming the worker.
    """
    service = current.agent().autograd
    if not profiling.enabled():
        service.backward(context_id, roots, retain_graph)
        return
    with torch.profiler.record_function(profiling.DIST_BACKWARD):  # as torch's distributed engine
        service.backward(context_id, roots, retain_graph)


def get_gradients(context_id: int) -> dict[torch.Tensor, torch.Tensor]:
    """This worker's gradients in ``context_id``: a dict from each leaf tensor to its gradient."""
    return current.agent().autograd.get_gradients(context_id)
