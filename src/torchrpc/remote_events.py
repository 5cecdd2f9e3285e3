"""A call's profile on the callee, and its way back into the caller's profile.

On the callee, :class:`Capture` runs the called function under torch's legacy profiler (thread
local) with the caller's settings (:class:`~torchrpc.protocol.messages.ProfileFlags`), as
torch's ``RUN_WITH_PROFILING_REQ`` does; the remote events of RPCs the function makes come
along (the capture is their profiler session). :meth:`Capture.encode` writes the events as
JSON text for the reply (``ProfiledReturn.events``), times as ns from the capture's start.

On the caller, :func:`decode` checks that text: it comes from a peer, so every type, size and
count is checked and anything else is a :class:`RemoteEventsError`, never a crash. :func:`place`
names each event after the call (``<rpc key>#remote_op: <name>``, as torch does) and puts it on
the caller's clock: the callee's window centered in the call's round trip (the clocks of two
hosts are never compared).

The text: ``{"version": 1, "window_ns": W, "dropped": D, "events": [[name, start_ns, end_ns,
thread, node_id, input_shapes, cpu_memory_usage, stack], ...]}`` with 0 <= start <= end <= W,
node_id -1 for the callee itself (a nested call's events keep theirs), D events left out.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

import torch

from . import profiler_sessions as sessions
from .errors import ProtocolError
from .profiler_sessions import Event
from .protocol.messages import ProfileFlags

#: torch's prefix of a remote event's name after its call's key (``REMOTE_PROFILING_KEY_PREFIX``)
REMOTE_OP_STR = "#remote_op: "
VERSION = 1
#: bounds on what a peer may send back (the callee keeps to them: it sends at most MAX_EVENTS)
MAX_EVENTS = 100_000
MAX_TEXT = 64 << 20
MAX_NAME = 16 << 10
MAX_INPUTS = 1024
MAX_DIMS = 64
MAX_FRAMES = 1024
MAX_FRAME = 4096
_I64 = (1 << 63) - 1
_U32 = (1 << 32) - 1


class RemoteEventsError(ProtocolError):
    """A peer's profiler events are malformed."""


# --- the callee ---------------------------------------------------------------------------


class Capture:
    """Runs one call's function under torch's legacy profiler, with the caller's settings.

    Nothing is captured where this thread is profiled already (a profiler per thread): then
    :meth:`encode` says so with an empty list.
    """

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.window_ns = 0
        self.events: list[Event] = []
        self._session: Optional[sessions.Session] = None

    def wrap(self, func: Callable) -> Callable:
        """``func``, run under this capture (still an ``async_execution`` function if it was one)."""

        def profiled(*args: Any, **kwargs: Any) -> Any:
            started = self._start()
            try:
                return func(*args, **kwargs)
            finally:
                if started:
                    self._stop()

        inner = getattr(func, "_wrapped_async_rpc_function", None)
        if inner is not None:
            profiled._wrapped_async_rpc_function = inner  # type: ignore[attr-defined]
        return profiled

    def _start(self) -> bool:
        if torch.autograd._profiler_enabled() or sessions.parse_legacy is None:
            return False
        f = self.flags
        settings = {"record_shapes": bool(f & ProfileFlags.SHAPES), "profile_memory": bool(f & ProfileFlags.MEMORY),
                    "with_stack": bool(f & ProfileFlags.STACK), "with_flops": bool(f & ProfileFlags.FLOPS)}
        try:
            config = torch.autograd.ProfilerConfig(torch.autograd.ProfilerState.CPU, *settings.values(), False,
                                                   torch._C._profiler._ExperimentalConfig())
            # the nested calls' remote events come here, and those calls ask for what we were asked
            self._session = sessions.begin("capture", **settings)
            torch.autograd._enable_profiler_legacy(config)
        except Exception:  # a torch whose legacy profiler differs: no events
            if self._session is not None:
                sessions.end(self._session)
            return False
        return True

    def _stop(self) -> None:
        try:
            records = torch.autograd._disable_profiler_legacy()
        except Exception:  # never the call's failure: the reply just has no events
            records = []
        nested = sessions.end(self._session) if self._session is not None else []
        stop_ns = time.time_ns()
        start_us = sessions.legacy_start_us(records)
        if start_us is None or sessions.parse_legacy is None:
            return
        start_ns = int(start_us * 1000)
        self.window_ns = window = max(0, stop_ns - start_ns)

        def at(ns: float) -> int:  # an offset in the window
            return min(max(int(ns), 0), window)

        try:
            parsed = sessions.parse_legacy(records)
        except Exception:
            return
        events = [_fit(Event(fe.name, at(fe.time_range.start * 1000), at(fe.time_range.end * 1000), fe.thread, -1,
                             fe.input_shapes, fe.cpu_memory_usage, fe.stack)) for fe in parsed]
        events += [_fit(e._replace(start_ns=at(e.start_ns - start_ns), end_ns=at(e.end_ns - start_ns))) for e in nested]
        events.sort(key=lambda e: (e.start_ns, -e.end_ns))
        self.events = events

    def encode(self) -> str:
        """The captured events as the reply's text (at most :data:`MAX_EVENTS`; the count of the
        rest is sent as ``dropped``)."""
        kept = self.events[:MAX_EVENTS]
        return json.dumps({"version": VERSION, "window_ns": self.window_ns, "dropped": len(self.events) - len(kept),
                           "events": [[e.name, e.start_ns, e.end_ns, e.thread, e.node_id, e.input_shapes,
                                       e.cpu_memory_usage, list(e.stack)] for e in kept]},
                          separators=(",", ":"))


def _fit(e: Event) -> Event:
    """``e`` cut to what :func:`decode` accepts (names, stacks and shapes within the bounds)."""
    shapes = [list(s)[:MAX_DIMS] if isinstance(s, (list, tuple)) and all(type(d) is int and d >= 0 for d in s) else []
              for s in (e.input_shapes or [])[:MAX_INPUTS]]
    stack = [str(f)[:MAX_FRAME] for f in (e.stack or ())][-MAX_FRAMES:]
    memory = min(max(int(e.cpu_memory_usage or 0), -_I64), _I64)
    return Event(str(e.name)[:MAX_NAME], e.start_ns, max(e.start_ns, e.end_ns), max(int(e.thread), 0), e.node_id,
                 shapes, memory, tuple(stack))


# --- the caller ---------------------------------------------------------------------------


def decode(text: Any) -> tuple[int, int, list[Event]]:
    """Check and read a peer's events text: (window_ns, dropped, events with offset times).
    Raises :class:`RemoteEventsError` saying what is wrong."""
    if not isinstance(text, str):
        raise RemoteEventsError(f"expected text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise RemoteEventsError(f"{len(text)} characters, more than {MAX_TEXT}")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RemoteEventsError(f"not JSON ({e})") from None
    if type(doc) is not dict or doc.get("version") != VERSION:
        raise RemoteEventsError(f"not a version {VERSION} events object")
    window = _int(doc.get("window_ns"), 0, _I64, "window_ns")
    dropped = _int(doc.get("dropped", 0), 0, _I64, "dropped")
    raw = doc.get("events")
    if type(raw) is not list:
        raise RemoteEventsError("'events' is not a list")
    if len(raw) > MAX_EVENTS:
        raise RemoteEventsError(f"{len(raw)} events, more than {MAX_EVENTS}")
    return window, dropped, [_event(i, e, window) for i, e in enumerate(raw)]


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise RemoteEventsError(f"{what} is {_show(v)}, not an integer in [{lo}, {hi}]")
    return v


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _event(i: int, e: Any, window: int) -> Event:
    what = f"event {i}"
    if type(e) is not list or len(e) != 8:
        raise RemoteEventsError(f"{what} is not a list of 8 fields")
    name, start, end, thread, node, shapes, memory, stack = e
    if type(name) is not str or len(name) > MAX_NAME:
        raise RemoteEventsError(f"{what}: the name is {_show(name)}, not a text of at most {MAX_NAME} characters")
    what = f"{what} ({name[:60]!r})"
    start = _int(start, 0, window, f"{what}: start_ns")
    _int(end, start, window, f"{what}: end_ns")
    _int(thread, 0, _I64, f"{what}: thread")
    _int(node, -1, _U32, f"{what}: node_id")
    _int(memory, -_I64, _I64, f"{what}: cpu_memory_usage")
    if type(shapes) is not list or len(shapes) > MAX_INPUTS or not all(
            type(s) is list and len(s) <= MAX_DIMS and all(type(d) is int and 0 <= d <= _I64 for d in s)
            for s in shapes):
        raise RemoteEventsError(f"{what}: input_shapes is not a list of at most {MAX_INPUTS} shapes "
                                f"(lists of at most {MAX_DIMS} sizes)")
    if type(stack) is not list or len(stack) > MAX_FRAMES or not all(
            type(s) is str and len(s) <= MAX_FRAME for s in stack):
        raise RemoteEventsError(f"{what}: stack is not a list of at most {MAX_FRAMES} texts")
    return Event(name, start, end, thread, node, shapes, memory, tuple(stack))


def place(events: list[Event], window_ns: int, key: str, dest: int, sent_ns: int, received_ns: int) -> list[Event]:
    """A call's remote events on this worker's clock, named after the call (``key``): the callee's
    window of ``window_ns`` centered in the round trip [``sent_ns``, ``received_ns``]; the
    callee's own events get node id ``dest``."""
    base = sent_ns + max(0, (received_ns - sent_ns - window_ns) // 2)
    prefix = key + REMOTE_OP_STR
    return [e._replace(name=prefix + e.name, start_ns=base + e.start_ns, end_ns=base + e.end_ns,
                       node_id=dest if e.node_id < 0 else e.node_id) for e in events]
