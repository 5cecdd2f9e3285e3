"""Hostile input against a live worker.

The job has four workers, and worker1 is the victim:

* worker0 is a real worker and the attacker. Besides its own (authenticated) connection
  to worker1, its process also plays **worker3**, a *phantom* worker that never runs
  ``init_rpc``: a thread publishes worker3's name in the store and connects to the
  three real workers with the job's secret and a HELLO, as a real worker3 would. So
  worker0's process holds two authenticated, post-HELLO connections to worker1 on
  which it can send any frame (worker0's agent connection, and worker3's raw one,
  which it may drop and open again: worker1 accepts a worker3 that is not connected),
  and it can open any number of further authenticated connections that never get
  past HELLO (worker1 accepts HELLO only from worker ranks above its own).
* worker1 serves; it counts what its ``torchrpc`` logger reports.
* worker2 is a bystander that no fuzz frame touches: before the fuzzing it makes an
  RRef owned by worker1 and opens a distributed autograd context with a forward
  through worker1; afterwards it checks that worker1 still serves, that the RRef still
  resolves, and that the old context still runs a backward with the right gradient.

Cases come from a seeded ``random.Random`` (``TORCHRPC_FUZZ_SEED`` to replay another
run): random frames; every message type with random field values; those mutated
(bit flips, truncation, extra and missing buffers, wrong type byte, splices);
unknown types; wrong field values (booleans that are not 0/1, payloads that are not
calls, bad tensor metadata, malformed RRef fork data); unknown RRef / context / pass
/ autograd message ids; replays of worker0's own earlier control messages; transport
headers claiming more buffers or bytes than the limits; invalid first frames on new
connections; unauthenticated connections.

The worker may answer with an error reply, stay silent, or drop the connection that
carried the frame; it must not die, stop serving others, grow its memory, or lose
state that belongs to others. After every batch of cases a sync call on the same
connection (worker0: a real ``rpc_sync``; worker3: a hand-made PYTHON_CALL) proves
that worker1 has read the batch and still answers there. The phantom answers the
control requests worker1 sends it and heartbeats, as a live peer must (worker1 drops
a peer silent for 3.5 s). Set ``TORCHRPC_FUZZ_SEED`` to run other cases; the test
prints its counts (cases by kind, replies by type, drops, worker1's log and memory).

What the fuzzer leaves out, and why (each is a bug with its own ``xfail`` test below):

* frames whose decoding raises something other than ``ProtocolError`` (zero-element
  gradient tensors with a dimension that overflows int64; the fuzzer checks each frame
  with the decoder first and counts these as skipped): on an established connection the
  worker drops the connection instead of answering with an error
  (``test_bug_malformed_gradient_frame_drops_the_connection``), and as the first frame
  of a connection they kill the acceptor thread
  (``test_bug_malformed_first_frame_kills_the_acceptor``);
* RRef forks naming a worker id outside the job
  (``test_bug_fork_naming_a_worker_outside_the_job_is_accepted``); mutated frames
  carrying forged forks are not sent for the same reason (a flipped bit in the owner id);
* RRef.backward for an RRef id that some earlier frame made worker1 create empty
  (``test_bug_rref_backward_on_a_valueless_owner_blocks_a_thread_forever``): the
  fuzzer's RRef.backward ids are fresh random ids, never ones other frames used;
* transport lengths under the 64 GiB frame limit that are never followed by data
  (``test_bug_claimed_length_is_allocated_before_any_data_arrives``); the fuzzer's
  oversized headers all exceed a limit.

One bug the fuzzer does hit: a malformed *reply* is answered with an error reply
addressed by the reply's msg id, which can fail one of worker0's own calls with the
same number (``test_bug_malformed_reply_is_answered_and_fails_an_unrelated_call``);
the sync call after a batch is repeated when that happens, and counted.

The fuzzer never forges ids that belong to other workers' live state (worker2's
forks, contexts' autograd message ids, cleanup of worker2's context): authenticated
peers are trusted by the protocol, as in torch.distributed.rpc, and those messages
would legitimately release that state.
"""
from __future__ import annotations

import collections
import gc
import json
import logging
import os
import random
import socket
import struct
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import add, ident, init, make_tracked, raise_value_error, sleep_then, torchrpc_threads
from harness import get_context, run_workers
from torchrpc import serialization, transport
from torchrpc.protocol.autograd_context import use_context
from torchrpc.errors import ProtocolError
from torchrpc.protocol import messages as m
from torchrpc.protocol.tensor_codec import DTYPES
from torchrpc.rref import _rebuild_rref
from torchrpc.transport import handshake, shm, tcp
from torchrpc.transport.base import ConnectionClosed

pytestmark = pytest.mark.timeout(150)

SECRET = "torchrpc-fuzz-secret"
ENV = {"TORCHRPC_SECRET": SECRET}
SEED = int(os.environ.get("TORCHRPC_FUZZ_SEED", "20240611"))
G = m.GloballyUniqueId
#: sync requests use msg ids from here up, so no fuzz case collides with them
SYNC_IDS = 1 << 63
MIB = 1 << 20

# How many cases of each kind (about 16000 sent in all; some 10 s on 2 cores).
N_MAIN = 6000      # on worker0's own connection to worker1
N_PHANTOM = 9000   # on worker3's (the phantom's) connection, reconnecting when dropped
N_HEADERS = 200    # oversized transport headers on the phantom's connection (each drops it)
N_PRE_HELLO = 1000 # new authenticated connections whose identity (HELLO) is not valid
N_UNAUTH = 60      # connections that fail the transport handshake
BATCH = 25         # cases between two syncs


# --------------------------------------------------------------------------------------
# Helpers shared by the tests
# --------------------------------------------------------------------------------------


def _b(x) -> bytes:
    return bytes(x) if isinstance(x, (bytes, bytearray)) else bytes(memoryview(x).cast("B"))


def _frame(msg: m.Message) -> list[bytes]:
    return [_b(x) for x in msg.encode()]


def _store_client() -> dist.TCPStore:
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=30), wait_for_workers=False)


def _addresses(store, ranks) -> dict[int, str]:
    store.wait([f"worker/{r}" for r in ranks], timedelta(seconds=30))
    return {r: json.loads(store.get(f"worker/{r}"))["address"] for r in ranks}


def _rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _decodes_cleanly(frame) -> bool:
    """Whether worker1's decoder takes ``frame`` or rejects it with ProtocolError (as it should)."""
    try:
        m.decode([bytearray(b) for b in frame])
    except ProtocolError:
        return True
    except Exception:
        return False
    return True


class _RawRequest:
    """Looks like a request to ``Endpoint.request``: a hand-made frame with the msg id patched in.

    Sent this way, worker1's answer (or the connection's loss) comes back to the caller.
    """

    IS_REPLY = False

    def __init__(self, frame):
        self.frame = frame
        self.msg_id = 0

    def encode(self):
        head = bytearray(self.frame[0])
        if len(head) >= 9:
            head[1:9] = struct.pack("<Q", self.msg_id)
        return [bytes(head), *self.frame[1:]]


def _request_raw(agent, dest, frame, timeout):
    """Send ``frame`` as a request through ``agent``; (reply message or None, error or None)."""
    done = threading.Event()
    box = {}

    def cb(reply, error):
        box["reply"], box["error"] = reply, error
        done.set()

    agent.endpoint.request(dest, _RawRequest(frame), timeout, "fuzz", cb)
    done.wait(timeout + 5)
    return box.get("reply"), box.get("error")


class ForgedFork:
    """Pickles as an RRef fork with whatever fork data it is given."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return _rebuild_rref, (self.data,)


def _overflowing_gradient_frame(msg_id=7, context_id=1, pass_id=1, ag_id=1) -> list[bytes]:
    """A PropagateGradients whose one gradient is a zero-element tensor of shape (0, 2**63).

    Its data buffer (0 bytes) fits the shape, so the codec's checks pass; rebuilding the
    tensor then raises TypeError (overflow) instead of ProtocolError.
    """
    head, ids = _frame(m.PropagateGradients(msg_id, context_id, pass_id, [ag_id], []))[:2]
    meta = struct.pack("<BBB", 1, 0, 2) + struct.pack("<2Q", 0, 1 << 63)
    return [head, ids, meta, b""]


def _as_identity(frame) -> bytes:
    """A frame packed as a handshake identity (what ``Hello.identity`` makes of a HELLO), cut to
    the handshake's limit: anything else is a malformed identity."""
    bufs = [_b(b) for b in frame]
    data = struct.pack(f"<I{len(bufs)}I", len(bufs), *map(len, bufs)) + b"".join(bufs)
    return data[:handshake.MAX_IDENTITY]


class RawPeer:
    """An authenticated raw connection to a worker.

    A thread drains what comes back, counts it by message type, acks the RRef and cleanup
    control requests the worker sends (as a real peer would) and answers any other
    request with an error. ``sync()`` sends a real call and waits for its answer: once it
    comes, the worker has read everything sent before it.
    """

    _sync_ids = iter(range(SYNC_IDS, SYNC_IDS + (1 << 40)))

    def __init__(self, conn, label="", heartbeat=False):
        self.conn = conn
        self.label = label
        self.received: collections.Counter = collections.Counter()
        self.closed = threading.Event()
        self.close_reason = ""
        self._waiters: dict[int, threading.Event] = {}
        self._sync_payload = serialization.dumps((add, (20, 22), {}))
        self._thread = threading.Thread(target=self._read, name=f"rawpeer-{label}", daemon=True)
        self._thread.start()
        # a peer past HELLO must not stay silent: the worker declares it gone after 3.5 s
        self._beat = None
        if heartbeat:
            self._beat = threading.Thread(target=self._heartbeat, name=f"rawpeer-beat-{label}", daemon=True)
            self._beat.start()

    @classmethod
    def connect(cls, address, hello=None, label="", secret=SECRET.encode()):
        """Connect presenting the frame ``hello`` as this side's identity (as a worker presents
        its HELLO in the handshake; none: an empty identity)."""
        identity = _as_identity(hello) if hello is not None else b""
        conn = transport.connect(address, timeout=10, secret=secret, identity=identity)
        return cls(conn, label, heartbeat=hello is not None)

    def _heartbeat(self):
        beat = _frame(m.Heartbeat(0))
        while not self.closed.wait(0.5):
            self.send(beat)

    def _read(self):
        try:
            while True:
                frame = self.conn.recv()
                try:
                    msg = m.decode(frame)
                except Exception:
                    self.received["undecodable"] += 1
                    continue
                inner = msg.inner if isinstance(msg, m.ForwardAutograd) else msg
                self.received[type(inner).__name__] += 1
                if isinstance(inner, m.Heartbeat):
                    continue
                if inner.IS_REPLY:
                    w = self._waiters.pop(inner.msg_id, None)
                    if w is not None:
                        w.set()
                elif isinstance(inner, (m.RRefChildAccept, m.RRefUserDelete, m.RRefForkRequest,
                                        m.CleanupAutogradContext)):
                    self.send(_frame(m.RRefAck(inner.msg_id)))
                else:
                    self.send(_frame(m.ExceptionReply(inner.msg_id, m.Payload(b""), "RuntimeError",
                                                      "the phantom serves nothing", "")))
        except ConnectionClosed as e:
            self.close_reason = str(e)
        finally:
            self.closed.set()
            for w in list(self._waiters.values()):
                w.set()

    def send(self, frame) -> bool:
        try:
            self.conn.send(frame)
            return True
        except ConnectionClosed:
            return False

    def send_raw(self, data: bytes) -> bool:
        """Bytes straight onto the socket (a hand-made transport header)."""
        try:
            with self.conn._send_lock:
                self.conn._sock.sendall(data)
            return True
        except OSError:
            return False

    def sync(self, timeout=10.0) -> bool:
        """True once the worker answered a call sent now; False if the connection closed first."""
        msg_id = next(self._sync_ids)
        ev = self._waiters[msg_id] = threading.Event()
        if not self.send(_frame(m.PythonCall(msg_id, self._sync_payload))):
            return False
        if not ev.wait(timeout):
            raise AssertionError(f"{self.label}: no answer to a sync call within {timeout} s "
                                 f"(connection open: {not self.closed.is_set()})")
        return not (self.closed.is_set() and msg_id in self._waiters)

    def close(self):
        self.conn.close()
        self._thread.join(10)
        if self._beat is not None:
            self._beat.join(10)


class Phantom:
    """Plays worker ``rank`` of the job from inside another worker's process: publishes its
    name, connects to every real worker with the job's secret and sends HELLO."""

    def __init__(self, rank, world_size):
        self.rank, self.name = rank, f"worker{rank}"
        self.error = None
        self.conns: dict[int, RawPeer] = {}
        self.addresses: dict[int, str] = {}
        self._t = threading.Thread(target=self._join, args=(world_size,), name="phantom-join", daemon=True)
        self._t.start()

    def hello(self):
        return _frame(m.Hello(0, self.rank, self.name))

    def _join(self, world_size):
        try:
            store = _store_client()
            store.set(f"worker/{self.rank}", json.dumps({"name": self.name, "address": "tcp://127.0.0.1:9"}))
            self.addresses = _addresses(store, [r for r in range(world_size) if r != self.rank])
            for r, address in self.addresses.items():
                # heartbeats from the start: a worker still in init_rpc drops a silent peer too
                self.conns[r] = RawPeer.connect(address, self.hello(), label=f"{self.name}->{r}")
            store.set(f"barrier/init/connected/{self.rank}", b"1")  # start-up's closing barriers
            store.set(f"barrier/init/done/{self.rank}", b"1")
            del store
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self.error = e

    def wait(self, timeout=60):
        self._t.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"phantom {self.name} could not join: {self.error!r}") from self.error
        assert not self._t.is_alive(), "phantom still joining"

    def reconnect(self, peer, attempts=100) -> RawPeer:
        """A fresh post-HELLO connection to ``peer``: retried while ``peer`` still holds the old one."""
        last = None
        for _ in range(attempts):
            rp = RawPeer.connect(self.addresses[peer], self.hello(), label=f"{self.name}->{peer}")
            try:
                if rp.sync(timeout=10):
                    return rp
                last = rp.close_reason
            except AssertionError as e:
                last = str(e)
            rp.close()
            time.sleep(0.02)
        raise AssertionError(f"worker{peer} no longer accepts {self.name}: {last}")


class _LogCounter(logging.Handler):
    """Counts the records of the ``torchrpc`` logger by level and by message start."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.by_level: collections.Counter = collections.Counter()
        self.by_text: collections.Counter = collections.Counter()
        self.errors: list[str] = []

    def emit(self, record):
        self.by_level[record.levelname] += 1
        text = record.getMessage()
        self.by_text[" ".join(text.split()[2:6])] += 1
        if record.levelno >= logging.ERROR and len(self.errors) < 20:
            self.errors.append(self.format(record))


def _count_logs() -> _LogCounter:
    counter = _LogCounter()
    counter.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    lg = logging.getLogger("torchrpc")
    lg.addHandler(counter)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False  # thousands of "malformed message" warnings: count, don't print
    return counter


# --------------------------------------------------------------------------------------
# The case generator
# --------------------------------------------------------------------------------------


def _open_context() -> int:
    """A distributed autograd context that stays open without being current on this thread
    (``with context()`` would make every later call of the thread part of it)."""
    return rpc.api.current.agent().autograd.contexts.create().context_id


def _mul3(x):
    return x * 3


def _scaled_sum(x):
    return (x * 2).sum()


class CaseGen:
    """Makes hostile frames for a peer that is worker ``src``, against worker1.

    ``known`` holds ids worker0 really used (its RRef, fork and context ids): cases pick
    them some of the time, random ones otherwise.
    """

    def __init__(self, rng: random.Random, src: int, known: dict):
        self.rng = rng
        self.src = src
        self.known = known
        # random ids, drawn once, that several cases reuse (so a fetch, a fork request and
        # a delete sometimes name the same unknown RRef)
        self.pool_ids = [G(rng.choice([src, 1, 0, 2, 3, 7, 1 << 31]), (1 << 40) + rng.getrandbits(30))
                         for _ in range(24)]
        self.payloads = self._make_payloads()
        self.builders = {
            # now and then from a profiled caller: worker1 runs the function under its profiler
            m.PythonCall: lambda: m.PythonCall(self.mid(), self.payload(), self.pick([0, 0, 0, 1, 3, 63, 255])),
            m.PythonReturn: lambda: m.PythonReturn(self.reply_id(), self.payload()),
            m.ProfiledReturn: lambda: m.ProfiledReturn(self.reply_id(), self.payload(), self.u64(), self.text()),
            m.ExceptionReply: lambda: m.ExceptionReply(self.reply_id(), self.payload(), self.text(),
                                                       self.text(), self.text()),
            m.RemoteCall: lambda: m.RemoteCall(self.mid(), self.own_gid(), self.own_gid(), self.payload()),
            m.RemoteReturn: lambda: m.RemoteReturn(self.reply_id(), self.gid(), self.gid()),
            m.RRefFetchCall: lambda: m.RRefFetchCall(self.mid(), self.gid()),
            m.RRefFetchReturn: lambda: m.RRefFetchReturn(self.reply_id(), self.payload()),
            m.RRefUserDelete: lambda: m.RRefUserDelete(self.mid(), self.gid(), self.gid()),
            m.RRefForkRequest: lambda: m.RRefForkRequest(self.mid(), self.gid(), self.gid()),
            m.RRefChildAccept: lambda: m.RRefChildAccept(self.mid(), self.gid()),
            m.RRefAck: lambda: m.RRefAck(self.reply_id()),
            m.Hello: lambda: m.Hello(self.mid(), self.u32(), self.text()),
            m.Heartbeat: lambda: m.Heartbeat(self.mid()),
            # a static job has no handler for it: refused like any message that is not a request
            m.Membership: lambda: m.Membership(self.mid(), self.u32(), self.rng.random() < 0.5),
            m.ForwardAutograd: self._forward_autograd,
            m.BackwardDiscover: lambda: m.BackwardDiscover(self.mid(), self.context_id(), self.pass_id(),
                                                           self.rng.random() < 0.5,
                                                           [self.ag_id() for _ in range(self.rng.randrange(4))]),
            m.PropagateGradients: lambda: m.PropagateGradients(self.mid(), self.context_id(), self.pass_id(),
                                                               [self.ag_id()], self.tensors(),
                                                               self.rng.random() < 0.5, self.rng.random() < 0.5),
            m.BackwardReturn: lambda: m.BackwardReturn(self.reply_id(), self.context_id(), self.pass_id(),
                                                       self.rng.random() < 0.5, self.rng.random() < 0.5,
                                                       [self.ag_id() for _ in range(self.rng.randrange(3))],
                                                       self.tensors()),
            # never one of worker2's contexts: a cleanup would (rightly) release it
            m.CleanupAutogradContext: lambda: m.CleanupAutogradContext(
                self.mid(), self.pick([self.i64(), *self.known.get("own_contexts", [])])),
            # fresh random RRef ids only: see the module docstring
            m.RRefBackward: lambda: m.RRefBackward(self.mid(), G(self.rng.choice([0, 1, 2, self.src]),
                                                                 (1 << 50) + self.rng.getrandbits(40)),
                                                   self.context_id(), self.rng.random() < 0.5),
        }
        assert set(self.builders) == set(m._REGISTRY.values()), "a new message type: teach the fuzzer"

    # --- values ---------------------------------------------------------------------

    def pick(self, seq):
        return self.rng.choice(seq)

    def u64(self):
        r = self.rng.random()
        if r < 0.3:
            return self.pick([0, 1, 2, 3, 4, 255, 2 ** 32, 2 ** 48, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1])
        if r < 0.7:
            return self.rng.getrandbits(64)
        return self.rng.randrange(1000)

    def i64(self):
        v = self.u64()
        return v - (1 << 64) if v >= 1 << 63 else v

    def u32(self):
        return self.pick([0, 1, 2, 3, 4, 5, 99, 2 ** 31, 2 ** 32 - 1, self.rng.getrandbits(32)])

    def mid(self):
        # requests: never the small ids worker0's agent uses for its own requests
        return self.pick([0, 2 ** 64 - 1, (1 << 40) + self.rng.getrandbits(40), self.rng.getrandbits(62) | (1 << 41)])

    def reply_id(self):
        # replies: small ids too, so some hit worker1's own pending requests to us
        return self.pick([0, 1, self.rng.randrange(1, 200), self.rng.getrandbits(64)])

    def text(self):
        return self.pick(["", "worker1", "x" * self.rng.randrange(2000), "\u00e9\u4e2d\U0001f600",
                          "".join(chr(self.rng.randrange(0x20, 0x3000)) for _ in range(self.rng.randrange(20)))])

    def gid(self):
        r = self.rng.random()
        if r < 0.4:
            return self.pick(self.pool_ids)
        if r < 0.6 and self.known.get("gids"):
            return self.pick(self.known["gids"])
        return G(self.u32(), self.u64())

    def own_gid(self):
        """Ids of a RemoteCall: worker1 insists they were made by the sender; mostly they are."""
        if self.rng.random() < 0.8:
            return G(self.src, (1 << 40) + self.rng.getrandbits(40))
        return self.gid()

    def context_id(self):
        r = self.rng.random()
        if r < 0.3 and self.known.get("contexts"):
            return self.pick(self.known["contexts"])
        return self.i64()

    def pass_id(self):
        if self.rng.random() < 0.3 and self.known.get("passes"):
            return self.pick(self.known["passes"])
        return self.u64()

    def ag_id(self):
        if self.rng.random() < 0.3 and self.known.get("ag_ids"):
            return self.pick(self.known["ag_ids"])
        return self.u64()

    def tensors(self):
        out = []
        for _ in range(self.rng.randrange(4)):
            if self.rng.random() < 0.2:
                out.append(None)
                continue
            dtype = self.pick(DTYPES)
            shape = tuple(self.rng.randrange(4) for _ in range(self.rng.randrange(3)))
            out.append(torch.zeros(shape, dtype=dtype))
        return out

    # --- payloads ---------------------------------------------------------------------

    def _fork_data(self):
        """Fork data worker1 will take from worker ``src``: owners 0, 1 or the sender, never
        worker2 (the bystander) nor an id outside the job."""
        rng, src = self.rng, self.src
        owner = rng.choice(sorted({0, 1, src}))
        parent = src if rng.random() < 0.85 else rng.choice([0, 1, 2, 3, 9])
        rref = rng.choice(self.pool_ids) if rng.random() < 0.5 else G(rng.choice([0, 1, src]), rng.getrandbits(40))
        return (owner, rref.created_on if rref.created_on < 4 else owner, rref.local_id,
                src, (1 << 40) + rng.getrandbits(40), parent)

    def _make_payloads(self):
        rng = self.rng
        t = torch.arange(4.0)
        good = [
            (add, (t, t), {}),
            (add, (torch.ones(2, requires_grad=True), torch.ones(2)), {}),
            (add, (1, 2), {}),
            (ident, ("s" * rng.randrange(100),), {}),
            (ident, ({"a": [1, 2.5, None, b"x"]},), {}),
            (raise_value_error, ("fuzz",), {}),
            (add, (), {"a": 1, "b": 2}),
        ]
        shapes = [42, None, (add,), (add, [1, 2], {}), ("not callable", (), {}), (add, (), {1: 2}),
                  (add, (1,), {}), (add, (t, torch.ones(3)), {}), (add, ("a", 1), {})]
        out = []
        for obj in good + shapes:
            p = serialization.dumps(obj)
            out.append(("call", [_b(p.data), *[_b(b) for b in p.buffers]]))
        # tensors whose out-of-band buffers are missing, or of the wrong size
        p = serialization.dumps((add, (t, t), {}))
        out.append(("call", [_b(p.data)]))
        out.append(("call", [_b(p.data), b"\0" * 3, b"\0" * 16]))
        out.append(("call", [_b(p.data), *[_b(b) for b in p.buffers], b"extra"]))
        # not pickles, or pickles of things that are not there
        out.append(("call", [b""]))
        out.append(("call", [rng.randbytes(64)]))
        out.append(("call", [b"\x80\x05cnosuchmodule\nthing\n."]))
        out.append(("call", [b"\x80\x05ctorchrpc.rref\n_rebuild_rref\n(K\x01tR."]))
        out.append(("call", [b"\x80\x05ctorchrpc.rref\n_rebuild_rref\n(\x85R."]))
        # forged RRef forks: plausible and malformed fork data
        for _ in range(12):
            p = serialization.dumps((len, ((ForgedFork(self._fork_data()),),), {}))
            out.append(("fork", [_b(p.data)]))
        for bad in [(1, 2, 3), ("a", 0, 0, 0, 0, 0), (1, -1, 0, 0, 0, 0), (1, 0, 2 ** 64, 0, 0, 0),
                    (1, 0, 1, 0, 1, 0.5), None, (1, 0, 1, 0, 1, 0, 0)]:
            p = serialization.dumps((len, ((ForgedFork(bad),),), {}))
            out.append(("fork", [_b(p.data)]))
        return out

    def payload(self) -> m.Payload:
        _, bufs = self.pick(self.payloads)
        return m.Payload(bufs[0], list(bufs[1:]))

    def _forward_autograd(self):
        inner_cls = self.pick([c for c in self.builders if c is not m.ForwardAutograd])
        inner = self.builders[inner_cls]()
        ag = self.pick([0, 0, self.ag_id(), (1 << 40) + self.rng.getrandbits(40)])
        return m.ForwardAutograd(inner.msg_id, self.context_id(), ag, inner)

    # --- frames -----------------------------------------------------------------------

    def valid(self):
        cls = self.pick(list(self.builders))
        return cls.__name__, _frame(self.builders[cls]())

    def mutate(self, frame):
        rng = self.rng
        fr = [bytearray(b) for b in frame] or [bytearray(b"\x01")]
        op = rng.randrange(9)
        i = rng.randrange(len(fr))
        if op == 0 and fr[i]:  # bit flips
            for _ in range(rng.randrange(1, 4)):
                j = rng.randrange(len(fr[i]))
                fr[i][j] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            fr[i] = fr[i][: rng.randrange(len(fr[i]) + 1)]
        elif op == 2:  # an extra buffer
            fr.insert(rng.randrange(len(fr) + 1), bytearray(rng.randbytes(rng.randrange(40))))
        elif op == 3 and len(fr) > 1:  # a missing buffer
            fr.pop(i)
        elif op == 4 and fr[0]:  # wrong type byte
            fr[0][0] = rng.randrange(256)
        elif op == 5 and fr[i]:  # random bytes over a field
            j = rng.randrange(len(fr[i]))
            fr[i][j:j + 8] = rng.randbytes(8)
        elif op == 6:  # a header of another type spliced in
            _, other = self.valid()
            fr[0] = bytearray(other[0])
        elif op == 7:  # a boolean field that is not 0/1, or the last header byte changed
            if fr[0]:
                fr[0][-1] = rng.randrange(2, 256)
        else:  # buffers swapped
            rng.shuffle(fr)
        return [bytes(b) for b in fr]

    def unknown_type(self):
        t = self.pick([0, 13, 19, 25, 99, 255, *[x for x in range(256) if x not in m._REGISTRY][:5]])
        return [bytes([t]) + self.rng.randbytes(self.rng.randrange(40)),
                *[self.rng.randbytes(self.rng.randrange(20)) for _ in range(self.rng.randrange(3))]]

    def random_frame(self):
        n = self.pick([0, 1, 1, 2, 3, 5, 40])
        return [self.rng.randbytes(self.pick([0, 1, 9, self.rng.randrange(100)])) for _ in range(n)]

    def bad_fields(self):
        """Well-framed messages with wrong field values the struct layout cannot rule out."""
        rng = self.rng
        k = rng.randrange(8)
        if k == 0:  # booleans that are not 0/1
            head = bytearray(_frame(m.BackwardDiscover(self.mid(), self.context_id(), self.pass_id(), True, []))[0])
            head[-1] = rng.randrange(2, 256)
            return "bad-bool", [bytes(head), struct.pack("<2Q", 1, 2)]
        if k == 1:
            head = bytearray(_frame(m.RRefBackward(self.mid(), G(1, 1), self.context_id(), False))[0])
            head[-1] = rng.randrange(2, 256)
            return "bad-bool", [bytes(head)]
        if k == 2:  # id list that is not a whole number of u64
            head = _frame(m.BackwardDiscover(self.mid(), self.context_id(), self.pass_id(), False, []))[0]
            return "bad-ids", [head, rng.randbytes(rng.choice([1, 7, 9, 15]))]
        if k == 3:  # tensor metadata: bad dtype code, ndim, shapes that do not fit, buffers left over
            head, ids = _frame(m.PropagateGradients(self.mid(), self.context_id(), self.pass_id(), [self.ag_id()], []))[:2]
            meta = rng.choice([
                struct.pack("<BBB", 1, rng.randrange(len(DTYPES), 256), 0),
                struct.pack("<BBB", 1, 0, 65),
                struct.pack("<BBB", 1, 0, 2) + struct.pack("<2Q", 2 ** 32, 2 ** 32),
                struct.pack("<BBB", 1, 0, 1) + struct.pack("<Q", 3),
                struct.pack("<BBB", 1, 0, 1),
                struct.pack("<BB", 1, 0),
            ])
            return "bad-tensors", [head, ids, meta, *[rng.randbytes(rng.randrange(16)) for _ in range(rng.randrange(3))]]
        if k == 4:  # texts that are not UTF-8
            return "bad-text", _frame(m.ExceptionReply(self.reply_id(), m.Payload(b""), "", "", ""))[:2] + [
                b"\xff\xfe\xc3", b"\xed\xa0\x80", rng.randbytes(10)]
        if k == 5:  # a RemoteCall whose ids were not made by the sender
            return "bad-ids", _frame(m.RemoteCall(self.mid(), G(2, 5), G(self.src, 5), self.payload()))
        if k == 6:  # FORWARD_AUTOGRAD wrapping FORWARD_AUTOGRAD, or one whose ids differ
            inner = m.ForwardAutograd(5, 1, 0, m.PythonCall(5, self.payload()))
            if rng.random() < 0.5:
                return "bad-nesting", _frame(m.ForwardAutograd(5, 1, 0, inner))
            fr = _frame(inner)
            return "bad-nesting", [fr[0][:1] + struct.pack("<Q", 6) + fr[0][9:], *fr[1:]]
        # Hello on an established connection
        return "late-hello", _frame(m.Hello(0, self.pick([0, 1, 2, 3]), "worker2"))

    def case(self):
        """One case: (kind, frame). ``fork`` cases are never mutated (see the docstring)."""
        r = self.rng.random()
        if r < 0.08:
            return "random", self.random_frame()
        if r < 0.13:
            return "unknown-type", self.unknown_type()
        if r < 0.28:
            return self.bad_fields()
        if r < 0.60:
            name, fr = self.valid()
            return f"valid:{name}", fr
        name, fr = self.valid()
        if b"_rebuild_rref" in b"".join(fr):
            return f"valid:{name}", fr
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            fr = self.mutate(fr)
        return f"mutated:{name}", fr

    def oversized_header(self) -> tuple[str, bytes]:
        """A transport header the receiver must refuse before allocating anything."""
        rng = self.rng
        k = rng.randrange(6)
        if k == 0:
            return "too-many-buffers", struct.pack("<I", rng.randrange(tcp.MAX_BUFFERS + 1, 2 ** 32))
        if k == 1:
            n = rng.randrange(tcp.MAX_FRAME_BYTES + 1, tcp._SHM_BIT)
            return "too-many-bytes", struct.pack("<IQ", 1, n)
        if k == 2:
            lens = [rng.randrange(tcp.MAX_FRAME_BYTES // 2 + 1, tcp.MAX_FRAME_BYTES) for _ in range(3)]
            return "too-many-bytes", struct.pack("<I3Q", 3, *lens)
        if k == 3:
            return "too-many-bytes", struct.pack("<I2Q", 2, 8, 2 ** 63 - 1)
        if k == 4:  # a shared-memory buffer of the wrong descriptor size
            return "bad-shm", struct.pack("<IQ", 1, tcp._SHM_BIT | rng.choice([0, 1, 47, 49, 1 << 30]))
        # a shared-memory descriptor naming no segment of the peer's
        name = rng.choice([b"torchrpc-" + rng.randbytes(6).hex().encode(), b"../../etc/passwd", b"torchrpc-/x",
                           b"", rng.randbytes(32)])
        desc = shm.DESCRIPTOR.pack(name[:32], rng.choice([0, 64, 2 ** 63]), rng.choice([0, 8, 2 ** 40]))
        return "bad-shm", struct.pack("<IQ", 1, tcp._SHM_BIT | len(desc)) + desc

    def first_frame(self):
        """What a new connection sends instead of a valid HELLO."""
        rng = self.rng
        k = rng.randrange(10)
        if k == 0:
            return "hello-self", _frame(m.Hello(0, 1, "worker1"))
        if k == 1:
            return "hello-lower-rank", _frame(m.Hello(0, 0, "worker0"))
        if k == 2:
            return "hello-connected", _frame(m.Hello(0, 2, "worker2"))
        if k == 3:
            return "hello-wrong-name", _frame(m.Hello(0, 2, rng.choice(["worker3", "", "w" * 300])))
        if k == 4:
            return "hello-unknown-id", _frame(m.Hello(0, rng.choice([4, 99, 2 ** 32 - 1]), "worker4"))
        if k == 5:
            return "hello-mutated", self.mutate(_frame(m.Hello(0, 2, "worker2")))
        if k == 6:
            return "random", self.random_frame()
        if k == 7:
            name, fr = self.valid()
            return f"not-hello:{name}", fr
        if k == 8:
            return "empty", []
        return self.case()


# --------------------------------------------------------------------------------------
# The fuzz job
# --------------------------------------------------------------------------------------

WORLD = 4  # worker0 (attacker), worker1 (victim), worker2 (bystander), worker3 (phantom)


def _fuzz_job(rank, _nprocs, inited, bystander_ready, fuzz_done, checks_done):
    if rank == 0:
        return _attacker(inited, bystander_ready, fuzz_done, checks_done)
    if rank == 1:
        counter = _count_logs()
        init(1, WORLD)
        inited.wait(60)
        pid = os.getpid()
        fuzz_done.wait(120)
        checks_done.wait(60)
        agent = rpc.api.current.agent()
        out = {
            "pid": pid,
            "log_levels": dict(counter.by_level),
            "log_texts": dict(counter.by_text.most_common(12)),
            "errors": counter.errors,
            "threads": torchrpc_threads(),
            "pool_size": len(agent._pool.threads),
            "rref_state": agent.ctx.debug_info(),
            "contexts": len(agent.autograd.contexts.ids()),
        }
        rpc.shutdown()
        return out
    # rank 2: the bystander
    init(2, WORLD)
    inited.wait(60)
    tracked = rpc.remote("worker1", make_tracked, args=("bystander",))
    assert tracked.to_here().tag == "bystander"
    cid = _open_context()
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with use_context(cid):
        y = rpc.rpc_sync("worker1", _mul3, args=(w,))
    bystander_ready.set()
    assert fuzz_done.wait(120)
    out = {}
    try:
        t0 = time.monotonic()
        out["add"] = rpc.rpc_sync("worker1", add, args=(2, 3), timeout=20)
        out["tag"] = tracked.to_here(timeout=20).tag
        out["tag_via_proxy"] = tracked.rpc_sync(timeout=20).get()
        dist_autograd.backward(cid, [y.sum()])
        out["grad"] = dist_autograd.get_gradients(cid)[w].tolist()
        with dist_autograd.context() as fresh:
            x = torch.ones(2, requires_grad=True)
            dist_autograd.backward(fresh, [rpc.rpc_sync("worker1", _scaled_sum, args=(x,))])
            out["fresh_grad"] = dist_autograd.get_gradients(fresh)[x].tolist()
        out["checks_s"] = time.monotonic() - t0
    finally:
        rpc.api.current.agent().autograd.release(cid)
        del tracked
        gc.collect()
        checks_done.set()
    rpc.shutdown()
    return out


def _attacker(inited, bystander_ready, fuzz_done, checks_done):
    rng = random.Random(SEED)
    t_start = time.monotonic()
    phantom = Phantom(3, WORLD)
    init(0, WORLD)
    phantom.wait()
    stats: dict = {"seed": SEED, "cases": collections.Counter(), "kinds": collections.Counter()}
    agent = rpc.api.current.agent()
    peer = None
    try:
        # every real worker is past init_rpc: the phantom's links to worker0 and worker2 are
        # no longer needed (closing one earlier could leave that worker waiting for worker3)
        inited.wait(60)
        assert rpc.rpc_sync("worker1", add, args=(1, 1)) == 2
        assert rpc.rpc_sync("worker2", add, args=(1, 1)) == 2
        for r in (0, 2):
            phantom.conns.pop(r).close()
        peer = phantom.conns.pop(1)
        victim_pid = rpc.rpc_sync("worker1", os.getpid)
        assert bystander_ready.wait(60)
        mem_before = _rss(victim_pid)

        main = agent.peers.conns[1]
        known, sent_frames, main_in = _prelude(agent, main)
        stats["replayable"] = {k: len(v) for k, v in sent_frames.items()}

        # --- 1. worker0's own connection: replays, then fuzz cases ---------------------
        gen = CaseGen(rng, 0, known)
        main_alive = True
        n_main = 0
        replays = [(f"replay:{k}", fr) for k, frames in sent_frames.items() for fr in frames]
        cases = replays * 3 + [gen.case() for _ in range(N_MAIN)]
        for start in range(0, len(cases), BATCH):
            batch = cases[start:start + BATCH]
            for kind, fr in batch:
                if kind.startswith("replay") and rng.random() < 0.3:
                    fr = gen.mutate(fr)
                    kind = "mutated-" + kind
                if not _decodes_cleanly(fr):
                    stats["kinds"]["skipped (decode bug)"] += 1
                    continue
                main.send(fr)
                n_main += 1
                stats["kinds"][kind.split(":")[0]] += 1
            try:
                _sync_main(stats)
            except rpc.WorkerUnavailableError as e:  # allowed: worker1 dropped this connection
                main_alive = False
                stats["main_dropped"] = (start, [k for k, _ in batch], str(e))
                break
        stats["cases"]["main"] = n_main
        stats["main_replies"] = dict(main_in)
        # a legit context of worker0's own ends: replayed frames no longer find it
        agent.autograd.release(known["open_context"])

        # --- 2. the phantom's connection, reconnecting when worker1 drops it ------------
        pgen = CaseGen(rng, 3, {"gids": known["phantom_gids"]})
        drops = collections.Counter()
        received = collections.Counter()
        n_phantom = 0
        pending: list[str] = []
        for i in range(N_PHANTOM):
            kind, fr = pgen.case()
            if not _decodes_cleanly(fr):
                stats["kinds"]["skipped (decode bug)"] += 1
                continue
            stats["kinds"][kind.split(":")[0]] += 1
            pending.append(kind)
            peer.send(fr)
            n_phantom += 1
            if len(pending) >= BATCH or i == N_PHANTOM - 1:
                if not peer.sync():
                    drops[pending[-1].split(":")[0] if len(pending) == 1 else "batch:" +
                          ",".join(sorted({k.split(":")[0] for k in pending}))] += 1
                    received.update(peer.received)
                    peer.close()
                    peer = phantom.reconnect(1)
                pending = []
        # oversized headers: each must make worker1 drop this connection, and only it
        for _ in range(N_HEADERS):
            kind, data = pgen.oversized_header()
            stats["kinds"][kind] += 1
            peer.send_raw(data)
            n_phantom += 1
            if not peer.closed.wait(10):
                raise AssertionError(f"worker1 kept the connection after a {kind} header {data[:40]!r}")
            drops[kind] += 1
            received.update(peer.received)
            peer.close()
            peer = phantom.reconnect(1)
        received.update(peer.received)
        stats["cases"]["phantom"] = n_phantom
        stats["phantom_drops"] = dict(drops)
        stats["phantom_replies"] = dict(received)

        # --- 3. new connections whose identity (the HELLO in the handshake) is not valid ---
        address = phantom.addresses[1]
        not_closed = []
        n_pre = 0
        for _ in range(N_PRE_HELLO):
            kind, fr = pgen.first_frame()
            if not _decodes_cleanly(fr):
                stats["kinds"]["skipped (decode bug)"] += 1
                continue  # test_bug_malformed_first_frame_kills_the_acceptor
            rp = RawPeer.connect(address, fr, label="pre-hello")
            if not rp.closed.wait(5):
                not_closed.append(kind)
            rp.close()
            n_pre += 1
            stats["kinds"]["first-frame:" + kind.split(":")[0]] += 1
        stats["cases"]["pre_hello"] = n_pre
        assert not not_closed, f"worker1 kept connections whose identity was {not_closed[:10]}"

        # --- 4. connections that fail the handshake --------------------------------------
        host, port = tcp._parse(address.partition("://")[2])
        for i in range(N_UNAUTH):
            if i % 5 == 0:
                # (the connector retries a refused handshake until its timeout: keep that short)
                with pytest.raises(ConnectionClosed, match="authentication"):
                    transport.connect(address, timeout=0.2, secret=rng.choice([b"wrong", None]))
            else:
                with socket.create_connection((host, port), timeout=5) as s:
                    s.sendall(rng.choice([rng.randbytes(rng.randrange(1, 200)),
                                          struct.pack("<IQQ", 2, 14, 32) + b"torchrpc-tcp/2" + rng.randbytes(32)]))
                    s.shutdown(socket.SHUT_WR)
                    s.settimeout(15)
                    while s.recv(4096):
                        pass  # until worker1 closes it
        stats["cases"]["unauthenticated"] = N_UNAUTH

        # --- 5. last, an oversized header on worker0's own connection ---------------------
        if main_alive:
            kind, data = gen.oversized_header()
            with main._send_lock:
                main._sock.sendall(data)
            stats["cases"]["main"] += 1
            deadline = time.monotonic() + 10
            while agent.is_alive(1) and time.monotonic() < deadline:
                time.sleep(0.01)
            stats["main_header"] = (kind, "dropped" if not agent.is_alive(1) else "kept")

        # worker1 still accepts a real (phantom) peer after all that
        assert peer.sync()
        peer.close()
        mem_after = _rss(victim_pid)
        stats["victim_rss_mib"] = {k: (mem_before[k] // MIB, mem_after[k] // MIB) for k in mem_before}
        stats["total"] = sum(stats["cases"].values())
        stats["fuzz_s"] = time.monotonic() - t_start
    finally:
        fuzz_done.set()
        if peer is not None:
            peer.close()
        for c in phantom.conns.values():
            c.close()
    checks_done.wait(60)
    rpc.shutdown()
    stats["cases"] = dict(stats["cases"])
    stats["kinds"] = dict(stats["kinds"])
    return stats


def _sync_main(stats, attempts=5):
    """A call from worker0 to worker1 that must succeed: worker1 has read every frame before it.

    A malformed *reply* among the cases is answered by worker1 with an error reply carrying
    the reply's msg id, which can fail this call if its id is the same
    (``test_bug_malformed_reply_is_answered_and_fails_an_unrelated_call``): then it is
    counted and the call repeated.
    """
    for _ in range(attempts):
        try:
            assert rpc.rpc_sync("worker1", add, args=(1, 2), timeout=20) == 3
            return
        except ProtocolError as e:
            stats["kinds"]["sync failed by an echoed error (bug)"] += 1
            last = e
    raise AssertionError(f"worker1 no longer answers worker0 correctly: {last!r}")


def _prelude(agent, main):
    """Legit traffic from worker0 to worker1, recorded for replay; the ids it used.

    Returns (known ids, recorded frames by message type, counter of frames worker0
    receives on its connection to worker1 from now on).
    """
    recorded = collections.defaultdict(list)
    real_send, real_recv = main.send, main.recv
    incoming = collections.Counter()

    def send(frame, defer=False):
        fr = [_b(b) for b in frame]
        msg = m.decode([bytearray(b) for b in fr])
        inner = msg.inner if isinstance(msg, m.ForwardAutograd) else msg
        recorded[type(inner).__name__].append(fr)
        return real_send(frame, defer)

    def recv():
        frame = real_recv()
        if frame and len(frame[0]):
            t = frame[0][0]
            if t == m.MessageType.FORWARD_AUTOGRAD and len(frame) > 1 and len(frame[1]):
                t = frame[1][0]
            incoming[m.MessageType(t).name if t in m._REGISTRY else t] += 1
        return frame

    main.send = send
    try:
        # an RRef owned by worker1; a copy of it forked through worker0 itself (a fork
        # request to worker1), then deleted (a user delete)
        r1 = rpc.remote("worker1", make_tracked, args=("attacker",))
        assert r1.to_here().tag == "attacker"
        r1b = rpc.rpc_sync("worker0", ident, args=(r1,))
        assert r1b.to_here().tag == "attacker"
        gids = [r1._handle.rref_id, r1._handle.fork_id, r1b._handle.fork_id]
        del r1b
        gc.collect()
        deadline = time.monotonic() + 10
        while not (recorded["RRefForkRequest"] and recorded["RRefUserDelete"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        # a distributed backward through worker1, in a context worker0 keeps open
        cid = _open_context()
        x = torch.ones(3, requires_grad=True)
        with use_context(cid):
            y = rpc.rpc_sync("worker1", _mul3, args=(x,))
        dist_autograd.backward(cid, [y.sum()])
        assert dist_autograd.get_gradients(cid)[x].tolist() == [3.0, 3.0, 3.0]
        # and one that ended: its cleanup goes to worker1
        with dist_autograd.context() as old:
            rpc.rpc_sync("worker1", add, args=(torch.ones(1, requires_grad=True), 1))
        time.sleep(0.1)
    finally:
        main.send = real_send
    main.recv = recv  # the reader picks it up on its next frame
    wanted = ("RRefUserDelete", "RRefForkRequest", "PropagateGradients", "BackwardDiscover",
              "CleanupAutogradContext", "RemoteCall", "PythonCall", "RRefFetchCall")
    frames = {k: recorded[k] for k in wanted if recorded[k]}
    for k in ("RRefUserDelete", "RRefForkRequest", "PropagateGradients"):
        assert frames.get(k), f"the prelude sent no {k} to replay (sent: {sorted(recorded)})"
    ctx_state = agent.autograd.contexts.get(cid)
    known = {
        "gids": gids,
        "phantom_gids": [G(3, 1), G(3, 2), G(1, 1)],
        "contexts": [cid, old],
        "own_contexts": [old],
        "passes": [p for p in ctx_state.passes],
        "ag_ids": [*ctx_state.sends, *ctx_state.recvs],
        "open_context": cid,
        "keep": (r1, x, y),
    }
    return known, frames, incoming


def test_fuzz_live_worker_survives_hostile_frames():
    ctx = get_context()
    events = [ctx.Barrier(3), ctx.Event(), ctx.Event(), ctx.Event()]
    t0 = time.monotonic()
    results = run_workers(_fuzz_job, 3, args=events, timeout=120, env=ENV)
    took = time.monotonic() - t0
    attacker, victim, bystander = results
    print(f"\nfuzz seed {attacker['seed']}: {attacker['total']} cases in {took:.1f} s "
          f"({attacker['fuzz_s']:.1f} s in the attacker)")
    for key in ("cases", "kinds", "replayable", "main_replies", "phantom_drops", "phantom_replies",
                "main_dropped", "main_header", "victim_rss_mib"):
        print(f"  {key}: {attacker.get(key)}")
    for key in ("log_levels", "log_texts", "pool_size", "rref_state", "contexts", "errors"):
        print(f"  victim {key}: {victim[key]}")
    print(f"  bystander: {bystander}")

    assert attacker["total"] > 15000, attacker["cases"]
    assert attacker["cases"]["main"] > 5000, attacker.get("main_dropped")
    # worker1 kept serving the bystander, and its state is intact
    assert bystander["add"] == 5
    assert bystander["tag"] == bystander["tag_via_proxy"] == "bystander"
    assert bystander["grad"] == [3.0, 3.0, 3.0]
    assert bystander["fresh_grad"] == [2.0, 2.0]
    # no handler crashed, no reader died
    assert victim["errors"] == [], victim["errors"]
    assert any("acceptor" in t for t in victim["threads"]), victim["threads"]
    # the oversized headers allocated nothing: worker1's peak RSS grew by less than 256 MiB
    hwm_before, hwm_after = attacker["victim_rss_mib"]["VmHWM"]
    assert hwm_after - hwm_before < 256, attacker["victim_rss_mib"]
    # every oversized header dropped only the connection it came on (counted as drops)
    assert sum(v for k, v in attacker["phantom_drops"].items() if not k.startswith("batch")) >= N_HEADERS
    if "main_header" in attacker:
        assert attacker["main_header"][1] == "dropped"


# --------------------------------------------------------------------------------------
# Bugs the fuzzing found (strict xfail: each turns into a failure once fixed)
# --------------------------------------------------------------------------------------


def _bug_gradient_frame_on_connection(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()
        reply, error = _request_raw(agent, 1, _overflowing_gradient_frame(), timeout=10)
        out["reply"] = type(reply).__name__ if reply is not None else None
        out["reply_type_name"] = getattr(reply, "type_name", None)
        out["error"] = repr(error) if error is not None else None
        try:
            out["after"] = rpc.rpc_sync("worker1", add, args=(1, 1), timeout=10)
        except RuntimeError as e:
            out["after"] = repr(e)
    rpc.shutdown()
    return out


def test_bug_malformed_gradient_frame_drops_the_connection():
    out = run_workers(_bug_gradient_frame_on_connection, 2, timeout=60)[0]
    # expected: an error reply (ProtocolError) to that one message, and the connection kept
    assert out["reply"] == "ExceptionReply" and "ProtocolError" in out["reply_type_name"], out
    assert out["after"] == 2, out


def _bug_acceptor(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        store = rpc.api.current.agent()._rv.store
        address = json.loads(store.get("worker/1"))["address"]
        rp = RawPeer.connect(address, label="first-frame")
        rp.send(_overflowing_gradient_frame())
        out["closed"] = rp.closed.wait(5)
        rp.close()
        time.sleep(0.2)
        out["threads"] = rpc.rpc_sync("worker1", torchrpc_threads)
        # a second connection: is anyone still accepting?
        t0 = time.monotonic()
        try:
            rp = RawPeer.connect(address, label="second", secret=SECRET.encode())
            rp.send(_frame(m.Hello(0, 0, "worker0")))  # not acceptable: must be closed
            out["second_closed"] = rp.closed.wait(5)
            rp.close()
        except ConnectionClosed as e:
            out["second_closed"] = f"handshake failed after {time.monotonic() - t0:.1f} s: {e}"
    rpc.shutdown()
    return out


def test_bug_malformed_first_frame_kills_the_acceptor():
    out = run_workers(_bug_acceptor, 2, timeout=60, env=ENV)[0]
    assert out["closed"] is True, out
    assert any("acceptor" in t for t in out["threads"]), out
    assert out["second_closed"] is True, out


def _bug_fork_owner(rank, world_size):
    init(rank, world_size, rpc_timeout=6)
    out = {}
    if rank == 0:
        # fork data: owner 7 (the job has 2 workers), rref (7, 1), fork (0, 99), parent 0 (us)
        forged = ForgedFork((7, 7, 1, 0, 99, 0))
        try:
            out["call"] = rpc.rpc_sync("worker1", len, args=((forged,),), timeout=10)
        except RuntimeError as e:
            out["call"] = f"{type(e).__name__}: {e}"
        time.sleep(2)
        out["pending_users_after_2s"] = rpc.rpc_sync("worker1", _debug_info)["num_pending_users"]
    t0 = time.monotonic()
    rpc.shutdown()
    out["shutdown_s"] = time.monotonic() - t0
    return out


def _debug_info():
    return rpc.api.current.agent().ctx.debug_info()


def test_bug_fork_naming_a_worker_outside_the_job_is_accepted():
    out = run_workers(_bug_fork_owner, 2, timeout=60)
    print(out)
    caller = out[0]
    assert "7" in str(caller["call"]) and caller["call"] != 1, caller  # expected: an error naming worker 7
    assert caller["pending_users_after_2s"] == 0, caller


def _bug_rref_backward(rank, world_size):
    init(rank, world_size, rpc_timeout=4)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()
        with dist_autograd.context() as cid:
            rpc.rpc_sync("worker1", add, args=(1, 2))  # worker1 now knows context cid
            nobody_made = G(0, 1 << 40)
            # a to_here of an RRef id whose remote() never came: the owner makes an empty OwnerRRef
            _request_raw(agent, 1, _frame(m.RRefFetchCall(0, nobody_made)), timeout=0.5)
            t0 = time.monotonic()
            try:
                agent.control(1, m.RRefBackward(0, nobody_made, cid, False)).wait()
                out["backward"] = "acked"
            except RuntimeError as e:
                out["backward"] = f"{type(e).__name__}: {e}"
            out["backward_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    rpc.shutdown()
    out["shutdown_s"] = time.monotonic() - t0
    return out


def test_bug_rref_backward_on_a_valueless_owner_blocks_a_thread_forever():
    caller, owner = run_workers(_bug_rref_backward, 2, timeout=60)
    print(caller, owner)
    # expected: an error reply at once (no such RRef value), and a prompt shutdown
    assert caller["backward_s"] < 2 and "Timeout" not in caller["backward"], caller
    assert owner["shutdown_s"] < 5, owner


def _bug_malformed_reply(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()
        fut = rpc.rpc_async("worker1", sleep_then, args=(1.0, "ok"))
        msg_id = next(k for k, p in list(agent.pending._entries.items()) if p.desc == "sleep_then")
        # a reply from worker0 that does not decode (an extra buffer), whose msg id happens to
        # be the same number as that call's: msg ids of replies are worker1's, of requests ours
        agent.peers.conns[1].send(_frame(m.RRefAck(msg_id)) + [b"junk"])
        try:
            out["call"] = fut.wait()
        except RuntimeError as e:
            out["call"] = f"{type(e).__name__}: {e}"
    rpc.shutdown()
    return out


def test_bug_malformed_reply_is_answered_and_fails_an_unrelated_call():
    out = run_workers(_bug_malformed_reply, 2, timeout=60)[0]
    assert out["call"] == "ok", out


def _bug_claimed_length(rank, world_size, where):
    init(rank, world_size)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()
        pid = rpc.rpc_sync("worker1", os.getpid)
        before = _rss(pid)["VmRSS"]
        claim = struct.pack("<IQ", 1, 1 << 30)  # one 1 GiB buffer (the limit is 64 GiB); no data follows
        if where == "established":
            conn = agent.peers.conns[1]
            with conn._send_lock:
                conn._sock.sendall(claim)
        else:
            address = json.loads(agent._rv.store.get("worker/1"))["address"]
            conn = transport.connect(address, timeout=10, secret=SECRET.encode())
            conn._sock.sendall(claim)
        grown = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            grown = max(grown, _rss(pid)["VmRSS"] - before)
            time.sleep(0.05)
        out["grown_mib"] = grown // MIB
        conn.close()
    rpc.shutdown()
    return out


@pytest.mark.parametrize("where", ["established", "before_hello"])
def test_bug_claimed_length_is_allocated_before_any_data_arrives(where):
    out = run_workers(_bug_claimed_length, 2, args=(where,), timeout=60, env=ENV)[0]
    print(out)
    # expected: memory follows the bytes that arrived (none here), not the claim
    assert out["grown_mib"] < 256, out
