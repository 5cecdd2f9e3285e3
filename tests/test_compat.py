"""A torch.distributed.rpc program runs unchanged under torchrpc, apart from its import line."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from harness import free_port

pytestmark = pytest.mark.timeout(120)

PROGRAM = pathlib.Path(__file__).parent / "programs" / "torch_rpc_program.py"


def run_program(path: pathlib.Path, world_size: int = 2) -> str:
    """Run ``path`` as ``python path`` once per rank, as torchrun would; rank 0's output."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world_size))
        procs.append(subprocess.Popen([sys.executable, str(path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)
            outputs.append(out)
            assert p.returncode == 0, f"{path.name} rank exited {p.returncode}:\n{out}\n{err}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs[0]


def test_torch_program_runs_unchanged_and_matches_torch(tmp_path):
    ours = run_program(PROGRAM)
    source = PROGRAM.read_text()
    assert "import torchrpc as rpc" in source
    torch_version = tmp_path / "torch_program.py"
    torch_version.write_text(source.replace("import torchrpc as rpc", "import torch.distributed.rpc as rpc")
                             .replace("from torchrpc import RRef", "from torch.distributed.rpc import RRef"))
    reference = run_program(torch_version)
    lines = ours.splitlines()
    assert lines == reference.splitlines()
    assert "updates 3 weights [-0.6, -0.6, -0.6, -0.6]" in lines
    assert "async_execution 11" in lines and "remote error ValueError True" in lines
