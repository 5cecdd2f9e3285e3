"""The handshake of a new TCP (or TLS) connection, each side's steps as one function.

::

    connector -> acceptor   [PROTOCOL, nonce_c, id_c]
    acceptor  -> connector  [nonce_s, id_s, proof("acceptor")]
    connector -> acceptor   [proof("connector", probe), probe name, probe token]
    acceptor  -> connector  [answer ("shm" or "tcp"), proof("answer", answer)]

The proofs (:mod:`.auth`) cover both nonces and both identities, so the identities are
authenticated: the agent puts each worker's rank, name and listening address there,
and nothing else introduces a worker. Frames are size-capped and the whole exchange
has one deadline; nothing is unpickled and nothing large is allocated before both
proofs check out. The shared-memory path is on only if the acceptor can open a probe
segment the connector made (then the two share this host's memory).
"""
from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING, Callable, Optional

from . import auth, shm
from .base import ConnectionClosed

if TYPE_CHECKING:
    from .tcp import TCPConnection

#: Seconds a whole handshake may take, on either side.
HANDSHAKE_TIMEOUT = 10.0
#: The most bytes an identity may have.
MAX_IDENTITY = 1024


def connector_side(conn: "TCPConnection", secret: Optional[bytes], identity: bytes, deadline: float,
                   check_peer: Optional[Callable[[bytes], None]] = None) -> None:
    """Run the connector's steps on ``conn``; ``check_peer(id_s)`` may refuse the acceptor's
    (authenticated) identity by raising, before this side proves anything."""
    nonce_c = auth.new_nonce()
    conn.send([auth.PROTOCOL, nonce_c, identity])
    reply = conn.recv_limited(3, 2 * auth.NONCE_BYTES + MAX_IDENTITY, deadline)
    if len(reply) != 3:
        raise auth.AuthenticationError(f"{conn.peer} answered the handshake with {len(reply)} buffers")
    nonce_s, id_s = auth.check_nonce(reply[0], f"listener {conn.peer}"), bytes(reply[1])
    t = auth.transcript(nonce_c, nonce_s, identity, id_s)
    auth.check(secret, b"acceptor", t, reply[2], f"listener {conn.peer}")
    if check_peer is not None:
        check_peer(id_s)
    tls = isinstance(conn._sock, ssl.SSLSocket)  # with TLS, all data stays inside TLS
    probe = shm.make_probe() if shm.enabled() and not tls else None
    name, token = (probe[0].encode(), probe[1]) if probe else (b"", b"")
    try:
        conn.send([auth.proof(secret, b"connector", t, name, token), name, token])
        answer = conn.recv_limited(2, 128, deadline)
    finally:
        if probe:
            shm.remove_probe(probe[0])
    if len(answer) != 2:
        raise auth.AuthenticationError(f"{conn.peer} sent a malformed answer")
    auth.check(secret, b"answer", t, answer[1], f"listener {conn.peer}", bytes(answer[0]))
    to_peer, from_peer = auth.frame_keys(None if tls else secret, t)
    conn.established(id_s, to_peer, from_peer, use_shm=bytes(answer[0]) == b"shm")


def acceptor_side(conn: "TCPConnection", secret: Optional[bytes], identity: bytes, deadline: float,
                  admit: Callable[[], bool] = lambda: True) -> None:
    """Run the acceptor's steps on ``conn``; the connector's identity ends up in
    ``conn.peer_identity``. ``admit()`` is asked before the last answer, which completes the
    connection for the connector: False (the connection was cut meanwhile) ends it here, so
    that the connector retries instead of holding a dead connection."""
    hello = conn.recv_limited(3, 64 + MAX_IDENTITY, deadline)
    if len(hello) != 3 or bytes(hello[0]) != auth.PROTOCOL:
        raise ValueError("not a torchrpc connection, or one of another protocol version")
    nonce_c, id_c, nonce_s = auth.check_nonce(hello[1], conn.peer), bytes(hello[2]), auth.new_nonce()
    t = auth.transcript(nonce_c, nonce_s, id_c, identity)
    conn.send([nonce_s, identity, auth.proof(secret, b"acceptor", t)])
    got = conn.recv_limited(3, 256, deadline)
    if len(got) != 3:
        raise auth.AuthenticationError(f"{conn.peer} sent a malformed proof")
    name, token = bytes(got[1]), bytes(got[2])
    auth.check(secret, b"connector", t, got[0], f"connection from {conn.peer}", name, token)
    tls = isinstance(conn._sock, ssl.SSLSocket)
    use = bool(name) and shm.enabled() and not tls and shm.check_probe(name.decode("ascii", "replace"), token)
    answer = b"shm" if use else b"tcp"
    if not admit():
        raise ConnectionClosed(f"the handshake with {conn.peer} was cut (deadline or admission cap)")
    conn.send([answer, auth.proof(secret, b"answer", t, answer)])
    from_peer, to_peer = auth.frame_keys(None if tls else secret, t)
    conn.established(id_c, to_peer, from_peer, use_shm=use)


def deadline_in(seconds: float = HANDSHAKE_TIMEOUT) -> float:
    return time.monotonic() + seconds
