"""Unit tests of the runtime parts (src/torchrpc/runtime/, transport/loopback.py) and of the
message header layouts (protocol/messages.py), without processes or sockets.

Time is a fake clock wherever a part takes one (``PendingTable(clock=...)``,
``Heartbeats.check(now)``, ``Leases(..., now)``); threads appear only in the tests of
what is about threads (races, a blocked ``recv``, a waiter woken), each short and joined.
"""
from __future__ import annotations

import struct
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import torchrpc.runtime.faults as faults_mod
import torchrpc.runtime.reader as reader_mod
from torchrpc.errors import (ProtocolError, RPCError, RPCTimeoutError, UnknownWorkerError,
                             WorkerUnavailableError)
from torchrpc.protocol import messages as m
from torchrpc.protocol.messages import GloballyUniqueId as Gid
from torchrpc.runtime.faults import Faults, FaultyConnection
from torchrpc.runtime.heartbeat import HEARTBEAT_MISSES, Heartbeats
from torchrpc.runtime.lease import Leases, LeaseState, ReadLease
from torchrpc.runtime.peers import PeerTable
from torchrpc.runtime.pending import ANYONE, CLAIM, WAITER, PendingTable
from torchrpc.runtime.reader import Readers
from torchrpc.runtime.registry import Handler, HandlerRegistry, Run
from torchrpc.runtime.watchdog import Watchdog
from torchrpc.transport import ConnectionClosed
from torchrpc.transport.loopback import LoopbackConnection
from torchrpc.worker_info import WorkerInfo

pytestmark = pytest.mark.timeout(30)

JOIN_S = 5.0  # the longest any test waits for a thread it started


class FakeClock:
    """A clock the test advances by hand: ``clock()`` reads it."""

    def __init__(self, start: float = 100.0) -> None:
        self.t = [start]

    def __call__(self) -> float:
        return self.t[0]

    def advance(self, dt: float) -> None:
        self.t[0] += dt


class Calls:
    """A callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, *args) -> None:
        self.calls.append(args)


def wire(frame):
    """What arrives on the other side: every buffer a fresh bytearray."""
    return [bytearray(b) for b in frame]


def run_threads(target, n: int, *args) -> None:
    threads = [threading.Thread(target=target, args=(i, *args)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"


# =====================================================================================
# PendingTable
# =====================================================================================


def test_pending_ids_increase_and_entries_keep_what_was_added():
    table = PendingTable(clock=FakeClock())
    cb = Calls()
    ids = [table.add(i % 3, f"req{i}", 0, cb, reader=r) for i, r in enumerate([CLAIM, WAITER, ANYONE, CLAIM])]
    assert ids == sorted(ids) and len(set(ids)) == 4 and ids[0] >= 1
    e = table.get(ids[1])
    assert (e.dest, e.desc, e.timeout, e.deadline, e.callback, e.reader) == (1, "req1", 0, 0.0, cb, WAITER)
    assert table.get(ids[2]).reader == ANYONE
    assert table.get(12345) is None
    assert len(table) == 4
    # ids are never reused, even after the table empties
    table.take_all()
    assert table.add(0, "again", 0, cb) > ids[-1]


def test_pending_expects_is_per_peer():
    table = PendingTable(clock=FakeClock())
    a = table.add(1, "a", 0, Calls())
    b = table.add(1, "b", 0, Calls())
    c = table.add(2, "c", 0, Calls())
    assert table.expects(1) and table.expects(2) and not table.expects(0) and not table.expects(3)
    table.pop(a)
    assert table.expects(1)
    table.pop(b)
    assert not table.expects(1) and table.expects(2)
    table.pop(c)
    assert not table.expects(2)
    assert len(table) == 0


def test_pending_pop_runs_once():
    table = PendingTable(clock=FakeClock())
    i = table.add(1, "a", 5.0, Calls())
    first = table.pop(i)
    assert first is not None and first.desc == "a"
    assert table.pop(i) is None
    assert table.pop_reply(i, 1) is None
    assert table.get(i) is None
    assert not table.expects(1) and len(table) == 0


def test_pending_pop_reply_refuses_the_wrong_source_and_keeps_the_entry():
    table = PendingTable(clock=FakeClock())
    i = table.add(1, "a", 0, Calls())
    assert table.pop_reply(i, 2) is None
    assert table.get(i) is not None and len(table) == 1 and table.expects(1)
    assert not table.expects(2)
    e = table.pop_reply(i, 1)
    assert e is not None and e.dest == 1
    assert table.pop_reply(i, 1) is None and len(table) == 0 and not table.expects(1)
    assert table.pop_reply(999, 1) is None


def test_pending_expired_with_a_fake_clock():
    clock = FakeClock(10.0)
    table = PendingTable(clock=clock)
    short = table.add(1, "short", 1.0, Calls())
    mid = table.add(2, "mid", 2.0, Calls())
    popped = table.add(1, "popped", 1.0, Calls())
    never = table.add(1, "never", 0, Calls())
    long_ = table.add(3, "long", 10.0, Calls())
    assert table.get(short).deadline == 11.0 and table.get(never).deadline == 0.0
    assert table.expired() == []
    assert table.pop(popped) is not None

    clock.advance(0.999)
    assert table.expired() == []
    clock.advance(0.001)  # exactly at the deadline: past it
    assert [e.desc for e in table.expired()] == ["short"]
    assert table.expired() == []  # taken: never twice
    assert table.get(short) is None and table.get(mid) is not None

    clock.advance(5.0)
    assert [e.desc for e in table.expired()] == ["mid"]
    assert not table.expects(2) and table.expects(1) and table.expects(3)

    clock.advance(1e9)  # timeout 0 never expires
    assert [e.desc for e in table.expired()] == ["long"]
    assert table.get(never) is not None and len(table) == 1 and table.expects(1)
    assert table.pop(long_) is None


def test_pending_expired_returns_in_deadline_order_and_skips_taken_entries():
    clock = FakeClock(0.0)
    table = PendingTable(clock=clock)
    c = table.add(1, "c", 3.0, Calls())
    a = table.add(1, "a", 1.0, Calls())
    b = table.add(2, "b", 2.0, Calls())
    d = table.add(2, "d", 2.5, Calls())
    table.take_peer(2)  # b and d are gone
    clock.advance(10)
    assert [e.desc for e in table.expired()] == ["a", "c"]
    assert table.get(a) is table.get(b) is table.get(c) is table.get(d) is None
    # after take_all nothing expires, however late
    table.add(1, "x", 1.0, Calls())
    table.take_all()
    clock.advance(10)
    assert table.expired() == [] and len(table) == 0


def test_pending_take_peer_take_all_descriptions_len():
    table = PendingTable(clock=FakeClock())
    for dest, desc in [(1, "a"), (2, "b"), (1, "c"), (3, "d")]:
        table.add(dest, desc, 1.0, Calls())
    assert len(table) == 4
    assert sorted(table.descriptions()) == [(1, "a"), (1, "c"), (2, "b"), (3, "d")]
    assert sorted(table.descriptions(1)) == [(1, "a"), (1, "c")]
    assert table.descriptions(7) == []

    taken = table.take_peer(1)
    assert sorted(e.desc for e in taken) == ["a", "c"]
    assert not table.expects(1) and table.expects(2) and len(table) == 2
    assert table.take_peer(1) == []
    assert sorted(table.descriptions()) == [(2, "b"), (3, "d")]
    # a new request to the peer after take_peer counts again
    table.add(1, "e", 0, Calls())
    assert table.expects(1) and len(table) == 3

    rest = table.take_all()
    assert sorted(e.desc for e in rest) == ["b", "d", "e"]
    assert len(table) == 0 and table.descriptions() == []
    assert not any(table.expects(p) for p in range(5))
    assert table.take_all() == []


def test_pending_pop_races_have_one_winner_per_entry():
    table = PendingTable(clock=FakeClock())
    ids = [table.add(i % 4, str(i), 1.0, Calls()) for i in range(2000)]
    wins: list[list[int]] = [[] for _ in range(6)]
    start = threading.Barrier(6)

    def taker(k):
        start.wait()
        for i in ids:
            if (table.pop(i) if k % 2 else table.pop_reply(i, i % 4 if k != 4 else (i + 1) % 4)) is not None:
                wins[k].append(i)

    run_threads(taker, 6)
    won = sorted(i for w in wins for i in w)
    assert won == ids  # every entry taken exactly once
    assert wins[4] == []  # the wrong source never wins
    assert len(table) == 0 and not any(table.expects(p) for p in range(4))


class PendingMachine(RuleBasedStateMachine):
    """PendingTable against a model dict: id -> (dest, deadline or None)."""

    PEERS = range(4)

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.table = PendingTable(clock=self.clock)
        self.model: dict[int, tuple[int, float | None]] = {}
        self.objs: dict[int, object] = {}
        self.taken: set[int] = set()
        self.last_id = 0

    def _check_taken(self, entries):
        ids = [i for i, o in self.objs.items() if any(o is e for e in entries)]
        assert len(ids) == len(entries)
        assert not self.taken & set(ids), "an entry was taken twice"
        self.taken |= set(ids)
        for i in ids:
            del self.model[i]
        return set(ids)

    @rule(dest=st.sampled_from(PEERS), timeout=st.sampled_from([0, 0.5, 1.0, 2.5]))
    def add(self, dest, timeout):
        i = self.table.add(dest, f"to{dest}", timeout, Calls())
        assert i > self.last_id
        self.last_id = i
        self.model[i] = (dest, self.clock() + timeout if timeout > 0 else None)
        self.objs[i] = self.table.get(i)

    @rule(data=st.data())
    def pop(self, data):
        i = data.draw(st.integers(1, self.last_id + 1))
        e = self.table.pop(i)
        assert (e is not None) == (i in self.model)
        if e is not None:
            assert self._check_taken([e]) == {i}

    @rule(data=st.data(), src=st.sampled_from(PEERS))
    def pop_reply(self, data, src):
        i = data.draw(st.integers(1, self.last_id + 1))
        e = self.table.pop_reply(i, src)
        assert (e is not None) == (i in self.model and self.model[i][0] == src)
        if e is not None:
            assert self._check_taken([e]) == {i}

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
    def advance(self, dt):
        self.clock.advance(dt)

    @rule()
    def expired(self):
        now = self.clock()
        due = {i for i, (_, dl) in self.model.items() if dl is not None and dl <= now}
        assert self._check_taken(self.table.expired()) == due

    @rule(peer=st.sampled_from(PEERS))
    def take_peer(self, peer):
        want = {i for i, (d, _) in self.model.items() if d == peer}
        assert self._check_taken(self.table.take_peer(peer)) == want

    @rule()
    def take_all(self):
        want = set(self.model)
        assert self._check_taken(self.table.take_all()) == want

    @invariant()
    def counts(self):
        assert len(self.table) == len(self.model)
        for p in self.PEERS:
            assert self.table.expects(p) == any(d == p for d, _ in self.model.values())
        assert sorted(self.table.descriptions()) == sorted((d, f"to{d}") for d, _ in self.model.values())
        assert sorted(self.table.descriptions(1)) == sorted((1, "to1") for d, _ in self.model.values() if d == 1)


TestPendingModel = PendingMachine.TestCase
TestPendingModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None, database=None,
                                     suppress_health_check=list(HealthCheck))


# =====================================================================================
# Leases
# =====================================================================================


def lease(peer: int = 1) -> ReadLease:
    return ReadLease(peer, LoopbackConnection(f"w{peer}"))


def test_lease_begin_and_end_frame():
    leases, ls = Leases(), lease()
    assert ls.state is LeaseState.READING and not leases.active
    assert not leases.end_frame(ls)  # not busy: nothing to end
    leases.begin_frame(ls, 5.0)
    assert ls.state is LeaseState.BUSY and ls.since == 5.0 and leases.active
    assert leases.holds(ls, 1) and not leases.holds(ls, 2) and not leases.holds(None, 1)
    assert leases.end_frame(ls)
    assert ls.state is LeaseState.READING and not leases.active
    assert not leases.holds(ls, 1)
    # the hand-off race: whoever comes second finds the lease gone
    leases.begin_frame(ls, 6.0)
    assert leases.end_frame(ls) is True
    assert leases.end_frame(ls) is False
    assert ls.state is LeaseState.READING


def test_lease_holds_only_this_lease():
    leases, a, b = Leases(), lease(1), lease(1)
    leases.begin_frame(a, 0.0)
    assert leases.holds(a, 1) and not leases.holds(b, 1)


def test_lease_leave_free_and_take_free_once():
    leases, ls = Leases(), lease(3)
    assert leases.take_free(3) is None
    leases.leave_free(ls, 7.0)
    assert ls.state is LeaseState.FREE and ls.since == 7.0
    assert not leases.active  # a free lease is the watcher's, not the monitor's
    assert leases.take_free(2) is None
    assert leases.take_free(3) is ls
    assert ls.state is LeaseState.READING
    assert leases.take_free(3) is None


def test_lease_take_takes_only_that_lease():
    leases, old, new = Leases(), lease(3), lease(3)
    assert not leases.take(old)  # not free
    leases.leave_free(old, 1.0)
    assert leases.take(old) and old.state is LeaseState.READING
    assert not leases.take(old)  # once
    # a newer connection's lease for the same peer is free: the watcher's stale wake-up for
    # the old one must not take it, and must leave it free
    leases.leave_free(new, 2.0)
    assert not leases.take(old)
    assert leases.free == {3: new} and new.state is LeaseState.FREE
    assert leases.take_free(3) is new


def test_lease_overdue_picks_only_leases_past_the_threshold():
    leases = Leases()
    old, young, free = lease(1), lease(2), lease(3)
    leases.begin_frame(old, 0.0)
    leases.begin_frame(young, 9.5)
    leases.leave_free(free, 0.0)
    assert leases.overdue(10.0, busy_after=1.0) == [old]
    # at the threshold exactly: overdue; free leases never are
    assert set(leases.overdue(10.0, busy_after=0.5)) == {old, young}
    assert leases.overdue(10.0, busy_after=0.5 + 1e-9) == [old]
    # overdue only reports: the caller still races for them
    assert leases.end_frame(old)
    assert leases.overdue(20.0, busy_after=1.0) == [young]
    # a lease that began a new frame is judged from its new start
    assert leases.end_frame(young)
    leases.begin_frame(young, 19.5)
    assert leases.overdue(20.0, busy_after=1.0) == []


def test_lease_end_frame_race_has_exactly_one_winner():
    leases = Leases()
    all_leases = [lease(i % 5) for i in range(3000)]
    for ls in all_leases:
        leases.begin_frame(ls, 0.0)
    n = 8
    wins = [0] * len(all_leases)
    counts = [[0] * len(all_leases) for _ in range(n)]
    start = threading.Barrier(n)

    def racer(k):
        start.wait()
        mine = counts[k]
        for j, ls in enumerate(all_leases):
            if leases.end_frame(ls):
                mine[j] += 1

    run_threads(racer, n)
    for k in range(n):
        for j in range(len(all_leases)):
            wins[j] += counts[k][j]
    assert wins == [1] * len(all_leases)
    assert not leases.active
    assert all(ls.state is LeaseState.READING for ls in all_leases)


def test_lease_take_free_race_has_exactly_one_winner():
    leases = Leases()
    rounds = 500
    got: list[list[int]] = [[] for _ in range(6)]

    for r in range(0, rounds, 100):  # 100 peers free at once per batch
        for p in range(r, r + 100):
            leases.leave_free(lease(p), 0.0)
        start = threading.Barrier(6)

        def racer(k, lo=r):
            start.wait()
            for p in range(lo, lo + 100):
                if leases.take_free(p) is not None:
                    got[k].append(p)

        run_threads(racer, 6)
    assert sorted(p for g in got for p in g) == list(range(rounds))
    assert not leases.free


# =====================================================================================
# HandlerRegistry
# =====================================================================================


def test_registry_register_get_and_policy():
    reg = HandlerRegistry()
    f, g = Calls(), Calls()
    reg.register(m.PythonCall, f, Run.INLINE)
    reg.register(m.BackwardDiscover, g, Run.HAND_OFF)
    assert reg.get(m.PythonCall) == Handler(f, Run.INLINE)
    assert reg.get(m.BackwardDiscover).run is Run.HAND_OFF
    assert reg.get(m.RRefFetchCall) is None


def test_registry_refuses_replies_and_double_registration():
    reg = HandlerRegistry()
    for mtype in sorted(m.REPLY_TYPES):
        with pytest.raises(ValueError, match="reply"):
            reg.register(m._REGISTRY[mtype], Calls(), Run.INLINE)
    with pytest.raises(ValueError, match="reply"):
        reg.register(m.PythonReturn, Calls(), Run.INLINE)
    assert reg.get(m.PythonReturn) is None and reg.table() == {}
    f = Calls()
    reg.register(m.PythonCall, f, Run.INLINE)
    with pytest.raises(ValueError, match="already"):
        reg.register(m.PythonCall, Calls(), Run.HAND_OFF)
    assert reg.get(m.PythonCall) == Handler(f, Run.INLINE)  # the first stays


def test_registry_wrap_keeps_the_policy():
    reg = HandlerRegistry()
    seen = []
    reg.register(m.PropagateGradients, lambda src, msg, tag: seen.append(("inner", src)), Run.HAND_OFF)

    def spy(fn):
        def wrapped(src, msg, tag):
            seen.append(("spy", src))
            fn(src, msg, tag)
        return wrapped

    reg.wrap(m.PropagateGradients, spy)
    h = reg.get(m.PropagateGradients)
    assert h.run is Run.HAND_OFF
    h.fn(3, None, None)
    assert seen == [("spy", 3), ("inner", 3)]
    with pytest.raises(KeyError):
        reg.wrap(m.PythonCall, spy)


def test_registry_table_names_types_and_policies_in_type_order():
    reg = HandlerRegistry()
    reg.register(m.RRefBackward, Calls(), Run.INLINE)
    reg.register(m.PythonCall, Calls(), Run.INLINE)
    reg.register(m.PropagateGradients, Calls(), Run.HAND_OFF)
    table = reg.table()
    assert table == {"PYTHON_CALL": "inline", "BACKWARD_AUTOGRAD_REQ": "hand off",
                     "RREF_BACKWARD_REQ": "inline"}
    assert list(table) == ["PYTHON_CALL", "BACKWARD_AUTOGRAD_REQ", "RREF_BACKWARD_REQ"]


# =====================================================================================
# Readers.dispatch
# =====================================================================================


class StubPool:
    def __init__(self) -> None:
        self.submitted: list[tuple] = []

    def submit(self, fn, *args) -> None:
        self.submitted.append((fn, args))


class Dispatch:
    """A Readers with fake collaborators, for dispatch alone."""

    def __init__(self) -> None:
        self.peers = PeerTable(0, "w0")
        self.peers.set_workers(["w0", "w1", "w2"])
        self.pending = PendingTable(clock=FakeClock())
        self.registry = HandlerRegistry()
        self.pool = StubPool()
        self.errors = Calls()
        self.readers = Readers("w0", self.peers, self.pending, self.registry, self.pool,
                               reply_error=self.errors, closing=lambda: False)
        self.call = Calls()
        self.registry.register(m.PythonCall, self.call, Run.INLINE)
        self.registry.register(m.PropagateGradients, Calls(), Run.HAND_OFF)

    def __call__(self, src, msg_or_frame):
        frame = msg_or_frame.encode() if isinstance(msg_or_frame, m.Message) else msg_or_frame
        return self.readers.dispatch(src, wire(frame))


@pytest.fixture
def d():
    return Dispatch()


def test_dispatch_request_returns_its_job(d):
    job = d(1, m.PythonCall(5, m.Payload(b"pickled"), m.ProfileFlags.TIME))
    fn, args, run = job
    assert fn is d.call and run is Run.INLINE
    src, msg, tag = args
    assert (src, tag) == (1, None)
    assert type(msg) is m.PythonCall and msg.msg_id == 5 and msg.profile == m.ProfileFlags.TIME
    assert bytes(msg.payload.data) == b"pickled"
    assert d.call.calls == [] and d.errors.calls == []  # dispatch only finds the job
    assert d.pool.submitted == []

    fn, args, run = d(2, m.PropagateGradients(6, 1, 2, [3], [None]))
    assert run is Run.HAND_OFF and args[0] == 2 and type(args[1]) is m.PropagateGradients


def test_dispatch_forward_autograd_request_returns_its_tag(d):
    tag = m.AutogradTag(context_id=-7, autograd_message_id=3, converges=True)
    fn, (src, msg, got), run = d(2, tag.wrap(m.PythonCall(9, m.Payload(b"x"))))
    assert fn is d.call and run is Run.INLINE and src == 2
    assert type(msg) is m.PythonCall and msg.msg_id == 9  # unwrapped
    assert got == tag and isinstance(got, m.AutogradTag)


@pytest.mark.parametrize("who, expected", [(WAITER, "LED"), (CLAIM, None), (ANYONE, None)])
def test_dispatch_reply_completes_the_pending_callback(d, who, expected):
    cb = Calls()
    i = d.pending.add(1, "call", 5.0, cb, reader=who)
    out = d(1, m.PythonReturn(i, m.Payload(b"result"), 77))
    assert out is (reader_mod.LED if expected == "LED" else None)
    assert len(cb.calls) == 1
    reply, error = cb.calls[0]
    assert error is None and type(reply) is m.PythonReturn and reply.msg_id == i and reply.remote_ns == 77
    assert d.pending.get(i) is None and not d.pending.expects(1)
    # the same reply again (a duplicate, or one that came after a timeout): dropped
    assert d(1, m.PythonReturn(i, m.Payload(b"again"))) is None
    assert len(cb.calls) == 1 and d.errors.calls == []


def test_dispatch_forward_autograd_reply_completes_the_callback(d):
    cb = Calls()
    i = d.pending.add(2, "call", 0, cb, reader=WAITER)
    assert d(2, m.AutogradTag(4).wrap(m.PythonReturn(i, m.Payload(b"r")))) is reader_mod.LED
    (reply, error), = cb.calls
    assert error is None and reply.msg_id == i and reply.IS_REPLY


def test_dispatch_reply_from_the_wrong_worker_leaves_the_entry_pending(d):
    cb = Calls()
    i = d.pending.add(1, "call", 5.0, cb, reader=WAITER)
    assert d(2, m.PythonReturn(i, m.Payload(b"forged"))) is None
    assert cb.calls == [] and d.pending.get(i) is not None and d.pending.expects(1)
    assert d.errors.calls == []  # a reply is never answered
    assert d(1, m.RRefAck(i)) is reader_mod.LED
    assert len(cb.calls) == 1 and type(cb.calls[0][0]) is m.RRefAck


def test_dispatch_heartbeat_returns_none(d):
    i = d.pending.add(1, "call", 0, Calls())
    assert d(1, m.Heartbeat(0)) is None
    assert d(1, m.Heartbeat(i)) is None  # even one that carries a pending id
    assert d.pending.get(i) is not None and d.errors.calls == [] and d.call.calls == []


@pytest.mark.parametrize("frame", [
    [struct.pack("<BQ", m.MessageType.PYTHON_CALL, 42), b"payload"],  # header without the profile flag
    [struct.pack("<BQH", m.MessageType.PYTHON_CALL, 42, 2), b"payload"],  # profile flags are one byte
    [struct.pack("<BQB", m.MessageType.PYTHON_CALL, 42, 0)],  # no payload
    [struct.pack("<BQ", 99, 42)],  # unknown type
    [struct.pack("<BQqQB", m.MessageType.FORWARD_AUTOGRAD, 42, 1, 0, 0),
     struct.pack("<BQ", m.MessageType.PYTHON_CALL, 42), b"p"],  # a malformed request inside
], ids=["short-header", "long-header", "no-payload", "unknown-type", "wrapped"])
def test_dispatch_malformed_request_returns_an_error_job(d, frame):
    job = d(1, frame)
    assert job is not None and job is not reader_mod.LED
    fn, args, run = job
    assert run is Run.INLINE and d.errors.calls == []
    fn(*args)
    (src, msg_id, exc), = d.errors.calls
    assert (src, msg_id) == (1, 42) and isinstance(exc, ProtocolError)
    assert d.call.calls == []


@pytest.mark.parametrize("wrapped", [False, True])
def test_dispatch_malformed_reply_is_never_answered(d, wrapped):
    cb = Calls()
    i = d.pending.add(1, "call", 0, cb, reader=WAITER)
    frame = [struct.pack("<BQ", m.MessageType.PYTHON_RET, i), b"payload"]  # no remote_ns
    if wrapped:
        frame = [struct.pack("<BQqQB", m.MessageType.FORWARD_AUTOGRAD, i, 1, 0, 0), *frame]
    assert d(1, frame) is None
    assert d.errors.calls == [] and cb.calls == []
    assert d.pending.get(i) is not None  # still waits: for its timeout


def test_dispatch_unregistered_request_gets_an_error_job(d):
    for msg in (m.RRefFetchCall(11, Gid(1, 2)), m.Hello(12, 1, "w1"),
                m.AutogradTag(3).wrap(m.CleanupAutogradContext(13, 3))):
        fn, args, run = d(2, msg)
        assert run is Run.INLINE
        fn(*args)
        src, msg_id, exc = d.errors.calls[-1]
        assert (src, msg_id) == (2, msg.msg_id)
        assert isinstance(exc, ProtocolError) and "not a request" in str(exc)
    assert len(d.errors.calls) == 3


def test_dispatch_stray_reply_returns_none(d):
    assert d(1, m.RRefAck(1234)) is None
    assert d.errors.calls == []


# =====================================================================================
# PeerTable
# =====================================================================================


@pytest.fixture
def peers():
    p = PeerTable(0, "w0")
    p.set_workers(["w0", "w1", "w2"])
    return p


def test_errors_are_runtime_errors_of_the_right_kinds():
    assert issubclass(UnknownWorkerError, RPCError) and issubclass(UnknownWorkerError, ValueError)
    assert issubclass(WorkerUnavailableError, RPCError) and issubclass(WorkerUnavailableError, ConnectionError)
    assert issubclass(RPCTimeoutError, TimeoutError) and issubclass(RPCError, RuntimeError)
    assert issubclass(ProtocolError, RPCError)


def test_peers_set_workers_rejects_duplicate_names():
    p = PeerTable(0, "a")
    p.set_workers(["a", "b"])
    with pytest.raises(ValueError, match=r"unique.*\['a'\].*\[0, 2\]"):
        p.set_workers(["a", "b", "a"])
    assert [w.name for w in p.workers] == ["a", "b"]  # unchanged
    with pytest.raises(ValueError):
        p.set_workers(["x", "y", "y", "x"])


def test_peers_wait_workers():
    p = PeerTable(0, "w0")
    assert p.wait_workers(0.01) is False
    p.set_workers(["w0"])
    assert p.wait_workers(0.01) is True


def test_peers_resolve(peers):
    assert peers.resolve(None) == WorkerInfo("w0", 0) == peers.me
    assert peers.resolve("w2") == WorkerInfo("w2", 2)
    assert peers.resolve(1) == WorkerInfo("w1", 1)
    assert peers.resolve(WorkerInfo("w1", 1)) == WorkerInfo("w1", 1)
    assert peers.name_of(2) == "w2" and peers.name_of(9) == "9"
    for bad in ("w3", 3, -1, WorkerInfo("w1", 2), WorkerInfo("w9", 1), WorkerInfo("w0", 7)):
        with pytest.raises(UnknownWorkerError):
            peers.resolve(bad)
    for bad in (1.0, True, b"w1", ["w1"]):
        with pytest.raises(ValueError, match="Cannot get WorkerInfo from name"):
            peers.resolve(bad)


def test_peers_lost_reports_once_and_tells_listeners(peers):
    told, also = Calls(), Calls()
    peers.on_lost(told)
    peers.on_lost(also)
    c1 = LoopbackConnection("w1")
    peers.add(1, c1)
    assert peers.is_alive(1) and peers.is_alive(0)
    assert peers.lost(1, c1, "the wire broke") is True
    assert peers.lost(1, c1, "again") is False
    assert len(told.calls) == len(also.calls) == 1
    peer, err = told.calls[0]
    assert peer == 1 and isinstance(err, WorkerUnavailableError)
    assert "'w1'" in str(err) and "the wire broke" in str(err)
    assert not peers.is_alive(1) and peers.is_alive(2) and peers.is_alive(0)
    assert peers.dead[1] == "the wire broke"
    assert 1 not in peers.conns
    with pytest.raises(ConnectionClosed):
        c1.recv()  # lost() closes the connection
    assert not peers.is_alive(1)


def test_peers_lost_with_a_stale_connection_keeps_the_current_one(peers):
    told = Calls()
    peers.on_lost(told)
    old, new = LoopbackConnection("old"), LoopbackConnection("new")
    peers.add(1, new)
    assert peers.lost(1, old, "stale") is False
    assert peers.conns[1] is new and told.calls == [] and peers.is_alive(1)
    with pytest.raises(ConnectionClosed):
        old.send([b"x"])  # closed anyway


def test_peers_lost_after_close_tells_nobody(peers):
    told = Calls()
    peers.on_lost(told)
    c = LoopbackConnection("w1")
    peers.add(1, c)
    assert peers.close() == [c]
    assert peers.lost(1, c, "shutdown") is False and told.calls == []


def test_peers_connection(peers):
    c1 = LoopbackConnection("w1")
    peers.add(1, c1)
    assert peers.connection(1, 0.0) is c1
    t = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match="not connected"):
        peers.connection(2, 0.05)
    assert time.monotonic() - t < 2.0

    peers.lost(1, c1, "gone away")
    t = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match="'w1'.*gone away"):
        peers.connection(1, 10.0)  # a dead peer: at once, not after the wait
    assert time.monotonic() - t < 1.0


def test_peers_connection_waits_for_a_peer_that_connects(peers):
    c2 = LoopbackConnection("w2")
    got = []
    t = threading.Thread(target=lambda: got.append(peers.connection(2, JOIN_S)))
    t.start()
    time.sleep(0.02)
    peers.add(2, c2)
    t.join(JOIN_S)
    assert not t.is_alive() and got == [c2]


def test_peers_connection_fails_fast_while_the_peer_is_being_lost(peers):
    """A thread that looks up a peer's connection while the peer is being lost must fail as
    soon as the loss is recorded, not after its whole wait (for a send: the rpc timeout).

    PeerTable.lost removes the connection and notifies under the lock, but records the
    peer as dead only after ``conn.close()``, outside the lock, and without notifying
    again: a waiter that looked in between sleeps out its whole wait."""

    class SlowClose(LoopbackConnection):
        def __init__(self):
            super().__init__("w1")
            self.closing, self.go = threading.Event(), threading.Event()

        def close(self):
            self.closing.set()
            self.go.wait(JOIN_S)
            super().close()

    conn = SlowClose()
    peers.add(1, conn)
    loser = threading.Thread(target=peers.lost, args=(1, conn, "broke"))
    loser.start()
    assert conn.closing.wait(JOIN_S)
    result = {}

    def look():
        t = time.monotonic()
        try:
            peers.connection(1, 2.0)
        except WorkerUnavailableError as e:
            result["error"] = e
        result["took"] = time.monotonic() - t

    looker = threading.Thread(target=look)
    looker.start()
    for _ in range(200):  # until the looker waits (or, failing that, 1 s)
        with peers.changed:
            if peers.changed._waiters:
                break
        time.sleep(0.005)
    conn.go.set()
    loser.join(JOIN_S)
    looker.join(JOIN_S)
    assert not loser.is_alive() and not looker.is_alive()
    assert isinstance(result.get("error"), WorkerUnavailableError)
    assert result["took"] < 1.0, f"connection() waited {result['took']:.2f} s for a peer already lost"


def test_peers_wait_connected(peers):
    peers.add(1, LoopbackConnection("w1"))
    assert peers.missing() == ["w2"]
    t = time.monotonic()
    with pytest.raises(RPCError, match=r"\['w2'\]") as info:
        peers.wait_connected(0.05)
    assert "w1" not in str(info.value)
    assert time.monotonic() - t < 2.0
    peers.add(2, LoopbackConnection("w2"))
    assert peers.missing() == []
    peers.wait_connected(0.0)  # this worker's own rank need not be connected


def test_peers_peers_excludes_this_worker(peers):
    me, c1, c2 = LoopbackConnection("me"), LoopbackConnection("w1"), LoopbackConnection("w2")
    peers.add(0, me)
    peers.add(1, c1)
    peers.add(2, c2)
    assert sorted(peers.peers(), key=lambda pc: pc[0]) == [(1, c1), (2, c2)]
    c1.send([b"abc"])
    assert peers.stats(1) == {"msgs_sent": 1, "bytes_sent": 3, "msgs_received": 0, "bytes_received": 0}
    assert peers.stats(5) == {"msgs_sent": 0, "bytes_sent": 0, "msgs_received": 0, "bytes_received": 0}


# =====================================================================================
# LoopbackConnection
# =====================================================================================


def test_loopback_frames_come_back_in_order_copied():
    conn = LoopbackConnection("w0")
    assert conn.peer == "loopback:w0"
    first = [bytearray(b"abc"), b"de", memoryview(b"fgh")]
    conn.send(first)
    conn.send([b"second"])
    first[0][0] = ord("z")  # the sender reuses its buffer
    got = conn.recv()
    assert got == [b"abc", b"de", b"fgh"]
    assert all(isinstance(b, bytearray) for b in got)  # writable, as the wire gives them
    assert got[0] is not first[0]
    assert conn.recv() == [b"second"]


def test_loopback_counters():
    conn = LoopbackConnection()
    conn.send([b"ab", b"cde"])
    conn.send([b""])
    assert (conn.frames_sent, conn.bytes_sent, conn.frames_received, conn.bytes_received) == (2, 5, 0, 0)
    conn.recv()
    assert (conn.frames_received, conn.bytes_received) == (1, 5)
    conn.recv()
    assert (conn.frames_sent, conn.bytes_sent, conn.frames_received, conn.bytes_received) == (2, 5, 2, 5)


def test_loopback_pending_and_wait_input():
    conn = LoopbackConnection()
    assert not conn.pending_input()
    t = time.monotonic()
    assert conn.wait_input(0.02) is False
    assert time.monotonic() - t < 2.0
    conn.send([b"x"])
    assert conn.pending_input() and conn.wait_input(0.0)
    conn.recv()
    assert not conn.pending_input()

    sender = threading.Timer(0.02, conn.send, args=([b"late"],))
    sender.start()
    assert conn.wait_input(JOIN_S) is True
    sender.join(JOIN_S)
    assert conn.recv() == [b"late"]


def test_loopback_close():
    conn = LoopbackConnection()
    conn.close()
    with pytest.raises(ConnectionClosed):
        conn.recv()
    with pytest.raises(ConnectionClosed):
        conn.send([b"x"])
    assert conn.pending_input() and conn.wait_input(0.0)  # recv will not wait: it raises
    assert conn.frames_sent == 0


def test_loopback_close_wakes_a_blocked_recv():
    conn = LoopbackConnection()
    out = []

    def reader():
        try:
            conn.recv()
        except ConnectionClosed as e:
            out.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.02)
    conn.close()
    t.join(JOIN_S)
    assert not t.is_alive() and len(out) == 1


# =====================================================================================
# Faults / FaultyConnection
# =====================================================================================


def kinds(conn, n):
    return [m.decode(conn.recv()) for _ in range(n)]


def test_faults_drop_exactly_n_of_the_named_type():
    lb = LoopbackConnection("w1")
    faults = Faults({"drop": {"RREF_USER_DELETE": 2}})
    fc = faults.wrap(lb)
    assert isinstance(fc, FaultyConnection) and fc.peer == lb.peer
    tag = m.AutogradTag(5)
    sent = [
        m.RRefUserDelete(1, Gid(0, 1), Gid(1, 1)),  # dropped
        m.PythonCall(2, m.Payload(b"c")),
        tag.wrap(m.RRefUserDelete(3, Gid(0, 2), Gid(1, 2))),  # dropped, inside FORWARD_AUTOGRAD
        m.RRefUserDelete(4, Gid(0, 3), Gid(1, 3)),  # the third passes
        tag.wrap(m.PythonCall(5, m.Payload(b"d"))),
        m.RRefAck(6),
    ]
    for msg in sent:
        fc.send(msg.encode())
    assert faults.dropped == ["RREF_USER_DELETE", "RREF_USER_DELETE"]
    got = kinds(fc, 4)
    assert [(type(x).__name__, x.msg_id) for x in got] == [
        ("PythonCall", 2), ("RRefUserDelete", 4), ("ForwardAutograd", 5), ("RRefAck", 6)]
    assert not fc.pending_input()


def test_faults_counts_are_shared_by_every_connection():
    faults = Faults({"drop": {"RREF_ACK": 1}})
    a, b = LoopbackConnection("a"), LoopbackConnection("b")
    fa, fb = faults.wrap(a), faults.wrap(b)
    fa.send(m.RRefAck(1).encode())
    fb.send(m.RRefAck(2).encode())
    fa.send(m.RRefAck(3).encode())
    assert [x.msg_id for x in kinds(a, 1)] == [3] and not a.pending_input()
    assert [x.msg_id for x in kinds(b, 1)] == [2]
    assert faults.dropped == ["RREF_ACK"]


def test_faults_delay_sleeps_for_the_named_type_only(monkeypatch):
    slept = []
    monkeypatch.setattr(faults_mod, "time", types.SimpleNamespace(sleep=slept.append))
    lb = LoopbackConnection()
    fc = Faults({"delay": {"PYTHON_CALL": 0.25}}).wrap(lb)
    fc.send(m.RRefAck(1).encode())
    assert slept == []
    fc.send(m.AutogradTag(1).wrap(m.PythonCall(2, m.Payload(b"x"))).encode())
    assert slept == [0.25]
    assert [x.msg_id for x in kinds(fc, 2)] == [1, 2]  # delayed, not dropped


@pytest.mark.parametrize("spec", [
    {"corrupt": {"PYTHON_CALL": 1}},
    {"drop": {"PYTHON_CAL": 1}},
    {"delay": {"python_call": 0.1}},
    {"drop": {"RREF_ACK": 1}, "delay": {"NOPE": 1.0}},
])
def test_faults_reject_unknown_kinds_and_names(spec):
    with pytest.raises(ValueError):
        Faults(spec)


def test_faulty_connection_forwards_counters_input_and_close():
    lb = LoopbackConnection()
    fc = Faults({"drop": {"HEARTBEAT": 1}}).wrap(lb)
    fc.send(m.Heartbeat(0).encode())  # dropped: counts nowhere
    assert (fc.frames_sent, fc.bytes_sent) == (0, 0)
    frame = m.RRefAck(7).encode()
    fc.send(frame)
    size = sum(len(b) for b in frame)
    assert (fc.frames_sent, fc.bytes_sent) == (lb.frames_sent, lb.bytes_sent) == (1, size)
    assert fc.pending_input() and fc.wait_input(0.0)
    assert m.decode(fc.recv()).msg_id == 7
    assert (fc.frames_received, fc.bytes_received) == (1, size)
    assert not fc.has_deferred
    fc.flush()
    assert fc._closed is False  # __getattr__ reaches the wrapped connection
    fc.close()
    with pytest.raises(ConnectionClosed):
        fc.recv()
    with pytest.raises(ConnectionClosed):
        fc.send(m.RRefAck(8).encode())


# =====================================================================================
# Watchdog
# =====================================================================================


def test_watchdog_tick_times_out_expired_entries_and_runs_chores():
    clock = FakeClock(0.0)
    pending = PendingTable(clock=clock)
    wd = Watchdog(pending, lambda p: f"{p.desc} to {p.dest} timed out after {p.timeout:g} s")
    chores = Calls()
    wd.add_chore(chores)
    a, b, c, z = Calls(), Calls(), Calls(), Calls()
    pending.add(1, "a", 1.0, a)
    ib = pending.add(2, "b", 2.0, b)
    pending.add(1, "c", 3.0, c)
    pending.add(1, "z", 0, z)

    wd.tick()
    assert len(chores.calls) == 1 and a.calls == []
    clock.advance(1.0)
    wd.tick()
    assert len(chores.calls) == 2
    (reply, err), = a.calls
    assert reply is None and type(err) is RPCTimeoutError and str(err) == "a to 1 timed out after 1 s"
    assert pending.pop(ib) is not None  # b's reply came first: its deadline is nobody's now
    clock.advance(100.0)
    wd.tick()
    wd.tick()
    assert len(chores.calls) == 4
    assert len(a.calls) == 1 and b.calls == [] and z.calls == []
    (reply, err), = c.calls
    assert isinstance(err, RPCTimeoutError) and "c to 1" in str(err)
    assert len(pending) == 1 and pending.get(ib) is None


def test_watchdog_run_ticks_until_stopped():
    wd = Watchdog(PendingTable(clock=FakeClock()), str)
    stop = threading.Event()
    ticks = []

    def chore():
        ticks.append(1)
        if len(ticks) == 2:
            stop.set()

    wd.add_chore(chore)
    t = threading.Thread(target=wd.run, args=(stop,))
    t.start()
    t.join(JOIN_S)
    assert not t.is_alive() and len(ticks) == 2


# =====================================================================================
# Heartbeats
# =====================================================================================


@pytest.fixture
def hb_peers():
    p = PeerTable(0, "w0")
    p.set_workers(["w0", "w1"])
    p.add(0, LoopbackConnection("w0"))  # this worker's own connection: never beats, never lost
    p.add(1, LoopbackConnection("w1"))
    return p


def test_heartbeat_sent_on_a_connection_quiet_for_an_interval(hb_peers):
    lost = Calls()
    hb = Heartbeats(hb_peers, lost, interval=1.0)
    own, conn = hb_peers.conns[0], hb_peers.conns[1]
    hb.check(0.0)
    hb.check(0.99)
    assert conn.frames_sent == 0
    hb.check(1.0)
    assert conn.frames_sent == 1
    assert type(m.decode(conn.recv())) is m.Heartbeat
    hb.check(1.5)
    assert conn.frames_sent == 1  # it just sent one
    # a connection that carries traffic needs no heartbeat
    for t in (2.0, 2.5, 3.0, 3.5):
        conn.send([b"traffic"])
        conn.recv()
        hb.check(t)
    assert conn.frames_sent == 5  # the 4 frames of traffic, no heartbeat
    assert own.frames_sent == 0 and lost.calls == []
    assert hb.last_heard[1] == 3.5 and 0 not in hb.last_heard


def test_heartbeat_reports_a_silent_peer_lost_after_the_misses(hb_peers):
    lost = Calls()
    hb = Heartbeats(hb_peers, lost, interval=1.0)
    conn = hb_peers.conns[1]
    hb.check(0.0)
    hb.check(2.0)
    conn.send([b"from the peer"])
    conn.recv()  # input arrives
    hb.check(2.5)
    hb.check(2.5 + HEARTBEAT_MISSES)  # exactly the misses: not yet
    assert lost.calls == []
    hb.check(2.5 + HEARTBEAT_MISSES + 0.1)
    (peer, c, why), = lost.calls
    assert peer == 1 and c is conn and "no heartbeat" in why
    assert hb.last_heard[1] == 2.5


def test_heartbeat_loss_goes_to_the_peer_table(hb_peers):
    told = Calls()
    hb_peers.on_lost(told)
    hb = Heartbeats(hb_peers, hb_peers.lost, interval=0.5)
    conn = hb_peers.conns[1]
    hb.check(0.0)
    hb.check(0.5 * HEARTBEAT_MISSES + 0.01)
    assert not hb_peers.is_alive(1) and 1 not in hb_peers.conns and len(told.calls) == 1
    assert "no heartbeat" in str(told.calls[0][1])
    with pytest.raises(ConnectionClosed):
        conn.send([b"x"])
    hb.check(100.0)  # the peer is gone: nothing more
    assert len(told.calls) == 1


def test_heartbeat_quiet_reports_nobody(hb_peers):
    lost = Calls()
    hb = Heartbeats(hb_peers, lost, interval=1.0)
    hb.quiet = True
    hb.check(0.0)
    hb.check(10.0)
    hb.check(20.0)
    assert lost.calls == []
    hb.quiet = False
    hb.check(20.1)
    assert [c[0] for c in lost.calls] == [1]


def test_heartbeat_on_a_closed_connection_is_not_an_error(hb_peers):
    lost = Calls()
    hb = Heartbeats(hb_peers, lost, interval=1.0)
    hb_peers.conns[1].close()
    hb.check(0.0)
    hb.check(1.0)  # the beat's send fails: swallowed
    assert lost.calls == []


# =====================================================================================
# messages: header layouts (docs/design.md §1.3) and reply types
# =====================================================================================

ID = ("msg_id", "u64")
#: The header of each message type, after its type byte, as docs/design.md §1.3 lays it out.
#: PYTHON_CALL's ``profile`` flags and PYTHON_RET's ``remote_ns`` are in the header on the
#: wire (as the explicit FIELDS before the annotations took over said).
HEADERS = {
    m.MessageType.PYTHON_CALL: (ID, ("profile", "u8")),
    m.MessageType.PYTHON_RET: (ID, ("remote_ns", "u64")),
    m.MessageType.RUN_WITH_PROFILING_RESP: (ID, ("remote_ns", "u64")),
    m.MessageType.PYTHON_REMOTE_CALL: (ID, ("rref_id", "gid"), ("fork_id", "gid")),
    m.MessageType.REMOTE_RET: (ID, ("rref_id", "gid"), ("fork_id", "gid")),
    m.MessageType.PYTHON_RREF_FETCH_CALL: (ID, ("rref_id", "gid")),
    m.MessageType.PYTHON_RREF_FETCH_RET: (ID,),
    m.MessageType.RREF_USER_DELETE: (ID, ("rref_id", "gid"), ("fork_id", "gid")),
    m.MessageType.RREF_FORK_REQUEST: (ID, ("rref_id", "gid"), ("fork_id", "gid")),
    m.MessageType.RREF_CHILD_ACCEPT: (ID, ("fork_id", "gid")),
    m.MessageType.RREF_ACK: (ID,),
    m.MessageType.EXCEPTION: (ID,),
    m.MessageType.HELLO: (ID, ("worker_id", "u32")),
    m.MessageType.HEARTBEAT: (ID,),
    m.MessageType.MEMBERSHIP: (ID, ("worker_id", "u32"), ("joined", "bool")),
    m.MessageType.FORWARD_AUTOGRAD: (ID, ("context_id", "i64"), ("autograd_message_id", "u64"),
                                     ("converges", "bool")),
    m.MessageType.BACKWARD_DISCOVER: (ID, ("context_id", "i64"), ("pass_id", "u64"), ("retain_graph", "bool")),
    m.MessageType.BACKWARD_AUTOGRAD_REQ: (ID, ("context_id", "i64"), ("pass_id", "u64"), ("direct", "bool"),
                                          ("retain_graph", "bool")),
    m.MessageType.CLEANUP_AUTOGRAD_CONTEXT_REQ: (ID, ("context_id", "i64")),
    m.MessageType.RREF_BACKWARD_REQ: (ID, ("rref_id", "gid"), ("context_id", "i64"), ("retain_graph", "bool")),
    m.MessageType.BACKWARD_AUTOGRAD_RET: (ID, ("context_id", "i64"), ("pass_id", "u64"), ("direct", "bool"),
                                          ("retain_graph", "bool")),
}
#: §1.3's body column: the types that carry a payload.
WITH_PAYLOAD = {m.MessageType.PYTHON_CALL, m.MessageType.PYTHON_RET, m.MessageType.PYTHON_REMOTE_CALL,
                m.MessageType.PYTHON_RREF_FETCH_RET, m.MessageType.EXCEPTION, m.MessageType.RUN_WITH_PROFILING_RESP}
_SIZES = {"u8": 1, "u32": 4, "u64": 8, "i64": 8, "bool": 1, "gid": 12}


def test_every_message_type_is_registered():
    assert set(m._REGISTRY) == set(m.MessageType) == set(HEADERS)


@pytest.mark.parametrize("mtype", sorted(HEADERS), ids=lambda t: t.name)
def test_message_fields_match_the_documented_header(mtype):
    cls = m._REGISTRY[mtype]
    assert cls.TYPE is mtype
    assert cls.FIELDS == HEADERS[mtype]
    assert cls._struct.size == 1 + sum(_SIZES[k] for _, k in HEADERS[mtype])
    assert cls.HAS_PAYLOAD == (mtype in WITH_PAYLOAD)


def test_reply_types():
    T = m.MessageType
    assert m.REPLY_TYPES == {T.PYTHON_RET, T.REMOTE_RET, T.PYTHON_RREF_FETCH_RET, T.RREF_ACK, T.EXCEPTION,
                             T.BACKWARD_AUTOGRAD_RET, T.RUN_WITH_PROFILING_RESP}
    for mtype, cls in m._REGISTRY.items():
        if cls is not m.ForwardAutograd:
            assert cls.IS_REPLY == (mtype in m.REPLY_TYPES), cls.__name__
    # a wrapper is a reply exactly when what it wraps is
    assert m.AutogradTag(1).wrap(m.RRefAck(1)).IS_REPLY is True
    assert m.AutogradTag(1).wrap(m.PythonCall(1, m.Payload(b""))).IS_REPLY is False
