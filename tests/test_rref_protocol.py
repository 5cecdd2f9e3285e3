"""Multi-process tests of the Remote Reference Protocol (PyTorch's design note, four scenarios).

The owner's value is a ``Tracked`` object that counts live instances on its worker;
the tests read that count on the owner (``live_tracked`` / ``wait_live``, which waits
on the count itself) to see the value freed exactly when the last user anywhere
is gone, and not before.
"""
from __future__ import annotations

import gc

import pytest

import torchrpc as rpc
from common import (
    SlowToUnpickle, Tracked, held, hold, init, live_tracked, make_tracked, name, release, rref_info, wait_live,
)
from harness import run_workers

pytestmark = pytest.mark.timeout(90)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# --- scenario 1: user shares RRef with owner as return value -------------------------


def _user_to_owner_return(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        rref = rpc.remote("worker1", make_tracked, args=("s1",))
        check(rref.to_here().tag == "s1", "to_here")
        check(rpc.rpc_sync("worker1", live_tracked) == 1, "owner holds the value while the user lives")
        rref._get_future().wait()
        check(rref.confirmed_by_owner(), "confirmed after REMOTE_RET")
        del rref
        gc.collect()
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "owner frees after the user is deleted")
    rpc.shutdown()
    return True


def test_user_shares_with_owner_as_return_value():
    assert run_workers(_user_to_owner_return, 2) == [True, True]


# --- scenario 2: user shares RRef with owner as argument ------------------------------


def _user_to_owner_arg(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        rref = rpc.remote("worker1", make_tracked, args=("s2",))
        info = rpc.rpc_sync("worker1", rref_info, args=(rref,))
        check(info == {"is_owner": True, "owner": "worker1", "confirmed": True, "value_tag": "s2"}, info)
        # the owner keeps the RRef it received
        rpc.rpc_sync("worker1", hold, args=("mine", rref))
        del rref
        gc.collect()
        check(rpc.rpc_sync("worker1", wait_live, args=(1, 0.3)) == 1,
              "value alive: the user is gone but the owner's local RRef holds it")
        rpc.rpc_sync("worker1", release, args=("mine",))
        # the user's delete may still be on its way: it leaves once the owner's child accept
        # (sent from worker1's pool) has reached worker0, which a loaded machine can delay
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "freed once neither holds it")
    rpc.shutdown()
    return True


def test_user_shares_with_owner_as_argument():
    assert run_workers(_user_to_owner_arg, 2) == [True, True]


# --- scenario 3: owner shares RRef with user ------------------------------------------


def _owner_to_user(rank, world_size):
    init(rank, world_size)
    if rank == 1:
        rref = rpc.RRef(Tracked("s3"))
        rpc.rpc_sync("worker0", hold, args=("r", rref))
        info = rpc.rpc_sync("worker0", rref_info_held, args=("r",))
        check(info == {"is_owner": False, "owner": "worker1", "confirmed": True, "value_tag": "s3"}, info)
        del rref
        gc.collect()
        check(wait_live(1, 0.3) == 1, "the user on worker0 keeps the value alive")
        rpc.rpc_sync("worker0", release, args=("r",))
        check(wait_live(0) == 0, "freed when the user lets go")
    rpc.shutdown()
    return True


def rref_info_held(key):
    return rref_info(held(key))


def test_owner_shares_with_user():
    assert run_workers(_owner_to_user, 2) == [True, True]


# --- scenario 4: user shares RRef with user -------------------------------------------


def _user_to_user(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        rref = rpc.remote("worker1", make_tracked, args=("s4",))
        rpc.rpc_sync("worker2", hold, args=("r", rref))
        check(rpc.rpc_sync("worker2", rref_info_held, args=("r",))["value_tag"] == "s4", "child reads the value")
        del rref
        gc.collect()
        check(rpc.rpc_sync("worker1", wait_live, args=(1, 0.3)) == 1, "the child on worker2 keeps it alive")
        rpc.rpc_sync("worker2", release, args=("r",))
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "freed after both users are gone")
    rpc.shutdown()
    return True


def test_user_shares_with_user():
    assert run_workers(_user_to_user, 3) == [True, True, True]


def _user_to_user_parent_deleted_first(rank, world_size):
    """G2: the parent is deleted right after forking, before the child is confirmed."""
    init(rank, world_size)
    if rank == 0:
        for i in range(8):
            rref = rpc.remote("worker1", make_tracked, args=(f"g2-{i}",))
            rref._get_future().wait()  # confirmed: deleting it now sends the delete at once
            # worker2 sees the RRef (and asks the owner for its fork) only after 50 ms
            fut = rpc.rpc_async("worker2", hold, args=(i, (SlowToUnpickle(0.05), rref)))
            del rref  # the parent's delete reaches the owner first; G2 must keep the value
            fut.wait()
        check(rpc.rpc_sync("worker1", wait_live, args=(8, 0.3)) == 8, "all alive while worker2 holds them")
        for i in range(8):
            check(rpc.rpc_sync("worker2", rref_info_held_pair, args=(i,))["value_tag"] == f"g2-{i}", "readable")
            rpc.rpc_sync("worker2", release, args=(i,))
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "all freed")
    rpc.shutdown()
    return True


def rref_info_held_pair(key):
    return rref_info(held(key)[1])


def test_parent_deleted_while_fork_in_flight():
    assert run_workers(_user_to_user_parent_deleted_first, 3) == [True, True, True]


# --- longer paths ------------------------------------------------------------------------


def pass_along(rref, hops, key):
    """Hold ``rref`` here, then send it on to the next hop; the last hop reads it."""
    hold(key, rref)
    if hops:
        return rpc.rpc_sync(hops[0], pass_along, args=(rref, hops[1:], key))
    return rref.to_here().tag


def _three_hops(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        rref = rpc.remote("worker1", make_tracked, args=("hops",))
        # worker0 -> worker2 -> worker3 -> worker1 (the owner) -> worker2 again
        tag = rpc.rpc_sync("worker2", pass_along, args=(rref, ["worker3", "worker1", "worker2"], "k"))
        check(tag == "hops", tag)
        del rref
        gc.collect()
        for who in ("worker3", "worker2"):  # release in an order unrelated to the fork tree
            check(rpc.rpc_sync("worker1", wait_live, args=(1, 0.2)) == 1, f"alive before {who} releases")
            rpc.rpc_sync(who, release, args=("k",))
        rpc.rpc_sync("worker1", release, args=("k",))
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "freed after the last holder")
    rpc.shutdown()
    return True


def test_rref_through_three_workers_freed_exactly_when_last_user_goes():
    assert run_workers(_three_hops, 4) == [True] * 4


def make_remote_on(owner, tag):
    """Runs on a middle worker: create a value on ``owner`` and return the RRef (user -> user)."""
    return rpc.remote(owner, make_tracked, args=(tag,))


def make_rref_container(owner):
    return {"a": rpc.remote(owner, make_tracked, args=("a",)), "list": [rpc.remote(owner, make_tracked, args=("b",))]}


def nested_rref(owner):
    """An RRef whose value is an RRef: the inner one owned by ``owner``."""
    return rpc.remote(owner, make_tracked, args=("inner",))


def _returned_and_nested(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        r = rpc.rpc_sync("worker2", make_remote_on, args=("worker1", "ret"))
        check(not r.is_owner() and r.owner_name() == "worker1" and r.to_here().tag == "ret", "returned RRef")
        box = rpc.rpc_sync("worker2", make_rref_container, args=("worker1",))
        check(box["a"].to_here().tag == "a" and box["list"][0].to_here().tag == "b", "RRefs inside containers")
        outer = rpc.remote("worker2", nested_rref, args=("worker1",))  # RRef (on worker2) of an RRef (worker1)
        inner = outer.to_here()
        check(isinstance(inner, rpc.RRef) and inner.owner_name() == "worker1", "RRef of RRef")
        check(inner.to_here().tag == "inner", "inner value")
        check(rpc.rpc_sync("worker1", live_tracked) == 4, "four values on the owner")
        del r, box, inner, outer
        gc.collect()
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "every value freed")
    rpc.shutdown()
    return True


def test_rrefs_returned_from_remote_functions_in_containers_and_of_rrefs():
    assert run_workers(_returned_and_nested, 3) == [True] * 3


def _send_to_self_and_owner_roundtrip(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        local = rpc.RRef(Tracked("self"))
        back = rpc.rpc_sync("worker0", lambda_free_ident, args=(local,))  # owner -> itself
        check(back.is_owner() and back.local_value() is local.local_value(), "same value on the owner")
        via_user = rpc.rpc_sync("worker1", lambda_free_ident, args=(local,))  # owner -> user -> owner
        check(via_user.is_owner() and via_user.local_value().tag == "self", "comes back as the owner's")
        del local, back, via_user
        gc.collect()
        check(wait_live(0) == 0, "freed once every handle is gone")
    rpc.shutdown()
    return True


def lambda_free_ident(x):
    return x


def test_owner_rref_sent_to_itself_and_back():
    assert run_workers(_send_to_self_and_owner_roundtrip, 2) == [True, True]


def _shutdown_frees_everything(rank, world_size):
    init(rank, world_size)
    keep = []
    if rank == 0:
        for i in range(5):
            r = rpc.remote("worker1", make_tracked, args=(i,))
            rpc.rpc_async("worker2", hold, args=(i, r))  # not waited on: shutdown must wait
            keep.append(r)
    rpc.shutdown()
    # graceful shutdown deletes every user RRef and waits for the owners' acks
    return live_tracked()


def test_graceful_shutdown_deletes_all_users_and_owners_free_values():
    assert run_workers(_shutdown_frees_everything, 3) == [0, 0, 0]


def _many_concurrent_forks(rank, world_size):
    init(rank, world_size)
    if rank == 0:
        rrefs = [rpc.remote("worker1", make_tracked, args=(i,)) for i in range(30)]
        futs = [rpc.rpc_async(name(2 + i % 2), pass_along, args=(r, [name(2 + (i + 1) % 2)], i))
                for i, r in enumerate(rrefs)]
        check([f.wait() for f in futs] == list(range(30)), "all readable")
        del rrefs, futs
        gc.collect()
        for w in ("worker2", "worker3"):
            for i in range(30):
                rpc.rpc_sync(w, release, args=(i,))
        check(rpc.rpc_sync("worker1", wait_live, args=(0,)) == 0, "all 30 freed")
    rpc.shutdown()
    return True


def test_many_concurrent_forks_all_freed():
    assert run_workers(_many_concurrent_forks, 4) == [True] * 4


# --- a function runs once the RRefs it received are confirmed -------------------------------


def confirmed_inside(rref):
    return rref.confirmed_by_owner()


def _confirmed_before_the_function_runs(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        rref = rpc.remote("worker2", make_tracked, args=("c",))  # owned by worker2, a user here
        out["sync"] = rpc.rpc_sync("worker1", confirmed_inside, args=(rref,))  # a user -> user fork
        out["remote"] = rpc.remote("worker1", confirmed_inside, args=(rref,)).to_here()
        out["async"] = [f.wait() for f in [rpc.rpc_async("worker1", confirmed_inside, args=(rref,)) for _ in range(5)]]
    rpc.shutdown()
    return out


def test_a_function_given_an_rref_runs_after_the_owner_confirmed_it():
    out = run_workers(_confirmed_before_the_function_runs, 3)[0]
    assert out == {"sync": True, "remote": True, "async": [True] * 5}
