"""The shapes users run (W9-W14): what their worker processes do.

Like :mod:`workloads`, every driver runs on rank 0 ("worker0") with one backend, the same code
for torchrpc and torch.distributed.rpc, and returns ``{metric: value}``; everything called
remotely is defined at module level here so that both backends pickle it by reference.
Workloads with several world sizes (W10, W11, W13) run one process group per size within a
round; the driver is told which in ``params`` and reports that group's metrics only.

- W9  ``remote(dst, torch.ones, ((10,),)).to_here()`` (a built-in op), and the same with a
      Python function, p50.
- W10 ``RRef.backward`` from a non-owner inside a dist_autograd context, p50 per step (remote
      + backward): the loss uses the caller's tensor (2 procs, the gradient flows back), and
      the loss uses the owner's tensor only (3 procs, the third idle).
- W11 a nested chain worker0 -> worker1 -> ... -> worker<depth> (each hop a nested
      ``rpc_sync``), ``dist_autograd.backward`` on worker0: p50 per forward + backward step.
- W12 a 4-stage pipeline (driver + 4 stage workers), micro-batches chained from stage to stage
      with futures, ``window`` of them in flight: micro-batches/s.
- W13 fan-in: 1, 3 or 7 trainers ``rpc_sync`` 64 KiB tensors to one parameter server (worker0)
      in a loop for a fixed time: total calls/s.
- W14 tensor round trip ``identity(t)`` latency, 4 KiB to 64 MiB: p50.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from . import workloads
from .workloads import Backend, Stage, _ns, percentile


def _b() -> Backend:
    """This process's backend (set by workloads' RPC job before anything is called)."""
    assert workloads._B is not None
    return workloads._B

# --------------------------------------------------------------------------------------
# W9: remote of a built-in op
# --------------------------------------------------------------------------------------


def py_ones(shape: tuple) -> torch.Tensor:
    return torch.ones(shape)


def drive_w9(B: Backend, p: dict, stage: Stage) -> dict:
    """Both callables warmed up, then timed in alternation (the first timed loop of a fresh
    process ran slower for torchrpc: alternating gives both the same conditions)."""
    rpc, peer = B.rpc, "worker1"
    fns = {"builtin": torch.ones, "python": py_ones}
    stage("warm-up")
    for i in range(p["warmup"]):
        for key, fn in fns.items():
            v = rpc.remote(peer, fn, args=((10,),)).to_here()
            if i == 0 and not torch.equal(v, torch.ones(10)):
                raise AssertionError(f"to_here() of remote({key}) returned {v}")
    stage("timing")
    times: dict[str, list[int]] = {key: [] for key in fns}
    for _ in range(p["iters"]):
        for key, fn in fns.items():
            t0 = _ns()
            rpc.remote(peer, fn, args=((10,),)).to_here()
            times[key].append(_ns() - t0)
    return {f"p50_us_{key}": percentile(t, 50) / 1e3 for key, t in times.items()}


# --------------------------------------------------------------------------------------
# W10: RRef.backward, the gradient flowing back / the loss on the owner only
# --------------------------------------------------------------------------------------


def owned_param() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(16, requires_grad=True)


def owner_loss(param_rref: Any) -> torch.Tensor:
    w = param_rref.local_value()
    return (w * w).sum()


def owner_grad(ctx_id: int, param_rref: Any) -> torch.Tensor | None:
    return _b().autograd.get_gradients(ctx_id).get(param_rref.local_value())


def drive_w10(B: Backend, p: dict, stage: Stage) -> dict:
    rpc, dist_autograd = B.rpc, B.autograd
    shape = p["shape"]
    torch.manual_seed(0)
    w = torch.randn(16, requires_grad=True)
    param = rpc.remote("worker1", owned_param) if shape == "owner3" else None

    def one(check: bool) -> int:
        with dist_autograd.context() as ctx:
            t0 = _ns()
            if shape == "back":
                loss = rpc.remote("worker1", workloads.compute_loss, args=(w,))
            else:
                loss = rpc.remote("worker1", owner_loss, args=(param,))
            loss.backward(ctx)
            dt = _ns() - t0
            if check:
                if shape == "back":
                    grad, want = dist_autograd.get_gradients(ctx).get(w), 2 * w.detach()
                else:
                    grad = rpc.rpc_sync("worker1", owner_grad, args=(ctx, param))
                    want = 2 * owned_param().detach()
                if grad is None or not torch.allclose(grad, want):
                    raise AssertionError(f"W10 {shape}: wrong gradient after RRef.backward: {grad}")
        return dt

    return {f"p50_us_{shape}": _p50_us(one, p, stage, shape)}

# --------------------------------------------------------------------------------------
# W11: a nested chain with distributed backward
# --------------------------------------------------------------------------------------


def _p50_us(one: Callable[[bool], int], p: dict, stage: Stage, what: str) -> float:
    """Warm up with ``one(check)`` (checking the first result), then time ``p["iters"]`` steps:
    their p50 in us."""
    stage(f"{what} warm-up")
    for i in range(p["warmup"]):
        one(i == 0)
    stage(f"{what} timing")
    return percentile([one(False) for _ in range(p["iters"])], 50) / 1e3


def chain_hop(x: torch.Tensor, rest: list[str]) -> torch.Tensor:
    y = x * 2
    if rest:
        return _b().rpc.rpc_sync(rest[0], chain_hop, args=(y, rest[1:]))
    return y


def drive_w11(B: Backend, p: dict, stage: Stage) -> dict:
    rpc, dist_autograd = B.rpc, B.autograd
    depth = p["depth"]
    hops = [f"worker{i}" for i in range(2, depth + 1)]
    x = torch.ones(16, requires_grad=True)

    def one(check: bool) -> int:
        with dist_autograd.context() as ctx:
            t0 = _ns()
            out = rpc.rpc_sync("worker1", chain_hop, args=(x, hops))
            dist_autograd.backward(ctx, [out.sum()])
            dt = _ns() - t0
            if check:
                grad = dist_autograd.get_gradients(ctx).get(x)
                if grad is None or not torch.equal(grad, torch.full((16,), 2.0 ** depth)):
                    raise AssertionError(f"W11 depth {depth}: wrong gradient {grad}")
        return dt

    return {f"p50_us_d{depth}": _p50_us(one, p, stage, f"depth {depth}")}

# --------------------------------------------------------------------------------------
# W12: a 4-stage pipeline with micro-batches in flight
# --------------------------------------------------------------------------------------

PIPE_STAGES = 4
PIPE_HIDDEN = 256
PIPE_BATCH = 32   # a micro-batch: 32 x 256 float32 = 32 KiB

_PIPE_STAGE: torch.nn.Module | None = None


def build_pipe_stage(k: int) -> torch.nn.Module:
    torch.manual_seed(100 + k)
    m = torch.nn.Sequential(torch.nn.Linear(PIPE_HIDDEN, PIPE_HIDDEN), torch.nn.ReLU())
    for prm in m.parameters():
        prm.requires_grad_(False)
    return m


def pipe_setup(k: int) -> bool:
    global _PIPE_STAGE
    _PIPE_STAGE = build_pipe_stage(k)
    return True


def pipe_forward(x: torch.Tensor) -> torch.Tensor:
    assert _PIPE_STAGE is not None
    with torch.no_grad():
        return _PIPE_STAGE(x)


def _pipeline(B: Backend, xs: list[torch.Tensor], window: int) -> list[Any]:
    """Push ``xs`` through the stages, at most ``window`` micro-batches in flight; each stage's
    reply starts the next stage's ``rpc_async`` from its future's callback."""
    stages = [f"worker{k}" for k in range(1, PIPE_STAGES + 1)]
    outs: list[Any] = [None] * len(xs)
    errors: list[BaseException] = []
    cond = threading.Condition()
    inflight = [0]

    def finish(i: int, value: Any, err: BaseException | None) -> None:
        with cond:
            outs[i] = value
            if err is not None:
                errors.append(err)
            inflight[0] -= 1
            cond.notify_all()

    def launch(i: int, k: int, x: Any) -> None:
        try:
            fut = B.rpc.rpc_async(stages[k], pipe_forward, args=(x,))
        except BaseException as e:  # noqa: BLE001 - reported by the driver
            finish(i, None, e)
            return

        def done(f: Any) -> None:
            try:
                y = f.value()
            except BaseException as e:  # noqa: BLE001
                finish(i, None, e)
                return
            if k + 1 < len(stages):
                launch(i, k + 1, y)
            else:
                finish(i, y, None)
        fut.add_done_callback(done)

    for i, x in enumerate(xs):
        with cond:
            while inflight[0] >= window and not errors:
                cond.wait(1.0)
            if errors:
                break
            inflight[0] += 1
        launch(i, 0, x)
    with cond:
        while inflight[0] > 0:
            cond.wait(1.0)
    if errors:
        raise errors[0]
    return outs


def drive_w12(B: Backend, p: dict, stage: Stage) -> dict:
    rpc = B.rpc
    stage("set-up")
    for k in range(1, PIPE_STAGES + 1):
        rpc.rpc_sync(f"worker{k}", pipe_setup, args=(k,))
    torch.manual_seed(0)
    xs = [torch.randn(PIPE_BATCH, PIPE_HIDDEN) for _ in range(8)]
    stage("warm-up")
    outs = _pipeline(B, [xs[i % len(xs)] for i in range(p["warmup"])], p["window"])
    with torch.no_grad():
        want = xs[0]
        for k in range(1, PIPE_STAGES + 1):
            want = build_pipe_stage(k)(want)
    if not torch.allclose(outs[0], want, atol=1e-5):
        raise AssertionError("W12: the pipeline's output differs from the stages run locally")
    stage("timing")
    batch = [xs[i % len(xs)] for i in range(p["iters"])]
    t0 = _ns()
    _pipeline(B, batch, p["window"])
    return {"mb_per_s": p["iters"] / ((_ns() - t0) / 1e9)}

# --------------------------------------------------------------------------------------
# W13: fan-in of trainers on one parameter server
# --------------------------------------------------------------------------------------

FANIN_NUMEL = 16384   # 64 KiB of float32 each way
_PS: torch.Tensor | None = None
_PS_LOCK = threading.Lock()


def ps_apply(grad: torch.Tensor) -> torch.Tensor:
    """The parameter server's update: param -= lr * grad; returns the new parameters."""
    global _PS
    with _PS_LOCK:
        if _PS is None:
            _PS = torch.zeros(FANIN_NUMEL)
        _PS.sub_(grad, alpha=1e-3)
        return _PS.clone()


def fanin_warm(calls: int) -> int:
    g = torch.randn(FANIN_NUMEL)
    for _ in range(calls):
        out = _b().rpc.rpc_sync("worker0", ps_apply, args=(g,))
        if out.shape != g.shape:
            raise AssertionError(f"W13: the server returned shape {tuple(out.shape)}")
    return calls


def fanin_loop(start: float, duration: float) -> int:
    """From ``start`` (time.time()) for ``duration`` s, call the server back to back; the calls
    that completed within that time."""
    rpc, g = _b().rpc, torch.randn(FANIN_NUMEL)
    delay = start - time.time()
    if delay > 0:
        time.sleep(delay)
    end, n = start + duration, 0
    while True:
        rpc.rpc_sync("worker0", ps_apply, args=(g,))
        if time.time() > end:
            return n
        n += 1


def drive_w13(B: Backend, p: dict, stage: Stage) -> dict:
    rpc, n = B.rpc, p["trainers"]
    trainers = [f"worker{i}" for i in range(1, n + 1)]
    stage(f"{n} trainers warm-up")
    for f in [rpc.rpc_async(t, fanin_warm, args=(p["warmup"],)) for t in trainers]:
        f.wait()
    stage(f"{n} trainers timing")
    start = time.time() + 0.1
    counts = [f.wait() for f in [rpc.rpc_async(t, fanin_loop, args=(start, p["duration"])) for t in trainers]]
    if min(counts) < 1:
        raise AssertionError(f"W13: a trainer completed no call in {p['duration']} s: {counts}")
    return {f"calls_per_s_{n}": sum(counts) / p["duration"]}

# --------------------------------------------------------------------------------------
# W14: tensor latency by payload size
# --------------------------------------------------------------------------------------


def drive_w14(B: Backend, p: dict, stage: Stage) -> dict:
    out = {}
    for label, nbytes, warmup, iters in p["sizes"]:
        times = workloads.tensor_round_trips(B, f"W14 {label}", nbytes, warmup, iters, stage)
        out[f"p50_us_{label}"] = percentile(times, 50) / 1e3
    return out


def copy_round_trip_floor(p: dict, stage: Stage) -> dict:
    """F4, W14's in-process floor: a copy there and back (``b.copy_(a); a.copy_(b)``) per size."""
    out = {}
    for label, nbytes, warmup, iters in p["sizes"]:
        a, b = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
        stage(f"copy {label}")
        for _ in range(warmup):
            b.copy_(a)
            a.copy_(b)
        times = []
        for _ in range(iters):
            t0 = _ns()
            b.copy_(a)
            a.copy_(b)
            times.append(_ns() - t0)
        out[f"copy_rt_us_{label}"] = percentile(times, 50) / 1e3
    return out


#: What F5 touches before each cold hop: more than a core's L2 cache, as the other processes of
#: a chain do (on two cores) between two hops of one of them
EVICT_BYTES = 16 << 20


def hop_floor(p: dict, stage: Stage) -> dict:
    """F5, W11's floor per hop, no RPC library: the least a hop of a backward pass does in
    Python (a 16-float gradient from bytes with ``torch.frombuffer``, one engine call through one
    node, the result to bytes with ``numpy()``), p50 with the caches warm and after
    ``EVICT_BYTES`` are touched (cold). The engine call is the one ``torch.autograd.grad`` makes
    after its checks of the arguments (torchrpc makes the same)."""
    from torch.autograd.graph import _engine_run_backward

    def grad(y: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> tuple:
        return _engine_run_backward((y,), (g,), False, False, (x,), False, accumulate_grad=False)

    raw = bytearray(torch.ones(16).numpy().tobytes())
    evict = torch.zeros(EVICT_BYTES, dtype=torch.uint8)
    out = {}
    for label in ("warm", "cold"):
        stage(f"hop, caches {label}")
        times = []
        for _ in range(p["warmup"] + p["iters"]):
            x = torch.ones(16, requires_grad=True)
            y = x * 2
            if label == "cold":
                evict[::64] += 1  # one byte in each cache line
            t0 = _ns()
            (gx,) = grad(y, x, torch.frombuffer(raw, dtype=torch.float32))
            gx.numpy()
            times.append(_ns() - t0)
        out[f"hop_us_{label}"] = percentile(times[p["warmup"]:], 50) / 1e3
    return out


DRIVERS: dict[str, Callable[[Backend, dict, Stage], dict]] = {
    "W9": drive_w9, "W10": drive_w10, "W11": drive_w11, "W12": drive_w12, "W13": drive_w13, "W14": drive_w14,
}
