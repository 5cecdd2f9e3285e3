"""Decorators for remote functions, as torch.distributed.rpc.functions."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def async_execution(fn: F) -> F:
    """Mark a remote function that returns a ``torch.futures.Future``.

    The callee replies when that Future completes, with its value, instead of
    replying with the Future itself; the function's thread is free meanwhile.
    Put it innermost under ``@staticmethod`` / ``@classmethod``, as in PyTorch.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper._wrapped_async_rpc_function = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def is_async_function(func: Callable) -> bool:
    """Whether ``func`` was marked with :func:`async_execution`."""
    return getattr(func, "_wrapped_async_rpc_function", None) is not None


def func_name(func: Callable) -> str:
    """A function's name for messages: its qualified name, or its repr."""
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
