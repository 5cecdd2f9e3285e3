"""torchrpc.autograd.graph: the cross-worker autograd graph of a context as DOT (and PNG)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import init
from harness import run_workers

pytestmark = pytest.mark.timeout(120)  # above the harness timeout, so a hang gets stack dumps


def scale_then(x, to):
    """On the middle worker: scale, then pass on to the last worker."""
    return rpc.rpc_sync(to, torch.sin, args=(x * 3,))


def _graph(rank, world_size, png):
    init(rank, world_size)
    out = {}
    if rank == 0:
        w = torch.randn(4, requires_grad=True)
        with dist_autograd.context() as cid:
            y = rpc.rpc_sync("worker1", scale_then, args=(w * 2, "worker2"))
            loss = (y * w).sum()
            dist_autograd.backward(cid, [loss], retain_graph=True)
            out["dot"] = dist_autograd.graph(cid, png=png)
    rpc.shutdown()
    return out


def test_graph_has_a_cluster_per_worker_and_send_recv_edges_between_them(tmp_path):
    png = str(tmp_path / "graph.png")
    dot = run_workers(_graph, 3, args=(png,))[0]["dot"]
    assert dot.startswith('digraph "context ') and dot.rstrip().endswith("}")
    for w in ("worker0", "worker1", "worker2"):
        assert f'subgraph "cluster_{w}"' in dot
    assert "MulBackward0" in dot and "SinBackward0" in dot  # worker0/worker1 and worker2's ops
    cross = re.findall(r'"(worker\d):[^"]+" -> "(worker\d):send:\w+" \[style=dashed', dot)
    # backward direction: worker0's recv -> worker2's send, worker2's recv -> worker1's send, ...
    assert {(a, b) for a, b in cross} >= {("worker0", "worker1"), ("worker1", "worker2"), ("worker2", "worker1"),
                                           ("worker1", "worker0")}
    if shutil.which("dot"):
        from PIL import Image

        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 50
