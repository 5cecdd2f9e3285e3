"""Transports: connections chosen by address scheme behind one narrow interface."""
from .base import Connection, ConnectionClosed, Listener, connect, listen, register_scheme

from . import tcp_setup as _tcp_setup  # noqa: F401  (registers "tcp" and "tls")

__all__ = ["Connection", "ConnectionClosed", "Listener", "connect", "listen", "register_scheme"]
