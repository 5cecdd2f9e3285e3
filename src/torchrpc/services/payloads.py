"""User payloads of calls and replies: pickling with the RRef forks and the distributed
autograd sends and recvs they make, and replies that carry a value."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import serialization
from ..protocol.autograd_context import current_context_id
from .autograd import DistAutograd
from ..errors import ProtocolError, SerializationError
from ..functions import func_name
from ..protocol import messages as m
from ..protocol.rref_context import ForkData, OwnerRRef, RRefContext, UserRRef
from ..runtime.endpoint import Endpoint
from ..runtime.pending import ReplyCallback


class SendSession(serialization.Session):
    """Pickling state of one outgoing message: the RRef forks it made, and, inside a
    distributed autograd context, the tensors that require grad (its *send*)."""

    __slots__ = ("ctx", "forks", "context_id", "grad_tensors", "dest")

    def __init__(self, ctx: RRefContext, context_id: Optional[int] = None, dest: Optional[int] = None) -> None:
        self.ctx = ctx
        self.forks: list[ForkData] = []
        self.context_id = context_id
        self.grad_tensors: list[torch.Tensor] = []
        self.dest = dest

    def on_send_tensor(self, tensor: torch.Tensor) -> None:
        if self.context_id is not None:
            self.grad_tensors.append(tensor)

    def fork_rref(self, handle: OwnerRRef | UserRRef) -> ForkData:
        fork = self.ctx.fork_for_send(handle, self.dest)
        self.forks.append(fork)
        return fork

    def cancel(self) -> None:
        """The message was not sent: undo its forks."""
        for fork in self.forks:
            self.ctx.cancel_fork(fork)
        self.forks.clear()


class RecvSession(serialization.Session):
    """Unpickling state of one incoming message: its sender, and the received tensors that
    require grad (its *recv*) when it came inside a context."""

    __slots__ = ("ctx", "src", "recording", "grad_tensors", "world_size", "users")

    def __init__(self, ctx: RRefContext, src: int, recording: bool = False, world_size: int = 1 << 32) -> None:
        self.world_size = world_size
        self.ctx = ctx
        self.src = src
        self.recording = recording
        self.grad_tensors: list[torch.Tensor] = []
        self.users: list[UserRRef] = []  # the user RRefs the message brought

    def on_recv_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.grad_tensors.append(tensor)
        return tensor

    def rref_from_fork(self, fork: ForkData) -> OwnerRRef | UserRRef:
        if fork.owner_id >= self.world_size:
            raise ProtocolError(f"RRef fork names owner {fork.owner_id}, not a worker of this job")
        if fork.parent_id != self.src:
            raise ProtocolError(f"RRef fork names parent {fork.parent_id} but came from worker {self.src}")
        handle = self.ctx.receive_fork(fork)
        if isinstance(handle, UserRRef):
            self.users.append(handle)
        return handle


class Payloads:
    """Pickles and unpickles user payloads for one worker, recording their RRef forks and
    their distributed autograd sends and recvs."""

    def __init__(self, endpoint: Endpoint, rrefs: RRefContext, autograd: DistAutograd, world_size: int) -> None:
        self.endpoint = endpoint
        self.rrefs = rrefs
        self.autograd = autograd
        self.world_size = world_size

    def session(self, dest: Optional[int], context_id: Any = ...) -> SendSession:
        """A SendSession for a message to ``dest`` in ``context_id`` (default: the thread's)."""
        return SendSession(self.rrefs, current_context_id() if context_id is ... else context_id, dest)

    def dumps_call(self, func: Callable, args: tuple, kwargs: dict, session: SendSession, dest: int) -> m.Payload:
        """Pickle a call; a SerializationError naming the function and destination if it cannot be."""
        try:
            return serialization.dumps((func, args, kwargs), session)
        except SerializationError as e:
            session.cancel()
            raise SerializationError(
                f"arguments of {func_name(func)} for worker {self.endpoint.peers.name_of(dest)!r} cannot be sent: {e}"
            ) from e.__cause__

    def tag(self, session: SendSession, dest: int) -> Optional[m.AutogradTag]:
        """Record the message's send (if it carries tensors that require grad) in its context;
        the tag it travels with (None outside a context)."""
        cid = session.context_id
        if cid is None:
            return None
        if session.grad_tensors:
            ag_id = self.autograd.record_send(cid, dest, session.grad_tensors)
            return m.AutogradTag(cid, ag_id, self.autograd.converges(cid))
        self.autograd.touch(cid, dest)
        return m.AutogradTag(cid)

    def loads(self, payload: m.Payload, src: int, tag: Optional[m.AutogradTag],
              users: Optional[list] = None) -> Any:
        """Unpickle a payload from ``src``, recording its recv if it came inside a context; the
        user RRefs it brought are added to ``users``, if given."""
        session = RecvSession(self.rrefs, src, recording=bool(tag and tag.autograd_message_id),
                              world_size=self.world_size)
        value = serialization.loads(payload, session)
        if users is not None:
            users.extend(session.users)
        if tag is not None:
            if tag.autograd_message_id:
                self.autograd.record_recv(tag.context_id, src, tag.autograd_message_id, session.grad_tensors,
                                          tag.converges)
            else:
                self.autograd.touch(tag.context_id, src)
        return value

    def load_call(self, src: int, payload: m.Payload, tag: Optional[m.AutogradTag],
                  users: Optional[list] = None) -> tuple:
        """Unpickle a call's ``(func, args, kwargs)``; a ProtocolError if it is not one."""
        call = self.loads(payload, src, tag, users)
        if not (isinstance(call, tuple) and len(call) == 3 and callable(call[0])
                and isinstance(call[1], tuple) and isinstance(call[2], dict)):
            raise ProtocolError("a call payload must be (callable, args tuple, kwargs dict)")
        return call

    def value_reply(self, fut: torch.futures.Future, dest: int, reply_cls: type) -> ReplyCallback:
        """A reply callback that completes ``fut`` with the unpickled ``reply_cls`` payload or the error."""

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            tag: Optional[m.AutogradTag] = None
            if isinstance(reply, m.ForwardAutograd):
                tag, reply = m.AutogradTag.of(reply), reply.inner
            if error is None:
                if isinstance(reply, reply_cls):
                    if getattr(reply, "remote_ns", 0):  # a profiled call's reply
                        fut._remote_ns = reply.remote_ns  # type: ignore[attr-defined]
                        fut._remote_events = getattr(reply, "events", None)  # type: ignore[attr-defined]
                    try:
                        fut.set_result(self.loads(reply.payload, dest, tag))
                        return
                    except BaseException as e:
                        error = e
                else:
                    error = self.endpoint.remote_error(reply, dest)
            fut.set_exception(error)

        return on_reply

    def reply_value(self, dest: int, msg_id: int, value: Any, reply_cls: type = m.PythonReturn,
                    context_id: Optional[int] = None, remote_ns: int = 0, events: Optional[str] = None) -> None:
        """Reply to request ``msg_id`` with ``value`` pickled (an error reply if it cannot be); with
        ``remote_ns`` (a profiled call's), its run time, and with ``events`` its profiler events."""
        endpoint = self.endpoint
        session = SendSession(self.rrefs, context_id, dest)
        try:
            payload = serialization.dumps(value, session)
        except BaseException as e:
            session.cancel()
            endpoint.reply_error(dest, msg_id, e)
            return
        if not remote_ns:
            reply: m.Message = reply_cls(msg_id, payload)
        elif events is None:
            reply = reply_cls(msg_id, payload, remote_ns)
        else:
            reply = m.ProfiledReturn(msg_id, payload, remote_ns, events)
        tag = self.tag(session, dest)
        if tag is not None:
            reply = tag.wrap(reply)
        if not endpoint.reply(dest, reply):
            session.cancel()  # the forks it made will never be received


def copy_payload(payload: m.Payload) -> m.Payload:
    """A copy of ``payload``'s buffers, as the wire would make."""
    return m.Payload(bytearray(payload.data), [bytearray(b) for b in payload.buffers])
