"""Where workers meet: a torch.distributed Store for names, ranks, addresses and barriers.

``env://`` reads MASTER_ADDR / MASTER_PORT (and RANK / WORLD_SIZE when not
given), as torchrun sets them; ``tcp://host:port`` names the TCPStore directly;
``file://path`` uses a FileStore. Rank 0 hosts the TCPStore.

Without a world size (none passed, no ``WORLD_SIZE``, or 0) the group is *dynamic*, as in
torch: ranks join and leave a running group (see ``group.py``).
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Optional
from urllib.parse import urlparse

import torch.distributed as dist

from .errors import RPCTimeoutError
from .group import MAX_RANK, claim_kind


@dataclass
class Rendezvous:
    store: dist.Store
    rank: int
    #: None: a dynamic group (ranks join and leave)
    world_size: Optional[int]
    #: the host other workers reach the store at; this worker listens on an address reaching it
    master_host: Optional[str]

    @property
    def dynamic(self) -> bool:
        return self.world_size is None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"init_method env:// needs {name} in the environment, or it passed to init_rpc")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _missing_rank(init_method: str) -> ValueError:
    # both of torch's phrases: "rank parameter missing" (tcp://, file://) and, as env:// says it,
    # "environment variable RANK expected, but not set"
    scheme = urlparse(init_method).scheme or init_method
    return ValueError(f"Error initializing torchrpc using {scheme}:// rendezvous: rank parameter missing, and "
                      "environment variable RANK expected, but not set: pass rank= to init_rpc or set RANK")


def rendezvous(init_method: str, rank: int, world_size: Optional[int], timeout: float) -> Rendezvous:
    """Open the store named by ``init_method``; rank and world size default from the env.

    ``world_size`` None with no ``WORLD_SIZE`` in the environment, or 0, makes a dynamic
    group (``Rendezvous.world_size`` None), whose ranks are in ``[0, 2**15)``."""
    if rank is None or rank < 0:
        if not os.environ.get("RANK"):
            raise _missing_rank(init_method)
        rank = _env_int("RANK")
    if world_size is None and os.environ.get("WORLD_SIZE"):
        world_size = _env_int("WORLD_SIZE")
    if not world_size:  # as torch: no world size is a dynamic group
        world_size = None
        if rank >= MAX_RANK:
            raise ValueError(f"rank {rank} is out of range for a dynamic group: ranks are below {MAX_RANK}")
    elif not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    elif not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    rv = _open(init_method, rank, world_size, timedelta(seconds=timeout))
    claim_kind(rv.store, rv.dynamic)  # at once: a static and a dynamic worker never meet
    return rv


def _open(init_method: str, rank: int, world_size: Optional[int], td: timedelta) -> Rendezvous:
    url = urlparse(init_method)
    if url.scheme == "env":
        host = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if not host or not port:
            raise ValueError("init_method env:// needs MASTER_ADDR and MASTER_PORT in the environment")
        if not port.isdigit():
            raise ValueError(f"MASTER_PORT={port!r} is not a port number")
        return Rendezvous(_tcp_store(host, int(port), rank, world_size, td), rank, world_size, host)
    if url.scheme == "tcp":
        if not url.hostname or not url.port:
            raise ValueError(f"init_method {init_method!r} must look like tcp://host:port")
        return Rendezvous(_tcp_store(url.hostname, url.port, rank, world_size, td), rank, world_size, url.hostname)
    if url.scheme == "file":
        path = url.path or url.netloc
        store = dist.FileStore(path, world_size or -1)
        store.set_timeout(td)
        return Rendezvous(store, rank, world_size, None)
    raise ValueError(f"unsupported init_method {init_method!r}: use env://, tcp://host:port or file://path")


def master_host(init_method: str) -> Optional[str]:
    """The host of the rendezvous ``init_method`` names (None for a file store, or unknown)."""
    url = urlparse(init_method)
    if url.scheme == "env":
        return os.environ.get("MASTER_ADDR") or None
    if url.scheme == "tcp":
        return url.hostname
    return None


def _tcp_store(host: str, port: int, rank: int, world_size: Optional[int], timeout: timedelta) -> dist.Store:
    # multi_tenant: a process group initialized on the same MASTER_ADDR:MASTER_PORT (gloo, before
    # or after init_rpc) shares this process's store server, as torch's init_rpc shares it
    return dist.TCPStore(
        host, port, world_size=None, is_master=(rank == 0), timeout=timeout, wait_for_workers=False,
        multi_tenant=True,
    )


def listen_host(master_host: Optional[str]) -> str:
    """The local address this worker listens on: TORCHRPC_ADDR, else one that routes to the master."""
    explicit = os.environ.get("TORCHRPC_ADDR")
    if explicit:
        return explicit
    if master_host is None:
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(master_host))
    except (OSError, ValueError):
        return "127.0.0.1"
    if addr.is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((str(addr), 9))  # UDP connect sends nothing; it picks the route
            return s.getsockname()[0]
        except OSError:
            return "0.0.0.0"


def publish(store: dist.Store, rank: int, info: dict) -> None:
    store.set(f"worker/{rank}", json.dumps(info))


def gather(store: dist.Store, world_size: int, timeout: float) -> list[dict]:
    """Wait for every rank's published info; return it by rank."""
    keys = [f"worker/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except RuntimeError as e:
        missing = [k for k in keys if not store.check([k])]
        raise RuntimeError(f"rendezvous timed out after {timeout:.0f} s waiting for {missing}: {e}") from e
    return [json.loads(store.get(k)) for k in keys]


def barrier(
    store: dist.Store,
    name: str,
    rank: int,
    ranks: Iterable[int],
    timeout: float,
    alive: Callable[[int], bool] = lambda r: True,
) -> list[int]:
    """Mark ``rank`` arrived at barrier ``name`` and wait for the others still alive.

    Returns the ranks given up on because ``alive`` said they died. Raises
    TimeoutError naming the ranks still missing after ``timeout`` seconds.
    """
    store.set(f"barrier/{name}/{rank}", b"1")
    waiting = [r for r in ranks if r != rank]
    deadline = time.monotonic() + timeout
    delay = 0.001
    gone: list[int] = []
    while waiting:
        waiting = [r for r in waiting if not store.check([f"barrier/{name}/{r}"])]
        for r in [r for r in waiting if not alive(r)]:
            waiting.remove(r)
            gone.append(r)
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise RPCTimeoutError(f"barrier {name!r} timed out after {timeout:.0f} s waiting for ranks {waiting}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return gone
