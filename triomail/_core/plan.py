"""A prepared message against one server: the MAIL and RCPT lines, or a refusal (sans-IO).

Theory of operation
-------------------
:func:`plan` is where the message meets the server's EHLO. It never sends what the
server did not advertise (R28): 8-bit content only with 8BITMIME or SMTPUTF8 (R18, else
the 7-bit form or 554 5.6.3), UTF-8 addresses only with SMTPUTF8 (R32, 553 5.6.7),
REQUIRETLS only over TLS to a server that offers it (RFC 8689 §4, R34, 550 5.7.30), a
message over the SIZE limit never (RFC 1870, R30, 552 5.3.4), DSN parameters only with
DSN (RFC 3461, R33). A refusal is a :class:`SendResult` built before any byte is
written, the same one for ``send`` and ``send_many``.
"""

from __future__ import annotations

from .capabilities import Capabilities
from .commands import encode_command, utf8_addr_xtext, xtext
from .data import Canonical
from .prepare import DSN, PreparedMessage
from .results import SendResult, local_failure

__all__ = ["Plan", "plan"]

#: The envelope lines and the content form to send (a plain tuple: built per message).
Plan = tuple[bytes, list[bytes], Canonical]


def plan(
    prepared: PreparedMessage,
    caps: Capabilities,
    *,
    tls_active: bool,
    dsn: DSN | None,
    requiretls: bool,
) -> SendResult | Plan:
    """Check ``prepared`` against ``caps``; the refusal, or (MAIL, RCPTs, content)."""
    canonical = prepared.canonical
    if canonical.eight_bit and not (caps.eightbitmime or caps.smtputf8):
        if prepared.canonical_7bit is not None and not prepared.canonical_7bit.eight_bit:
            canonical = prepared.canonical_7bit
        else:
            # R18: never put 8-bit octets on the wire of a 7-bit server.
            return local_failure(
                prepared, 554, "5.6.3", "8-bit message and the server lacks 8BITMIME"
            )
    if prepared.needs_smtputf8 and not caps.smtputf8:
        # R32: no silent downgrade of UTF-8 addresses.
        return local_failure(prepared, 553, "5.6.7", "UTF-8 address and the server lacks SMTPUTF8")
    if requiretls and not (tls_active and caps.requiretls):
        # R34 / RFC 8689 §4: refuse, report 5.7.30.
        return local_failure(prepared, 550, "5.7.30", "REQUIRETLS support required")
    params = []
    if "SIZE" in caps.extensions:
        limit = caps.size_limit
        if limit is not None and len(canonical.data) > limit:
            # R30: a permanent failure before MAIL.
            return local_failure(
                prepared,
                552,
                "5.3.4",
                f"message of {len(canonical.data)} octets exceeds SIZE {limit}",
            )
        params.append(f"SIZE={len(canonical.data)}")
    if canonical.eight_bit and caps.eightbitmime:
        params.append("BODY=8BITMIME")
    if prepared.needs_smtputf8:
        params.append("SMTPUTF8")
    if dsn is not None and caps.dsn:  # R28: never unadvertised parameters
        if dsn.ret:
            params.append(f"RET={dsn.ret}")
        if dsn.envid:
            params.append(f"ENVID={xtext(dsn.envid)}")
    if requiretls:
        params.append("REQUIRETLS")
    mail = encode_command("MAIL", f"FROM:<{prepared.sender}>", *params)
    rcpt_params: list[str] = []
    if dsn is not None and caps.dsn and dsn.notify:
        rcpt_params.append("NOTIFY=" + ",".join(n.upper() for n in dsn.notify))
    rcpts = []
    for recipient in prepared.recipients:
        extra = list(rcpt_params)
        if dsn is not None and dsn.orcpt and caps.dsn:
            if recipient.isascii():
                extra.append(f"ORCPT=rfc822;{xtext(recipient)}")
            else:
                extra.append(f"ORCPT=utf-8;{utf8_addr_xtext(recipient)}")
        rcpts.append(encode_command("RCPT", f"TO:<{recipient}>", *extra))
    return mail, rcpts, canonical
