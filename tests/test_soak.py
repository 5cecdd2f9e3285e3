"""Soak: four workers run a mixed, concurrent workload for ``TORCHRPC_SOAK_SECONDS`` (100 s).

Each worker runs three threads until the deadline:

* **calls**: ``rpc_sync`` / ``rpc_async`` (with ``then``) to random peers, nested calls
  (the callee calls a third worker, or back to the caller), call chains through every
  worker, and now and then a 320 KB tensor round trip (through shared memory);
* **rrefs**: ``remote()`` + ``to_here()``, the ``rref.rpc_sync()`` proxy, the RRef sent
  back to its owner, RRefs created on a peer and returned (owner -> user), and forks: the
  RRef is passed to a third worker, which fetches it, holds it, and releases it when
  asked later (user -> user, G1/G2);
* **autograd**: fresh distributed autograd contexts; a forward through one or two other
  workers (or a loss computed remotely, then ``RRef.backward``), a distributed backward,
  and the gradients of every leaf compared with the same computation done locally.

Every operation is counted when issued and when its result was checked; any error, or a
wrong value, is recorded with its traceback; a call that never returns shows up as a
thread that does not finish (calls have a 30 s timeout, so a lost reply surfaces as an
error first).

Afterwards every worker releases what it holds, then, after a barrier, waits (at most
30 s) for its RRef tables, autograd contexts and pending calls to drain and for every
RRef value (``Value``: the owners' values and every fetched copy) to be freed. Then it
compares threads and file descriptors with what it had right after ``init_rpc``:

* **threads**: the non-pool threads (main, watchdog, heartbeat, acceptor; the workload
  threads are joined) must be exactly the same set. The pools only grow (nested calls
  block threads, and a busy pool spawns more), so the pool's size is reported, not compared.
* **file descriptors**: sockets, pipes and everything else must be the same numbers,
  exactly. The one legitimate growth is the shared-memory cache: each sender segment
  and each mapped peer segment is an ``mmap``, which keeps a dup of its file's fd for the
  life of the connection. Those fds (``/dev/shm/torchrpc-*``) must equal the number of
  segments and mappings the connections report, and every sender segment must be free
  again (a busy one means a received buffer was never released).

There is no tolerance beyond that: once the workload has drained, nothing else in a
worker opens a file or starts a thread, so any difference is a leak.
"""
from __future__ import annotations

import collections
import gc
import os
import random
import threading
import time
import traceback

import pytest
import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import add, call, chain, ident, init, whoami
from harness import get_context, infrastructure_pids, run_workers
from torchrpc.transport import shm

DURATION = float(os.environ.get("TORCHRPC_SOAK_SECONDS", "100"))
WORLD = 4
THREADS = ("calls", "rrefs", "autograd")
RPC_TIMEOUT = 30
DRAIN_S = 30

pytestmark = pytest.mark.timeout(max(240, DURATION + 140))


# --------------------------------------------------------------------------------------
# Remote functions
# --------------------------------------------------------------------------------------

_holding: dict = {}
_holding_lock = threading.Lock()

_alive = 0
_alive_lock = threading.Lock()


def _count(n):
    global _alive
    with _alive_lock:
        _alive += n


class Value:
    """An RRef's value that counts its live instances in this process, fetched copies included
    (``common.Tracked`` counts only the ones made by ``__init__``)."""

    def __init__(self, tag):
        self.tag = tag
        self.payload = torch.ones(4)
        _count(1)

    def __setstate__(self, state):  # an unpickled copy
        self.__dict__.update(state)
        _count(1)

    def get(self):
        return self.tag

    def __del__(self):
        _count(-1)


def make_value(tag):
    return Value(tag)


def values_alive():
    gc.collect()
    with _alive_lock:
        return _alive


def hold_rref(key, rref, tag):
    """Keep ``rref`` here until ``drop_rref(key)``; check its value (a fetch from its owner)."""
    ok = rref.to_here(timeout=RPC_TIMEOUT).tag == tag
    with _holding_lock:
        _holding[key] = rref
    return ok


def drop_rref(key):
    with _holding_lock:
        rref = _holding.pop(key, None)
    return rref is not None


def owner_tag(rref):
    """Runs on the owner: the RRef it received is its own OwnerRRef."""
    return rref.is_owner(), rref.local_value().tag


def share_new(tag):
    """An RRef owned here, returned to the caller (an owner -> user fork)."""
    return rpc.RRef(Value(tag))


def stage(x, w, nxt=None, w2=None):
    """tanh(x * w), then (if ``nxt``) the next stage on worker ``nxt``."""
    h = torch.tanh(x * w)
    if nxt is not None:
        h = rpc.rpc_sync(nxt, stage, args=(h, w2))
    return h


def remote_loss(x, w):
    return torch.tanh(x * w).pow(2).sum()


def plus_one(fut):
    return fut.wait() + 1


# --------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------


class Tally:
    """Issued and checked operations by kind, and the errors, for one worker."""

    def __init__(self):
        self.lock = threading.Lock()
        self.issued = collections.Counter()
        self.ok = collections.Counter()
        self.errors: list[str] = []
        self.n_errors = 0

    def run(self, kind, fn, *args):
        with self.lock:
            self.issued[kind] += 1
        try:
            good = fn(*args)
        except BaseException as e:  # noqa: BLE001 - every error is unexpected here
            self._error(kind, "".join(traceback.format_exception(e))[-1500:])
            return None
        if good is False:
            self._error(kind, "wrong result")
            return None
        with self.lock:
            self.ok[kind] += 1
        return good

    def _error(self, kind, text):
        with self.lock:
            self.n_errors += 1
            if len(self.errors) < 20:
                self.errors.append(f"{kind}: {text}")


def _calls(rank, rng, tally, t_end):
    peers = [r for r in range(WORLD) if r != rank]
    names = [f"worker{r}" for r in range(WORLD)]
    while time.monotonic() < t_end:
        p = rng.choice(peers)
        q = rng.choice([r for r in range(WORLD) if r != p])  # may be this worker: a call back
        k = rng.randrange(1000)
        t = torch.full((3,), float(k))
        tally.run("rpc_sync", lambda: torch.equal(rpc.rpc_sync(p, add, args=(t, 1)), t + 1))

        def many():
            futs = [rpc.rpc_async(rng.choice(peers), add, args=(k, i)) for i in range(4)]
            return [f.wait() for f in futs] == [k + i for i in range(4)]

        tally.run("rpc_async", many)
        tally.run("then", lambda: rpc.rpc_async(p, add, args=(k, 2)).then(plus_one).wait() == k + 3)
        tally.run("nested", lambda: rpc.rpc_sync(p, call, args=(q, add, (k, 5))) == k + 5)
        tally.run("nested_back", lambda: rpc.rpc_sync(p, call, args=(rank, whoami)) == names[rank])
        hops = rng.sample(peers, len(peers))
        tally.run("chain", lambda: rpc.rpc_sync(hops[0], chain, args=(hops[1:], k)) == [names[h] for h in hops])
        if rng.random() < 0.1:
            big = torch.randn(80_000)  # 320 KB: over the shared-memory threshold
            tally.run("big", lambda: torch.equal(rpc.rpc_sync(p, ident, args=(big,)), big))


def _rrefs(rank, rng, tally, t_end):
    peers = [r for r in range(WORLD) if r != rank]
    outstanding: list[tuple[int, str]] = []  # (holder, key) of RRefs handed to third workers
    n = 0
    while time.monotonic() < t_end:
        n += 1
        p = rng.choice(peers)
        third = rng.choice([r for r in range(WORLD) if r not in (rank, p)])
        tag = f"w{rank}-{n}"
        rref = rpc.remote(p, make_value, args=(tag,))
        tally.run("remote", lambda: rref.to_here().tag == tag)
        tally.run("proxy", lambda: rref.rpc_sync().get() == tag)
        tally.run("to_owner", lambda: rpc.rpc_sync(p, owner_tag, args=(rref,)) == (True, tag))
        # a fork to a third worker (user -> user), held there until released below
        key = f"{tag}@{third}"
        if tally.run("fork", lambda: rpc.rpc_sync(third, hold_rref, args=(key, rref, tag))):
            outstanding.append((third, key))
        if rng.random() < 0.3:  # and one to the owner, which holds its own RRef a while
            key = f"{tag}@owner"
            if tally.run("fork_to_owner", lambda: rpc.rpc_sync(p, hold_rref, args=(key, rref, tag))):
                outstanding.append((p, key))
        del rref
        # owner -> user: an RRef a peer makes and returns
        tag2 = tag + "-shared"
        shared = tally.run("owner_share", lambda: rpc.rpc_sync(p, share_new, args=(tag2,)))
        if shared is not None:
            tally.run("owner_share_fetch", lambda: shared.to_here().tag == tag2 and not shared.is_owner())
        del shared
        while len(outstanding) > rng.randrange(2, 10):
            holder, key = outstanding.pop(rng.randrange(len(outstanding)))
            tally.run("release", lambda: rpc.rpc_sync(holder, drop_rref, args=(key,)))
    for holder, key in outstanding:
        tally.run("release", lambda: rpc.rpc_sync(holder, drop_rref, args=(key,)))


def _close(a, b):
    return a is not None and b is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _autograd(rank, rng, tally, t_end):
    peers = [r for r in range(WORLD) if r != rank]

    def leaf(n):
        return torch.tensor([rng.uniform(-1.5, 1.5) for _ in range(n)], requires_grad=True)

    def through_workers():
        p = rng.choice(peers)
        q = rng.choice([r for r in peers if r != p]) if rng.random() < 0.5 else None
        x, w, w2 = leaf(4), leaf(4), leaf(4)
        with dist_autograd.context() as cid:
            y = rpc.rpc_sync(p, stage, args=(x, w, q, w2 if q is not None else None))
            dist_autograd.backward(cid, [(y * y).sum()])
            grads = dist_autograd.get_gradients(cid)
        # the same computation, locally
        xr, wr, w2r = (t.detach().clone().requires_grad_() for t in (x, w, w2))
        yr = torch.tanh(xr * wr)
        if q is not None:
            yr = torch.tanh(yr * w2r)
        (yr * yr).sum().backward()
        ok = _close(grads.get(x), xr.grad) and _close(grads.get(w), wr.grad)
        if q is not None:
            ok = ok and _close(grads.get(w2), w2r.grad)
        return ok and len(grads) == (3 if q is not None else 2)

    def rref_backward():
        p = rng.choice(peers)
        x, w = leaf(3), leaf(3)
        with dist_autograd.context() as cid:
            loss = rpc.remote(p, remote_loss, args=(x, w))
            loss.backward(cid)  # starts on the owner
            grads = dist_autograd.get_gradients(cid)
        xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
        torch.tanh(xr * wr).pow(2).sum().backward()
        return _close(grads.get(x), xr.grad) and _close(grads.get(w), wr.grad)

    while time.monotonic() < t_end:
        if rng.random() < 0.75:
            tally.run("backward", through_workers)
        else:
            tally.run("rref_backward", rref_backward)


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def _fds() -> collections.Counter:
    """Open fds by kind: socket, pipe, shm (this job's shared-memory segments), other."""
    kinds: collections.Counter = collections.Counter()
    prefix = os.path.join(shm.shm_dir(), "torchrpc-")
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd of the listing itself, closed by now
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith(prefix):
            kinds["shm"] += 1
        else:
            kinds["other"] += 1
    return kinds


def _shm_cache(agent) -> dict:
    """Segments this worker's connections keep: sender segments (and how many are busy), mappings."""
    segments = busy = mapped = 0
    for conn in [c for _, c in agent.peers.peers()]:
        tx, rx = getattr(conn, "_shm_tx", None), getattr(conn, "_shm_rx", None)
        if tx is not None:
            with tx._lock:
                segments += len(tx._segments)
                busy += sum(not s.free for s in tx._segments)
        if rx is not None:
            mapped += len(rx._maps)
    return {"segments": segments, "busy": busy, "mapped": mapped}


def _threads(agent) -> list[str]:
    """Names of the Python threads that are not in the agent's pools (the pool, the autograd pool)."""
    pool = set(agent._pool.threads) | set(agent._autograd_pool.threads)
    return sorted(t.name for t in threading.enumerate() if t not in pool)


def _state(agent) -> dict:
    ctx = agent.ctx
    with ctx._lock:
        state = {
            "owners": len(ctx.owners),
            "forks": sum(len(v) for v in ctx.forks.values()),
            "deleted_forks": sum(len(v) for v in ctx.deleted_forks.values()),
            "pending_users": len(ctx.pending_users),
            "pending_children": len(ctx.pending_children),
            "confirmed_users": len(ctx.confirmed_users),
        }
    state["autograd_contexts"] = len(agent.autograd.contexts.ids())
    state["pending_calls"] = len(agent.pending)
    state["retrying"] = agent.endpoint.retrying
    state["values_alive"] = values_alive()  # collects garbage first
    with _holding_lock:
        state["holding"] = len(_holding)
    return state


def _soak(rank, _nprocs, barrier, duration, seed):
    init(rank, WORLD, rpc_timeout=RPC_TIMEOUT)
    agent = rpc.api.current.agent()
    barrier.wait(60)
    fds0, threads0, pool0 = _fds(), _threads(agent), len(agent._pool.threads)

    tally = Tally()
    t0 = time.monotonic()
    t_end = t0 + duration
    workers = []
    for i, (name, body) in enumerate(zip(THREADS, (_calls, _rrefs, _autograd))):
        rng = random.Random(seed * 1000 + rank * 10 + i)
        workers.append(threading.Thread(target=tally.run, args=(f"thread:{name}", body, rank, rng, tally, t_end),
                                        name=f"soak-{name}"))
    for t in workers:
        t.start()
    for t in workers:
        t.join(duration + 60)
    hung = [t.name for t in workers if t.is_alive()]
    assert not hung, f"workload threads still running {time.monotonic() - t_end:.0f} s past the end: {hung}"
    ran_s = time.monotonic() - t0

    # everything this worker handed out is released; wait for every worker to be there
    gc.collect()
    barrier.wait(120)
    deadline = time.monotonic() + DRAIN_S
    while True:
        state = _state(agent)
        if not any(state.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    drain_s = time.monotonic() - deadline + DRAIN_S
    barrier.wait(DRAIN_S + 30)

    fds1, threads1, pool1, cache = _fds(), _threads(agent), len(agent._pool.threads), _shm_cache(agent)
    barrier.wait(60)
    rpc.shutdown()
    return {
        "issued": dict(tally.issued), "ok": dict(tally.ok), "n_errors": tally.n_errors, "errors": tally.errors,
        "ran_s": ran_s, "drain_s": drain_s, "state": state,
        "fds": (dict(fds0), dict(fds1)), "shm_cache": cache,
        "threads": (threads0, threads1), "pool": (pool0, pool1),
    }


def _descendants() -> list[int]:
    """Living descendants of this process other than the forkserver and resource tracker."""
    parent = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                parent[int(pid)] = int(fields[1])
    infra = infrastructure_pids()
    out, frontier = [], [os.getpid()]
    while frontier:
        me = frontier.pop()
        for pid, ppid in parent.items():
            if ppid == me:
                frontier.append(pid)
                if pid not in infra:
                    out.append(pid)
    return out


def test_soak_four_workers_mixed_workload_no_lost_replies_no_leaks():
    seed = int(os.environ.get("TORCHRPC_SOAK_SEED", "1"))
    before = set(_descendants())
    t0 = time.monotonic()
    results = run_workers(_soak, WORLD, args=(get_context().Barrier(WORLD), DURATION, seed),
                          timeout=DURATION + 120)
    took = time.monotonic() - t0

    total_issued = sum(sum(r["issued"].values()) for r in results)
    print(f"\nsoak: {WORLD} workers x {len(THREADS)} threads for {DURATION:g} s (seed {seed}), "
          f"{total_issued} operations, {took:.0f} s in all")
    for rank, r in enumerate(results):
        print(f"  worker{rank}: ran {r['ran_s']:.1f} s, drained in {r['drain_s']:.2f} s, pool {r['pool']}, "
              f"fds {r['fds']}, shm {r['shm_cache']}")
        print(f"    issued {dict(sorted(r['issued'].items()))}")
        print(f"    final state {r['state']}")
        for e in r["errors"]:
            print(f"    ERROR {e}")

    problems = []
    for rank, r in enumerate(results):
        w = f"worker{rank}"
        # every operation issued came back with the expected value
        if r["n_errors"] or r["issued"] != r["ok"]:
            missing = {k: v - r["ok"].get(k, 0) for k, v in r["issued"].items() if v != r["ok"].get(k, 0)}
            problems.append(f"{w}: {r['n_errors']} errors; issued but not ok: {missing}; first: {r['errors'][:3]}")
        kinds = {k for k in r["issued"] if not k.startswith("thread:")}
        expected_kinds = {"rpc_sync", "rpc_async", "then", "nested", "nested_back", "chain", "remote", "proxy",
                          "to_owner", "fork", "release", "owner_share", "owner_share_fetch", "backward",
                          "rref_backward"}
        if DURATION >= 30 and not expected_kinds <= kinds:
            problems.append(f"{w}: never ran {sorted(expected_kinds - kinds)}")
        # nothing left: no owner holds a value, no fork, no context, no pending call, no value alive
        if any(r["state"].values()):
            problems.append(f"{w}: not drained after {DRAIN_S} s: { {k: v for k, v in r['state'].items() if v} }")
        # threads: the same non-pool threads as right after init_rpc
        if r["threads"][0] != r["threads"][1]:
            problems.append(f"{w}: non-pool threads {r['threads'][0]} -> {r['threads'][1]}")
        # fds: the same, except the shared-memory cache, which must account for every shm fd
        (f0, f1), cache = r["fds"], r["shm_cache"]
        for kind in ("socket", "pipe", "other"):
            if f0.get(kind, 0) != f1.get(kind, 0):
                problems.append(f"{w}: {kind} fds {f0.get(kind, 0)} -> {f1.get(kind, 0)}")
        if f1.get("shm", 0) - f0.get("shm", 0) != cache["segments"] + cache["mapped"]:
            problems.append(f"{w}: shm fds {f0.get('shm', 0)} -> {f1.get('shm', 0)}, but the connections "
                            f"keep {cache['segments']} segments and {cache['mapped']} mappings")
        if cache["busy"]:
            problems.append(f"{w}: {cache['busy']} shared-memory segments still busy after the drain")
    assert not problems, "\n".join(problems)
    assert total_issued > 1000 * DURATION / 100, total_issued

    # no worker (nor anything it started) outlives the test
    deadline = time.monotonic() + 5
    while (left := set(_descendants()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind: {sorted(left)}"
