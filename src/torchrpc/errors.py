"""Exceptions raised by torchrpc.

Every error torchrpc raises on its own account is a ``RuntimeError`` subclass, as
torch.distributed.rpc's are, so code that catches ``RuntimeError`` keeps working.
"""
from __future__ import annotations


class RPCError(RuntimeError):
    """Base class of the errors torchrpc raises itself."""


class ProtocolError(RPCError):
    """A message on the wire is malformed: wrong type, size or field values."""


class RemoteError(RPCError):
    """An exception in a remote function whose type could not be rebuilt here."""

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RPCTimeoutError(RPCError, TimeoutError):
    """A call did not complete within its timeout."""


class WorkerUnavailableError(RPCError, ConnectionError):
    """The peer worker died, or the connection to it was lost."""


class SerializationError(RPCError, TypeError):
    """A value could not be pickled or unpickled for an RPC."""


class UnknownWorkerError(RPCError, ValueError):
    """No worker has that name or id."""


class DuplicateNameError(RPCError, ValueError):
    """Two workers of a job have the same name."""
