"""Shared fixtures: leak checks after every test.

After each test, fail it if it left behind
  * a new Python thread (daemon or not) in the test process, or
  * a descendant process of the test process (workers are children of the
    forkserver, so the whole process tree is scanned; the forkserver and the
    resource tracker themselves are excluded, their children are not).
Leaks get ~2 s (env TORCHRPC_TEST_LEAK_GRACE_S) to go away on their own.
Leaked processes are SIGKILLed after being reported so they cannot disturb later tests.

New native (non-Python) threads, seen through /proc/self/task, are only
reported as a warning and only with TORCHRPC_TEST_NATIVE_THREADS=1: torch
starts native threads on import and on the first parallel op, which are not
leaks, so by default they would only be noise.

Opt out per test with ``@pytest.mark.allow_leaks``.
The per-test timeout (120 s) comes from pyproject's pytest-timeout setting.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings

import pytest

# Make the in-repo package importable without installing it (src layout).
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

import harness  # noqa: E402

LEAK_GRACE_S = float(os.environ.get("TORCHRPC_TEST_LEAK_GRACE_S", "2.0"))
CHECK_NATIVE_THREADS = os.environ.get("TORCHRPC_TEST_NATIVE_THREADS") == "1"

pytest_plugins = ["pytester"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_leaks: skip the thread/process leak check for this test")


# --------------------------------------------------------------------------
# /proc helpers (psutil is not available)
# --------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, comm) for every visible process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        # "pid (comm) state ppid ..." ; comm may contain spaces and parens.
        lpar, rpar = data.find("("), data.rfind(")")
        comm = data[lpar + 1:rpar]
        fields = data[rpar + 2:].split()
        if len(fields) < 2:
            continue
        table[int(name)] = (int(fields[1]), fields[0], comm)
    return table


def _descendants(root: int, table: dict[int, tuple[int, str, str]]) -> dict[int, str]:
    """Living (non-zombie) descendants of ``root`` -> comm."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _comm) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            stack.append(child)
            if table[child][1] not in ("Z", "X"):
                out[child] = table[child][2]
    return out


def _child_processes(exclude: set[int]) -> dict[int, str]:
    procs = _descendants(os.getpid(), _proc_table())
    return {pid: comm for pid, comm in procs.items() if pid not in exclude}


def _native_thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


# --------------------------------------------------------------------------
# The fixture
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_leaks(request):
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = set(threading.enumerate())
    procs_before = set(_child_processes(set()))
    native_before = _native_thread_ids()

    yield

    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        infra = harness.infrastructure_pids()
        new_threads = [t for t in threading.enumerate()
                       if t not in threads_before and t.is_alive()]
        new_procs = {pid: comm for pid, comm in _child_processes(infra).items()
                     if pid not in procs_before}
        if (not new_threads and not new_procs) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)

    problems = []
    if new_threads:
        problems.append("threads left running: " + ", ".join(
            f"{t.name!r} (daemon={t.daemon}, target={getattr(t, '_target', None)!r})"
            for t in new_threads))
    if new_procs:
        problems.append("processes left running: " + ", ".join(
            f"pid {pid} ({comm})" for pid, comm in sorted(new_procs.items())))
        for pid in new_procs:  # contain the damage
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)

    new_native = (_native_thread_ids() - native_before) if CHECK_NATIVE_THREADS else set()
    if new_native:
        warnings.warn(f"{len(new_native)} new native thread(s) still running after the test "
                      f"(not Python threads; e.g. torch thread pools)", stacklevel=1)
