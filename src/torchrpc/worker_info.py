"""WorkerInfo: a worker's name and id, as torch.distributed.rpc.WorkerInfo."""
from __future__ import annotations


class WorkerInfo:
    """The name and id of a worker; usable wherever a destination worker is expected."""

    __slots__ = ("name", "id")

    def __init__(self, name: str, id: int) -> None:
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
