"""A dynamic group's record in the rendezvous store: who its members are, and the lock that
serializes joining and leaving.

``init_rpc`` without a world size makes a *dynamic* group, as in torch: ranks join and
leave a running group one at a time. Everything the members agree on lives in the store
(rank 0 hosts it), under these keys:

* ``group/kind``: ``static`` or ``dynamic``, set by the first worker to arrive
  (``compare_set``); a worker of the other kind fails at once (:func:`claim_kind`).
* ``group/lock``: the membership lock, held by the one worker joining or leaving (a token
  naming it, with an expiry so that a holder that died does not block the group forever),
  or ``closed`` once rank 0 has shut the group down.
* ``group/members``: the members, ``{rank: {"name", "address"}}`` (JSON), changed only
  under the lock.
* ``group/joining``: the member joining now, whose connections the others accept.
* ``group/arriving``: how many workers have opened the store and not yet finished joining
  (rank 0 waits for them before it shuts the group down).
* ``group/dead/<rank>``: the address of a member that a peer saw die (not leave), so that
  joiners skip it.

The module does no networking beyond the store: the agent and the membership service use it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Optional

import torch.distributed as dist

from .errors import RPCError, RPCTimeoutError

log = logging.getLogger("torchrpc")

KIND = "group/kind"
LOCK = "group/lock"
MEMBERS = "group/members"
JOINING = "group/joining"
ARRIVING = "group/arriving"
DEAD = "group/dead/"
CLOSED = "closed"

#: Seconds rank 0 keeps a dynamic group's store up after starting it, at least, so that ranks
#: started together with it can still join even if rank 0 shuts down at once.
LINGER = float(os.environ.get("TORCHRPC_DYNAMIC_LINGER", "2.0"))

#: The rank limit of a dynamic group: worker ids are 16-bit signed in torch, and
#: distributed autograd context ids carry the creator's id in their top 16 bits.
MAX_RANK = 1 << 15

MIXED = ("RPC group mixes statically and dynamically initialized members which is not supported. Static group "
         "property is initialized as {theirs} and is trying to be set as {mine}: pass world_size to init_rpc on "
         "every worker of a static group, and on none of a dynamic one")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def claim_kind(store: dist.Store, dynamic: bool) -> None:
    """Record the group's kind, or check it against the one recorded; RuntimeError (torch's
    message) when a static and a dynamic worker meet in one store."""
    mine = "dynamic" if dynamic else "static"
    theirs = _text(store.compare_set(KIND, "", mine))
    if theirs != mine:
        raise RPCError(MIXED.format(theirs=theirs == "static", mine=not dynamic))


class GroupRecord:
    """One worker's view of its dynamic group's record in ``store`` (see the module)."""

    def __init__(self, store: dist.Store, rank: int, name: str) -> None:
        self.store = store
        self.rank = rank
        self.name = name
        self._token: Optional[str] = None

    # --- the lock -------------------------------------------------------------------

    def lock(self, what: str, deadline: float, hold: float) -> None:
        """Take the membership lock for ``what`` ("join", "leave"), waiting until ``deadline``
        (``time.monotonic``) for its holder; the lock expires ``hold`` s from now, after which
        another worker may take it. RPCError if the group is closed; RPCTimeoutError naming
        the holder after the deadline."""
        token = json.dumps({"holder": f"{self.name!r} (rank {self.rank})", "what": what,
                            "expires": time.time() + hold, "nonce": secrets.token_hex(8)})
        delay = 0.001
        while True:
            held = _text(self.store.compare_set(LOCK, "", token))
            if held == token:
                self._token = token
                return
            if held == CLOSED:
                raise RPCError(f"cannot {what}: rank 0, which hosts the store, has shut the group down")
            holder = _holder(held)
            if holder.get("expires", 0) < time.time():
                if _text(self.store.compare_set(LOCK, held, token)) == token:
                    log.warning("torchrpc %s: took the group's membership lock from %s, which held it past its "
                                "time (%s)", self.name, holder.get("holder", "?"), holder.get("what", "?"))
                    self._token = token
                    return
            if time.monotonic() > deadline:
                raise RPCTimeoutError(f"timed out waiting to {what} the group: {holder.get('holder', held)} is "
                                      f"still {holder.get('what', 'changing')}ing it")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def unlock(self) -> None:
        """Release the lock if this worker still holds it."""
        token, self._token = self._token, None
        if token is not None:
            self.store.compare_set(LOCK, token, "")

    def close(self) -> None:
        """Rank 0, holding the lock with the group empty: close the group for good."""
        token, self._token = self._token, None
        if token is not None:
            self.store.compare_set(LOCK, token, CLOSED)

    # --- members ----------------------------------------------------------------------

    def members(self) -> dict[int, dict]:
        """The members, by rank: ``{"name", "address"}``."""
        if not self.store.check([MEMBERS]):
            return {}
        return {int(r): info for r, info in json.loads(_text(self.store.get(MEMBERS))).items()}

    def set_members(self, members: dict[int, dict]) -> None:
        """Write the members (under the lock)."""
        self.store.set(MEMBERS, json.dumps({str(r): info for r, info in sorted(members.items())}))

    def announce_joining(self, info: Optional[dict]) -> None:
        """Say who is joining now (``{"rank", "name", "address"}``), or nobody (None)."""
        self.store.set(JOINING, json.dumps(info or {}))

    def joining(self) -> dict:
        """Who is joining now (``{}``: nobody)."""
        if not self.store.check([JOINING]):
            return {}
        return json.loads(_text(self.store.get(JOINING)))

    def arrive(self, count: int) -> None:
        """Count this worker in (1) or out (-1) of those still joining."""
        self.store.add(ARRIVING, count)

    def arriving(self) -> int:
        """How many workers have opened the store and not finished joining."""
        return self.store.add(ARRIVING, 0)

    # --- members that died ---------------------------------------------------------------

    def mark_dead(self, rank: int, address: str) -> None:
        """A peer saw ``rank`` (listening at ``address``) die: joiners will skip it."""
        self.store.set(f"{DEAD}{rank}", address)

    def is_dead(self, rank: int, address: str) -> bool:
        """Whether ``rank``'s incarnation at ``address`` was seen dying."""
        key = f"{DEAD}{rank}"
        return self.store.check([key]) and _text(self.store.get(key)) == address


def _holder(token: str) -> dict:
    try:
        holder = json.loads(token)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}
