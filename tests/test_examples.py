"""The programs in examples/ run, and do what they say they do (in small configurations).

Each example runs as ``python examples/<name>.py --small-flags``, as a user would run it,
with MASTER_ADDR/MASTER_PORT set to a fresh port; the checks read its printed log.
"""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from harness import free_port

pytestmark = pytest.mark.timeout(180)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUN_TIMEOUT_S = 90


def run_example(name: str, *flags: str) -> str:
    """Run ``examples/<name>.py`` with ``flags``; its stdout. Fails on a non-zero exit or a timeout."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    # Its own session, so that on a timeout the example and its workers go together.
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}.py"), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name}.py {' '.join(flags)} did not finish in {RUN_TIMEOUT_S}s\n"
                    f"--- stdout ---\n{out}\n--- stderr ---\n{err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (f"{name}.py {' '.join(flags)} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{out}\n--- stderr ---\n{err}")
    assert "all workers shut down cleanly" in out, out
    return out


def test_parameter_server():
    trainers, steps = 3, 60
    out = run_example("parameter_server", "--trainers", str(trainers), "--steps", str(steps),
                      "--batch-size", "32", "--log-every", "20")
    for mode in ("autograd", "batch"):
        falls = re.findall(rf"mode '{mode}': (trainer\d) loss ([\d.]+) -> ([\d.]+)", out)
        assert sorted(t for t, _, _ in falls) == [f"trainer{r}" for r in range(1, trainers + 1)], out
        for trainer, first, last in falls:
            assert float(last) < float(first), f"{mode}: {trainer}'s loss did not fall\n{out}"
        before, after = map(float, re.search(rf"mode '{mode}': done .*: ([\d.]+)% -> ([\d.]+)%", out).groups())
        assert after > 70 and after > before + 30, f"{mode}: the server's model did not learn\n{out}"
    # Every trainer logged its progress (from its own process).
    for r in range(1, trainers + 1):
        assert f"[trainer{r}] step   {steps}/{steps}" in out, out
    # Batch mode: one server step per round of all trainers' gradients.
    assert f"{steps} synchronous steps" in out, out


def test_parameter_server_modes_agree_with_one_trainer():
    # With one trainer both modes are plain SGD from the same model on the same batches:
    # distributed autograd + DistributedOptimizer must compute what a local backward
    # + the server's async_execution update do.
    out = run_example("parameter_server", "--trainers", "1", "--steps", "20", "--log-every", "5")
    losses = {mode: [float(x) for x in re.findall(r"\[trainer1\] step +\d+/20 +loss ([\d.]+)", part)]
              for mode, part in zip(("autograd", "batch"), out.split("mode 'batch'", 1))}
    assert len(losses["autograd"]) == len(losses["batch"]) == 4, out
    assert losses["autograd"] == pytest.approx(losses["batch"], abs=2e-4), out


def _pipeline_losses(out: str) -> tuple[list[float], float, float, list[float]]:
    steps = [float(x) for x in re.findall(r"step +\d+/\d+ +loss ([\d.]+)", out)]
    after, before = map(float, re.search(r"loss after training: ([\d.]+) \(was ([\d.]+)\)", out).groups())
    moved = [float(x) for x in re.search(r"stage 1 ([\d.]+), stage 2 ([\d.]+)", out).groups()]
    return steps, before, after, moved


def test_pipeline_parallel():
    flags = ["--steps", "20", "--batch-size", "32", "--log-every", "5"]
    out = run_example("pipeline_parallel", *flags, "--micro-batches", "4")
    assert "in 4 micro-batches" in out, out
    steps, before, after, moved = _pipeline_losses(out)
    assert len(steps) == 4, out
    assert after < 0.75 * before, f"the held-out loss did not fall\n{out}"
    assert steps[-1] < steps[0], out
    # Gradients reached both workers: the backward went through worker2 to worker1.
    assert all(m > 0 for m in moved), out
    # The same training without micro-batches computes the same thing (the mean loss over
    # the concatenated micro-batches is the mean over the batch), up to rounding.
    whole = run_example("pipeline_parallel", *flags, "--micro-batches", "1")
    steps1, before1, after1, _ = _pipeline_losses(whole)
    assert before1 == pytest.approx(before, abs=1e-4)
    assert steps1 == pytest.approx(steps, rel=1e-2, abs=1e-3), (out, whole)
    assert after1 == pytest.approx(after, rel=1e-2, abs=1e-3), (out, whole)


def test_rl_actor_learner():
    episodes, observers = 30, 2
    out = run_example("rl_actor_learner", "--episodes", str(episodes), "--observers", str(observers),
                      "--log-every", "1", "--solved-at", "1000")
    rows = re.findall(r"episode +(\d+)  rewards ([\d ]+?)  running reward +([\d.]+)", out)
    assert [int(n) for n, _, _ in rows] == list(range(1, episodes + 1)), out
    for _, rewards, _ in rows:  # every observer played and reported every episode
        values = [int(r) for r in rewards.split()]
        assert len(values) == observers and all(1 <= r <= 200 for r in values), out
    first, last = map(float, re.search(r"first 10 ([\d.]+), last 10 ([\d.]+)", out).groups())
    # Environments and action sampling are seeded per observer, so runs hardly vary (all
    # identical for 30 episodes in our tries): with the default seed the mean reward per
    # episode goes from about 30 to about 80.
    assert last > first, f"the policy did not improve\n{out}"
