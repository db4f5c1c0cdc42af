"""The TLS listener's side: the server certificate, reloadable, and file slices for TLS.

A TLS connection is HTTP/1.1 over :class:`trio.SSLStream`; everything above the stream
(h11, routing, the engine) is the same as on a plain listener. Two things differ:

- sendfile(2) copies file bytes to a socket in the kernel, which TLS cannot use (the
  bytes must be encrypted first), so stored blocks are read with ``os.pread`` in pieces
  and written through the SSL stream (:func:`file_pieces`);
- the handshake is awaited before the first request, within ``request_head`` seconds,
  so a client that opens a connection and never handshakes is dropped like a slowloris.

The certificate and key are loaded when the listener opens and again on
:meth:`ServerCertificate.reload`; connections accepted afterwards use the new pair,
running ones keep theirs. A reload that fails keeps the old pair.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import trio

__all__ = ["ServerCertificate", "file_pieces"]

# ALPN: only HTTP/1.1 is spoken (RFC 7301); offering nothing else keeps h2 clients on 1.1.
_ALPN = ["http/1.1"]


class ServerCertificate:
    """The TLS listeners' certificate chain and key.

    Args:
      cert: PEM certificate chain (leaf first).
      key: PEM private key.

    Raises:
      OSError: a file cannot be read, or (ssl.SSLError) they do not form a usable pair;
        the message names the files.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = self._load()

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(_ALPN)
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot load TLS certificate {str(self.cert)!r} with key {str(self.key)!r}: "
                f"{exc.strerror or exc}",
            ) from None
        return ctx

    def reload(self, cert: Path | None = None, key: Path | None = None) -> None:
        """Read the certificate and key again (from new paths when given); new
        connections use them.

        Raises:
          OSError: as the constructor; the previous pair (and paths) stay in use.
        """
        old = self.cert, self.key
        self.cert, self.key = cert or self.cert, key or self.key
        try:
            self.context = self._load()
        except OSError:
            self.cert, self.key = old
            raise

    def wrap(self, stream: trio.SocketStream) -> trio.SSLStream[trio.SocketStream]:
        """The server side of TLS over an accepted connection (handshake not yet done)."""
        return trio.SSLStream(stream, self.context, server_side=True, https_compatible=True)


def file_pieces(fd: int, offset: int, length: int, piece: int) -> Iterator[bytes]:
    """``length`` bytes of ``fd`` from ``offset``, read with pread in ``piece``-byte parts.

    Raises:
      OSError: the file is shorter than promised (EIO), as :func:`sendfile` does.
    """
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(piece, end - offset), offset)
        if not data:  # never send a short body quietly
            raise OSError(errno.EIO, "blob file shorter than its index entry")
        offset += len(data)
        yield data
