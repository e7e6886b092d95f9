"""The client transaction state machine, fed replies by hand: no I/O, no trio.

Each test writes what a driver would (``started``, ``final_written``) and reads the
:class:`Decision` and the result, so every rule of ``_core.transaction`` is pinned here
once, for ``send`` and ``send_many`` alike.
"""

from __future__ import annotations

import pytest

from triomail._core.errors import SMTPProtocolError
from triomail._core.prepare import prepare
from triomail._core.reply import Reply
from triomail._core.results import Outcome, SendResult
from triomail._core.transaction import CLOSING_421, Decision, Expect, Transaction

MAIL, RCPT, DATA, DOT, BDAT, RSET = (
    Expect.MAIL,
    Expect.RCPT,
    Expect.DATA,
    Expect.DOT,
    Expect.BDAT,
    Expect.RSET,
)


def r(code: int, text: str = "x") -> Reply:
    return Reply.from_lines(code, (text,))


def txn(*recipients: str) -> Transaction:
    prepared = prepare(
        b"Subject: t\r\n\r\nbody\r\n",
        sender="a@example.com",
        recipients=list(recipients or ["b@example.com"]),
    )
    rcpts = [f"RCPT TO:<{x}>\r\n".encode() for x in prepared.recipients]
    t = Transaction(0, prepared, b"MAIL FROM:<a@example.com>\r\n", rcpts, prepared.canonical)
    t.started = True
    return t


def outcomes(result: SendResult | None) -> list[tuple[str, Outcome, int | None]]:
    assert result is not None
    return [(x.recipient, x.outcome, x.code) for x in result.recipients]


def test_a_delivery_runs_mail_rcpt_data_body_dot() -> None:
    t = txn("b@example.com", "c@example.com")
    assert t.apply(MAIL, 0, r(250)) == Decision.NOTHING
    assert t.apply(RCPT, 0, r(250)) == Decision.NOTHING
    assert t.apply(RCPT, 1, r(550, "5.1.1 no")) == Decision.NOTHING
    assert t.apply(DATA, 0, r(354)) == Decision.BODY
    assert t.has_takers
    t.final_written = True
    assert t.apply(DOT, 0, r(250, "2.0.0 queued")) == Decision.DELIVERED
    assert outcomes(t.result) == [
        ("b@example.com", Outcome.ACCEPTED, 250),
        ("c@example.com", Outcome.PERMANENT, 550),  # R41: a refusal keeps its own reply
    ]
    assert t.result is not None and t.result.mail_accepted and t.result.error is None


def test_a_refused_mail_ends_it_and_later_rcpt_replies_are_not_the_recipients() -> None:
    t = txn()
    assert t.apply(MAIL, 0, r(550, "5.7.1 sender refused")) == Decision.FINISHED
    assert t.apply(RCPT, 0, r(503, "5.5.1 need MAIL")) == Decision.NOTHING
    # DATA refused too: the server is outside any transaction, so no RSET is needed.
    assert t.apply(DATA, 0, r(503)) == Decision.FINISHED
    assert outcomes(t.result) == [("b@example.com", Outcome.PERMANENT, 550)]
    assert t.result is not None and not t.result.mail_accepted


def test_data_refused_after_an_accepted_mail_asks_for_rset() -> None:
    t = txn()
    t.apply(MAIL, 0, r(250))
    t.apply(RCPT, 0, r(250))
    assert t.apply(DATA, 0, r(451, "4.3.0 later")) == Decision.RESET
    assert outcomes(t.result) == [("b@example.com", Outcome.TRANSIENT, 451)]


@pytest.mark.parametrize(
    ("kind", "code"), [(MAIL, 354), (RCPT, 354), (RCPT, 334), (DOT, 354), (BDAT, 354), (RSET, 354)]
)
def test_an_intermediate_reply_where_none_can_come_is_a_desync(kind: Expect, code: int) -> None:
    t = txn()
    if kind != MAIL:
        t.apply(MAIL, 0, r(250))
    with pytest.raises(SMTPProtocolError, match="unexpected"):
        t.apply(kind, 0, r(code))


def test_only_354_lets_the_body_go() -> None:
    t = txn()
    t.apply(MAIL, 0, r(250))
    t.apply(RCPT, 0, r(250))
    with pytest.raises(SMTPProtocolError, match="in reply to DATA"):
        t.apply(DATA, 0, r(250))  # R47: a 250 here would claim a delivery


@pytest.mark.parametrize("kind", [MAIL, RCPT, DATA, DOT, BDAT, RSET])
def test_421_anywhere_means_closing(kind: Expect) -> None:
    t = txn()
    if kind != MAIL:
        t.apply(MAIL, 0, r(250))
    if kind in (DATA, DOT, BDAT):
        t.apply(RCPT, 0, r(250))
    assert t.apply(kind, 0, r(421, "4.3.2 bye")) == Decision.CLOSING
    assert t.done
    assert outcomes(t.result) == [("b@example.com", Outcome.TRANSIENT, 421)]
    if kind in (MAIL, RCPT, RSET):
        assert t.result is not None and t.result.error == CLOSING_421


def test_354_with_no_recipient_accepted_gets_just_the_dot_and_is_permanent() -> None:
    t = txn("b@example.com", "c@example.com")
    t.apply(MAIL, 0, r(250))
    t.apply(RCPT, 0, r(550))
    t.apply(RCPT, 1, r(452, "4.5.3 too many"))
    assert t.apply(DATA, 0, r(354)) == Decision.BODY
    assert not t.has_takers  # R29: the content is the bare terminator
    t.final_written = True
    assert t.apply(DOT, 0, r(554, "5.5.1 no valid recipients")) == Decision.FINISHED
    assert outcomes(t.result) == [
        ("b@example.com", Outcome.PERMANENT, 550),
        ("c@example.com", Outcome.TRANSIENT, 452),
    ]


def test_no_takers_without_data_keeps_each_refusal() -> None:
    t = txn()
    t.apply(MAIL, 0, r(250))
    t.apply(RCPT, 0, r(450, "4.2.0 busy"))
    t.no_takers()
    assert outcomes(t.result) == [("b@example.com", Outcome.TRANSIENT, 450)]


def test_a_reply_before_the_content_was_written_is_an_early_refusal() -> None:
    t = txn()
    t.apply(MAIL, 0, r(250))
    t.apply(RCPT, 0, r(250))
    t.apply(DATA, 0, r(354))
    assert t.apply(DOT, 0, r(552, "5.3.4 too big")) == Decision.FINISHED
    assert t.result is not None and t.result.error == "server replied before the end of data"
    assert outcomes(t.result) == [("b@example.com", Outcome.PERMANENT, 552)]


def test_a_final_reply_to_a_finished_transaction_is_only_answered() -> None:
    t = txn()
    t.apply(MAIL, 0, r(550))
    t.final_written = True
    assert t.apply(DOT, 0, r(503)) == Decision.ANSWERED


def test_bdat_accepted_leaves_the_session_clean_refused_does_not() -> None:
    ok, refused = txn(), txn()
    for t in (ok, refused):
        t.apply(MAIL, 0, r(250))
        t.apply(RCPT, 0, r(250))
        t.final_written = True
    assert ok.apply(BDAT, 0, r(250)) == Decision.DELIVERED and ok.clean
    assert refused.apply(BDAT, 0, r(554)) == Decision.FINISHED and not refused.clean


def test_a_refused_rset_stops_and_becomes_the_next_mails_reason() -> None:
    t = txn()
    assert t.apply(RSET, 0, r(500, "what?")) == Decision.RSET_REFUSED
    assert t.apply(MAIL, 0, r(503, "nested MAIL")) == Decision.FINISHED
    assert t.result is not None and t.result.error is not None
    assert t.result.error.startswith("RSET refused")
    assert outcomes(t.result) == [("b@example.com", Outcome.TRANSIENT, 500)]


def test_a_loss_is_classified_by_how_far_the_transaction_got() -> None:
    never = txn()
    never.started = False
    never.lost("gone", closing=False)
    assert never.result is not None and "never started" in (never.result.error or "")
    assert never.result.outcome is Outcome.TRANSIENT

    before_dot = txn()
    before_dot.lost("gone", closing=False)
    assert before_dot.result is not None and before_dot.result.outcome is Outcome.TRANSIENT

    after_dot = txn()
    after_dot.final_written = True
    after_dot.lost("gone", closing=False)  # R37: it may have been delivered
    assert after_dot.result is not None and after_dot.result.outcome is Outcome.UNKNOWN

    maybe = txn()
    maybe.final_maybe = True
    maybe.lost("gone", closing=False)
    assert maybe.result is not None and maybe.result.outcome is Outcome.UNKNOWN

    closing = txn()
    closing.final_written = True
    closing.lost("421", closing=True)  # the server acted on nothing after its 421
    assert closing.result is not None and closing.result.outcome is Outcome.TRANSIENT


def test_a_result_is_decided_once() -> None:
    t = txn()
    t.apply(MAIL, 0, r(550))
    first = t.result
    t.lost("later", closing=False)
    assert t.result is first


# -- refused behind an end of data (issue 17) -------------------------------------------------

BAD_SEQUENCE = (503, "5.5.0 Bad sequence of commands - pipelined after end of DATA")


def behind_a_dot(*recipients: str) -> Transaction:
    """A transaction whose MAIL shared a write with the previous message's end of data."""
    t = txn(*recipients)
    t.after_dot = True
    return t


def test_503_to_mail_behind_an_end_of_data_is_not_started() -> None:
    """Haraka: 250 to the end of data, then 503 to every command behind it."""
    t = behind_a_dot("b@example.com", "c@example.com")
    assert t.apply(MAIL, 0, r(*BAD_SEQUENCE)) == Decision.AGAIN
    assert (t.again, t.started) == (True, False)
    # The rest of the attempt decides nothing: no recipient is refused, no result.
    assert t.apply(RCPT, 0, r(*BAD_SEQUENCE)) == Decision.NOTHING
    assert t.apply(RCPT, 1, r(*BAD_SEQUENCE)) == Decision.NOTHING
    assert t.apply(DATA, 0, r(*BAD_SEQUENCE)) == Decision.NOTHING
    assert (t.done, t.result, t.rcpt_replies) == (False, None, [None, None])
    # Lost before it is sent again: never started.
    t.lost("gone", closing=False)
    assert t.result is not None and t.result.outcome is Outcome.TRANSIENT
    assert "never started" in (t.result.error or "")


def test_restart_forgets_the_refused_attempt() -> None:
    t = behind_a_dot()
    t.apply(MAIL, 0, r(*BAD_SEQUENCE))
    t.restart()
    assert (t.again, t.after_dot, t.started, t.done) == (False, False, False, False)
    t.started = True
    assert t.apply(MAIL, 0, r(250)) == Decision.NOTHING
    assert t.apply(RCPT, 0, r(250)) == Decision.NOTHING
    assert t.apply(DATA, 0, r(354)) == Decision.BODY
    t.final_written = True
    assert t.apply(DOT, 0, r(250)) == Decision.DELIVERED


@pytest.mark.parametrize(
    ("after_dot", "code", "decision"),
    [
        (False, 503, Decision.FINISHED),  # not behind an end of data: the server's answer
        (True, 550, Decision.FINISHED),  # a refused sender is refused wherever it stands
        (True, 421, Decision.CLOSING),  # closing, as everywhere (R40)
    ],
)
def test_other_refusals_of_mail_keep_their_meaning(
    after_dot: bool, code: int, decision: Decision
) -> None:
    t = txn()
    t.after_dot = after_dot
    assert t.apply(MAIL, 0, r(code)) == decision
    assert t.result is not None and not t.again


def test_a_taken_rset_shows_the_server_accepts_commands_behind_a_dot() -> None:
    """BDAT windows put RSET first behind the previous end of data; a 250 to it means
    the MAIL after it was read normally, so its 503 is its own answer."""
    t = behind_a_dot()
    assert t.apply(RSET, 0, r(250)) == Decision.NOTHING
    assert t.apply(MAIL, 0, r(503)) == Decision.FINISHED
    assert t.result is not None and t.result.outcome is Outcome.PERMANENT


def test_503_to_the_rset_behind_a_dot_is_not_started_either() -> None:
    t = behind_a_dot()
    assert t.apply(RSET, 0, r(*BAD_SEQUENCE)) == Decision.AGAIN
    assert t.apply(MAIL, 0, r(*BAD_SEQUENCE)) == Decision.NOTHING
    assert t.apply(RCPT, 0, r(*BAD_SEQUENCE)) == Decision.NOTHING
    # The reply owed for the chunk: answered, and it decides nothing.
    assert t.apply(BDAT, 0, r(*BAD_SEQUENCE)) == Decision.ANSWERED
    assert (t.done, t.rset_failed) == (False, None)


def test_503_after_a_refused_command_never_decides_a_recipient() -> None:
    """A 503 that answers a command behind a refused one is the server complaining
    about the sequence: the recipients keep no such reply (R41)."""
    t = txn("b@example.com")
    assert t.apply(MAIL, 0, r(550, "5.7.1 sender refused")) == Decision.FINISHED
    assert t.apply(RCPT, 0, r(503, "5.5.1 need MAIL")) == Decision.NOTHING
    t.apply(DATA, 0, r(503, "5.5.1 need RCPT"))
    assert outcomes(t.result) == [("b@example.com", Outcome.PERMANENT, 550)]
