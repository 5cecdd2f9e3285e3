"""torchrpc: remote procedure calls, remote references and distributed autograd for PyTorch.

A drop-in for ``torch.distributed.rpc``: ``import torchrpc as rpc``.
"""
from . import autograd, functions
from .api import debug_info, get_rpc_timeout, get_worker_info, init_rpc, remote, rpc_async, rpc_sync, shutdown
from .errors import (
    ProtocolError,
    RemoteError,
    RPCError,
    RPCTimeoutError,
    SerializationError,
    UnknownWorkerError,
    WorkerUnavailableError,
)
from .options import (
    BackendType,
    RpcBackendOptions,
    TensorPipeRpcBackendOptions,
)
from .rref import RRef
from .worker_info import WorkerInfo

__version__ = "0.1.0"


def is_available() -> bool:
    """Always True: torchrpc needs nothing beyond torch."""
    return True


__all__ = [
    "BackendType", "ProtocolError", "RRef", "SerializationError", "UnknownWorkerError", "autograd", "RPCError", "RPCTimeoutError", "RemoteError", "RpcBackendOptions",
    "TensorPipeRpcBackendOptions", "WorkerInfo", "WorkerUnavailableError", "debug_info", "functions",
    "get_rpc_timeout", "get_worker_info", "init_rpc", "is_available", "remote", "rpc_async", "rpc_sync", "shutdown",
]
