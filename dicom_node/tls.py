"""TLS for the DICOM node: the server-side `ssl.SSLContext` (TLS 1.2 or later, client certificates
required and verified when a CA is given) and the handshake that completes each connection. The
context defers the handshake: pynetdicom wraps every accepted socket in its single accept loop, so
a handshake done there would let one silent or slow client stall every other sender; instead the
handshake runs in the connection's own thread, bounded by a timeout (`complete_handshake`).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """The certificate, key or CA cannot be used; the message names the file and the cause."""


class _DeferredHandshakeContext(ssl.SSLContext):
    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        # The caller's do_handshake_on_connect is ignored on purpose: see the module docstring.
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _refuse_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal and hang an unattended service.
    raise TLSConfigError("the private key is encrypted; give an unencrypted PEM key")


def server_context(
    cert: Path | str, key: Path | str, ca: Path | str | None = None
) -> ssl.SSLContext:
    """A server context for `cert`/`key` (PEM); with `ca`, clients must present a certificate
    that chains to it."""
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_refuse_password)
    except TLSConfigError:
        raise
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CA certificates from {ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def complete_handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """Finish the server handshake on `sock` within `timeout` seconds; raise OSError (ssl.SSLError,
    TimeoutError) when the peer does not speak TLS, fails verification or stalls."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    finally:
        sock.settimeout(previous)


def describe(sock: ssl.SSLSocket) -> str:
    """Protocol, cipher and the client certificate's subject, for a log line (no secrets)."""
    cipher = sock.cipher()
    peer = sock.getpeercert() or {}
    subject = ", ".join(f"{name}={value}" for rdn in peer.get("subject", ()) for name, value in rdn)
    return (
        f"{sock.version() or '?'} {cipher[0] if cipher else '?'}, "
        f"client certificate: {subject or 'none'}"
    )
