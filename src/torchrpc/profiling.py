"""RPCs as profiler events on the caller, with the callee's events as remote events.

Under torch.profiler, the autograd profiler or its legacy form, each call is an event named
as torch names it (:func:`rpc_key`): ``rpc_sync#func(me -> dest)`` or
``rpc_async#func(me -> dest)``, lasting the whole round trip. The callee runs the function
under its own profiler, with the caller's settings (``record_shapes``, ``profile_memory``,
...), and sends its events back in the reply; they join the caller's profile as remote events
(``is_remote``, ``node_id`` the callee's id), named ``<call event>#remote_op: <name>`` (see
:mod:`torchrpc.remote_events` and :mod:`torchrpc.profiler_sessions`). The callee also measures
how long the function ran; the caller records that as an event of its own,
``<call event>#remote_execution_us=N``.

torch's profilers record only the threads they were started on (their callbacks are thread
local), and replies are handled on this worker's pool threads. So the remote time is
recorded on the caller's thread: by rpc_sync after the reply, and for rpc_async when the
caller waits on the returned future (``wait()``, ``value()`` or
:func:`torchrpc.futures.wait_all`). Remote events go to the caller's profiler session from
whichever thread reads the reply, and need no wait.
"""
from __future__ import annotations

import enum
import logging
import time
from typing import Any, Callable, Optional

import torch

from . import profiler_sessions as sessions
from . import remote_events
from .functions import func_name
from .protocol.messages import ProfileFlags

log = logging.getLogger("torchrpc")
#: Whether a torch profiler records this thread now (a C call: cheap enough for every RPC).
enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled

#: The spans of a distributed backward pass, as torch names them.
DIST_BACKWARD = "torch::distributed::autograd::backward"
SEND_RPC_BACKWARD = "torch::distributed::autograd::SendRpcBackward"
RECV_RPC_BACKWARD = "torch::distributed::autograd::RecvRpcBackward"


class RPCExecMode(enum.Enum):
    """How an RPC runs; its value is part of the call's event name (torch's enum)."""

    SYNC = "sync"
    ASYNC = "async"
    ASYNC_JIT = "async_jit"
    REMOTE = "remote"


def build_rpc_profiling_key(exec_type: RPCExecMode, func_name: str, current_worker_name: str,
                            dst_worker_name: str) -> str:
    """The name of a call's profiler event (torch's ``_build_rpc_profiling_key``)."""
    return f"rpc_{exec_type.value}#{func_name}({current_worker_name} -> {dst_worker_name})"


def rpc_key(mode: RPCExecMode, func: Callable, me: str, dest: str) -> str:
    """The event name of a call of ``func``: torch's, which names a builtin by its
    operator (``aten::mul``) and any other function by its qualified name."""
    try:
        name = torch.jit._builtins._find_builtin(func)
    except Exception:  # a torch without that table: the Python name
        name = None
    return build_rpc_profiling_key(mode, name or func_name(func), me, dest)


def mark(name: str, times: int = 1) -> None:
    """``times`` events ``name`` of no duration on the current thread, if a profiler records it."""
    if times and enabled():
        for _ in range(times):
            with torch.profiler.record_function(name):
                pass


def install() -> None:
    """Teach torch's profilers to take remote events (once per process; see profiler_sessions)."""
    sessions.install()


class CallProfile:
    """One profiled call on the caller: the ``profile`` flags it sends, and where the callee's
    events go when its reply comes (the session of the profiler that records this thread)."""

    __slots__ = ("key", "dest", "session", "flags", "sent_ns")

    def __init__(self, key: str, dest: int) -> None:
        self.key, self.dest = key, dest
        self.session = session = sessions.current()
        flags = ProfileFlags.TIME
        if session is not None:
            flags |= ProfileFlags.EVENTS
            flags |= ProfileFlags.SHAPES if session.record_shapes else 0
            flags |= ProfileFlags.MEMORY if session.profile_memory else 0
            flags |= ProfileFlags.STACK if session.with_stack else 0
            flags |= ProfileFlags.FLOPS if session.with_flops else 0
        self.flags = flags
        self.sent_ns = time.time_ns()

    def collect(self, reply: torch.futures.Future) -> None:
        """Add the events that came back with ``reply`` to the session; malformed ones are
        dropped with a warning on the ``torchrpc`` logger (the call's result stands)."""
        text = getattr(reply, "_remote_events", None)
        if text is None or self.session is None:
            return
        received_ns = time.time_ns()
        try:
            window, dropped, events = remote_events.decode(text)
        except remote_events.RemoteEventsError as e:
            log.warning("torchrpc: dropped the malformed profiler events sent back for %s: %s", self.key, e)
            return
        if dropped:
            log.warning("torchrpc: the callee of %s left out %d of its profiler events (it sends at most %d)",
                        self.key, dropped, remote_events.MAX_EVENTS)
        self.session.add(remote_events.place(events, window, self.key, self.dest, self.sent_ns, received_ns))


def record_remote_execution(event: str, remote_ns: int) -> None:
    """Record the callee's execution time of the call ``event`` on the current thread."""
    with torch.profiler.record_function(f"{event}#remote_execution_us={remote_ns // 1000}"):
        pass


def profiled_sync(event: str, dest: int, call: Callable[[int], torch.futures.Future]) -> Any:
    """Run ``call(flags)`` and wait for its future inside an ``event`` span, then record its remote
    time and events."""
    profile = CallProfile(event, dest)
    with torch.profiler.record_function(event):
        fut = call(profile.flags)
        value = fut.wait()
    remote_ns = getattr(fut, "_remote_ns", 0)
    if remote_ns:
        record_remote_execution(event, remote_ns)
    profile.collect(fut)
    return value


def profiled_async(event: str, dest: int, call: Callable[[int], torch.futures.Future]) -> torch.futures.Future:
    """Start ``call(flags)`` inside an ``event`` span that ends when its future completes."""
    profile = CallProfile(event, dest)
    handle = torch.ops.profiler._record_function_enter_new(event, None)
    try:
        reply = call(profile.flags)
    except BaseException:
        torch.ops.profiler._record_function_exit._RecordFunction(handle)
        raise
    recorded = False

    def record() -> None:
        nonlocal recorded
        remote_ns = getattr(reply, "_remote_ns", 0)
        if not recorded and remote_ns and enabled():
            recorded = True
            record_remote_execution(event, remote_ns)

    if profile.session is not None:
        reply.add_done_callback(profile.collect)
    # The span ends in a callback on ``reply``; completing after that callback keeps the
    # span inside the future's life. (Errors do not pass through the returned future as
    # errors, so results are taken from ``reply`` itself.)
    span_ended = torch.ops.profiler._call_end_callbacks_on_jit_fut(handle, reply)
    return ProfiledFuture(span_ended, record, result=reply)


class ProfiledFuture(torch.futures.Future):
    """The future of a profiled rpc_async call, or of a ``then`` chained on one.

    Completes when ``source`` does, with the result of ``result`` (default ``source``). Its ``wait()`` and ``value()`` call ``record`` (which adds
    the remote time event once, on a thread the profiler records).
    """

    def __init__(self, source: torch.futures.Future, record: Callable[[], None],
                 result: Optional[torch.futures.Future] = None) -> None:
        super().__init__()
        self._record, self._result = record, result
        source.add_done_callback(self._complete)

    def _complete(self, source: torch.futures.Future) -> None:
        try:
            value = (self._result or source).value()
        except BaseException as e:
            self.set_exception(e)
        else:
            self.set_result(value)

    def then(self, callback: Callable[[torch.futures.Future], Any]) -> torch.futures.Future:
        return ProfiledFuture(super().then(callback), self._record)

    def wait(self) -> Any:
        try:
            return super().wait()
        finally:
            self._record()

    def value(self) -> Any:
        try:
            return super().value()
        finally:
            self._record()
