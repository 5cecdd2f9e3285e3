"""The public RPC functions, with torch.distributed.rpc's names, signatures and semantics."""
from __future__ import annotations

import gc
import os
from typing import Any, Callable, Optional

import torch

from . import current
from . import job_secret
from . import rendezvous as rdzv
from .agent import Agent
from .errors import RPCError
from .options import (DEFAULT_SHUTDOWN_TIMEOUT, UNSET_RPC_TIMEOUT, BackendType, RpcBackendOptions,
                      TensorPipeRpcBackendOptions)
from .rref import RRef
from .worker_info import WorkerInfo


def init_rpc(
    name: str,
    backend: Optional[BackendType] = None,
    rank: int = -1,
    world_size: Optional[int] = None,
    rpc_backend_options: Optional[RpcBackendOptions] = None,
) -> None:
    """Start RPC on this process as worker ``name`` and wait until all workers have joined.

    Without a world size (None and no ``WORLD_SIZE`` in the environment, or 0) the worker joins
    a *dynamic* group, as in torch: it returns once it is connected to every member there is,
    later members may join, and any member but rank 0 may leave (``shutdown``); rank 0 hosts
    the store, so its ``shutdown`` waits until every other member has left. A static and a
    dynamic worker cannot meet in one store (RuntimeError).

    Args:
        name: a unique name of this worker.
        backend: accepted for compatibility; torchrpc has one backend.
        rank: this worker's id in ``[0, world_size)`` (dynamic: ``[0, 2**15)``); -1 reads
            ``RANK`` from the environment.
        world_size: the number of workers; None reads ``WORLD_SIZE``, and without it (or with
            0) the group is dynamic.
        rpc_backend_options: a :class:`RpcBackendOptions` (also importable as
            ``TensorPipeRpcBackendOptions``): timeout, init_method, threads.
    """
    WorkerInfo(name, 0)  # checks the name as torch does (a RuntimeError naming the rule)
    if backend is not None and (isinstance(backend, str) or not hasattr(backend, "name")):
        raise TypeError(f"Argument backend must be a member of BackendType (torchrpc.BackendType), not "
                        f"{backend!r}")
    if rpc_backend_options is not None and not isinstance(rpc_backend_options, RpcBackendOptions):
        raise TypeError("Argument rpc_backend_options must be an instance of RpcBackendOptions "
                        f"(torchrpc.RpcBackendOptions or torchrpc.TensorPipeRpcBackendOptions), not "
                        f"{type(rpc_backend_options).__module__}.{type(rpc_backend_options).__qualname__}")
    if (backend is None and rpc_backend_options is not None and type(rpc_backend_options) is not RpcBackendOptions
            and not isinstance(rpc_backend_options, TensorPipeRpcBackendOptions)):
        # as torch: options of another subclass name no backend this library knows
        raise TypeError(f"Could not infer backend for options {rpc_backend_options!r}: pass backend= or use "
                        "torchrpc.RpcBackendOptions / TensorPipeRpcBackendOptions")
    options = rpc_backend_options if rpc_backend_options is not None else RpcBackendOptions()
    with current.lock:
        if current.get_agent_or_none() is not None:
            raise RPCError("RPC is already initialized on this process; call shutdown() first")
        # before the store: a job across hosts without a secret fails here, at once
        source = job_secret.choose(options, rdzv.master_host(options.init_method))
        # the store first: a worker that joins a running group meets it while it is there
        rv = rdzv.rendezvous(options.init_method, rank, world_size, options.startup_timeout)
        _freeze_gc_once()  # before the agent exists: its cycles must stay collectable after shutdown
        agent = Agent(name, rv.rank, rv.world_size, options, rv, source)
        # current before start: peers that finish first may already call into us
        current.set_agent(agent)
        try:
            agent.start()
        except BaseException:
            current.set_agent(None)
            raise


_gc_frozen = False


def _freeze_gc_once() -> None:
    """Once per process, move every object alive now (torch's modules and the program's, some
    170,000 of them) out of the cyclic garbage collector's sight (``gc.freeze``), after one
    collection so that no garbage is kept (objects frozen are still freed when their last
    reference goes; only cycles among them would stay). A full collection otherwise walks them all (~50 ms
    here), and a training step that keeps many tensors alive (a large distributed autograd
    context) triggers several. ``TORCHRPC_GC_FREEZE=0`` leaves the collector alone."""
    global _gc_frozen
    if _gc_frozen or os.environ.get("TORCHRPC_GC_FREEZE", "1") == "0":
        return
    _gc_frozen = True
    gc.collect()
    gc.freeze()


def shutdown(graceful: bool = True, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Stop RPC on this worker.

    With ``graceful=True`` this blocks until every worker has called shutdown and all
    outstanding work (calls, RRef confirmations and deletions) has finished; then
    every thread and socket of torchrpc is closed. ``timeout`` (seconds; 0, the
    default, means no limit, as in torch; workers that died are not waited for)
    bounds that wait. With ``graceful=False`` it stops at once.
    """
    with current.lock:
        agent = current.agent(api=True)
        try:
            agent.shutdown(graceful=graceful, timeout=timeout)
        finally:
            current.set_agent(None)


def get_rpc_timeout() -> float:
    """This worker's default RPC timeout in seconds (``RpcBackendOptions.rpc_timeout``; 0: none)."""
    return current.agent(api=True).rpc_timeout


def get_worker_info(worker_name: Optional[str] = None) -> WorkerInfo:
    """The WorkerInfo of ``worker_name``, or of this worker if None."""
    return current.agent(api=True).worker_info(worker_name)


def _call_args(func: Any, args: Any, kwargs: Any) -> tuple[tuple, dict]:
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    args = () if args is None else tuple(args)
    kwargs = {} if kwargs is None else dict(kwargs)
    return args, kwargs


def rpc_async(
    to: Any, func: Callable, args: Optional[tuple] = None, kwargs: Optional[dict] = None,
    timeout: float = UNSET_RPC_TIMEOUT,
) -> torch.futures.Future:
    """Run ``func(*args, **kwargs)`` on worker ``to``; returns a ``torch.futures.Future`` of the result.

    ``to`` is a worker name, id or WorkerInfo. ``timeout`` in seconds (0: none;
    -1: the default from the options). Errors raised by ``func`` are raised by
    ``Future.wait()``, with their type and the remote traceback.
    """
    args, kwargs = _call_args(func, args, kwargs)
    return current.agent(api=True).call(to, func, args, kwargs, timeout)


def rpc_sync(
    to: Any, func: Callable, args: Optional[tuple] = None, kwargs: Optional[dict] = None,
    timeout: float = UNSET_RPC_TIMEOUT,
) -> Any:
    """Run ``func(*args, **kwargs)`` on worker ``to`` and return its result (see :func:`rpc_async`)."""
    args, kwargs = _call_args(func, args, kwargs)
    return current.agent(api=True).call_sync(to, func, args, kwargs, timeout)


def remote(
    to: Any, func: Callable, args: Optional[tuple] = None, kwargs: Optional[dict] = None,
    timeout: float = UNSET_RPC_TIMEOUT,
) -> RRef:
    """Run ``func(*args, **kwargs)`` on worker ``to`` and return an RRef to the result, kept there.

    Returns at once. If creating the value fails or times out, the error is raised
    by the RRef's next use (``to_here()``), as in torch.distributed.rpc.
    """
    args, kwargs = _call_args(func, args, kwargs)
    handle, created = current.agent(api=True).remote(to, func, args, kwargs, timeout)
    return RRef._wrap(handle, created)


def debug_info() -> dict[str, Any]:
    """What this worker is doing now, for people debugging a job.

    Returns a dict: ``pending_calls`` (worker name -> functions awaiting replies),
    ``rrefs`` (owner RRefs, known forks, pending and confirmed users),
    ``autograd_contexts`` (open context ids), ``peers`` (per worker: messages and
    bytes sent/received on the current connection, alive, shared memory in use).
    """
    return current.agent(api=True).debug_info()
