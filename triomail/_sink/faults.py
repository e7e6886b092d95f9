"""Fault injection for the capture server (:mod:`triomail._sink.server`).

A :class:`Fault` is one rule: *when* a command arrives (optionally only for one
recipient, or only in the nth transaction), *do* something other than the normal
reply: answer with another code, answer late, or drop the connection. Rules are
plain frozen data; a :class:`FaultBook`, one per sink, keeps the firing counters
and numbers the transactions the rules refer to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["COMMANDS", "Drop", "Fault", "FaultBook"]

#: What a fault does to the connection:
#:
#: - ``"before_reply"``: close (abruptly, no TLS ``close_notify``) instead of replying.
#:   On ``"."`` the message has been received and counts as delivered, the classic
#:   "reply lost after queueing" case of RFC 1047.
#: - ``"after_reply"``: send the reply, then close.
#: - ``"during_data"``: on ``DATA`` or ``BDAT``, close once ``after_bytes`` octets of
#:   message data have been read.
Drop = Literal["before_reply", "after_reply", "during_data"]

#: Command names a :class:`Fault` can match. ``"CONNECT"`` is the greeting and
#: ``"."`` the reply that ends a message (after ``<CRLF>.<CRLF>`` or ``BDAT ... LAST``).
COMMANDS = frozenset(
    {
        "CONNECT", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", ".",
        "BDAT", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "QUIT",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault-injection rule for :class:`~triomail.testing.SMTPSink`.

    The first rule (in the order given) whose filters match a command fires. With
    none of ``code``, ``raw`` or ``drop`` a rule only delays the normal reply.

    Args:
        command: the command to match: a verb such as ``"MAIL"`` or ``"RCPT"``,
            ``"CONNECT"`` for the greeting, ``"."`` for the end-of-message reply.
        code: reply with this code instead of the normal reply; the command then has
            no effect (a ``RCPT`` is not added, a ``MAIL`` opens no transaction). On
            ``"."`` a 2xx code still stores the message; on ``BDAT`` the chunk is
            consumed first. A ``421`` closes the connection after the reply.
        text: the reply text (may hold ``\\n`` for a multi-line reply); defaults to
            ``"X.0.0 Injected fault"`` with the class digit of ``code``.
        raw: bytes to write verbatim instead of a reply (e.g. two replies in one
            write); exclusive with ``code``.
        recipient: for ``RCPT``, match only this forward-path (case-insensitive).
        message: match only inside the nth transaction (1-based). Every ``MAIL``
            command the sink receives, on any connection, starts a new number, so a
            retried message gets a new number.
        delay: seconds to wait before replying (or before dropping).
        drop: close the connection, see :data:`Drop`.
        after_bytes: for ``drop="during_data"``, octets of data to read first.
        times: fire at most this many times (default: every time).
        refuse_pipelined: on ``"."`` after ``DATA``, answer every command already
            pipelined behind the end of data with ``503``, as Haraka does (see
            ``SMTPSink(refuse_pipelined_after_data=...)``).
        forbid_pipelined: if anything was pipelined behind this command, answer
            ``554 5.5.0 Error: SMTP protocol synchronization`` instead and close, as
            Postfix's ``smtpd_forbid_unauth_pipelining`` does behind a command that
            must end a group (see ``SMTPSink(forbid_unauth_pipelining=...)``); here
            for any command, e.g. ``"."`` for a server that takes nothing behind an
            end of data. The message of a refused ``"."`` is not stored.
    """

    command: str
    code: int | None = None
    text: str | None = None
    raw: bytes | None = None
    recipient: str | None = None
    message: int | None = None
    delay: float = 0.0
    drop: Drop | None = None
    after_bytes: int = 0
    times: int | None = None
    refuse_pipelined: bool = False
    forbid_pipelined: bool = False

    def __post_init__(self) -> None:
        command = self.command.upper()
        object.__setattr__(self, "command", command)
        if command not in COMMANDS:
            raise ValueError(f"unknown command {self.command!r}; use one of {sorted(COMMANDS)}")
        if self.code is not None and not 200 <= self.code <= 599:
            raise ValueError(f"reply code must be 200..599, not {self.code}")
        if self.code is not None and self.raw is not None:
            raise ValueError("give code or raw, not both")
        if self.text is not None and self.code is None:
            raise ValueError("text needs a code")
        if self.recipient is not None and command != "RCPT":
            raise ValueError("recipient= only applies to RCPT")
        if self.drop == "during_data" and command not in ("DATA", "BDAT"):
            raise ValueError('drop="during_data" only applies to DATA or BDAT')
        if self.drop == "during_data" and (self.code is not None or self.raw is not None):
            raise ValueError('drop="during_data" cannot be combined with a reply')
        if self.refuse_pipelined and command != ".":
            raise ValueError('refuse_pipelined only applies to "."')
        if self.forbid_pipelined and command in ("CONNECT", "QUIT"):
            raise ValueError("forbid_pipelined does not apply to CONNECT or QUIT")
        if self.after_bytes < 0 or self.delay < 0:
            raise ValueError("after_bytes and delay must not be negative")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1")
        if self.message is not None and self.message < 1:
            raise ValueError("message numbers start at 1")

    @property
    def replaces_reply(self) -> bool:
        """Whether this rule answers instead of the normal command handling."""
        return self.code is not None or self.raw is not None


class FaultBook:
    """The sink-wide list of rules, how often each has fired, and the MAIL count.

    One book serves every connection of a sink, so ``Fault.message`` and ``times``
    count across connections (a retried message gets a new number).
    """

    __slots__ = ("_fired", "_mail_commands", "_rules")

    def __init__(self, rules: tuple[Fault, ...]) -> None:
        self._rules = rules
        self._fired = [0] * len(rules)
        self._mail_commands = 0

    def __bool__(self) -> bool:
        return bool(self._rules)

    def number_mail(self) -> int:
        """Number a MAIL command (from 1): the transaction ``Fault.message`` selects."""
        self._mail_commands += 1
        return self._mail_commands

    def match(
        self, command: str, message: int | None, recipient: str | None = None
    ) -> Fault | None:
        """Return the first rule matching (and count it as fired), or None."""
        for i, rule in enumerate(self._rules):
            if rule.command != command:
                continue
            if rule.message is not None and rule.message != message:
                continue
            if rule.recipient is not None and (
                recipient is None or rule.recipient.casefold() != recipient.casefold()
            ):
                continue
            if rule.times is not None and self._fired[i] >= rule.times:
                continue
            self._fired[i] += 1
            return rule
        return None
