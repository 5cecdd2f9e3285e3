"""Running the benchmark: the workload catalogue, iteration counts, and process rounds.

A *round* of one workload on one backend is a group of fresh processes (multiprocessing
'spawn'), started with a fresh MASTER_PORT, that run the same :func:`workloads.process_main`
and report through a Queue. Every round has a timeout: a round that runs past it gets its
processes' stacks dumped (SIGUSR1, faulthandler) into their logs, then is killed; the
round is recorded as failed with the last stage each process reported and the log tails.
No process outlives its round.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import workloads

MiB = 1 << 20

# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str      # the key the worker reports
    label: str    # shown in the table
    unit: str
    better: str   # "lower" or "higher"


@dataclass(frozen=True)
class Workload:
    wid: str
    short: str    # for the table
    title: str
    world_size: int
    metrics: tuple[Metric, ...]
    reference: str | None = None   # an extra non-RPC "backend" measured alongside


#: W7's context sizes (sends per context) in the full bench; the quick and smoke runs take a prefix
AUTOGRAD_SIZES = (100, 1000, 10000)
#: W11's chain depths (world size depth + 1), W13's trainer counts (world size n + 1), W14's payloads
CHAIN_DEPTHS = (1, 2, 3, 4)
FANIN_TRAINERS = (1, 3, 7)
PAYLOADS = (("4KiB", 4 << 10), ("64KiB", 64 << 10), ("256KiB", 256 << 10), ("4MiB", 4 * MiB), ("64MiB", 64 * MiB))
PIPE_WINDOW = 8

WORKLOADS: dict[str, Workload] = {w.wid: w for w in [
    Workload("W1", "small-call latency", "small-call latency: rpc_sync(add, (1, 2))", 2,
             (Metric("p50_us", "p50", "us", "lower"), Metric("p99_us", "p99", "us", "lower"))),
    Workload("W2", "small-call throughput", "small-call throughput: 64 rpc_async in flight", 2,
             (Metric("calls_per_s", "throughput", "calls/s", "higher"),)),
    Workload("W3", "tensor round trip", "tensor round trip: identity(t), 2 x size / time", 2,
             (Metric("gbps_1MiB", "1 MiB", "GB/s", "higher"), Metric("gbps_64MiB", "64 MiB", "GB/s", "higher"))),
    Workload("W4", "remote + to_here", "remote(make_small_tensor) + to_here()", 2,
             (Metric("p50_us", "p50 per pair", "us", "lower"),)),
    Workload("W5", "model-parallel step", "2-stage MLP train step (3 procs, dist autograd + DistributedOptimizer)", 3,
             (Metric("steps_per_s", "rate", "steps/s", "higher"),), reference="one-process"),
    Workload("W6", "RRef.backward", "RRef.backward(ctx) from a non-owner", 2,
             (Metric("p50_us", "p50", "us", "lower"),)),
    Workload("W7", "autograd at size", "N x rpc_sync(mul2, x) in one context, then dist_autograd.backward", 2,
             (Metric("first_bwd_ms", "first backward", "ms", "lower"),
              *(m for n in AUTOGRAD_SIZES for m in (Metric(f"fwd_us_{n}", f"N={n:,} forward/call", "us", "lower"),
                                                     Metric(f"bwd_us_{n}", f"N={n:,} backward/send", "us",
                                                            "lower"))))),
    Workload("W8", "owner memory per RRef", "RSS growth of an owner holding N RRefs of 1-element tensors", 2,
             (Metric("bytes_per_rref", "per live RRef", "bytes", "lower"),)),
    # The shapes users run (drivers in .shapes); W10, W11 and W13 run one process group per world size
    Workload("W9", "remote built-in op", "remote(dst, torch.ones, ((10,),)).to_here(); the same with a Python function",
             2, (Metric("p50_us_builtin", "torch.ones p50", "us", "lower"),
                 Metric("p50_us_python", "Python fn p50", "us", "lower"))),
    Workload("W10", "RRef.backward shapes", "remote(loss) + RRef.backward(ctx) from a non-owner, per step: the loss "
             "uses the caller's tensor (2 procs) / only the owner's (3 procs, one idle)", 3,
             (Metric("p50_us_back", "grad to caller p50", "us", "lower"),
              Metric("p50_us_owner3", "owner only, 3 procs p50", "us", "lower"))),
    Workload("W11", "nested chain + backward", "rpc_sync chain w0 -> w1 -> ... -> w<depth> (nested), "
             "dist_autograd.backward on w0, per step", max(CHAIN_DEPTHS) + 1,
             tuple(Metric(f"p50_us_d{d}", f"depth {d} ({d + 1} procs) p50", "us", "lower") for d in CHAIN_DEPTHS)),
    Workload("W12", "4-stage pipeline", f"driver + 4 stage workers, rpc_async chained by futures, "
             f"{PIPE_WINDOW} micro-batches of 32x256 in flight", 5,
             (Metric("mb_per_s", "throughput", "micro-batches/s", "higher"),)),
    Workload("W13", "fan-in on one server", "N trainers rpc_sync 64 KiB each way to one parameter server for a "
             "fixed time, total", max(FANIN_TRAINERS) + 1,
             tuple(Metric(f"calls_per_s_{n}", f"{n} trainer{'s' * (n > 1)}", "calls/s", "higher")
                   for n in FANIN_TRAINERS)),
    Workload("W14", "tensor latency", "rpc_sync(identity, t) round trip by payload size", 2,
             tuple(Metric(f"p50_us_{label}", f"{label} p50", "us", "lower") for label, _ in PAYLOADS)),
]}

FLOORS: dict[str, tuple[str, str, tuple[Metric, ...]]] = {
    "F1": ("TCP ping-pong", "raw Python TCP ping-pong, 64 B messages, TCP_NODELAY, 2 procs",
           (Metric("p50_us", "p50 round trip", "us", "lower"),)),
    "F2": ("tensor copy", "64 MiB in-process dst.copy_(src), size / time",
           (Metric("gbps", "64 MiB", "GB/s", "higher"),)),
    "F3": ("TCP ping-pong, polling", "as F1, each side polling its socket up to 200 us before blocking",
           (Metric("poll_p50_us", "p50 round trip", "us", "lower"),)),
    "F4": ("copy there and back", "W14's floor: in-process b.copy_(a); a.copy_(b), p50",
           tuple(Metric(f"copy_rt_us_{label}", f"{label} p50", "us", "lower") for label, _ in PAYLOADS)),
    "F5": ("a backward hop", "W11's floor per hop: a gradient from bytes, one engine call through one node, "
           "the result to bytes; p50 with the caches warm, and cold (16 MiB touched before each)",
           (Metric("hop_us_warm", "caches warm p50", "us", "lower"),
            Metric("hop_us_cold", "caches cold p50", "us", "lower"))),
}

BACKENDS = ("torchrpc", "torch")

# --------------------------------------------------------------------------------------
# Iteration counts per mode
# --------------------------------------------------------------------------------------

MODES = ("full", "quick", "smoke")
DEFAULT_ROUNDS = {"full": 3, "quick": 3, "smoke": 1}
DEFAULT_ROUND_TIMEOUT = {"full": 180.0, "quick": 60.0, "smoke": 30.0}


# (warm-up, timed) iterations; W2 counts calls, W5 training steps
ITERATIONS: dict[str, dict[str, tuple[int, int]]] = {
    "full": {"W1": (300, 5000), "W2": (1000, 20000), "W3_1MiB": (20, 300), "W3_64MiB": (3, 30),
             "W4": (100, 2000), "W5": (3, 30), "W6": (30, 1000), "W8": (1000, 20000),
             "F1": (1000, 20000), "F2": (3, 50)},
    "quick": {"W1": (100, 1000), "W2": (256, 3000), "W3_1MiB": (10, 80), "W3_64MiB": (2, 6),
              "W4": (50, 300), "W5": (2, 8), "W6": (10, 150), "W8": (200, 5000), "F1": (200, 3000), "F2": (2, 10)},
    "smoke": {"W1": (5, 30), "W2": (64, 200), "W3_1MiB": (2, 5), "W3_64MiB": (1, 2),
              "W4": (5, 20), "W5": (1, 2), "W6": (2, 10), "W8": (10, 100), "F1": (10, 100), "F2": (1, 3)},
}
#: W7's sizes per mode (the table shows the full run's; a shorter run leaves the larger ones out)
W7_SIZES = {"full": AUTOGRAD_SIZES, "quick": AUTOGRAD_SIZES[:2], "smoke": AUTOGRAD_SIZES[:1]}

#: The shapes' (warm-up, timed) iterations: W9-W11 per metric, W12 micro-batches, W14 per size
#: (keyed by payload); W13 is (warm-up calls per trainer, seconds of calls per trainer count)
SHAPE_ITERATIONS: dict[str, dict] = {
    "full": {"W9": (100, 2000), "W10": (30, 1000), "W11": (20, 400), "W12": (64, 1500), "W13": (20, 3.0),
             "W14": {"4KiB": (100, 2000), "64KiB": (100, 2000), "256KiB": (50, 1000), "4MiB": (10, 200),
                     "64MiB": (3, 30)}},
    "quick": {"W9": (100, 300), "W10": (10, 150), "W11": (5, 60), "W12": (16, 300), "W13": (5, 1.0),
              "W14": {"4KiB": (30, 300), "64KiB": (30, 300), "256KiB": (20, 200), "4MiB": (5, 40),
                      "64MiB": (2, 6)}},
    "smoke": {"W9": (3, 10), "W10": (2, 5), "W11": (2, 3), "W12": (8, 16), "W13": (2, 0.3),
              "W14": {"4KiB": (2, 5), "64KiB": (2, 5), "256KiB": (2, 5), "4MiB": (1, 3), "64MiB": (1, 2)}},
}


def shape_params(mode: str) -> dict[str, dict]:
    """The parameters of W9-W14 and of F4 in a mode; a workload with ``groups`` runs one process
    group per entry (its own world size), one after the other within a round."""
    n = SHAPE_ITERATIONS[mode]

    def it(key: str) -> dict:
        return {"warmup": n[key][0], "iters": n[key][1]}

    sizes = [(label, nbytes, *n["W14"][label]) for label, nbytes in PAYLOADS]
    # the smoke run (the tests) starts one group of each (a nested chain, several trainers): process
    # start-up is most of it; W10's two groups still run
    depths, trainers = ((2,), (3,)) if mode == "smoke" else (CHAIN_DEPTHS, FANIN_TRAINERS)
    return {
        "W9": it("W9"),
        "W10": {"groups": [dict(it("W10"), shape="back", world_size=2),
                           dict(it("W10"), shape="owner3", world_size=3)]},
        "W11": {"groups": [dict(it("W11"), depth=d, world_size=d + 1) for d in depths]},
        "W12": dict(it("W12"), window=PIPE_WINDOW),
        "W13": {"groups": [{"warmup": n["W13"][0], "duration": n["W13"][1], "trainers": t, "world_size": t + 1}
                           for t in trainers]},
        "W14": {"sizes": sizes},
        "F4": {"sizes": [(label, nbytes, max(2, w), max(20, i)) for label, nbytes, w, i in sizes]},
        "F5": {"warmup": 20, "iters": {"full": 1000, "quick": 300, "smoke": 20}[mode]},
    }


def params_for(mode: str) -> dict[str, dict]:
    """Per-workload parameters (warm-up and timed iterations) of a mode."""
    n = ITERATIONS[mode]

    def it(key: str) -> dict:
        return {"warmup": n[key][0], "iters": n[key][1]}

    return {
        "W1": it("W1"),
        "W2": {**it("W2"), "window": 64},
        "W3": {"sizes": [("1MiB", MiB, *n["W3_1MiB"]), ("64MiB", 64 * MiB, *n["W3_64MiB"])]},
        "W4": it("W4"),
        "W5": it("W5"),
        "W6": it("W6"),
        "W7": {"sizes": list(W7_SIZES[mode])},
        "W8": it("W8"),
        "F1": {**it("F1"), "msg_bytes": 64},
        "F2": {**it("F2"), "nbytes": 64 * MiB},
        **shape_params(mode),
    }

# --------------------------------------------------------------------------------------
# One round: a group of fresh processes
# --------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    status: str                     # "ok", "failed", "timeout", "skipped"; "partial": a group of the round failed
    metrics: dict = field(default_factory=dict)
    error: str = ""
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        d: dict[str, Any] = {"status": self.status, "wall_s": round(self.wall_s, 3)}
        if self.notes:
            d["notes"] = self.notes
        if self.metrics:
            d["metrics"] = self.metrics
        if self.error:
            d["error"] = self.error
        return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def run_group(jobs: list[dict], timeout: float, logdir: str, label: str) -> RoundResult:
    """Start one process per job, collect their reports, and make sure all of them are gone."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    exit_barrier = ctx.Barrier(len(jobs))   # no process leaves before all are through (see process_main)
    procs: list[Any] = []
    logs: list[str] = []
    t_start = time.monotonic()
    deadline = t_start + timeout
    done: set[int] = set()
    stages: dict[int, str] = {}
    errors: dict[int, list[str]] = {}
    metrics: dict = {}
    crashed: dict[int, int] = {}
    notes: list[str] = []
    timed_out = False
    try:
        for i, job in enumerate(jobs):
            job = dict(job, idx=i)
            log = os.path.join(logdir, f"{label}-p{i}.log")
            logs.append(log)
            p = ctx.Process(target=workloads.process_main, args=(job, q, log, exit_barrier),
                            name=f"bench-{label}-p{i}")
            p.start()
            procs.append(p)

        def handle(msg: tuple) -> None:
            kind, idx, payload = msg
            if kind == "stage":
                stages[idx] = payload
            elif kind == "result":
                metrics.update(payload)
            elif kind == "error":
                errors.setdefault(idx, []).append(payload)
            elif kind == "note":
                notes.append(f"process {idx} ({_who(jobs[idx])}): {payload}")
            elif kind == "done":
                done.add(idx)

        while len(done) < len(procs):
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            try:
                handle(q.get(timeout=min(0.2, deadline - now)))
                continue
            except queue_mod.Empty:
                pass
            for i, p in enumerate(procs):
                if i not in done and i not in crashed and not p.is_alive():
                    # Died without saying "done" (a crash, or a kill from outside): what it did
                    # put is already in the pipe; give the others a short while to notice.
                    crashed[i] = p.exitcode
                    exit_barrier.abort()   # the others must not wait for it
                    deadline = min(deadline, time.monotonic() + 10.0)
            if len(crashed) + len(done) >= len(procs):
                try:
                    while True:
                        handle(q.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
                break
    finally:
        if timed_out or len(done) < len(procs):
            exit_barrier.abort()
        stragglers = _reap(procs, grace=10.0 if not timed_out else 0.0)
        q.close()
        q.join_thread()

    wall = time.monotonic() - t_start
    problems: list[str] = []
    for i in sorted(errors):
        for tb in errors[i]:
            problems.append(f"process {i} ({_who(jobs[i])}) raised:\n{tb.rstrip()}")
    for i, code in sorted(crashed.items()):
        if i not in done:
            problems.append(f"process {i} ({_who(jobs[i])}) exited with code {code} without reporting")
    if timed_out or stragglers:
        what = f"round timed out after {timeout:.0f} s" if timed_out else "processes did not exit after reporting"
        lines = [what + "; last stage reported per process:"]
        for i in range(len(procs)):
            lines.append(f"  process {i} ({_who(jobs[i])}): {stages.get(i, '(none)')}"
                         + ("" if i in done else "  [never finished]"))
        problems.append("\n".join(lines))
    if problems:
        tails = []
        for i, log in enumerate(logs):
            if not (timed_out or stragglers or i in crashed):
                continue   # it reported and exited: its traceback, if any, says it all
            t = _tail(log, 60 if timed_out else 25)
            if t.strip():
                tails.append(f"--- log of process {i} ({_who(jobs[i])}) ---\n{t}")
        status = "timeout" if timed_out else "failed"
        return RoundResult(status, metrics, "\n".join(problems + tails), wall, notes)
    if not metrics:
        return RoundResult("failed", {}, "no measurement reported", wall, notes)
    return RoundResult("ok", metrics, "", wall, notes)


def _who(job: dict) -> str:
    if job["kind"] == "rpc":
        return f"{job['backend']} worker{job['rank']}"
    return job["kind"]


def _reap(procs: list[Any], grace: float) -> list[int]:
    """Join every process; dump stacks of, then kill, those still alive after ``grace``. Returns their pids."""
    end = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGUSR1)   # faulthandler: every thread's stack into the log
        except ProcessLookupError:
            pass
    if alive:
        time.sleep(1.0)
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(3.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
    pids = [p.pid for p in alive]
    for p in procs:
        if not p.is_alive():
            p.close()
    return pids

# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------


def rpc_jobs(w: Workload, backend: str, params: dict, world_size: int | None = None) -> list[dict]:
    port = free_port()
    n = world_size or w.world_size
    return [{"kind": "rpc", "backend": backend, "workload": w.wid, "rank": r, "world_size": n,
             "port": port, "params": params} for r in range(n)]


def floor_jobs(params: dict, accept_timeout: float) -> list[dict]:
    """The floors in one round: a TCP client (which then does the copies) and a TCP echo server."""
    tcp = dict(params["F1"], port=free_port(), accept_timeout=accept_timeout)
    return [{"kind": "floors_client", "params": {"tcp": tcp, "copy": params["F2"], "copy_rt": params["F4"],
                                                            "hop": params["F5"]}},
            {"kind": "tcp_server", "params": tcp}]


def run_rpc_round(w: Workload, backend: str, params: dict, timeout: float, logdir: str, label: str) -> RoundResult:
    """One round of ``w`` on ``backend``: one process group, or one per entry of ``params["groups"]``,
    each started after the previous one is gone, all within ``timeout`` seconds together."""
    if "groups" not in params:
        return run_group(rpc_jobs(w, backend, params), timeout, logdir, label)
    deadline = time.monotonic() + timeout
    total = RoundResult("ok")
    for g, group in enumerate(params["groups"]):
        p = {k: v for k, v in group.items() if k != "world_size"}
        left = deadline - time.monotonic()
        if left <= 1.0:
            res = RoundResult("timeout", error=f"round timed out after {timeout:.0f} s before group {g + 1} "
                                               f"of {len(params['groups'])} ({p}) started")
        else:
            res = run_group(rpc_jobs(w, backend, p, group["world_size"]), left, logdir, f"{label}-g{g}")
        total.wall_s += res.wall_s
        total.notes += res.notes
        if res.status == "ok":
            total.metrics.update(res.metrics)
        else:   # "partial": the report counts the groups that succeeded, this one as failed
            total.status = "partial" if res.status == "failed" and total.status in ("ok", "partial") else res.status
            total.error += (f"group {g + 1} ({p}): " if not total.error else f"\ngroup {g + 1} ({p}): ") + res.error
            if res.status == "timeout":
                break
    if total.status == "partial" and not total.metrics:
        total.status = "failed"
    return total


@dataclass
class BenchRun:
    mode: str
    rounds: int
    round_timeout: float
    # (id, backend) -> one RoundResult per round; backend is "torchrpc", "torch",
    # a workload's reference ("one-process") or "floor"
    results: dict[tuple[str, str], list[RoundResult]] = field(default_factory=dict)
    wall_s: float = 0.0
    source: dict = field(default_factory=dict)   # versions, torchrpc commit (see cli.provenance)


def run_bench(selected: list[str], mode: str, rounds: int, round_timeout: float, floors: bool, logdir: str,
              progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> BenchRun:
    params = params_for(mode)
    run = BenchRun(mode, rounds, round_timeout)
    t0 = time.monotonic()

    def note(wid: str, r: int, backend: str, res: RoundResult) -> None:
        run.results.setdefault((wid, backend), []).append(res)
        shown = " ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()) if res.status in ("ok", "partial") else ""
        if res.status != "ok":
            shown += (" " if shown else "") + (res.error.splitlines() or [""])[0]
        progress(f"[{time.monotonic() - t0:6.1f}s] {wid} round {r + 1}/{rounds} {backend:<11} "
                 f"{res.status:<7} {shown} ({res.wall_s:.1f} s)")
        for n in res.notes:
            progress(f"          note: {n}")

    if floors:
        for r in range(rounds):
            res = run_group(floor_jobs(params, round_timeout), round_timeout, logdir, f"floors-r{r}")
            for fid, (_, _, ms) in FLOORS.items():
                keys = {m.key for m in ms}
                part = RoundResult(res.status, {k: v for k, v in res.metrics.items() if k in keys},
                                   res.error, res.wall_s, res.notes)
                if res.status == "ok" and len(part.metrics) < len(keys):
                    part.status, part.error = "failed", f"no {', '.join(sorted(keys - set(part.metrics)))} reported"
                note(fid, r, "floor", part)

    for wid in selected:
        w = WORKLOADS[wid]
        backends = list(BACKENDS) + ([w.reference] if w.reference else [])
        hung: set[str] = set()
        for r in range(rounds):
            for backend in backends:
                if backend in hung:   # don't spend another full timeout on a backend that hangs here
                    note(wid, r, backend, RoundResult("skipped", error="skipped: an earlier round timed out"))
                    continue
                if backend == "one-process":
                    jobs = [{"kind": "local_w5", "params": params[wid]}]
                    res = run_group(jobs, round_timeout, logdir, f"{wid}-r{r}-{backend}")
                else:
                    res = run_rpc_round(w, backend, params[wid], round_timeout, logdir, f"{wid}-r{r}-{backend}")
                if res.status == "timeout":
                    hung.add(backend)
                note(wid, r, backend, res)
    run.wall_s = time.monotonic() - t0
    return run
