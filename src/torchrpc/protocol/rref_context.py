"""The Remote Reference Protocol as a plain state machine.

This follows PyTorch's design note "Remote Reference Protocol":

* An RRef has one ``OwnerRRef`` (on the worker that holds the value) and any
  number of ``UserRRef`` forks elsewhere, each with its own fork id.
* **G1**: when a ``UserRRef`` is garbage collected, the owner is sent a user
  delete; the owner frees its value once no known fork remains.
* **G2**: a parent that forks an RRef to another worker is kept alive (in
  ``pending_children``) until the child has been confirmed by the owner and says
  so with a child accept.

The context never does I/O. Whatever must be sent goes through the ``emit``
callable given at construction, as ``emit(dest_worker_id, message, on_done)``;
``on_done(error_or_None)`` is called by the agent when the reply (an ack) comes
back. ``emit`` must not block and must not call back into the context
synchronously. Tests drive the context with a list for ``emit``.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any, Callable, NamedTuple, Optional

from ..errors import RPCError, RPCTimeoutError
from .messages import (
    GloballyUniqueId,
    Message,
    RRefChildAccept,
    RRefForkRequest,
    RRefUserDelete,
)

Emit = Callable[[int, Message, Optional[Callable[[Optional[BaseException]], None]]], None]


class ForkData(NamedTuple):
    """What travels in a payload in place of an RRef: enough to rebuild a fork."""

    owner_id: int
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId
    parent_id: int

    def to_tuple(self) -> tuple:
        return (self.owner_id, *self.rref_id, *self.fork_id, self.parent_id)

    @classmethod
    def from_tuple(cls, t: tuple) -> "ForkData":
        if not (isinstance(t, tuple) and len(t) == 6 and all(type(x) is int for x in t)):
            raise RPCError(f"malformed RRef fork data {t!r}")
        worker_ids, local_ids = (t[0], t[1], t[3], t[5]), (t[2], t[4])
        if not (all(0 <= w < 1 << 32 for w in worker_ids) and all(0 <= i < 1 << 64 for i in local_ids)):
            raise RPCError(f"RRef fork data {t!r} has ids out of range")
        return cls(t[0], GloballyUniqueId(t[1], t[2]), GloballyUniqueId(t[3], t[4]), t[5])


class OwnerRRef:
    """The owner's record of an RRef: its id and its value (or error), maybe not yet set.

    Callbacks are dropped once run, so a pending fetch leaves no reference cycle that
    would keep the value alive until the next garbage collection. An owner may hold
    millions of these: an Event to wait on is made only when someone waits before the
    value is set, and all of them share one lock (held for a few instructions at a time).
    """

    __slots__ = ("rref_id", "_done", "_value", "_error", "_callbacks", "_waiter", "__weakref__")
    _lock = threading.Lock()

    def __init__(self, rref_id: GloballyUniqueId) -> None:
        self.rref_id = rref_id
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[["OwnerRRef"], None]] | None = None
        self._waiter: threading.Event | None = None

    def _set(self, value: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._done:
                raise RPCError(f"the value of RRef {self.rref_id} was already set")
            self._value, self._error = value, error
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
            waiter = self._waiter
        if waiter is not None:
            waiter.set()
        for fn in callbacks or ():
            fn(self)

    def set_value(self, value: Any) -> None:
        self._set(value, None)

    def set_error(self, error: BaseException) -> None:
        self._set(None, error)

    def done(self) -> bool:
        return self._done

    def value(self, timeout: float | None = None) -> Any:
        """The value, waiting for it if a remote call is still producing it."""
        if not self._done:
            with self._lock:
                waiter = None
                if not self._done:
                    waiter = self._waiter = self._waiter or threading.Event()
            if waiter is not None and not waiter.wait(timeout):
                raise RPCTimeoutError(f"the value of RRef {self.rref_id} was not ready within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._value

    def add_done_callback(self, fn: Callable[["OwnerRRef"], None]) -> None:
        """Call ``fn(self)`` once the value is set (now, if it is)."""
        with self._lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)


class UserRRef:
    """A fork of an RRef owned elsewhere. Its death (garbage collection) notifies the owner."""

    __slots__ = ("owner_id", "rref_id", "fork_id", "confirmed", "error", "_finalizer", "__weakref__")

    def __init__(self, owner_id: int, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> None:
        self.owner_id = owner_id
        self.rref_id = rref_id
        self.fork_id = fork_id
        self.confirmed = False
        #: Set when creating the value failed to reach the owner (timeout, dead owner).
        self.error: BaseException | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def deleted(self) -> bool:
        """Whether this user's delete was sent or dropped already (shutdown deletes every user)."""
        return self._finalizer is not None and not self._finalizer.alive


class RRefContext:
    """One worker's RRef tables: owned values, known forks, pending users and children."""

    def __init__(self, worker_id: int, emit: Emit) -> None:
        self.worker_id = worker_id
        self._emit = emit
        self._ids = itertools.count(0)  # as torch numbers them: a worker's first RRef is local_id 0
        self._lock = threading.RLock()
        #: owner side: rref id -> OwnerRRef, held while any fork is known
        self.owners: dict[GloballyUniqueId, OwnerRRef] = {}
        #: owner side: rref id -> fork ids the owner knows to be alive
        self.forks: dict[GloballyUniqueId, set[GloballyUniqueId]] = {}
        #: owner side: rref id -> fork ids already deleted, so that a retried (late) fork
        #: request for one of them is not taken for a new fork
        self.deleted_forks: dict[GloballyUniqueId, set[GloballyUniqueId]] = {}
        #: user side: fork id -> UserRRef waiting for the owner's confirmation (kept alive)
        self.pending_users: dict[GloballyUniqueId, UserRRef] = {}
        #: user side: fork id -> waiters for its confirmation, each [forks still awaited, callback]
        self._confirm_waiters: dict[GloballyUniqueId, list[list]] = {}
        #: parent side: child fork id -> parent handle kept alive until the child accepts (G2)
        self.pending_children: dict[GloballyUniqueId, Any] = {}
        #: parent side: child fork id -> the worker it was sent to, where known
        self._child_dest: dict[GloballyUniqueId, int] = {}
        #: user side: confirmed users still alive (weak), for deleting all at shutdown
        self.confirmed_users: "weakref.WeakValueDictionary[GloballyUniqueId, UserRRef]" = (
            weakref.WeakValueDictionary()
        )
        self._closed = False

    def new_id(self) -> GloballyUniqueId:
        return GloballyUniqueId(self.worker_id, next(self._ids))

    # --- creation ---------------------------------------------------------------

    def create_owner(self, value: Any) -> OwnerRRef:
        """An OwnerRRef for a local value (``RRef(value)``); tracked once forked."""
        owner = OwnerRRef(self.new_id())
        owner.set_value(value)
        return owner

    def create_user_for_remote(self, owner_id: int) -> UserRRef:
        """The caller's UserRRef for a ``remote()`` call, pending until the owner's REMOTE_RET."""
        user = UserRRef(owner_id, self.new_id(), self.new_id())
        with self._lock:
            self.pending_users[user.fork_id] = user
        return user

    def get_or_create_owner(self, rref_id: GloballyUniqueId) -> OwnerRRef:
        """The OwnerRRef of ``rref_id``; created empty if a message about it came first.

        An RRef id made by another worker comes from its ``remote()``; until that
        RemoteCall arrives, the RRef id itself stands in the fork set for the
        creator's fork, so that a fork shared early and deleted early cannot
        release the RRef before its creator is known.
        """
        with self._lock:
            owner = self.owners.get(rref_id)
            if owner is None:
                owner = self.owners[rref_id] = OwnerRRef(rref_id)
                if rref_id.created_on != self.worker_id:
                    self.forks.setdefault(rref_id, set()).add(rref_id)
            return owner

    # --- sending an RRef (this worker is the parent) -----------------------------

    def fork_for_send(self, handle: OwnerRRef | UserRRef, dest: Optional[int] = None) -> ForkData:
        """Make a child fork id for sending ``handle`` (to worker ``dest``); record it per G2."""
        fork_id = self.new_id()
        with self._lock:
            if isinstance(handle, OwnerRRef):
                self.owners[handle.rref_id] = handle
                self.forks.setdefault(handle.rref_id, set()).add(fork_id)
                return ForkData(self.worker_id, handle.rref_id, fork_id, self.worker_id)
            if handle.error is not None:
                raise RPCError(f"cannot share an RRef whose creation failed: {handle.error}")
            self.pending_children[fork_id] = handle
            if dest is not None:
                self._child_dest[fork_id] = dest
            return ForkData(handle.owner_id, handle.rref_id, fork_id, self.worker_id)

    def cancel_fork(self, fork: ForkData) -> None:
        """Undo :meth:`fork_for_send` for a message that was never sent."""
        with self._lock:
            if fork.owner_id == self.worker_id:
                self._del_fork(fork.rref_id, fork.fork_id)
            else:
                self.pending_children.pop(fork.fork_id, None)
                self._child_dest.pop(fork.fork_id, None)

    # --- receiving an RRef (this worker is the child) ----------------------------

    def receive_fork(self, fork: ForkData) -> OwnerRRef | UserRRef:
        """The handle for a received fork, sending what the protocol asks for."""
        if fork.owner_id == self.worker_id:
            owner = self.get_or_create_owner(fork.rref_id)
            if fork.parent_id == self.worker_id:
                # sent to ourselves: the fork made at send time has no user behind it
                with self._lock:
                    self._del_fork(fork.rref_id, fork.fork_id)
            else:
                # the owner already holds the value; the parent may let go of its fork
                self._emit(fork.parent_id, RRefChildAccept(0, fork.fork_id), None)
            return owner
        user = UserRRef(fork.owner_id, fork.rref_id, fork.fork_id)
        if fork.parent_id == fork.owner_id:
            # the owner registered this fork when it pickled it
            self._confirm(user)
        else:
            with self._lock:
                self.pending_users[fork.fork_id] = user
            self._emit(
                fork.owner_id,
                RRefForkRequest(0, fork.rref_id, fork.fork_id),
                lambda err, fid=fork.fork_id, parent=fork.parent_id: self.finish_fork_request(fid, parent, err),
            )
        return user

    def finish_fork_request(
        self, fork_id: GloballyUniqueId, parent_id: int, error: BaseException | None = None
    ) -> None:
        """The owner acknowledged our fork: confirm it and tell the parent (G2)."""
        with self._lock:
            user = self.pending_users.pop(fork_id, None)
        if user is None:
            return
        if error is not None:
            user.error = error
            self._settled([fork_id])
            return
        self._confirm(user)
        self._settled([fork_id])
        if parent_id == self.worker_id:
            self.on_child_accept(fork_id)
        else:
            self._emit(parent_id, RRefChildAccept(0, fork_id), None)

    def confirm_remote_user(self, fork_id: GloballyUniqueId, error: BaseException | None = None) -> None:
        """The owner answered our ``remote()``: it knows the fork, even if the call raised.

        ``error`` is set only when the owner may never have seen the call (timeout,
        dead owner); then the user is never confirmed and sends no delete.
        """
        with self._lock:
            user = self.pending_users.pop(fork_id, None)
        if user is None:
            return
        if error is not None:
            user.error = error
        else:
            self._confirm(user)
        self._settled([fork_id])

    def when_settled(self, users: list[UserRRef], fn: Callable[[], None]) -> None:
        """Call ``fn()`` once none of ``users`` waits for its owner's confirmation any more
        (confirmed, or failed): now, on this thread, if none does. torch runs a function whose
        arguments hold RRefs only then, so that ``confirmed_by_owner()`` is true inside it."""
        with self._lock:
            waiting = [u.fork_id for u in users if u.fork_id in self.pending_users]
            if waiting:
                waiter = [len(waiting), fn]
                for fork_id in waiting:
                    self._confirm_waiters.setdefault(fork_id, []).append(waiter)
                return
        fn()

    def _settled(self, fork_ids: list[GloballyUniqueId]) -> None:
        ready = []
        with self._lock:
            for fork_id in fork_ids:
                for waiter in self._confirm_waiters.pop(fork_id, ()):
                    waiter[0] -= 1
                    if waiter[0] == 0:
                        ready.append(waiter[1])
        for fn in ready:
            fn()

    def _confirm(self, user: UserRRef) -> None:
        user.confirmed = True
        with self._lock:
            if self._closed:
                return
            self.confirmed_users[user.fork_id] = user
        user._finalizer = weakref.finalize(
            user, self._emit, user.owner_id, RRefUserDelete(0, user.rref_id, user.fork_id), None
        )
        user._finalizer.atexit = False

    # --- owner-side handlers -------------------------------------------------------

    def on_remote_call(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> OwnerRRef:
        """A ``remote()`` arrived: the OwnerRRef to fill, with the caller's fork registered."""
        with self._lock:
            owner = self.get_or_create_owner(rref_id)
            forks = self.forks.setdefault(rref_id, set())
            forks.add(fork_id)
            forks.discard(rref_id)  # the creator is known now
            return owner

    def on_fork_request(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> None:
        with self._lock:
            if fork_id in self.deleted_forks.get(rref_id, ()):
                return  # a retry of a request whose fork has come and gone
            self.get_or_create_owner(rref_id)
            self.forks.setdefault(rref_id, set()).add(fork_id)

    def on_user_delete(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> OwnerRRef | None:
        """A user fork is gone; returns the OwnerRRef if that was the last fork (now released)."""
        with self._lock:
            return self._del_fork(rref_id, fork_id)

    def on_child_accept(self, fork_id: GloballyUniqueId) -> None:
        with self._lock:
            parent = self.pending_children.pop(fork_id, None)
            self._child_dest.pop(fork_id, None)
        del parent  # may drop the last reference, sending the parent's own delete

    def forget_worker(self, worker_id: int, error: BaseException) -> None:
        """``worker_id`` is gone: stop waiting for what only it could confirm (children sent
        to it, forks it owns), so that shutdown does not wait for it forever."""
        with self._lock:
            gone = [f for f, h in self.pending_children.items()
                    if self._child_dest.get(f) == worker_id or getattr(h, "owner_id", None) == worker_id]
            parents = [self.pending_children.pop(f) for f in gone]
            for f in gone:
                self._child_dest.pop(f, None)
            users = [u for f, u in self.pending_users.items() if u.owner_id == worker_id]
            for u in users:
                del self.pending_users[u.fork_id]
                u.error = error
        self._settled([u.fork_id for u in users])
        del parents, users

    def forget_owner(self, worker_id: int) -> None:
        """``worker_id`` left a dynamic group (or died there): its user RRefs here will never send
        a delete, since a new member may take its id and must not receive deletes of RRefs that
        were never its own."""
        with self._lock:
            users = [u for u in self.confirmed_users.values() if u.owner_id == worker_id]
            for u in users:
                del self.confirmed_users[u.fork_id]
        for user in users:
            if user._finalizer is not None:
                user._finalizer.detach()
                user._finalizer = None  # not deleted: using it says that its owner is gone

    def _del_fork(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> OwnerRRef | None:
        forks = self.forks.get(rref_id)
        if forks is None:
            return None
        forks.discard(fork_id)
        if forks:
            self.deleted_forks.setdefault(rref_id, set()).add(fork_id)
            return None
        del self.forks[rref_id]
        self.deleted_forks.pop(rref_id, None)
        return self.owners.pop(rref_id, None)

    # --- shutdown ----------------------------------------------------------------

    def has_pending(self) -> bool:
        """Whether forks are still waiting for confirmation or child accepts."""
        with self._lock:
            return bool(self.pending_users or self.pending_children)

    def delete_all_users(self) -> None:
        """Send a delete for every live confirmed user now (graceful shutdown)."""
        with self._lock:
            users = list(self.confirmed_users.values())
            self.confirmed_users.clear()
            self._closed = True
        for user in users:
            fin = user._finalizer
            if fin is not None and fin.detach() is not None:
                self._emit(user.owner_id, RRefUserDelete(0, user.rref_id, user.fork_id), None)

    def detach_all(self) -> None:
        """Forget every user without sending anything (non-graceful shutdown)."""
        with self._lock:
            users = list(self.confirmed_users.values())
            self.confirmed_users.clear()
            pending = list(self.pending_users)
            self.pending_users.clear()
            self.pending_children.clear()
            self._closed = True
        for user in users:
            if user._finalizer is not None:
                user._finalizer.detach()
        self._settled(pending)

    def debug_info(self) -> dict[str, int]:
        with self._lock:
            return {
                "num_owner_rrefs": len(self.owners),
                "num_forks": sum(len(v) for v in self.forks.values()),
                "num_pending_users": len(self.pending_users),
                "num_pending_children": len(self.pending_children),
                "num_confirmed_users": len(self.confirmed_users),
            }
