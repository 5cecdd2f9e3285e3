"""Dynamic membership: joining a running group, admitting the members that join, leaving.

``init_rpc`` without a world size makes a dynamic group, as in torch 2.13. The group's record
(members, the lock that serializes joins and leaves) is in the store (``group.py``); this
service does the rest:

* **joining** (:meth:`Membership.join`, under the lock): check that the rank and the name are
  free, say who is joining, connect to every member (each connection authenticated as at
  start-up), then send each a ``MEMBERSHIP`` (joined) and wait for the acks: once ``init_rpc``
  returns, every member knows the new one by name;
* **admitting** (:meth:`Membership.admit`, on the acceptor of every member): a connection whose
  proven identity is the member the store says is joining;
* **leaving** (:meth:`Membership.leave`, under the lock): send each member a ``MEMBERSHIP``
  (leaving); a member forgets the name at once (no new calls), and acks once none of its own
  requests to the leaver waits for a reply. The leaver then finishes its own work (the agent's
  part: RRef deletes and their acks), removes itself from the record and closes; its peers
  take the closing connection for a departure, not a failure;
* **rank 0**, which hosts the store, leaves last (:meth:`Membership.close_group`): it waits
  until every other member has left and no rank is still arriving, then closes the group.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from ..errors import DuplicateNameError, ProtocolError, RPCError, RPCTimeoutError
from ..group import LINGER, GroupRecord
from ..protocol import messages as m
from ..runtime.endpoint import Endpoint
from ..runtime.registry import HandlerRegistry, Run
from ..transport import Connection

log = logging.getLogger("torchrpc")

#: ``connect(rank, {"name", "address"}, timeout)``: an authenticated connection to a member.
Connect = Callable[[int, dict, float], Connection]

#: how long one attempt to reach a member may take before the joiner looks whether a peer saw
#: it die (then it skips it) and tries again
_CONNECT_SLICE = 3.0


class Membership:
    """One worker's part in its dynamic group."""

    def __init__(self, endpoint: Endpoint, record: GroupRecord, address: str, startup_timeout: float) -> None:
        self.endpoint = endpoint
        self.peers = endpoint.peers
        self.record = record
        self.rank = endpoint.rank
        self.name = endpoint.name
        self.address = address
        self.startup_timeout = startup_timeout
        self.addresses: dict[int, str] = {}  # member -> where it listens (names its incarnation)
        self.started = time.monotonic()

    def register(self, registry: HandlerRegistry) -> None:
        registry.register(m.Membership, self.handle, Run.HAND_OFF)

    # --- joining --------------------------------------------------------------------

    def join(self, connect: Connect, add: Callable[[int, Connection], None], deadline: float) -> None:
        """Join the group: under the lock, connect to every member and have each ack."""
        self.peers.dynamic = True
        self.peers.add_worker(self.rank, self.name)
        self.record.arrive(1)
        try:
            self.record.lock("join", deadline, hold=max(0.0, deadline - time.monotonic()) + 30)
            try:
                self._join(connect, add, deadline)
            finally:
                self.record.unlock()
        finally:
            try:
                self.record.arrive(-1)
            except RuntimeError as e:  # the store is gone: the error that matters is raised already
                log.debug("torchrpc %s: could not count out of the arrivals: %s", self.name, e)

    def _join(self, connect: Connect, add: Callable[[int, Connection], None], deadline: float) -> None:
        members = self.record.members()
        for r, info in list(members.items()):
            if self.record.is_dead(r, info["address"]):
                log.info("torchrpc %s: skipping member %r (rank %d), which a peer saw die", self.name,
                         info["name"], r)
                del members[r]
        if self.rank in members:
            raise RPCError(f"RPC worker id {self.rank} is not unique: worker {members[self.rank]['name']!r} has it "
                           f"already, so {self.name!r} cannot join with it")
        for r, info in members.items():
            if info["name"] == self.name:
                raise DuplicateNameError(f"RPC worker name {self.name!r} is not unique: worker {r} has it already, "
                                         f"so worker {self.rank} cannot join with it")
        me = {"name": self.name, "address": self.address}
        self.record.announce_joining({"rank": self.rank, **me})
        for r, info in sorted(members.items()):
            conn = self._reach(connect, r, info, deadline)
            if conn is None:
                del members[r]
                continue
            self.peers.add_worker(r, info["name"])
            self.addresses[r] = info["address"]
            add(r, conn)
        acks = [(r, self.endpoint.control(r, m.Membership(0, self.rank, True))) for r in sorted(members)]
        for r, fut in acks:
            fut.wait()
        members[self.rank] = me
        self.record.set_members(members)
        self.record.announce_joining(None)

    def _reach(self, connect: Connect, rank: int, info: dict, deadline: float) -> Optional[Connection]:
        """A connection to member ``rank``, or None if a peer saw it die meanwhile."""
        while True:
            try:
                return connect(rank, info, max(0.1, min(_CONNECT_SLICE, deadline - time.monotonic())))
            except ProtocolError:
                raise
            except RPCError:
                if self.record.is_dead(rank, info["address"]):
                    log.info("torchrpc %s: skipping member %r (rank %d), which a peer saw die", self.name,
                             info["name"], rank)
                    return None
                if time.monotonic() >= deadline:
                    raise

    def admit(self, hello: m.Hello) -> int:
        """The acceptor's check of a connection (its identity proven by the handshake): it must be
        the member joining now, per the store, with a free rank and name. Its rank."""
        peer = hello.worker_id
        joining = self.record.joining()
        if (joining.get("rank"), joining.get("name"), joining.get("address")) != (peer, hello.name, hello.address):
            raise ProtocolError(f"unexpected HELLO from {hello.name!r} claiming id {peer}: the member joining the "
                                f"group now is {joining or 'nobody'}")
        if peer in self.peers.leaving:
            self.peers.wait_gone(peer, 5.0)  # the rank's previous member is closing its connections
        if peer in self.peers.conns:
            raise ProtocolError(f"worker {hello.name!r} (id {peer}) is already connected")
        self.peers.add_worker(peer, hello.name)
        self.addresses[peer] = hello.address
        return peer

    # --- what members are told --------------------------------------------------------

    def handle(self, src: int, msg: m.Membership, tag: Optional[m.AutogradTag] = None) -> None:
        """A member joined (ack once it is known here) or leaves (forget its name; ack once no
        request of this worker to it waits for a reply)."""
        try:
            if msg.worker_id != src:
                raise ProtocolError(f"worker {src} sent a MEMBERSHIP update for worker {msg.worker_id}")
            if msg.joined:
                self.peers.resolve(src)
            else:
                self.peers.depart(src)
                delay = 0.001
                while self.endpoint.pending.expects(src):
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
        except Exception as e:
            self.endpoint.reply_error(src, msg.msg_id, e)
            return
        self.endpoint.reply_ack(src, msg.msg_id)

    def lost(self, peer: int) -> None:
        """``peer`` died (it did not leave): record it, so that joiners skip it."""
        address = self.addresses.get(peer)
        if address is not None and self.record.store is not None:
            try:
                self.record.mark_dead(peer, address)
            except RuntimeError as e:
                log.debug("torchrpc %s: could not record worker %d as dead: %s", self.name, peer, e)

    # --- leaving --------------------------------------------------------------------

    def leave(self, deadline: float, finish: Callable[[], None]) -> None:
        """Leave the group: under the lock, tell every member and wait for their acks; run
        ``finish`` (this worker's last work); then take this worker off the record."""
        hold = max(0.0, deadline - time.monotonic()) if deadline != float("inf") else 3600.0
        self.record.lock("leave", deadline, hold=hold + 30)
        try:
            self._announce_leave(deadline)
            finish()
            members = self.record.members()
            members.pop(self.rank, None)
            self.record.set_members(members)
        finally:
            self.record.unlock()

    def _announce_leave(self, deadline: float) -> None:
        acks = []
        for w in self.peers.workers:
            if w.id == self.rank or not self.peers.is_alive(w.id):
                continue
            acks.append((w, self._request(w.id, m.Membership(0, self.rank, False), deadline)))
        for w, fut in acks:
            try:
                fut.wait()
            except RPCTimeoutError:
                raise RPCTimeoutError(f"shutdown timed out: worker {w.name!r} still waits on calls to this worker "
                                      "before it lets it leave") from None
            except RuntimeError as e:  # it died meanwhile: nothing to tell it
                log.debug("torchrpc %s: %s did not ack our leaving: %s", self.name, w.name, e)

    def _request(self, dest: int, msg: m.Message, deadline: float):
        left = deadline - time.monotonic()
        fut = self.endpoint.future(dest, lead=False)

        def done(reply: Optional[m.Message], error: Optional[BaseException]) -> None:
            if error is None and not isinstance(reply, m.RRefAck):
                error = self.endpoint.remote_error(reply, dest)
            fut.set_result(None) if error is None else fut.set_exception(error)

        try:
            self.endpoint.request(dest, msg, max(0.001, left) if deadline != float("inf") else 0.0, "leave", done)
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def close_group(self, deadline: float, finish: Callable[[], None]) -> None:
        """Rank 0 hosts the store: wait until every other member has left (and no rank is still
        arriving, and at least ``LINGER`` s have passed since this worker joined), then close
        the group for good and run ``finish``."""
        while True:
            self._wait_alone(deadline)
            self.record.lock("close", deadline, hold=max(0.0, min(deadline - time.monotonic(), 3600.0)) + 30)
            if not self._others():  # a rank arriving now finds the group closed
                break
            self.record.unlock()
        try:
            finish()
        finally:
            self.record.close()

    def _others(self) -> list[str]:
        return [f"{info['name']!r} (rank {r})" for r, info in sorted(self.record.members().items())
                if r != self.rank and not self.record.is_dead(r, info["address"])]

    def _wait_alone(self, deadline: float) -> None:
        delay = 0.005
        arriving, since = None, time.monotonic()
        while True:
            others = self._others()
            count = self.record.arriving()
            if count != arriving:
                arriving, since = count, time.monotonic()
            # a count that stays put for a start-up timeout is a joiner that died before counting out
            waiting_arrivals = count > 0 and time.monotonic() - since < self.startup_timeout
            if not others and not waiting_arrivals and time.monotonic() - self.started >= LINGER:
                return
            if time.monotonic() > deadline:
                raise RPCTimeoutError(f"shutdown timed out waiting for {others or f'{count} joining rank(s)'} to "
                                      "leave the group: rank 0 hosts the store, so it leaves last")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
