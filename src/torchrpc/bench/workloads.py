"""What the benchmark's worker processes run.

Every process of the benchmark starts in :func:`process_main` with a *job* (a plain dict).
An RPC job runs one backend only -- ``torchrpc`` or ``torch`` (``torch.distributed.rpc``) --
and the driver code of every workload is the same function for both: it receives a
:class:`Backend` holding the three modules (rpc, autograd, optim) and calls them through it.

Everything a worker calls remotely is defined at module level here, so that both backends
can unpickle it by reference on the other side.

This is the one place in torchrpc that imports ``torch.distributed.rpc``, and it does so
only in the worker processes of the ``torch`` backend (by name, through importlib).
"""
from __future__ import annotations

import collections
import faulthandler
import functools
import importlib
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable

import torch

# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------

BACKEND_MODULES = {
    "torchrpc": ("torchrpc", "torchrpc.autograd", "torchrpc.optim"),
    "torch": ("torch.distributed.rpc", "torch.distributed.autograd", "torch.distributed.optim"),
}


class Backend:
    """The three modules of one RPC library, under the names programs give them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rpc = importlib.import_module(BACKEND_MODULES[name][0])

    @functools.cached_property
    def autograd(self) -> Any:
        return importlib.import_module(BACKEND_MODULES[self.name][1])

    @functools.cached_property
    def optim(self) -> Any:
        # imported on first use only: torch.distributed.optim takes ~0.6 s to import,
        # which would lengthen every round of the workloads that don't use it
        return importlib.import_module(BACKEND_MODULES[self.name][2])

    def options(self) -> Any:
        return self.rpc.TensorPipeRpcBackendOptions(num_worker_threads=16, rpc_timeout=120)


# The backend of this process (each worker process runs exactly one); remote functions
# that need the library itself (e.g. to make an RRef) find it here.
_B: Backend | None = None

# --------------------------------------------------------------------------------------
# Functions called remotely (module level: both backends pickle them by reference)
# --------------------------------------------------------------------------------------

HIDDEN = 1024
LAYERS_PER_STAGE = 4
BATCH = 64


def add(a: Any, b: Any) -> Any:
    return a + b


def identity(x: Any) -> Any:
    return x


def make_small_tensor() -> torch.Tensor:
    return torch.arange(8, dtype=torch.float32)


def build_stage(seed: int) -> torch.nn.Module:
    """One stage of the W5 model: 4 x (Linear(1024, 1024) + ReLU)."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS_PER_STAGE):
        layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def stage_forward(stage_rref: Any, x: torch.Tensor) -> torch.Tensor:
    return stage_rref.local_value()(x)


def stage_param_rrefs(stage_rref: Any) -> list:
    assert _B is not None
    return [_B.rpc.RRef(p) for p in stage_rref.local_value().parameters()]


def compute_loss(w: torch.Tensor) -> torch.Tensor:
    return (w * w).sum()


# --------------------------------------------------------------------------------------
# Statistics helpers (plain Python; no numpy needed in the workers)
# --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


_ns = time.perf_counter_ns

# --------------------------------------------------------------------------------------
# Workload drivers: run on rank 0 ("worker0") with the other ranks idle in shutdown().
# Each takes (backend, params, stage) and returns {metric: value}.
# ``stage(text)`` reports progress to the parent (shown if the round fails or hangs).
# --------------------------------------------------------------------------------------

Stage = Callable[[str], None]


def drive_w1(B: Backend, p: dict, stage: Stage) -> dict:
    """Small-call latency: rpc_sync(peer, add, (1, 2)) in a loop."""
    rpc, peer = B.rpc, "worker1"
    stage("warm-up")
    for _ in range(p["warmup"]):
        if rpc.rpc_sync(peer, add, args=(1, 2)) != 3:
            raise AssertionError("add(1, 2) != 3")
    stage("timing")
    times = []
    for _ in range(p["iters"]):
        t0 = _ns()
        rpc.rpc_sync(peer, add, args=(1, 2))
        times.append(_ns() - t0)
    return {"p50_us": percentile(times, 50) / 1e3, "p99_us": percentile(times, 99) / 1e3}


def _windowed_calls(B: Backend, n: int, window: int) -> None:
    rpc, peer = B.rpc, "worker1"
    inflight: collections.deque = collections.deque()
    issued = 0
    while issued < min(window, n):
        inflight.append(rpc.rpc_async(peer, add, args=(1, 2)))
        issued += 1
    while inflight:
        inflight.popleft().wait()
        if issued < n:
            inflight.append(rpc.rpc_async(peer, add, args=(1, 2)))
            issued += 1


def drive_w2(B: Backend, p: dict, stage: Stage) -> dict:
    """Small-call throughput: a window of ``window`` rpc_async calls kept in flight."""
    stage("warm-up")
    _windowed_calls(B, p["warmup"], p["window"])
    stage("timing")
    t0 = _ns()
    _windowed_calls(B, p["iters"], p["window"])
    dt = (_ns() - t0) / 1e9
    return {"calls_per_s": p["iters"] / dt}


def tensor_round_trips(B: Backend, label: str, nbytes: int, warmup: int, iters: int, stage: Stage) -> list[int]:
    """``rpc_sync(identity, t)`` of an ``nbytes`` tensor to worker1: checked once in the
    warm-up, then ``iters`` timed calls (ns each)."""
    t = torch.randn(nbytes // 4)
    stage(f"{label} warm-up")
    for i in range(warmup):
        r = B.rpc.rpc_sync("worker1", identity, args=(t,))
        if i == 0 and not torch.equal(r, t):
            raise AssertionError(f"{label} tensor came back different")
        del r
    stage(f"{label} timing")
    times = []
    for _ in range(iters):
        t0 = _ns()
        B.rpc.rpc_sync("worker1", identity, args=(t,))
        times.append(_ns() - t0)
    return times


def drive_w3(B: Backend, p: dict, stage: Stage) -> dict:
    """Tensor round trip: identity(tensor), GB/s = 2 * size / median call time."""
    out = {}
    for label, nbytes, warmup, iters in p["sizes"]:
        times = tensor_round_trips(B, label, nbytes, warmup, iters, stage)
        out[f"gbps_{label}"] = 2 * nbytes / (percentile(times, 50) / 1e9) / 1e9
    return out


def drive_w4(B: Backend, p: dict, stage: Stage) -> dict:
    """remote(peer, make_small_tensor) + to_here(), per pair."""
    rpc, peer = B.rpc, "worker1"
    stage("warm-up")
    for i in range(p["warmup"]):
        v = rpc.remote(peer, make_small_tensor).to_here()
        if i == 0 and not torch.equal(v, make_small_tensor()):
            raise AssertionError("to_here() returned a wrong value")
    stage("timing")
    times = []
    for _ in range(p["iters"]):
        t0 = _ns()
        rpc.remote(peer, make_small_tensor).to_here()
        times.append(_ns() - t0)
    return {"p50_us": percentile(times, 50) / 1e3}


def drive_w5(B: Backend, p: dict, stage: Stage) -> dict:
    """One training step of a 2-stage model-parallel MLP driven from worker0."""
    rpc, dist_autograd = B.rpc, B.autograd
    stage("set-up")
    s1 = rpc.remote("worker1", build_stage, args=(1,))
    s2 = rpc.remote("worker2", build_stage, args=(2,))
    params = rpc.rpc_sync("worker1", stage_param_rrefs, args=(s1,)) + \
        rpc.rpc_sync("worker2", stage_param_rrefs, args=(s2,))
    if len(params) != 4 * LAYERS_PER_STAGE:
        raise AssertionError(f"expected {4 * LAYERS_PER_STAGE} parameter RRefs, got {len(params)}")
    opt = B.optim.DistributedOptimizer(torch.optim.SGD, params, lr=1e-3)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)

    def step() -> float:
        with dist_autograd.context() as ctx:
            h = rpc.rpc_sync("worker1", stage_forward, args=(s1, x))
            out = rpc.rpc_sync("worker2", stage_forward, args=(s2, h))
            loss = torch.nn.functional.mse_loss(out, y)
            dist_autograd.backward(ctx, [loss])
            opt.step(ctx)
        return loss.item()

    stage("warm-up")
    first = [step() for _ in range(p["warmup"])]
    if not all(math.isfinite(v) for v in first):
        raise AssertionError(f"non-finite loss {first}")
    stage("timing")
    t0 = _ns()
    for _ in range(p["iters"]):
        last = step()
    dt = (_ns() - t0) / 1e9
    if first and p["iters"] and not last < first[0]:
        raise AssertionError(f"loss did not go down: {first[0]} -> {last}")
    return {"steps_per_s": p["iters"] / dt}


def drive_w6(B: Backend, p: dict, stage: Stage) -> dict:
    """rref.backward(ctx) from a non-owner: the loss lives on worker1, its input on worker0."""
    rpc, dist_autograd = B.rpc, B.autograd
    torch.manual_seed(0)
    w = torch.randn(16, requires_grad=True)

    def one(check: bool) -> int:
        with dist_autograd.context() as ctx:
            loss = rpc.remote("worker1", compute_loss, args=(w,))
            loss._get_future().wait()  # the owner has the value: time only the backward
            t0 = _ns()
            loss.backward(ctx)
            dt = _ns() - t0
            if check:
                grads = dist_autograd.get_gradients(ctx)
                if w not in grads or not torch.allclose(grads[w], 2 * w.detach()):
                    raise AssertionError(f"wrong gradient after RRef.backward: {grads}")
        return dt

    stage("warm-up")
    for i in range(p["warmup"]):
        one(check=(i == 0))
    stage("timing")
    times = [one(check=False) for _ in range(p["iters"])]
    return {"p50_us": percentile(times, 50) / 1e3}


def mul2(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _sends_then_backward(B: Backend, n: int) -> tuple[float, float]:
    """``n`` rpc_sync(mul2, x) in one context, then one backward: (ns per call, ns per send)."""
    rpc, dist_autograd = B.rpc, B.autograd
    x = torch.ones(4, requires_grad=True)
    with dist_autograd.context() as ctx:
        t0 = _ns()
        ys = [rpc.rpc_sync("worker1", mul2, args=(x,)) for _ in range(n)]
        t1 = _ns()
        dist_autograd.backward(ctx, [torch.stack(ys).sum()])
        t2 = _ns()
        grad = dist_autograd.get_gradients(ctx).get(x)
        if grad is None or not torch.equal(grad, torch.full((4,), 2.0 * n)):
            raise AssertionError(f"wrong gradient after {n} sends: {grad}")
    return (t1 - t0) / n, (t2 - t1) / n


def drive_w7(B: Backend, p: dict, stage: Stage) -> dict:
    """Distributed autograd at size: N calls in one context, then one backward. First, the
    first backward of this process (a 10-send context)."""
    out = {}
    stage("first backward")
    _, per_send = _sends_then_backward(B, 10)
    out["first_bwd_ms"] = per_send * 10 / 1e6
    for n in p["sizes"]:
        stage(f"{n} sends")
        fwd, bwd = _sends_then_backward(B, n)
        out[f"fwd_us_{n}"], out[f"bwd_us_{n}"] = fwd / 1e3, bwd / 1e3
    return out


def make_scalar(i: int) -> torch.Tensor:
    return torch.tensor([float(i)])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drive_w8(B: Backend, p: dict, stage: Stage) -> dict:
    """Owner memory per live RRef: worker1's RSS growth while it owns N one-element tensors."""
    rpc = B.rpc
    stage("warm-up")
    warm = [rpc.remote("worker1", make_scalar, args=(i,)) for i in range(p["warmup"])]
    for r in warm:
        r.to_here()
    before = rpc.rpc_sync("worker1", rss_bytes)
    stage("creating RRefs")
    rrefs = [rpc.remote("worker1", make_scalar, args=(i,)) for i in range(p["iters"])]
    for r in rrefs[-64:]:
        r.to_here()
    rpc.rpc_sync("worker1", add, args=(1, 1))  # every creation before it has been served
    after = rpc.rpc_sync("worker1", rss_bytes)
    del rrefs, warm
    return {"bytes_per_rref": (after - before) / p["iters"]}


DRIVERS: dict[str, Callable[[Backend, dict, Stage], dict]] = {
    "W1": drive_w1, "W2": drive_w2, "W3": drive_w3, "W4": drive_w4, "W5": drive_w5, "W6": drive_w6,
    "W7": drive_w7, "W8": drive_w8,
}

# --------------------------------------------------------------------------------------
# Jobs without an RPC library: W5 in one process, and the floors
# --------------------------------------------------------------------------------------


def local_w5(p: dict, stage: Stage) -> dict:
    """The W5 model in one process: plain autograd + SGD."""
    s1, s2 = build_stage(1), build_stage(2)
    model = torch.nn.Sequential(s1, s2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)

    def step() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    stage("warm-up")
    for _ in range(p["warmup"]):
        step()
    stage("timing")
    t0 = _ns()
    for _ in range(p["iters"]):
        step()
    return {"steps_per_s": p["iters"] / ((_ns() - t0) / 1e9)}


def copy_floor(p: dict, stage: Stage) -> dict:
    """64 MiB in-process tensor copy, GB/s = size / median copy time."""
    n = p["nbytes"] // 4
    src, dst = torch.randn(n), torch.empty(n)
    stage("warm-up")
    for _ in range(p["warmup"]):
        dst.copy_(src)
    stage("timing")
    times = []
    for _ in range(p["iters"]):
        t0 = _ns()
        dst.copy_(src)
        times.append(_ns() - t0)
    return {"gbps": p["nbytes"] / (percentile(times, 50) / 1e9) / 1e9}


#: The polling ping-pong's wait before blocking (torchrpc's readers default to the same).
POLL_S = 200e-6
#: A message starting with this byte switches the echo server to polling.
_POLL_SWITCH = 0xFF


def _recv_exact(sock: socket.socket, buf: memoryview, poll_s: float = 0.0) -> bool:
    """Fill ``buf``; with ``poll_s``, poll the socket that long before each blocking read."""
    got = 0
    while got < len(buf):
        k = None
        if poll_s:
            end = time.perf_counter() + poll_s
            while k is None and time.perf_counter() < end:
                try:
                    k = sock.recv_into(buf[got:], 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        if k is None:
            k = sock.recv_into(buf[got:])
        if k == 0:
            return False
        got += k
    return True


def tcp_server(p: dict, stage: Stage) -> dict:
    """Echo fixed-size messages until the client closes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", p["port"]))
        ls.listen(1)
        ls.settimeout(p["accept_timeout"])
        stage("accept")
        conn, _ = ls.accept()
    with conn:
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(p["msg_bytes"]))
        stage("echo")
        poll_s = 0.0
        while _recv_exact(conn, buf, poll_s):
            if buf[0] == _POLL_SWITCH:
                poll_s = POLL_S
            conn.sendall(buf)
    return {}


def tcp_client(p: dict, stage: Stage) -> dict:
    """Raw TCP ping-pong of small messages with TCP_NODELAY: time per round trip, with both
    sides blocking in ``recv``, then with both polling for up to ``POLL_S`` first."""
    deadline = time.monotonic() + p["accept_timeout"]
    stage("connect")
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", p["port"]), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with sock:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = bytes(range(256)) * (p["msg_bytes"] // 256 + 1)
        msg = msg[:p["msg_bytes"]]
        buf = memoryview(bytearray(p["msg_bytes"]))
        out = {}
        for key, poll_s in (("p50_us", 0.0), ("poll_p50_us", POLL_S)):
            if poll_s:
                sock.sendall(bytes([_POLL_SWITCH]) + msg[1:])
                _recv_exact(sock, buf)
            stage(f"warm-up {key}")
            for _ in range(p["warmup"]):
                sock.sendall(msg)
                if not _recv_exact(sock, buf, poll_s):
                    raise ConnectionError("server closed")
            stage(f"timing {key}")
            times = []
            for _ in range(p["iters"]):
                t0 = _ns()
                sock.sendall(msg)
                _recv_exact(sock, buf, poll_s)
                times.append(_ns() - t0)
            out[key] = percentile(times, 50) / 1e3
        sock.shutdown(socket.SHUT_WR)
    return out


def floors_client(p: dict, stage: Stage) -> dict:
    """The floors in one process, one after the other: the TCP ping-pongs (F1, F3), the copy (F2),
    and when asked the copies there and back (F4) and a backward hop (F5)."""
    out = tcp_client(p["tcp"], stage)
    out.update(copy_floor(p["copy"], stage))
    shapes = importlib.import_module(f"{__package__}.shapes")
    if "copy_rt" in p:   # F4, W14's floor
        out.update(shapes.copy_round_trip_floor(p["copy_rt"], stage))
    if "hop" in p:   # F5, W11's floor per hop
        out.update(shapes.hop_floor(p["hop"], stage))
    return out


LOCAL_JOBS: dict[str, Callable[[dict, Stage], dict]] = {
    "local_w5": local_w5, "copy": copy_floor, "tcp_server": tcp_server, "tcp_client": tcp_client,
    "floors_client": floors_client,
}

# --------------------------------------------------------------------------------------
# The entry point of every benchmark process
# --------------------------------------------------------------------------------------


def _redirect_output(log_path: str) -> Any:
    """Send this process's stdout and stderr (fds 1 and 2) to ``log_path``."""
    log = open(log_path, "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    return log


def process_main(job: dict, q: Any, log_path: str, exit_barrier: Any = None) -> None:
    """Run one job and report to the parent through ``q``.

    Messages: ``("stage", idx, text)``, ``("result", idx, metrics)``, ``("error", idx, traceback)``,
    and always last ``("done", idx, None)``. SIGUSR1 dumps every thread's stack into the log
    (the parent sends it before killing a round that ran past its timeout). Before "done", the
    processes of a round wait for each other at ``exit_barrier``: torch's store lives in rank 0,
    and a rank 0 that exited while the others were still in shutdown() broke their shutdown
    ("Connection reset by peer", seen in 8-process rounds).
    """
    idx = job["idx"]
    log = _redirect_output(log_path)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")
    torch.set_num_threads(1)

    def stage(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}] stage: {text}", flush=True)
        q.put(("stage", idx, text))

    try:
        if job["kind"] == "rpc":
            _run_rpc_job(job, q, stage)
        else:
            q.put(("result", idx, LOCAL_JOBS[job["kind"]](job["params"], stage)))
    except BaseException:
        tb = traceback.format_exc()
        print(tb, flush=True)
        q.put(("error", idx, tb))
    finally:
        # Python threads still running here would have kept the process from exiting
        # (with os._exit below they can't): tell the parent.
        left = [t.name for t in threading.enumerate()
                if t is not threading.main_thread() and t.is_alive() and not t.daemon]
        if left:
            q.put(("note", idx, f"non-daemon threads still running at exit: {left}"))
        if exit_barrier is not None:
            try:
                exit_barrier.wait(timeout=60)
            except threading.BrokenBarrierError:   # the parent aborts it when a process dies
                pass
        q.put(("done", idx, None))
        q.close()
        q.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        log.flush()
    # Everything is reported and flushed. Skip the interpreter's finalization: a spawned child
    # ends with sys.exit(), and tearing down torch that way takes 0.3-1 s per process, which
    # made up a large share of a --quick run.
    os._exit(0)


def _run_rpc_job(job: dict, q: Any, stage: Stage) -> None:
    global _B
    rank, world_size = job["rank"], job["world_size"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]),
                      RANK=str(rank), WORLD_SIZE=str(world_size))
    stage(f"import {job['backend']}")
    B = _B = Backend(job["backend"])
    stage("init_rpc")
    B.rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=B.options())
    error = None
    try:
        if rank == 0:
            wid = job["workload"]   # W9 on: in .shapes
            driver = DRIVERS[wid] if wid in DRIVERS else importlib.import_module(f"{__package__}.shapes").DRIVERS[wid]
            q.put(("result", job["idx"], driver(B, job["params"], stage)))
        else:
            stage("serving")
    except BaseException:
        error = traceback.format_exc()
        print(error, flush=True)
        q.put(("error", job["idx"], error))
    finally:
        stage("shutdown" + (" (after an error)" if error else ""))
        B.rpc.shutdown()
        stage("shut down")
