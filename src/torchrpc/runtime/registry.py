"""The handler registry: for each request type, the one place that says who handles it and how.

Services (calls, RRefs, distributed autograd) register a handler per message type they
serve, with its run policy; the reader looks both up for every request it reads. Replies
(``IS_REPLY``) have no handler: they complete the pending request they answer.
"""
from __future__ import annotations

import enum
from typing import Any, Callable, NamedTuple, Optional

from ..protocol import messages as m


class Run(enum.Enum):
    """How a request is served once its connection's reader has read it."""

    #: by the reader itself, on its thread (no hand-off per message); the reader passes the
    #: reading on before anything that may wait (a request sent, a send that would block) or
    #: when the monitor finds it running long
    INLINE = "inline"
    #: on the reader's thread too, but only after it passed the reading on: for work that
    #: waits on other messages (a discovery round of a backward pass)
    HAND_OFF = "hand off"
    #: as INLINE, for bookkeeping that is quick and never waits (the RRef protocol's): a
    #: thread reading its own reply serves it in passing instead of handing it on
    CONTROL = "control"


#: ``fn(src, msg, tag)``: ``tag`` is the AutogradTag of a request that came inside a
#: distributed autograd context, else None.
HandlerFn = Callable[[int, Any, Optional[m.AutogradTag]], None]


class Handler(NamedTuple):
    fn: HandlerFn
    run: Run


class HandlerRegistry:
    """Request type -> :class:`Handler`."""

    def __init__(self) -> None:
        self._handlers: dict[type, Handler] = {}

    def register(self, msg_type: type, fn: HandlerFn, run: Run) -> None:
        """Serve requests of ``msg_type`` with ``fn``, as ``run`` says."""
        if msg_type.TYPE in m.REPLY_TYPES:
            raise ValueError(f"{msg_type.__name__} is a reply: it completes a pending request, no handler serves it")
        if msg_type in self._handlers:
            raise ValueError(f"{msg_type.__name__} already has a handler")
        self._handlers[msg_type] = Handler(fn, run)

    def get(self, msg_type: type) -> Optional[Handler]:
        return self._handlers.get(msg_type)

    def wrap(self, msg_type: type, wrapper: Callable[[HandlerFn], HandlerFn]) -> None:
        """Replace ``msg_type``'s handler by ``wrapper(handler)``, same policy (tests spy with it)."""
        h = self._handlers[msg_type]
        self._handlers[msg_type] = Handler(wrapper(h.fn), h.run)

    def table(self) -> dict[str, str]:
        """Message type name -> run policy, for people."""
        return {t.TYPE.name: h.run.value for t, h in sorted(self._handlers.items(), key=lambda kv: kv[0].TYPE)}
