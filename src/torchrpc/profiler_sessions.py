"""torch's profilers, taught to take events recorded elsewhere (the remote events of RPCs).

torch.distributed.rpc adds a call's remote events to the caller's profile in C++ (the legacy
profiler's event lists), which Python cannot reach. torchrpc keeps instead a *session* per run
of a profiler: it opens when the profiler starts on a thread, takes events from any thread (a
reply is read on a pool thread), and its events join the run's ``function_events`` when torch
turns its records into events. :func:`install` wraps, once, the few places of torch's profiler
classes that this needs:

* ``_start_trace`` of ``torch.autograd.profiler_legacy.profile`` and of
  ``torch.autograd.profiler.profile`` (which ``torch.profiler.profile`` drives) opens the
  thread's session, with the profiler's settings (``record_shapes``, ...);
* ``torch.autograd.profiler_legacy._parse_legacy_records``, which the legacy profiler's
  ``__exit__`` calls on its thread, closes the session and adds its events;
* ``torch.autograd.profiler.profile.__exit__`` closes the session, and
  ``_parse_kineto_results`` (run when the events are first read) adds its events.

Events that arrive once their profiler has stopped are dropped. Where torch lacks one of these
names nothing is wrapped: there are no sessions, and calls bring back no remote events.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, NamedTuple, Optional

import torch

#: The most events one session keeps; later ones are dropped (with one warning).
MAX_SESSION_EVENTS = 1_000_000
log = logging.getLogger("torchrpc")


class Event(NamedTuple):
    """One profiler event recorded outside torch's own lists. Times are ns of the wall clock
    (``time.time_ns()``), the clock of torch's profilers, or offsets where the user says so."""

    name: str
    start_ns: int
    end_ns: int
    thread: int
    node_id: int  # the worker it ran on; -1: this one
    input_shapes: list
    cpu_memory_usage: int = 0
    stack: tuple = ()


class Session:
    """One run of a torch profiler on one thread: its settings, and the events added to it
    from elsewhere (from any thread) while it is open."""

    def __init__(self, kind: str, record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False, with_flops: bool = False) -> None:
        self.kind = kind  # "legacy", "kineto" or "capture" (a callee's, see remote_events)
        self.record_shapes, self.profile_memory = record_shapes, profile_memory
        self.with_stack, self.with_flops = with_stack, with_flops
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._open = True
        self._full = False

    @property
    def open(self) -> bool:
        return self._open

    def add(self, events: list[Event]) -> None:
        """Add ``events`` (wall-clock times) if the session is still open; at most
        :data:`MAX_SESSION_EVENTS` in all, the rest dropped with a warning."""
        with self._lock:
            if not self._open:
                return
            room = MAX_SESSION_EVENTS - len(self._events)
            if len(events) > room:
                events = events[:max(room, 0)]
                if not self._full:
                    self._full = True
                    log.warning("torchrpc: this profile holds %d events of other workers; later ones are dropped",
                                MAX_SESSION_EVENTS)
            self._events.extend(events)

    def close(self) -> list[Event]:
        """Stop taking events; the events taken."""
        with self._lock:
            self._open = False
            return list(self._events)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)


_local = threading.local()


def current() -> Optional[Session]:
    """The open session of the profiler that records this thread, if any."""
    session = getattr(_local, "session", None)
    return session if session is not None and session.open else None


def begin(kind: str, **settings: bool) -> Session:
    """Open a session for this thread (it replaces any other)."""
    session = _local.session = Session(kind, **settings)
    return session


def end(session: Session) -> list[Event]:
    """Close ``session`` (and take it off its thread, if this is it); its events."""
    if getattr(_local, "session", None) is session:
        _local.session = None
    return session.close()


# --- turning sessions into torch's events -------------------------------------------


def function_events(events: list[Event], base_us: float, first_id: int, legacy: bool) -> list:
    """``events`` as torch's ``FunctionEvent``s of a profile that started at ``base_us`` (wall
    clock, in us); ids from ``first_id``. An event with a node id is remote (``is_remote``)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    out = []
    for i, e in enumerate(events):
        out.append(FunctionEvent(
            id=first_id + i, name=e.name, trace_name=e.name, thread=e.thread, fwd_thread=e.thread,
            start_us=e.start_ns / 1000 - base_us, end_us=e.end_ns / 1000 - base_us,
            input_shapes=[list(s) for s in e.input_shapes], stack=list(e.stack),
            cpu_memory_usage=e.cpu_memory_usage, is_remote=e.node_id >= 0, node_id=e.node_id,
            device_type=DeviceType.CPU, is_legacy=legacy, concrete_inputs=[], kwinputs={}))
    return out


def _merged(parsed: list, session: Session, base_us: float, legacy: bool) -> list:
    """torch's parsed events with the session's, in torch's order (start, then longest first)."""
    events = session.events()
    if not events:
        return parsed
    first_id = max((getattr(e, "id", 0) or 0 for e in parsed), default=0) + 1
    merged = list(parsed) + function_events(events, base_us, first_id, legacy)
    merged.sort(key=lambda evt: (evt.time_range.start, -evt.time_range.end))
    return merged


def legacy_start_us(thread_records: list) -> Optional[float]:
    """The wall-clock time (us) at which a legacy profiler run started, from its records."""
    for record in itertools.chain.from_iterable(thread_records):
        if record.name() == "__start_profile":
            return record.start_us()
    return None


#: torch's own ``_parse_legacy_records`` (a callee's capture parses with it, see remote_events)
parse_legacy: Optional[Callable[[list], list]] = None
_install_lock = threading.Lock()


def install() -> bool:
    """Wrap torch's profiler classes so that sessions exist (idempotent); whether they do."""
    global parse_legacy
    with _install_lock:
        if parse_legacy is not None:
            return True
        try:
            import torch.autograd.profiler as kineto
            import torch.autograd.profiler_legacy as legacy

            legacy_start, legacy_parse = legacy.profile._start_trace, legacy._parse_legacy_records
            kineto_start, kineto_exit = kineto.profile._start_trace, kineto.profile.__exit__
            kineto_parse = kineto.profile._parse_kineto_results
        except (ImportError, AttributeError):
            return False

        def settings(prof: Any) -> dict:
            return {name: bool(getattr(prof, name, False))
                    for name in ("record_shapes", "profile_memory", "with_stack", "with_flops")}

        def _start_trace_legacy(self: Any) -> None:
            legacy_start(self)
            begin("legacy", **settings(self))

        def _parse_legacy_records(thread_records: list) -> list:
            parsed = legacy_parse(thread_records)
            session = getattr(_local, "session", None)
            if session is None or session.kind != "legacy":
                return parsed
            end(session)
            base_us = legacy_start_us(thread_records)
            return parsed if base_us is None else _merged(parsed, session, base_us, legacy=True)

        def _start_trace_kineto(self: Any) -> None:
            kineto_start(self)
            self._torchrpc_session = begin("kineto", **settings(self))

        def __exit__(self: Any, exc_type: Any, exc_val: Any, exc_tb: Any) -> Any:
            session = getattr(self, "_torchrpc_session", None)
            if session is not None:
                end(session)
            return kineto_exit(self, exc_type, exc_val, exc_tb)

        def _parse_kineto_results(self: Any, result: Any, *args: Any, **kwargs: Any) -> list:
            parsed = kineto_parse(self, result, *args, **kwargs)
            session = getattr(self, "_torchrpc_session", None)
            if session is None:
                return parsed
            return _merged(parsed, session, result.trace_start_ns() / 1000, legacy=False)

        legacy.profile._start_trace = _start_trace_legacy
        legacy._parse_legacy_records = _parse_legacy_records
        kineto.profile._start_trace = _start_trace_kineto
        kineto.profile.__exit__ = __exit__
        kineto.profile._parse_kineto_results = _parse_kineto_results
        parse_legacy = legacy_parse
        return True
