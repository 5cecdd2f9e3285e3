"""Sparse COO tensors in RPC and distributed autograd, as torch.distributed.rpc carries them.

Unit tests (no processes): the tensor codec's sparse kind, user payloads, the checks of
malformed sparse parts, and the autograd pieces (a sparse leaf's edge, adding gradients of
mixed layouts). Multi-process tests: sparse tensors as arguments and results of every kind of
call, distributed backward passes whose gradients are sparse (compared with local autograd),
a parameter server with ``nn.EmbeddingBag(sparse=True)`` trained through a
DistributedOptimizer, and peers sending malformed sparse tensors.
"""
from __future__ import annotations

import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchrpc as rpc
import torchrpc.autograd as dist_autograd
from common import init, whoami
from harness import run_workers
from torchrpc import serialization as ser
from torchrpc.errors import ProtocolError, SerializationError
from torchrpc.protocol import messages as m
from torchrpc.protocol.autograd_context import DistAutogradContext
from torchrpc.protocol.autograd_engine import add_grads, edge_of
from torchrpc.protocol.tensor_codec import DTYPES, decode_tensors, encode_tensors
from torchrpc.optim import DistributedOptimizer

pytestmark = pytest.mark.timeout(120)


# ======================================================================================
# Helpers
# ======================================================================================


def unchecked(indices, values, size, coalesced=False):
    """A sparse tensor built without torch's checks: what a faulty peer could send."""
    return torch.sparse_coo_tensor(torch.tensor(indices), torch.tensor(values), size, is_coalesced=coalesced,
                                   check_invariants=False)


def sparse(indices, values, size, requires_grad=False, dtype=None, coalesce=False):
    t = torch.sparse_coo_tensor(indices, values, size, dtype=dtype, check_invariants=True)
    if coalesce:
        t = t.coalesce()
    return t.requires_grad_(requires_grad)


def described(t):
    """What must survive the trip: layout, dtype, size, coalesced, requires_grad, indices, values."""
    if t is None or t.layout is torch.strided:
        return None if t is None else ("dense", t.dtype, tuple(t.shape), t.requires_grad, t.detach().tolist())
    values = t._values().detach()
    if values.dtype == torch.bfloat16:
        values = values.float()
    return ("sparse", t.dtype, tuple(t.shape), t.is_coalesced(), t.requires_grad, t._indices().tolist(),
            values.tolist())


def samples():
    """Sparse tensors of every kind the tests send."""
    i = [[0, 1, 1], [2, 0, 2]]
    return {
        "uncoalesced": sparse(i, [3.2, 4.1, 5.3], (3, 3)),
        "coalesced": sparse(i, [3.2, 4.1, 5.3], (3, 3), coalesce=True),
        "duplicates": sparse([[1, 0, 1]], [1.0, 2.0, 3.0], (4,)),
        "requires_grad": sparse(i, [3.2, 4.1, 5.3], (3, 3), requires_grad=True),
        "float64": sparse(i, [1.0, 2.0, 3.0], (2, 3), dtype=torch.float64),
        "int64": sparse(i, [3, 4, 5], (2, 3)),
        "bool": sparse(i, [True, False, True], (2, 3)),
        "complex64": sparse(i, [1 + 2j, 3j, 4.0], (2, 3), dtype=torch.complex64),
        "bfloat16": sparse(i, [1.5, 2.0, -3.0], (2, 3), dtype=torch.bfloat16),
        "hybrid": sparse([[0, 2]], torch.arange(8.0).reshape(2, 4), (3, 4), requires_grad=True),
        "empty": torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (5, 5),
                                         check_invariants=True),
        "large": sparse(torch.stack([torch.arange(20000) % 1000, torch.arange(20000) // 1000]),
                        torch.arange(20000.0), (1000, 20)),  # 320 KB of indices: buffers of their own
    }


# ======================================================================================
# 1. The tensor codec (gradients in BACKWARD_AUTOGRAD_REQ / _RET)
# ======================================================================================


def wire(buffers):
    return [bytearray(b) for b in buffers]


@st.composite
def sparse_tensors(draw):
    sparse_dim = draw(st.integers(0, 3))
    dense_dim = draw(st.integers(0, 2))
    size = draw(st.lists(st.integers(1, 5), min_size=sparse_dim + dense_dim, max_size=sparse_dim + dense_dim))
    nnz = draw(st.integers(0, 6)) if sparse_dim else draw(st.integers(0, 1))
    dtype = draw(st.sampled_from(DTYPES))
    indices = torch.stack([torch.tensor(draw(st.lists(st.integers(0, n - 1), min_size=nnz, max_size=nnz)),
                                        dtype=torch.long) for n in size[:sparse_dim]]) \
        if sparse_dim else torch.zeros(0, nnz, dtype=torch.long)
    values = (torch.randn(nnz, *size[sparse_dim:]) * 10).to(dtype)
    t = torch.sparse_coo_tensor(indices, values, size, check_invariants=True)
    return t.coalesce() if draw(st.booleans()) else t


tensor_lists = st.lists(st.one_of(st.none(), sparse_tensors(),
                                  st.integers(0, 5).map(lambda n: torch.arange(float(n)))), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_lists)
def test_codec_round_trip_of_sparse_tensors_among_dense_ones(tensors):
    got = decode_tensors(wire(encode_tensors(tensors)))
    assert [described(t) for t in got] == [described(t) for t in tensors]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_codec_sends_a_sparse_tensor_as_its_indices_and_values_without_pickle():
    t = samples()["hybrid"].detach().coalesce()
    meta, *data = encode_tensors([t])
    kind, code, ndim = struct.unpack_from("<BBB", meta)
    assert (kind, DTYPES[code], ndim) == (3, torch.float32, 2)
    assert struct.unpack_from("<2QBB", meta, 3) == (3, 4, 1, 1)  # size, sparse_dim, flags (coalesced)
    assert len(data) == 2  # the indices and the values, raw
    assert bytes(data[0]) == t._indices().numpy().tobytes()
    assert bytes(data[1]) == t._values().numpy().tobytes()
    # sparse gradients travel in the autograd messages
    msg = m.PropagateGradients(1, 2, 3, [4, 5], [t, None, torch.ones(2)])
    got = m.decode(wire(msg.encode()))
    assert [described(g) for g in got.grads] == [described(g) for g in msg.grads]
    # other sparse layouts, and dtypes the codec lacks, are refused
    with pytest.raises(TypeError):
        encode_tensors([torch.eye(3).to_sparse_csr()])
    with pytest.raises(TypeError):
        encode_tensors([torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.uint16),
                                                (2,), check_invariants=True)])


def _meta(size, sparse_dim=2, flags=0, code=0):
    return struct.pack(f"<BBB{len(size)}QBB", 3, code, len(size), *size, sparse_dim, flags)


def _dense(shape, code):
    return struct.pack(f"<BBB{len(shape)}Q", 1, code, len(shape), *shape)


I64, F32 = DTYPES.index(torch.int64), DTYPES.index(torch.float32)
IDX = torch.tensor([[0, 1], [2, 0]]).numpy().tobytes()
VAL = torch.tensor([1.0, 2.0]).numpy().tobytes()

MALFORMED_CODEC = {
    # what the metadata says, the data buffers, and what the error says
    "index out of range": (_meta((3, 3)) + _dense((2, 2), I64) + _dense((2,), F32),
                           [torch.tensor([[0, 5], [2, 0]]).numpy().tobytes(), VAL], "size is 3 but found index 5"),
    "negative index": (_meta((3, 3)) + _dense((2, 2), I64) + _dense((2,), F32),
                       [torch.tensor([[0, -1], [2, 0]]).numpy().tobytes(), VAL], "negative index"),
    "false coalesced claim": (_meta((3, 3), flags=1) + _dense((2, 2), I64) + _dense((2,), F32),
                              [torch.tensor([[1, 0], [0, 0]]).numpy().tobytes(), VAL], "uncoalesced"),
    "values of the wrong nnz": (_meta((3, 3)) + _dense((2, 2), I64) + _dense((3,), F32),
                                [IDX, VAL + VAL[:4]], "values of shape [3]"),
    "values of the wrong dense shape": (_meta((3, 3)) + _dense((2, 2), I64) + _dense((2, 2), F32),
                                        [IDX, VAL * 2], "values of shape [2, 2]"),
    "indices of the wrong sparse_dim": (_meta((3, 3), sparse_dim=1) + _dense((2, 2), I64) + _dense((2, 3), F32),
                                        [IDX, VAL * 3], "indices of shape [2, 2] for 1 sparse dimensions"),
    "sparse_dim over ndim": (_meta((3, 3), sparse_dim=3) + _dense((3, 2), I64) + _dense((2,), F32),
                             [IDX + IDX[:16], VAL], "cannot have 3 sparse dimensions"),
    "indices not int64": (_meta((3, 3)) + _dense((2, 2), F32) + _dense((2,), F32),
                          [VAL * 2, VAL], "indices must be int64"),
    "values of another dtype": (_meta((3, 3)) + _dense((2, 2), I64) + _dense((2,), I64),
                                [IDX, IDX[:16]], "with values of torch.int64"),
    "bad flags": (_meta((3, 3), flags=2) + _dense((2, 2), I64) + _dense((2,), F32), [IDX, VAL], "flags"),
    "no parts": (_meta((3, 3)), [], "followed by those of its indices and values"),
    "one part": (_meta((3, 3)) + _dense((2, 2), I64), [IDX], "followed by those of its indices and values"),
    "a None part": (_meta((3, 3)) + _dense((2, 2), I64) + b"\x00\x00\x00", [IDX],
                    "followed by those of its indices and values"),
    "sparse in sparse": (_meta((3, 3)) + _meta((3, 3)) + _dense((2, 2), I64) + _dense((2,), F32), [IDX, VAL],
                         "followed by those of its indices and values"),
    "truncated tail": (_meta((3, 3))[:-1], [], "truncated sparse"),
    "buffer too short": (_meta((3, 3)) + _dense((2, 2), I64) + _dense((2,), F32), [IDX[:-1], VAL],
                         "does not fit"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CODEC))
def test_codec_rejects_malformed_sparse_tensors(case):
    meta, data, needle = MALFORMED_CODEC[case]
    with pytest.raises(ProtocolError, match=re.escape(needle)):
        decode_tensors([meta, *wire(data)])
    # in a message: a ProtocolError too (answered with an error reply, see the last test)
    header = m.PropagateGradients(7, 2, 3, [4], []).encode()[:2]
    with pytest.raises(ProtocolError):
        m.decode([*header, meta, *wire(data)])


# ======================================================================================
# 2. User payloads (pickle, with the parts as out-of-band buffers)
# ======================================================================================


def roundtrip(obj, send=None, recv=None):
    p = ser.dumps(obj, send)
    return ser.loads(m.Payload(bytearray(p.data), wire(p.buffers)), recv)


def test_payload_round_trip_keeps_indices_values_size_coalesced_and_requires_grad():
    for name, t in samples().items():
        got = roundtrip(t)
        assert described(got) == described(t), name
        assert got.is_leaf, name


def test_payload_carries_the_parts_out_of_band_and_keeps_identity_and_parameters():
    t = samples()["requires_grad"]
    p = ser.dumps({"a": t, "b": t, "c": samples()["coalesced"]})
    assert len(p.buffers) == 4  # indices and values of each of the two tensors, once each
    assert b"_rebuild_sparse_tensor" not in bytes(p.data)  # not torch's pickling
    got = roundtrip({"a": t, "b": t})
    assert got["a"] is got["b"]
    param = torch.nn.Parameter(samples()["coalesced"])
    got = roundtrip(param)
    assert type(got) is torch.nn.Parameter and described(got) == described(param)


class _Record(ser.Session):
    def __init__(self):
        self.sent, self.received = [], []

    def on_send_tensor(self, tensor):
        self.sent.append(tensor)

    def on_recv_tensor(self, tensor):
        self.received.append(tensor)
        return tensor


def test_payload_records_sparse_tensors_that_require_grad_as_dense_ones():
    grad, plain = samples()["requires_grad"], samples()["coalesced"]
    send, recv = _Record(), _Record()
    got = roundtrip((grad, plain, torch.ones(2, requires_grad=True)), send, recv)
    assert send.sent[0] is grad and len(send.sent) == 2
    assert recv.received[0] is got[0] and recv.received[1] is got[2] and len(recv.received) == 2


class _Forged:
    """Pickles as a call to the sparse rebuild with the given parts (a peer's forged payload)."""

    def __init__(self, *parts):
        self.parts = parts

    def __reduce__(self):
        return ser._rebuild_sparse, self.parts


IDX_T = torch.tensor([[0, 1], [2, 0]])
MALFORMED_TENSORS = {
    "index out of range": (unchecked([[0, 1], [2, 9]], [1.0, 2.0], (3, 3)), "found index 9"),
    "negative index": (unchecked([[0, -1], [2, 0]], [1.0, 2.0], (3, 3)), "negative index"),
    "false coalesced claim": (unchecked([[1, 0]], [1.0, 2.0], (3,), coalesced=True), "uncoalesced"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_TENSORS))
def test_payload_with_a_malformed_sparse_tensor_is_a_serialization_error(case):
    t, needle = MALFORMED_TENSORS[case]  # what a peer could send: torch builds these unchecked
    with pytest.raises(SerializationError, match=f"invalid sparse tensor .*{needle}"):
        roundtrip([t])


MALFORMED_PAYLOAD = {
    "index out of range": (torch.tensor([[0, 1], [2, 9]]), torch.ones(2), (3, 3), False, False),
    "wrong nnz": (IDX_T, torch.ones(3), (3, 3), False, False),
    "false coalesced claim": (torch.tensor([[1, 0], [0, 0]]), torch.ones(2), (3, 3), True, False),
    "int32 indices": (IDX_T.int(), torch.ones(2), (3, 3), False, False),
    "not tensors": ([[0, 1], [2, 0]], torch.ones(2), (3, 3), False, False),
    "negative size": (IDX_T, torch.ones(2), (3, -3), False, False),
    "sparse values": (IDX_T, torch.ones(2).to_sparse(), (3, 3), False, False),
    "parts that require grad": (IDX_T, torch.ones(2, requires_grad=True), (3, 3), False, True),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_PAYLOAD))
def test_payload_with_malformed_sparse_parts_is_a_serialization_error(case):
    with pytest.raises(SerializationError,
                       match="cannot unpickle payload: ValueError: (invalid|bad) sparse tensor|sparse tensor "
                             "(parts|indices|values)"):
        roundtrip(_Forged(*MALFORMED_PAYLOAD[case]), recv=_Record())


# ======================================================================================
# 3. Autograd pieces: a sparse leaf's edge, gradients of mixed layouts
# ======================================================================================


def test_a_sparse_leaf_has_its_accumulator_as_edge():
    for t in (samples()["requires_grad"], samples()["hybrid"], torch.ones(()).to_sparse().requires_grad_()):
        node, nr = edge_of(t)
        assert type(node).__name__ == "AccumulateGrad" and node.variable is t and nr == 0
    y = samples()["requires_grad"] * 2
    assert edge_of(y) == (y.grad_fn, 0)


def test_gradients_of_mixed_layouts_add_up_as_accumulate_grad_adds_them():
    s = samples()["uncoalesced"]
    d = torch.ones(3, 3)
    assert add_grads(s, d).layout is torch.strided and torch.equal(add_grads(s, d), d + s.to_dense())
    assert add_grads(d, s).layout is torch.strided
    assert add_grads(s, s).layout is torch.sparse_coo and torch.equal(add_grads(s, s).to_dense(), 2 * s.to_dense())
    leaf = torch.zeros(3, 3, requires_grad=True)
    for first, second, layout in ((s, s, torch.sparse_coo), (s, d, torch.strided), (d, s, torch.strided)):
        ctx = DistAutogradContext(1)
        ctx.accumulate([(leaf, first)])
        ctx.accumulate([(leaf, second)])
        assert ctx.grads[leaf].layout is layout
        assert torch.equal(ctx.grads[leaf].to_dense() if layout is torch.sparse_coo else ctx.grads[leaf],
                           first.to_dense() + second.to_dense())
    ctx = DistAutogradContext(1)
    assert ctx.nbytes() == 0
    ctx.grads[leaf] = torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (1 << 30, 1 << 30),
                                              check_invariants=True)
    assert ctx.nbytes() == 2 * 8 + 4  # a sparse gradient holds its indices and values, not its size


# ======================================================================================
# 4. Multi-process: RPC
# ======================================================================================


def seen(t):
    """On the callee: what it received."""
    return described(t)


def make_samples():
    return samples()


def _rpc_round_trips(rank, world_size):
    init(rank, world_size)
    out = {}
    if rank == 0:
        sent = samples()
        for name, t in sent.items():
            want = described(t)
            got = {
                "rpc_sync": described(rpc.rpc_sync("worker1", _ident, args=(t,))),
                "rpc_async": described(rpc.rpc_async("worker1", _ident, args=(t,)).wait()),
                "remote": described(rpc.remote("worker1", _ident, args=(t,)).to_here()),
                "self": described(rpc.rpc_sync("worker0", _ident, args=(t,))),
                "callee_sees": rpc.rpc_sync("worker1", seen, args=(t,)),
            }
            out[name] = {k: v == want for k, v in got.items()}
        made = rpc.rpc_sync("worker1", make_samples)  # sparse results made on the callee
        in_container = rpc.remote("worker1", make_samples).to_here()
        out["results"] = [described(made[k]) == described(v) and described(in_container[k]) == described(v)
                          for k, v in sent.items()]
    rpc.shutdown()
    return out


def _ident(x):
    return x


def test_sparse_tensors_arrive_equal_as_arguments_and_results_of_every_kind_of_call():
    out = run_workers(_rpc_round_trips, 2, timeout=90)[0]
    results = out.pop("results")
    assert results == [True] * len(results)
    for name, by_call in out.items():
        assert all(by_call.values()), (name, by_call)


# ======================================================================================
# 5. Multi-process: distributed autograd with sparse tensors and gradients
# ======================================================================================


def sp(requires_grad=True, dtype=torch.float32, coalesce=False):
    return sparse([[0, 1, 1], [2, 0, 2]], [3.2, 4.1, 5.3], (3, 3), requires_grad, dtype, coalesce)


def nested_add(t1, t2, to):
    """On worker1: t1 * 2 goes on to ``to``, which adds t2; the sum comes back through here."""
    return rpc.rpc_sync(to, torch.add, args=(t1 * 2, t2))


def udf_mul(t1, t2):
    return torch.mul(t1, t2) * 3


def bag(weight, inputs, offsets):
    """On worker1: an embedding bag over a weight that came from the caller: its gradient is sparse."""
    return torch.nn.functional.embedding_bag(inputs, weight, offsets, mode="sum", sparse=True)


def context_sends(cid):
    ctx = rpc.api.current.agent().autograd.contexts.get(cid)
    return [[t.layout is torch.sparse_coo for t in ex.tensors] for ex in ctx.sends.values()]


def _same(a, b):
    return a is not None and b is not None and a.layout == b.layout and torch.allclose(a.to_dense(), b.to_dense())


def _dist_autograd(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        def run(name, forward, make):
            """``forward(call_or_local, *leaves)`` -> loss; compare get_gradients with local autograd."""
            leaves = make()
            wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
            local = dict(zip(wanted, torch.autograd.grad(forward(False, *leaves), [leaves[i] for i in wanted])))
            leaves = make()
            with dist_autograd.context() as cid:
                loss = forward(True, *leaves)
                dist_autograd.backward(cid, [loss])
                grads = dist_autograd.get_gradients(cid)
                # a leaf that needs no gradient must get none
                out[name] = [_same(grads.get(t), local[i]) if i in local else t not in grads
                             for i, t in enumerate(leaves)]
                out[name + " sends"] = context_sends(cid)

        def remote_add(dist, t1, t2):
            ret = rpc.rpc_sync("worker1", torch.add, args=(t1, t2)) if dist else t1 + t2
            return torch.sparse.sum(ret)

        def remote_rref(dist, t1, t2):
            ret = rpc.remote("worker1", torch.add, args=(t1, t2)).to_here() if dist else t1 + t2
            return torch.sparse.sum(ret)

        def nested(dist, t1, t2):  # sparse gradients travel 0 <- 1 <- 2 and back to 0's sends
            ret = rpc.rpc_sync("worker1", nested_add, args=(t1, t2, "worker2")) if dist else t1 * 2 + t2
            return torch.sparse.sum(ret)

        def python_udf(dist, t1, t2):
            ret = rpc.rpc_sync("worker1", udf_mul, args=(t1, t2)) if dist else udf_mul(t1, t2)
            return torch.sparse.sum(ret)

        def dense_weight_sparse_grad(dist, w):  # a dense tensor sent, its gradient comes back sparse
            inputs, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4])
            ret = rpc.rpc_sync("worker1", bag, args=(w, inputs, offsets)) if dist else bag(w, inputs, offsets)
            return ret.sum()

        def mixed_layouts(dist, w):  # one leaf, a sparse and a dense gradient
            return dense_weight_sparse_grad(dist, w) + (w ** 2).sum()

        def weight():
            return [torch.arange(160.0).reshape(10, 16).div(100).requires_grad_()]

        run("rpc_sync", remote_add, lambda: [sp(), sp()])
        run("remote", remote_rref, lambda: [sp(), sp()])
        run("nested", nested, lambda: [sp(), sp()])
        run("python_udf", python_udf, lambda: [sp(coalesce=True), sp()])
        run("float64", remote_add, lambda: [sp(dtype=torch.float64), sp(dtype=torch.float64)])
        run("mixed requires_grad", remote_add, lambda: [sp(), sp(requires_grad=False)])
        run("dense weight, sparse gradient", dense_weight_sparse_grad, weight)
        run("sparse and dense gradients of one leaf", mixed_layouts, weight)

        # two passes of one context: the sparse gradients of a leaf add up
        l1 = sp()
        local_loss = remote_add(False, l1, sp())
        local_loss.backward(retain_graph=True)
        local_loss.backward()
        t1, t2 = sp(), sp()
        with dist_autograd.context() as cid:
            loss = remote_add(True, t1, t2)
            dist_autograd.backward(cid, [loss], retain_graph=True)
            dist_autograd.backward(cid, [loss])
            g = dist_autograd.get_gradients(cid)[t1]
            out["two passes"] = _same(g, l1.grad) and not torch.equal(l1.grad.to_dense(), torch.zeros(3, 3))
    rpc.shutdown()
    return out


def test_distributed_backward_through_sparse_tensors_gives_local_autograds_gradients():
    out = run_workers(_dist_autograd, 3, timeout=90)[0]
    for name in ("rpc_sync", "remote", "nested", "python_udf", "float64"):
        assert out[name] == [True, True], (name, out[name])
        assert out[name + " sends"] == [[True, True]], (name, out[name + " sends"])  # recorded: one send, 2 tensors
    assert out["mixed requires_grad"] == [True, True]  # the leaf that needs no gradient gets none
    assert out["mixed requires_grad sends"] == [[True]]  # only the tensor that requires grad is recorded
    assert out["dense weight, sparse gradient"] == [True]
    assert out["sparse and dense gradients of one leaf"] == [True]
    assert out["two passes"] is True


# ======================================================================================
# 6. Multi-process: a parameter server with a sparse embedding, trained from a trainer
# ======================================================================================


def make_bag():
    torch.manual_seed(0)
    return torch.nn.EmbeddingBag(16, 16, mode="sum", sparse=True)


def call_bag(rref, inputs, offsets, weights):
    return rref.local_value()(inputs, offsets, weights)


def bag_square(rref):
    return (rref.local_value().weight ** 2).sum()


def bag_weight_param(rref):
    """The parameter itself (it requires grad: the reply records a send on the server)."""
    return rref.local_value().weight


def bag_grad(rref, cid):
    """On the parameter server: the layout and value of the weight's gradient in ``cid``."""
    g = dist_autograd.get_gradients(cid).get(rref.local_value().weight)
    return None if g is None else (g.layout is torch.sparse_coo, g)


def bag_weight(rref):
    return rref.local_value().weight.detach().clone()


def bag_param(rref):
    return rpc.RRef(rref.local_value().weight)


INPUTS, OFFSETS = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4])


def _losses(mode, weights, bag=None, ps=None):
    """The two losses of a step (two backward passes), locally (``bag``) or from the trainer (``ps``).

    remote:  the server runs the bag, twice: two sparse gradients add up on the server
    fetched: the trainer fetches the weight and runs the bag itself: the sparse gradients cross
             the wire back to the server
    mixed:   a sparse gradient, then a dense one (the weight squared): their sum is dense
    """
    if mode == "fetched":
        w = bag.weight if bag is not None else rpc.rpc_sync("worker1", bag_weight_param, args=(ps,))
        loss = torch.nn.functional.embedding_bag(INPUTS, w, OFFSETS, mode="sum", sparse=True,
                                                 per_sample_weights=weights).sum()
        return loss, loss
    loss = bag(INPUTS, OFFSETS, weights).sum() if bag is not None else \
        rpc.rpc_sync("worker1", call_bag, args=(ps, INPUTS, OFFSETS, weights)).sum()
    if mode == "remote":
        return loss, loss
    return loss, (bag.weight ** 2).sum() if bag is not None else rpc.rpc_sync("worker1", bag_square, args=(ps,))


def _parameter_server(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        for mode in ("remote", "fetched", "mixed"):
            # local reference: two backward passes, then one SGD step
            local = make_bag()
            lw = torch.rand(8, generator=torch.Generator().manual_seed(1), requires_grad=True)
            first, second = _losses(mode, lw, bag=local)
            first.backward(retain_graph=True)
            second.backward()
            local_grad = local.weight.grad
            torch.optim.SGD(local.parameters(), lr=0.05).step()

            ps = rpc.remote("worker1", make_bag)
            weights = torch.rand(8, generator=torch.Generator().manual_seed(1), requires_grad=True)
            with dist_autograd.context() as cid:
                first, second = _losses(mode, weights, ps=ps)
                dist_autograd.backward(cid, [first], retain_graph=True)
                dist_autograd.backward(cid, [second])  # the gradients of two passes accumulate
                is_sparse, grad = rpc.rpc_sync("worker1", bag_grad, args=(ps, cid))
                opt = DistributedOptimizer(torch.optim.SGD, [rpc.rpc_sync("worker1", bag_param, args=(ps,))],
                                           lr=0.05)
                opt.step(cid)
                out[mode] = {
                    "sparse": is_sparse,
                    "grad": _same(grad, local_grad),
                    "trainer grad": torch.allclose(dist_autograd.get_gradients(cid)[weights], lw.grad),
                    "stepped": torch.allclose(rpc.rpc_sync("worker1", bag_weight, args=(ps,)), local.weight),
                }
    rpc.shutdown()
    return out


def test_parameter_server_with_a_sparse_embedding_bag_trains_as_locally():
    out = run_workers(_parameter_server, 2, timeout=90)[0]
    assert out["remote"] == {"sparse": True, "grad": True, "trainer grad": True, "stepped": True}
    assert out["fetched"] == {"sparse": True, "grad": True, "trainer grad": True, "stepped": True}
    assert out["mixed"] == {"sparse": False, "grad": True, "trainer grad": True, "stepped": True}  # sparse + dense


# ======================================================================================
# 7. Multi-process: peers sending malformed sparse tensors
# ======================================================================================


def make_bad():
    return unchecked([[0, 7]], [1.0, 2.0], (3,))


class _Raw:
    """A hand-made frame for ``agent.control`` (the agent sets ``msg_id`` before ``encode``)."""

    def __init__(self, build):
        self.build = build
        self.msg_id = 0

    def encode(self):
        return self.build(self.msg_id)


def _malformed(rank, world_size):
    init(rank, world_size, rpc_timeout=30)
    out = {}
    if rank == 0:
        agent = rpc.api.current.agent()

        def error_of(fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                return f"{type(e).__name__}: {e}"
            return None

        bad_arg = unchecked([[0, 1], [2, 9]], [1.0, 2.0], (3, 3))
        out["argument"] = error_of(lambda: rpc.rpc_sync("worker1", _ident, args=(bad_arg,)))
        out["claimed coalesced"] = error_of(
            lambda: rpc.rpc_sync("worker1", _ident, args=(unchecked([[1, 0]], [1.0, 2.0], (3,), True),)))
        out["result"] = error_of(lambda: rpc.rpc_sync("worker1", make_bad))
        out["remote result"] = error_of(lambda: rpc.remote("worker1", make_bad).to_here())

        t1, t2 = sp(), sp()
        with dist_autograd.context() as cid:
            loss = torch.sparse.sum(rpc.rpc_sync("worker1", torch.add, args=(t1, t2)))
            ctx = agent.autograd.contexts.get(cid)
            (recv_id,), = [list(ctx.recvs)]
            # a gradient for worker1's send whose index is out of range, in a real BACKWARD_AUTOGRAD_REQ
            good = m.PropagateGradients(0, cid, 1, [recv_id], [sp(False)], True, False)
            bad_meta = _meta((3, 3)) + _dense((2, 2), I64) + _dense((2,), F32)
            bad_data = [torch.tensor([[0, 3], [2, 0]]).numpy().tobytes(), VAL]

            def forged(mid):
                good.msg_id = mid
                return [*good.encode()[:2], bad_meta, *bad_data]

            out["gradient"] = error_of(lambda: agent.control(1, _Raw(forged)).wait())
            # one with a gradient that torch would refuse to build: sent as is (the sender does not check)
            bad_grad = unchecked([[0, 1], [2, 5]], [1.0, 2.0], (3, 3))
            out["gradient tensor"] = error_of(lambda: agent.control(
                1, m.PropagateGradients(0, cid, 1, [recv_id], [bad_grad], True, False)).wait())
            # worker1 carries on, and a real backward in this context works
            out["whoami"] = rpc.rpc_sync("worker1", whoami)
            dist_autograd.backward(cid, [loss])
            g = dist_autograd.get_gradients(cid)
            l1 = sp()
            local, = torch.autograd.grad(torch.sparse.sum(l1 + sp()), [l1])
            out["backward"] = _same(g[t1], local)
    rpc.shutdown()
    return out


def test_malformed_sparse_tensors_from_a_peer_are_refused_and_the_worker_carries_on():
    out = run_workers(_malformed, 2, timeout=90)[0]
    for case in ("argument", "claimed coalesced", "result", "remote result", "gradient", "gradient tensor"):
        assert out[case] is not None and "sparse" in out[case], (case, out[case])
    assert "found index 9" in out["argument"]
    assert "uncoalesced" in out["claimed coalesced"]
    assert "found index 3" in out["gradient"]
    assert "found index 5" in out["gradient tensor"]
    assert out["whoami"] == "worker1"
    assert out["backward"] is True
