"""Mutual authentication of a new connection: HMAC challenge-response with a per-job secret.

Each side sends a fresh random nonce and proves it knows the secret by an HMAC-SHA256
over both nonces and its role; the acceptor speaks first, so a connector never
reveals a MAC to an impostor listener that could replay it elsewhere. Until both
proofs check out, only these fixed, size-capped frames are read: nothing is
unpickled, nothing large is allocated.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional

NONCE_BYTES = 32


class AuthenticationError(ValueError):
    """The peer did not prove knowledge of the job's secret."""


def mac(secret: Optional[bytes], role: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    if secret is None:
        return b""
    return hmac.new(secret, role + nonce_c + nonce_s, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def check(secret: Optional[bytes], role: bytes, nonce_c: bytes, nonce_s: bytes, got: bytes, who: str) -> None:
    if len(nonce_c) != NONCE_BYTES or len(nonce_s) != NONCE_BYTES:
        raise AuthenticationError(f"{who} sent a malformed challenge")
    if not hmac.compare_digest(mac(secret, role, nonce_c, nonce_s), bytes(got)):
        raise AuthenticationError(f"{who} failed authentication (wrong or missing secret)")
