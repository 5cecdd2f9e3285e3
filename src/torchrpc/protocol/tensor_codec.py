"""Tensors as plain buffers: a metadata buffer (dtype, shape) and one data buffer each.

Used for the tensors of control messages (gradients), which are decoded without
pickle, and by the serializer for the out-of-band buffers of user payloads. A sparse
COO tensor travels as its indices and values, two dense tensors (see ``sparse.py``).
"""
from __future__ import annotations

import struct
from typing import Any, Optional, Sequence

import numpy
import torch

from ..errors import ProtocolError
from . import sparse

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
)
_CODE = {dt: i for i, dt in enumerate(DTYPES)}
_HEAD = struct.Struct("<BBB")  # present, dtype code, ndim
_MAX_NDIM = 64


def raw_buffer(t: torch.Tensor) -> Any:
    """A buffer over the bytes of dense CPU tensor ``t`` (a copy only if not contiguous)."""
    d = t.detach() if t.requires_grad else t  # numpy() refuses a tensor that requires grad
    try:
        # the common case through numpy, whose calls cost a fraction of torch's; numpy()
        # refuses what it cannot show as is (bfloat16, a lazy conjugate or negative bit)
        a = d.numpy()
    except (TypeError, RuntimeError):
        return _raw_buffer_slow(d)
    if not a.flags.c_contiguous:
        a = numpy.ascontiguousarray(a)
    return a.reshape(-1).view(numpy.uint8)


def _raw_buffer_slow(d: torch.Tensor) -> Any:
    if d.is_conj():
        d = d.resolve_conj()
    if d.is_neg():
        d = d.resolve_neg()
    if not d.is_contiguous():
        d = d.contiguous()
    return d.reshape(-1).view(torch.uint8).numpy()


def tensor_from_buffer(buf: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor whose storage is ``buf`` (no copy when ``buf`` is writable)."""
    mv = memoryview(buf)
    if mv.nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    if mv.nbytes % dtype.itemsize:
        raise ValueError(f"a {mv.nbytes}-byte buffer does not hold whole {dtype} elements")
    # as few torch calls as will do: each costs ~15 us when a message finds the caches cold
    t = torch.frombuffer(mv, dtype=dtype)
    return t if len(shape) == 1 and shape[0] * dtype.itemsize == mv.nbytes else t.view(tuple(shape))


#: Tensors smaller than this (bytes) travel packed: a run of consecutive tensors of one dtype and
#: shape shares one data buffer, copied together on the sender (one ``torch.stack``) and split
#: into views on the receiver (one ``unbind``). Gradients of many small sends then cost a few
#: microseconds each instead of a buffer, a copy and several torch calls each. Larger tensors
#: keep a buffer of their own and travel without a copy.
PACK_BELOW = 64 << 10
_ITEMSIZE = tuple(dt.itemsize for dt in DTYPES)
_NONE, _OWN, _PACKED, _SPARSE = 0, 1, 2, 3
#: after a sparse head's shape: u8 sparse_dim, u8 flags (bit 0: coalesced)
_SPARSE_TAIL = struct.Struct("<BB")


def encode_tensors(tensors: Sequence[Optional[torch.Tensor]]) -> list:
    """The buffers for a list of CPU tensors, dense or sparse COO (None allowed): metadata, then data.

    Metadata per tensor: ``u8 kind`` (0 None, 1 a buffer of its own, 2 packed with the tensors
    of the same dtype and shape around it: see ``PACK_BELOW``, 3 sparse COO), ``u8 dtype code``,
    ``u8 ndim``, ``ndim x u64`` shape; a sparse head goes on with ``u8 sparse_dim, u8 flags``
    (bit 0: coalesced) and is followed by the heads of its indices and values, two dense
    tensors like any other (sparse heads do not break runs of packed tensors). Then one data
    buffer per own tensor and per run of packed ones, in order."""
    meta = bytearray()
    data = []
    run: list[torch.Tensor] = []
    run_key: Any = None

    def put(t: Optional[torch.Tensor]) -> None:
        nonlocal run, run_key
        if t is None:
            meta.extend(_HEAD.pack(_NONE, 0, 0))
            key = None
        else:
            shape, dtype = t.shape, t.dtype
            small = t.nbytes < PACK_BELOW
            meta.extend(_HEAD.pack(_PACKED if small else _OWN, _CODE[dtype], len(shape)))
            meta.extend(struct.pack(f"<{len(shape)}Q", *shape))
            key = (dtype, shape) if small else None
        if run and key != run_key:
            data.append(_packed(run))
            run = []
        if key is not None:
            run.append(t)
            run_key = key
        elif t is not None:
            data.append(raw_buffer(t))

    for t in tensors:
        layout = None if t is None else t.layout
        if t is None or (layout is torch.strided and t.is_cpu and t.dtype in _CODE):
            put(t)
        elif layout is torch.sparse_coo and t.is_cpu and t.dtype in _CODE:
            sp = sparse.parts(t)
            meta.extend(_HEAD.pack(_SPARSE, _CODE[t.dtype], t.dim()))
            meta.extend(struct.pack(f"<{t.dim()}Q", *t.shape))
            meta.extend(_SPARSE_TAIL.pack(t.sparse_dim(), 1 if sp.coalesced else 0))
            put(sp.indices)
            put(sp.values)
        else:
            raise TypeError(f"cannot send a {t.layout} {t.dtype} tensor on {t.device} as a gradient")
    if run:
        data.append(_packed(run))
    return [bytes(meta), *data]


def _packed(run: list[torch.Tensor]) -> Any:
    if len(run) == 1:
        return raw_buffer(run[0])
    with torch.no_grad():
        return raw_buffer(torch.stack(run))


def decode_tensors(buffers: Sequence[Any]) -> list[Optional[torch.Tensor]]:
    """Inverse of :func:`encode_tensors`; raises ProtocolError on anything inconsistent."""
    if not buffers:
        raise ProtocolError("tensor list is missing its metadata buffer")
    heads, slots = _read_metadata(memoryview(buffers[0]).cast("B"))
    dense = _decode_dense(heads, buffers[1:])
    out: list[Optional[torch.Tensor]] = []
    for slot in slots:
        if isinstance(slot, int):
            out.append(dense[slot])
            continue
        size, coalesced, at = slot
        try:
            out.append(sparse.build(dense[at], dense[at + 1], size, coalesced))
        except ValueError as e:
            raise ProtocolError(f"bad sparse tensor: {e}") from None
    return out


def _read_head(meta: memoryview, pos: int) -> tuple[Any, int]:
    """One head at ``pos``: None or (kind, dtype code, shape); and the position after it."""
    if pos + _HEAD.size > len(meta):
        raise ProtocolError("truncated tensor metadata")
    kind, code, ndim = _HEAD.unpack_from(meta, pos)
    pos += _HEAD.size
    if kind == _NONE:
        return None, pos
    if kind > _SPARSE or code >= len(DTYPES) or ndim > _MAX_NDIM or pos + 8 * ndim > len(meta):
        raise ProtocolError(f"bad tensor metadata (kind {kind}, dtype code {code}, ndim {ndim})")
    return (kind, code, struct.unpack_from(f"<{ndim}Q", meta, pos)), pos + 8 * ndim


def _read_metadata(meta: memoryview) -> tuple[list[Any], list[Any]]:
    """The dense heads, in order (a sparse tensor's indices and values among them), and one slot
    per tensor: the index of its dense head, or (size, coalesced, index of its indices' head) for
    a sparse one. Checks that the sparse parts' heads fit their tensor."""
    heads: list[Any] = []
    slots: list[Any] = []
    pos = 0
    while pos < len(meta):
        head, pos = _read_head(meta, pos)
        if head is None or head[0] != _SPARSE:
            slots.append(len(heads))
            heads.append(head)
            continue
        _, code, size = head
        if pos + _SPARSE_TAIL.size > len(meta):
            raise ProtocolError("truncated sparse tensor metadata")
        sparse_dim, flags = _SPARSE_TAIL.unpack_from(meta, pos)
        pos += _SPARSE_TAIL.size
        if flags > 1:
            raise ProtocolError(f"bad sparse tensor flags {flags}")
        idx, pos = _read_head(meta, pos) if pos < len(meta) else (None, pos)
        val, pos = _read_head(meta, pos) if pos < len(meta) else (None, pos)
        if idx is None or val is None or idx[0] == _SPARSE or val[0] == _SPARSE:
            raise ProtocolError("a sparse tensor's head must be followed by those of its indices and values")
        if val[1] != code:
            raise ProtocolError(f"sparse tensor of {DTYPES[code]} with values of {DTYPES[val[1]]}")
        try:
            sparse.check_shapes(idx[2], DTYPES[idx[1]], val[2], size, sparse_dim)
        except ValueError as e:
            raise ProtocolError(f"bad sparse tensor: {e}") from None
        slots.append((size, bool(flags), len(heads)))
        heads += [idx, val]
    return heads, slots


def _decode_dense(heads: list[Any], data: Sequence[Any]) -> list[Optional[torch.Tensor]]:
    """The dense tensors of ``heads`` (None or (kind, code, shape)) from their data buffers."""
    out: list[Optional[torch.Tensor]] = []
    used = i = 0
    while i < len(heads):
        head = heads[i]
        if head is None:
            out.append(None)
            i += 1
            continue
        kind, code, shape = head
        n = 1
        if kind == _PACKED:  # the run: the following packed tensors of the same dtype and shape
            while i + n < len(heads) and heads[i + n] == head:
                n += 1
        if used >= len(data):
            raise ProtocolError("tensor metadata names more tensors than buffers")
        buf = data[used]
        used += 1
        numel = 1
        for d in shape:
            numel *= d
        nbytes = memoryview(buf).nbytes
        if nbytes != n * numel * _ITEMSIZE[code]:
            what = "tensor" if n == 1 else f"run of {n} tensors"
            raise ProtocolError(f"{what} of shape {list(shape)} {DTYPES[code]} does not fit its {nbytes}-byte buffer")
        if n == 1:
            out.append(tensor_from_buffer(buf, DTYPES[code], shape))
        else:
            out.extend(tensor_from_buffer(buf, DTYPES[code], (n, *shape)).unbind(0))
        i += n
    if used != len(data):
        raise ProtocolError(f"{len(data) - used} tensor buffers left over")
    return out
