"""SMTP AUTH (RFC 4954): choosing a SASL mechanism and running its exchange.

Theory of operation
-------------------
:func:`choose` lists the mechanisms to try: XOAUTH2 when a token is given, else those
the caller named (``auth=``) or every advertised one the password can serve, strongest
first (``_core.sasl``); the session tries them in turn until one is accepted or the
server refuses the credentials themselves (535), as smtplib and aiosmtplib do.
:func:`authenticate` runs the exchange: the initial response rides on the AUTH line when
it fits (RFC 4954 §4, an empty one is ``=``), each 334 challenge is answered, and a
challenge that cannot be decoded, or one too many, is cancelled with ``*`` and the
connection closed (R35). The exchange is redacted in the debug log (R36). Only the
session decides whether credentials may be sent at all (TLS, R9).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from .._core.capabilities import Capabilities
from .._core.errors import LocalProtocolError, SMTPAuthenticationError, SMTPSecurityError
from .._core.reply import Reply
from .._core.sasl import SASLMechanism, XOAuth2, password_mechanisms
from .options import SessionOptions
from .transport import Transport

__all__ = ["authenticate", "authenticate_with_any", "choose"]

# smtplib's _MAXCHALLENGE: an endless 334 loop ends here (R35).
_MAX_CHALLENGES = 5
# RFC 4954 §4: the AUTH line may be at most 12288 octets with its initial response.
_MAX_AUTH_LINE = 12288


#: AUTH replies that refuse the mechanism, not the credentials (RFC 4954 §6).
_MECHANISM_REFUSED = frozenset({504, 534, 538})


async def choose(
    caps: Capabilities, tls_active: bool, options: SessionOptions
) -> list[SASLMechanism]:
    """The mechanisms to try for the session's credentials, in order (``options.auth``,
    or every advertised one, strongest first); :class:`SMTPSecurityError` if none fits."""
    username, password, oauth_token = options.username, options.password, options.oauth_token
    assert username is not None
    auth = options.auth
    wanted: Sequence[str] = (auth,) if isinstance(auth, str) else tuple(auth or ())
    advertised = caps.auth_mechanisms
    if not advertised and not tls_active and caps.starttls:
        # Many servers advertise AUTH only once TLS is up (RFC 4954 §4 allows it).
        raise SMTPSecurityError(
            "the server offers AUTH only after TLS (none advertised in plaintext; "
            "it offers STARTTLS): use tls='starttls'"
        )
    if oauth_token is not None:
        if "XOAUTH2" not in advertised:
            raise SMTPSecurityError(_not_offered("XOAUTH2", advertised))
        token = oauth_token if isinstance(oauth_token, str) else await oauth_token()
        return [XOAuth2(username, token)]
    if password is None:
        raise LocalProtocolError("username given without password or oauth_token")
    for name in wanted:
        if name.upper() not in advertised:
            raise SMTPSecurityError(_not_offered(name.upper(), advertised))
    mechanisms = password_mechanisms(advertised, username, password, wanted)
    if not mechanisms:
        raise SMTPSecurityError(f"server offers no usable AUTH mechanism ({_offers(advertised)})")
    return mechanisms


def _not_offered(what: str, advertised: frozenset[str]) -> str:
    return f"server does not offer {what} ({_offers(advertised)})"


def _offers(advertised: frozenset[str]) -> str:
    return f"it offers {', '.join(sorted(advertised))}" if advertised else "it offers no AUTH"


async def authenticate_with_any(
    io: Transport, mechanisms: Sequence[SASLMechanism], seconds: float
) -> None:
    """Try ``mechanisms`` in turn until one is accepted (RFC 4954 §6): 504, 534 and 538
    refuse the mechanism, so the next one may do; 535 refuses the credentials whatever
    the mechanism, and a 4xx the moment: trying on would only invite a lockout (R35)."""
    for i, mechanism in enumerate(mechanisms):
        try:
            await authenticate(io, mechanism, seconds)
            return
        except SMTPAuthenticationError as exc:
            if exc.reply.code not in _MECHANISM_REFUSED or i == len(mechanisms) - 1:
                raise


async def authenticate(io: Transport, mechanism: SASLMechanism, seconds: float) -> None:
    """Run one AUTH exchange; :class:`SMTPAuthenticationError` unless it ends in 235."""
    io.in_auth = True
    try:
        reply = await _exchange(io, mechanism, seconds)
    finally:
        io.in_auth = False
    if reply.code != 235:
        raise SMTPAuthenticationError("AUTH", reply)


async def _exchange(io: Transport, mechanism: SASLMechanism, t: float) -> Reply:
    """The AUTH line, then a response per 334 challenge; the final reply."""
    initial = mechanism.initial_response()
    line = b"AUTH " + mechanism.name.encode("ascii")
    if initial is not None:
        encoded = base64.b64encode(initial) or b"="  # §4: an empty response is "="
        # §4: a response too long for the AUTH line answers the first 334 instead.
        if len(line) + 1 + len(encoded) + 2 <= _MAX_AUTH_LINE:
            line += b" " + encoded
    reply = await io.command(line + b"\r\n", "AUTH", t)
    challenges = 0
    while reply.code == 334:
        challenges += 1
        try:
            challenge = base64.b64decode(reply.text.strip(), validate=True)
            if challenges > _MAX_CHALLENGES:
                raise ValueError("too many challenges")
            answer = mechanism.respond(challenge)
        except (binascii.Error, ValueError):
            reply = await io.command(b"*\r\n", "AUTH", t)  # cancel (R35)
            io.broken = "AUTH exchange cancelled"
            await io.abort()
            raise SMTPAuthenticationError("AUTH", reply) from None
        reply = await io.command(base64.b64encode(answer) + b"\r\n", "AUTH", t)
    return reply
