"""Backend options, accepted under torch.distributed.rpc's names too."""
from __future__ import annotations

import enum
import os
from typing import Any, Optional

import torch

DEFAULT_RPC_TIMEOUT_SEC: float = 60.0
DEFAULT_INIT_METHOD: str = "env://"
DEFAULT_NUM_WORKER_THREADS: int = 16
DEFAULT_SHUTDOWN_TIMEOUT: float = 0
UNSET_RPC_TIMEOUT: float = -1.0
#: Start-up (rendezvous, connections, the closing barrier) waits at least this long, however
#: short the calls' timeout: torch's start-up does not depend on ``rpc_timeout`` at all, and
#: programs set sub-second call timeouts.
MIN_STARTUP_TIMEOUT: float = 10.0


class BackendType(enum.Enum):
    """Accepted for compatibility; torchrpc has one backend, whatever is named."""

    TENSORPIPE = "TENSORPIPE"
    TORCHRPC = "TORCHRPC"


class RpcBackendOptions:
    """Options of a torchrpc agent.

    Args:
        num_worker_threads: threads that run incoming user functions (default 16).
        rpc_timeout: default timeout in seconds of rpc_sync / rpc_async / remote /
            to_here (default 60); 0 means no timeout.
        init_method: where workers meet: ``"env://"`` (MASTER_ADDR / MASTER_PORT,
            and RANK / WORLD_SIZE when not passed to init_rpc), ``"tcp://host:port"``
            or ``"file://path"``.
        device_maps, devices: CUDA device placement, as in
            TensorPipeRpcBackendOptions. torchrpc moves CPU tensors; giving a
            CUDA device where CUDA is unavailable is an error.
        _transports, _channels: TensorPipe tuning knobs, accepted and ignored.
        secret: bytes (or str) every connection between the job's workers must prove
            knowledge of (HMAC challenge-response; every later frame is authenticated with
            keys derived from it). Default: TORCHRPC_SECRET, else the file named by
            ``secret_file`` / TORCHRPC_SECRET_FILE; with none of these, a job on one host
            uses a random secret in a file only this user can read (the store carries its
            name, never the secret), and a job across hosts must set one (or TLS, or
            ``insecure``): ``init_rpc`` fails at once otherwise.
        secret_file: a file holding the secret (the same on every worker: a shared
            filesystem, or one copied to each host). Default: TORCHRPC_SECRET_FILE.
        insecure: no authentication at all, for networks where everyone who can reach a
            worker's port is trusted (logs a warning). Default: TORCHRPC_INSECURE=1.
        tls_certfile, tls_keyfile, tls_cafile: run every connection over TLS (Python's ssl),
            each worker presenting this certificate and accepting peers signed by the CA.
            Default: TORCHRPC_TLS_CERT / TORCHRPC_TLS_KEY / TORCHRPC_TLS_CA, else no TLS.
    """

    def __init__(
        self,
        *,
        num_worker_threads: int = DEFAULT_NUM_WORKER_THREADS,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SEC,
        init_method: str = DEFAULT_INIT_METHOD,
        device_maps: Optional[dict[str, dict[Any, Any]]] = None,
        devices: Optional[list[Any]] = None,
        _transports: Optional[list] = None,
        _channels: Optional[list] = None,
        secret: Optional[bytes | str] = None,
        secret_file: Optional[str] = None,
        insecure: bool = False,
        _faults: Optional[dict] = None,
        tls_certfile: Optional[str] = None,
        tls_keyfile: Optional[str] = None,
        tls_cafile: Optional[str] = None,
    ) -> None:
        if not isinstance(num_worker_threads, int) or num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be a positive int, got {num_worker_threads!r}")
        if not isinstance(rpc_timeout, (int, float)) or rpc_timeout < 0:
            raise ValueError(f"rpc_timeout must be a non-negative number of seconds, got {rpc_timeout!r}")
        if not isinstance(init_method, str):
            raise TypeError(f"init_method must be a string, got {type(init_method).__name__}")
        self.num_worker_threads = num_worker_threads
        self.rpc_timeout = float(rpc_timeout)
        self.init_method = init_method
        self.device_maps: dict[str, dict[torch.device, torch.device]] = {}
        self.devices: list[torch.device] = []
        for peer, mapping in (device_maps or {}).items():
            self.set_device_map(peer, mapping)
        for d in devices or []:
            self.devices.append(_cuda_device(d, "devices"))
        self._transports = _transports
        self._channels = _channels
        if secret is not None and not isinstance(secret, (bytes, str)):
            raise TypeError(f"secret must be bytes or str, got {type(secret).__name__}")
        self.secret: Optional[bytes] = secret.encode() if isinstance(secret, str) else secret
        if secret is not None and not self.secret:
            raise ValueError("secret must not be empty")
        self.secret_file = secret_file
        self.insecure = bool(insecure)
        #: fault injection for tests: see torchrpc.runtime.faults.Faults
        self._faults = _faults
        self.tls_certfile = tls_certfile or os.environ.get("TORCHRPC_TLS_CERT")
        self.tls_keyfile = tls_keyfile or os.environ.get("TORCHRPC_TLS_KEY")
        self.tls_cafile = tls_cafile or os.environ.get("TORCHRPC_TLS_CA")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("TLS needs both a certificate (tls_certfile) and its key (tls_keyfile)")

    @property
    def startup_timeout(self) -> float:
        """Seconds start-up may take: ``rpc_timeout``, but at least MIN_STARTUP_TIMEOUT (and 300
        when calls have no timeout)."""
        return max(self.rpc_timeout, MIN_STARTUP_TIMEOUT) if self.rpc_timeout else 300.0

    def set_device_map(self, to: str, device_map: dict[Any, Any]) -> None:
        """Map this worker's devices to the callee's (CUDA only; checked here)."""
        checked = {
            _cuda_device(k, "device_maps"): _cuda_device(v, "device_maps") for k, v in device_map.items()
        }
        self.device_maps.setdefault(to, {}).update(checked)

    def set_devices(self, devices: list[Any]) -> None:
        self.devices = [_cuda_device(d, "devices") for d in devices]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_worker_threads={self.num_worker_threads}, "
            f"rpc_timeout={self.rpc_timeout}, init_method={self.init_method!r})"
        )


class TensorPipeRpcBackendOptions(RpcBackendOptions):
    """torch.distributed.rpc's name for the options, so existing programs run unchanged: the
    same options (it adds nothing to :class:`RpcBackendOptions`)."""


def _cuda_device(d: Any, option: str) -> torch.device:
    dev = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{option} names CUDA device {dev}, but CUDA is not available on this machine; "
            "torchrpc moves CPU tensors here"
        )
    return dev
