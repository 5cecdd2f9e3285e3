"""TLS for the TCP transport, through Python's ssl module: mutual certificate checks.

Every worker presents ``certfile``/``keyfile`` and accepts only peers whose certificate
is signed by ``cafile`` (host names are not checked: workers are addressed by IP, and
the CA is the job's own). The HMAC handshake still runs inside the TLS channel.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TLSConfig:
    certfile: str
    keyfile: str
    cafile: Optional[str] = None

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certfile, self.keyfile)
        if self.cafile:
            ctx.load_verify_locations(self.cafile)
        else:
            ctx.load_default_certs()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_CLIENT)
