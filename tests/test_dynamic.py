"""Dynamic membership: ``init_rpc`` without a world size joins a running group, as in torch 2.13.

Members join one at a time and may leave (any rank but rank 0, which hosts the store and
leaves last); calls, RRefs and distributed autograd work between any of them; mixing static
and dynamic workers in one store is torch's RuntimeError; a bad join leaves the group working.
The workers run with ``WORLD_SIZE`` unset (``env``), so ``world_size=None`` means dynamic.
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import add, name
from harness import get_context, run_workers, start_workers

DYNAMIC = {"WORLD_SIZE": ""}  # as torchrun would not set it: world_size=None is a dynamic group
OPTS = dict(rpc_timeout=20)


def join(rank: int, worker_name: str | None = None) -> None:
    """init_rpc without a world size: join the dynamic group."""
    rpc.init_rpc(worker_name or name(rank), rank=rank, rpc_backend_options=rpc.TensorPipeRpcBackendOptions(**OPTS))


class Warnings(logging.Handler):
    """The torchrpc logger's warnings and worse, kept to be returned by a worker."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []
        logging.getLogger("torchrpc").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def members() -> list[str]:
    """The members this worker knows now, by id."""
    from torchrpc import current
    return [w.name for w in current.agent().workers]


def whoami() -> str:
    return rpc.get_worker_info().name


def slow_add(a, b, delay):
    time.sleep(delay)
    return a + b


def call_back(to: str, value: int) -> int:
    """Run on a member: call ``to`` (nested, the other way)."""
    return rpc.rpc_sync(to, add, args=(value, 1))


def wait(event, what: str, timeout: float = 30) -> None:
    if not event.wait(timeout):
        raise AssertionError(f"timed out waiting for {what}")


def _shutdown_after_all(done, rank, what: str) -> None:
    """Mark ``rank`` done (unless None), wait until every event in ``done`` is set, shut down."""
    if rank is not None:
        done[rank].set()
    for e in done:
        wait(e, what)
    rpc.shutdown()


# --- joining and calling ------------------------------------------------------------------


def _join_and_call(rank, world_size, joined, done):
    if rank > 0:
        wait(joined[rank - 1], f"worker{rank - 1} to join")  # one after another, after rank 0
    join(rank)
    seen_at_join = members()
    # a new member calls every existing one, and they call it (nested both ways)
    out = [rpc.rpc_sync(name(r), add, args=(torch.ones(2), r)).tolist() for r in range(rank)]
    out += [rpc.rpc_sync(name(r), call_back, args=(name(rank), 10 * r)) for r in range(rank)]
    joined[rank].set()
    wait(joined[world_size - 1], "the last member to join")
    # every member, old or new, calls every other
    out.append([rpc.rpc_sync(name(r), whoami) for r in range(world_size)])
    out.append([rpc.get_worker_info(name(r)).id for r in range(world_size)])
    _shutdown_after_all(done, rank, "the others' calls")
    return seen_at_join, out


def test_members_join_one_by_one_and_call_both_ways():
    ctx = get_context()
    joined, done = [ctx.Event() for _ in range(3)], [ctx.Event() for _ in range(3)]
    results = run_workers(_join_and_call, 3, args=(joined, done), env=DYNAMIC, timeout=90)
    all_names = [name(r) for r in range(3)]
    for rank, (seen, out) in enumerate(results):
        assert seen == all_names[:rank + 1]  # init_rpc returns knowing the members there were
        assert out[:rank] == [[1.0 + r, 1.0 + r] for r in range(rank)]
        assert out[rank:2 * rank] == [10 * r + 1 for r in range(rank)]
        assert out[-2:] == [all_names, [0, 1, 2]]


def _concurrent_joins(rank, world_size, barrier):
    join(rank)  # in any order (rank 0 hosts the store, but need not be the first member)
    seen = None
    if barrier is not None:
        barrier.wait(30)
        seen = members()  # whatever the order, every member knows every other
        barrier.wait(30)
    rpc.shutdown()  # all at once; rank 0 once everyone else has left
    return seen


@pytest.mark.parametrize("hold", [False, True], ids=["leave at once", "all joined first"])
def test_ranks_join_at_once_and_leave_at_once(hold):
    # without hold: torch's test_dynamic_rpc_init_rpc under env://, which torch itself fails, since
    # rank 0 hosts the store; here its shutdown waits until every other member has left
    barrier = get_context().Barrier(4) if hold else None
    seen = run_workers(_concurrent_joins, 4, args=(barrier,), env=DYNAMIC, timeout=90)
    assert seen == ([[name(r) for r in range(4)]] * 4 if hold else [None] * 4)


def _rank0_leaves_last(rank, world_size, joined):
    if rank == 0:
        join(0)
        joined.set()
        t0 = time.monotonic()
        rpc.shutdown()  # at once: it must wait for worker1, which joins now and works a while
        return time.monotonic() - t0
    wait(joined, "rank 0")
    join(1)
    time.sleep(3.0)  # well past the linger of rank 0's store
    got = rpc.rpc_sync(name(0), add, args=(1, 2))
    rpc.shutdown()
    return got


def test_rank0_shutdown_waits_for_the_others_to_leave():
    ctx = get_context()
    waited, got = run_workers(_rank0_leaves_last, 2, args=(ctx.Event(),), env=DYNAMIC, timeout=60)
    assert got == 3
    assert waited > 3.0


# --- RRefs and distributed autograd between members ----------------------------------------------


def make_param(n):
    return torch.nn.Parameter(torch.full((n,), 2.0))


def rref_sum(rref):
    return rref.to_here().sum().item()


def times(rref, x):
    return rref.to_here() * x


def _rrefs_across(rank, world_size, joined, done):
    if rank > 0:
        wait(joined[rank - 1], "the previous member")
    join(rank)
    joined[rank].set()
    out = None
    if rank == 2:  # the last to join: RRefs owned by old members, forked between members
        r0 = rpc.remote(name(0), torch.ones, args=(3,))
        r1 = rpc.remote(name(1), torch.full, args=((2,), 5.0))
        mine = rpc.RRef(torch.arange(4.0))
        out = [
            r0.to_here().tolist(),
            rpc.rpc_sync(name(1), rref_sum, args=(r0,)),  # user -> user fork (owner 0, 2 -> 1)
            rpc.rpc_sync(name(0), rref_sum, args=(r1,)),
            rpc.rpc_sync(name(0), rref_sum, args=(mine,)),  # owner -> user
            r1.rpc_sync().sum().item(),
        ]
    elif rank == 1:  # an older member: RRefs owned by the newest one
        wait(joined[2], "the last member")
        r2 = rpc.remote(name(2), torch.full, args=((3,), 2.0))
        out = [r2.to_here().tolist(), rpc.rpc_sync(name(0), rref_sum, args=(r2,))]
    _shutdown_after_all(done, rank, "the others")
    return out


def test_rrefs_across_joined_members():
    ctx = get_context()
    joined, done = [ctx.Event() for _ in range(3)], [ctx.Event() for _ in range(3)]
    results = run_workers(_rrefs_across, 3, args=(joined, done), env=DYNAMIC, timeout=90)
    assert results[2] == [[1.0, 1.0, 1.0], 3.0, 10.0, 6.0, 10.0]
    assert results[1] == [[2.0, 2.0, 2.0], 6.0]


def _dist_autograd(rank, world_size, joined, done, finished):
    if rank == 1:
        wait(joined, "rank 0")
    join(rank)
    if rank == 0:
        joined.set()
    out = {}
    if rank == 1:
        # forward across members: a joined member's tensors to an existing one and back
        w = rpc.remote(name(0), make_param, args=(3,))
        x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        with dist_autograd.context() as ctx_id:
            y = rpc.rpc_sync(name(0), times, args=(w, x))
            z = rpc.rpc_sync(name(0), torch.mul, args=(y, 3))
            dist_autograd.backward(ctx_id, [z.sum()])
            grads = dist_autograd.get_gradients(ctx_id)
            out["x"] = grads[x].tolist()
            out["w"] = rpc.rpc_sync(name(0), grad_of_rref, args=(ctx_id, w))
        with dist_autograd.context() as ctx_id:
            loss = rpc.remote(name(0), sum_times, args=(w, x))
            loss.backward(ctx_id)  # RRef.backward from a user, run on the owner
            out["x again"] = dist_autograd.get_gradients(ctx_id)[x].tolist()
            out["w again"] = rpc.rpc_sync(name(0), grad_of_rref, args=(ctx_id, w))
        done.set()
        wait(finished, "worker0's backward")
    else:
        # and the other way: the existing member's forward through the joined one
        wait(done, "worker1's backward")
        a = torch.tensor([1.0, -1.0], requires_grad=True)
        with dist_autograd.context() as ctx_id:
            b = rpc.rpc_sync(name(1), torch.mul, args=(a, a))
            dist_autograd.backward(ctx_id, [b.sum()])
            out["a"] = dist_autograd.get_gradients(ctx_id)[a].tolist()
        rpc.rpc_sync(name(1), ident_ok)
        finished.set()
    rpc.shutdown()
    return out


def sum_times(rref, x):
    return (rref.to_here() * x).sum()


def grad_of_rref(ctx_id, rref):
    return dist_autograd.get_gradients(ctx_id)[rref.local_value()].tolist()


def ident_ok():
    return True


def test_dist_autograd_between_members():
    ctx = get_context()
    res = run_workers(_dist_autograd, 2, args=(ctx.Event(), ctx.Event(), ctx.Event()), env=DYNAMIC, timeout=60)
    assert res[1] == {"x": [6.0, 6.0, 6.0], "w": [3.0, 6.0, 9.0], "x again": [2.0, 2.0, 2.0],
                      "w again": [1.0, 2.0, 3.0]}
    assert res[0] == {"a": [2.0, -2.0]}


# --- leaving ------------------------------------------------------------------------------


def _leave(rank, world_size, joined, left, done):
    warnings = Warnings()
    if rank > 0:
        wait(joined[rank - 1], "the previous member")
    join(rank)
    joined[rank].set()
    for e in joined:
        wait(e, "every member")
    out: dict = {}
    if rank == 2:
        # leave with work outstanding both ways: its own call to worker0 and worker1's call to it
        fut = rpc.rpc_async(name(0), slow_add, args=(1, 1, 0.5))
        time.sleep(0.1)  # worker1's call is in flight too
        rpc.shutdown()  # waits for both
        out["own call"] = fut.wait()
        left.set()
    else:
        if rank == 1:
            fut = rpc.rpc_async(name(2), slow_add, args=(2, 2, 1.0))
            out["call to leaver"] = fut.wait()
        wait(left, "worker2 to leave")
        out["members"] = members()
        with pytest.raises(RuntimeError, match="could not find destination 'worker2'"):
            rpc.rpc_sync(name(2), add, args=(1, 1))
        with pytest.raises(RuntimeError, match="could not find destination"):
            rpc.get_worker_info(name(2))
        # the others keep working, both ways, for a while
        other = name(1 - rank)
        out["after"] = [rpc.rpc_sync(other, add, args=(i, rank)) for i in range(20)]
        done[rank].set()
        wait(done[1 - rank], "the other")
        rpc.shutdown()
    out["warnings"] = warnings.records
    return out


def test_a_member_leaves_and_the_rest_keep_working():
    ctx = get_context()
    joined, done = [ctx.Event() for _ in range(3)], [ctx.Event() for _ in range(2)]
    r0, r1, r2 = run_workers(_leave, 3, args=(joined, ctx.Event(), done), env=DYNAMIC, timeout=90)
    assert r2 == {"own call": 2, "warnings": []}
    assert r1["call to leaver"] == 4
    for rank, r in enumerate((r0, r1)):
        assert r["members"] == ["worker0", "worker1"]
        assert r["after"] == [i + rank for i in range(20)]
        assert r["warnings"] == []  # a departure is no failure: nothing like "lost worker"


def _leave_with_rrefs(rank, world_size, joined, left):
    if rank == 1:
        wait(joined[0], "rank 0")
    join(rank)
    joined[rank].set()
    if rank == 0:
        wait(joined[1], "worker1")
        theirs = rpc.remote(name(1), torch.ones, args=(2,))  # owned by the member that leaves
        assert theirs.to_here().tolist() == [1.0, 1.0]
        wait(left, "worker1 to leave")
        owned = rpc.debug_info()["rrefs"]["num_owner_rrefs"]  # worker1 deleted its user RRef of ours
        with pytest.raises(RuntimeError, match="left the group") as e:
            theirs.to_here()
        rpc.shutdown()
        return owned, str(e.value)
    ours = rpc.remote(name(0), torch.zeros, args=(3,))  # a user RRef of a value worker0 owns
    assert ours.to_here().tolist() == [0.0, 0.0, 0.0]
    time.sleep(0.5)  # worker0's remote() reached here
    rpc.shutdown()
    left.set()
    return None


def test_rrefs_of_a_member_that_left():
    ctx = get_context()
    (owned, err), _ = run_workers(_leave_with_rrefs, 2, args=([ctx.Event(), ctx.Event()], ctx.Event()),
                                  env=DYNAMIC, timeout=60)
    assert owned == 0
    assert "worker 'worker1' (id 1) is unavailable: left the group" in err, err


def _dead_member(rank, world_size, stage):
    warnings = Warnings()
    if rank < 3:
        if rank > 0:
            wait(stage[rank - 1], "the previous member")
        join(rank)
        stage[rank].set()
        if rank == 2:
            time.sleep(60)  # killed here
        wait(stage["killed"], "worker2 to be killed")
        deadline = time.monotonic() + 10
        while rpc.debug_info()["peers"]["worker2"]["alive"] and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="worker 'worker2' \\(id 2\\) is"):
            rpc.rpc_sync(name(2), add, args=(1, 1))
        time.sleep(0.2)  # the loss is recorded in the store, from the pool
        stage[f"seen{rank}"].set()
        wait(stage[3], "worker3 to join")
        got = rpc.rpc_sync(name(3), add, args=(rank, 100))
        stage[f"done{rank}"].set()
        wait(stage["done3"], "worker3")
        for r in (0, 1):
            wait(stage[f"done{r}"], "the others")
        rpc.shutdown()
        return got, [w for w in warnings.records if "lost worker" in w]
    wait(stage["seen0"], "worker0 to see worker2 gone")
    wait(stage["seen1"], "worker1 to see worker2 gone")
    join(3)  # the dead worker2 is still in the store's record: it is skipped
    out = [members(), rpc.rpc_sync(name(0), add, args=(3, 1)), rpc.rpc_sync(name(1), add, args=(3, 2))]
    stage[3].set()
    stage["done3"].set()
    for r in (0, 1):
        wait(stage[f"done{r}"], "the others")
    rpc.shutdown()
    return out


def test_a_member_dies_and_a_new_one_joins():
    ctx = get_context()
    stage = {k: ctx.Event() for k in (0, 1, 2, 3, "killed", "seen0", "seen1", "done0", "done1", "done3")}
    with start_workers(_dead_member, 4, args=(stage,), env=DYNAMIC) as group:
        if not stage[2].wait(60):
            raise AssertionError("worker2 did not join")
        group.kill(2)
        stage["killed"].set()
        res = group.join(90)
    assert res[3] == [["worker0", "worker1", "worker3"], 4, 5]
    for rank in (0, 1):
        got, warned = res[rank]
        assert got == rank + 100
        assert len(warned) == 1 and "worker2" in warned[0], warned  # a death is a failure, and says so


def _rejoin(rank, world_size, stage, done):
    # processes 0-2 join as ranks 0-2; process 2 leaves; process 3 then joins as rank 2
    if rank == 3:
        wait(stage["left"], "worker2 to leave")
        join(2, "worker2b")
        out = [rpc.rpc_sync(name(r), whoami) for r in (0, 1)]
        r = rpc.remote(name(0), torch.ones, args=(2,))
        out.append(r.to_here().tolist())
        stage["rejoined"].set()
        _shutdown_after_all(done, None, "the others")
        return out
    if rank > 0:
        wait(stage[rank - 1], "the previous member")
    join(rank)
    stage[rank].set()
    wait(stage[2], "every member")
    if rank == 2:
        rpc.shutdown()
        stage["left"].set()
        return None
    wait(stage["rejoined"], "the new worker2")
    out = [rpc.rpc_sync(2, whoami), rpc.get_worker_info("worker2b").id, members()]
    _shutdown_after_all(done, rank, "the other")
    return out


def test_a_new_member_takes_the_rank_of_one_that_left():
    ctx = get_context()
    stage = {k: ctx.Event() for k in (0, 1, 2, "left", "rejoined")}
    res = run_workers(_rejoin, 4, args=(stage, [ctx.Event(), ctx.Event()]), env=DYNAMIC, timeout=90)
    assert res[3] == ["worker0", "worker1", [1.0, 1.0]]
    for r in (0, 1):
        assert res[r] == ["worker2b", 2, ["worker0", "worker1", "worker2b"]]


# --- errors ---------------------------------------------------------------------------


def _static_then_dynamic(rank, world_size, started, done):
    if rank < 2:
        rpc.init_rpc(name(rank), rank=rank, world_size=2)
        started.set()
        wait(done, "the dynamic worker's attempt")
        got = rpc.rpc_sync(name(1 - rank), add, args=(rank, 1))  # the static job is unharmed
        rpc.shutdown()
        return got
    wait(started, "the static job")
    try:
        join(2)
    except RuntimeError as e:
        return str(e)
    finally:
        done.set()
    return "no error"


def _dynamic_then_static(rank, world_size, started, done):
    if rank == 0:
        join(0)
        started.set()
        wait(done, "the static worker's attempt")
        rpc.shutdown()
        return "ok"
    wait(started, "the dynamic group")
    try:
        rpc.init_rpc(name(1), rank=1, world_size=2)
    except RuntimeError as e:
        return str(e)
    finally:
        done.set()
    return "no error"


@pytest.mark.parametrize("order", ["static first", "dynamic first"])
def test_mixing_static_and_dynamic_members_is_an_error(order):
    ctx = get_context()
    fn, n = (_static_then_dynamic, 3) if order == "static first" else (_dynamic_then_static, 2)
    res = run_workers(fn, n, args=(ctx.Event(), ctx.Event()), env=DYNAMIC, timeout=60)
    assert res[-1].startswith("RPC group mixes statically and dynamically initialized members which is not "
                              "supported."), res[-1]
    assert res[:-1] == ([1, 2] if order == "static first" else ["ok"])


def _bad_joins(rank, world_size, joined, tried, looked):
    if rank < 2:
        if rank == 1:
            wait(joined[0], "rank 0")
        join(rank)
        joined[rank].set()
        wait(tried, "the bad joins")
        got = rpc.rpc_sync(name(1 - rank), add, args=(rank, 10))  # the group still works
        members_now = members()
        looked[rank].set()
        wait(looked[1 - rank], "the other member's look")  # before either leaves the group
        rpc.shutdown()
        return got, members_now
    for e in joined:
        wait(e, "the members")
    errors = []
    for attempt in ({"rank": 2, "worker_name": "worker0"},   # a name already taken
                    {"rank": 1, "worker_name": "other"}):    # a rank already taken
        try:
            join(**attempt)
        except RuntimeError as e:
            errors.append((type(e).__name__, str(e)))
        else:
            errors.append(("no error", ""))
            rpc.shutdown()
    # and a try with a free name and rank works
    join(2, "worker2")
    got = rpc.rpc_sync(name(1), add, args=(2, 10))
    rpc.shutdown()
    tried.set()
    return errors, got


def test_bad_joins_fail_clearly_and_the_group_keeps_working():
    ctx = get_context()
    r0, r1, (errors, got) = run_workers(_bad_joins, 3, args=([ctx.Event(), ctx.Event()], ctx.Event(),
                                                             [ctx.Event(), ctx.Event()]),
                                        env=DYNAMIC, timeout=90)
    assert (r0, r1, got) == ((10, ["worker0", "worker1"]), (11, ["worker0", "worker1"]), 12)
    (t1, e1), (t2, e2) = errors
    assert t1 == "DuplicateNameError" and "RPC worker name 'worker0' is not unique" in e1, e1
    assert "RPC worker id 1 is not unique" in e2, e2


def _no_rank(rank, world_size, method):
    import os
    os.environ.pop("RANK", None)
    opts = rpc.TensorPipeRpcBackendOptions(init_method=method.format(port=os.environ["MASTER_PORT"]))
    try:
        rpc.init_rpc(name(rank), rpc_backend_options=opts)
    except ValueError as e:
        return str(e)
    rpc.shutdown()
    return "no error"


@pytest.mark.parametrize("method", ["env://", "tcp://127.0.0.1:{port}"])
def test_dynamic_init_without_rank_is_an_error(method):
    msg, = run_workers(_no_rank, 1, args=(method,), env=DYNAMIC)
    assert "rank parameter missing" in msg and "environment variable RANK expected" in msg, msg


# --- the parts, without processes ------------------------------------------------------------


def test_group_kind_is_claimed_once():
    import torch.distributed as dist
    from torchrpc.group import claim_kind
    store = dist.HashStore()
    claim_kind(store, dynamic=True)
    claim_kind(store, dynamic=True)  # the same kind: fine
    with pytest.raises(RuntimeError, match="RPC group mixes statically and dynamically initialized members "
                                           "which is not supported. Static group property is initialized as "
                                           "False and is trying to be set as True"):
        claim_kind(store, dynamic=False)


def test_membership_lock_serializes_expires_and_closes():
    import torch.distributed as dist
    from torchrpc.errors import RPCError, RPCTimeoutError
    from torchrpc.group import GroupRecord
    store = dist.HashStore()
    a, b = GroupRecord(store, 1, "a"), GroupRecord(store, 2, "b")
    a.lock("join", time.monotonic() + 1, hold=60)
    with pytest.raises(RPCTimeoutError, match="'a' \\(rank 1\\) is still joining"):
        b.lock("leave", time.monotonic() + 0.05, hold=60)
    a.unlock()
    b.lock("leave", time.monotonic() + 1, hold=0)  # expires at once
    a.lock("join", time.monotonic() + 1, hold=60)  # taken from b, whose time is up
    b.unlock()  # b no longer holds it: nothing changes
    with pytest.raises(RPCTimeoutError):
        GroupRecord(store, 0, "c").lock("close", time.monotonic() + 0.05, hold=60)
    a.close()  # as rank 0 does: closed for good
    with pytest.raises(RPCError, match="has shut the group down"):
        b.lock("join", time.monotonic() + 1, hold=60)


def test_group_record_members_and_dead_marks():
    import torch.distributed as dist
    from torchrpc.group import GroupRecord
    rec = GroupRecord(dist.HashStore(), 0, "w0")
    assert rec.members() == {} and rec.joining() == {} and rec.arriving() == 0
    rec.set_members({3: {"name": "w3", "address": "tcp://h:3"}, 0: {"name": "w0", "address": "tcp://h:0"}})
    assert rec.members() == {0: {"name": "w0", "address": "tcp://h:0"}, 3: {"name": "w3", "address": "tcp://h:3"}}
    rec.mark_dead(3, "tcp://h:3")
    assert rec.is_dead(3, "tcp://h:3") and not rec.is_dead(3, "tcp://h:4") and not rec.is_dead(0, "tcp://h:0")
    rec.arrive(1)
    rec.arrive(1)
    rec.arrive(-1)
    assert rec.arriving() == 1


def test_peer_table_members_come_and_go():
    from torchrpc.errors import DuplicateNameError
    from torchrpc.runtime.peers import PeerTable
    peers = PeerTable(0, "w0")
    peers.dynamic = True
    peers.add_worker(0, "w0")
    peers.add_worker(5, "w5")
    assert [w.id for w in peers.workers] == [0, 5] and peers.resolve("w5").id == 5 and peers.resolve(5).name == "w5"
    with pytest.raises(DuplicateNameError, match="RPC worker name 'w5' is not unique"):
        peers.add_worker(6, "w5")
    with pytest.raises(RuntimeError, match="RPC worker id 5 is not unique"):
        peers.add_worker(5, "other")
    peers.depart(5)
    assert peers.has_left(5) and not peers.is_alive(5) and peers.name_of(5) == "w5"
    with pytest.raises(RuntimeError, match="could not find destination 5: unknown worker id; ids are 0..0 "
                                           "\\(worker 'w5' left the group\\)"):
        peers.resolve(5)
    with pytest.raises(RuntimeError, match="left the group"):
        peers.connection(5, wait=10)  # at once, not after the wait
    peers.add_worker(5, "w5b")  # a new member takes the rank
    assert peers.resolve("w5b").id == 5 and peers.is_alive(5) and not peers.has_left(5)
