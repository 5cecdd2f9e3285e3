"""Multi-process tests of the public API: calls, futures, RRefs, errors, set-up and shutdown."""
from __future__ import annotations

import operator
import os
import sys
import time

import pytest
import torch

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import (
    add, call, chain, ident, init, make_tracked, name, open_sockets, ping_pong,
    raise_unpicklable, raise_value_error, rpc_agent_set, sleep_then, torchrpc_threads, whoami,
)
from harness import run_workers

pytestmark = pytest.mark.timeout(90)


# --- calls -------------------------------------------------------------------------


def _calls(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        out["builtin"] = rpc.rpc_sync("worker1", operator.add, args=(1, 2))
        out["torch_add"] = rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 3)).tolist()
        out["kwargs"] = rpc.rpc_sync("worker1", add, kwargs={"a": 2, "b": 5})
        out["by_id"] = rpc.rpc_sync(1, whoami)
        out["by_info"] = rpc.rpc_sync(rpc.get_worker_info("worker1"), whoami)
        out["self"] = rpc.rpc_sync("worker0", whoami)
        t = torch.randn(3, 4, dtype=torch.float64)
        back = rpc.rpc_sync("worker1", ident, args=(t,))
        out["tensor_equal"] = torch.equal(back, t) and back.dtype == torch.float64
        out["tensor_copied"] = back.data_ptr() != t.data_ptr()
        view = torch.arange(20.0).reshape(4, 5)[1:, ::2]
        out["view"] = torch.equal(rpc.rpc_sync("worker1", ident, args=(view,)), view)
        out["nested_structure"] = rpc.rpc_sync(
            "worker1", ident, args=({"a": [torch.ones(1), (2, "x")], "b": None},))["a"][1]
        g = rpc.rpc_sync("worker1", ident, args=(torch.ones(2, requires_grad=True),))
        out["requires_grad"] = g.requires_grad
    rpc.shutdown()
    return out


def test_rpc_sync_builtins_kwargs_destinations_tensors():
    out = run_workers(_calls, 2)[0]
    assert out == {
        "builtin": 3, "torch_add": [4.0, 4.0], "kwargs": 7, "by_id": "worker1", "by_info": "worker1",
        "self": "worker0", "tensor_equal": True, "tensor_copied": True, "view": True,
        "nested_structure": (2, "x"), "requires_grad": True,
    }


def _futures(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        futs = [rpc.rpc_async(name(1 + i % 2), add, args=(i, i)) for i in range(20)]
        out["is_torch_future"] = all(isinstance(f, torch.futures.Future) for f in futs)
        out["wait_all"] = torch.futures.wait_all(futs)
        collected = torch.futures.collect_all([rpc.rpc_async("worker2", add, args=(1, 1)),
                                               rpc.rpc_async("worker1", add, args=(2, 2))]).wait()
        out["collect_all"] = [f.value() for f in collected]
        out["then"] = rpc.rpc_async("worker1", add, args=(1, 2)).then(lambda f: f.value() * 10).wait()
        chained = rpc.rpc_async("worker1", add, args=(1, 1)).then(
            lambda f: rpc.rpc_async("worker2", add, args=(f.value(), 1)))
        out["then_rpc"] = chained.wait().wait()
    rpc.shutdown()
    return out


def test_rpc_async_returns_torch_futures():
    out = run_workers(_futures, 3)[0]
    assert out == {"is_torch_future": True, "wait_all": [2 * i for i in range(20)],
                   "collect_all": [2, 4], "then": 30, "then_rpc": 3}


def _nested(rank, world_size):
    init(rank, world_size, num_worker_threads=4)
    out = {}
    if rank == 0:
        out["back_to_caller"] = rpc.rpc_sync("worker1", call, args=("worker0", whoami))
        out["third"] = rpc.rpc_sync("worker1", call, args=("worker2", whoami))
        out["chain"] = rpc.rpc_sync("worker1", chain, args=(["worker2", "worker0", "worker1"], 0))
        out["ping_pong"] = rpc.rpc_sync("worker1", ping_pong, args=(12, "worker0"))
        # more concurrent nested calls than worker threads on the middle worker
        futs = [rpc.rpc_async("worker1", call, args=("worker2", add, (i, 1))) for i in range(12)]
        out["concurrent"] = [f.wait() for f in futs]
    rpc.shutdown()
    return out


def test_nested_calls_do_not_deadlock():
    out = run_workers(_nested, 3)[0]
    assert out["back_to_caller"] == "worker0"
    assert out["third"] == "worker2"
    assert out["chain"] == ["worker1", "worker2", "worker0", "worker1"]
    assert out["ping_pong"] == 12
    assert out["concurrent"] == [i + 1 for i in range(12)]


# --- async_execution ---------------------------------------------------------------


@rpc.functions.async_execution
def async_add_via(to, a, b):
    return rpc.rpc_async(to, add, args=(a, b)).then(lambda f: f.value() * 2)


@rpc.functions.async_execution
def async_not_a_future():
    return 5


class AsyncCounter:
    def __init__(self):
        self.n = 0

    @rpc.functions.async_execution
    def bump_later(self, by):
        fut = torch.futures.Future()
        self.n += by
        fut.set_result(self.n)
        return fut

    @staticmethod
    @rpc.functions.async_execution
    def static_async(to, x):
        return rpc.rpc_async(to, add, args=(x, 100))


def _async_exec(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        out["fn"] = rpc.rpc_sync("worker1", async_add_via, args=("worker2", 1, 2))
        out["remote"] = rpc.remote("worker1", async_add_via, args=("worker2", 3, 4)).to_here()
        out["static"] = rpc.rpc_sync("worker1", AsyncCounter.static_async, args=("worker2", 1))
        counter = rpc.remote("worker1", AsyncCounter)
        counter.rpc_sync().bump_later(2)
        out["method"] = counter.rpc_async().bump_later(3).wait()
        try:
            rpc.rpc_sync("worker1", async_not_a_future)
            out["not_future"] = "no error"
        except TypeError as e:
            out["not_future"] = str(e)
    rpc.shutdown()
    return out


def test_async_execution():
    out = run_workers(_async_exec, 3)[0]
    assert out["fn"] == 6 and out["remote"] == 14 and out["static"] == 101 and out["method"] == 5
    assert "must return a torch.futures.Future" in out["not_future"]


# --- RRef API ----------------------------------------------------------------------


class Box:
    def __init__(self, v):
        self.v = v

    def get(self):
        return self.v

    def add(self, x):
        self.v = self.v + x
        return self.v


def _rref_api(rref):
    return rref.is_owner(), rref.local_value().v


def _rref_api_worker(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        r = rpc.remote("worker1", Box, args=(5,))
        out["owner"] = (r.owner(), r.owner_name(), r.is_owner())
        r._get_future().wait()
        out["confirmed"] = r.confirmed_by_owner()
        out["to_here"] = r.to_here().v
        out["proxy_sync"] = r.rpc_sync().add(1)
        out["proxy_async"] = r.rpc_async().add(1).wait()
        out["proxy_remote"] = r.remote().get().to_here()
        out["on_owner"] = rpc.rpc_sync("worker1", _rref_api, args=(r,))
        try:
            r.local_value()
        except RuntimeError as e:
            out["local_value_on_user"] = str(e)
        local = rpc.RRef(Box(9))
        out["local"] = (local.is_owner(), local.owner_name(), local.local_value().v,
                        local.to_here().v, local.confirmed_by_owner())
        out["local_proxy"] = local.rpc_sync().add(1)
        mine = rpc.remote("worker0", Box, args=(3,))
        out["remote_to_self"] = (mine.is_owner(), mine.to_here().v)
        out["repr"] = repr(r).startswith("UserRRef(")
        out["generic"] = rpc.RRef[int] is not None
        try:
            import pickle
            pickle.dumps(r)
        except RuntimeError as e:
            out["pickle_outside"] = str(e)
    rpc.shutdown()
    return out


def test_rref_api():
    out = run_workers(_rref_api_worker, 2)[0]
    assert out["owner"] == (rpc.WorkerInfo("worker1", 1), "worker1", False)
    assert out["confirmed"] is True
    assert out["to_here"] == 5 and out["proxy_sync"] == 6 and out["proxy_async"] == 7
    assert out["proxy_remote"] == 7
    assert out["on_owner"] == (True, 7)
    assert "can't call localValue() on user WorkerInfo(id=0, name=worker0). Call it on owner WorkerInfo(id=1, name=worker1)" in out["local_value_on_user"]
    assert out["local"] == (True, "worker0", 9, 9, True)
    assert out["local_proxy"] == 10
    assert out["remote_to_self"] == (True, 3)
    assert out["repr"] and out["generic"]
    assert "Can not pickle rref in python pickler" in out["pickle_outside"]


# --- errors -------------------------------------------------------------------------


def _remote_errors(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        try:
            rpc.rpc_sync("worker1", raise_value_error, args=("bad input 42",))
        except ValueError as e:
            out["sync"] = (str(e), "".join(getattr(e, "__notes__", [])))
        try:
            rpc.rpc_async("worker1", raise_value_error, args=("async",)).wait()
        except ValueError as e:
            out["async"] = str(e)
        try:
            rpc.rpc_sync("worker1", raise_unpicklable, args=("no pickle",))
        except rpc.RemoteError as e:
            out["unpicklable"] = (e.type_name, str(e))
        r = rpc.remote("worker1", raise_value_error, args=("in remote",))
        try:
            r.to_here()
        except ValueError as e:
            out["remote"] = str(e)
        out["still_serving"] = rpc.rpc_sync("worker1", add, args=(1, 1))
    rpc.shutdown()
    return out


def test_remote_exceptions_keep_type_and_traceback():
    out = run_workers(_remote_errors, 2)[0]
    msg, notes = out["sync"]
    assert msg == "bad input 42"
    assert "On WorkerInfo(id=1, name=worker1)" in notes
    assert "raise_value_error" in notes and "Traceback" in notes
    assert out["async"] == "async"
    type_name, text = out["unpicklable"]
    assert type_name.endswith("Unpicklable") and "no pickle" in text and "raise_unpicklable" in text
    assert text.startswith("Original exception on remote side was common.Unpicklable: no pickle")  # torch's phrase
    assert out["remote"] == "in remote"
    assert out["still_serving"] == 2


def _bad_args(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()
        sent_before = agent.stats(1)["msgs_sent"]
        for label, fn in [("lambda", lambda: rpc.rpc_sync("worker1", ident, args=(lambda: 1,))),
                          ("lock_async", lambda: rpc.rpc_async("worker1", ident, args=(__import__("threading").Lock(),))),
                          ("remote", lambda: rpc.remote("worker1", ident, args=(lambda: 2,)))]:
            try:
                fn()
                out[label] = "no error"
            except TypeError as e:
                out[label] = str(e)
        out["nothing_sent"] = agent.stats(1)["msgs_sent"] == sent_before
        for label, to in [("unknown_name", "nobody"), ("unknown_id", 7)]:
            try:
                rpc.rpc_sync(to, add, args=(1, 2))
            except ValueError as e:
                out[label] = str(e)
        try:
            rpc.get_worker_info("nobody")
        except ValueError as e:
            out["info_unknown"] = str(e)
        try:
            rpc.rpc_sync("worker1", 42)
        except TypeError as e:
            out["not_callable"] = str(e)
    rpc.shutdown()
    return out


def test_bad_arguments_are_clear_errors_and_send_nothing():
    out = run_workers(_bad_args, 2)[0]
    assert "cannot be sent" in out["lambda"] and "worker1" in out["lambda"]
    assert "cannot be sent" in out["lock_async"]
    assert "cannot be sent" in out["remote"]
    assert out["nothing_sent"] is True
    assert "could not find destination 'nobody': unknown worker name" in out["unknown_name"]
    assert "could not find destination 7: unknown worker id" in out["unknown_id"]
    assert "nobody" in out["info_unknown"]
    assert "callable" in out["not_callable"]


def test_calls_before_init_and_after_shutdown_fail_clearly():
    # worded as torch words them: its RPC functions' check, and its agent's for everything else
    for fn in (lambda: rpc.rpc_sync("w", add, args=(1, 2)), lambda: rpc.rpc_async("w", add),
               lambda: rpc.remote("w", add), lambda: rpc.get_worker_info(), lambda: rpc.shutdown()):
        with pytest.raises(RuntimeError, match="^RPC has not been initialized. Call torchrpc.init_rpc first"):
            fn()
    for fn in (lambda: rpc.RRef(1), lambda: dist_autograd.context().__enter__()):
        with pytest.raises(RuntimeError, match="Current RPC agent is not set! Did you initialize the RPC framework"):
            fn()


def _after_shutdown(rank, world_size):
    init(rank, world_size)
    rpc.shutdown()
    errors = []
    for fn in (lambda: rpc.rpc_sync("worker1", add, args=(1, 2)), lambda: rpc.remote("worker1", add, args=(1, 2)),
               lambda: rpc.get_worker_info()):
        try:
            fn()
            errors.append("no error")
        except RuntimeError as e:
            errors.append(str(e))
    return errors


def test_calls_after_shutdown_fail_clearly():
    for errors in run_workers(_after_shutdown, 2):
        assert all("init_rpc" in e for e in errors), errors


def _timeouts(rank, world_size):
    init(rank, world_size, rpc_timeout=1.5)
    out = {"default_timeout": rpc.get_rpc_timeout()}
    if rank == 0:
        t0 = time.monotonic()
        try:
            rpc.rpc_sync("worker1", sleep_then, args=(3,), timeout=0.5)
        except RuntimeError as e:
            out["sync"] = (type(e).__name__, str(e), time.monotonic() - t0)
        t0 = time.monotonic()
        try:
            rpc.rpc_async("worker1", sleep_then, args=(3,)).wait()  # the default: 1.5 s
        except RuntimeError as e:
            out["default"] = (str(e), time.monotonic() - t0)
        out["no_timeout"] = rpc.rpc_sync("worker1", sleep_then, args=(1.7, "ok"), timeout=0)
        r = rpc.remote("worker1", sleep_then, args=(3, "late"), timeout=0.5)
        t0 = time.monotonic()
        try:
            r.to_here()
        except RuntimeError as e:
            out["remote"] = (str(e), time.monotonic() - t0)
        slow = rpc.remote("worker1", sleep_then, args=(2.5, "v"), timeout=0)
        t0 = time.monotonic()
        try:
            slow.to_here(timeout=0.3)
        except RuntimeError as e:
            out["to_here"] = (str(e), time.monotonic() - t0)
        out["later"] = slow.to_here(timeout=0)
    rpc.shutdown()
    return out


def test_timeouts_name_worker_and_function():
    out = run_workers(_timeouts, 2)[0]
    assert out["default_timeout"] == 1.5  # rpc.get_rpc_timeout(), as torch's
    kind, msg, took = out["sync"]
    assert kind == "RPCTimeoutError" and "worker1" in msg and "sleep_then" in msg
    assert 0.5 <= took < 1.5
    msg, took = out["default"]
    assert "timed out after 1.5 s" in msg and 1.5 <= took < 2.5
    assert out["no_timeout"] == "ok"
    msg, took = out["remote"]
    assert "timed out" in msg and "sleep_then" in msg and took < 1.5
    msg, took = out["to_here"]
    assert "RRef.to_here" in msg and "worker1" in msg and took < 1.3
    assert out["later"] == "v"


# --- set-up ------------------------------------------------------------------------


def _init_methods(rank, world_size, method, tmpdir):
    port = os.environ["MASTER_PORT"]
    if method == "tcp":
        init_method = f"tcp://127.0.0.1:{port}"
    elif method == "file":
        init_method = f"file://{tmpdir}/rdzv"
    else:
        init_method = "env://"
    opts = rpc.TensorPipeRpcBackendOptions(init_method=init_method, num_worker_threads=8, rpc_timeout=20,
                                           _transports=["uv"], _channels=["basic"])
    if method == "env":  # RANK and WORLD_SIZE from the environment, as under torchrun
        rpc.init_rpc(name(rank), rpc_backend_options=opts)
    else:
        rpc.init_rpc(name(rank), backend=rpc.BackendType.TENSORPIPE, rank=rank, world_size=world_size,
                     rpc_backend_options=opts)
    result = rpc.rpc_sync(name((rank + 1) % world_size), whoami)
    rpc.shutdown()
    return result


@pytest.mark.parametrize("method", ["env", "tcp", "file"])
def test_init_methods(method, tmp_path):
    assert run_workers(_init_methods, 3, args=(method, str(tmp_path))) == ["worker1", "worker2", "worker0"]


def _duplicate_names(rank, world_size):
    try:
        rpc.init_rpc("same", rank=rank, world_size=world_size)
    except RuntimeError as e:  # torch raises RuntimeError; it is also a ValueError here
        return f"{isinstance(e, ValueError)} {e}"
    rpc.shutdown()
    return "no error"


def test_duplicate_names_rejected():
    for msg in run_workers(_duplicate_names, 2):
        assert msg.startswith("True worker name 'same' is not unique"), msg


def test_options_compatibility():
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, rpc_timeout=5, init_method="tcp://h:1",
                                           _transports=["shm"], _channels=["basic"], devices=["cpu"])
    assert (opts.num_worker_threads, opts.rpc_timeout, opts.init_method) == (4, 5.0, "tcp://h:1")
    assert issubclass(rpc.TensorPipeRpcBackendOptions, rpc.RpcBackendOptions)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            rpc.TensorPipeRpcBackendOptions(device_maps={"worker1": {0: 1}})
        with pytest.raises(ValueError, match="CUDA is not available"):
            rpc.TensorPipeRpcBackendOptions(devices=["cuda:0"])
    with pytest.raises(ValueError):
        rpc.TensorPipeRpcBackendOptions(num_worker_threads=0)


# --- shutdown ------------------------------------------------------------------------


def _graceful(rank, world_size):
    threads0, sockets0 = torchrpc_threads(), open_sockets()
    init(rank, world_size)
    out = {}
    if rank == 0:
        # fire and forget: graceful shutdown must wait for it
        fut = rpc.rpc_async("worker1", sleep_then, args=(0.5, "finished"))
        rpc.remote("worker2", sleep_then, args=(0.3, "remote"))
    rpc.shutdown()
    if rank == 0:
        out["fut"] = fut.value()
    out["threads_left"] = [t for t in torchrpc_threads() if t not in threads0]
    out["sockets_left"] = open_sockets() - sockets0
    # init again in the same process, same rendezvous
    init(rank, world_size)
    out["again"] = rpc.rpc_sync(name((rank + 1) % world_size), whoami)
    rpc.shutdown()
    out["threads_left_2"] = [t for t in torchrpc_threads() if t not in threads0]
    return out


def test_graceful_shutdown_waits_closes_everything_and_reinit_works():
    outs = run_workers(_graceful, 3)
    assert outs[0]["fut"] == "finished"
    for rank, out in enumerate(outs):
        assert out["threads_left"] == [] and out["threads_left_2"] == []
        assert out["sockets_left"] <= 0
        assert out["again"] == name((rank + 1) % 3)


def _no_tensorpipe(rank, world_size):
    init(rank, world_size)
    r = rpc.remote(name((rank + 1) % world_size), make_tracked)
    r.to_here()
    agent_set_remote = rpc.rpc_sync(name((rank + 1) % world_size), rpc_agent_set)
    rpc.shutdown()
    return rpc_agent_set(), agent_set_remote


def test_no_tensorpipe_agent_is_ever_started():
    assert run_workers(_no_tensorpipe, 3) == [(False, False)] * 3


def test_package_never_imports_torch_distributed_rpc():
    import pathlib
    import re

    src = pathlib.Path(rpc.__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+torch\.distributed(\.rpc|\.autograd|\s+import\s+(rpc|autograd))",
                         re.MULTILINE)
    offenders = [str(p) for p in src.rglob("*.py") if "bench" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []


def _rref_ids(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        out["owner"] = str(rpc.RRef(7))
        out["user"] = str(rpc.remote("worker1", torch.add, args=(torch.ones(2), 1)))
    rpc.shutdown()
    return out


def test_rref_ids_are_numbered_as_torch_numbers_them():
    out = run_workers(_rref_ids, 2)[0]
    gid = "GloballyUniqueId"
    assert out == {"owner": f"OwnerRRef({gid}(created_on=0, local_id=0))",
                   "user": f"UserRRef(RRefId = {gid}(created_on=0, local_id=1), ForkId = {gid}(created_on=0, local_id=2))"}


def _failing_function_is_reported_on_the_callee(rank, world_size):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        init(rank, world_size)
        out = {}
        if rank == 0:
            try:
                rpc.rpc_sync("worker1", raise_value_error, args=("a message for the log",))
            except ValueError as e:
                out["raised"] = str(e)
        rpc.shutdown()
    out["stderr"] = err.getvalue()
    return out


def test_a_failing_user_function_is_reported_on_the_callees_stderr_as_torch_does():
    caller, callee = run_workers(_failing_function_is_reported_on_the_callee, 2)
    assert caller["raised"] == "a message for the log"
    text = callee["stderr"]
    assert "On WorkerInfo(id=1, name=worker1):\nValueError('a message for the log')\nTraceback" in text, text
    assert "raise_value_error" in text and "a message for the log" not in caller["stderr"]


def _views_over_rpc(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        t = torch.rand(5, 5)
        view = t.narrow(1, 2, 2)
        back = rpc.rpc_sync("worker1", ident, args=(view,))
        out["narrow"] = (back.stride() == view.stride(), back.is_contiguous(), torch.equal(back, view))
        cl = torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last)
        back = rpc.rpc_sync("worker1", ident, args=(cl,))
        out["channels_last"] = (back.is_contiguous(memory_format=torch.channels_last), torch.equal(back, cl))
    rpc.shutdown()
    return out


def test_views_and_memory_formats_survive_the_trip():
    out = run_workers(_views_over_rpc, 2)[0]
    assert out == {"narrow": (True, False, True), "channels_last": (True, True)}


def _to_here_after_shutdown(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        rref = rpc.remote("worker1", torch.ones, args=(2,))
        out["before"] = rref.to_here().tolist()
    rpc.shutdown()
    if rank == 0:
        try:
            rref.to_here()
        except RuntimeError as e:
            out["after"] = str(e)
    return out


def test_to_here_after_shutdown_says_the_rref_was_deleted():
    out = run_workers(_to_here_after_shutdown, 2)[0]
    assert out["before"] == [1.0, 1.0]
    assert out["after"].startswith("Cannot call to_here() on it after deletion: UserRRef("), out


class _OtherOptions(rpc.RpcBackendOptions):
    pass


def test_init_rpc_argument_types_are_checked_as_torch_checks_them():
    with pytest.raises(TypeError, match="Could not infer backend for options"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=_OtherOptions())
    with pytest.raises(TypeError, match="Argument backend must be a member of BackendType"):
        rpc.init_rpc("w", backend="TENSORPIPE", rank=0, world_size=1)
    with pytest.raises(TypeError, match="Argument rpc_backend_options must be an instance of RpcBackendOptions"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options={"init_method": "env://"})
    assert rpc.api.current.get_agent_or_none() is None  # nothing was started


def _process_group_and_rpc(rank, world_size, pg_first):
    import torch.distributed as dist

    def pg():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)  # env://, the same port

    if pg_first:
        pg()
    init(rank, world_size)
    if not pg_first:
        pg()
    t = torch.ones(2) * (rank + 1)
    dist.all_reduce(t)
    out = {"all_reduce": t.tolist(), "rpc": rpc.rpc_sync(f"worker{(rank + 1) % world_size}", add, args=(rank, 100))}
    rpc.shutdown()
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("pg_first", [True, False], ids=["process_group_first", "rpc_first"])
def test_a_gloo_process_group_and_rpc_share_master_port(pg_first):
    outs = run_workers(_process_group_and_rpc, 2, args=(pg_first,))
    assert outs == [{"all_reduce": [3.0, 3.0], "rpc": 100}, {"all_reduce": [3.0, 3.0], "rpc": 101}]


def _function_only_on_the_caller(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        import types

        module = types.ModuleType("only_on_worker0")
        exec("def f():\n    return 1\n", module.__dict__)
        sys.modules["only_on_worker0"] = module
        try:
            rpc.rpc_sync("worker1", module.f)
        except RuntimeError as e:
            out["error"] = (type(e).__name__, str(e))
        out["still_serving"] = rpc.rpc_sync("worker1", add, args=(1, 1))
    rpc.shutdown()
    return out


def test_a_function_the_callee_lacks_gets_torchs_hint():
    out = run_workers(_function_only_on_the_caller, 2)[0]
    kind, msg = out["error"]
    assert kind == "SerializationError" and "Ensure that UDFs are defined on both caller and callee modules" in msg
    assert msg.startswith("RPC pickler does not serialize function code") and out["still_serving"] == 2


def test_worker_names_follow_torchs_rule():
    for bad, phrase in [("abc*", "Worker name must match"), (" ", "Worker name must match"),
                        ("", "must be non-empty"), ("a" * 500, "shorter than 128")]:
        with pytest.raises(RuntimeError, match=phrase):
            rpc.WorkerInfo(bad, 0)
        with pytest.raises(RuntimeError, match=phrase):
            rpc.init_rpc(bad, rank=0, world_size=1)
    assert rpc.WorkerInfo("trainer-3:gpu_0", 4).name == "trainer-3:gpu_0"


def _proxy_of_missing_method(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        rref = rpc.remote("worker1", torch.ones, args=(2,))
        for label, proxy in [("sync", lambda: rref.rpc_sync().non_exist()),
                             ("async", lambda: rref.rpc_async().non_exist().wait()),
                             ("remote", lambda: rref.remote().non_exist())]:
            try:
                proxy()
                out[label] = "no error"
            except AttributeError as e:
                out[label] = str(e)
        out["works"] = rref.rpc_sync().sum().item()
    rpc.shutdown()
    return out


def test_a_proxy_of_a_method_the_value_lacks_raises_attribute_error():
    out = run_workers(_proxy_of_missing_method, 2)[0]
    for label in ("sync", "async", "remote"):
        assert "has no attribute 'non_exist'" in out[label], out
    assert out["works"] == 2.0


def _late_starter(rank, world_size):
    if rank == 1:
        time.sleep(1.5)  # longer than the calls' timeout below
    init(rank, world_size, rpc_timeout=0.3)
    out = rpc.rpc_sync(f"worker{(rank + 1) % world_size}", whoami)
    rpc.shutdown()
    return out


def test_a_short_call_timeout_does_not_cut_start_up_short():
    """torch's start-up does not depend on rpc_timeout (torch's test_set_and_get_default_rpc_timeout
    sets 0.5 s): a worker that starts 1.5 s after the others still joins a job whose calls time
    out after 0.3 s."""
    assert run_workers(_late_starter, 2) == ["worker1", "worker0"]
