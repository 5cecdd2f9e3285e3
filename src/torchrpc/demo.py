"""A small demo: start local workers, make calls, share RRefs, and print what happened.

Run with ``python -m torchrpc demo [--workers N]``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time

import torch

import torchrpc as rpc


class Counter:
    """A value that lives on one worker and is used through RRefs."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> int:
        self.count += n
        return self.count


def where_am_i() -> str:
    return rpc.get_worker_info().name


def matmul_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b).norm().item()


def bump_through(rref: rpc.RRef, n: int) -> int:
    """Runs on one worker, changing a Counter that lives on another."""
    return rref.rpc_sync().add(n)


def _worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        peers = [f"worker{r}" for r in range(1, world_size)]
        print(f"[worker0] started {world_size} workers: {['worker0'] + peers}")
        for peer in peers:
            print(f"[worker0] rpc_sync({peer!r}, where_am_i) -> {rpc.rpc_sync(peer, where_am_i)!r}")
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        futs = [rpc.rpc_async(peer, matmul_norm, args=(a, b)) for peer in peers]
        print(f"[worker0] rpc_async matmul on {len(peers)} workers -> norms {[round(f.wait(), 2) for f in futs]}")
        counter = rpc.remote(peers[0], Counter)
        print(f"[worker0] remote({peers[0]!r}, Counter) -> {counter!r}")
        for peer in peers:
            total = rpc.rpc_sync(peer, bump_through, args=(counter, 10))
            print(f"[worker0] {peer} bumped the counter on {counter.owner_name()} through a shared RRef -> {total}")
        print(f"[worker0] counter.to_here().count -> {counter.to_here().count}")
        n = 500
        t0 = time.perf_counter()
        for _ in range(n):
            rpc.rpc_sync(peers[0], where_am_i)
        us = (time.perf_counter() - t0) / n * 1e6
        print(f"[worker0] {n} small rpc_sync calls: {us:.0f} us each")
        try:
            rpc.rpc_sync(peers[0], matmul_norm, args=(torch.ones(2, 3), torch.ones(2, 3)))
        except RuntimeError as e:
            print(f"[worker0] a remote error comes back as {type(e).__name__}: {str(e).splitlines()[0]}")
    rpc.shutdown()
    if rank == 0:
        print("[worker0] all workers shut down cleanly")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchrpc demo", description=__doc__)
    parser.add_argument("--workers", type=int, default=3, help="number of local workers (default 3)")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, args.workers, port)) for r in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max(abs(p.exitcode or 0) for p in procs)
