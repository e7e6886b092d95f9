"""What a trio, ssl or OS error means for an SMTP session: the one translation table.

:func:`map_failure` is consulted by the transport for every failed read, write or
handshake, so callers only ever see :class:`~triomail.SMTPError`: a certificate that
failed verification (R10), a TLS failure (a security error, never a silent downgrade),
or a lost connection (EOF without close_notify once TLS is up counts as lost, R11).
Anything else (cancellation, a protocol error, a bug) is raised as it is; the
connection is unusable either way (R24, R27).
"""

from __future__ import annotations

import ssl

import trio

from .._core.errors import SMTPCertificateError, SMTPDisconnected, SMTPError, SMTPSecurityError

__all__ = ["HANDSHAKE", "map_failure"]

#: The stage name of the TLS handshake (its SSL errors are security errors).
HANDSHAKE = "TLS handshake"


def map_failure(exc: BaseException, stage: str) -> tuple[str, SMTPError | None]:
    """Why the connection is broken, and the error to raise (None: ``exc`` itself)."""
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__
        reason = f"broken in {stage}"
        if isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError):
            return reason, SMTPCertificateError(f"certificate verification failed: {cause}")
        if isinstance(cause, ssl.SSLError) and (
            stage == HANDSHAKE or not isinstance(cause, ssl.SSLEOFError)
        ):
            return reason, SMTPSecurityError(f"TLS failed during {stage}: {cause}")
        return reason, SMTPDisconnected(f"connection lost during {stage}")
    if isinstance(exc, trio.ClosedResourceError | OSError):
        return f"closed in {stage}", SMTPDisconnected(f"connection lost during {stage}: {exc}")
    return f"{type(exc).__name__} in {stage}", None
