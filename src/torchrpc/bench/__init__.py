"""``python -m torchrpc.bench``: torchrpc and torch.distributed.rpc, side by side.

Each workload runs on both libraries in the same run, alternating rounds (torchrpc round 1,
torch round 1, torchrpc round 2, ...), each round in fresh worker processes, and the table
shows the median over rounds, the min-max spread and the torchrpc/torch ratio.

    python -m torchrpc.bench                 # 3 rounds, a few minutes
    python -m torchrpc.bench --quick         # a few minutes (mostly process start-up)
    python -m torchrpc.bench --only W1,W5 --rounds 5 --json out.jsonl

Workloads (see :mod:`torchrpc.bench.workloads`): W1 small-call latency, W2 small-call
throughput (64 in flight), W3 tensor round trip (1 MiB, 64 MiB), W4 remote + to_here,
W5 a 2-stage model-parallel training step (3 processes, also against one process),
W6 RRef.backward from a non-owner, W7 distributed autograd at size, W8 owner memory per RRef.
The shapes users run (see :mod:`torchrpc.bench.shapes`): W9 remote of a built-in op, W10
RRef.backward with the gradient flowing back / the loss on the owner (3 procs), W11 a nested
chain of depth 1-4 with backward, W12 a 4-stage pipeline, W13 fan-in of 1/3/7 trainers on one
server, W14 tensor latency from 4 KiB to 64 MiB. Floors: raw TCP ping-pong (blocking and
polling), a 64 MiB tensor copy, and a copy there and back per W14 payload.
"""
from .cli import main

__all__ = ["main"]
