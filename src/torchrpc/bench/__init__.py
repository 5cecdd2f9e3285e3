"""``python -m torchrpc.bench``: torchrpc and torch.distributed.rpc, side by side.

Each workload runs on both libraries in the same run, alternating rounds (torchrpc round 1,
torch round 1, torchrpc round 2, ...), each round in fresh worker processes, and the table
shows the median over rounds, the min-max spread and the torchrpc/torch ratio.

    python -m torchrpc.bench                 # 3 rounds, a few minutes
    python -m torchrpc.bench --quick         # about a minute
    python -m torchrpc.bench --only W1,W5 --rounds 5 --json out.jsonl

Workloads (see :mod:`torchrpc.bench.workloads`): W1 small-call latency, W2 small-call
throughput (64 in flight), W3 tensor round trip (1 MiB, 64 MiB), W4 remote + to_here,
W5 a 2-stage model-parallel training step (3 processes, also against one process),
W6 RRef.backward from a non-owner; floors: raw TCP ping-pong and a 64 MiB tensor copy.
"""
from .cli import main

__all__ = ["main"]
