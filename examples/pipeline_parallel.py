"""Pipeline parallelism over RPC: a model split across two workers, with torchrpc.

As in PyTorch's tutorial "Distributed Pipeline Parallelism Using RPC": the master
("master", rank 0) holds no parameters; the model's two stages live on "worker1"
and "worker2", created there with ``rpc.remote``. Each batch is split into
micro-batches. For each one the master asks stage 1 for its output as an RRef
(it stays on worker1) and passes that RRef to stage 2, which fetches it straight
from worker1; the master only collects the futures of stage 2's outputs
(``torch.futures.wait_all``). So while stage 2 works on micro-batch i, stage 1
already works on micro-batch i + 1.

Training uses distributed autograd (the backward pass runs back through both
workers) and a ``DistributedOptimizer`` (each worker updates its own stage).
The task: regress the outputs of a fixed random "teacher" network.

Run ``python examples/pipeline_parallel.py``, or e.g. ``--steps 30 --batch-size 64
--micro-batches 4``. The workers are local processes; MASTER_ADDR / MASTER_PORT are
used when set, else a free port is picked.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from torchrpc.optim import DistributedOptimizer

IN_FEATURES = 32
HIDDEN = 128
OUT_FEATURES = 8


# --------------------------------------------------------------------------
# The two stages, each living on its own worker
# --------------------------------------------------------------------------


class Stage(nn.Module):
    """A piece of the model; ``forward`` takes an RRef to its input."""

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers
        # Micro-batches arrive concurrently, on several RPC threads; running them
        # one at a time keeps each stage a single pipeline step (and its compute
        # from fighting over the CPU with itself).
        self._lock = threading.Lock()

    def forward(self, x_rref: rpc.RRef) -> torch.Tensor:
        x = x_rref.to_here()  # from the master (stage 1) or from stage 1's worker (stage 2)
        with self._lock:
            return self.layers(x)

    def parameter_rrefs(self) -> list[rpc.RRef]:
        return [rpc.RRef(p) for p in self.parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()])


class Stage1(Stage):
    def __init__(self) -> None:
        torch.manual_seed(1)
        super().__init__(nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(),
                                       nn.Linear(HIDDEN, HIDDEN), nn.ReLU()))


class Stage2(Stage):
    def __init__(self) -> None:
        torch.manual_seed(2)
        super().__init__(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                       nn.Linear(HIDDEN, OUT_FEATURES)))


# --------------------------------------------------------------------------
# The model as the master sees it
# --------------------------------------------------------------------------


class PipelinedModel(nn.Module):
    """Runs each micro-batch through stage 1 on ``workers[0]``, then stage 2 on ``workers[1]``."""

    def __init__(self, workers: list[str], micro_batches: int) -> None:
        super().__init__()
        self.micro_batches = micro_batches
        self.stage1_rref = rpc.remote(workers[0], Stage1)
        self.stage2_rref = rpc.remote(workers[1], Stage2)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        out_futures = []
        for x in xs.chunk(self.micro_batches):
            x_rref = rpc.RRef(x)
            # An RRef to stage 1's output: the tensor stays on stage 1's worker ...
            y_rref = self.stage1_rref.remote().forward(x_rref)
            # ... until stage 2 fetches it from there with to_here().
            out_futures.append(self.stage2_rref.rpc_async().forward(y_rref))
        # Nothing above waited: all micro-batches are in flight at once.
        return torch.cat(torch.futures.wait_all(out_futures))

    def parameter_rrefs(self) -> list[rpc.RRef]:
        return (self.stage1_rref.rpc_sync().parameter_rrefs()
                + self.stage2_rref.rpc_sync().parameter_rrefs())


class Teacher(nn.Module):
    """A fixed random network whose outputs the pipeline learns to reproduce."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.Tanh(), nn.Linear(64, OUT_FEATURES))
        self.requires_grad_(False)
        self.scale = 1 / self.net(torch.randn(1000, IN_FEATURES)).std()  # targets of about unit variance

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, IN_FEATURES, generator=gen)
        return x, self.scale * self.net(x)


# --------------------------------------------------------------------------
# Training, on the master
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    sys.stdout.write(f"[master] {msg}\n")
    sys.stdout.flush()


def train(args: argparse.Namespace) -> None:
    model = PipelinedModel(["worker1", "worker2"], args.micro_batches)
    sizes = [model.stage1_rref.rpc_sync().num_parameters(), model.stage2_rref.rpc_sync().num_parameters()]
    log(f"stage 1 on worker1 ({sizes[0]} parameters), stage 2 on worker2 ({sizes[1]} parameters)")
    log(f"{args.steps} steps, batches of {args.batch_size} in {args.micro_batches} micro-batches")
    teacher = Teacher()
    gen = torch.Generator().manual_seed(0)
    x_eval, y_eval = teacher.batch(512, gen)
    opt = DistributedOptimizer(torch.optim.Adam, model.parameter_rrefs(), lr=args.lr)
    stages = [model.stage1_rref, model.stage2_rref]
    params_before = [stage.rpc_sync().flat_parameters() for stage in stages]

    def eval_loss() -> float:
        with torch.no_grad():  # no autograd context: a plain pipelined forward
            return F.mse_loss(model(x_eval), y_eval).item()

    loss_before = eval_loss()
    log(f"held-out loss before training: {loss_before:.4f}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = teacher.batch(args.batch_size, gen)
        with dist_autograd.context() as context_id:
            loss = F.mse_loss(model(x), y)
            dist_autograd.backward(context_id, [loss])  # through worker2, then worker1
            opt.step(context_id)  # each worker updates its own stage
        if step % args.log_every == 0 or step == args.steps:
            log(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - t0
    loss_after = eval_loss()
    log(f"held-out loss after training: {loss_after:.4f} (was {loss_before:.4f})")
    # Both stages learned: the backward pass reached worker1 through worker2.
    moved = [(stage.rpc_sync().flat_parameters() - before).norm().item()
             for stage, before in zip(stages, params_before)]
    log(f"parameters moved by (L2 norm): stage 1 {moved[0]:.3f}, stage 2 {moved[1]:.3f}")
    log(f"{args.steps / elapsed:.1f} steps/s, "
        f"{args.steps * args.batch_size / elapsed:.0f} samples/s")


def worker(rank: int, world_size: int, addr: str, port: str, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)  # three processes share few cores
    rpc.init_rpc("master" if rank == 0 else f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        train(args)
    # The workers only serve the master's calls until everyone shuts down.
    rpc.shutdown()


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="micro-batches per batch (default 4)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--log-every", type=int, default=25, help="log every N steps (default 25)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.micro_batches, args.log_every) < 1:
        parser.error("--steps, --batch-size, --micro-batches and --log-every must be positive")
    if args.micro_batches > args.batch_size:
        parser.error("--micro-batches cannot exceed --batch-size")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT") or free_port()
    try:
        # Starts the 3 processes and waits for them; if one fails, the others are stopped.
        mp.spawn(worker, args=(3, addr, port, args), nprocs=3, join=True)
    except Exception as e:  # mp.ProcessRaisedException / ProcessExitedException
        print(f"pipeline_parallel: failed: {e}", file=sys.stderr)
        return 1
    print("pipeline_parallel: all workers shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
