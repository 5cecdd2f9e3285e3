"""RRef: a reference to a value that lives on one worker (its owner)."""
from __future__ import annotations

import functools
from typing import Any, Generic, Optional, TypeVar

import torch

from . import current, serialization
from .errors import RPCError
from .functions import async_execution, is_async_function
from .options import UNSET_RPC_TIMEOUT
from .protocol.rref_context import ForkData, OwnerRRef, UserRRef
from .worker_info import WorkerInfo

T = TypeVar("T")


class RRef(Generic[T]):
    """A remote reference, as torch.distributed.rpc.RRef.

    ``RRef(value)`` makes an owner RRef of a local value; ``remote()`` returns a
    user RRef of a value created on another worker. RRefs may be passed in the
    arguments and results of RPCs; the owner keeps the value until no RRef to it
    is alive anywhere.
    """

    __slots__ = ("_handle", "_created", "_type", "__weakref__")

    def __init__(self, value: T, type_hint: Optional[type] = None) -> None:
        agent = current.agent()
        self._handle: OwnerRRef | UserRRef = agent.ctx.create_owner(value)
        self._created: Optional[torch.futures.Future] = None
        self._type: Optional[type] = None

    @classmethod
    def _wrap(cls, handle: OwnerRRef | UserRRef, created: Optional[torch.futures.Future] = None) -> "RRef":
        rref = cls.__new__(cls)
        rref._handle = handle
        rref._created = created
        rref._type = None
        return rref

    def is_owner(self) -> bool:
        """Whether this worker holds the value."""
        return isinstance(self._handle, OwnerRRef)

    def owner(self) -> WorkerInfo:
        """The WorkerInfo of the owner."""
        agent = current.agent()
        if isinstance(self._handle, OwnerRRef):
            return agent.info
        return agent.worker_info(self._handle.owner_id)

    def owner_name(self) -> str:
        """The name of the owner."""
        return self.owner().name

    def confirmed_by_owner(self) -> bool:
        """Whether the owner knows of this reference (always True on the owner)."""
        return isinstance(self._handle, OwnerRRef) or self._handle.confirmed

    def local_value(self) -> T:
        """The value, on the owner only (waits if a remote() is still producing it)."""
        if not isinstance(self._handle, OwnerRRef):
            h = self._handle
            raise RPCError(f"For UserRRef(rref_id={h.rref_id!r}, fork_id={h.fork_id!r}), can't call localValue() "
                           f"on user {current.agent().info!r}. Call it on owner {self.owner()!r} (or use to_here())")
        return self._handle.value()

    def to_here(self, timeout: float = UNSET_RPC_TIMEOUT) -> T:
        """A copy of the value, fetched from the owner (the value itself on the owner)."""
        if isinstance(self._handle, OwnerRRef):
            return self._handle.value(timeout if timeout and timeout > 0 else None)
        if self._handle.deleted:
            raise RPCError(f"Cannot call to_here() on it after deletion: {self!r} was deleted when RPC shut down")
        return current.agent().fetch(self._handle, timeout, self._created).wait()

    def rpc_sync(self, timeout: float = UNSET_RPC_TIMEOUT) -> Any:
        """A proxy: ``rref.rpc_sync().method(*args)`` runs ``method`` on the value, on the owner."""
        return _Proxy(self, _rpc_sync, timeout)

    def rpc_async(self, timeout: float = UNSET_RPC_TIMEOUT) -> Any:
        """As :meth:`rpc_sync`, returning a ``torch.futures.Future``."""
        return _Proxy(self, _rpc_async, timeout)

    def remote(self, timeout: float = UNSET_RPC_TIMEOUT) -> Any:
        """As :meth:`rpc_sync`, returning an RRef to the result, kept on the owner."""
        return _Proxy(self, _remote, timeout)

    def backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
        """Run backward from this RRef's value, which must be a scalar tensor.

        With ``dist_autograd_ctx_id=-1``, a local ``value.backward()`` on the owner
        (only the owner may do that). With a context id, a distributed backward in
        that context, starting on the owner; it returns once the whole pass is done.
        """
        agent = current.agent()
        h = self._handle
        if isinstance(h, OwnerRRef):
            agent.autograd.rref_backward(h.rref_id, h.value(), dist_autograd_ctx_id, retain_graph)
            return
        if dist_autograd_ctx_id == -1:
            raise RPCError("User RRefs require 'dist_autograd_ctx_id' to be specified: RRef.backward() without "
                           f"one runs a local backward, which only the owner ({self.owner_name()!r}) can do")
        if self._created is not None:
            self._created.wait()  # the owner must have the value before it can start from it
        agent.autograd.remote_rref_backward(h.owner_id, h.rref_id, dist_autograd_ctx_id, bool(retain_graph))

    def _value_type(self, timeout: float = UNSET_RPC_TIMEOUT) -> type:
        """The type of the value (asked of the owner once, then kept), for the proxies."""
        if self._type is None:
            if isinstance(self._handle, OwnerRRef):
                self._type = type(self._handle.value())
            else:
                self._type = current.agent().call_sync(self.owner(), _type_of_value, (self,), {}, timeout)
        return self._type

    def _get_future(self) -> torch.futures.Future:
        """A Future that completes when the owner has created the value (remote() only)."""
        if self._created is None:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(True)
            return fut
        return self._created

    def __repr__(self) -> str:
        h = self._handle
        if isinstance(h, OwnerRRef):
            return f"OwnerRRef({h.rref_id!r})"
        return f"UserRRef(RRefId = {h.rref_id!r}, ForkId = {h.fork_id!r})"

    def __reduce__(self) -> tuple:
        raise RPCError("Can not pickle rref in python pickler, rref can only be pickled when using RPC (an "
                       "RRef travels as an argument or result of an RPC)")


def _rpc_sync(to: WorkerInfo, func: Any, args: tuple, timeout: float) -> Any:
    return current.agent().call_sync(to, func, args, {}, timeout)


def _rpc_async(to: WorkerInfo, func: Any, args: tuple, timeout: float) -> torch.futures.Future:
    return current.agent().call(to, func, args, {}, timeout)


def _remote(to: WorkerInfo, func: Any, args: tuple, timeout: float) -> RRef:
    return RRef._wrap(*current.agent().remote(to, func, args, {}, timeout))


class _Proxy:
    __slots__ = ("_rref", "_how", "_timeout")

    def __init__(self, rref: RRef, how: Any, timeout: float) -> None:
        self._rref = rref
        self._how = how
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        # as torch's proxies do: a name the value's type lacks is an AttributeError here, at once
        getattr(self._rref._value_type(self._timeout), name)
        return functools.partial(_invoke, self._rref, self._how, name, self._timeout)


def _invoke(rref: RRef, how: Any, name: str, timeout: float, *args: Any, **kwargs: Any) -> Any:
    return how(rref.owner(), _local_invoke, args=(rref, name, args, kwargs), timeout=timeout)


def _type_of_value(rref: RRef) -> type:
    """Runs on the owner: the type of the RRef's value."""
    return type(rref.local_value())


@async_execution
def _local_invoke(rref: RRef, name: str, args: tuple, kwargs: dict) -> torch.futures.Future:
    """Runs on the owner: call ``name`` on the value; async_execution methods reply when done."""
    method = getattr(rref.local_value(), name)
    if is_async_function(method):
        return method(*args, **kwargs)
    fut: torch.futures.Future = torch.futures.Future()
    try:
        fut.set_result(method(*args, **kwargs))
    except BaseException as e:
        fut.set_exception(e)
    return fut


def _reduce_rref(rref: RRef) -> tuple:
    session = serialization.current_session()
    if session is None or not hasattr(session, "fork_rref"):
        raise RPCError("Can not pickle rref in python pickler, rref can only be pickled when using RPC (an "
                       "RRef travels as an argument or result of an RPC)")
    return _rebuild_rref, (session.fork_rref(rref._handle).to_tuple(),)


def _rebuild_rref(fork: tuple) -> RRef:
    session = serialization.current_session()
    if session is None or not hasattr(session, "rref_from_fork"):
        raise RPCError("an RRef can only be unpickled by torchrpc, inside an RPC")
    return RRef._wrap(session.rref_from_fork(ForkData.from_tuple(fork)))


serialization.register_reducer(RRef, _reduce_rref)
