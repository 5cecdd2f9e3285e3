"""A job over TLS: every connection encrypted and both ends' certificates checked against the CA."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import torchrpc as rpc
from common import ident, init, whoami
from harness import run_workers
from torchrpc import transport
from torchrpc.transport.tls import TLSConfig

pytestmark = pytest.mark.timeout(90)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a worker certificate it signed, and a certificate from an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=torchrpc test {ca}", cwd=d)
    for name, ca in (("worker", "ca"), ("intruder", "other-ca")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", cwd=d)
    return {k: str(d / k) for k in ("ca.pem", "worker.pem", "worker.key", "intruder.pem", "intruder.key")}


def test_tls_transport_checks_certificates(pki):
    good = TLSConfig(pki["worker.pem"], pki["worker.key"], pki["ca.pem"])
    bad = TLSConfig(pki["intruder.pem"], pki["intruder.key"], pki["ca.pem"])
    lst = transport.listen("tls://127.0.0.1:0", secret=b"k", tls=good)
    import threading
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("conn", lst.accept()), daemon=True)
    t.start()
    try:
        assert lst.address.startswith("tls://")
        with pytest.raises(transport.ConnectionClosed):
            transport.connect(lst.address, timeout=5, secret=b"k", tls=bad)  # not signed by the CA
        client = transport.connect(lst.address, timeout=5, secret=b"k", tls=good)
        t.join(10)
        client.send([b"over tls", bytes(1 << 20)])
        got = box["conn"].recv()
        assert bytes(got[0]) == b"over tls" and len(got[1]) == 1 << 20
        client.close()
        box["conn"].close()
    finally:
        lst.close()
        t.join(5)
    with pytest.raises(ValueError, match="TLS configuration"):
        transport.listen("tls://127.0.0.1:0")


def _tls_job(rank, world_size, pki):
    init(rank, world_size, tls_certfile=pki["worker.pem"], tls_keyfile=pki["worker.key"], tls_cafile=pki["ca.pem"])
    agent = rpc.api.current.agent()
    out = {"scheme": agent._listener.address.split("://")[0]}
    peer = f"worker{(rank + 1) % world_size}"
    out["call"] = rpc.rpc_sync(peer, whoami)
    t = torch.randn(1 << 18)
    out["tensor"] = torch.equal(rpc.rpc_sync(peer, ident, args=(t,)), t)
    out["rref"] = rpc.remote(peer, torch.ones, args=(3,)).to_here().tolist()
    rpc.shutdown()
    return out


def test_a_job_runs_over_tls(pki):
    outs = run_workers(_tls_job, 2, args=(pki,), env={"TORCHRPC_SHM": "0"})
    for rank, out in enumerate(outs):
        assert out == {"scheme": "tls", "call": f"worker{(rank + 1) % 2}", "tensor": True, "rref": [1.0, 1.0, 1.0]}
