"""A program written for torch.distributed.rpc; only its import line was changed.

Run one process per rank with MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set (as
torchrun does). Rank 0 prints what it saw.
"""
import os

import torch
import torchrpc as rpc
from torchrpc import RRef


class ParameterServer:
    def __init__(self, dim):
        self.weights = torch.zeros(dim)
        self.updates = 0

    def apply(self, grad):
        self.weights -= 0.1 * grad
        self.updates += 1
        return self.updates

    def get(self):
        return self.weights


@rpc.functions.async_execution
def double_later(to, x):
    return rpc.rpc_async(to, torch.mul, args=(x, 2)).then(lambda f: f.wait() + 1)


def check_positive(x):
    if x <= 0:
        raise ValueError(f"{x} is not positive")
    return x


def sum_rref(rref):
    return rref.to_here().sum().item()


def run(rank, world_size):
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=30)
    rpc.init_rpc(f"trainer{rank}" if rank else "ps", rank=rank, world_size=world_size,
                 rpc_backend_options=options)
    if rank == 0:
        me = rpc.get_worker_info()
        trainer = rpc.get_worker_info("trainer1")
        print("workers", me.name, me.id, trainer.name, trainer.id)
        print("rpc_sync", rpc.rpc_sync(trainer, torch.add, args=(torch.ones(3), 2)).tolist())
        futs = [rpc.rpc_async("trainer1", torch.mul, args=(torch.tensor([i]), i)) for i in range(4)]
        print("rpc_async", [f.wait().item() for f in torch.futures.wait_all(futs) and futs])
        ps = rpc.remote("trainer1", ParameterServer, args=(4,))
        for step in range(3):
            n = ps.rpc_sync().apply(torch.ones(4) * (step + 1))
        print("updates", n, "weights", [round(w, 3) for w in ps.rpc_sync().get().tolist()])
        print("to_here", [round(w, 3) for w in ps.remote().get().to_here().tolist()])
        print("owner", ps.owner().name, ps.is_owner(), ps.confirmed_by_owner())
        local = RRef(torch.arange(5.0))
        print("rref arg", rpc.rpc_sync("trainer1", sum_rref, args=(local,)))
        print("async_execution", rpc.rpc_sync("trainer1", double_later, args=("ps", torch.tensor(5))).item())
        try:
            rpc.rpc_sync("trainer1", check_positive, args=(-1,))
        except ValueError as e:
            print("remote error", type(e).__name__, "-1 is not positive" in str(e))
    rpc.shutdown()


if __name__ == "__main__":
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
