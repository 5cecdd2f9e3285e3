"""Remote events: the callee of a profiled call runs it under torch's profiler and sends its events
back; they join the caller's profile as torch's RPC profiling adds them (``is_remote``, the callee's
node id, ``<rpc key>#remote_op: <name>``). Also: the legacy profiler records RPCs, distributed
backward's spans, and a peer's malformed events are dropped with a warning, never a failure."""
from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
from torch.autograd.profiler_legacy import profile as legacy_profile

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import init
from harness import run_workers
from torchrpc import profiler_sessions as sessions
from torchrpc import remote_events
from torchrpc.internal import RPCExecMode, _build_rpc_profiling_key
from torchrpc.protocol.messages import ProfileFlags
from torchrpc.remote_events import REMOTE_OP_STR, Capture, Event, RemoteEventsError, decode, place

pytestmark = pytest.mark.timeout(120)


# --- remote functions ------------------------------------------------------------------


def profiled_here():
    """Whether this callee runs the call under a profiler."""
    return torch.autograd._profiler_enabled()


def nested_add(dst):
    return rpc.rpc_sync(dst, torch.add, args=(torch.ones(2), torch.ones(2)))


def with_span():
    with torch.profiler.record_function("##inner##"):
        return torch.ones(64).sum()


def key(mode, func, dst, me="worker0"):
    return _build_rpc_profiling_key(mode, func, me, dst)


def summary(events):
    """(name, is_remote, node_id, input_shapes, cpu_memory_usage, start, end) of each event."""
    return [(e.name, e.is_remote, e.node_id, e.input_shapes, e.cpu_memory_usage, e.time_range.start, e.time_range.end)
            for e in events]


# --- the callee's events in the caller's profile ------------------------------------------


def _remote_events(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        t1, t2 = torch.ones(100), torch.ones(100)
        with legacy_profile(record_shapes=True, profile_memory=True) as prof:
            rpc.rpc_async("worker1", torch.add, args=(t1, t2)).wait()
            rpc.rpc_sync("worker1", nested_add, args=("worker2",))
            out["callee_profiled"] = rpc.rpc_sync("worker1", profiled_here)
            box = {}
            other = threading.Thread(target=lambda: box.update(v=rpc.rpc_sync("worker1", profiled_here)))
            other.start()
            other.join()
            out["other_thread_profiled"] = box["v"]
        out["legacy"] = summary(prof.function_events)
        with legacy_profile(record_shapes=True) as local:
            torch.add(t1, t2)
        out["local_add_shapes"] = next(e.input_shapes for e in local.function_events if e.name == "aten::add")
        with dist_autograd.context(), legacy_profile() as prof:  # the call and its reply in FORWARD_AUTOGRAD
            rpc.rpc_async("worker1", torch.mul, args=(torch.tensor(1.0, requires_grad=True),
                                                      torch.tensor(1.0, requires_grad=True))).wait()
        out["in_context"] = summary(prof.function_events)
        with torch.profiler.profile() as kineto:
            rpc.rpc_sync("worker1", with_span)
        out["kineto"] = summary(kineto.events())
        out["kineto_table"] = kineto.key_averages().table(row_limit=-1)
        out["unprofiled"] = rpc.rpc_sync("worker1", profiled_here)
    rpc.shutdown()
    return out


def test_callee_events_join_the_callers_profile_as_remote_events():
    out = run_workers(_remote_events, 3)[0]
    legacy = out["legacy"]
    add_key = key(RPCExecMode.ASYNC, "aten::add", "worker1")  # a builtin is named by its operator, as torch does
    (call,) = [e for e in legacy if e[0] == add_key]
    assert call[1] is False and call[2] == -1  # the call itself: a local event (the legacy profiler records RPCs)
    remote = [e for e in legacy if e[0].startswith(add_key + REMOTE_OP_STR)]
    assert remote and all(e[1] is True and e[2] == 1 for e in remote), remote
    (add,) = [e for e in remote if e[0] == add_key + REMOTE_OP_STR + "aten::add"]
    assert add[3] == out["local_add_shapes"] == [[100], [100], []]  # record_shapes reached the callee
    assert any(e[4] > 0 for e in remote)  # and so did profile_memory
    assert call[5] <= add[5] <= add[6] <= call[6]  # inside the round trip, on the caller's clock

    # a nested call: the callee's own call event, and worker2's events under both keys
    outer = key(RPCExecMode.SYNC, "nested_add", "worker1") + REMOTE_OP_STR
    inner = key(RPCExecMode.SYNC, "aten::add", "worker2", me="worker1")
    names = {e[0]: e for e in legacy}
    assert names[outer + inner][1:3] == (True, 1)
    assert names[outer + inner + REMOTE_OP_STR + "aten::add"][1:4] == (True, 2, [[2], [2], []])  # shapes, too

    # only a call from a profiled thread is profiled on the callee
    assert out["callee_profiled"] is True
    assert out["other_thread_profiled"] is False and out["unprofiled"] is False

    mul = key(RPCExecMode.ASYNC, "aten::mul", "worker1")
    remote_mul = [e for e in out["in_context"] if e[0] == mul + REMOTE_OP_STR + "aten::mul"]
    assert len(remote_mul) == 1 and remote_mul[0][1:3] == (True, 1), out["in_context"]

    span = key(RPCExecMode.SYNC, "with_span", "worker1")
    kineto = {e[0]: e for e in out["kineto"]}
    assert kineto[span + REMOTE_OP_STR + "##inner##"][1:3] == (True, 1)
    assert kineto[span + REMOTE_OP_STR + "aten::sum"][1:3] == (True, 1)
    assert all(e[4] == 0 for e in out["kineto"])  # no profile_memory: none on the callee either
    assert span + REMOTE_OP_STR in out["kineto_table"]  # key_averages takes them (names cut at 55)


# --- distributed backward -----------------------------------------------------------------


def _backward_profile(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        for name, profiler in (("kineto", torch.autograd.profiler.profile), ("legacy", legacy_profile)):
            with dist_autograd.context() as cid:
                t1 = torch.rand(3, 3, requires_grad=True)
                t2 = torch.rand(3, 3, requires_grad=True)
                loss = rpc.rpc_sync("worker1", torch.add, args=(t1, t2)).sum()
                with profiler() as prof:
                    dist_autograd.backward(cid, [loss])
                out[name] = summary(prof.function_events)
                out[name + "_grads"] = len(dist_autograd.get_gradients(cid))
    rpc.shutdown()
    return out


def test_distributed_backward_is_profiled_with_torchs_names():
    out = run_workers(_backward_profile, 2)[0]
    for name in ("kineto", "legacy"):
        events = out[name]
        (backward,) = [e for e in events if e[0] == "torch::distributed::autograd::backward"]
        (send,) = [e for e in events if "SendRpcBackward" in e[0]]
        (recv,) = [e for e in events if "RecvRpcBackward" in e[0]]
        assert backward[5] <= recv[5] <= send[5] <= backward[6], events  # the recv's node runs first
        assert out[name + "_grads"] == 2


# --- a peer's malformed events ------------------------------------------------------------

_BAD = {"text": None}


def send_back(text):
    """On the callee: profiled calls from now on bring back ``text`` as their events."""
    _BAD["text"] = text
    Capture.encode = lambda self: _BAD["text"]


def _event(**changes):
    e = {"name": "aten::add", "start": 1, "end": 2, "thread": 1, "node": -1, "shapes": [[2]], "memory": 0,
         "stack": []}
    e.update(changes)
    return list(e.values())


def _doc(events=None, **changes):
    doc = {"version": 1, "window_ns": 10, "dropped": 0, "events": [_event()] if events is None else events}
    doc.update(changes)
    return json.dumps(doc)


MALFORMED = {
    "not JSON": "{not json",
    "not an object": "[1, 2]",
    "another version": _doc(version=2),
    "nested too deep": "[" * 100_000 + "]" * 100_000,
    "events not a list": _doc(events={"a": 1}),
    "window negative": _doc(window_ns=-1),
    "window a float": _doc(window_ns=10.0),
    "a short event": _doc(events=[_event()[:7]]),
    "a name not text": _doc(events=[_event(name=7)]),
    "a name too long": _doc(events=[_event(name="x" * (remote_events.MAX_NAME + 1))]),
    "starts before the window": _doc(events=[_event(start=-1)]),
    "ends after the window": _doc(events=[_event(end=11)]),
    "ends before it starts": _doc(events=[_event(start=5, end=4)]),
    "a bool for a thread": _doc(events=[_event(thread=True)]),
    "a node id below -1": _doc(events=[_event(node=-2)]),
    "a huge number": _doc(events=[_event(memory=1 << 70)]),
    "shapes of text": _doc(events=[_event(shapes=[["2"]])]),
    "a negative size": _doc(events=[_event(shapes=[[-1]])]),
    "a stack of numbers": _doc(events=[_event(stack=[1])]),
    "too many events": _doc(events=[_event()] * (remote_events.MAX_EVENTS + 1)),
}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _malformed(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        records = _Records()
        logging.getLogger("torchrpc").addHandler(records)
        for what, text in [*MALFORMED.items(), ("dropped", _doc(dropped=5))]:
            rpc.rpc_sync("worker1", send_back, args=(text,))
            with legacy_profile() as prof:
                value = rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1))
                async_value = rpc.rpc_async("worker1", torch.add, args=(torch.ones(2), 2)).wait()
            out[what] = (value.tolist(), async_value.tolist(), [e.name for e in prof.function_events if e.is_remote])
        out["log"] = records.messages
    rpc.shutdown()
    return out


def test_malformed_events_from_a_peer_are_dropped_with_a_warning():
    out = run_workers(_malformed, 2)[0]
    for what in MALFORMED:
        value, async_value, remote = out[what]
        assert value == [2.0, 2.0] and async_value == [3.0, 3.0], what  # the call's result stands
        assert remote == [], what
    malformed = [line for line in out["log"] if "dropped the malformed profiler events" in line]
    assert len(malformed) == 2 * len(MALFORMED), out["log"]
    assert any("nesting" in line or "not JSON" in line for line in malformed)
    assert any("event 0 ('aten::add'): end_ns is 11" in line for line in malformed), malformed
    value, _, remote = out["dropped"]
    assert len(remote) == 2 and any("left out 5 of its profiler events" in line for line in out["log"])


# --- in one process: the capture, the text, the sessions ----------------------------------


@pytest.fixture(scope="module", autouse=True)
def _sessions():
    assert sessions.install()


def test_capture_records_the_function_with_the_callers_settings():
    def work(a, b):
        return torch.mul(a, b)

    for flags, shapes in ((ProfileFlags.EVENTS | ProfileFlags.SHAPES, [[3], [3]]), (ProfileFlags.EVENTS, [])):
        capture = Capture(flags)
        assert capture.wrap(work)(torch.ones(3), torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
        assert not torch.autograd._profiler_enabled()  # off again
        window, dropped, events = decode(capture.encode())
        (mul,) = [e for e in events if e.name == "aten::mul"]
        assert mul.input_shapes == shapes and mul.node_id == -1 and dropped == 0
        assert 0 <= mul.start_ns <= mul.end_ns <= window


def test_capture_keeps_async_execution_and_skips_a_profiled_thread():
    @rpc.functions.async_execution
    def later():
        fut = torch.futures.Future()
        fut.set_result(1)
        return fut

    assert rpc.functions.is_async_function(Capture(ProfileFlags.EVENTS).wrap(later))
    capture = Capture(ProfileFlags.EVENTS)
    with legacy_profile() as prof:  # a thread profiles once: the user's profiler keeps it
        capture.wrap(torch.ones)(2)
    assert decode(capture.encode())[2] == [] and any(e.name == "aten::ones" for e in prof.function_events)


def _long_span():
    with torch.profiler.record_function("y" * (remote_events.MAX_NAME + 5)):
        pass


def test_capture_cuts_what_the_caller_would_refuse():
    capture = Capture(ProfileFlags.EVENTS)
    capture.wrap(_long_span)()
    _, _, events = decode(capture.encode())
    assert max(len(e.name) for e in events) == remote_events.MAX_NAME


def test_decode_rejects_each_malformed_text():
    for what, text in MALFORMED.items():
        with pytest.raises(RemoteEventsError):
            decode(text)
    with pytest.raises(RemoteEventsError, match="expected text"):
        decode(b"{}")
    assert decode(_doc()) == (10, 0, [Event("aten::add", 1, 2, 1, -1, [[2]], 0, ())])


def test_place_centers_the_callees_window_in_the_round_trip():
    events = [Event("op", 0, 10, 1, -1, []), Event("rpc_sync#f(a -> b)#remote_op: op", 2, 4, 1, 5, [])]
    placed = place(events, 10, "K", 3, sent_ns=1000, received_ns=1030)
    assert [(e.name, e.start_ns, e.end_ns, e.node_id) for e in placed] == [
        ("K#remote_op: op", 1010, 1020, 3), ("K#remote_op: rpc_sync#f(a -> b)#remote_op: op", 1012, 1014, 5)]
    assert place(events, 50, "K", 3, 1000, 1030)[0].start_ns == 1000  # a longer window starts at the send


@pytest.mark.parametrize("profiler", [legacy_profile, torch.autograd.profiler.profile, torch.profiler.profile])
def test_a_session_takes_events_from_any_thread_until_its_profiler_stops(profiler):
    import time

    with profiler() as prof:
        session = sessions.current()
        assert session is not None
        now = time.time_ns()
        event = Event("remote thing", now, now + 5_000, 7, 2, [[4]], 16)
        worker = threading.Thread(target=session.add, args=([event],))
        worker.start()
        worker.join()
    session.add([event._replace(name="too late")])
    assert sessions.current() is None
    events = prof.events() if profiler is torch.profiler.profile else prof.function_events
    (got,) = [e for e in events if e.is_remote]
    assert (got.name, got.node_id, got.input_shapes, got.cpu_memory_usage, got.thread) == ("remote thing", 2, [[4]], 16, 7)
    assert got.time_range.end - got.time_range.start == pytest.approx(5, abs=0.01)
    assert 0 <= got.time_range.start < 60_000_000


def test_profiling_enabled_under_every_profiler():
    from torchrpc import profiling

    assert not profiling.enabled()
    for profiler in (legacy_profile, torch.autograd.profiler.profile, torch.profiler.profile):
        with profiler():
            assert profiling.enabled()
    assert not profiling.enabled()
