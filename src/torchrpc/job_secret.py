"""Where the job's secret comes from; it never travels through the rendezvous store.

In order: ``RpcBackendOptions(secret=...)``, ``TORCHRPC_SECRET``, a secret file
(``secret_file=`` or ``TORCHRPC_SECRET_FILE``, e.g. on a shared filesystem), TLS
certificates (no secret needed: TLS authenticates every peer), the explicit opt-out
(``insecure=True`` or ``TORCHRPC_INSECURE=1``: no authentication, with a warning), and
last, when every worker is on this host, a secret rank 0 writes to a file only this
user can read, whose *name* the store carries. A job across hosts with none of these
fails at once, saying how to set one.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import stat
import tempfile
from typing import Any, Optional

import torch.distributed as dist

log = logging.getLogger("torchrpc")

_STORE_KEY = "auth/secret_file"
_NAME = re.compile(r"job-[0-9a-f]{32}\.secret\Z")
_SECRET_BYTES = 32

HOW_TO = (
    "set the same secret on every worker: TORCHRPC_SECRET=<random string> in the environment, "
    "TORCHRPC_SECRET_FILE=<path of a file only you can read, e.g. on a shared filesystem>, "
    "or RpcBackendOptions(secret=...); or give TLS certificates (TORCHRPC_TLS_CERT / _KEY / _CA); "
    "or, on a network you trust, opt out with TORCHRPC_INSECURE=1"
)


class SecretSource:
    """How this worker gets the secret: :meth:`obtain` it once the store is open."""

    #: for messages: where the secret comes from
    what: str = ""

    def obtain(self, store: dist.Store, rank: int) -> Optional[bytes]:
        raise NotImplementedError

    def forget(self) -> None:
        """Every worker has the secret: remove what only served to hand it out."""


class _Given(SecretSource):
    def __init__(self, secret: Optional[bytes], what: str) -> None:
        self._secret, self.what = secret, what

    def obtain(self, store: dist.Store, rank: int) -> Optional[bytes]:
        return self._secret


class _PrivateFile(SecretSource):
    """Rank 0 writes a random secret to a file of mode 0600 in a directory of mode 0700 that
    this user owns; the store carries the file's name. A worker reads only a file in that
    directory, owned by this user and readable by no one else: whoever can write to the
    store can name a file, but not one they could have made."""

    what = "a private file on this host"

    def __init__(self) -> None:
        self._path: Optional[str] = None

    def obtain(self, store: dist.Store, rank: int) -> Optional[bytes]:
        directory = private_dir()
        if rank == 0:
            name = f"job-{secrets.token_hex(16)}.secret"
            path = os.path.join(directory, name)
            secret = secrets.token_bytes(_SECRET_BYTES)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            self._path = path
            store.set(_STORE_KEY, name)
            return secret
        name = bytes(store.get(_STORE_KEY)).decode("ascii", "replace")
        if not _NAME.match(name):
            raise RuntimeError(f"the rendezvous store names {name!r} as the job's secret file: not a name "
                               "torchrpc makes (someone else wrote to the store?)")
        return _read_private(os.path.join(directory, name), _SECRET_BYTES)

    def forget(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None


class _File(SecretSource):
    def __init__(self, path: str) -> None:
        self.path = path
        self.what = f"the secret file {path}"

    def obtain(self, store: dist.Store, rank: int) -> Optional[bytes]:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_mode & 0o077:
                    log.warning("torchrpc: the secret file %s can be read by other users; chmod 600 it",
                                self.path)
                secret = f.read(1 << 16).strip()
        except OSError as e:
            raise RuntimeError(f"cannot read the secret file {self.path}: {e}") from None
        if not secret:
            raise RuntimeError(f"the secret file {self.path} is empty")
        return secret


def choose(options: Any, master_host: Optional[str]) -> SecretSource:
    """Pick where the secret comes from (see the module); raise at once when a job that may
    span hosts has no secret, TLS or opt-out."""
    given = getattr(options, "secret", None)
    if given is not None:
        return _Given(given, "RpcBackendOptions(secret=...)")
    env = os.environ.get("TORCHRPC_SECRET")
    if env:
        return _Given(env.encode(), "TORCHRPC_SECRET")
    path = getattr(options, "secret_file", None) or os.environ.get("TORCHRPC_SECRET_FILE")
    if path:
        return _File(path)
    if getattr(options, "tls_certfile", None):
        return _Given(None, "TLS certificates")
    if getattr(options, "insecure", False) or os.environ.get("TORCHRPC_INSECURE", "") not in ("", "0"):
        log.warning("torchrpc: authentication is off (insecure opt-out): anyone who can reach a worker's "
                    "port can run code on it")
        return _Given(None, "nothing (insecure opt-out)")
    if is_this_host(master_host):
        return _PrivateFile()
    raise RuntimeError(
        f"torchrpc: the rendezvous at {master_host!r} is not on this host, so this job may span hosts, and no "
        f"secret is set: workers would accept anyone who can reach their ports. To start it, {HOW_TO}."
    )


def is_this_host(host: Optional[str]) -> bool:
    """Whether ``host`` (the rendezvous host; None for a file store) is this machine."""
    if host is None:
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        ip = addr[0]
        if ip.startswith("127.") or ip == "::1":
            return True
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((ip, 0))  # only an address of this machine can be bound
            return True
        except OSError:
            continue
    return False


def private_dir() -> str:
    """A directory only this user can use: $XDG_RUNTIME_DIR/torchrpc, else <tmp>/torchrpc-<uid>."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "torchrpc") if runtime else os.path.join(tempfile.gettempdir(),
                                                                         f"torchrpc-{os.geteuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"torchrpc: {base} is not a private directory of this user (owner uid {st.st_uid}, "
                           f"mode {stat.S_IMODE(st.st_mode):o}); remove it, or {HOW_TO}")
    return base


def _read_private(path: str, size: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise RuntimeError(f"cannot open the job's secret file {path}: {e}. Workers on one host must share "
                           f"its temporary directory; otherwise {HOW_TO}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise RuntimeError(f"the job's secret file {path} is not a private file of this user")
        secret = f.read(size + 1)
    if len(secret) != size:
        raise RuntimeError(f"the job's secret file {path} is malformed")
    return secret
