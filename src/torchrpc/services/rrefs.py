"""The RRef protocol over the wire: the owner's handlers, ``to_here``, and the RRef context's outbox.

The protocol itself (owner and user tables, forks, confirmations) is the sans-I/O
:class:`~torchrpc.protocol.rref_context.RRefContext`; this service feeds it the messages
that arrive and sends the ones it emits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..protocol.autograd_context import current_context_id
from .autograd import DistAutograd
from ..protocol import messages as m
from ..protocol.rref_context import OwnerRRef, RRefContext, UserRRef
from ..runtime.endpoint import Endpoint
from ..runtime.pending import WAITER
from ..runtime.pool import Pool
from ..runtime.registry import HandlerRegistry, Run
from .payloads import Payloads


class Outbox:
    """The RRef context's outbox: sends the control messages it emits, from the pool (never
    inline). User deletes (a UserRRef was collected) are not urgent: they wait for the next
    request to any worker, or for the watchdog's next tick (:meth:`Endpoint.notify_later`)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def __call__(self, dest: int, msg: m.Message, on_done: Optional[Callable[[Optional[BaseException]], None]]) -> None:
        if type(msg) is m.RRefUserDelete and on_done is None:
            self.endpoint.notify_later(dest, msg)
        else:
            self.endpoint.notify_soon(dest, msg, on_done)


class RRefService:
    """Serves RRef requests on the owner; fetches values for users."""

    def __init__(self, endpoint: Endpoint, ctx: RRefContext, payloads: Payloads, autograd: DistAutograd,
                 pool: Pool) -> None:
        self.endpoint = endpoint
        self.ctx = ctx
        self.payloads = payloads
        self.autograd = autograd
        self.pool = pool

    def register(self, registry: HandlerRegistry) -> None:
        registry.register(m.RRefFetchCall, self.handle_fetch, Run.INLINE)
        # the protocol's bookkeeping: quick, never waits
        registry.register(m.RRefUserDelete, self.handle_user_delete, Run.CONTROL)
        registry.register(m.RRefForkRequest, self.handle_fork_request, Run.CONTROL)
        registry.register(m.RRefChildAccept, self.handle_child_accept, Run.CONTROL)

    # --- users --------------------------------------------------------------------

    def fetch(self, user: UserRRef, timeout: float, created: Optional[torch.futures.Future] = None) -> torch.futures.Future:
        """The value of a UserRRef from its owner (``to_here``).

        ``created`` is the Future of the remote() that makes the value: if that
        fails (an error, a timeout), the fetch fails with its error at once.
        """
        endpoint = self.endpoint
        endpoint.check_open()
        timeout = endpoint.timeout(timeout)
        dest = user.owner_id
        fut = endpoint.future(dest, lead=True)
        if user.error is not None:
            fut.set_exception(user.error)
            return fut
        cid = current_context_id()
        if cid is not None:
            self.autograd.touch(cid, dest)
        msg_id = endpoint.request(dest, m.RRefFetchCall(0, user.rref_id), timeout, "RRef.to_here",
                                  self.payloads.value_reply(fut, dest, m.RRefFetchReturn),
                                  None if cid is None else m.AutogradTag(cid), reader=WAITER)
        if created is not None:
            def creation_done(f: torch.futures.Future) -> None:
                try:
                    f.wait()
                except BaseException as e:
                    endpoint.fail(msg_id, e)

            created.add_done_callback(creation_done)
        return fut

    # --- the owner ------------------------------------------------------------------

    def handle_fetch(self, src: int, msg: m.RRefFetchCall, tag: Optional[m.AutogradTag] = None) -> None:
        owner = self.ctx.get_or_create_owner(msg.rref_id)
        cid = tag.context_id if tag else None
        if cid is not None:
            self.autograd.touch(cid, src)

        def ready(o: OwnerRRef) -> None:
            try:
                value = o.value(0)
            except BaseException as e:
                self.endpoint.reply_error(src, msg.msg_id, e)
                return
            self.payloads.reply_value(src, msg.msg_id, value, m.RRefFetchReturn, context_id=cid)

        owner.add_done_callback(lambda o: self.pool.run_here_or_submit(ready, o))

    def handle_user_delete(self, src: int, msg: m.RRefUserDelete, tag: Optional[m.AutogradTag] = None) -> None:
        released = self.ctx.on_user_delete(msg.rref_id, msg.fork_id)
        self.endpoint.reply_ack(src, msg.msg_id)
        del released  # the value goes here, outside any lock

    def handle_fork_request(self, src: int, msg: m.RRefForkRequest, tag: Optional[m.AutogradTag] = None) -> None:
        self.ctx.on_fork_request(msg.rref_id, msg.fork_id)
        self.endpoint.reply_ack(src, msg.msg_id)

    def handle_child_accept(self, src: int, msg: m.RRefChildAccept, tag: Optional[m.AutogradTag] = None) -> None:
        self.ctx.on_child_accept(msg.fork_id)
        self.endpoint.reply_ack(src, msg.msg_id)
