"""The client side of one mail transaction, as an explicit state machine (sans-IO).

Everything that decides what a reply means for a message lives here; the drivers
(``_client.lockstep`` for ``send``, ``_client.pipeline`` for ``send_many``) only choose
when to write and read. Both feed every reply to :meth:`Transaction.apply` and act on
the :class:`Decision` it returns, so a rule written here holds for both.

Theory of operation
-------------------
A driver writes commands and, for each, expects one reply: an :class:`Expect` naming
the command, and for ``RCPT`` the recipient's index. Replies are matched to what was
written one for one, in order, never by content (RFC 2920 §3.1, R29; R42: a 452 then
250s maps each reply to its own recipient). The rules, per command:

* ``MAIL``: 2xx opens the transaction. Anything else ends it with that reply; if an
  ``RSET`` in front of it was refused, that refusal is the reason instead (transient).
* ``RCPT``: each reply belongs to its recipient (R41). After a refused ``MAIL`` the
  replies are the server's complaints about a missing MAIL, not the recipient's fate.
* ``DATA``: only 354 lets the content go (R47: a 250 here would claim a delivery, so it
  is a protocol error). With no recipient accepted, or MAIL refused, the "content" is
  the bare terminator (R29). A 4xx/5xx ends the transaction; if MAIL was accepted the
  server is still inside it and the driver must ``RSET`` (R45).
* End of data (``.`` or ``BDAT ... LAST``): the final reply decides every accepted
  recipient; with none accepted the transaction is permanent whatever it says (R29). A
  reply that comes before the content was all written is the server giving up early
  (R46). A 2xx to ``BDAT`` leaves the session clean (RFC 3030: after a failed BDAT the
  state is indeterminate until ``RSET``).
* ``RSET``: anything but 250 leaves the session in an unknown state: stop.
* Behind an end of data: a command written in the same write as the previous
  message's end of data (RFC 2920 §3.1 allows it) may be refused as pipelined too far,
  as Haraka does since its SMTP-smuggling hardening: ``250`` to the end of data, then
  ``503 Bad sequence of commands`` to every command behind it. A 503 to the first
  command behind it (``RSET`` or ``MAIL``) therefore means "not started", never the
  message's refusal: :data:`Decision.AGAIN`, and the replies to the rest of that
  attempt decide nothing. Any other reply is the server's answer to the command
  itself (a 550 to MAIL refuses the sender; a 421 closes, as everywhere), and a 250
  to a leading ``RSET`` shows that the server takes commands behind an end of data.
  A 503 for a command that followed a refused one is never a recipient's deciding
  reply either (RCPT after a refused MAIL, above).
* Anywhere: a 3xx where none can come means the replies are out of step (R24, R47): a
  :class:`SMTPProtocolError`. A 421 means the server is closing and acts on nothing
  after it (RFC 5321 §3.8, R40): :data:`Decision.CLOSING`.

When the connection is lost, :meth:`Transaction.lost` says what that means for the
message (R37): never started -> transient "never started"; final octet (possibly)
written and no reply -> unknown, unless the server said 421 (it acted on nothing);
otherwise transient.

This module is one state machine: the per-message state and every transition are kept
together on purpose (see the issue 11 size rule).
"""

from __future__ import annotations

import enum

from .data import Canonical
from .errors import SMTPProtocolError
from .prepare import PreparedMessage
from .reply import Reply
from .results import Outcome, SendResult, outcome_of, transaction_result
from .timeouts import Timeouts

__all__ = [
    "AGAIN",
    "ANSWERED",
    "BDAT",
    "BODY",
    "CLOSING",
    "CLOSING_421",
    "DATA",
    "DELIVERED",
    "DOT",
    "FINISHED",
    "MAIL",
    "NOTHING",
    "RCPT",
    "RESET",
    "RSET",
    "RSET_REFUSED",
    "DATA_CHUNK",
    "RCPT_GROUP",
    "STAGES",
    "Decision",
    "Expect",
    "Transaction",
    "stage_seconds",
]

#: RCPT commands per write: a bounded group cannot deadlock against a small window (R29).
RCPT_GROUP = 100
#: Message content larger than this is written in pieces, each under its own deadline (R46).
DATA_CHUNK = 256 * 1024


class Expect(enum.IntEnum):
    """What a pending reply answers (an index into :data:`STAGES`)."""

    RSET = 0
    MAIL = 1
    RCPT = 2
    DATA = 3
    DOT = 4  # the end of DATA content
    BDAT = 5  # BDAT <n> LAST with its chunk


#: The stage names used in errors and deadlines, by :class:`Expect`.
STAGES = ("RSET", "MAIL", "RCPT", "DATA", "end of data", "BDAT")


def stage_seconds(t: Timeouts) -> tuple[float, ...]:
    """The deadline for the reply to each :class:`Expect`, in order (R26)."""
    return (t.rset, t.mail, t.rcpt, t.data_init, t.data_done, t.data_done)


class Decision(enum.IntEnum):
    """What the driver must do after a reply (false for "nothing": the usual case)."""

    NOTHING = 0
    #: The transaction's :attr:`~Transaction.result` is final.
    FINISHED = 1
    #: Finished by a 2xx to the end of data: one more message delivered.
    DELIVERED = 2
    #: The end-of-data reply of a transaction that had already finished.
    ANSWERED = 3
    #: 354: send the content (:attr:`Transaction.has_takers` false: just ``.\r\n``).
    BODY = 4
    #: Finished while the server is inside the transaction: ``RSET`` next (R45).
    RESET = 5
    #: 421: the server is closing; nothing after this reply was acted on (R40).
    CLOSING = 6
    #: ``RSET`` refused: the session is in an unknown state; stop after this.
    RSET_REFUSED = 7
    #: Refused as pipelined behind an end of data: never started; send it again, and
    #: wait for each end-of-data reply before the next ``MAIL`` from now on.
    AGAIN = 8


# The same values as plain ints, for the drivers' per-reply path: a global load, not an
# enum attribute look-up, and CPython specialises comparisons and tuple indexing for
# exact ints only (an IntEnum member is an int subclass).
RSET, MAIL, RCPT, DATA, DOT, BDAT = map(int, Expect)
NOTHING, FINISHED, DELIVERED, ANSWERED, BODY, RESET, CLOSING, RSET_REFUSED, AGAIN = map(
    int, Decision
)
#: The error on a result that a 421 ended.
CLOSING_421 = "server closing (421)"
_EARLY = "server replied before the end of data"


class Transaction:
    """One message's transaction and what the server has said about it so far."""

    __slots__ = (
        "accepted",
        "after_dot",
        "again",
        "canonical",
        "clean",
        "done",
        "final_maybe",
        "final_written",
        "index",
        "mail",
        "mail_ok",
        "prepared",
        "rcpt_replies",
        "rcpts",
        "result",
        "rset_failed",
        "started",
    )

    def __init__(
        self,
        index: int,
        prepared: PreparedMessage,
        mail: bytes,
        rcpts: list[bytes],
        canonical: Canonical,
    ) -> None:
        self.index = index
        self.prepared = prepared
        self.mail = mail
        self.rcpts = rcpts
        self.canonical = canonical
        self.rcpt_replies: list[Reply | None] = [None] * len(rcpts)
        self.mail_ok = False
        self.accepted = 0
        self.started = False  # MAIL has been (or is being) written
        self.after_dot = False  # its first command shares a write with an end of data
        self.again = False  # refused as pipelined behind that end of data: not started
        self.final_written = False  # the last octet of the content is on the wire
        self.final_maybe = False  # a write holding the last octet failed part-way
        self.rset_failed: Reply | None = None  # the RSET in front of it was refused
        self.clean = False  # the server is certainly outside this transaction
        self.done = False
        self.result: SendResult | None = None

    def restart(self) -> None:
        """Forget every reply: the transaction is about to be written again."""
        # The state is what __init__ sets: one list of it (a call per message saved).
        self.__init__(self.index, self.prepared, self.mail, self.rcpts, self.canonical)  # type: ignore[misc]

    @property
    def has_takers(self) -> bool:
        """True while the content has somewhere to go: MAIL and a recipient accepted."""
        return self.accepted > 0 and not self.done

    def finish(self, outcome: Outcome, reply: Reply | None, error: str | None = None) -> None:
        """Decide the result: a refused recipient keeps its own reply (R41)."""
        if self.done:
            return
        self.done = True
        self.result = transaction_result(
            self.prepared, self.rcpt_replies, outcome, reply, error, self.mail_ok
        )

    def no_takers(self) -> None:
        """Every recipient refused: no content is sent at all (R41); each keeps its reply."""
        self.finish(Outcome.PERMANENT, None)

    def lost(self, error: str, *, closing: bool) -> None:
        """The connection ended with this transaction open: classify it (R37)."""
        if not self.started:
            self.finish(
                Outcome.TRANSIENT,
                None,
                f"not sent: never started, the connection ended first ({error})",
            )
        elif (self.final_written or self.final_maybe) and not closing:
            self.finish(Outcome.UNKNOWN, None, error)
        else:
            self.finish(Outcome.TRANSIENT, None, error)

    def apply(self, kind: int, i: int, reply: Reply) -> int:
        """Apply the reply to command ``kind`` (an :class:`Expect`; recipient ``i`` for
        RCPT); the :class:`Decision`, as its int."""
        code = reply.code
        if kind == RCPT:  # most replies: tested first
            if 300 <= code < 400:
                raise _desync(reply, kind)
            if not self.mail_ok:
                return NOTHING  # answers to RCPT after a refused MAIL are not the recipient's
            self.rcpt_replies[i] = reply
            if code < 300:
                self.accepted += 1
                return NOTHING
            if code == 421:
                self.finish(Outcome.TRANSIENT, reply, CLOSING_421)
                return CLOSING
            return NOTHING
        if kind == MAIL:
            if code < 300:
                self.mail_ok = True
                return NOTHING
            if code < 400:
                raise _desync(reply, kind)
            if code == 421:
                self.finish(Outcome.TRANSIENT, reply, CLOSING_421)
                return CLOSING
            if self.again:
                return NOTHING  # the RSET in front was refused as pipelined: not started
            if code == 503 and self.after_dot:
                return self._not_started()
            if self.rset_failed is not None:
                self.finish(
                    Outcome.TRANSIENT, self.rset_failed, f"RSET refused: {self.rset_failed}"
                )
            else:
                self.finish(outcome_of(reply), reply)
            return FINISHED
        if kind == DATA:
            if code == 354:
                return BODY  # with no recipient accepted, the content is just "."
            if code < 400:
                # R47: only 354 lets the body go; a 250 here would claim a delivery.
                raise SMTPProtocolError(f"unexpected {reply} in reply to DATA")
            if self.again and code != 421:
                return NOTHING  # this attempt never started: nothing to decide
            self.finish(outcome_of(reply), reply)  # R47: no body after this
            if code == 421:
                return CLOSING
            return RESET if self.mail_ok else FINISHED
        if kind == RSET:
            if 300 <= code < 400:
                raise _desync(reply, kind)
            if code == 421:
                self.finish(Outcome.TRANSIENT, reply, CLOSING_421)
                return CLOSING
            if code != 250:
                if code == 503 and self.after_dot:
                    return self._not_started()
                self.rset_failed = reply
                return RSET_REFUSED
            self.after_dot = False  # taken: MAIL behind it is no longer "behind a dot"
            return NOTHING
        # The end of data: "." after DATA, or BDAT ... LAST.
        if 300 <= code < 400:
            raise _desync(reply, kind)
        if kind == BDAT and code < 300:
            self.clean = True
        if self.done:
            return CLOSING if code == 421 else ANSWERED
        if self.again and code != 421:
            return ANSWERED  # owed, but refused with the rest of this attempt: not started
        error = None if self.final_written else _EARLY
        if self.accepted == 0:
            # R29: every RCPT was refused (each keeps its own reply).
            self.finish(Outcome.PERMANENT, reply, error)
        else:
            self.finish(outcome_of(reply), reply, error)
        if code == 421:
            return CLOSING
        return DELIVERED if code < 300 and self.mail_ok and self.accepted else FINISHED

    def _not_started(self) -> int:
        """Refused as pipelined behind an end of data: this attempt never started."""
        self.again = True
        self.started = False
        return AGAIN


def _desync(reply: Reply, kind: int) -> SMTPProtocolError:
    """A 3xx where none can be: the replies are out of step (R24, R47)."""
    return SMTPProtocolError(f"unexpected {reply} in reply to {STAGES[kind]}")
