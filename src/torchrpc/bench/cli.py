"""The command line of ``python -m torchrpc.bench``."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

import torch

from . import plots, report, runner


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchrpc.bench",
        description="Benchmark torchrpc against torch.distributed.rpc: each workload on both, in alternating "
                    "rounds of fresh processes; prints medians, min-max spreads and torchrpc/torch ratios.")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per backend and workload (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations: each workload a few seconds per round, mostly process start-up")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # testing: a few iterations, 1 round
    p.add_argument("--only", default=None, metavar="W1,W3",
                   help=f"comma-separated workloads to run (of {','.join(runner.WORKLOADS)}); floors still run")
    p.add_argument("--no-floors", action="store_true", help="skip the floors (raw TCP ping-pong, tensor copy)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON lines to PATH")
    p.add_argument("--round-timeout", type=float, default=None, metavar="S",
                   help="seconds before a round is killed and recorded as failed "
                        "(default 180; --quick 60)")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write PNG plots of the run into DIR (W7: microseconds per send against N; "
                        "torchrpc/torch against fan-in trainers (W13), chain depth (W11) and payload size (W14))")
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="keep every process's log in DIR (default: a temporary folder, removed)")
    return p


def provenance() -> dict:
    """What was measured: torch's version and torchrpc's source (commit and uncommitted changes)."""
    import os
    import subprocess

    import torchrpc

    pkg = os.path.dirname(os.path.abspath(torchrpc.__file__))
    info: dict = {"torch": torch.__version__, "torchrpc": torchrpc.__version__, "torchrpc_path": pkg}
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", "-C", pkg, *a], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.rstrip("\n")
        info["torchrpc_commit"] = git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", ".").splitlines()]
        info["torchrpc_uncommitted"] = [c for c in changed if "/bench/" not in c and not c.endswith("/bench")]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke exclude each other")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    rounds = args.rounds if args.rounds is not None else runner.DEFAULT_ROUNDS[mode]
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    timeout = args.round_timeout if args.round_timeout is not None else runner.DEFAULT_ROUND_TIMEOUT[mode]
    if args.only:
        selected = [s.strip().upper() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in selected if s not in runner.WORKLOADS]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; known: {', '.join(runner.WORKLOADS)}")
        selected = [w for w in runner.WORKLOADS if w in selected]
    else:
        selected = list(runner.WORKLOADS)

    torch.set_num_threads(1)
    logdir = args.logs or tempfile.mkdtemp(prefix="torchrpc-bench-")
    try:
        print(f"torchrpc.bench: mode={mode} rounds={rounds} workloads={','.join(selected)} "
              f"round timeout {timeout:.0f} s, torch {torch.__version__}, logs in {logdir}",
              file=sys.stderr, flush=True)
        source = provenance()
        run = runner.run_bench(selected, mode, rounds, timeout, not args.no_floors, logdir)
        run.source = source
        rows = report.build_rows(run)
        report.print_report(run, rows, sys.stdout)
        if args.json:
            report.write_json(rows, args.json)
        if args.plot:
            for path in plots.write_plots(rows, args.plot):
                print(f"plot: {path}", file=sys.stderr)
        sys.stdout.flush()
    finally:
        if not args.logs:
            shutil.rmtree(logdir, ignore_errors=True)
    return 1 if report.failed(run) else 0
