"""A parameter server trained by several trainers, with torchrpc.

The server ("ps", rank 0) holds a small MLP; trainers ("trainer1", "trainer2", ...)
each draw their own batches of a synthetic classification task (Gaussian blobs)
and train the one shared model. Two ways of doing that, as in PyTorch's RPC
tutorials "Implementing a Parameter Server Using Distributed RPC Framework" and
"Implementing Batch RPC Processing Using Asynchronous Executions":

* ``--mode autograd``: the forward pass runs on the server, called by each trainer
  through the server's RRef inside a distributed autograd context; the trainer
  computes the loss, runs ``dist_autograd.backward`` (gradients flow back into the
  server's parameters) and steps a ``DistributedOptimizer`` (the update runs on the
  server). Trainers update the model independently of each other.
* ``--mode batch``: trainers fetch a copy of the model, compute gradients locally,
  and send them to the server with an ``@rpc.functions.async_execution`` function.
  The server adds them up under a lock and answers nobody until every trainer of
  the round has reported; then it takes one optimizer step on the averaged
  gradient and sends the new model to all of them.

Run ``python examples/parameter_server.py`` (both modes, 2 trainers), or e.g.
``--mode batch --trainers 3 --steps 50 --batch-size 32``. The workers are local
processes; MASTER_ADDR / MASTER_PORT are used when set, else a free port is picked.
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

IN_FEATURES = 16
NUM_CLASSES = 4


# --------------------------------------------------------------------------
# The task and the model
# --------------------------------------------------------------------------


class Blobs:
    """A synthetic classification task: NUM_CLASSES Gaussian blobs in IN_FEATURES dimensions.

    The blob centres are the same for everyone (fixed seed); each user samples
    its own points with its own ``seed``.
    """

    def __init__(self, seed: int) -> None:
        self.centres = torch.randn(NUM_CLASSES, IN_FEATURES, generator=torch.Generator().manual_seed(0))
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(NUM_CLASSES, (size,), generator=self.gen)
        points = self.centres[labels] + 1.5 * torch.randn(size, IN_FEATURES, generator=self.gen)
        return points, labels


class MLP(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def make_model() -> MLP:
    torch.manual_seed(0)  # the same initial model in both modes
    return MLP()


def accuracy(model: nn.Module, task: Blobs, n: int = 2000) -> float:
    with torch.no_grad():
        x, y = task.batch(n)
        return (model(x).argmax(1) == y).float().mean().item()


def log(msg: str) -> None:
    # One write per line, flushed at once: the lines of several processes don't mix.
    sys.stdout.write(f"[{rpc.get_worker_info().name:>8}] {msg}\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------
# Mode "autograd": forward on the server, distributed backward, DistributedOptimizer
# --------------------------------------------------------------------------


class ParameterServer:
    """Holds the model; trainers call ``forward`` through an RRef to this object."""

    def __init__(self) -> None:
        self.model = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs on the server inside the calling trainer's distributed autograd
        # context: the backward pass of that context reaches self.model.
        #
        # Trainers run concurrently, so another trainer's optimizer step may update
        # the parameters in place between this forward and its backward. Saving the
        # parameters themselves for the backward would then fail ("one of the
        # variables needed for gradient computation has been modified by an inplace
        # operation", as in torch.distributed.rpc). So the forward runs on a snapshot
        # of them (clones, which pass their gradients on to the parameters): each
        # trainer gets the gradient at the weights it saw, i.e. asynchronous SGD.
        fc1, fc2 = self.model.fc1, self.model.fc2
        hidden = F.relu(F.linear(x, fc1.weight.clone(), fc1.bias.clone()))
        return F.linear(hidden, fc2.weight.clone(), fc2.bias.clone())

    def parameter_rrefs(self) -> list[rpc.RRef]:
        # Owner RRefs of the parameters, for the trainers' DistributedOptimizers.
        return [rpc.RRef(p) for p in self.model.parameters()]

    def accuracy(self) -> float:
        return accuracy(self.model, Blobs(seed=1234))


def train_autograd(ps_rref: rpc.RRef, steps: int, batch_size: int, lr: float, log_every: int) -> list[float]:
    """Runs on a trainer (called by the server); returns the trainer's losses."""
    task = Blobs(seed=rpc.get_worker_info().id)
    # One SGD per trainer, created on the server over the server's parameters;
    # the server serializes the steps of all of them.
    opt = DistributedOptimizer(torch.optim.SGD, ps_rref.rpc_sync().parameter_rrefs(), lr=lr)
    losses = []
    for step in range(1, steps + 1):
        x, y = task.batch(batch_size)
        with dist_autograd.context() as context_id:
            logits = ps_rref.rpc_sync().forward(x)  # forward on the server
            loss = F.cross_entropy(logits, y)
            dist_autograd.backward(context_id, [loss])  # gradients go to the server
            opt.step(context_id)  # the server applies them
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            log(f"step {step:4d}/{steps}  loss {loss.item():.4f}")
    return losses


# --------------------------------------------------------------------------
# Mode "batch": trainers send gradients; the server steps once per round
# --------------------------------------------------------------------------


class BatchUpdateParameterServer:
    """Averages the gradients of ``num_trainers`` trainers per step (synchronous SGD)."""

    def __init__(self, num_trainers: int, lr: float) -> None:
        self.model = make_model()
        self.num_trainers = num_trainers
        self.lock = threading.Lock()
        self.future_model = torch.futures.Future()  # completed when this round's step is done
        self.reported = 0
        self.steps = 0
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)

    def get_model(self) -> nn.Module:
        return self.model

    @staticmethod
    @rpc.functions.async_execution
    def update_and_fetch_model(ps_rref: rpc.RRef, grads: list[torch.Tensor]) -> torch.futures.Future:
        # async_execution: the reply to each trainer is this Future's value, sent when
        # it completes; meanwhile no server thread waits for the other trainers.
        self = ps_rref.local_value()
        with self.lock:
            for p, g in zip(self.model.parameters(), grads):
                p.grad += g
            self.reported += 1
            fut = self.future_model
            if self.reported == self.num_trainers:  # the last of this round
                for p in self.model.parameters():
                    p.grad /= self.num_trainers
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
                self.reported = 0
                self.steps += 1
                self.future_model = torch.futures.Future()
                fut.set_result(self.model)  # answers every trainer of the round
        return fut

    def accuracy(self) -> float:
        return accuracy(self.model, Blobs(seed=1234))

    def num_steps(self) -> int:
        return self.steps


def train_batch(ps_rref: rpc.RRef, steps: int, batch_size: int, log_every: int) -> list[float]:
    """Runs on a trainer (called by the server); returns the trainer's losses."""
    task = Blobs(seed=rpc.get_worker_info().id)
    model = ps_rref.rpc_sync().get_model()  # a copy of the server's model
    losses = []
    for step in range(1, steps + 1):
        x, y = task.batch(batch_size)
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # an ordinary local backward
        grads = [p.grad for p in model.parameters()]
        # Blocks until every trainer has sent this round's gradients; returns the new model.
        model = rpc.rpc_sync(ps_rref.owner(), BatchUpdateParameterServer.update_and_fetch_model,
                             args=(ps_rref, grads))
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            log(f"step {step:4d}/{steps}  loss {loss.item():.4f}")
    return losses


# --------------------------------------------------------------------------
# The server drives the run
# --------------------------------------------------------------------------


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def run_server(mode: str, trainers: list[str], args: argparse.Namespace) -> None:
    log(f"mode {mode!r}: {len(trainers)} trainer(s) x {args.steps} steps of batch {args.batch_size}")
    ps = ParameterServer() if mode == "autograd" else BatchUpdateParameterServer(len(trainers), args.lr)
    ps_rref = rpc.RRef(ps)  # trainers reach the server's object through this
    acc_before = ps.accuracy()
    t0 = time.perf_counter()
    if mode == "autograd":
        futs = [rpc.rpc_async(t, train_autograd, args=(ps_rref, args.steps, args.batch_size, args.lr,
                                                      args.log_every))
                for t in trainers]
    else:
        futs = [rpc.rpc_async(t, train_batch, args=(ps_rref, args.steps, args.batch_size, args.log_every))
                for t in trainers]
    losses = torch.futures.wait_all(futs)  # raises if a trainer failed
    elapsed = time.perf_counter() - t0
    # Per-step losses are noisy: compare the means of the first and last few steps.
    k = max(1, min(5, args.steps // 4))
    for name, trainer_losses in zip(trainers, losses):
        log(f"mode {mode!r}: {name} loss {mean(trainer_losses[:k]):.4f} -> {mean(trainer_losses[-k:]):.4f} "
            f"(mean of first/last {k} steps)")
    extra = f", {ps.num_steps()} synchronous steps" if mode == "batch" else ""
    log(f"mode {mode!r}: done in {elapsed:.1f}s{extra}; accuracy of the server's model on "
        f"held-out data: {100 * acc_before:.1f}% -> {100 * ps.accuracy():.1f}%")


def worker(rank: int, world_size: int, addr: str, port: str, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)  # several processes share few cores
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world_size)
    if rank == 0:
        trainers = [f"trainer{r}" for r in range(1, world_size)]
        modes = ["autograd", "batch"] if args.mode == "both" else [args.mode]
        for mode in modes:
            run_server(mode, trainers, args)
    # Trainers have nothing to do but serve the server's calls until everyone shuts down.
    rpc.shutdown()


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["autograd", "batch", "both"], default="both")
    parser.add_argument("--trainers", type=int, default=2, help="number of trainers (default 2)")
    parser.add_argument("--steps", type=int, default=100, help="steps per trainer (default 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--log-every", type=int, default=20, help="log every N steps (default 20)")
    args = parser.parse_args(argv)
    if args.trainers < 1 or args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        parser.error("--trainers, --steps, --batch-size and --log-every must be positive")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT") or free_port()
    world_size = args.trainers + 1
    try:
        # Starts the processes and waits for all of them; if one fails, the others are stopped.
        mp.spawn(worker, args=(world_size, addr, port, args), nprocs=world_size, join=True)
    except Exception as e:  # mp.ProcessRaisedException / ProcessExitedException
        print(f"parameter_server: failed: {e}", file=sys.stderr)
        return 1
    print("parameter_server: all workers shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
