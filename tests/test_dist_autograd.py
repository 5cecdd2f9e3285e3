"""Multi-process tests of distributed autograd (torchrpc.autograd, as torch.distributed.autograd).

How the correctness tests work
------------------------------
A *topology* is a module-level function that computes a scalar loss on worker0,
calling other workers through ``call`` / ``acall`` / ``remote``. Its leaves are
*parameters* made by ``P(name)``: float64 tensors that depend only on the name
(seeded), created on first use on the worker that asks for them; the first capital letter
of the name says which worker that must be (A=worker0, B=worker1, C=worker2).

The same topology then runs twice:

* in the workers, inside ``dist_autograd.context()``, with real RPCs; each worker
  reports ``get_gradients`` by parameter name;
* in the test process (``reference``), with ``call`` & co. replaced by plain local
  calls, and ``torch.autograd.grad`` over every parameter it made.

The gradients must match (``torch.allclose`` in float64), on the right workers, with
nothing else in ``get_gradients`` (no gradient for a received copy of a tensor).
A custom Function ``Count`` counts its backward calls per label on each worker, so
the tests also see that every node ran exactly once per pass.
"""
from __future__ import annotations

import collections
import gc
import os
import struct
import threading
import time
import zlib

import pytest
import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import init, whoami
from harness import KILLED, get_context, run_workers, start_workers
from torchrpc.protocol import messages as m
from torchrpc.protocol.messages import GloballyUniqueId as Gid

pytestmark = pytest.mark.timeout(120)

OWNERS = {"A": 0, "B": 1, "C": 2}


def owner_of(name):
    """The worker that owns parameter ``name``: its first capital letter (A, B or C)."""
    return OWNERS[next(c for c in name if c.isupper())]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# ======================================================================================
# Building blocks shared by the workers and the local reference
# ======================================================================================

_LOCAL = False  # True only in the test process while it computes a reference
_P: dict[str, torch.Tensor] = {}
_P_lock = threading.Lock()
_COUNTS: collections.Counter = collections.Counter()
_COUNTS_lock = threading.Lock()


def P(name: str) -> torch.Tensor:
    """The parameter ``name``: a leaf (3,) float64 tensor, the same values everywhere."""
    with _P_lock:
        t = _P.get(name)
        if t is None:
            if not _LOCAL:
                me = rpc.get_worker_info().id
                check(owner_of(name) == me, f"parameter {name} made on worker{me}")
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            t = _P[name] = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        return t


class _Done:
    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value

    def to_here(self):
        return self.value


def call(to, fn, *args):
    return fn(*args) if _LOCAL else rpc.rpc_sync(to, fn, args=args)


def acall(to, fn, *args):
    return _Done(fn(*args)) if _LOCAL else rpc.rpc_async(to, fn, args=args)


def remote(to, fn, *args):
    return _Done(fn(*args)) if _LOCAL else rpc.remote(to, fn, args=args)


class Count(torch.autograd.Function):
    """y = 2 x; counts its backward calls under ``label`` on this worker."""

    @staticmethod
    def forward(ctx, x, label):
        ctx.label = label
        return x * 2

    @staticmethod
    def backward(ctx, g):
        with _COUNTS_lock:
            _COUNTS[ctx.label] += 1
        return g * 2, None


def counts():
    with _COUNTS_lock:
        return dict(_COUNTS)


# --- pieces of the topologies (they run on the worker named by the parameters they use)


def f_b(x):
    return torch.tanh(x * P("wB")) * 1.5


def g_b(x):
    return (x * P("wB2")).sin()


def f_c(x):
    return x.sin() * P("wC")


def chain_b(x):
    h = torch.tanh(x * P("wB"))
    z = call(2, chain_c, h)
    return z + h.sin()


def chain_c(h):
    return (h * P("wC")).exp()


def ring_b(x):
    return call(2, ring_c, x * P("wB"))


def ring_c(h):
    return call(0, ring_a, h.sin() * P("wC"))


def ring_a(h):
    return h * P("wA2")


def combine_b(a, b):
    return a * b * P("wB2")


def fanin_b(x):
    hb = (x * P("wB")).cos()
    return call(2, fanin_c, x, hb)


def fanin_c(x, hb):
    hc = x * P("wC")
    return call(0, join_a, hb, hc)


def join_a(hb, hc):
    return hb * hc + hb * P("wA2")


def pp_b(h, depth):
    h = (h * P("wB")).sin()
    return call(0, pp_a, h, depth - 1) if depth > 0 else h


def pp_a(h, depth):
    return call(1, pp_b, (h * P("wA2")).cos(), depth)


def nested_fan_b(x):
    f1 = acall(2, f_c, x * P("wB"))
    f2 = acall(0, ring_a, x)
    return f1.wait() * f2.wait()


def use_rref(r):
    return r.to_here() * P("wC")


def use_rref_b(r):
    return r.to_here() * P("wB2")


def leaf_b(name):
    return P(name)


def unused_b(x):
    h = x * P("wB")
    call(2, f_c, h)  # its result is thrown away: its recv is never reached
    return h.tanh()


def count_b_c(x):
    c = Count.apply(x * P("wB"), "B1")
    r = call(2, f_c, c)
    return r * c


def residual_b(x):
    """tanh(r) + r, r received from C: a node (Add) one of whose inputs also feeds the other."""
    r = call(2, f_c, x * P("wB"))
    return torch.tanh(r) + r


def count_b(x):
    return Count.apply((x * P("wB")).sin(), "B2")


def count_c(hb):
    return Count.apply(hb * P("wC"), "C1")


def count_join_c(x):
    """On C: a Count node whose output goes to A and B, and comes back to C from both."""
    c = Count.apply(x * P("wC"), "C2")
    yb = call(1, g_b, c)
    ya = call(0, ring_a, c)
    return yb + ya


# --- the topologies (run on worker0, or on the worker named in the input's name) ---------


def t_chain(xn="xA"):
    """A -> B -> C, nested: C's result returns to A through B."""
    x = P(xn)
    y = call(1, chain_b, x)
    return (y * P("wA")).sum()


def t_ring(xn="xA"):
    """A -> B -> C -> A (a function on A, in the same context), and back."""
    x = P(xn)
    y = call(1, ring_b, x)
    return (y * x).sum()


def t_fanout(xn="xA"):
    x = P(xn)
    yb, yc = acall(1, f_b, x), acall(2, f_c, x)
    return (yb.wait() * yc.wait()).sum() + x.pow(2).sum()


def t_fanin(xn="xA"):
    """Results of B and C combined on B (one of them came back through A), and on A."""
    x = P(xn)
    yb = call(1, f_b, x)
    yc = call(2, f_c, x * 2)
    z = call(1, combine_b, yb, yc)
    return (z * yc).sum()


def t_fanin_on_a(xn="xA"):
    """B and C both send tensors to one function on A (join_a, called by C)."""
    x = P(xn)
    return (call(1, fanin_b, x) * P("wA")).sum()


def t_pingpong_nested(xn="xA"):
    """A -> B -> A -> B -> A -> B, each a nested rpc_sync inside the previous one."""
    x = P(xn)
    return call(1, pp_b, x, 2).sum() + x.sum()


def t_pingpong_sequential(xn="xA"):
    """A calls B, then calls B again with the result."""
    x = P(xn)
    y1 = call(1, g_b, x)
    y2 = call(1, g_b, y1)
    return (y2 * y1).sum()


def t_param_in_two_rpcs(xn="xA"):
    w = P("wA")
    y1 = call(1, f_b, w)
    y2 = call(1, g_b, w)
    return (y1 * y2).sum() + (w * P(xn)).sum()


def t_nested_fanout(xn="xA"):
    """B itself makes two async RPCs (to C and back to A) inside the caller's context."""
    x = P(xn)
    return call(1, nested_fan_b, x).sum()


def t_rref_args(xn="xA"):
    """remote() value fetched here, and its RRef passed to C (fetches from B) and to B (the owner)."""
    x = P(xn)
    rref = remote(1, f_b, x)
    v = rref.to_here()
    u = call(2, use_rref, rref)
    w = call(1, use_rref_b, rref)
    return (v * u).sum() + w.sum()


def t_remote_add(xn="xA"):
    """PyTorch's dist_autograd example: rref = remote(dst, torch.add, (t1, t2))."""
    t1, t2 = P(xn), P("x2A")
    rref = remote(1, torch.add, t1, t2)
    return rref.to_here().sum()


def t_remote_random_tensors(xn="xA"):
    """rref1 = remote(dst, random_tensor); loss = rref1.to_here() + rref2.to_here(): leaves live on B."""
    rref1 = remote(1, leaf_b, "r1B")
    rref2 = remote(1, leaf_b, "r2B")
    return (rref1.to_here() + rref2.to_here() * P(xn)).sum()


def t_unused_outputs(xn="xA"):
    """RPC outputs recorded in the context but not used by the loss: backward must not wait for them."""
    x = P(xn)
    y1 = call(1, f_b, x)
    call(1, g_b, x)  # unused
    call(2, chain_c, x)  # unused, other worker
    remote(2, f_c, x)  # never fetched
    y3 = call(1, unused_b, x)  # B's own nested call is unused
    return (y1 * y3).sum()


def t_count_local_and_two_rpcs(xn="xA"):
    """A Count node on A whose output goes to B in two RPCs and is used locally."""
    h = Count.apply(P(xn), "A1")
    y1 = call(1, f_b, h)
    y2 = call(1, g_b, h)
    return (y1 + y2).sum() + (h * h).sum()


def t_count_fan(xn="xA"):
    """Count on A, its output sent to B and C, their results combined on A."""
    h = Count.apply(P(xn), "A2")
    yb, yc = acall(1, f_b, h), acall(2, f_c, h)
    return (yb.wait() * yc.wait()).sum()


def t_count_on_b(xn="xA"):
    """Count on B, used on B and sent to C; both paths join on B."""
    return call(1, count_b_c, P(xn)).sum()


def t_count_rref_fetched_twice(xn="xA"):
    """Count on B (an RRef's value) sent to A in two to_here replies."""
    rref = remote(1, count_b, P(xn))
    y1, y2 = rref.to_here(), rref.to_here()
    return (y1 * y2).sum() + y1.sum()


def t_count_join_after_crossing(xn="xA"):
    """Count on C; its output goes to B and to A, both results return to C and on to A."""
    x = P(xn)
    y = call(2, count_join_c, x)
    hc = call(2, count_c, y)  # and one more Count on C, downstream
    return (hc * x).sum()


def t_residual_on_caller(xn="xA"):
    """The loss uses an RPC result directly and through tanh (a residual connection)."""
    y = call(1, g_b, P(xn))
    return (y + y.tanh()).sum()


def t_residual_on_callee(xn="xA"):
    """B's reply is a residual of a tensor B received from C."""
    return (call(1, residual_b, P(xn)) * P("wA")).sum()


def rref_loss_b(x):
    """On B: a scalar loss that uses C (nested) and B's parameters."""
    return (call(2, f_c, x * P("wB")) * P("wB2")).sum()


def t_rref_loss(xn="xA"):
    """The loss of the RRef.backward tests (there it is the value of an RRef on B)."""
    return call(1, rref_loss_b, P(xn))


def t_from_b(xn="xB"):
    x = P(xn)
    y = call(2, f_c, x)
    return (call(0, ring_a, y) * x).sum()


def t_from_c(xn="xC"):
    x = P(xn)
    y = call(0, ring_a, x)
    return (call(1, f_b, y) * x).sum()


TOPOLOGIES = {f.__name__[2:]: f for f in [
    t_chain, t_ring, t_fanout, t_fanin, t_fanin_on_a, t_pingpong_nested, t_pingpong_sequential,
    t_param_in_two_rpcs, t_nested_fanout, t_rref_args, t_remote_add, t_remote_random_tensors,
    t_unused_outputs, t_count_local_and_two_rpcs, t_count_fan, t_count_on_b, t_count_rref_fetched_twice,
    t_count_join_after_crossing, t_residual_on_caller, t_residual_on_callee, t_rref_loss, t_from_b, t_from_c,
]}


def reference(topo, xn=None):
    """(loss, {param: grad}, {count label: n}) of one pass of ``topo``, in this process."""
    global _LOCAL
    _LOCAL = True
    _P.clear()
    _COUNTS.clear()
    try:
        fn = TOPOLOGIES[topo]
        loss = fn() if xn is None else fn(xn)
        names = list(_P)
        grads = torch.autograd.grad(loss, [_P[n] for n in names], allow_unused=True)
        return loss.item(), {n: g for n, g in zip(names, grads) if g is not None}, counts()
    finally:
        _LOCAL = False
        _P.clear()
        _COUNTS.clear()


# --- run on the workers --------------------------------------------------------------------


def grads_by_name(cid):
    """This worker's gradients in ``cid``, by parameter name ("?<shape>" for anything else)."""
    out = {}
    by_id = {id(t): n for n, t in _P.items()}
    for t, g in dist_autograd.get_gradients(cid).items():
        out[by_id.get(id(t), f"?{list(t.shape)}")] = g.detach().clone()
    return out


def context_ids():
    return rpc.api.current.agent().autograd.contexts.ids()


def wait_context_gone(cid, timeout=5.0):
    """Bounded poll: True once this worker no longer holds context ``cid``."""
    deadline = time.monotonic() + timeout
    while cid in context_ids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def collect(cid, world_size):
    """{rank: {name: grad}} and {rank: counts} from every worker, read while ``cid`` is alive."""
    me = rpc.get_worker_info().id
    grads, cnts = {}, {}
    for r in range(world_size):
        grads[r] = grads_by_name(cid) if r == me else rpc.rpc_sync(r, grads_by_name, args=(cid,))
        cnts[r] = counts() if r == me else rpc.rpc_sync(r, counts)
    return grads, cnts


def run_topology(topo, world_size, passes=1, xn=None):
    """Run ``topo`` here in a fresh context; its loss, gradients, counts and backward times."""
    fn = TOPOLOGIES[topo]
    with dist_autograd.context() as cid:
        loss = fn() if xn is None else fn(xn)
        times = []
        for i in range(passes):
            t0 = time.monotonic()
            dist_autograd.backward(cid, [loss], retain_graph=i < passes - 1)
            times.append(time.monotonic() - t0)
        grads, cnts = collect(cid, world_size)
    return {"loss": loss.item(), "grads": grads, "counts": cnts, "times": times, "cid": cid}


def assert_matches_reference(topo, out, passes=1, xn=None):
    ref_loss, ref_grads, ref_counts = reference(topo, xn)
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-12)
    got = {}
    for rank, grads in out["grads"].items():
        for name, g in grads.items():
            assert not name.startswith("?"), f"{topo}: worker{rank} has a gradient for a non-parameter {name}"
            assert name not in got, f"{topo}: {name} has gradients on two workers"
            assert owner_of(name) == rank, f"{topo}: gradient of {name} on worker{rank}"
            got[name] = g
    assert sorted(got) == sorted(ref_grads), f"{topo}: gradients for {sorted(got)}, expected {sorted(ref_grads)}"
    for name, g in got.items():
        assert g.dtype == torch.float64
        assert torch.allclose(g, passes * ref_grads[name], rtol=1e-10, atol=1e-12), (
            f"{topo}: gradient of {name}: {g} != {passes} x {ref_grads[name]}")
    merged = collections.Counter()
    for cnt in out["counts"].values():
        merged.update(cnt)
    assert dict(merged) == {k: passes * v for k, v in ref_counts.items()}, f"{topo}: backward calls {dict(merged)}"
    assert all(v == 1 for v in ref_counts.values())  # the reference itself runs each node once


# ======================================================================================
# 1-3. Correctness matrix, node counts, unused outputs
# ======================================================================================


def reset_counts():
    with _COUNTS_lock:
        _COUNTS.clear()


def _matrix(rank, world_size, plan):
    """Run each (topology, passes) of ``plan`` on worker0, one fresh context each; errors as text.

    Also counts worker0's discovery walks (none in a pass that skips discovery)."""
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        service = rpc.api.current.agent().autograd
        discover, walks = service._discover, []
        service._discover = lambda *a: (walks.append(1), discover(*a))[1]
        for topo, passes in plan:
            for r in range(world_size):
                rpc.rpc_sync(r, reset_counts)
            walks.clear()
            try:
                out[(topo, passes)] = run_topology(topo, world_size, passes)
                out[(topo, passes)]["discoveries"] = len(walks)
            except Exception as e:  # noqa: BLE001 - the test reports it
                out[(topo, passes)] = f"{type(e).__name__}: {e}"
    rpc.shutdown()
    return out



MATRIX = [t for t in TOPOLOGIES if t not in ("from_b", "from_c", "rref_loss") and not t.startswith("residual")]
RESIDUAL = [t for t in TOPOLOGIES if t.startswith("residual")]
RETAIN = ["chain", "ring", "fanin", "count_local_and_two_rpcs", "count_rref_fetched_twice", "unused_outputs",
          "rref_args"]


@pytest.fixture(scope="module")
def matrix_results():
    """Every topology of the matrix, and the retain_graph runs, in one 3-worker run (saves ~20 s)."""
    plan = [(t, 1) for t in MATRIX] + [(t, 2) for t in RETAIN]
    return run_workers(_matrix, 3, args=(plan,), timeout=90)[0]


def check_result(topo, out, passes=1):
    assert not isinstance(out, str), f"{topo}: {out}"
    assert_matches_reference(topo, out, passes)
    # every pass finishes promptly (rpc_timeout is 30 s): nothing waits for unused outputs
    assert max(out["times"]) < 3.0, out["times"]


@pytest.mark.parametrize("topo", MATRIX)
def test_gradients_match_single_process_autograd(matrix_results, topo):
    check_result(topo, matrix_results[(topo, 1)])


# Discovery is skipped exactly when no gradients can converge (DistAutogradContext.converges).
SKIPS_DISCOVERY = {
    "ring": "every send's part is its own",
    "fanout": "a leaf sent twice: its gradients just add up",
    "param_in_two_rpcs": "the same, for a parameter",
    "remote_add": "one send",
    "remote_random_tensors": "two leaves of B fetched by to_here",
}
NEEDS_DISCOVERY = {
    "chain": "B sends h to C and returns a function of h: B's sends converge, and A hears of it",
    "count_fan": "a non-leaf sent to B and C from the starter",
    "count_on_b": "converging sends on B, two hops from the starter",
    "pingpong_sequential": "the root reaches the recv that the starter sent on",
}


@pytest.mark.parametrize("topo", sorted(SKIPS_DISCOVERY) + sorted(NEEDS_DISCOVERY))
def test_discovery_runs_only_where_gradients_converge(matrix_results, topo):
    out = matrix_results[(topo, 1)]
    check_result(topo, out)
    # worker0 walks once when it starts discovery, and again whenever discovery comes back to it
    assert (out["discoveries"] == 0) == (topo in SKIPS_DISCOVERY), (
        SKIPS_DISCOVERY.get(topo) or NEEDS_DISCOVERY[topo])


@pytest.mark.parametrize("topo", RETAIN)
def test_retain_graph_then_second_backward_accumulates(matrix_results, topo):
    """backward(retain_graph=True), then backward again: every gradient is 2x, every node ran twice."""
    check_result(topo, matrix_results[(topo, 2)], passes=2)


@pytest.mark.parametrize("topo,passes", [(t, 1) for t in RESIDUAL] + [("residual_on_caller", 2)])
def test_residual_connections(topo, passes):
    out = run_workers(_matrix, 3, args=([(topo, passes)],), timeout=60)[0]
    check_result(topo, out[(topo, passes)], passes)


def _minimal_residual(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = None
    if rank == 0:
        with dist_autograd.context() as cid:
            x = torch.rand(3, requires_grad=True)
            y = rpc.rpc_sync("worker1", torch.mul, args=(x, 2.0))
            loss = (y + y.tanh()).sum()
            dist_autograd.backward(cid, [loss])
            got = dist_autograd.get_gradients(cid)[x]
        out = torch.allclose(got, 2 * (2 - torch.tanh(2 * x.detach()) ** 2))
    rpc.shutdown()
    return out


def test_minimal_repro_residual_of_an_rpc_result():
    """with context(): y = rpc_sync(w1, torch.mul, (x, 2)); backward([(y + y.tanh()).sum()])."""
    assert run_workers(_minimal_residual, 2, timeout=60) == [True, None]


# --- 1. concurrent contexts -------------------------------------------------------------------

CONCURRENT = {0: ["chain", "fanout", "ring", "rref_args"], 1: ["from_b"], 2: ["from_c"]}


def _concurrent(rank, world_size, barrier, rounds):
    init(rank, world_size, rpc_timeout=30)
    results, errors = [], []

    def drive(topo, xn):
        try:
            for _ in range(rounds):
                results.append((topo, xn, run_topology(topo, world_size, xn=xn)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            errors.append(repr(e))

    threads = [threading.Thread(target=drive, args=(topo, f"x{i}{'ABC'[rank]}"))
               for i, topo in enumerate(CONCURRENT[rank])]
    barrier.wait(30)  # every worker starts its contexts at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rpc.shutdown()
    return {"results": results, "errors": errors}


def test_concurrent_contexts_threads_and_workers_stay_independent():
    """Four threads on worker0 and one driver on each of worker1/2, all at once, sharing parameters."""
    barrier = get_context().Barrier(3)
    rounds = 3
    outs = run_workers(_concurrent, 3, args=(barrier, rounds), timeout=90)
    cids = []
    for rank, out in enumerate(outs):
        assert out["errors"] == []
        assert len(out["results"]) == rounds * len(CONCURRENT[rank])
        for topo, xn, res in out["results"]:
            assert_matches_reference(topo, res, xn=xn)
            cids.append(res["cid"])
    assert len(set(cids)) == len(cids)  # context ids are unique across threads and workers


# ======================================================================================
# 4. Every backward terminates: errors in a remote part, a worker dying mid-pass
# ======================================================================================


class Boom(torch.autograd.Function):
    """Identity forward; its backward raises."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ValueError(f"boom in backward on {rpc.get_worker_info().name}")


def boom_b(x):
    return Boom.apply(x * P("wB"))


def boom_c(h):
    return Boom.apply(h * P("wC"))


def boom_via_b(x):
    """B -> C, where C's part of the backward fails."""
    return call(2, boom_c, x * P("wB")) * 2


def boom_pending_b(x):
    """B fails on its first delivery while its send to C is still waiting for gradient."""
    c = x * P("wB")
    r = call(2, f_c, c)
    return Boom.apply(r) * c


def _backward_errors(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        cases = {"on_b": boom_b, "on_c_via_b": boom_via_b, "on_b_with_pending_source": boom_pending_b, "local": None}
        for case, fn in cases.items():
            t0 = time.monotonic()
            err = None
            with dist_autograd.context() as cid:
                x = P("xA")
                if fn is None:  # the failing node is on the caller itself
                    loss = (Boom.apply(x) * call(1, g_b, x)).sum()
                else:
                    loss = call(1, fn, x).sum()
                try:
                    dist_autograd.backward(cid, [loss])
                except Exception as e:  # noqa: BLE001
                    err = e
            took = time.monotonic() - t0  # the backward and leaving the context
            out[case] = {
                "error": None if err is None else f"{type(err).__name__}: {err}",
                "is_runtime_error": isinstance(err, RuntimeError),
                "took": took,
                "released": [wait_context_gone(cid)] + [rpc.rpc_sync(r, wait_context_gone, args=(cid,)) for r in (1, 2)],
            }
        # a second backward without retain_graph: B's saved tensors are gone; it fails promptly, naming B
        with dist_autograd.context() as cid:
            loss = call(1, chain_b, P("xA")).sum()  # nothing saved on A: the failure is on worker1
            dist_autograd.backward(cid, [loss])
            t0 = time.monotonic()
            try:
                dist_autograd.backward(cid, [loss])
                out["second"] = {"error": None}
            except Exception as e:  # noqa: BLE001
                out["second"] = {"error": f"{type(e).__name__}: {e}", "is_runtime_error": isinstance(e, RuntimeError),
                                 "took": time.monotonic() - t0}
        # later contexts work, on the same workers and parameters
        out["after"] = run_topology("chain", world_size)
        out["after2"] = run_topology("count_on_b", world_size)
    rpc.shutdown()
    return out


def test_error_in_remote_backward_is_raised_at_the_caller_naming_the_worker():
    out = run_workers(_backward_errors, 3, timeout=60)[0]
    for case, where in [("on_b", "worker1"), ("on_c_via_b", "worker2"), ("on_b_with_pending_source", "worker1")]:
        res = out[case]
        assert res["error"] is not None, case
        assert res["is_runtime_error"], res["error"]
        assert repr(where) in res["error"] or where in res["error"], res["error"]
        assert f"boom in backward on {where}" in res["error"], res["error"]
        assert res["took"] < 5.0, res
        assert res["released"] == [True, True, True], (case, res["released"])
    second = out["second"]
    assert second["error"] is not None and second["is_runtime_error"], second
    assert "worker1" in second["error"] and "second time" in second["error"], second
    assert second["took"] < 5.0
    assert "boom in backward on worker0" in out["local"]["error"]
    assert out["local"]["released"] == [True, True, True]
    assert_matches_reference("chain", out["after"])
    assert_matches_reference("count_on_b", out["after2"])


class Block(torch.autograd.Function):
    """Identity forward; its backward signals, then blocks (until the process is killed)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _EVENTS["in_backward"].set()
        time.sleep(60)
        return g


_EVENTS: dict = {}


def block_b(x):
    return Block.apply(x * P("wB"))


def _dead_in_backward(rank, world_size, in_backward):
    _EVENTS["in_backward"] = in_backward
    init(rank, world_size, rpc_timeout=60)  # far longer than the 5 s the failure may take
    out = {}
    if rank == 0:
        x = P("xA")
        with dist_autograd.context() as cid:
            loss = (call(1, block_b, x) * call(2, f_c, x)).sum()
            try:
                dist_autograd.backward(cid, [loss])
                out["error"] = None
            except Exception as e:  # noqa: BLE001
                out["t_fail"] = time.monotonic()
                out["error"] = f"{type(e).__name__}: {e}"
                out["is_runtime_error"] = isinstance(e, RuntimeError)
            t0 = time.monotonic()
        out["exit_took"] = time.monotonic() - t0  # releasing, also towards the dead worker
        out["c_released"] = rpc.rpc_sync(2, wait_context_gone, args=(cid,))
        # a new context with the survivor works
        with dist_autograd.context() as cid2:
            dist_autograd.backward(cid2, [call(2, f_c, x).sum()])
            grads = dist_autograd.get_gradients(cid2)
            out["after_keys"] = [t is x for t in grads]
            out["after_grad"] = grads[x]
            out["wC"] = rpc.rpc_sync(2, P, args=("wC",)).detach()
    t0 = time.monotonic()
    rpc.shutdown()
    out["shutdown_took"] = time.monotonic() - t0
    return out


def test_worker_dying_during_backward_fails_the_caller_within_5s():
    in_backward = get_context().Event()
    with start_workers(_dead_in_backward, 3, args=(in_backward,)) as group:
        assert in_backward.wait(30), "worker1 never reached its part of the backward"
        t_kill = time.monotonic()
        group.kill(1)
        results = group.join(40)
    a, b, c = results
    assert b is KILLED
    assert a["error"] is not None and a["is_runtime_error"], a["error"]
    assert "worker1" in a["error"], a["error"]
    assert a["t_fail"] - t_kill < 5.0
    assert a["exit_took"] < 5.0
    assert a["c_released"] is True
    assert a["after_keys"] == [True]
    x = P_value("xA")
    assert torch.allclose(a["after_grad"], torch.cos(x) * a["wC"])
    assert a["shutdown_took"] < 10.0 and c["shutdown_took"] < 10.0


def P_value(name):
    """The values of parameter ``name``, computed here (no RPC)."""
    global _LOCAL
    _LOCAL = True
    try:
        return P(name).detach().clone()
    finally:
        _P.pop(name, None)
        _LOCAL = False


# ======================================================================================
# 5. Bad input: hand-made autograd messages get error replies; the target keeps serving
# ======================================================================================


class RawFrame:
    """A hand-made frame for ``agent.control``: ``build(msg_id)`` returns its buffers.

    The agent assigns ``msg_id`` just before ``encode``; the error reply to a frame that
    does not decode is addressed by the id in bytes 1..9 of its header.
    """

    def __init__(self, build):
        self.build = build
        self.msg_id = 0

    def encode(self):
        return self.build(self.msg_id)


_RAN: list = []


def mark_ran(tag):
    _RAN.append(tag)
    return tag


def ran():
    return list(_RAN)


def context_info(cid):
    """The sends and recvs (autograd message id -> peer) of context ``cid`` on this worker."""
    ctx = rpc.api.current.agent().autograd.contexts.get(cid)
    with ctx.lock:
        return {"sends": {k: v.peer for k, v in ctx.sends.items()},
                "recvs": {k: v.peer for k, v in ctx.recvs.items()}}


def scalar_b():
    return (P("wB") * 2).sum()


def vector_b():
    return P("wB") * 2


def local_rref_backward_on_owner(rref):
    try:
        rref.backward()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def send_from_here(dest, msg):
    """Send ``msg`` from this worker (used to forge a message from the wrong peer)."""
    try:
        rpc.api.current.agent().control(dest, msg).wait()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def t_simple(xn="xA"):
    return (call(1, g_b, P(xn)) * P("wA")).sum()


TOPOLOGIES["simple"] = t_simple

UNKNOWN_CTX = 987654321
FAKE_PASS = 555


def _bad_input(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        from torchrpc import serialization
        from torchrpc.protocol.autograd_context import use_context

        agent = rpc.api.current.agent()
        errors = out["errors"] = {}

        def expect(case, msg, dest=1):
            try:
                agent.control(dest, msg).wait()
                errors[case] = None
            except Exception as e:  # noqa: BLE001
                errors[case] = (type(e).__name__, isinstance(e, RuntimeError), str(e))

        rref_scalar = rpc.remote(1, scalar_b)
        rref_vec = rpc.remote(1, vector_b)
        rref_scalar.to_here(), rref_vec.to_here()
        rid = rref_scalar._handle.rref_id
        with dist_autograd.context() as cid:
            loss = t_simple()  # A sends xA to B; B's reply (a send on B) comes back
            with use_context(None):
                info = rpc.rpc_sync(1, context_info, args=(cid,))
            (s1, peer), = info["sends"].items()
            assert peer == 0
            grad3 = [torch.ones(3, dtype=torch.float64)]

            expect("rref_unknown_rref", m.RRefBackward(0, Gid(1, 10**9), cid, False))
            expect("rref_unknown_context", m.RRefBackward(0, rid, UNKNOWN_CTX, False))
            expect("rref_context_minus_1", m.RRefBackward(0, rid, -1, False))
            expect("propagate_unknown_context", m.PropagateGradients(0, UNKNOWN_CTX, 1, [s1], grad3))
            expect("propagate_unknown_pass", m.PropagateGradients(0, cid, 777, [s1], grad3))
            expect("discover_unknown_context", m.BackwardDiscover(0, UNKNOWN_CTX, FAKE_PASS, False, [s1]))
            expect("discover_unknown_send", m.BackwardDiscover(0, cid, FAKE_PASS, False, [(1 << 48) | 99999]))
            # a (forged) discovery of pass FAKE_PASS is well-formed: acked; it lets the next cases reach
            # the checks that come after "which pass"
            expect("discover_ok", m.BackwardDiscover(0, cid, FAKE_PASS, False, [s1]))
            expect("propagate_unknown_message_id", m.PropagateGradients(0, cid, FAKE_PASS, [(1 << 48) | 99999], grad3))
            expect("propagate_wrong_shape", m.PropagateGradients(0, cid, FAKE_PASS, [s1], [torch.ones(7, dtype=torch.float64)]))
            expect("propagate_too_few_gradients", m.PropagateGradients(0, cid, FAKE_PASS, [s1], []))
            errors["propagate_from_wrong_worker"] = rpc.rpc_sync(
                2, send_from_here, args=(1, m.PropagateGradients(0, cid, FAKE_PASS, [s1], grad3)))
            expect("cleanup_unknown_context", m.CleanupAutogradContext(0, UNKNOWN_CTX))

            # frames whose header has one field too few or too many
            def call_frames(mid, tag):
                return m.PythonCall(mid, serialization.dumps((mark_ran, (tag,), {}))).encode()

            FA, BD = m.MessageType.FORWARD_AUTOGRAD, m.MessageType.BACKWARD_DISCOVER
            PG, CL, RB = m.MessageType.BACKWARD_AUTOGRAD_REQ, m.MessageType.CLEANUP_AUTOGRAD_CONTEXT_REQ, m.MessageType.RREF_BACKWARD_REQ
            ids = struct.pack("<Q", s1)
            tens = m.PropagateGradients(0, 0, 0, [0], grad3).encode()[1:]
            raw = {
                "fa_short": lambda mid: [struct.pack("<BQq", FA, mid, cid), *call_frames(mid, "fa_short")],
                "fa_long": lambda mid: [struct.pack("<BQqQQ", FA, mid, cid, 0, 0), *call_frames(mid, "fa_long")],
                "fa_id_mismatch": lambda mid: [struct.pack("<BQqQB", FA, mid, cid, 0, 0), *call_frames(mid + 1000, "fa_id")],
                "fa_in_fa": lambda mid: [struct.pack("<BQqQB", FA, mid, cid, 0, 0), struct.pack("<BQqQB", FA, mid, cid, 0, 0),
                                         *call_frames(mid, "fa_in_fa")],
                "fa_empty": lambda mid: [struct.pack("<BQqQB", FA, mid, cid, 0, 0)],
                "discover_short": lambda mid: [struct.pack("<BQqQ", BD, mid, cid, FAKE_PASS), ids],
                "discover_long": lambda mid: [struct.pack("<BQqQ?Q", BD, mid, cid, FAKE_PASS, False, 0), ids],
                "propagate_short": lambda mid: [struct.pack("<BQqQ", PG, mid, cid, FAKE_PASS), *tens],
                "propagate_long": lambda mid: [struct.pack("<BQqQQQ", PG, mid, cid, FAKE_PASS, s1, 0), *tens],
                "cleanup_short": lambda mid: [struct.pack("<BQ", CL, mid)],
                "cleanup_long": lambda mid: [struct.pack("<BQqq", CL, mid, cid, 0)],
                "rref_backward_short": lambda mid: [struct.pack("<BQIQq", RB, mid, rid[0], rid[1], cid)],
                "rref_backward_long": lambda mid: [struct.pack("<BQIQq?Q", RB, mid, rid[0], rid[1], cid, False, 0)],
            }
            for case, build in raw.items():
                expect(case, RawFrame(build))

            # user-facing misuse
            def user_error(case, fn):
                try:
                    fn()
                    errors[case] = None
                except Exception as e:  # noqa: BLE001
                    errors[case] = (type(e).__name__, isinstance(e, RuntimeError), str(e))

            y = call(1, g_b, P("xA"))
            user_error("user_rref_backward_no_context", lambda: rref_scalar.backward())
            user_error("user_rref_backward_vector", lambda: rref_vec.backward(cid))
            user_error("backward_vector_root", lambda: dist_autograd.backward(cid, [y]))
            user_error("backward_no_grad_root", lambda: dist_autograd.backward(cid, [torch.ones(())]))
            user_error("backward_unknown_context", lambda: dist_autograd.backward(UNKNOWN_CTX, [loss]))
            user_error("get_gradients_unknown_context", lambda: dist_autograd.get_gradients(UNKNOWN_CTX))
            user_error("nested_context", lambda: dist_autograd.context().__enter__())
            with use_context(None):
                errors["owner_rref_backward_vector"] = rpc.rpc_sync(1, local_rref_backward_on_owner, args=(rref_vec,))

            # worker1 still serves, and the context is intact: same sends/recvs, and a real backward is right
            with use_context(None):
                out["whoami"] = rpc.rpc_sync(1, whoami)
                out["still_there"] = cid in rpc.rpc_sync(1, context_ids)
                info_after = rpc.rpc_sync(1, context_info, args=(cid,))
                out["ran"] = rpc.rpc_sync(1, ran)
            out["info_same"] = {k: v for k, v in info_after["sends"].items() if k == s1} == info["sends"] and all(
                info_after["recvs"].get(k) == v for k, v in info["recvs"].items())
            out["grads_before"] = grads_by_name(cid)
            dist_autograd.backward(cid, [loss])
            grads, cnts = collect(cid, world_size)
            out["simple"] = {"loss": loss.item(), "grads": grads, "counts": cnts, "times": [0.0], "cid": cid}
        # a pass without discovery takes one delivery per send, like one with it
        with dist_autograd.context() as cid2:
            t_simple()
            with use_context(None):
                (s2, _), = rpc.rpc_sync(1, context_info, args=(cid2,))["sends"].items()
            direct = m.PropagateGradients(0, cid2, FAKE_PASS, [s2], grad3, True, True)
            expect("propagate_direct_first", direct)
            expect("propagate_direct_twice", m.PropagateGradients(0, cid2, FAKE_PASS, [s2], grad3, True, True))
    rpc.shutdown()
    return out


BAD_INPUT_EXPECTED = {
    "rref_unknown_rref": "owns no RRef",
    "rref_unknown_context": f"Could not find autograd context with id: {UNKNOWN_CTX}",
    "rref_context_minus_1": "context id -1",
    "propagate_unknown_context": f"Could not find autograd context with id: {UNKNOWN_CTX}",
    "propagate_unknown_pass": "no backward pass 777",
    "discover_unknown_context": f"Could not find autograd context with id: {UNKNOWN_CTX}",
    "discover_unknown_send": f"no send with autograd message id {(1 << 48) | 99999}",
    "propagate_unknown_message_id": f"no send with autograd message id {(1 << 48) | 99999}",
    "propagate_wrong_shape": "gradient of shape [7] for a tensor of shape [3]",
    "propagate_too_few_gradients": "0 gradients",
    "propagate_from_wrong_worker": "to worker 2",
    "fa_short": "header has",
    "fa_long": "header has",
    "fa_id_mismatch": "message id differs",
    "fa_in_fa": "may not wrap",
    "fa_empty": "carries no message",
    "discover_short": "header has",
    "discover_long": "header has",
    "propagate_short": "header has",
    "propagate_long": "header has",
    "cleanup_short": "header has",
    "cleanup_long": "header has",
    "rref_backward_short": "header has",
    "rref_backward_long": "header has",
    "user_rref_backward_no_context": "User RRefs require 'dist_autograd_ctx_id' to be specified",
    "user_rref_backward_vector": "grad can be implicitly created only for scalar outputs",
    "backward_vector_root": "is not a scalar, all roots need to be scalar",
    "backward_no_grad_root": "requires_grad not set on",
    "backward_unknown_context": f"Could not find autograd context with id: {UNKNOWN_CTX}",
    "get_gradients_unknown_context": f"Could not find autograd context with id: {UNKNOWN_CTX}",
    "owner_rref_backward_vector": "grad can be implicitly created only for scalar outputs",
    "nested_context": "Already have an autograd context id for this thread",
    "propagate_direct_twice": "already received its gradients in backward pass 555",
}


def test_bad_autograd_messages_get_error_replies_and_the_worker_carries_on():
    out = run_workers(_bad_input, 3, timeout=60)[0]
    errors = out["errors"]
    assert errors.pop("discover_ok") is None
    assert errors.pop("propagate_direct_first") is None
    assert errors.pop("cleanup_unknown_context") is None  # releasing an unknown context is a no-op
    assert sorted(errors) == sorted(BAD_INPUT_EXPECTED)
    for case, needle in BAD_INPUT_EXPECTED.items():
        err = errors[case]
        assert err is not None, f"{case}: no error"
        if isinstance(err, tuple):
            type_name, is_runtime, text = err
            assert is_runtime, (case, err)
        else:  # formatted on worker2
            text = err
        assert needle in text, (case, err)
    for case in ("rref_unknown_context", "backward_unknown_context", "get_gradients_unknown_context"):
        assert errors[case][0] == "UnknownContextError", (case, errors[case])
    assert out["whoami"] == "worker1"
    assert out["still_there"] and out["info_same"]
    assert out["ran"] == []  # no malformed call ran
    assert out["grads_before"] == {}  # nothing leaked into the context's gradients
    assert_matches_reference("simple", out["simple"])


def _too_many_gradients(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        from torchrpc.protocol.autograd_context import use_context

        agent = rpc.api.current.agent()
        with dist_autograd.context() as cid:
            loss = t_simple()  # noqa: F841 (keeps the graph alive)
            with use_context(None):
                (s1, _), = rpc.rpc_sync(1, context_info, args=(cid,))["sends"].items()
            agent.control(1, m.BackwardDiscover(0, cid, FAKE_PASS, False, [s1])).wait()
            grads = [torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
            try:
                agent.control(1, m.PropagateGradients(0, cid, FAKE_PASS, [s1], grads)).wait()
                out["error"] = None
            except Exception as e:  # noqa: BLE001
                out["error"] = str(e)
            out["grads_after_forged_message"] = grads_by_name(cid)
            del loss
    rpc.shutdown()
    return out


def test_propagate_with_more_gradients_than_tensors_is_rejected():
    out = run_workers(_too_many_gradients, 2, timeout=60)[0]
    assert out["error"] is not None and "gradient" in out["error"]
    assert out["grads_after_forged_message"] == {}


# ======================================================================================
# 6. Context cleanup, transitively; memory over many contexts
# ======================================================================================


def call_whoami(to):
    return rpc.rpc_sync(to, whoami)


def const_c():
    return torch.arange(3.0)


def fetch_plain(rref):
    return rref.to_here() + 1


def _cleanup(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        from torchrpc.protocol.autograd_context import use_context

        def holders(cid):
            with use_context(None):  # asking must not itself bring the context to the others
                return [cid in context_ids()] + [cid in rpc.rpc_sync(r, context_ids) for r in (1, 2)]

        def released(cid):
            return [cid not in context_ids()] + [rpc.rpc_sync(r, wait_context_gone, args=(cid,)) for r in (1, 2)]

        # a backward over A -> B -> C (A never talks to C itself)
        with dist_autograd.context() as cid:
            loss = t_chain()
            out["chain_during"] = holders(cid)
            out["chain_a_knows"] = sorted(rpc.api.current.agent().autograd.contexts.get(cid).known_workers)
            dist_autograd.backward(cid, [loss])
        out["chain_after"] = released(cid)

        # the body raised
        try:
            with dist_autograd.context() as cid:
                t_chain()
                out["raise_during"] = holders(cid)
                raise KeyError("body failed")
        except KeyError:
            pass
        out["raise_after"] = released(cid)

        # only messages without tensors (a nested call B -> C)
        with dist_autograd.context() as cid:
            call_whoami_result = rpc.rpc_sync(1, call_whoami, args=(2,))
            out["plain_during"] = holders(cid)
        out["plain_result"] = call_whoami_result
        out["plain_after"] = released(cid)

        # an RRef made outside the context, fetched by B from C inside it
        rref = rpc.remote(2, const_c)
        with dist_autograd.context() as cid:
            rpc.rpc_sync(1, fetch_plain, args=(rref,))
            out["fetch_during"] = holders(cid)
        out["fetch_after"] = released(cid)

        # remote() in the context, never fetched; and a backward that failed on C
        with dist_autograd.context() as cid:
            rpc.remote(1, chain_b, args=(P("xA"),))
            loss = call(1, boom_via_b, P("xA")).sum()
            with pytest.raises(RuntimeError):
                dist_autograd.backward(cid, [loss])
            out["failed_during"] = holders(cid)
        out["failed_after"] = released(cid)

        # a context holding a large gradient on B (its cleanup is not served inline there)
        with dist_autograd.context() as cid:
            loss = rpc.rpc_sync(1, big_b, args=(P("xA"),))
            dist_autograd.backward(cid, [loss])
            out["large_bytes"] = rpc.rpc_sync(1, context_nbytes, args=(cid,))
        out["large_after"] = released(cid)

        out["left"] = [wait_no_contexts()] + [rpc.rpc_sync(r, wait_no_contexts) for r in (1, 2)]
    rpc.shutdown()
    return out


_BIG = []


def big_b(x):
    """On B: a loss over a 2 MiB leaf of B's own, so B accumulates a 2 MiB gradient."""
    if not _BIG:
        _BIG.append(torch.ones(1 << 19, requires_grad=True))
    return (x.sum() * _BIG[0]).sum()


def context_nbytes(cid):
    return rpc.api.current.agent().autograd.contexts.get(cid).nbytes()


def wait_no_contexts(timeout=5.0):
    """Bounded poll until this worker holds no context; how many it holds at the end."""
    deadline = time.monotonic() + timeout
    while context_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(context_ids())


def test_leaving_a_context_releases_it_on_every_worker_it_reached():
    out = run_workers(_cleanup, 3, timeout=60)[0]
    assert out["chain_a_knows"] == [1]  # so C can only hear of the cleanup from B
    for case in ("chain", "raise", "plain", "fetch", "failed"):
        assert out[f"{case}_during"] == [True, True, True], (case, out[f"{case}_during"])
        assert out[f"{case}_after"] == [True, True, True], (case, out[f"{case}_after"])
    assert out["plain_result"] == "worker2"
    assert out["large_bytes"] >= 2 << 20 and out["large_after"] == [True, True, True]
    assert out["left"] == [0, 0, 0]


def double(x):
    return x * 2


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss():
    """RSS once this worker's contexts are gone (cleanup is asynchronous)."""
    left = wait_no_contexts()
    gc.collect()
    return left, rss()


def fixed_mmap_threshold(nbytes=256 * 1024):
    """Have glibc serve every allocation above ``nbytes`` with its own mmap, returned on free.

    By default glibc raises that threshold each time a large block is freed, after which
    4 MB buffers come from per-thread arenas and RSS climbs to a plateau (~500 MB here)
    even with no autograd at all; fixing it makes RSS show what is really kept alive.
    """
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes)


def _memory(rank, world_size, steps):
    fixed_mmap_threshold()
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        x = torch.randn(1_000_000, requires_grad=True)
        t0 = time.monotonic()
        for step in range(steps):
            with dist_autograd.context() as cid:
                y = rpc.rpc_sync(1, double, args=(x,))
                dist_autograd.backward(cid, [y.sum()])
                g = dist_autograd.get_gradients(cid)[x]
                if step == 0:
                    out["grad_ok"] = torch.equal(g, torch.full_like(x, 2.0))
            del y, g
            if step + 1 == 20:
                out["at20"] = (settled_rss(), rpc.rpc_sync(1, settled_rss))
        out["took"] = time.monotonic() - t0
        out["at_end"] = (settled_rss(), rpc.rpc_sync(1, settled_rss))
        out["x_grad"] = x.grad  # gradients go to the context, not to .grad
    rpc.shutdown()
    return out


def test_many_contexts_with_large_tensors_do_not_grow_memory():
    steps = 200
    out = run_workers(_memory, 2, args=(steps,), timeout=90)[0]
    assert out["grad_ok"] and out["x_grad"] is None
    (left_a20, a20), (left_b20, b20) = out["at20"]
    (left_a, a_end), (left_b, b_end) = out["at_end"]
    assert (left_a20, left_b20, left_a, left_b) == (0, 0, 0, 0)
    mb = 1 << 20
    # 180 steps moving 4 MB tensors each way: a leak of anything per step shows as hundreds of MB
    assert a_end - a20 < 100 * mb, f"worker0 grew by {(a_end - a20) / mb:.0f} MB"
    assert b_end - b20 < 100 * mb, f"worker1 grew by {(b_end - b20) / mb:.0f} MB"
    assert out["took"] < 30


# ======================================================================================
# 7. RRef.backward
# ======================================================================================


def param_grad_is_none(name):
    return P(name).grad is None


def _rref_backward(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        # local (-1) on the owner: like tensor.backward(), into .grad
        w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        rpc.RRef((w * w).sum()).backward()
        out["local"] = w.grad.clone()
        w.grad = None
        cube = rpc.RRef((w ** 3).sum())
        cube.backward(retain_graph=True)
        cube.backward()
        out["local_retain"] = w.grad.clone()
        try:
            cube.backward()  # the graph was freed by the last call
            out["local_third"] = None
        except RuntimeError as e:
            out["local_third"] = str(e)

        def run(passes, owner_here):
            with dist_autograd.context() as cid:
                if owner_here:  # the owner (this worker) starts the distributed backward
                    rref = rpc.RRef(t_rref_loss())
                else:  # from a non-owner: worker1 (the owner) runs it
                    rref = rpc.remote(1, rref_loss_b, args=(P("xA"),))
                times = []
                for i in range(passes):
                    t0 = time.monotonic()
                    rref.backward(cid, retain_graph=i < passes - 1)
                    times.append(time.monotonic() - t0)
                grads, cnts = collect(cid, world_size)
                loss = rref.to_here().item()
            return {"loss": loss, "grads": grads, "counts": cnts, "times": times, "cid": cid}

        out["owner_ctx"] = run(1, True)
        out["user_ctx"] = run(1, False)
        out["user_ctx_retain"] = run(2, False)
        out["owner_ctx_retain"] = run(2, True)
        out["no_dot_grad"] = [P("xA").grad is None, rpc.rpc_sync(1, param_grad_is_none, args=("wB",)),
                              rpc.rpc_sync(2, param_grad_is_none, args=("wC",))]
    rpc.shutdown()
    return out


def test_rref_backward_local_on_owner_and_distributed_from_any_worker():
    out = run_workers(_rref_backward, 3, timeout=60)[0]
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(out["local"], 2 * w)
    assert torch.allclose(out["local_retain"], 2 * 3 * w ** 2)
    assert out["local_third"] is not None
    assert_matches_reference("rref_loss", out["owner_ctx"])
    assert_matches_reference("rref_loss", out["user_ctx"])
    assert_matches_reference("rref_loss", out["user_ctx_retain"], passes=2)
    assert_matches_reference("rref_loss", out["owner_ctx_retain"], passes=2)
    assert out["no_dot_grad"] == [True, True, True]  # distributed gradients go to the context only


# ======================================================================================
# Gradients for the requester travel back in the reply
# ======================================================================================


def count_requests(kind):
    """From now on, count the requests of message class ``kind`` this worker handles."""
    agent = rpc.api.current.agent()
    seen = []
    agent.registry.wrap(kind, lambda handler: lambda src, msg, tag=None: (seen.append(src), handler(src, msg, tag))[1])
    return seen


_SEEN = {}


def start_counting_propagates():
    _SEEN["propagate"] = count_requests(m.PropagateGradients)


def propagates_seen():
    return list(_SEEN["propagate"])


def _returned_in_reply(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        for r in range(world_size):
            rpc.rpc_sync(r, start_counting_propagates)
        with dist_autograd.context() as cid:  # RRef.backward from a non-owner (the W6 benchmark)
            loss = rpc.remote(1, rref_loss_b, args=(P("xA"),))
            loss.backward(cid)
            grads, cnts = collect(cid, world_size)
            out["rref"] = {"loss": loss.to_here().item(), "grads": grads, "counts": cnts, "times": [0.0], "cid": cid}
        out["rref_propagates"] = [rpc.rpc_sync(r, propagates_seen) for r in range(world_size)]
        for r in range(world_size):
            rpc.rpc_sync(r, start_counting_propagates)
        out["ring"] = run_topology("ring", world_size)
        out["ring_propagates"] = [rpc.rpc_sync(r, propagates_seen) for r in range(world_size)]
    rpc.shutdown()
    return out


def test_gradients_for_the_requester_come_back_in_the_reply():
    out = run_workers(_returned_in_reply, 3, timeout=60)[0]
    assert_matches_reference("rref_loss", out["rref"])
    # worker0 -> RRefBackward -> worker1 -> PropagateGradients -> worker2; worker2's gradients for
    # worker1 and worker1's for worker0 go back in the replies: one nested request in all
    assert out["rref_propagates"] == [[], [], [1]], out["rref_propagates"]
    check_result("ring", out["ring"])
    # ring: A -> B -> C -> A forward; backward A -> B -> C -> A, each hop a request to the
    # worker that sent the tensor. No hop goes back to its requester, so none is folded.
    assert out["ring_propagates"] == [[2], [0], [1]], out["ring_propagates"]


def corrupt_returns(how):
    """Make this worker's gradient replies wrong in one way (the next one only)."""
    service = rpc.api.current.agent().autograd
    reply_done = service._reply_done

    def bad(src, msg_id, ctx, pass_id, direct, retain_graph, back):
        service._reply_done = reply_done
        if how == "extra_gradient":
            back = [(back[0][0], back[0][1] + [torch.ones(3, dtype=torch.float64)])]
        elif how == "wrong_shape":
            back = [(back[0][0], [torch.ones(5, dtype=torch.float64)])]
        elif how == "not_my_send":
            back = [((7 << 48) | 12345, back[0][1])]
        elif how == "other_context":
            ctx = type("Ctx", (), {"context_id": UNKNOWN_CTX})()
        reply_done(src, msg_id, ctx, pass_id, direct, retain_graph, back)

    service._reply_done = bad


RETURN_CORRUPTIONS = {
    "extra_gradient": "returned 2 gradients for sends of 1 tensors",
    "wrong_shape": "gradient of shape [5] for a tensor of shape [3]",
    "not_my_send": f"no send with autograd message id {(7 << 48) | 12345} to worker 1",
    "other_context": f"returned gradients of context {UNKNOWN_CTX}",
}


def _bad_returns(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        for how in RETURN_CORRUPTIONS:
            rpc.rpc_sync(1, corrupt_returns, args=(how,))
            with dist_autograd.context() as cid:
                loss = t_simple()  # xA goes to worker1, whose reply returns its gradient
                try:
                    dist_autograd.backward(cid, [loss])
                    out[how] = None
                except Exception as e:  # noqa: BLE001
                    out[how] = f"{type(e).__name__}: {e}"
                out[how + "_grads"] = grads_by_name(cid)
        with dist_autograd.context() as cid:  # and then all is well again
            loss = t_simple()
            dist_autograd.backward(cid, [loss])
            grads, cnts = collect(cid, world_size)
            out["simple"] = {"loss": loss.item(), "grads": grads, "counts": cnts, "times": [0.0], "cid": cid}
    rpc.shutdown()
    return out


def test_bad_gradients_in_a_reply_fail_the_backward_clearly():
    out = run_workers(_bad_returns, 2, timeout=60)[0]
    for how, needle in RETURN_CORRUPTIONS.items():
        assert out[how] is not None and needle in out[how], (how, out[how])
        assert out[how].startswith(("DistBackwardError", "RPCError")), out[how]
        # worker0's own part ran (wA), but nothing from the bad reply did (xA)
        assert sorted(out[how + "_grads"]) == ["wA"], (how, out[how + "_grads"])
    assert_matches_reference("simple", out["simple"])


# ======================================================================================
# 8. At size: one context with 10,000 sends
# ======================================================================================

SIZE_SENDS = 10_000


def _own_param(rank: int) -> torch.Tensor:
    """Each worker's parameter (float64), the same in every process that builds it."""
    return torch.linspace(0.5, 1.5, 4, dtype=torch.float64) * (rank + 1)


_SIZE_PARAM: dict = {}


def size_param() -> torch.Tensor:
    rank = rpc.get_worker_info().id
    if rank not in _SIZE_PARAM:
        _SIZE_PARAM[rank] = _own_param(rank).requires_grad_()
    return _SIZE_PARAM[rank]


def size_step(x: torch.Tensor, i: int) -> torch.Tensor:
    """Worker 1 or 2: combine the caller's tensor with this worker's parameter; every fifth call
    goes on to the other of the two (a nested send, so the chain has two hops)."""
    me = rpc.get_worker_info().id
    h = (x * size_param()[i % 4]).sin()
    if i % 5 == 0:
        h = rpc.rpc_sync(3 - me, size_step, args=(h, i + 1))
    return h


def size_grads(cid: int) -> list:
    return dist_autograd.get_gradients(cid)[size_param()].tolist()


def context_ids() -> list:
    return rpc.api.current.agent().autograd.contexts.ids()


def reference_at_size(n: int) -> tuple[list, dict]:
    """The same computation in one process: (loss, gradients of the three parameters)."""
    params = {r: _own_param(r).requires_grad_() for r in range(3)}

    def step(x, i, worker):
        h = (x * params[worker][i % 4]).sin()
        return step(h, i + 1, 3 - worker) if i % 5 == 0 else h

    ys = [step(params[0], i, 1 + i % 2) for i in range(n)]
    loss = torch.stack(ys).sum() / n
    loss.backward()
    return loss.item(), {r: p.grad.tolist() for r, p in params.items()}


def _autograd_at_size(rank, world_size):
    init(rank, world_size, rpc_timeout=120)
    out = {}
    if rank == 0:
        w = _own_param(0).requires_grad_()
        with dist_autograd.context() as cid:
            ys = [rpc.rpc_sync(1 + i % 2, size_step, args=(w, i)) for i in range(SIZE_SENDS)]
            loss = torch.stack(ys).sum() / SIZE_SENDS
            dist_autograd.backward(cid, [loss])
            out["loss"] = loss.item()
            out["grads"] = {0: dist_autograd.get_gradients(cid)[w].tolist(),
                            **{r: rpc.rpc_sync(r, size_grads, args=(cid,)) for r in (1, 2)}}
            out["contexts_inside"] = [len(rpc.rpc_sync(r, context_ids)) for r in (1, 2)]
        del ys, loss
        deadline = time.monotonic() + 10  # cleanup travels after the context ends
        while time.monotonic() < deadline:
            out["contexts_after"] = [len(context_ids())] + [len(rpc.rpc_sync(r, context_ids)) for r in (1, 2)]
            if out["contexts_after"] == [0, 0, 0]:
                break
            time.sleep(0.05)
        out["pending_after"] = [rpc.rpc_sync(r, rpc.debug_info)["pending_calls"] for r in (1, 2)]
    rpc.shutdown()
    return out


@pytest.mark.timeout(240)
def test_a_context_of_ten_thousand_sends_gives_one_process_gradients_and_leaves_nothing():
    out = run_workers(_autograd_at_size, 3, timeout=220)[0]
    loss, grads = reference_at_size(SIZE_SENDS)
    assert out["loss"] == pytest.approx(loss, rel=1e-12)
    for r in range(3):
        assert out["grads"][r] == pytest.approx(grads[r], rel=1e-9, abs=1e-12), r
    assert out["contexts_inside"] == [1, 1]
    assert out["contexts_after"] == [0, 0, 0]
    assert out["pending_after"] == [{}, {}]


# ======================================================================================
# 9. Gradients kept in a context follow AccumulateGrad's rules
# ======================================================================================


class _TwoGrads(torch.autograd.Function):
    ptr = None

    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, grad):
        _TwoGrads.ptr = grad.data_ptr()
        return grad, grad  # one buffer for two leaves


class _OneGrad(torch.autograd.Function):
    ptr = None

    @staticmethod
    def forward(ctx, a):
        return a.clone()

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        _OneGrad.ptr = g.data_ptr()
        return g


class _ExpandedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        ctx.shape = a.shape
        return a.sum()

    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape)  # stride 0


def _accumulate_grad_rules(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        a = torch.randn(5, 6, requires_grad=True)
        b = torch.randn(5, 6, requires_grad=True)
        with dist_autograd.context() as cid:
            dist_autograd.backward(cid, [_TwoGrads.apply(a, b).sum()])
            g = dist_autograd.get_gradients(cid)
            out["shared"] = [g[a].data_ptr() == _TwoGrads.ptr, g[b].data_ptr() == _TwoGrads.ptr,
                             g[a].data_ptr() == g[b].data_ptr(), g[a].tolist() == torch.ones(5, 6).tolist()]
        with dist_autograd.context() as cid:
            dist_autograd.backward(cid, [_OneGrad.apply(a).sum()])
            out["own"] = dist_autograd.get_gradients(cid)[a].data_ptr() == _OneGrad.ptr
        with dist_autograd.context() as cid:
            dist_autograd.backward(cid, [_ExpandedGrad.apply(a)])
            g = dist_autograd.get_gradients(cid)[a]
            out["expanded"] = (g.is_contiguous(), g.stride(), g.tolist() == torch.ones(5, 6).tolist())
    rpc.shutdown()
    return out


def test_context_gradients_follow_accumulate_grads_rules():
    out = run_workers(_accumulate_grad_rules, 2)[0]
    assert out["shared"] == [False, False, False, True]  # one buffer for two leaves: each gets a copy
    assert out["own"] is True  # a buffer only this leaf's gradient uses is kept, not copied
    assert out["expanded"] == (True, (6, 1), True)  # an expanded gradient is made contiguous


def _hooks_on_leaves(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        t1 = torch.ones(3, 3, requires_grad=True)
        t1.register_hook(lambda grad: grad * 2)  # doubles t1's gradient, as in a local backward
        t2 = torch.ones(3, 3, requires_grad=True)
        local = torch.autograd.grad(torch.matmul(t1, t2).sum(), [t1, t2])
        for mode in ("rpc_sync", "remote"):
            with dist_autograd.context() as cid:
                if mode == "rpc_sync":
                    ret = rpc.rpc_sync("worker1", torch.matmul, args=(t1, t2))
                else:
                    ret = rpc.remote("worker1", torch.matmul, args=(t1, t2)).to_here()
                dist_autograd.backward(cid, [ret.sum()])  # t1's gradient arrives straight from the recv
                g = dist_autograd.get_gradients(cid)
                out[mode] = torch.equal(g[t1], local[0]) and torch.equal(g[t2], local[1])
        out["doubled"] = local[0].tolist() == (torch.ones(3, 3) * 6).tolist()
    rpc.shutdown()
    return out


def test_tensor_hooks_run_on_leaves_whose_gradient_comes_from_a_recv():
    assert run_workers(_hooks_on_leaves, 2)[0] == {"rpc_sync": True, "remote": True, "doubled": True}


# --- where a worker runs the gradients delivered to it --------------------------------

_BACKWARD_THREADS: list[str] = []


def traced_b(x, big):
    """On B: x * 2 (times a 2 MiB leaf of B's with ``big``), noting the thread its backward runs on."""
    y = x * 2
    y.register_hook(lambda g: _BACKWARD_THREADS.append(threading.current_thread().name))
    if big:
        if not _BIG:
            _BIG.append(torch.ones(1 << 19, requires_grad=True))
        return y.sum() * _BIG[0].sum()
    return y


def backward_threads():
    got = list(_BACKWARD_THREADS)
    _BACKWARD_THREADS.clear()
    return got


def _delivery_threads(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        x = torch.ones(4, requires_grad=True)
        for big in (False, True):
            for _ in range(3):
                with dist_autograd.context() as cid:
                    y = rpc.rpc_sync(1, traced_b, args=(x, big))
                    dist_autograd.backward(cid, [y.sum()])
                    grad = dist_autograd.get_gradients(cid)[x]
                    check(torch.allclose(grad, torch.full((4,), 2.0 * (1 << 19 if big else 1))), f"gradient {grad}")
            out["big" if big else "small"] = rpc.rpc_sync(1, backward_threads)
    rpc.shutdown()
    return out


def test_small_deliveries_run_on_the_reader_and_large_ones_on_the_autograd_pool():
    """A small context's gradients run where they are read (no thread woken per hop). Once a
    context of LARGE_CONTEXT_BYTES or more was released (a step's gradients are not in its
    context before they run: the first large step cannot tell), the next steps run on the
    autograd pool, on one thread (their tensors then come from one malloc arena)."""
    out = run_workers(_delivery_threads, 2, timeout=60)[0]
    assert len(out["small"]) == 3 and not any("-autograd" in t for t in out["small"]), out
    assert len(out["big"]) == 3 and "-autograd" not in out["big"][0], out
    assert out["big"][1] == out["big"][2] and out["big"][1].startswith("torchrpc-worker1-autograd"), out
