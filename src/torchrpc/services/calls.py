"""Calls: ``rpc_sync``/``rpc_async`` and ``remote`` on the caller, and serving them on the callee."""
from __future__ import annotations

import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch

from .. import profiling, remote_events, serialization
from ..protocol.autograd_context import current_context_id, use_context
from ..errors import ProtocolError, RPCError
from ..functions import func_name, is_async_function
from ..protocol import messages as m
from ..protocol.rref_context import OwnerRRef, RRefContext
from ..runtime.endpoint import Endpoint
from ..runtime.pending import CLAIM, WAITER
from ..runtime.pool import Pool
from ..runtime.registry import HandlerRegistry, Run
from .payloads import Payloads, copy_payload

Done = Callable[[Any, Optional[BaseException]], None]


class CallService:
    """Runs user functions for peers, and sends this worker's calls."""

    def __init__(self, endpoint: Endpoint, payloads: Payloads, rrefs: RRefContext, pool: Pool) -> None:
        self.endpoint = endpoint
        self.payloads = payloads
        self.rrefs = rrefs
        self.pool = pool
        profiling.install()  # torch's profilers learn to take the events that profiled calls bring back

    def register(self, registry: HandlerRegistry) -> None:
        # user code runs inline on the reader until it waits or runs long (see runtime/reader.py)
        registry.register(m.PythonCall, self.handle_call, Run.INLINE)
        registry.register(m.RemoteCall, self.handle_remote, Run.INLINE)

    # --- the caller -------------------------------------------------------------------

    def call(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> torch.futures.Future:
        """Run ``func(*args, **kwargs)`` on worker ``to``; a Future of its result.

        Under torch.profiler the call is an event on the caller (see :mod:`torchrpc.profiling`).
        """
        dest, timeout = self._target(to, timeout)
        if not profiling.enabled():
            return self._send_call(dest, func, args, kwargs, timeout, 0)
        return profiling.profiled_async(self._event(profiling.RPCExecMode.ASYNC, func, dest), dest,
                                        lambda flags: self._send_call(dest, func, args, kwargs, timeout, flags))

    def call_sync(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> Any:
        """Run ``func(*args, **kwargs)`` on worker ``to`` and return its result."""
        dest, timeout = self._target(to, timeout)
        if not profiling.enabled():
            return self._send_call(dest, func, args, kwargs, timeout, 0, lead=True).wait()
        return profiling.profiled_sync(self._event(profiling.RPCExecMode.SYNC, func, dest), dest,
                                       lambda flags: self._send_call(dest, func, args, kwargs, timeout, flags))

    def _event(self, mode: profiling.RPCExecMode, func: Callable, dest: int) -> str:
        return profiling.rpc_key(mode, func, self.endpoint.name, self.endpoint.peers.name_of(dest))

    def _target(self, to: Any, timeout: float) -> tuple[int, float]:
        """The destination's id and the effective timeout of a call (raises if shut down)."""
        self.endpoint.check_open()
        return self.endpoint.peers.resolve(to).id, self.endpoint.timeout(timeout)

    def _send_call(self, dest: int, func: Callable, args: tuple, kwargs: dict, timeout: float,
                   profiled: int, lead: bool = False) -> torch.futures.Future:
        """Send the call (``profiled``: its ``ProfileFlags``); with ``lead``, the caller waits for
        it at once and reads the reply itself."""
        payloads = self.payloads
        session = payloads.session(dest)
        payload = payloads.dumps_call(func, args, kwargs, session, dest)
        fut = self.endpoint.future(dest, lead)
        try:
            self.endpoint.request(dest, m.PythonCall(0, payload, profiled), timeout, func_name(func),
                                  payloads.value_reply(fut, dest, m.PythonReturn), payloads.tag(session, dest),
                                  reader=WAITER if lead else CLAIM)
        except BaseException:
            session.cancel()
            raise
        return fut

    def remote(self, to: Any, func: Callable, args: tuple, kwargs: dict, timeout: float) -> tuple[Any, torch.futures.Future]:
        """Start ``func`` on ``to`` keeping its result there; (handle, creation future)."""
        endpoint, rrefs = self.endpoint, self.rrefs
        dest, timeout = self._target(to, timeout)
        context_id = current_context_id()
        if dest == endpoint.rank:
            created: torch.futures.Future = torch.futures.Future()
            owner = OwnerRRef(rrefs.new_id())
            self.pool.submit(self._run_into_owner, func, args, kwargs, owner, created, context_id)
            return owner, created
        # the creation is awaited by to_here() or the RRef's future, which read the reply
        created = endpoint.future(dest, lead=True)
        user = rrefs.create_user_for_remote(dest)
        session = self.payloads.session(dest, context_id)
        try:
            payload = self.payloads.dumps_call(func, args, kwargs, session, dest)
        except BaseException:
            rrefs.confirm_remote_user(user.fork_id, RPCError("never sent"))
            raise
        fork_id = user.fork_id

        def on_reply(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if error is not None:
                # timeout or dead owner: it may never have registered our fork
                rrefs.confirm_remote_user(fork_id, error)
                created.set_exception(error)
                return
            rrefs.confirm_remote_user(fork_id)
            if isinstance(reply, m.RemoteReturn):
                created.set_result(True)
            else:
                created.set_exception(endpoint.remote_error(reply, dest))

        try:
            endpoint.request(dest, m.RemoteCall(0, user.rref_id, user.fork_id, payload), timeout, func_name(func),
                             on_reply, self.payloads.tag(session, dest), reader=WAITER)
        except BaseException as e:
            session.cancel()
            rrefs.confirm_remote_user(fork_id, e)
            raise
        return user, created

    def _run_into_owner(self, func: Callable, args: tuple, kwargs: dict, owner: OwnerRRef,
                        created: torch.futures.Future, context_id: Optional[int]) -> None:
        """remote() to ourselves: the value lives here, so there is no user RRef and no message;
        the call still goes through pickle (value semantics) and is recorded like any."""
        payloads, me = self.payloads, self.endpoint.rank
        try:
            session = payloads.session(None, context_id)
            payload = serialization.dumps((func, args, kwargs), session)
            func, args, kwargs = payloads.loads(copy_payload(payload), me, payloads.tag(session, me))
            with use_context(context_id):
                self._run_user(func, args, kwargs, lambda v, e: _fill_owner(owner, v, e, created))
        except BaseException as e:
            _fill_owner(owner, None, e, created)

    # --- the callee -------------------------------------------------------------------

    def _run_user(self, func: Callable, args: tuple, kwargs: dict, done: Done) -> None:
        """Run a user function; ``done(value, error)`` once it (or its Future, if async) finishes."""
        try:
            result = func(*args, **kwargs)
        except BaseException as e:
            self._report(e)
            done(None, e)
            return
        if not is_async_function(func):
            done(result, None)
            return
        if not isinstance(result, torch._C.Future):  # Future.then() returns the C base class
            done(None, TypeError(f"async_execution function {func_name(func)} must return a "
                                 f"torch.futures.Future, not {type(result).__name__}"))
            return

        def finished(f: torch.futures.Future) -> None:
            try:
                value = f.wait()
            except BaseException as e:
                self._report(e)
                self.pool.run_here_or_submit(done, None, e)
                return
            self.pool.run_here_or_submit(done, value, None)

        result.add_done_callback(finished)

    def _report(self, e: BaseException) -> None:
        """A user function failed: say so on this worker's stderr, as torch does (the caller gets
        the exception too)."""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        print(f"On {self.endpoint.peers.me!r}:\n{e!r}\n{tb}", file=sys.stderr, flush=True)

    def _run_call(self, src: int, payload: m.Payload, tag: Optional[m.AutogradTag], done: Done,
                  wrap: Optional[Callable[[Callable], Callable]] = None) -> None:
        """Unpickle and run a call's function (``wrap(func)``, if given) inside the caller's
        context; ``done`` when it finishes."""
        users: list = []
        try:
            func, args, kwargs = self.payloads.load_call(src, payload, tag, users)
        except BaseException as e:
            done(None, e)
            return
        if wrap is not None:
            func = wrap(func)
        cid = tag.context_id if tag else None

        def run() -> None:
            with use_context(cid):  # the callee runs inside the caller's context
                self._run_user(func, args, kwargs, done)

        # as in torch, the function runs once the owners of the RRefs it received have confirmed
        # them (confirmed_by_owner() is true inside it); until then no thread waits
        if users:
            self.rrefs.when_settled(users, run)
        else:
            run()

    def handle_call(self, src: int, msg: m.PythonCall, tag: Optional[m.AutogradTag] = None) -> None:
        if msg.profile:
            self._handle_profiled_call(src, msg, tag)
            return
        cid = tag.context_id if tag else None

        def done(value: Any, error: Optional[BaseException]) -> None:
            if error is not None:
                self.endpoint.reply_error(src, msg.msg_id, error)
            else:
                self.payloads.reply_value(src, msg.msg_id, value, context_id=cid)

        self._run_call(src, msg.payload, tag, done)

    def _handle_profiled_call(self, src: int, msg: m.PythonCall, tag: Optional[m.AutogradTag]) -> None:
        """A call from a profiled caller: the reply says how long the function ran and, if asked,
        brings the events of the function's run under torch's profiler (see remote_events)."""
        cid = tag.context_id if tag else None
        capture = remote_events.Capture(msg.profile) if msg.profile & m.ProfileFlags.EVENTS else None
        started = time.perf_counter_ns()

        def done(value: Any, error: Optional[BaseException]) -> None:
            if error is not None:
                self.endpoint.reply_error(src, msg.msg_id, error)
            else:
                ran = max(1, time.perf_counter_ns() - started)
                self.payloads.reply_value(src, msg.msg_id, value, context_id=cid, remote_ns=ran,
                                          events=capture.encode() if capture else None)

        self._run_call(src, msg.payload, tag, done, capture.wrap if capture else None)

    def handle_remote(self, src: int, msg: m.RemoteCall, tag: Optional[m.AutogradTag] = None) -> None:
        endpoint = self.endpoint
        if msg.fork_id.created_on != src or msg.rref_id.created_on != src:
            endpoint.reply_error(src, msg.msg_id, ProtocolError("remote call ids must be created by the caller"))
            return
        owner = self.rrefs.on_remote_call(msg.rref_id, msg.fork_id)

        def done(value: Any, error: Optional[BaseException]) -> None:
            if owner.done():
                error = error or ProtocolError(f"RRef {msg.rref_id} was already created")
            elif error is not None:
                owner.set_error(error)
            else:
                owner.set_value(value)
            if error is not None:
                endpoint.reply_error(src, msg.msg_id, error)
            else:
                endpoint.reply(src, m.RemoteReturn(msg.msg_id, msg.rref_id, msg.fork_id))

        self._run_call(src, msg.payload, tag, done)


def _fill_owner(owner: OwnerRRef, value: Any, error: Optional[BaseException], created: torch.futures.Future) -> None:
    if error is not None:
        owner.set_error(error)
        created.set_exception(error)
    else:
        owner.set_value(value)
        created.set_result(True)
