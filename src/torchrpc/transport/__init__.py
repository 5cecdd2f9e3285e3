"""Transports: connections chosen by address scheme behind one narrow interface."""
from .base import Connection, ConnectionClosed, Listener, connect, listen, register_scheme

from . import tcp as _tcp  # noqa: F401  (registers "tcp")

__all__ = ["Connection", "ConnectionClosed", "Listener", "connect", "listen", "register_scheme"]
