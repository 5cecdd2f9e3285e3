"""The names of ``torch.distributed.rpc.internal`` that programs use to find RPCs in a profile.

``_build_rpc_profiling_key(RPCExecMode.ASYNC, "f", "worker0", "worker1")`` is the name of the
event of ``rpc_async("worker1", f)`` made on worker0; its remote events are named
``<that key>#remote_op: <event name on the callee>``.
"""
from __future__ import annotations

from .profiling import RPCExecMode
from .profiling import build_rpc_profiling_key as _build_rpc_profiling_key

__all__ = ["RPCExecMode", "_build_rpc_profiling_key"]
