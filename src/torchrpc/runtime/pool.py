"""The thread pool that runs user functions and message handlers."""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("torchrpc")

_tls = threading.local()
_STOP: Any = object()


def in_pool() -> bool:
    """Whether this thread is a pool thread (of any agent's pool)."""
    return getattr(_tls, "in_pool", False)


class _Idle:
    """A parked pool thread: woken by releasing ``wake`` after setting ``item``."""

    __slots__ = ("wake", "item")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.item: Any = None


class Pool:
    """Threads that run queued callables; ``stop`` runs what is queued, then joins.

    Starts ``size`` threads and adds one whenever work is queued while none is idle
    (up to ``max_size``): user functions that block in nested RPCs then cannot
    starve the pool into a deadlock, however deep the nesting.

    Work goes to the thread that went idle last. Keeping work on few threads keeps
    their caches warm and, above all, their malloc arenas (glibc gives each thread
    its own): spread over many threads, a training step's large tensors came from a
    different arena each time, each arena growing and handing its pages back to the
    kernel in turn -- ~2,400 page faults and 10 ms of system time per step on each
    W5 stage worker, a third of its CPU time (docs/performance.md).
    """

    def __init__(self, size: int, name: str, max_size: int = 1024) -> None:
        self._name = name
        self._max = max(size, max_size)
        self._lock = threading.Lock()
        self._work: collections.deque = collections.deque()
        self._idle: list[_Idle] = []  # a stack: the last to park is woken first
        self._starting = 0  # threads spawned that have not looked for work yet
        self.threads: list[threading.Thread] = []
        with self._lock:
            for _ in range(size):
                self._spawn()

    def _spawn(self) -> None:
        self._starting += 1
        t = threading.Thread(target=self._run, name=f"{self._name}-{len(self.threads)}", daemon=True)
        self.threads.append(t)
        t.start()

    def submit(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on a pool thread."""
        with self._lock:
            if self._idle:
                idle = self._idle.pop()
                idle.item = (fn, args)
                idle.wake.release()
                return
            self._work.append((fn, args))
            if len(self._work) > self._starting and len(self.threads) < self._max:
                self._spawn()

    def run_here_or_submit(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` now if this is a pool thread, else queue it for the pool."""
        if getattr(_tls, "in_pool", False):
            fn(*args)
        else:
            self.submit(fn, *args)

    def _run(self) -> None:
        _tls.in_pool = True
        me = _Idle()
        lock, work, idle = self._lock, self._work, self._idle
        with lock:
            self._starting -= 1
        while True:
            with lock:
                item = work.popleft() if work else None
                if item is None:
                    idle.append(me)
            if item is None:
                me.wake.acquire()
                item, me.item = me.item, None
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # a handler bug must not kill the thread
                log.exception("torchrpc: unhandled error in %s", getattr(fn, "__qualname__", fn))
            del item, fn, args

    def stop(self, timeout: float = 10.0) -> None:
        """Run what is queued, then end and join every thread (but the calling one)."""
        with self._lock:
            threads = list(self.threads)
            self._max = 0  # no more growth
            busy = len(threads) - len(self._idle)
            while self._idle:  # nothing is queued while a thread is idle
                idle = self._idle.pop()
                idle.item = _STOP
                idle.wake.release()
            self._work.extend([_STOP] * busy)  # after the queued work
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join(timeout)
