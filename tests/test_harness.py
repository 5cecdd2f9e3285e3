"""Self-tests of the multi-process harness (tests/harness.py, tests/conftest.py)."""

from __future__ import annotations

import logging
import operator
import os
import shutil
import signal
import statistics
import sys
import threading
import time

import pytest

import conftest
import harness
from harness import KILLED, WorkerError, WorkerFailed, run_workers, start_workers


# --------------------------------------------------------------------------
# Worker functions (module level: they are pickled by reference)
# --------------------------------------------------------------------------


def _identity(rank, world_size, *args):
    return (rank, world_size, args)


def _report_env(rank, world_size, *names):
    return {n: os.environ.get(n) for n in names}


def _noop(rank, world_size):
    return rank


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError(f"boom from rank {rank}")
    return rank


def _hang_forever_in_worker(rank, world_size):
    while True:
        time.sleep(0.1)


def _rank0_hangs(rank, world_size):
    if rank == 0:
        _hang_forever_in_worker(rank, world_size)
    return rank


def _raise0_others_hang(rank, world_size):
    if rank == 0:
        raise RuntimeError("rank 0 gave up")
    _hang_forever_in_worker(rank, world_size)


def _sleep_then_return(rank, world_size, seconds):
    time.sleep(seconds)
    return rank


def _exit_hard(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def _print_and_fail(rank, world_size):
    print(f"hello-from-stdout-{rank}", flush=True)
    os.write(2, f"raw-fd2-{rank}\n".encode())
    raise KeyError("after printing")


def _print_only(rank, world_size):
    print(f"chatter-{rank}")
    return rank


def _return_unpicklable(rank, world_size):
    return lambda: None


def _return_big(rank, world_size):
    return bytes([rank]) * (8 << 20)


def _leak_non_daemon_thread(rank, world_size):
    threading.Thread(target=time.sleep, args=(3600,), name="leaky", daemon=False).start()
    return rank


def _wait_for_event(rank, world_size, event):
    if rank == 0:
        event.set()
    time.sleep(30)
    return rank


def _return_pid(rank, world_size):
    return os.getpid()


def _log_error_on_rank1(rank, world_size):
    if rank == 1:
        logging.getLogger("torchrpc").error("boom")
        try:
            raise KeyError("inner")
        except KeyError:
            logging.getLogger("torchrpc.child").exception("torchrpc: unhandled error in %s", "f")
    return rank


def _log_error_then_raise(rank, world_size):
    logging.getLogger("torchrpc").error("boom before raising")
    raise ValueError("raised too")


def _log_below_error_and_elsewhere(rank, world_size):
    logging.getLogger("torchrpc").warning("only a warning")
    logging.getLogger("someone.else").error("not torchrpc")
    logging.getLogger("torchrpcx").error("not a child of torchrpc")
    return rank


def _rpc_add(rank, world_size):
    import torch
    import torch.distributed.rpc as rpc

    rpc.init_rpc(
        f"worker{rank}", rank=rank, world_size=world_size,
        rpc_backend_options=rpc.TensorPipeRpcBackendOptions(init_method="env://"),
    )
    try:
        peer = f"worker{(rank + 1) % world_size}"
        out = rpc.rpc_sync(peer, operator.add, args=(torch.full((2,), float(rank)), 1))
        sum3 = rpc.rpc_sync(peer, operator.add, args=(rank, 10))
    finally:
        rpc.shutdown()
    return out.tolist(), sum3


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_pid_gone(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_results_come_back_by_rank():
    out = run_workers(_identity, 4, args=("a", 2))
    assert out == [(r, 4, ("a", 2)) for r in range(4)]


def test_world_size_one():
    assert run_workers(_noop, 1) == [0]


def test_env_vars(monkeypatch):
    monkeypatch.setenv("HARNESS_PARENT_VAR", "from-parent")
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "EXTRA", "HARNESS_PARENT_VAR")
    port = harness.free_port()
    out = run_workers(_report_env, 2, args=names, env={"EXTRA": 7}, port=port)
    for rank, env in enumerate(out):
        assert env == {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "EXTRA": "7",
            "HARNESS_PARENT_VAR": "from-parent",
        }


def test_consecutive_runs_get_different_ports():
    a = run_workers(_report_env, 2, args=("MASTER_PORT",))
    b = run_workers(_report_env, 2, args=("MASTER_PORT",))
    assert a[0] == a[1] and b[0] == b[1]
    assert a[0]["MASTER_PORT"] != b[0]["MASTER_PORT"]
    ports = {harness.free_port() for _ in range(50)}
    assert len(ports) == 50


def test_raising_worker_gives_traceback():
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_raise_on_rank1, 3)
    msg = str(ei.value)
    assert "failed ranks: [1]" in msg
    assert "ValueError" in msg and "boom from rank 1" in msg
    assert "Traceback (most recent call last)" in msg
    assert "_raise_on_rank1" in msg  # the frame is in the traceback
    assert set(ei.value.errors) == {1}
    assert ei.value.results[0] == 0 and ei.value.results[2] == 2
    assert not ei.value.timed_out


def test_hanging_worker_is_killed_with_stack_dump():
    t0 = time.monotonic()
    with start_workers(_rank0_hangs, 2) as g:
        pids = [p.pid for p in g.procs]
        with pytest.raises(WorkerFailed) as ei:
            g.join(timeout=1.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 6, elapsed
    msg = str(ei.value)
    assert ei.value.timed_out
    assert "timed out after 1.5s" in msg
    assert "ranks [0] had not finished" in msg
    # faulthandler dump names the function the worker is stuck in
    assert "Python stacks when killed" in msg
    assert "_hang_forever_in_worker" in msg
    assert ei.value.results[1] == 1  # the finished rank's result is kept
    assert _wait_gone(pids)


def test_run_workers_timeout():
    with pytest.raises(WorkerFailed, match="timed out") as ei:
        run_workers(_hang_forever_in_worker, 2, timeout=1)
    assert set(ei.value.errors) == {0, 1}
    assert str(ei.value).count("_hang_forever_in_worker") >= 2


def test_fail_fast_when_a_rank_fails():
    t0 = time.monotonic()
    with start_workers(_raise0_others_hang, 3) as g:
        with pytest.raises(WorkerFailed) as ei:
            g.join(timeout=60, fail_fast_grace=0.5)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert not ei.value.timed_out
    assert "rank 0 gave up" in msg
    assert "killed 0.5s after rank 0 failed" in msg
    assert ei.value.errors[1].type_name == "Aborted"
    assert "_hang_forever_in_worker" in ei.value.errors[2].stack_dump


def test_kill_rank():
    with start_workers(_sleep_then_return, 2, args=(0.5,)) as g:
        victim = g.procs[1].pid
        g.kill(1)
        assert not g.alive(1)
        assert _pid_gone(victim)
        assert g.join(timeout=30) == [0, KILLED]


def test_kill_after_event():
    ev = harness.get_context().Event()
    with start_workers(_wait_for_event, 2, args=(ev,)) as g:
        assert ev.wait(30)
        g.kill(0)
        g.kill(1)
        assert g.join(timeout=10) == [KILLED, KILLED]
        assert _wait_gone([p.pid for p in g.procs])


def test_context_manager_kills_on_exit():
    with start_workers(_hang_forever_in_worker, 2) as g:
        pids = [p.pid for p in g.procs]
        assert all(g.alive(r) for r in range(2))
    assert all(p.exitcode == -signal.SIGKILL for p in g.procs)
    assert _wait_gone(pids)


def test_worker_dying_without_result():
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_exit_hard, 2)
    err = ei.value.errors[1]
    assert err.type_name == "Died" and err.exitcode == 3
    assert "exited with code 3" in str(ei.value)


def test_check_false_returns_errors():
    with start_workers(_raise_on_rank1, 2) as g:
        out = g.join(timeout=30, check=False)
    assert out[0] == 0
    assert isinstance(out[1], WorkerError) and out[1].type_name == "ValueError"


def test_worker_output_in_failure_and_stderr(capsys):
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_print_and_fail, 2)
    msg = str(ei.value)
    for r in range(2):
        assert f"hello-from-stdout-{r}" in msg and f"raw-fd2-{r}" in msg
    run_workers(_print_only, 2)
    err = capsys.readouterr().err
    assert "----- worker rank 1 output -----" in err and "chatter-1" in err


def test_logged_error_fails_the_run():
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_log_error_on_rank1, 2)
    err = ei.value.errors[1]
    assert set(ei.value.errors) == {1} and ei.value.results[0] == 0
    assert err.type_name == "LoggedError"
    msg = str(ei.value)
    assert "failed ranks: [1]" in msg
    assert "rank 1 logged 2 record(s) at ERROR or above on the 'torchrpc' logger" in msg
    assert "ERROR torchrpc [MainThread]: boom" in err.traceback
    assert "ERROR torchrpc.child [MainThread]: torchrpc: unhandled error in f" in err.traceback
    assert "KeyError: 'inner'" in err.traceback  # the logged exception's traceback is quoted
    assert "allow_errors=True" in msg


def test_logged_error_is_still_printed(capsys):
    """Recording the records does not stop them from reaching the worker's output."""
    assert run_workers(_log_error_on_rank1, 2, allow_errors=True) == [0, 1]
    err = capsys.readouterr().err
    assert "----- worker rank 1 output -----\nboom\n" in err
    assert "torchrpc: unhandled error in f\nTraceback" in err


def test_logged_error_added_to_a_failure():
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_log_error_then_raise, 1)
    err = ei.value.errors[0]
    assert err.type_name == "ValueError"
    assert "raised too" in err.traceback and "boom before raising" in err.traceback


def test_logged_error_opt_out():
    assert run_workers(_log_error_on_rank1, 2, allow_errors=True) == [0, 1]
    with start_workers(_log_error_on_rank1, 2, allow_errors=True) as g:
        assert g.join(timeout=30) == [0, 1]


def test_logged_error_check_false():
    with start_workers(_log_error_on_rank1, 2) as g:
        out = g.join(timeout=30, check=False)
    assert out[0] == 0
    assert isinstance(out[1], WorkerError) and out[1].type_name == "LoggedError"


def test_warnings_and_other_loggers_do_not_fail():
    assert run_workers(_log_below_error_and_elsewhere, 1) == [0]


def test_unpicklable_result():
    with pytest.raises(WorkerFailed, match="UnpicklableResult"):
        run_workers(_return_unpicklable, 1)


def test_big_result():
    out = run_workers(_return_big, 2)
    assert [len(b) for b in out] == [8 << 20] * 2 and out[1][:1] == b"\x01"


def test_leaked_non_daemon_thread_in_worker_is_reported():
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_leak_non_daemon_thread, 1, timeout=1.5)
    msg = str(ei.value)
    assert "returned a result but its process did not exit" in msg
    assert "Thread" in msg  # the dump shows the extra thread


def test_workers_are_fresh_processes_and_not_left_behind():
    pids_a = run_workers(_return_pid, 2)
    pids_b = run_workers(_return_pid, 2)
    assert len(set(pids_a + pids_b)) == 4
    assert _wait_gone(pids_a + pids_b)


def test_leak_check_sees_workers():
    """The conftest scan finds workers (grandchildren via the forkserver)."""
    with start_workers(_hang_forever_in_worker, 2) as g:
        found = conftest._child_processes(harness.infrastructure_pids())
        assert {p.pid for p in g.procs} <= set(found)
    assert not (set(found) & set(conftest._child_processes(harness.infrastructure_pids())))


_LEAKY_TESTS = '''
import subprocess, threading
stop = threading.Event()

def test_leaks_thread():
    threading.Thread(target=stop.wait, args=(30,), name="leaky-thread", daemon=True).start()

def test_leaks_process():
    subprocess.Popen(["sleep", "30"])

def test_clean():
    pass
'''


def test_leak_check_fixture(pytester, monkeypatch):
    monkeypatch.setenv("TORCHRPC_TEST_LEAK_GRACE_S", "0.3")
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "conftest.py"), pytester.path / "conftest.py")
    shutil.copy(os.path.join(here, "harness.py"), pytester.path / "harness.py")
    pytester.makepyfile(test_inner=_LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:timeout")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*threads left running: 'leaky-thread' (daemon=True*",
                                 "*processes left running: pid * (sleep)*"])


_ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, {tests_dir!r})
import harness, test_harness
if __name__ == "__main__":
    g = harness.start_workers(test_harness._hang_forever_in_worker, 2)
    print(*[p.pid for p in g.procs], flush=True)
    time.sleep(60)
"""


def test_workers_die_with_the_test_process(tmp_path):
    """If the test process is SIGKILLed, its workers (and forkserver) go too."""
    import subprocess

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2 and not any(_pid_gone(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert _wait_gone(pids, timeout=10), "workers survived their test process"


def test_rpc_reference_end_to_end():
    """A real 2-worker torch.distributed.rpc job through the harness."""
    out = run_workers(_rpc_add, 2, timeout=60)
    assert out == [([1.0, 1.0], 10), ([2.0, 2.0], 11)]


def test_startup_is_fast():
    run_workers(_noop, 2)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert run_workers(_noop, 2) == [0, 1]
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    sys.stderr.write(f"2-worker trivial run_workers: median {med * 1000:.0f} ms, "
                     f"all {[round(t * 1000) for t in times]} ms\n")
    assert med < 1.0, times
