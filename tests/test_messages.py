"""Unit tests of the wire messages (src/torchrpc/protocol/messages.py).

No sockets: the "wire" is simulated by turning every buffer of a frame into a
fresh ``bytearray``, which is what the TCP transport hands to ``decode``.
"""
from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrpc.errors import ProtocolError, RPCError
from torchrpc.protocol import messages as m
from torchrpc.protocol.messages import GloballyUniqueId as Gid

pytestmark = pytest.mark.timeout(60)

U32 = 2**32 - 1
U64 = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def wire(frame):
    """What arrives on the other side: every buffer as its own bytearray."""
    return [bytearray(b) for b in frame]


def roundtrip(msg):
    frame = msg.encode()
    assert isinstance(frame, list)
    for b in frame:
        memoryview(b)  # every element supports the buffer protocol
    return m.decode(wire(frame))


def payload(data=b"pickle-stream", buffers=(b"tensor-0", b"", bytearray(b"tensor-2" * 100))):
    return m.Payload(data, list(buffers))


def assert_same_payload(got: m.Payload, want: m.Payload):
    assert bytes(got.data) == bytes(want.data)
    assert len(got.buffers) == len(want.buffers)
    for g, w in zip(got.buffers, want.buffers):
        assert bytes(g) == bytes(w)


def assert_same_tensors(got, want):
    """Two lists of Optional[Tensor]: same length, None at the same places, same dtype, shape, values."""
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert isinstance(g, torch.Tensor)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


def assert_same_message(got, want):
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if isinstance(w, m.Payload):
            assert isinstance(g, m.Payload)
            assert_same_payload(g, w)
        elif isinstance(w, m.Message):  # ForwardAutograd.inner
            assert_same_message(g, w)
        elif f.name == "grads":  # PropagateGradients: tensors and Nones
            assert_same_tensors(g, w)
        else:
            assert g == w, f.name
            assert type(g) is type(w) or isinstance(w, int), (f.name, type(g), type(w))
            if isinstance(w, Gid):
                assert isinstance(g, Gid)


def examples():
    """One instance of every message class, with non-trivial field values."""
    big = Gid(U32, U64)
    return [
        m.PythonCall(1, payload()),
        m.PythonCall(2, payload(), m.ProfileFlags.TIME | m.ProfileFlags.EVENTS | m.ProfileFlags.SHAPES),
        m.PythonCall(3, payload(), 255),  # unknown bits travel (the callee ignores them)
        m.PythonReturn(U64, payload(b"x", ())),
        m.ProfiledReturn(4, payload(b"x", [b"t" * 8]), U64, '{"version":1,"events":[]} é'),
        m.ProfiledReturn(5, payload(), 1, ""),
        m.ExceptionReply(7, payload(b"exc"), "builtins.ValueError", "bad value: é ☃", "Traceback ...\n  line 1\n"),
        m.ExceptionReply(8, m.Payload(b""), "", "", ""),  # exception that could not be pickled
        m.RemoteCall(2, Gid(1, 2), Gid(1, 3), payload()),
        m.RemoteReturn(3, big, Gid(0, 0)),
        m.RRefFetchCall(4, Gid(5, 6)),
        m.RRefFetchReturn(5, payload(b"value", [b"a" * 1000])),
        m.RRefUserDelete(6, Gid(2, 9), Gid(3, 10)),
        m.RRefForkRequest(7, Gid(2, 9), Gid(4, 11)),
        m.RRefChildAccept(8, Gid(4, 11)),
        m.RRefAck(9),
        m.Hello(10, 3, "worker3"),
        m.Hello(0, U32, ""),
        m.Heartbeat(0),
        m.Heartbeat(U64),
        m.Membership(22, 3, True),
        m.Membership(U64, U32, False),
        # distributed autograd
        m.ForwardAutograd(11, (3 << 48) | 7, U64, m.PythonCall(11, payload())),
        m.ForwardAutograd(12, I64_MIN, 0, m.RRefFetchCall(12, Gid(1, 2)), True),  # fixed-layout inner message
        m.ForwardAutograd(U64, -1, (1 << 48) | 1, m.PythonReturn(U64, payload(b"reply", [b"t" * 24]))),
        m.BackwardDiscover(13, (1 << 48) | 3, (2 << 48) | 1, True, [1, U64, 0, (5 << 48) | 9]),
        m.BackwardDiscover(14, I64_MAX, U64, False, []),
        m.PropagateGradients(15, (2 << 48) | 4, 7, [(1 << 48) | 2], gradient_list()),
        m.PropagateGradients(16, -1, 0, [], []),
        m.PropagateGradients(17, 1, U64, [U64, 0], [None, None], True, True),
        m.PropagateGradients(19, 1, 2, [3], [torch.ones(2)], True, False),
        m.BackwardReturn(20, (1 << 48) | 2, 9, True, False, [(2 << 48) | 5, 7], gradient_list()),
        m.BackwardReturn(21, -1, U64, False, True, [], []),
        m.CleanupAutogradContext(18, I64_MAX),
        m.CleanupAutogradContext(19, -1),
        m.RRefBackward(20, Gid(1, 2), (1 << 48) | 5, True),
        m.RRefBackward(21, big, -1, False),
    ]


def gradient_list():
    """Gradients as PropagateGradients carries them: tensors of many dtypes and shapes, and None."""
    return [
        torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7,
        None,
        torch.tensor(2.5, dtype=torch.float32),  # 0-dim
        torch.empty(0, 4),  # no elements
        torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # not contiguous
        torch.tensor([True, False, True]),
        torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        torch.full((2, 1, 2), -1.0, dtype=torch.float16),
    ]


def test_examples_cover_every_message_type():
    assert {type(e).TYPE for e in examples()} == set(m.MessageType)
    # and the registry maps each type to the class that encodes it
    for e in examples():
        assert m._REGISTRY[e.TYPE] is type(e)


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_roundtrip_every_message(msg):
    got = roundtrip(msg)
    assert_same_message(got, msg)
    # the decoded message encodes to the very same bytes
    assert [bytes(b) for b in got.encode()] == [bytes(b) for b in msg.encode()]


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_decode_accepts_bytes_and_memoryviews(msg):
    frame = msg.encode()
    for conv in (bytes, lambda b: memoryview(bytes(b))):
        assert_same_message(m.decode([conv(b) for b in frame]), msg)


def test_header_is_first_buffer_with_type_byte_and_msg_id():
    frame = m.RRefUserDelete(0x0102030405060708, Gid(1, 2), Gid(3, 4)).encode()
    header = bytes(frame[0])
    assert len(frame) == 1
    assert header[0] == m.MessageType.RREF_USER_DELETE
    assert struct.unpack_from("<Q", header, 1)[0] == 0x0102030405060708
    assert struct.unpack("<BQIQIQ", header) == (7, 0x0102030405060708, 1, 2, 3, 4)


def test_payload_buffers_preserved_in_order_and_without_copy():
    bufs = [bytearray(b"first"), bytearray(), bytearray(b"\x00" * 4096), bytearray(b"last")]
    msg = m.PythonCall(11, m.Payload(bytearray(b"stream"), bufs))
    frame = msg.encode()
    # on the send side the payload buffers go out as they are (no copy, no join)
    assert frame[1] is msg.payload.data
    assert all(a is b for a, b in zip(frame[2:], bufs))
    assert len(frame) == 2 + len(bufs)
    # on the receive side the decoded payload holds the received buffers themselves
    received = wire(frame)
    got = m.decode(received)
    assert got.payload.data is received[1]
    assert len(got.payload.buffers) == len(bufs)
    assert all(a is b for a, b in zip(got.payload.buffers, received[2:]))
    assert [bytes(b) for b in got.payload.buffers] == [bytes(b) for b in bufs]
    assert got.payload.frames()[0] is received[1]
    assert got.payload.nbytes == sum(len(b) for b in received[1:])


def test_exception_reply_texts_are_not_confused_with_payload_buffers():
    msg = m.ExceptionReply(1, m.Payload(b"p", [b"b1", b"b2"]), "T", "msg", "tb")
    got = roundtrip(msg)
    assert bytes(got.payload.data) == b"p"
    assert [bytes(b) for b in got.payload.buffers] == [b"b1", b"b2"]
    assert (got.type_name, got.message, got.traceback) == ("T", "msg", "tb")


def test_payload_nbytes_counts_data_and_buffers():
    p = m.Payload(b"abc", [b"", bytearray(10), memoryview(b"12345")])
    assert p.nbytes == 18
    assert p.frames()[0] == b"abc" and len(p.frames()) == 4


# --- property tests ------------------------------------------------------------

u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
gids = st.builds(Gid, u32, u64)
texts = st.text(max_size=50)  # no lone surrogates by default: those are replaced by design
blobs = st.binary(max_size=64)
payloads = st.builds(m.Payload, blobs, st.lists(blobs, max_size=4))

i64 = st.integers(I64_MIN, I64_MAX)
small_tensors = st.one_of(
    st.none(),
    st.builds(lambda xs: torch.tensor(xs, dtype=torch.float64), st.lists(st.floats(allow_nan=False), max_size=5)),
    st.builds(lambda xs: torch.tensor(xs, dtype=torch.int64).reshape(-1, 1), st.lists(st.integers(-5, 5), max_size=4)),
)
_plain_message = st.one_of(
    st.builds(m.PythonCall, u64, payloads, st.integers(0, 255)),
    st.builds(m.PythonReturn, u64, payloads),
    st.builds(m.ProfiledReturn, u64, payloads, u64, texts),
    st.builds(m.ExceptionReply, u64, payloads, texts, texts, texts),
    st.builds(m.RemoteCall, u64, gids, gids, payloads),
    st.builds(m.RemoteReturn, u64, gids, gids),
    st.builds(m.RRefFetchCall, u64, gids),
    st.builds(m.RRefFetchReturn, u64, payloads),
    st.builds(m.RRefUserDelete, u64, gids, gids),
    st.builds(m.RRefForkRequest, u64, gids, gids),
    st.builds(m.RRefChildAccept, u64, gids),
    st.builds(m.RRefAck, u64),
    st.builds(m.Hello, u64, u32, texts),
    st.builds(m.Heartbeat, u64),
    st.builds(m.BackwardDiscover, u64, i64, u64, st.booleans(), st.lists(u64, max_size=5)),
    st.builds(m.PropagateGradients, u64, i64, u64, st.lists(u64, max_size=4), st.lists(small_tensors, max_size=4), st.booleans(), st.booleans()),
    st.builds(m.BackwardReturn, u64, i64, u64, st.booleans(), st.booleans(), st.lists(u64, max_size=4),
              st.lists(small_tensors, max_size=4)),
    st.builds(m.CleanupAutogradContext, u64, i64),
    st.builds(m.RRefBackward, u64, gids, i64, st.booleans()),
)
any_message = st.one_of(
    _plain_message,
    st.builds(lambda inner, cid, ag, conv: m.ForwardAutograd(inner.msg_id, cid, ag, inner, conv),
              _plain_message, i64, u64, st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(any_message)
def test_property_roundtrip(msg):
    got = roundtrip(msg)
    assert_same_message(got, msg)
    assert m.peek_msg_id(wire(msg.encode())) == msg.msg_id


@settings(max_examples=50, deadline=None)
@given(u64, u32, texts)
def test_property_hello_text_utf8(msg_id, worker_id, name):
    frame = m.Hello(msg_id, worker_id, name).encode()
    assert bytes(frame[1]) == name.encode("utf-8")


# --- malformed frames ------------------------------------------------------------


def test_empty_frame():
    with pytest.raises(ProtocolError):
        m.decode([])
    with pytest.raises(ProtocolError):
        m.decode([b""])
    with pytest.raises(ProtocolError):
        m.decode([bytearray(), b"x"])


@pytest.mark.parametrize("type_byte", [0, 16, 99, 255])
def test_unknown_type_byte(type_byte):
    header = bytes([type_byte]) + struct.pack("<Q", 1)
    with pytest.raises(ProtocolError, match="unknown message type"):
        m.decode([header])


def test_protocol_error_is_an_rpc_error():
    assert issubclass(ProtocolError, RPCError) and issubclass(ProtocolError, RuntimeError)


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_truncated_header(msg):
    frame = wire(msg.encode())
    for cut in range(1, len(frame[0])):
        bad = [frame[0][:cut], *frame[1:]]
        with pytest.raises(ProtocolError):
            m.decode(bad)


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_header_too_long(msg):
    frame = wire(msg.encode())
    for extra in (b"\x00", b"\x01" * 8):
        with pytest.raises(ProtocolError):
            m.decode([frame[0] + extra, *frame[1:]])


def _fixed_layout(msg):
    """No payload: the number of buffers is fixed (a ForwardAutograd has its inner message's layout)."""
    if isinstance(msg, m.ForwardAutograd):
        return _fixed_layout(msg.inner)
    return not msg.HAS_PAYLOAD


@pytest.mark.parametrize(
    "msg",
    [e for e in examples() if _fixed_layout(e)],
    ids=lambda x: type(x).__name__,
)
def test_extra_buffer_on_fixed_layout_message(msg):
    frame = wire(msg.encode())
    with pytest.raises(ProtocolError):
        m.decode([*frame, bytearray(b"extra")])
    with pytest.raises(ProtocolError):
        m.decode([*frame, bytearray()])


def test_missing_buffers():
    hello = wire(m.Hello(1, 2, "w").encode())
    with pytest.raises(ProtocolError):
        m.decode(hello[:1])  # no name
    for cls in (m.PythonCall, m.PythonReturn, m.RRefFetchReturn, m.ProfiledReturn):
        frame = wire(cls(1, payload()).encode())
        with pytest.raises(ProtocolError, match="payload"):
            m.decode(frame[:1])  # header only, no pickle stream
    remote = wire(m.RemoteCall(1, Gid(1, 1), Gid(1, 2), payload()).encode())
    with pytest.raises(ProtocolError):
        m.decode(remote[:1])
    exc = wire(m.ExceptionReply(1, m.Payload(b"p"), "T", "M", "TB").encode())
    assert len(exc) == 5
    for n in range(1, 5):  # header + fewer than payload and 3 texts
        with pytest.raises(ProtocolError):
            m.decode(exc[:n])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.one_of(
        st.binary(max_size=64),
        # a valid type byte followed by random bytes: reaches the per-class checks
        st.builds(lambda t, rest: bytes([t]) + rest, st.sampled_from(list(m.MessageType)), st.binary(max_size=48)),
        # a valid type byte with exactly the right header size
        st.sampled_from(list(m.MessageType)).flatmap(
            lambda t: st.binary(min_size=m._REGISTRY[t]._struct.size - 1, max_size=m._REGISTRY[t]._struct.size - 1)
            .map(lambda rest: bytes([t]) + rest)),
    ),
    extra=st.lists(st.binary(max_size=16), max_size=6),
)
def test_random_bytes_decode_or_protocol_error(header, extra):
    frame = [bytearray(header), *map(bytearray, extra)]
    try:
        msg = m.decode(frame)
    except ProtocolError:
        return
    # a frame that decodes is a well-formed message: it re-encodes to the same header
    assert isinstance(msg, m.Message)
    assert msg.TYPE == header[0]
    assert bytes(msg.encode()[0]) == bytes(header)
    assert m.peek_msg_id(frame) == msg.msg_id


# --- peek_msg_id ---------------------------------------------------------------


def test_peek_msg_id():
    assert m.peek_msg_id(m.RRefAck(42).encode()) == 42
    assert m.peek_msg_id(wire(m.PythonCall(U64, payload()).encode())) == U64
    # works on malformed frames that decode() rejects: unknown type, wrong header size
    bad = bytes([200]) + struct.pack("<Q", 77) + b"junk"
    with pytest.raises(ProtocolError):
        m.decode([bad])
    assert m.peek_msg_id([bad]) == 77
    truncated = m.RemoteCall(5, Gid(1, 1), Gid(1, 2), payload()).encode()[0][:12]
    assert m.peek_msg_id([truncated]) == 5
    # exactly 9 bytes is enough
    assert m.peek_msg_id([bytes([1]) + struct.pack("<Q", 9)]) == 9
    # unreadable: too short, empty, no frame at all, not a buffer
    assert m.peek_msg_id([bytes([1]) + b"\x00" * 7]) is None
    assert m.peek_msg_id([b""]) is None
    assert m.peek_msg_id([]) is None
    assert m.peek_msg_id(None) is None
    assert m.peek_msg_id([object()]) is None


def test_gid_is_tuple_with_readable_repr():
    g = Gid(3, 4)
    assert g == (3, 4) and g.created_on == 3 and g.local_id == 4
    assert repr(g) == "GloballyUniqueId(created_on=3, local_id=4)"
    assert hash(g) == hash(Gid(3, 4))


def test_is_reply_flags():
    # ForwardAutograd is a reply exactly when the message it wraps is one (an instance property)
    replies = {t for t, cls in m._REGISTRY.items() if cls is not m.ForwardAutograd and cls.IS_REPLY}
    assert replies == {
        m.MessageType.PYTHON_RET, m.MessageType.EXCEPTION, m.MessageType.REMOTE_RET,
        m.MessageType.PYTHON_RREF_FETCH_RET, m.MessageType.RREF_ACK, m.MessageType.BACKWARD_AUTOGRAD_RET,
        m.MessageType.RUN_WITH_PROFILING_RESP,
    }
    for e in examples():
        if isinstance(e, m.ForwardAutograd):
            assert e.IS_REPLY is e.inner.IS_REPLY
            assert roundtrip(e).IS_REPLY is e.inner.IS_REPLY
    assert m.ForwardAutograd(1, 2, 3, m.PythonReturn(1, payload())).IS_REPLY is True
    assert m.ForwardAutograd(1, 2, 3, m.RRefFetchReturn(1, payload())).IS_REPLY is True
    assert m.ForwardAutograd(1, 2, 3, m.RemoteCall(1, Gid(0, 1), Gid(0, 2), payload())).IS_REPLY is False


# --- distributed autograd messages: layouts and malformed frames ---------------------------


def test_forward_autograd_layout_is_its_header_then_the_inner_frame():
    inner = m.PythonCall(77, payload())
    frame = m.ForwardAutograd(77, -5, (1 << 48) | 3, inner, True).encode()
    assert struct.unpack("<BQqQB", bytes(frame[0])) == (m.MessageType.FORWARD_AUTOGRAD, 77, -5, (1 << 48) | 3, 1)
    assert [bytes(b) for b in frame[1:]] == [bytes(b) for b in inner.encode()]
    assert m.peek_msg_id(frame) == 77


def test_forward_autograd_malformed():
    call = wire(m.PythonCall(5, payload()).encode())
    head = struct.pack("<BQqQB", m.MessageType.FORWARD_AUTOGRAD, 5, 1, 2, 0)
    assert m.decode([head, *call]).inner.msg_id == 5  # the well-formed version
    with pytest.raises(ProtocolError, match="not a boolean"):
        m.decode([struct.pack("<BQqQB", m.MessageType.FORWARD_AUTOGRAD, 5, 1, 2, 2), *call])
    with pytest.raises(ProtocolError, match="carries no message"):
        m.decode([head])
    with pytest.raises(ProtocolError, match="differs"):
        m.decode([struct.pack("<BQqQB", m.MessageType.FORWARD_AUTOGRAD, 6, 1, 2, 0), *call])
    with pytest.raises(ProtocolError, match="may not wrap"):
        m.decode([head, head, *call])
    with pytest.raises(ProtocolError):  # the inner message is itself malformed
        m.decode([head, call[0][:-1], *call[1:]])
    with pytest.raises(ProtocolError, match="empty frame"):
        m.decode([head, bytearray()])
    with pytest.raises(ProtocolError, match="unknown message type"):
        m.decode([head, bytes([99]) + struct.pack("<Q", 5)])
    # a header with one field too few or too many
    with pytest.raises(ProtocolError, match="header has"):
        m.decode([struct.pack("<BQq", m.MessageType.FORWARD_AUTOGRAD, 5, 1), *call])
    with pytest.raises(ProtocolError, match="header has"):
        m.decode([struct.pack("<BQqQQ", m.MessageType.FORWARD_AUTOGRAD, 5, 1, 2, 3), *call])


def test_backward_discover_malformed():
    head = struct.pack("<BQqQ?", m.MessageType.BACKWARD_DISCOVER, 1, 2, 3, True)
    ok = m.decode([head, struct.pack("<2Q", 7, 8)])
    assert (ok.context_id, ok.pass_id, ok.retain_graph, ok.autograd_message_ids) == (2, 3, True, [7, 8])
    assert m.decode([head, b""]).autograd_message_ids == []
    with pytest.raises(ProtocolError, match="id list"):
        m.decode([head])  # no id list at all
    with pytest.raises(ProtocolError, match="id list"):
        m.decode([head, b"\x00" * 12])  # not a whole number of u64s
    with pytest.raises(ProtocolError):
        m.decode([head, struct.pack("<Q", 7), struct.pack("<Q", 8)])  # two id lists
    with pytest.raises(ProtocolError, match="header has"):
        m.decode([struct.pack("<BQqQ", m.MessageType.BACKWARD_DISCOVER, 1, 2, 3), b""])  # no retain_graph
    with pytest.raises(ProtocolError, match="header has"):
        m.decode([struct.pack("<BQqQ?Q", m.MessageType.BACKWARD_DISCOVER, 1, 2, 3, True, 4), b""])


def _meta(*entries):
    """Tensor-list metadata: entries are None or (dtype code, shape)."""
    out = b""
    for e in entries:
        if e is None:
            out += struct.pack("<BBB", 0, 0, 0)
        else:
            code, shape = e
            out += struct.pack("<BBB", 1, code, len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    return out


def test_propagate_gradients_malformed():
    head = struct.pack("<BQqQBB", m.MessageType.BACKWARD_AUTOGRAD_REQ, 1, 2, 3, 1, 0)
    ids = struct.pack("<Q", 4)  # the sends the gradients are for
    f64 = 1  # tensor_codec.DTYPES index of float64
    ok = m.decode([head, ids, _meta((f64, (2,)), None), struct.pack("<2d", 1.0, 2.0)])
    assert ok.grads[1] is None and ok.grads[0].tolist() == [1.0, 2.0] and ok.grads[0].dtype == torch.float64
    assert ok.direct is True and ok.retain_graph is False and ok.autograd_message_ids == [4]
    with pytest.raises(ProtocolError, match="not a boolean"):
        m.decode([struct.pack("<BQqQBB", m.MessageType.BACKWARD_AUTOGRAD_REQ, 1, 2, 3, 0, 7), ids, b""])
    assert m.decode([head, ids, b""]).grads == []
    with pytest.raises(ProtocolError, match="metadata buffer"):
        m.decode([head, ids])
    with pytest.raises(ProtocolError, match="more tensors than buffers"):
        m.decode([head, ids, _meta((f64, (2,)))])
    with pytest.raises(ProtocolError, match="left over"):
        m.decode([head, ids, _meta(None), struct.pack("<d", 1.0)])
    with pytest.raises(ProtocolError, match="does not fit"):
        m.decode([head, ids, _meta((f64, (3,))), struct.pack("<2d", 1.0, 2.0)])
    with pytest.raises(ProtocolError, match="bad tensor metadata"):
        m.decode([head, ids, _meta((200, (2,))), struct.pack("<2d", 1.0, 2.0)])  # unknown dtype code
    with pytest.raises(ProtocolError, match="bad tensor metadata"):
        m.decode([head, ids, struct.pack("<BBB", 1, f64, 2) + struct.pack("<Q", 2), struct.pack("<2d", 1.0, 2.0)])
    with pytest.raises(ProtocolError, match="bad tensor metadata"):
        m.decode([head, ids, struct.pack("<BBB", 1, f64, 65) + b"\x00" * 8 * 65, b""])  # ndim > 64
    with pytest.raises(ProtocolError, match="truncated"):
        m.decode([head, ids, _meta(None) + b"\x01\x01"])  # a tensor head cut short
    with pytest.raises(ProtocolError, match="id list"):
        m.decode([head, b"\x01\x02\x03", _meta(None)])
    with pytest.raises(ProtocolError, match="header has"):
        m.decode([struct.pack("<BQqQ", m.MessageType.BACKWARD_AUTOGRAD_REQ, 1, 2, 3), b""])
    with pytest.raises(ProtocolError, match="header has"):
        m.decode([struct.pack("<BQqQQQQ", m.MessageType.BACKWARD_AUTOGRAD_REQ, 1, 2, 3, 4, 5, 6), b""])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_gradients_may_only_be_dense_or_sparse_coo_cpu_tensors_of_known_dtypes():
    with pytest.raises(TypeError):
        m.PropagateGradients(1, 2, 3, [4], [torch.zeros(2, dtype=torch.uint16)]).encode()
    with pytest.raises(TypeError):
        m.PropagateGradients(1, 2, 3, [4], [torch.eye(2).to_sparse_csr()]).encode()
    m.PropagateGradients(1, 2, 3, [4], [torch.zeros(2).to_sparse()]).encode()  # see test_sparse.py


def test_cleanup_and_rref_backward_malformed():
    cleanup, rref_bw = m.MessageType.CLEANUP_AUTOGRAD_CONTEXT_REQ, m.MessageType.RREF_BACKWARD_REQ
    assert m.decode([struct.pack("<BQq", cleanup, 1, -1)]) == m.CleanupAutogradContext(1, -1)
    assert m.decode([struct.pack("<BQIQq?", rref_bw, 1, 2, 3, 4, True)]) == m.RRefBackward(1, Gid(2, 3), 4, True)
    for bad in (struct.pack("<BQ", cleanup, 1), struct.pack("<BQqq", cleanup, 1, 2, 3),
                struct.pack("<BQIQq", rref_bw, 1, 2, 3, 4), struct.pack("<BQIQq?Q", rref_bw, 1, 2, 3, 4, True, 5)):
        with pytest.raises(ProtocolError, match="header has"):
            m.decode([bad])
        assert m.peek_msg_id([bad]) == 1  # the error reply can still be addressed


def _noncanonical_bool(frame):
    """Whether ``frame`` is a message whose header has a bool field holding a byte other than 0 or 1."""
    try:
        cls = m._REGISTRY[frame[0][0]]
    except (IndexError, KeyError):
        return False
    if cls is m.ForwardAutograd:
        return _noncanonical_bool(frame[1:])
    offset = 1
    for _, kind in cls.FIELDS:
        size = struct.calcsize("<" + m._CODES[kind])
        if kind == "bool" and offset < len(frame[0]) and frame[0][offset] not in (0, 1):
            return True
        offset += size
    return False


@pytest.mark.parametrize("cls", [m.BackwardDiscover, m.RRefBackward])
def test_bool_field_other_than_0_or_1_is_rejected(cls):
    msg = next(e for e in examples() if type(e) is cls)
    frame = wire(msg.encode())
    assert not _noncanonical_bool(frame)
    frame[0][-1] = 2  # retain_graph is the last header field of both
    assert _noncanonical_bool(frame)
    with pytest.raises(ProtocolError):
        m.decode(frame)



# --- the tensor codec's packed runs ---------------------------------------------------------

from torchrpc.protocol import tensor_codec as tc  # noqa: E402


def _roundtrip(tensors):
    buffers = tc.encode_tensors(tensors)
    return buffers, tc.decode_tensors([bytearray(b) for b in buffers])


def test_small_tensors_of_one_dtype_and_shape_share_one_buffer():
    ts = [torch.full((4,), float(i)) for i in range(50)]
    buffers, out = _roundtrip(ts)
    assert len(buffers) == 2  # metadata, one packed buffer
    assert [t.tolist() for t in out] == [t.tolist() for t in ts]
    out[0].add_(100)  # views of one received buffer: writable, and changing one leaves the others
    assert out[1].tolist() == [1.0] * 4


def test_runs_break_at_none_dtype_and_shape_and_large_tensors_keep_their_own_buffer():
    big = torch.arange(tc.PACK_BELOW // 4, dtype=torch.float32)  # exactly PACK_BELOW bytes: its own buffer
    ts = [torch.ones(2), torch.ones(2), None, torch.ones(2), torch.ones(3), torch.ones(3, dtype=torch.float64),
          big, torch.ones(3, dtype=torch.float64), torch.tensor(7.0), torch.tensor(8.0),
          torch.ones(2, 3).t(), torch.zeros(0, 2), torch.zeros(0, 2),
          torch.tensor([1.5, 2.5], dtype=torch.bfloat16), torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
          torch.tensor([1 + 2j, 3 - 1j]).conj()]
    buffers, out = _roundtrip(ts)
    # runs: [2,2] | None | [2] | [3] | [3 f64] | big | [3 f64] | [(),()] | [3x2 t] | [(0,2),(0,2)] | [2 bf16 x2] | [conj]
    assert len(buffers) == 1 + 11
    for a, b in zip(ts, out):
        if a is None:
            assert b is None
        else:
            assert (b.dtype, b.shape) == (a.dtype, a.shape) and torch.equal(b, a.resolve_conj())
    assert memoryview(buffers[5]).nbytes == tc.PACK_BELOW  # the big tensor (the fifth run), uncopied


def test_a_packed_run_that_does_not_fit_its_buffer_is_a_protocol_error():
    buffers = tc.encode_tensors([torch.ones(4), torch.ones(4), torch.ones(4)])
    with pytest.raises(ProtocolError, match="run of 3 tensors .* does not fit its 44-byte buffer"):
        tc.decode_tensors([buffers[0], bytes(44)])
    with pytest.raises(ProtocolError, match="bad tensor metadata"):  # an unknown kind
        tc.decode_tensors([struct.pack("<BBB", 4, 0, 0), b""])
