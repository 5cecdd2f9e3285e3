"""RemoteModule, as torch.distributed.nn.RemoteModule."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import api
from ..rref import RRef

__all__ = ["RemoteModule"]


def _create_module(module_cls: type, args: tuple, kwargs: dict, device: str) -> torch.nn.Module:
    return module_cls(*args, **kwargs).to(device)


def _forward(module_rref: RRef, args: tuple, kwargs: dict) -> Any:
    return module_rref.local_value()(*args, **kwargs)


def _param_rrefs(module_rref: RRef, recurse: bool) -> list[RRef]:
    return [RRef(p) for p in module_rref.local_value().parameters(recurse)]


def _parse_remote_device(remote_device: str) -> tuple[Any, str]:
    worker, sep, device = remote_device.partition("/")
    if not worker:
        raise ValueError(f"remote_device {remote_device!r} must look like 'worker1/cpu' or 'rank:1/cpu'")
    if worker.startswith("rank:"):
        try:
            return int(worker[5:]), device or "cpu"
        except ValueError:
            raise ValueError(f"remote_device {remote_device!r} has a bad rank") from None
    return worker, device or "cpu"


class RemoteModule(torch.nn.Module):
    """A module created and kept on another worker; calling it runs ``forward`` there.

    Args:
        remote_device: ``"<worker name>/<device>"`` or ``"rank:<n>/<device>"``,
            e.g. ``"worker1/cpu"`` (the device defaults to cpu).
        module_cls: the ``nn.Module`` class to create there.
        args, kwargs: its constructor arguments.

    ``forward`` runs remotely inside the caller's distributed autograd context, so
    a distributed backward flows into the remote parameters;
    :meth:`remote_parameters` gives their RRefs for a DistributedOptimizer.
    """

    def __init__(self, remote_device: str, module_cls: type, args: Optional[tuple] = None,
                 kwargs: Optional[dict] = None) -> None:
        super().__init__()
        self.on, self.device = _parse_remote_device(remote_device)
        self.module_rref: RRef = api.remote(self.on, _create_module,
                                            args=(module_cls, tuple(args or ()), dict(kwargs or {}), self.device))
        self.module_rref._get_future().wait()  # constructor errors surface here, as in torch

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return api.rpc_sync(self.on, _forward, args=(self.module_rref, args, kwargs))

    def forward_async(self, *args: Any, **kwargs: Any) -> torch.futures.Future:
        """As ``forward``, returning a Future of the result."""
        return api.rpc_async(self.on, _forward, args=(self.module_rref, args, kwargs))

    def remote_parameters(self, recurse: bool = True) -> list[RRef]:
        """RRefs to the remote module's parameters (for a DistributedOptimizer)."""
        return api.rpc_sync(self.on, _param_rrefs, args=(self.module_rref, recurse))

    def get_module_rref(self) -> RRef:
        """The RRef of the remote module itself."""
        return self.module_rref
