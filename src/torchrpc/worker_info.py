"""WorkerInfo: a worker's name and id, as torch.distributed.rpc.WorkerInfo."""
from __future__ import annotations

import re

from .errors import RPCError

#: torch's rule for worker names: fewer than 128 characters of ASCII letters, digits, '-', '_', ':'
MAX_NAME_LEN = 128
_NAME = re.compile(r"[A-Za-z0-9_:\-]*")


class WorkerInfo:
    """The name and id of a worker; usable wherever a destination worker is expected."""

    __slots__ = ("name", "id")

    def __init__(self, name: str, id: int) -> None:
        if not isinstance(name, str) or not 0 < len(name) < MAX_NAME_LEN:
            raise RPCError(f"Worker name must be non-empty and shorter than {MAX_NAME_LEN} chars, but got {name!r}")
        if not _NAME.fullmatch(name):
            raise RPCError(f"Worker name must match ^[A-Za-z0-9-_:]*$, but got {name!r}")
        self.name = name
        self.id = id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerInfo) and (self.id, self.name) == (other.id, other.name)

    def __hash__(self) -> int:
        return hash((self.id, self.name))

    def __repr__(self) -> str:
        return f"WorkerInfo(id={self.id}, name={self.name})"

    def __reduce__(self) -> tuple:
        return (WorkerInfo, (self.name, self.id))
