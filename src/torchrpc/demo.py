"""The demo: train a model split across local workers with distributed autograd.

``python -m torchrpc demo`` starts ``--workers`` processes (default 3). worker0 drives:
it holds the data, the other workers each hold one stage of an MLP (a module created
there with ``rpc.remote``). Every step runs the stages in turn over RPC inside a
distributed autograd context, computes the loss on the last stage's worker (an RRef),
runs ``loss.backward(context)`` (RRef.backward from a non-owner), and lets a
DistributedOptimizer apply the gradients on every stage's worker. It shows a progress
bar with the loss, then a summary (steps/s, bytes each worker moved, the loss) and
writes the loss curve as a PNG.

``--join`` joins an existing rendezvous instead (RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT from the environment, as torchrun sets them), so the same demo runs
across hosts: ``torchrun --nnodes ... -m torchrpc demo --join``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any, Optional

import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from torchrpc.optim import DistributedOptimizer

IN_DIM, OUT_DIM = 32, 8


def build_stage(in_dim: int, out_dim: int, hidden: int, last: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(in_dim, hidden), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(hidden, out_dim if last else hidden))
    if not last:
        layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def stage_forward(stage: rpc.RRef, x: torch.Tensor) -> torch.Tensor:
    """Runs on a stage's worker, inside the driver's distributed autograd context."""
    return stage.local_value()(x)


def last_stage_loss(stage: rpc.RRef, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The last stage and the loss, on the last worker: the driver keeps an RRef to the loss."""
    return torch.nn.functional.mse_loss(stage.local_value()(x), y)


def stage_params(stage: rpc.RRef) -> list[rpc.RRef]:
    return [rpc.RRef(p) for p in stage.local_value().parameters()]


def traffic() -> dict[str, int]:
    """Bytes this worker sent and received, over all its connections."""
    peers = rpc.debug_info()["peers"].values()
    return {"sent": sum(p["bytes_sent"] for p in peers), "received": sum(p["bytes_received"] for p in peers)}


def teacher(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic regression task: targets from a fixed random two-layer network."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(IN_DIM, 64, generator=g), torch.randn(64, OUT_DIM, generator=g) / 8
    x = torch.randn(n, IN_DIM, generator=g)
    return x, torch.sin(x @ a) @ b


def train(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """Runs on worker0: the training loop and the summary."""
    stage_workers = [f"worker{r}" for r in range(1, world_size)]
    dims = [IN_DIM] + [args.hidden] * (len(stage_workers) - 1)
    stages = [rpc.remote(w, build_stage, args=(dims[i], OUT_DIM, args.hidden, i == len(stage_workers) - 1, i))
              for i, w in enumerate(stage_workers)]
    params = [p for s, w in zip(stages, stage_workers) for p in rpc.rpc_sync(w, stage_params, args=(s,))]
    opt = DistributedOptimizer(torch.optim.Adam, params, lr=args.lr)
    x_all, y_all = teacher(max(args.batch_size * 8, 512), seed=0)
    print(f"[worker0] {world_size} workers: worker0 drives, {', '.join(stage_workers)} hold "
          f"{len(stages)} stage(s) of an MLP ({sum(1 for _ in params)} parameter tensors)")
    losses: list[float] = []
    bar = _progress(args.steps, enabled=not args.no_progress)
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = (step * args.batch_size) % (len(x_all) - args.batch_size + 1)
        x, y = x_all[i:i + args.batch_size], y_all[i:i + args.batch_size]
        with dist_autograd.context() as ctx:
            h = x
            for stage, worker in zip(stages[:-1], stage_workers[:-1]):
                h = rpc.rpc_sync(worker, stage_forward, args=(stage, h))
            loss = rpc.remote(stage_workers[-1], last_stage_loss, args=(stages[-1], h, y))
            loss.backward(ctx)  # RRef.backward: the distributed backward starts on the loss's owner
            opt.step(ctx)
            losses.append(loss.to_here().item())
        bar.update(losses[-1])
    elapsed = time.perf_counter() - t0
    bar.close()
    moved = {"worker0": traffic()}
    moved.update({w: rpc.rpc_sync(w, traffic) for w in stage_workers})
    summary = {"steps": args.steps, "steps_per_s": args.steps / elapsed, "first_loss": losses[0],
               "final_loss": losses[-1], "bytes": moved, "losses": losses}
    _print_summary(summary)
    if args.plot:
        _plot(losses, args.plot)
    return summary


class _progress:
    """tqdm's bar where it is installed; a plain line every tenth of the run otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.n, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc="training", unit="step", file=sys.stdout)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.update(1)
        elif self.enabled and (self.n % max(1, self.total // 10) == 0 or self.n == self.total):
            print(f"[worker0] step {self.n}/{self.total} loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _print_summary(s: dict[str, Any]) -> None:
    print()
    print(f"  steps            {s['steps']}  ({s['steps_per_s']:.1f} steps/s)")
    print(f"  loss             {s['first_loss']:.4f} -> {s['final_loss']:.4f}")
    print("  bytes moved      " + "   ".join(
        f"{w}: sent {_size(b['sent'])}, received {_size(b['received'])}" for w, b in s["bytes"].items()))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _plot(losses: list[float], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"  (matplotlib is not installed: no plot written to {path})")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title("torchrpc demo: a model split across workers")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"  loss curve       {os.path.abspath(path)}")


def _worker(rank: int, world_size: int, args: argparse.Namespace, port: Optional[int]) -> None:
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    try:
        if rank == 0:
            train(args, world_size)
    finally:
        rpc.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchrpc demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3, help="local workers to start (default 3)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of each stage (default 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--plot", default="torchrpc-demo-loss.png", help="where to write the loss curve PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--join", action="store_true",
                        help="join an existing rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the env)")
    args = parser.parse_args(argv)
    if args.join:
        world_size = int(os.environ["WORLD_SIZE"])
        if world_size < 2:
            parser.error("the demo needs WORLD_SIZE >= 2")
        _worker(int(os.environ["RANK"]), world_size, args, None)
        return 0
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, args.workers, args, port)) for r in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max(abs(p.exitcode or 0) for p in procs)
