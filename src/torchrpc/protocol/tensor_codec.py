"""Tensors as plain buffers: a metadata buffer (dtype, shape) and one data buffer each.

Used for the tensors of control messages (gradients), which are decoded without
pickle, and by the serializer for the out-of-band buffers of user payloads.
"""
from __future__ import annotations

import struct
from typing import Any, Optional, Sequence

import numpy
import torch

from ..errors import ProtocolError

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
)
_CODE = {dt: i for i, dt in enumerate(DTYPES)}
_HEAD = struct.Struct("<BBB")  # present, dtype code, ndim
_MAX_NDIM = 64


def raw_buffer(t: torch.Tensor) -> Any:
    """A buffer over the bytes of dense CPU tensor ``t`` (a copy only if not contiguous)."""
    d = t.detach()
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
    return torch.frombuffer(mv, dtype=torch.uint8).view(dtype).view(tuple(shape))


def encode_tensors(tensors: Sequence[Optional[torch.Tensor]]) -> list:
    """The buffers for a list of dense CPU tensors (None allowed): metadata, then data."""
    meta = bytearray()
    data = []
    for t in tensors:
        if t is None:
            meta += _HEAD.pack(0, 0, 0)
            continue
        if t.layout is not torch.strided or t.device.type != "cpu" or t.dtype not in _CODE:
            raise TypeError(f"cannot send a {t.layout} {t.dtype} tensor on {t.device} as a gradient")
        meta += _HEAD.pack(1, _CODE[t.dtype], t.dim())
        meta += struct.pack(f"<{t.dim()}Q", *t.shape)
        data.append(raw_buffer(t))
    return [bytes(meta), *data]


def decode_tensors(buffers: Sequence[Any]) -> list[Optional[torch.Tensor]]:
    """Inverse of :func:`encode_tensors`; raises ProtocolError on anything inconsistent."""
    if not buffers:
        raise ProtocolError("tensor list is missing its metadata buffer")
    meta = memoryview(buffers[0]).cast("B")
    data = list(buffers[1:])
    out: list[Optional[torch.Tensor]] = []
    pos = used = 0
    while pos < len(meta):
        if pos + _HEAD.size > len(meta):
            raise ProtocolError("truncated tensor metadata")
        present, code, ndim = _HEAD.unpack_from(meta, pos)
        pos += _HEAD.size
        if not present:
            out.append(None)
            continue
        if code >= len(DTYPES) or ndim > _MAX_NDIM or pos + 8 * ndim > len(meta):
            raise ProtocolError(f"bad tensor metadata (dtype code {code}, ndim {ndim})")
        shape = struct.unpack_from(f"<{ndim}Q", meta, pos)
        pos += 8 * ndim
        if used >= len(data):
            raise ProtocolError("tensor metadata names more tensors than buffers")
        dtype = DTYPES[code]
        numel = 1
        for n in shape:
            numel *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        buf = data[used]
        used += 1
        if memoryview(buf).nbytes != numel * itemsize:
            raise ProtocolError(f"tensor of shape {list(shape)} {dtype} does not fit its {memoryview(buf).nbytes}-byte buffer")
        out.append(tensor_from_buffer(buf, dtype, shape))
    if used != len(data):
        raise ProtocolError(f"{len(data) - used} tensor buffers left over")
    return out
