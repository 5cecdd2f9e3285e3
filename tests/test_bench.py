"""``python -m torchrpc.bench`` runs end to end on both backends and reports every workload.

Runs the hidden ``--smoke`` mode (1 round, a few iterations per workload, still torchrpc *and*
torch.distributed.rpc, the one-process W5 baseline and the floors) as a subprocess, and checks
the table and the JSON lines. It asserts nothing about speed.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"

EXPECTED = {
    ("W1", "p50_us"), ("W1", "p99_us"), ("W2", "calls_per_s"), ("W3", "gbps_1MiB"), ("W3", "gbps_64MiB"),
    ("W4", "p50_us"), ("W5", "steps_per_s"), ("W6", "p50_us"),
    ("W7", "first_bwd_ms"), ("W7", "fwd_us_100"), ("W7", "bwd_us_100"), ("W8", "bytes_per_rref"),
}


def test_bench_smoke_prints_table_and_json_lines(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "torchrpc.bench", "--smoke", "--only", "W1,W2,W3,W4,W5,W6,W7,W8",
                           "--json", str(out), "--plot", str(plots)],
                          capture_output=True, text=True, timeout=100, env=env)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report

    # The table: one line per workload/metric, both backends, the ratio; the W5 baseline; the floors.
    table = proc.stdout
    for wid in ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8"):
        assert re.search(rf"^{wid} \S", table, re.MULTILINE), f"{wid} missing from the table\n{report}"
    for needle in ("torchrpc/torch", "one process", "torchrpc/one-process", "torch/one-process",
                   "F1 TCP ping-pong", "F2 tensor copy", "F3 TCP ping-pong, polling"):
        assert needle in table, f"{needle!r} missing from the table\n{report}"
    assert "FAILED" not in table, report

    # The JSON lines: the same rows, with every number and the raw per-round values.
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    compare = {(r["workload"], r["key"]): r for r in rows if r["kind"] == "compare"}
    assert set(compare) == EXPECTED
    for key, row in compare.items():
        for backend in ("torchrpc", "torch"):
            s = row[backend]
            assert s["rounds"] == 1 and s["rounds_ok"] == 1, (key, backend, s)
            assert len(s["values"]) == 1 and s["values"][0] > 0, (key, backend, s)
            assert s["median"] > 0 and s["min"] <= s["median"] <= s["max"], (key, backend, s)
        assert row["ratio_torchrpc_over_torch"] == pytest.approx(row["torchrpc"]["median"] / row["torch"]["median"])
        assert row["better"] in ("lower", "higher") and row["verdict"].split()[0] in ("torchrpc", "torch")
    w5 = compare[("W5", "steps_per_s")]
    assert w5["one_process"]["median"] > 0
    assert w5["ratio_torchrpc_over_one_process"] > 0 and w5["ratio_torch_over_one_process"] > 0

    # --plot: W7's picture, a real PNG
    png = plots / "autograd_at_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", report

    floors = [r for r in rows if r["kind"] == "floor"]
    assert {r["workload"] for r in floors} == {"F1", "F2", "F3", "F4", "F5"}
    for row in floors:
        assert row["floor"]["median"] > 0 and row["floor"]["values"], row


#: The shapes' rows in a smoke run: W11 and W13 start one group only (depth 2, 3 trainers)
SHAPES_EXPECTED = {
    ("W9", "p50_us_builtin"), ("W9", "p50_us_python"), ("W10", "p50_us_back"), ("W10", "p50_us_owner3"),
    ("W11", "p50_us_d2"), ("W12", "mb_per_s"), ("W13", "calls_per_s_3"),
    *(("W14", f"p50_us_{size}") for size in ("4KiB", "64KiB", "256KiB", "4MiB", "64MiB")),
}


@pytest.mark.timeout(150)
def test_bench_smoke_runs_the_shapes(tmp_path):
    """W9-W14 on both backends (one process group per world size for W10, W11, W13), their rows
    and ratios, and the ratio plots against fan-in, chain depth and payload size."""
    out = tmp_path / "shapes.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "torchrpc.bench", "--smoke", "--only", "W9,W10,W11,W12,W13,W14",
                           "--no-floors", "--json", str(out), "--plot", str(plots)],
                          capture_output=True, text=True, timeout=140, env=env)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    for wid in ("W9", "W10", "W11", "W12", "W13", "W14"):
        assert re.search(rf"^{wid} \S", proc.stdout, re.MULTILINE), f"{wid} missing from the table\n{report}"
    assert "FAILED" not in proc.stdout, report
    assert not re.search(r"^W[1-8] ", proc.stdout, re.MULTILINE), report   # --only: the shapes only

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "floor"]   # --no-floors
    compare = {(r["workload"], r["key"]): r for r in rows if r["kind"] == "compare"}
    assert set(compare) == SHAPES_EXPECTED
    for key, row in compare.items():
        for backend in ("torchrpc", "torch"):
            s = row[backend]
            assert s["rounds"] == 1 and s["rounds_ok"] == 1 and s["median"] > 0, (key, backend, s)
        assert row["ratio_torchrpc_over_torch"] == pytest.approx(row["torchrpc"]["median"] / row["torch"]["median"])
    assert compare[("W12", "mb_per_s")]["better"] == "higher" and compare[("W14", "p50_us_4KiB")]["better"] == "lower"

    for name in ("ratio_fanin.png", "ratio_chain_depth.png", "ratio_payload.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (name, report)
    assert not (plots / "autograd_at_size.png").exists()   # no W7 in this run
