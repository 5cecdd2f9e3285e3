"""Pickling of user payloads, with tensors carried as out-of-band buffers.

``dumps`` pickles with protocol 5. A dense CPU tensor is reduced to a
``PickleBuffer`` over its own memory (no copy when it is contiguous), which
pickle hands to ``buffer_callback`` instead of writing it into the stream; the
transport then sends those buffers as they are. ``loads`` rebuilds each tensor
on the received buffer, which becomes the tensor's storage. A sparse COO tensor
travels as its indices and values tensors (so out of band too), and is checked
when rebuilt.

Types that need the RPC machinery to travel (``RRef``) register a reducer with
:func:`register_reducer`; during ``dumps``/``loads`` they find the agent's
per-message state through :func:`current_session`.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import threading
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import SerializationError
from .protocol.messages import Payload
from .protocol import sparse
from .protocol.tensor_codec import raw_buffer, tensor_from_buffer

_tls = threading.local()

_dispatch_table: dict = dict(copyreg.dispatch_table)


def register_reducer(cls: type, reducer: Callable[[Any], tuple]) -> None:
    """Pickle instances of exactly ``cls`` with ``reducer`` inside RPC payloads."""
    _dispatch_table[cls] = reducer


class Session:
    """Per-message hooks the agent gives :func:`dumps` and :func:`loads`.

    The base class does nothing with tensors and refuses RRefs, which can only
    travel inside an RPC.
    """

    def on_send_tensor(self, tensor: torch.Tensor) -> None:
        """Called for each tensor that requires grad as it is pickled."""

    def on_recv_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Called for each received tensor that requires grad; returns the tensor to use."""
        return tensor


def current_session() -> Any:
    """The object the agent set for the pickling or unpickling now under way, or None."""
    return getattr(_tls, "session", None)


def dumps(obj: Any, session: Any = None) -> Payload:
    """Pickle ``obj`` into a :class:`Payload`; tensors become out-of-band buffers."""
    f = io.BytesIO()
    buffers: list = []
    p = pickle.Pickler(f, protocol=5, buffer_callback=buffers.append)
    p.dispatch_table = _dispatch_table
    prev = getattr(_tls, "session", None)
    _tls.session = session
    try:
        p.dump(obj)
    except Exception as e:
        raise SerializationError(f"cannot pickle {_describe(obj)}: {type(e).__name__}: {e}") from e
    finally:
        _tls.session = prev
    return Payload(f.getbuffer(), buffers)


def loads(payload: Payload, session: Any = None) -> Any:
    """Unpickle a :class:`Payload` made by :func:`dumps`."""
    prev = getattr(_tls, "session", None)
    _tls.session = session
    try:
        return pickle.loads(payload.data, buffers=payload.buffers)
    except (AttributeError, ImportError) as e:  # a function or class this process does not have
        raise SerializationError(f"RPC pickler does not serialize function code. Ensure that UDFs are defined on "
                                 f"both caller and callee modules ({type(e).__name__}: {e})") from e
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError) as e:
        raise SerializationError(f"cannot unpickle payload: {type(e).__name__}: {e}") from e
    finally:
        _tls.session = prev


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


# --- tensors -----------------------------------------------------------------


def _reduce_tensor(t: torch.Tensor) -> tuple:
    # each tensor call here costs a few microseconds when the caches are cold: asked once each
    layout, cpu = t.layout, t.is_cpu
    if layout is torch.sparse_coo and cpu:
        return _reduce_sparse(t)
    if layout is not torch.strided or not cpu or t.is_quantized:
        return t.__reduce_ex__(2)
    strides = None
    if t.is_contiguous() or t.is_conj() or t.is_neg() or min(t.stride(), default=0) < 0:
        raw = raw_buffer(t)
    else:
        # a view (non-contiguous, channels_last, expanded) keeps its strides: the span of storage
        # its elements cover travels, and the receiver makes the same view of it (torch sends
        # the whole storage; the span is all of it that the view can reach)
        strides = tuple(t.stride())
        raw = raw_buffer(t.detach().as_strided((_span(t.shape, strides),), (1,)))
    # Parameter's isinstance runs Python code (its metaclass): a plain tensor skips it
    parameter = type(t) is not torch.Tensor and isinstance(t, torch.nn.Parameter)
    rebuild = _rebuild_parameter if parameter else _rebuild_tensor
    session, requires_grad = getattr(_tls, "session", None), t.requires_grad
    if session is not None and requires_grad:
        session.on_send_tensor(t)
    args = (pickle.PickleBuffer(raw), t.dtype, tuple(t.shape), requires_grad)
    return rebuild, args if strides is None else (*args, strides)


def _span(shape: Sequence[int], strides: Sequence[int]) -> int:
    """How many elements of storage a view of ``shape`` and (non-negative) ``strides`` reaches."""
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0


def _from_buffer(buf: Any, dtype: torch.dtype, shape: tuple, strides: Optional[tuple]) -> torch.Tensor:
    if strides is None:
        return tensor_from_buffer(buf, dtype, shape)
    span = tensor_from_buffer(buf, dtype, (memoryview(buf).nbytes // dtype.itemsize,))
    if len(strides) != len(shape) or min(strides, default=0) < 0 or _span(shape, strides) > span.numel():
        raise ValueError(f"a tensor of shape {list(shape)} and strides {list(strides)} does not fit its "
                         f"{span.numel()}-element buffer")
    return span.as_strided(shape, strides)


def _rebuild_tensor(buf: Any, dtype: torch.dtype, shape: tuple, requires_grad: bool,
                    strides: Optional[tuple] = None) -> torch.Tensor:
    t = _from_buffer(buf, dtype, shape, strides)
    session = getattr(_tls, "session", None)
    if requires_grad:
        t.requires_grad_(True)
        if session is not None:
            t = session.on_recv_tensor(t)
    return t


def _rebuild_parameter(buf: Any, dtype: torch.dtype, shape: tuple, requires_grad: bool,
                       strides: Optional[tuple] = None) -> torch.Tensor:
    p = torch.nn.Parameter(_from_buffer(buf, dtype, shape, strides), requires_grad=requires_grad)
    session = getattr(_tls, "session", None)
    if requires_grad and session is not None:
        return session.on_recv_tensor(p)
    return p


def _reduce_sparse(t: torch.Tensor) -> tuple:
    """A sparse COO tensor as its indices and values (pickled as dense tensors: out of band),
    its size and coalesced flag; recorded in the session like a dense one if it requires grad."""
    session = getattr(_tls, "session", None)
    if session is not None and t.requires_grad:
        session.on_send_tensor(t)
    indices, values, size, coalesced = sparse.parts(t)
    return _rebuild_sparse, (indices, values, size, coalesced, t.requires_grad,
                             isinstance(t, torch.nn.Parameter))


def _rebuild_sparse(indices: Any, values: Any, size: tuple, coalesced: bool, requires_grad: bool,
                    parameter: bool = False) -> torch.Tensor:
    t = sparse.build(indices, values, size, coalesced)  # ValueError if the parts do not fit
    if parameter:
        t = torch.nn.Parameter(t, requires_grad=bool(requires_grad))
    elif requires_grad:
        t.requires_grad_(True)
    session = getattr(_tls, "session", None)
    if requires_grad and session is not None:
        t = session.on_recv_tensor(t)
    return t


register_reducer(torch.Tensor, _reduce_tensor)
register_reducer(torch.nn.Parameter, _reduce_tensor)
