"""Remote functions and set-up shared by the multi-process tests.

Everything here is module-level so that workers can pickle it by reference.
"""
from __future__ import annotations

import gc
import os
import threading
import time

import torch

import torchrpc as rpc


def name(rank: int) -> str:
    return f"worker{rank}"


def init(rank: int, world_size: int, **options) -> None:
    """init_rpc as worker{rank} with env:// rendezvous (the harness sets MASTER_ADDR/PORT)."""
    opts = rpc.TensorPipeRpcBackendOptions(**options) if options else None
    rpc.init_rpc(name(rank), rank=rank, world_size=world_size, rpc_backend_options=opts)


def torchrpc_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("torchrpc"))


def open_sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


# --- remote functions ------------------------------------------------------------


def add(a, b):
    return a + b


def ident(x):
    return x


def raise_value_error(msg):
    raise ValueError(msg)


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable(msg):
    raise Unpicklable(msg)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def whoami():
    return rpc.get_worker_info().name


def call(to, func, args=()):
    """Nested: from the callee, rpc_sync ``func`` on ``to``."""
    return rpc.rpc_sync(to, func, args=args)


def chain(hops, value):
    """Call through every worker in ``hops``, appending names on the way back."""
    me = rpc.get_worker_info().name
    if not hops:
        return [me]
    return [me] + rpc.rpc_sync(hops[0], chain, args=(hops[1:], value))


def ping_pong(depth, other):
    """Recursion between two workers: each level is a nested rpc_sync back to the other."""
    if depth == 0:
        return 0
    me = rpc.get_worker_info().name
    return 1 + rpc.rpc_sync(other, ping_pong, args=(depth - 1, me))


# --- values whose lifetime the tests observe on their owner -------------------------

_live = 0
_live_cv = threading.Condition()
_created = 0


class Tracked:
    """A value that counts how many instances are alive in this process."""

    def __init__(self, tag="t"):
        global _live, _created
        self.tag = tag
        self.payload = torch.ones(4)
        with _live_cv:
            _live += 1
            _created += 1

    def get(self):
        return self.tag

    def __del__(self):
        global _live
        with _live_cv:
            _live -= 1
            _live_cv.notify_all()


def make_tracked(tag="t"):
    return Tracked(tag)


def live_tracked():
    gc.collect()
    with _live_cv:
        return _live


def wait_live(n, timeout=5.0):
    """Block until exactly ``n`` Tracked are alive here; return the count seen at the end.

    The owner frees values when delete messages arrive, asynchronously: this waits
    on the count (notified by __del__), it does not sleep and hope.
    """
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        with _live_cv:
            if _live == n or time.monotonic() >= deadline:
                return _live
            _live_cv.wait(0.05)


def _arrive_slowly(seconds):
    time.sleep(seconds)
    return "slow"


class SlowToUnpickle:
    """Unpickling this takes ``seconds``: whatever follows it in a payload is seen that much later."""

    def __init__(self, seconds=0.05):
        self.seconds = seconds

    def __reduce__(self):
        return (_arrive_slowly, (self.seconds,))


_held: dict = {}


def hold(key, value):
    """Keep ``value`` (e.g. an RRef) alive on this worker under ``key``."""
    _held[key] = value
    return True


def release(key):
    _held.pop(key, None)
    gc.collect()
    return True


def held(key):
    return _held[key]


def rref_info(rref):
    return {
        "is_owner": rref.is_owner(),
        "owner": rref.owner_name(),
        "confirmed": rref.confirmed_by_owner(),
        "value_tag": (rref.local_value() if rref.is_owner() else rref.to_here()).tag,
    }


def rpc_agent_set():
    import torch.distributed.rpc as trpc

    return trpc._is_current_rpc_agent_set()
