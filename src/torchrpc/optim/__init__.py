"""DistributedOptimizer, as torch.distributed.optim.DistributedOptimizer."""
from __future__ import annotations

import threading
from typing import Any

from .. import api
from .. import autograd as dist_autograd
from ..futures import wait_all
from ..rref import RRef

__all__ = ["DistributedOptimizer"]


class _LocalOptimizer:
    """The optimizer on one owner, over the parameters it owns."""

    # Steps of every local optimizer of this worker are serialized, as in PyTorch:
    # two distributed optimizers may share parameters.
    _lock = threading.Lock()

    def __init__(self, optimizer_class: type, params_rref: list[RRef], *args: Any, **kwargs: Any) -> None:
        self._params = [rref.local_value() for rref in params_rref]
        self.optim = optimizer_class(self._params, *args, **kwargs)

    def step(self, autograd_ctx_id: int) -> None:
        grads = dist_autograd.get_gradients(autograd_ctx_id)
        with _LocalOptimizer._lock:
            for param in self._params:
                param.grad = grads.get(param)
            self.optim.step()


def _new_local_optimizer(optimizer_class: type, params_rref: list[RRef], *args: Any, **kwargs: Any) -> RRef:
    return RRef(_LocalOptimizer(optimizer_class, params_rref, *args, **kwargs))


def _local_optimizer_step(local_optim_rref: RRef, autograd_ctx_id: int) -> None:
    local_optim_rref.local_value().step(autograd_ctx_id)


class DistributedOptimizer:
    """Runs one ``optimizer_class`` per owner of the given parameter RRefs.

    Args:
        optimizer_class: a ``torch.optim.Optimizer`` class, instantiated on each owner.
        params_rref: RRefs to the parameters to optimize (local ones too).
        *args, **kwargs: passed to ``optimizer_class`` after the parameter list.

    :meth:`step` applies the gradients of one distributed autograd context on every
    owner. Concurrent steps over the same parameters are serialized on each owner.
    """

    def __init__(self, optimizer_class: type, params_rref: list[RRef], *args: Any, **kwargs: Any) -> None:
        per_worker: dict[Any, list[RRef]] = {}
        for param in params_rref:
            per_worker.setdefault(param.owner(), []).append(param)
        futs = [api.rpc_async(worker, _new_local_optimizer, args=(optimizer_class, params, *args), kwargs=kwargs)
                for worker, params in per_worker.items()]
        self.remote_optimizers: list[RRef] = [f.wait() for f in futs]

    def step(self, context_id: int) -> None:
        """Apply the gradients of ``context_id`` with every owner's optimizer; wait for all."""
        wait_all([api.rpc_async(opt.owner(), _local_optimizer_step, args=(opt, context_id))
                  for opt in self.remote_optimizers])
