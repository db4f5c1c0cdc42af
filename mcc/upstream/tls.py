"""TLS towards https origins and parents: one verifying client context, clear errors.

Certificates are always verified (chain and host name); there is no switch to turn that
off. Trust comes from the system store, which OpenSSL locates through ``SSL_CERT_FILE``
and ``SSL_CERT_DIR`` when they are set, plus ``upstream_ca_file`` when configured (a
private CA for internal mirrors and parents). The host name sent as SNI is the one
checked against the certificate, even when mcc connects to an address it resolved
itself (see ``Upstream._connect_origin``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_context", "describe_tls_error", "is_verify_error"]

# Only HTTP/1.1 is spoken upstream; saying so in ALPN keeps servers from picking h2.
_ALPN = ["http/1.1"]


def client_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """A client context verifying against the system store (and ``ca_file``).

    Raises:
      OSError: ``ca_file`` cannot be read.
      ssl.SSLError: ``ca_file`` holds no usable certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # honours SSL_CERT_FILE/_DIR
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(_ALPN)
    return ctx


def describe_tls_error(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` (or what caused it) is a TLS failure, else None.

    trio raises :class:`trio.BrokenResourceError` from the :class:`ssl.SSLError`, so the
    cause chain is searched.
    """
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen})"
        seen = seen.__cause__ or seen.__context__
    return None


def is_verify_error(exc: BaseException) -> bool:
    """True when ``exc`` was caused by a certificate that did not verify (not worth a retry:
    the same certificate will be presented again)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
