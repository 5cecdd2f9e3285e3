"""The wire messages, each a small class with ``encode`` and ``decode``.

A message travels as a *frame*: a list of byte buffers. The first buffer is the
control header, packed with :mod:`struct` (message type, message id, RRef and
fork ids, flags), so that routing a message never needs pickle. Messages that
carry user data add a :class:`Payload`: one pickle buffer followed by the
out-of-band buffers of the tensors inside it. Messages that carry text (an
exception's type name and traceback) add UTF-8 buffers.

Nothing here touches a socket; the transport moves frames, the agent reacts to
decoded messages.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

from ..errors import ProtocolError
from .tensor_codec import decode_tensors, encode_tensors

Buffer = Any  # bytes, bytearray, memoryview or any object with the buffer protocol


class MessageType(enum.IntEnum):
    """Message types; PyTorch's names where one exists."""

    PYTHON_CALL = 1
    PYTHON_RET = 2
    PYTHON_REMOTE_CALL = 3
    REMOTE_RET = 4
    PYTHON_RREF_FETCH_CALL = 5
    PYTHON_RREF_FETCH_RET = 6
    RREF_USER_DELETE = 7
    RREF_FORK_REQUEST = 8
    RREF_CHILD_ACCEPT = 9
    RREF_ACK = 10
    EXCEPTION = 11
    HELLO = 12
    HEARTBEAT = 13
    MEMBERSHIP = 14
    RUN_WITH_PROFILING_RESP = 15
    # distributed autograd
    FORWARD_AUTOGRAD = 20
    BACKWARD_DISCOVER = 21
    BACKWARD_AUTOGRAD_REQ = 22
    CLEANUP_AUTOGRAD_CONTEXT_REQ = 23
    RREF_BACKWARD_REQ = 24
    BACKWARD_AUTOGRAD_RET = 25


class GloballyUniqueId(NamedTuple):
    """An RRef id or fork id: the creating worker's id and a counter local to it."""

    created_on: int
    local_id: int

    def __repr__(self) -> str:
        return f"GloballyUniqueId(created_on={self.created_on}, local_id={self.local_id})"


@dataclass(slots=True)
class Payload:
    """Pickled user data: the pickle stream and its out-of-band buffers."""

    data: Buffer
    buffers: list = field(default_factory=list)

    def frames(self) -> list:
        return [self.data, *self.buffers]

    @property
    def nbytes(self) -> int:
        return sum(memoryview(b).nbytes for b in self.frames())


# Header field types: a message's annotations say which of its fields go in the header and
# how each is packed (``msg_id: U64``); fields of other types (payload, texts, ids,
# tensors) travel in buffers of their own.
U8 = int
U32 = int
U64 = int
I64 = int
#: annotation -> field kind -> struct code; a "gid" is two fields (worker id, local id).
_KINDS = {"U8": "u8", "U32": "u32", "U64": "u64", "I64": "i64", "bool": "bool", "GloballyUniqueId": "gid"}
_CODES = {"u8": "B", "u32": "I", "u64": "Q", "i64": "q", "bool": "B", "gid": "IQ"}

_REGISTRY: dict[int, type["Message"]] = {}


class Message:
    """Base of all messages. A subclass's annotated fields are its header fields (``U64``,
    ``I64``, ``U32``, ``U8``, ``bool``, ``GloballyUniqueId``, in order: ``FIELDS`` is derived from
    them), a ``payload: Payload``, and the buffers named by ``TEXTS``, ``IDS``, ``TENSORS``."""

    TYPE: ClassVar[MessageType]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("msg_id", "u64"),)
    HAS_PAYLOAD: ClassVar[bool] = False
    TEXTS: ClassVar[tuple[str, ...]] = ()
    #: name of a ``list[int]`` field sent as one buffer of u64s, if any
    IDS: ClassVar[Optional[str]] = None
    #: name of a ``list[Optional[Tensor]]`` field sent with the tensor codec, if any
    TENSORS: ClassVar[Optional[str]] = None
    IS_REPLY: ClassVar[bool] = False
    _struct: ClassVar[struct.Struct]

    msg_id: U64

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            notes = {k: v for c in reversed(cls.__mro__) for k, v in c.__dict__.get("__annotations__", {}).items()}
            cls.FIELDS = tuple((name, _KINDS[str(t)]) for name, t in notes.items() if str(t) in _KINDS)
            cls.HAS_PAYLOAD = notes.get("payload") == "Payload"
            if cls.TENSORS and (cls.HAS_PAYLOAD or cls.TEXTS):
                raise TypeError(f"{cls.__name__}: a message with tensors has no payload or texts")
            fmt = "<B" + "".join(_CODES[kind] for _, kind in cls.FIELDS)
            cls._struct = struct.Struct(fmt)
            # @dataclass(slots=True) makes a second class; the last one made is the real one.
            _REGISTRY[cls.TYPE] = cls

    def encode(self) -> list:
        """Return the frame: header buffer, then payload and text buffers."""
        values: list = []
        for name, kind in self.FIELDS:
            v = getattr(self, name)
            if kind == "gid":
                values.extend(v)
            else:
                values.append(v)
        frames = [self._struct.pack(self.TYPE, *values)]
        if self.HAS_PAYLOAD:
            frames.extend(self.payload.frames())  # type: ignore[attr-defined]
        for name in self.TEXTS:
            frames.append(getattr(self, name).encode("utf-8", "replace"))
        if self.IDS:
            ids = getattr(self, self.IDS)
            frames.append(struct.pack(f"<{len(ids)}Q", *ids))
        if self.TENSORS:
            frames.extend(encode_tensors(getattr(self, self.TENSORS)))
        return frames

    @classmethod
    def _bool(cls, name: str, value: int) -> bool:
        if value > 1:
            raise ProtocolError(f"{cls.TYPE.name} field {name} is {value}, not a boolean (0 or 1)")
        return bool(value)

    @classmethod
    def _from_frames(cls, frames: Sequence[Buffer]) -> "Message":
        st = cls._struct
        header = frames[0]
        if len(header) != st.size:
            raise ProtocolError(
                f"{cls.TYPE.name} header has {len(header)} bytes, expected {st.size} "
                f"(fields: {', '.join(n for n, _ in cls.FIELDS)})"
            )
        raw = st.unpack_from(header)[1:]
        kwargs: dict[str, Any] = {}
        i = 0
        for name, kind in cls.FIELDS:
            if kind == "gid":
                kwargs[name] = GloballyUniqueId(raw[i], raw[i + 1])
                i += 2
            elif kind == "bool":
                kwargs[name] = cls._bool(name, raw[i])
                i += 1
            else:
                kwargs[name] = raw[i]
                i += 1
        rest = list(frames[1:])
        if cls.IDS:
            # the id list comes right before the tensors, or last
            at = 0 if cls.TENSORS else -1
            if not rest or len(rest[at]) % 8:
                raise ProtocolError(f"{cls.TYPE.name} has no well-formed id list")
            raw_ids = bytes(rest.pop(at))
            kwargs[cls.IDS] = list(struct.unpack(f"<{len(raw_ids) // 8}Q", raw_ids))
        if cls.TENSORS:
            kwargs[cls.TENSORS] = decode_tensors(rest)
            rest = []
        n_texts = len(cls.TEXTS)
        if cls.HAS_PAYLOAD:
            if len(rest) < 1 + n_texts:
                raise ProtocolError(f"{cls.TYPE.name} is missing its payload")
            cut = len(rest) - n_texts
            kwargs["payload"] = Payload(rest[0], rest[1:cut])
            rest = rest[cut:]
        if len(rest) != n_texts:
            raise ProtocolError(
                f"{cls.TYPE.name} has {len(frames)} buffers, which does not fit its layout"
            )
        for name, buf in zip(cls.TEXTS, rest):
            kwargs[name] = bytes(buf).decode("utf-8", "replace")
        return cls(**kwargs)


def decode(frames: Sequence[Buffer]) -> Message:
    """Decode a frame into its message; raise :class:`ProtocolError` if malformed."""
    if not frames or len(frames[0]) < 1:
        raise ProtocolError("empty frame")
    mtype = frames[0][0]
    cls = _REGISTRY.get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype}")
    try:
        return cls._from_frames(frames)
    except ProtocolError:
        raise
    except Exception as e:  # e.g. tensor metadata that torch rejects: still just a bad frame
        raise ProtocolError(f"malformed {cls.TYPE.name}: {type(e).__name__}: {e}") from e


def is_reply_frame(frames: Sequence[Buffer]) -> bool:
    """Whether a (possibly malformed) frame claims to be a reply: such a frame is never answered,
    since its message id is the receiver's own request number, not the sender's."""
    try:
        mtype = frames[0][0]
        if mtype == MessageType.FORWARD_AUTOGRAD and len(frames) > 1:
            mtype = frames[1][0]
        return mtype in REPLY_TYPES
    except Exception:
        return False


def peek_msg_id(frames: Sequence[Buffer]) -> int | None:
    """The message id of a frame that may be malformed, or None if unreadable.

    Used to address an error reply to a request that failed to decode.
    """
    try:
        header = frames[0]
        if len(header) >= 9:
            return struct.unpack_from("<Q", header, 1)[0]
    except Exception:
        pass
    return None


# --- calls and replies -------------------------------------------------------


class ProfileFlags:
    """The bits of :class:`PythonCall`'s ``profile`` (0: the caller is not profiled). TIME: the reply
    says how long the function ran; EVENTS: it is a :class:`ProfiledReturn` with the events of the
    function's run under torch's profiler, which records what the caller's does (SHAPES, MEMORY,
    STACK, FLOPS: record_shapes, profile_memory, with_stack, with_flops). Unknown bits are ignored."""

    TIME, EVENTS, SHAPES, MEMORY, STACK, FLOPS = 1, 2, 4, 8, 16, 32


@dataclass(slots=True)
class PythonCall(Message):
    """Run a pickled ``(func, args, kwargs)`` and reply with its result; ``profile``: the
    :class:`ProfileFlags` of a profiled caller."""

    TYPE = MessageType.PYTHON_CALL
    msg_id: U64
    payload: Payload
    profile: U8 = 0


@dataclass(slots=True)
class PythonReturn(Message):
    """The pickled result of a call; ``remote_ns``: how long it ran, if the call asked."""

    TYPE = MessageType.PYTHON_RET
    IS_REPLY = True
    msg_id: U64
    payload: Payload
    remote_ns: U64 = 0


@dataclass(slots=True)
class ProfiledReturn(PythonReturn):
    """The reply to a call with ``ProfileFlags.EVENTS``: a :class:`PythonReturn` plus ``events``, the
    callee's profiler events as JSON text (see :mod:`torchrpc.remote_events`; the caller checks
    them before use). torch's ``RUN_WITH_PROFILING_RESP``, for Python calls."""

    TYPE = MessageType.RUN_WITH_PROFILING_RESP
    TEXTS = ("events",)
    IS_REPLY = True
    events: str = ""


@dataclass(slots=True)
class ExceptionReply(Message):
    """A failed request. The pickled exception may be empty if it could not be pickled."""

    TYPE = MessageType.EXCEPTION
    TEXTS = ("type_name", "message", "traceback")
    IS_REPLY = True
    msg_id: U64
    payload: Payload
    type_name: str
    message: str
    traceback: str


@dataclass(slots=True)
class RemoteCall(Message):
    """Run a pickled call on the owner and keep the result as OwnerRRef ``rref_id``.

    ``fork_id`` is the caller's UserRRef, which the owner registers as a fork.
    """

    TYPE = MessageType.PYTHON_REMOTE_CALL
    msg_id: U64
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId
    payload: Payload


@dataclass(slots=True)
class RemoteReturn(Message):
    """The owner has created the OwnerRRef and registered the caller's fork."""

    TYPE = MessageType.REMOTE_RET
    IS_REPLY = True
    msg_id: U64
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId


# --- RRef control messages ---------------------------------------------------


@dataclass(slots=True)
class RRefFetchCall(Message):
    """Ask the owner for the value of ``rref_id`` (``to_here``)."""

    TYPE = MessageType.PYTHON_RREF_FETCH_CALL
    msg_id: U64
    rref_id: GloballyUniqueId


@dataclass(slots=True)
class RRefFetchReturn(Message):
    """The pickled value of an OwnerRRef."""

    TYPE = MessageType.PYTHON_RREF_FETCH_RET
    IS_REPLY = True
    msg_id: U64
    payload: Payload


@dataclass(slots=True)
class RRefUserDelete(Message):
    """A UserRRef ``fork_id`` of ``rref_id`` was deleted (guarantee G1)."""

    TYPE = MessageType.RREF_USER_DELETE
    msg_id: U64
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId


@dataclass(slots=True)
class RRefForkRequest(Message):
    """A user received fork ``fork_id`` of ``rref_id`` from another user; owner, register it."""

    TYPE = MessageType.RREF_FORK_REQUEST
    msg_id: U64
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId


@dataclass(slots=True)
class RRefChildAccept(Message):
    """The child ``fork_id`` is confirmed by the owner; its parent may go (guarantee G2)."""

    TYPE = MessageType.RREF_CHILD_ACCEPT
    msg_id: U64
    fork_id: GloballyUniqueId


@dataclass(slots=True)
class RRefAck(Message):
    """Generic acknowledgement of an RRef control message."""

    TYPE = MessageType.RREF_ACK
    IS_REPLY = True
    msg_id: U64


# --- connection set-up ---------------------------------------------------------


@dataclass(slots=True)
class Hello(Message):
    """Who a side of a new connection is: its worker id, name and listening address. It
    travels inside the transport handshake, as the identity that handshake authenticates
    (see :meth:`identity`), not as a frame of its own."""

    TYPE = MessageType.HELLO
    TEXTS = ("name", "address")
    msg_id: U64
    worker_id: U32
    name: str
    address: str = ""

    def identity(self) -> bytes:
        """This message as one buffer: ``u32 count``, ``count`` × ``u32 length``, the buffers."""
        frame = [bytes(b) for b in self.encode()]
        return struct.pack(f"<I{len(frame)}I", len(frame), *map(len, frame)) + b"".join(frame)

    @classmethod
    def from_identity(cls, data: bytes) -> "Hello":
        """Decode :meth:`identity`'s output; ProtocolError if it is not a well-formed Hello."""
        try:
            (count,) = struct.unpack_from("<I", data)
            if count > 8:
                raise ValueError(f"{count} buffers")
            lengths = struct.unpack_from(f"<{count}I", data, 4)
            at, frame = 4 + 4 * count, []
            for n in lengths:
                frame.append(data[at:at + n])
                at += n
            if at != len(data):
                raise ValueError("its lengths do not add up")
        except (struct.error, ValueError) as e:
            raise ProtocolError(f"malformed identity: {e}") from None
        msg = decode(frame)
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected an identity (HELLO), got {type(msg).__name__}")
        return msg


@dataclass(slots=True)
class Heartbeat(Message):
    """Sent on a connection that has been quiet for a while; never answered.

    Each side expects some frame from the other at least every few heartbeat
    intervals; silence past that means the peer (or the link) is gone.
    """

    TYPE = MessageType.HEARTBEAT
    msg_id: U64


@dataclass(slots=True)
class Membership(Message):
    """In a dynamic group, the sender (``worker_id``) has joined (``joined``) or is leaving:
    the receiver acks (RREF_ACK) once it has added the sender, or once nothing of its own
    waits on the sender any more (torch's ``_update_group_membership``)."""

    TYPE = MessageType.MEMBERSHIP
    msg_id: U64
    worker_id: U32
    joined: bool


# --- distributed autograd ------------------------------------------------------


@dataclass(slots=True)
class ForwardAutograd(Message):
    """A wrapper around any message sent inside a distributed autograd context.

    ``context_id`` is the sender's current context; ``autograd_message_id`` is not 0
    when the inner message carries tensors that require grad, which the sender
    recorded as a *send* and the receiver records as the matching *recv*.
    ``converges`` says the sender's part of the context may need discovery: two of
    its sends (here or upstream) reach the same autograd nodes.
    """

    TYPE = MessageType.FORWARD_AUTOGRAD
    msg_id: U64
    context_id: I64
    autograd_message_id: U64
    inner: Message
    converges: bool = False

    def encode(self) -> list:
        return [self._struct.pack(self.TYPE, self.inner.msg_id, self.context_id, self.autograd_message_id,
                                  self.converges),
                *self.inner.encode()]

    @property
    def IS_REPLY(self) -> bool:  # type: ignore[override]
        return self.inner.IS_REPLY

    @classmethod
    def _from_frames(cls, frames: Sequence[Buffer]) -> "Message":
        st = cls._struct
        if len(frames[0]) != st.size:
            raise ProtocolError(f"FORWARD_AUTOGRAD header has {len(frames[0])} bytes, expected {st.size}")
        _, msg_id, context_id, ag_id, converges = st.unpack_from(frames[0])
        if len(frames) < 2:
            raise ProtocolError("FORWARD_AUTOGRAD carries no message")
        inner = decode(frames[1:])
        if isinstance(inner, ForwardAutograd):
            raise ProtocolError("FORWARD_AUTOGRAD may not wrap another FORWARD_AUTOGRAD")
        if inner.msg_id != msg_id:
            raise ProtocolError("FORWARD_AUTOGRAD message id differs from the wrapped message's")
        return cls(msg_id, context_id, ag_id, inner, cls._bool("converges", converges))


class AutogradTag(NamedTuple):
    """What a FORWARD_AUTOGRAD wrapper says of the message inside it."""

    context_id: int
    autograd_message_id: int = 0  # the message's send, 0 if it carries no tensor that requires grad
    converges: bool = False  # the sender's sends may converge (see DistAutogradContext.converges)

    @classmethod
    def of(cls, fa: ForwardAutograd) -> "AutogradTag":
        return cls(fa.context_id, fa.autograd_message_id, fa.converges)

    def wrap(self, msg: Message) -> ForwardAutograd:
        return ForwardAutograd(msg.msg_id, self.context_id, self.autograd_message_id, msg, self.converges)


@dataclass(slots=True)
class BackwardDiscover(Message):
    """SMART mode: backward pass ``pass_id`` of ``context_id`` reaches these sends of yours.

    The receiver finds which of its recvs those sends reach, asks their senders
    in turn, and replies once the whole reached set below it is known.
    """

    TYPE = MessageType.BACKWARD_DISCOVER
    IDS = "autograd_message_ids"
    msg_id: U64
    context_id: I64
    pass_id: U64
    retain_graph: bool
    autograd_message_ids: list


@dataclass(slots=True)
class PropagateGradients(Message):
    """The gradients for the tensors of sends ``autograd_message_ids`` of the receiver: one per
    tensor of each send, in order (None where a tensor gets none). All the sends to one peer
    that a step of a pass finishes travel together.

    ``direct``: the pass skipped discovery (no worker's sends converge), so the
    receiver runs its part from these sends alone, keeping the graph if ``retain_graph``.
    Replied to once everything this delivery set off, on every worker, has finished.
    """

    TYPE = MessageType.BACKWARD_AUTOGRAD_REQ
    IDS = "autograd_message_ids"
    TENSORS = "grads"
    msg_id: U64
    context_id: I64
    pass_id: U64
    autograd_message_ids: list
    grads: list
    direct: bool = False
    retain_graph: bool = False


@dataclass(slots=True)
class BackwardReturn(Message):
    """Reply to BACKWARD_AUTOGRAD_REQ or RREF_BACKWARD_REQ: everything the request set off has
    finished, except the gradients for the requester's own sends, which come back here.

    ``grads`` holds the gradients of the sends ``autograd_message_ids``, one per tensor of
    each send, in order. The requester runs its part from them (as if each had come in a
    BACKWARD_AUTOGRAD_REQ of pass ``pass_id``), which saves a nested round trip whenever
    gradients go straight back to the worker that sent them.
    """

    TYPE = MessageType.BACKWARD_AUTOGRAD_RET
    IS_REPLY = True
    IDS = "autograd_message_ids"
    TENSORS = "grads"
    msg_id: U64
    context_id: I64
    pass_id: U64
    direct: bool
    retain_graph: bool
    autograd_message_ids: list
    grads: list


@dataclass(slots=True)
class CleanupAutogradContext(Message):
    """Release context ``context_id`` here and on every worker it touched from here."""

    TYPE = MessageType.CLEANUP_AUTOGRAD_CONTEXT_REQ
    msg_id: U64
    context_id: I64


@dataclass(slots=True)
class RRefBackward(Message):
    """On the owner of ``rref_id``: run backward from its value in ``context_id``."""

    TYPE = MessageType.RREF_BACKWARD_REQ
    msg_id: U64
    rref_id: GloballyUniqueId
    context_id: I64
    retain_graph: bool


#: The types whose messages are replies (``IS_REPLY``), matched to a pending request.
REPLY_TYPES = frozenset(t for t, cls in _REGISTRY.items() if cls.__dict__.get("IS_REPLY") is True)
