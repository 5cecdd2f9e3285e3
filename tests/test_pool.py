"""The agent's thread pool: work goes to the thread that went idle last, the pool grows
when every thread is busy (so nested blocking calls cannot deadlock it), and ``stop`` runs
what was queued before it."""
from __future__ import annotations

import threading
import time

import pytest

from torchrpc.runtime.pool import Pool as _Pool

pytestmark = pytest.mark.timeout(30)


def _run_one(pool, fn):
    """Run ``fn`` in the pool and return its result once its thread has parked again."""
    done = threading.Event()
    out = []
    pool.submit(lambda: (out.append(fn()), done.set()))
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while len(pool._idle) < len(pool.threads):
        assert time.monotonic() < deadline, "the pool's threads did not park"
        time.sleep(0.001)
    return out[0]


def test_sequential_work_stays_on_the_thread_that_went_idle_last():
    pool = _Pool(8, "t-pool")
    try:
        names = [_run_one(pool, lambda: threading.current_thread().name) for _ in range(50)]
        # a FIFO hand-off would cycle through all eight threads
        assert len(set(names[1:])) == 1, names
    finally:
        pool.stop()


def test_grows_when_every_thread_blocks_and_stop_runs_what_was_queued():
    pool = _Pool(1, "t-pool")
    release = threading.Event()
    started = threading.Semaphore(0)
    ran = []

    def blocker(i):
        started.release()
        release.wait(5)
        ran.append(i)

    try:
        for i in range(5):
            pool.submit(blocker, i)
        for _ in range(5):  # all five run at once: the pool grew to hold them
            assert started.acquire(timeout=5)
        assert len(pool.threads) >= 5
        release.set()
    finally:
        for i in range(5, 8):
            pool.submit(ran.append, i)
        pool.stop()
    assert sorted(ran) == list(range(8))
    assert not any(t.is_alive() for t in pool.threads)
