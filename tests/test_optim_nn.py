"""DistributedOptimizer and RemoteModule, and PyTorch's documented end-to-end example."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import init
from harness import free_port, run_workers
from torchrpc.nn import RemoteModule
from torchrpc.optim import DistributedOptimizer

pytestmark = pytest.mark.timeout(120)


def test_pytorch_end_to_end_example_runs_with_only_imports_changed():
    path = pathlib.Path(__file__).parent / "programs" / "dist_autograd_simple.py"
    source = path.read_text()
    assert "import torch.distributed" not in source and "from torch.distributed" not in source
    env = dict(os.environ, MASTER_ADDR="localhost", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def param_value(rref):
    return rref.to_here().detach().clone()


def make_param(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64))


def _sgd_step(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        w1 = rpc.remote("worker1", make_param, args=(1,))
        w2 = rpc.remote("worker2", make_param, args=(2,))
        local = rpc.RRef(make_param(3))
        x = torch.randn(3, 3, dtype=torch.float64)
        before = [param_value(r) for r in (w1, w2, local)]
        with dist_autograd.context() as cid:
            loss = (w1.to_here() @ x).sum() + (w2.to_here() * 2).sum() + (local.local_value() ** 2).sum()
            dist_autograd.backward(cid, [loss])
            opt = DistributedOptimizer(torch.optim.SGD, [w1, w2, local], lr=0.1)
            opt.step(cid)
        after = [param_value(r) for r in (w1, w2, local)]
        # reference: the same step in one process
        ref = [make_param(1), make_param(2), make_param(3)]
        ref_loss = (ref[0] @ x).sum() + (ref[1] * 2).sum() + (ref[2] ** 2).sum()
        ref_loss.backward()
        torch.optim.SGD(ref, lr=0.1).step()
        out["matches"] = all(torch.allclose(a, r.detach()) for a, r in zip(after, ref))
        out["moved"] = all(not torch.equal(a, b) for a, b in zip(after, before))
    rpc.shutdown()
    return out


def test_distributed_optimizer_applies_context_gradients_like_local_sgd():
    out = run_workers(_sgd_step, 3)[0]
    assert out["matches"] and out["moved"]


def ones_param():
    return torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))


def _concurrent_steps(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        p = rpc.remote("worker1", ones_param)
        errors = []

        def train(n):
            try:
                for _ in range(n):
                    with dist_autograd.context() as cid:
                        dist_autograd.backward(cid, [p.to_here().sum()])  # gradient: ones
                        DistributedOptimizer(torch.optim.SGD, [p], lr=1.0).step(cid)
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=train, args=(10,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["errors"] = errors
        out["value"] = param_value(p).tolist()
    rpc.shutdown()
    return out


def test_concurrent_steps_on_the_same_parameters_are_serialized():
    out = run_workers(_concurrent_steps, 2)[0]
    assert out["errors"] == []
    assert out["value"] == [-40.0] * 4  # 4 threads x 10 steps x (-1.0 each), none lost


class Net(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(n, 2).double()

    def forward(self, x):
        return torch.relu(self.lin(x))


def _remote_module(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        remote = RemoteModule("worker1/cpu", Net, args=(5,))
        by_rank = RemoteModule("rank:1", Net, kwargs={"n": 5})
        x = torch.randn(4, 5, dtype=torch.float64)
        local = Net(5)
        out["forward"] = torch.allclose(remote(x), local(x))
        out["forward_async"] = torch.allclose(by_rank.forward_async(x).wait(), local(x))
        params = remote.remote_parameters()
        out["n_params"] = len(params)
        with dist_autograd.context() as cid:
            loss = remote(x).sum()
            dist_autograd.backward(cid, [loss])
            DistributedOptimizer(torch.optim.SGD, params, lr=0.5).step(cid)
        local(x).sum().backward()
        torch.optim.SGD(local.parameters(), lr=0.5).step()
        out["trained_like_local"] = all(torch.allclose(p.to_here(), q.detach())
                                        for p, q in zip(params, local.parameters()))
        out["owner"] = remote.get_module_rref().owner_name()
        try:
            RemoteModule("/cpu", Net, args=(5,))
        except ValueError as e:
            out["bad_device"] = str(e)
    rpc.shutdown()
    return out


def test_remote_module_forward_backward_and_optimizer():
    out = run_workers(_remote_module, 2)[0]
    assert out["forward"] and out["forward_async"]
    assert out["n_params"] == 2
    assert out["trained_like_local"]
    assert out["owner"] == "worker1"
    assert "worker1/cpu" in out["bad_device"]
