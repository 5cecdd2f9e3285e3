"""Unit tests of src/torchrpc/serialization.py: pickle protocol 5, tensors out of band."""
from __future__ import annotations

import ctypes
import gc
import pickle
import threading

import numpy as np
import pytest
import torch

import torchrpc
from torchrpc import serialization as ser
from torchrpc.errors import RPCError, SerializationError
from torchrpc.protocol.messages import GloballyUniqueId as Gid
from torchrpc.protocol.messages import Payload
from torchrpc.protocol.rref_context import ForkData, OwnerRRef, RRefContext

pytestmark = pytest.mark.timeout(60)


def wire(p: Payload) -> Payload:
    """What the receiver gets: the stream and each buffer in its own fresh bytearray."""
    return Payload(bytearray(p.data), [bytearray(b) for b in p.buffers])


def roundtrip(obj, send_session=None, recv_session=None):
    return ser.loads(wire(ser.dumps(obj, send_session)), recv_session)


def addr_of_buffer(buf) -> int:
    """The address of the first byte of a (non-empty) buffer."""
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8).ctypes.data


def addr_of_bytearray(ba: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * 1).from_buffer(ba))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe; works for every dtype)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ca = a.resolve_conj().resolve_neg().contiguous()
    cb = b.resolve_conj().resolve_neg().contiguous()
    return torch.equal(ca.reshape(-1).view(torch.uint8), cb.reshape(-1).view(torch.uint8))


DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
    torch.bool, torch.complex64, torch.complex128,
]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def sample(dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


# --- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_dtypes(dtype):
    t = sample(dtype)
    r = roundtrip(t)
    assert type(r) is torch.Tensor
    assert same_bits(r, t)
    assert not r.requires_grad
    assert r.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_zero_dim(dtype):
    t = sample(dtype, ())
    r = roundtrip(t)
    assert r.dim() == 0 and r.shape == torch.Size([])
    assert same_bits(r, t)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)])
def test_roundtrip_empty(shape):
    for dtype in (torch.float32, torch.int64, torch.bool):
        t = torch.empty(shape, dtype=dtype)
        p = ser.dumps(t)
        assert len(p.buffers) == 1
        r = ser.loads(wire(p))
        assert r.shape == t.shape and r.dtype == dtype


def test_roundtrip_non_contiguous():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    cases = {
        "transposed": base.t(),
        "sliced_offset": base[2:5, 3:],
        "strided": base[::2, ::3],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),
        "offset_1d": base.reshape(-1)[7:19],  # contiguous with storage offset
        "permuted_3d": torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1),
    }
    for name, t in cases.items():
        r = roundtrip(t)
        assert r.shape == t.shape, name
        assert torch.equal(r, t), name
        assert r.stride() == t.stride() and r.is_contiguous() == t.is_contiguous(), name  # as torch keeps them
        # only the storage the view covers travels, not the whole base storage
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        assert r.untyped_storage().nbytes() == span * t.element_size(), name


def test_roundtrip_conj_and_neg_views():
    z = torch.randn(4, 3, dtype=torch.complex64)
    zc = z.conj()
    assert zc.is_conj()
    r = roundtrip(zc)
    assert not r.is_conj()
    assert torch.equal(r, z.conj_physical())
    neg = zc.imag  # a negative view of a float tensor
    assert neg.is_neg()
    r2 = roundtrip(neg)
    assert not r2.is_neg()
    assert torch.equal(r2, -z.imag)
    # conj view that is also non-contiguous
    r3 = roundtrip(zc.t())
    assert torch.equal(r3, z.conj_physical().t())


def test_requires_grad_preserved():
    leaf = torch.randn(3, 4, requires_grad=True)
    r = roundtrip(leaf)
    assert r.requires_grad and r.is_leaf and r.grad_fn is None
    assert torch.equal(r.detach(), leaf.detach())
    nonleaf = leaf * 2
    r = roundtrip(nonleaf)
    assert r.requires_grad
    assert torch.equal(r.detach(), nonleaf.detach())
    plain = torch.randn(3)
    assert not roundtrip(plain).requires_grad
    # a received tensor is usable in autograd on the receiving side
    r = roundtrip(leaf)
    r.sum().backward()
    assert torch.equal(r.grad, torch.ones(3, 4))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_parameter_stays_parameter(requires_grad):
    p = torch.nn.Parameter(torch.randn(2, 3), requires_grad=requires_grad)
    r = roundtrip(p)
    assert type(r) is torch.nn.Parameter
    assert r.requires_grad is requires_grad
    assert torch.equal(r.detach(), p.detach())
    # also inside a module's state
    lin = torch.nn.Linear(3, 2)
    r = roundtrip(dict(lin.named_parameters()))
    assert set(r) == {"weight", "bias"}
    assert all(type(v) is torch.nn.Parameter for v in r.values())
    assert torch.equal(r["weight"].detach(), lin.weight.detach())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_other_layouts_fall_back_to_torch_pickling():
    sp = torch.eye(4).to_sparse_csr()  # sparse COO has its own reducer: see test_sparse.py
    r = roundtrip(sp)
    assert r.layout == torch.sparse_csr
    assert torch.equal(r.to_dense(), torch.eye(4))


# --- out of band ------------------------------------------------------------------


def test_tensors_are_out_of_band():
    t = torch.randn(1 << 18)  # 1 MiB
    assert t.nbytes == 1 << 20
    p = ser.dumps(t)
    assert len(p.data) < 1024, f"pickle stream is {len(p.data)} bytes: tensor data went in-band"
    assert len(p.buffers) == 1
    assert memoryview(p.buffers[0]).nbytes == 1 << 20
    assert p.nbytes == len(p.data) + (1 << 20)


def test_one_buffer_per_tensor_in_nested_containers():
    tensors = [torch.randn(100) for _ in range(5)] + [torch.empty(0), torch.tensor(7)]
    obj = {
        "a": [tensors[0], {"b": (tensors[1], tensors[2])}],
        "c": {"d": [tensors[3], "text", 42, None]},
        "e": (tensors[4], [tensors[5], tensors[6]]),
        "f": 3.5,
    }
    p = ser.dumps(obj)
    assert len(p.buffers) == len(tensors)
    assert len(p.data) < 1024
    r = ser.loads(wire(p))
    assert torch.equal(r["a"][0], tensors[0])
    assert torch.equal(r["a"][1]["b"][0], tensors[1]) and torch.equal(r["a"][1]["b"][1], tensors[2])
    assert torch.equal(r["c"]["d"][0], tensors[3]) and r["c"]["d"][1:] == ["text", 42, None]
    assert torch.equal(r["e"][0], tensors[4])
    assert r["e"][1][0].shape == (0,) and r["e"][1][1].item() == 7
    assert r["f"] == 3.5
    assert isinstance(r["e"], tuple)


def test_same_tensor_twice_travels_once_and_stays_shared():
    t = torch.randn(10)
    p = ser.dumps([t, t, {"again": t}])
    assert len(p.buffers) == 1
    r = ser.loads(wire(p))
    assert r[0] is r[1] is r[2]["again"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_copy_send_contiguous(dtype):
    t = sample(dtype, (64, 3))
    p = ser.dumps(t)
    assert addr_of_buffer(p.buffers[0]) == t.data_ptr()
    assert memoryview(p.buffers[0]).nbytes == t.nbytes


def test_zero_copy_send_contiguous_slice_with_offset_and_requires_grad():
    base = torch.arange(1000, dtype=torch.float64)
    t = base[100:600]
    assert t.storage_offset() == 100 and t.is_contiguous()
    p = ser.dumps(t)
    assert addr_of_buffer(p.buffers[0]) == t.data_ptr() == base.data_ptr() + 800
    assert memoryview(p.buffers[0]).nbytes == 500 * 8
    g = torch.randn(50, requires_grad=True)
    assert addr_of_buffer(ser.dumps(g).buffers[0]) == g.data_ptr()
    prm = torch.nn.Parameter(torch.randn(50))
    assert addr_of_buffer(ser.dumps(prm).buffers[0]) == prm.data_ptr()


def test_a_non_contiguous_view_is_sent_from_its_storage_without_a_copy():
    base = torch.arange(100, dtype=torch.int32).reshape(10, 10)
    t = base.t()
    p = ser.dumps(t)
    mv = memoryview(p.buffers[0])
    assert mv.nbytes == 400 and addr_of_buffer(mv) == base.data_ptr()  # the storage itself
    assert np.array_equal(np.frombuffer(mv, dtype=np.int32), base.reshape(-1).numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_copy_receive(dtype):
    t = sample(dtype, (8, 5))
    p = ser.dumps(t)
    ba = bytearray(p.buffers[0])
    addr = addr_of_bytearray(ba)
    r = ser.loads(Payload(bytes(p.data), [ba]))
    assert r.data_ptr() == addr
    assert same_bits(r, t)


def test_zero_copy_receive_shares_memory_and_keeps_it_alive():
    t = torch.arange(16, dtype=torch.float32)
    p = ser.dumps({"x": t, "y": torch.zeros(3)})
    bufs = [bytearray(b) for b in p.buffers]
    addrs = [addr_of_bytearray(b) for b in bufs]
    r = ser.loads(Payload(bytearray(p.data), bufs))
    assert sorted([r["x"].data_ptr(), r["y"].data_ptr()]) == sorted(addrs)
    # the tensor is a view of the received buffer: writes go both ways
    xbuf = bufs[addrs.index(r["x"].data_ptr())]
    r["x"][0] = 42.0
    assert np.frombuffer(xbuf, dtype=np.float32)[0] == 42.0
    np.frombuffer(xbuf, dtype=np.float32)[1] = -1.0
    assert r["x"][1].item() == -1.0
    # dropping every other reference to the buffer does not free the tensor's memory
    x = r["x"]
    del r, bufs, xbuf, p
    gc.collect()
    junk = [bytearray(b"\xff" * 64) for _ in range(1000)]
    assert x[0].item() == 42.0 and x[1].item() == -1.0
    assert torch.equal(x[2:], torch.arange(2, 16, dtype=torch.float32))
    del junk


def test_read_only_buffers_are_copied():
    t = torch.arange(10, dtype=torch.int64)
    p = ser.dumps(t)
    ro = bytes(p.buffers[0])
    r = ser.loads(Payload(bytes(p.data), [ro]))
    assert torch.equal(r, t)
    r[0] = 99  # writable, and does not write into the immutable bytes
    assert ro[0] == 0


def test_in_band_pickle_without_buffer_callback_is_not_produced():
    # the stream cannot be loaded without its buffers: they really are out of band
    p = ser.dumps(torch.randn(10))
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(p.data)


# --- errors -----------------------------------------------------------------------


def test_unpicklable_lambda():
    with pytest.raises(SerializationError) as ei:
        ser.dumps({"f": lambda x: x})
    msg = str(ei.value)
    assert "lambda" in msg
    assert "cannot pickle" in msg
    assert isinstance(ei.value, RPCError) and isinstance(ei.value, TypeError)
    assert ei.value.__cause__ is not None


def test_unpicklable_lock():
    with pytest.raises(SerializationError, match="lock"):
        ser.dumps([1, 2, threading.Lock()])


def test_serialization_error_message_is_bounded():
    big = ["x" * 50] * 1000 + [threading.Lock()]
    with pytest.raises(SerializationError) as ei:
        ser.dumps(big)
    assert len(str(ei.value)) < 1000


def test_session_restored_after_failed_dumps():
    outer = ser.Session()
    seen = []

    class Probe:
        def __reduce__(self):
            seen.append(ser.current_session())
            return (int, (1,))

    # a failing dumps inside another dumps leaves the outer session in place
    class Nested:
        def __reduce__(self):
            try:
                ser.dumps(threading.Lock(), ser.Session())
            except SerializationError:
                pass
            seen.append(ser.current_session())
            return (int, (2,))

    ser.dumps([Probe(), Nested(), Probe()], outer)
    assert seen == [outer, outer, outer]
    assert ser.current_session() is None


def _owner_rref():
    sent = []
    ctx = RRefContext(0, lambda dest, msg, on_done: sent.append((dest, msg)))
    handle = ctx.create_owner(1)
    return torchrpc.rref.RRef._wrap(handle), sent


def test_pickling_rref_outside_rpc_is_a_clear_error():
    rref, sent = _owner_rref()
    for session in (None, ser.Session()):
        with pytest.raises(SerializationError, match="Can not pickle rref in python pickler"):
            ser.dumps({"r": rref}, session)
    with pytest.raises(RPCError, match="Can not pickle rref in python pickler"):
        pickle.dumps(rref)
    with pytest.raises(RPCError, match="Can not pickle rref in python pickler"):
        pickle.dumps([rref], protocol=5)
    assert sent == []


def test_rref_travels_through_session_hooks():
    rref, _ = _owner_rref()
    fork = ForkData(0, Gid(0, 1), Gid(0, 2), 0)
    received = object()

    class Send(ser.Session):
        def __init__(self):
            self.handles = []

        def fork_rref(self, handle):
            self.handles.append(handle)
            return fork

    class Recv(ser.Session):
        def __init__(self):
            self.forks = []

        def rref_from_fork(self, f):
            self.forks.append(f)
            return received

    send = Send()
    p = ser.dumps([rref, torch.ones(2)], send)
    assert send.handles == [rref._handle]
    assert isinstance(rref._handle, OwnerRRef)
    # unpickling an RRef outside RPC is refused too
    with pytest.raises(RPCError, match="unpickled"):
        ser.loads(wire(p))
    recv = Recv()
    out = ser.loads(wire(p), recv)
    assert recv.forks == [fork]
    assert isinstance(out[0], torchrpc.RRef) and out[0]._handle is received
    assert torch.equal(out[1], torch.ones(2))


# --- sessions ---------------------------------------------------------------------


class Recording(ser.Session):
    def __init__(self):
        self.sent = []
        self.received = []
        self.replacements = []

    def on_send_tensor(self, tensor):
        assert ser.current_session() is self
        self.sent.append(tensor)

    def on_recv_tensor(self, tensor):
        assert ser.current_session() is self
        assert tensor.requires_grad
        self.received.append(tensor)
        out = tensor * 1  # a different tensor object, as distributed autograd would attach
        self.replacements.append(out)
        return out


def test_session_on_send_tensor_only_for_tensors_requiring_grad():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    c = torch.randn(2, requires_grad=True)
    s = Recording()
    ser.dumps({"a": a, "b": b, "c": [c, a]}, s)
    assert len(s.sent) == 2
    assert s.sent[0] is a and s.sent[1] is c
    assert ser.current_session() is None


def test_session_on_recv_tensor_result_is_used():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    p = ser.dumps([a, b])
    s = Recording()
    out = ser.loads(wire(p), s)
    assert len(s.received) == 1
    assert out[0] is s.replacements[0]
    assert torch.equal(s.received[0].detach(), a.detach())
    assert out[1].requires_grad is False and torch.equal(out[1], b)
    assert ser.current_session() is None


def test_base_session_is_a_no_op():
    a = torch.randn(3, requires_grad=True)
    r = roundtrip(a, ser.Session(), ser.Session())
    assert r.requires_grad and r.is_leaf and torch.equal(r.detach(), a.detach())


def test_session_hooks_symmetric_for_parameters():
    # a Parameter that requires grad is reported on both sides, like any such tensor
    prm = torch.nn.Parameter(torch.randn(3))
    send, recv = Recording(), Recording()
    p = ser.dumps(prm, send)
    assert len(send.sent) == 1 and send.sent[0] is prm
    out = ser.loads(wire(p), recv)
    assert len(recv.received) == 1
    assert torch.equal(recv.received[0].detach(), prm.detach())
    assert out is recv.replacements[0]
    # one that does not require grad is reported on neither side
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    send, recv = Recording(), Recording()
    out = ser.loads(wire(ser.dumps(frozen, send)), recv)
    assert send.sent == [] and recv.received == []
    assert type(out) is torch.nn.Parameter and not out.requires_grad


def test_session_is_per_thread_and_per_call():
    s = Recording()
    seen = {}

    class Probe:
        def __init__(self, key):
            self.key = key

        def __reduce__(self):
            seen[self.key] = ser.current_session()
            return (str, (self.key,))

    def other():
        ser.dumps(Probe("thread"))

    class Starter:
        def __reduce__(self):
            th = threading.Thread(target=other)
            th.start()
            th.join(10)
            return (str, ("s",))

    ser.dumps([Probe("main"), Starter()], s)
    assert seen == {"main": s, "thread": None}
    assert ser.current_session() is None

    # loads sees its own session
    _LOADS_SEEN.clear()
    p = ser.dumps(_SeesLoadsSession())
    assert ser.loads(wire(p), s) == "rebuilt"
    assert _LOADS_SEEN == [s]
    assert ser.current_session() is None


_LOADS_SEEN: list = []


def _rebuild_seeing_session():
    _LOADS_SEEN.append(ser.current_session())
    return "rebuilt"


class _SeesLoadsSession:
    def __reduce__(self):
        return (_rebuild_seeing_session, ())


# --- views keep their strides --------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: torch.rand(5, 5).narrow(1, 2, 2),  # torch's test_non_cont_tensors
    lambda: torch.rand(4, 6).t(),
    lambda: torch.rand(10)[1::3],
    lambda: torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last),
    lambda: torch.ones(3).expand(4, 3),
    lambda: torch.nn.Parameter(torch.rand(3, 4).t()),
    lambda: torch.rand(4, 4, dtype=torch.float64, requires_grad=True).t(),
], ids=["narrow", "transpose", "step", "channels_last", "expand", "parameter", "requires_grad"])
def test_a_view_arrives_with_its_strides_and_values(make):
    t = make()
    back = roundtrip(t)
    assert type(back) is type(t) and back.dtype == t.dtype and back.requires_grad == t.requires_grad
    assert back.shape == t.shape and back.stride() == t.stride() and torch.equal(back, t)
    assert back.is_contiguous() == t.is_contiguous()
    assert not back.requires_grad or back.is_leaf


def test_a_view_sends_only_the_storage_it_covers():
    big = torch.rand(1000, 1000)
    view = big[10:12, 5:8]  # 2 x 3 elements of a 4 MB storage
    payload = ser.dumps(view)
    assert sum(memoryview(b).nbytes for b in payload.buffers) == (1000 + 3) * 4  # one row plus 3
    assert torch.equal(roundtrip(view), view)


def test_strides_that_reach_past_the_buffer_are_refused():
    class Forged:  # a peer's payload whose view would read past the bytes it sent
        def __reduce__(self):
            return ser._rebuild_tensor, (pickle.PickleBuffer(bytearray(16)), torch.float32, (4, 4), False, (4, 1))

    with pytest.raises(SerializationError, match="does not fit its 4-element buffer"):
        ser.loads(wire(ser.dumps(Forged())))
