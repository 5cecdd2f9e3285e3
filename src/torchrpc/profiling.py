"""RPCs as torch.profiler events on the caller.

Each call is an event named ``rpc_sync#func(me -> dest)`` or ``rpc_async#func(me -> dest)``
lasting the whole round trip. The callee measures how long the function ran and sends it
back in the reply; the caller records it as a second event,
``<call event>#remote_execution_us=N``.

torch.profiler records only the threads it was started on (its callbacks are thread
local), and replies are handled on this worker's pool threads. So the remote time is
recorded on the caller's thread: by rpc_sync after the reply, and for rpc_async when the
caller waits on the returned future (``wait()``, ``value()`` or
:func:`torchrpc.futures.wait_all`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def enabled() -> bool:
    """Whether torch.profiler (or the autograd profiler) records this thread now."""
    # The module flag is global and cheap; the C check is per thread.
    return bool(torch.autograd.profiler._is_profiler_enabled) and torch._C._autograd._profiler_enabled()


def record_remote_execution(event: str, remote_ns: int) -> None:
    """Record the callee's execution time of the call ``event`` on the current thread."""
    with torch.profiler.record_function(f"{event}#remote_execution_us={remote_ns // 1000}"):
        pass


def profiled_sync(event: str, call: Callable[[], torch.futures.Future]) -> Any:
    """Run ``call()`` and wait for its future inside an ``event`` span, then record its remote time."""
    with torch.profiler.record_function(event):
        fut = call()
        value = fut.wait()
    remote_ns = getattr(fut, "_remote_ns", 0)
    if remote_ns:
        record_remote_execution(event, remote_ns)
    return value


def profiled_async(event: str, call: Callable[[], torch.futures.Future]) -> torch.futures.Future:
    """Start ``call()`` inside an ``event`` span that ends when its future completes."""
    handle = torch.ops.profiler._record_function_enter_new(event, None)
    try:
        reply = call()
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
