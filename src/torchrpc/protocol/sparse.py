"""Sparse COO tensors as their parts: indices, values, size and whether they are coalesced.

A sparse tensor travels as its two dense tensors (``indices``: int64 of shape
``(sparse_dim, nnz)``, ``values``: ``(nnz, *size[sparse_dim:])``), in user payloads as
out-of-band buffers and in gradients through the tensor codec. The receiver rebuilds it
with :func:`build`, which checks everything a peer could get wrong (shapes, index range,
a coalesced claim) before torch sees the parts: a malformed tensor is a ``ValueError``,
never a tensor that crashes the worker when used.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch


class SparseParts(NamedTuple):
    """What a sparse COO tensor is made of."""

    indices: torch.Tensor
    values: torch.Tensor
    size: tuple[int, ...]
    coalesced: bool


def is_sparse_coo(t: torch.Tensor) -> bool:
    """Whether ``t`` is a sparse COO tensor on the CPU (the sparse tensors torchrpc carries)."""
    return t.layout is torch.sparse_coo and t.device.type == "cpu"


def parts(t: torch.Tensor) -> SparseParts:
    """The parts of sparse COO tensor ``t``, detached (its indices and values, not copies)."""
    return SparseParts(t._indices().detach(), t._values().detach(), tuple(t.shape), bool(t.is_coalesced()))


def check_shapes(indices_shape: Sequence[int], indices_dtype: torch.dtype, values_shape: Sequence[int],
                 size: Sequence[int], sparse_dim: int) -> None:
    """Raise ValueError unless parts of these shapes can make a sparse tensor of ``size``."""
    if indices_dtype != torch.int64:
        raise ValueError(f"sparse tensor indices must be int64, not {indices_dtype}")
    if len(indices_shape) != 2 or indices_shape[0] != sparse_dim:
        raise ValueError(f"sparse tensor indices of shape {list(indices_shape)} for {sparse_dim} sparse "
                         f"dimensions (expected ({sparse_dim}, nnz))")
    if sparse_dim > len(size):
        raise ValueError(f"sparse tensor of size {list(size)} cannot have {sparse_dim} sparse dimensions")
    expected = [indices_shape[1], *size[sparse_dim:]]
    if list(values_shape) != expected:
        raise ValueError(f"sparse tensor values of shape {list(values_shape)} for indices of shape "
                         f"{list(indices_shape)} and size {list(size)} (expected {expected})")


def build(indices: Any, values: Any, size: Sequence[int], coalesced: bool) -> torch.Tensor:
    """The sparse COO tensor made of these parts; ValueError if they do not make a valid one.

    Checked: types and shapes, every index within ``size`` (torch's ``check_invariants``)
    and, if ``coalesced`` is claimed, that the indices are sorted and unique."""
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ValueError("sparse tensor parts must be tensors")
    if indices.layout is not torch.strided or values.layout is not torch.strided:
        raise ValueError("sparse tensor parts must be dense tensors")
    if indices.requires_grad or values.requires_grad:
        raise ValueError("sparse tensor parts must not require grad (the tensor itself does)")
    if not all(isinstance(d, int) and 0 <= d < (1 << 63) for d in size) or len(size) > 64:
        raise ValueError(f"bad sparse tensor size {list(size)!r}")
    check_shapes(tuple(indices.shape), indices.dtype, tuple(values.shape), tuple(size),
                 indices.shape[0] if indices.dim() == 2 else -1)
    try:
        return torch.sparse_coo_tensor(indices, values, tuple(size), is_coalesced=bool(coalesced),
                                       check_invariants=True)
    except (RuntimeError, ValueError, TypeError, OverflowError, IndexError) as e:
        raise ValueError(f"invalid sparse tensor of size {list(size)}: {e}") from None
