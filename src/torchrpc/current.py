"""The process's current agent, set by init_rpc and cleared by shutdown."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional

from .errors import RPCError

if TYPE_CHECKING:
    from .agent import Agent

_agent: Optional["Agent"] = None
lock = threading.Lock()


def agent(api: bool = False) -> "Agent":
    """The running agent; a clear error before init_rpc or after shutdown, worded as torch words
    it: ``api`` for the public RPC functions (torch's ``_require_initialized``), else as for RRefs
    and distributed autograd."""
    a = _agent
    if a is None:
        if api:
            raise RPCError("RPC has not been initialized. Call torchrpc.init_rpc first (or RPC has been shut "
                           "down on this worker).")
        raise RPCError("Current RPC agent is not set! Did you initialize the RPC framework (e.g. by calling "
                       "`torchrpc.init_rpc`)? (Or it has been shut down.)")
    if a._closed:
        raise RPCError("RPC has been shut down on this worker; call torchrpc.init_rpc() again to use it")
    return a


def set_agent(a: Optional["Agent"]) -> None:
    global _agent
    _agent = a


def get_agent_or_none() -> Optional["Agent"]:
    return _agent
