"""The cryptography of a connection: handshake proofs bound to identities, and frame tags.

**Handshake.** Each side sends a fresh random nonce and an *identity* (opaque bytes the
agent fills: its rank, name and listening address). Each proves it knows the job's
secret by an HMAC-SHA256 over its role and the *transcript*: the protocol name, both
nonces and both identities. A proof therefore cannot be replayed on another connection,
reflected to its sender, or presented for another worker. The acceptor proves first, so
a connector never reveals a proof to an impostor listener.

**Frames.** The handshake also yields one key per direction. Every later frame carries
a 16-byte tag over its sequence number and all its bytes (header and buffers, in wire
order), so a relay that forwarded the handshake can neither inject, drop-and-replace,
reorder, replay nor alter a frame. Which MAC depends on the frame's size (both sides know
it from the header), each the fastest there on this machine:

* under 2 KiB: keyed BLAKE2b (0.4 us for a small call; but 0.8 GB/s);
* up to 128 KiB: Poly1305 under a one-time key derived from the sequence number
  (2.4 us to start, then ~10 GB/s);
* larger: AES-256-GCM's authentication alone (GMAC: the frame as associated data, the
  sequence number as the nonce, so no nonce repeats under a key; 7.5 us to start, then
  ~28 GB/s with AES-NI).

Large frames are fed to the MAC while they are sent and received.

Without a secret (an explicit opt-out) every proof is empty and frames carry no tag.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Optional, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

NONCE_BYTES = 32
TAG_BYTES = 16
#: Frames of at least this many bytes are tagged with Poly1305, smaller ones with BLAKE2b ...
MEDIUM_FRAME = 1 << 11
#: ... and from this many bytes on with GMAC.
LARGE_FRAME = 1 << 17
PROTOCOL = b"torchrpc-tcp/3"

_SEQ = struct.Struct("<Q")


class AuthenticationError(ValueError):
    """The peer did not prove knowledge of the job's secret, or a frame's tag is wrong."""


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def transcript(nonce_c: bytes, nonce_s: bytes, id_c: bytes, id_s: bytes) -> bytes:
    """A digest of everything both sides said before proving: what every proof covers."""
    h = hashlib.sha256(PROTOCOL)
    for part in (nonce_c, nonce_s, id_c, id_s):
        h.update(_SEQ.pack(len(part)))
        h.update(part)
    return h.digest()


def proof(secret: Optional[bytes], role: bytes, transcript_: bytes, *extra: bytes) -> bytes:
    """``role``'s proof of the secret over the transcript (and ``extra`` fields it adds)."""
    if secret is None:
        return b""
    h = hmac.new(secret, role + transcript_, hashlib.sha256)
    for part in extra:
        h.update(_SEQ.pack(len(part)))
        h.update(part)
    return h.digest()


def check(secret: Optional[bytes], role: bytes, transcript_: bytes, got: bytes, who: str, *extra: bytes) -> None:
    """Raise :class:`AuthenticationError` unless ``got`` is ``role``'s proof."""
    if not hmac.compare_digest(proof(secret, role, transcript_, *extra), bytes(got)):
        raise AuthenticationError(f"{who} failed authentication (wrong or missing secret)")


def check_nonce(nonce: bytes, who: str) -> bytes:
    if len(nonce) != NONCE_BYTES:
        raise AuthenticationError(f"{who} sent a malformed challenge")
    return bytes(nonce)


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


class _Poly:
    __slots__ = ("_p",)

    def __init__(self, key: bytes) -> None:
        self._p = Poly1305(key)

    def update(self, data: bytes | memoryview) -> None:
        self._p.update(data)

    def digest(self) -> bytes:
        return self._p.finalize()


class _Gmac:
    """AES-GCM over no plaintext: the data as associated data, the tag as the MAC."""

    __slots__ = ("_e",)

    def __init__(self, key: algorithms.AES, nonce: bytes) -> None:
        self._e = Cipher(key, modes.GCM(nonce)).encryptor()

    def update(self, data: bytes | memoryview) -> None:
        self._e.authenticate_additional_data(data)

    def digest(self) -> bytes:
        self._e.finalize()
        return self._e.tag


class FrameMac:
    """One direction's frame tags: ``start(n)`` the hasher of the next frame (n bytes long)."""

    __slots__ = ("_small", "_one_time", "_aes", "seq")

    def __init__(self, key: bytes) -> None:
        self._small = hashlib.blake2b(key=key, digest_size=TAG_BYTES, person=b"torchrpc-frame")
        self._one_time = hashlib.blake2b(key=key, digest_size=32, person=b"torchrpc-poly")
        self._aes = algorithms.AES(hashlib.blake2b(key=key, digest_size=32, person=b"torchrpc-gmac").digest())
        self.seq = 0

    def start(self, nbytes: int) -> Hasher:
        seq = _SEQ.pack(self.seq)
        self.seq += 1
        if nbytes < MEDIUM_FRAME:
            h = self._small.copy()
            h.update(seq)
            return h
        if nbytes < LARGE_FRAME:
            k = self._one_time.copy()
            k.update(seq)  # a fresh Poly1305 key per frame, as the one-time MAC requires
            return _Poly(k.digest())
        return _Gmac(self._aes, seq + b"\0\0\0\0")  # a 96-bit nonce that never repeats under this key


def frame_keys(secret: Optional[bytes], transcript_: bytes) -> tuple[Optional[FrameMac], Optional[FrameMac]]:
    """(connector→acceptor, acceptor→connector) frame tags of a connection; none without a secret."""
    if secret is None:
        return None, None
    return (FrameMac(proof(secret, b"frames connector->acceptor", transcript_)),
            FrameMac(proof(secret, b"frames acceptor->connector", transcript_)))
