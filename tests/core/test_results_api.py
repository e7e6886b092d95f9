"""Result values a program can use without guesswork (issue 12, point 10)."""

from __future__ import annotations

import json

import pytest

import triomail
from triomail._core.results import new_recipient_result, new_send_result


def test_outcome_is_a_string_enum() -> None:
    assert str(triomail.Outcome.ACCEPTED) == "accepted"
    assert f"{triomail.Outcome.UNKNOWN}" == "unknown"
    assert json.dumps({"outcome": triomail.Outcome.PERMANENT}) == '{"outcome": "permanent"}'
    assert triomail.Outcome("transient") is triomail.Outcome.TRANSIENT


def test_send_error_carries_the_result() -> None:
    refused = triomail.Reply.from_lines(550, ("5.1.1 no such user",))
    result = new_send_result(
        "a@example.com",
        (
            new_recipient_result("b@example.com", triomail.Outcome.ACCEPTED, None),
            new_recipient_result("c@example.com", triomail.Outcome.PERMANENT, refused),
        ),
        None,
        None,
        None,
    )
    with pytest.raises(triomail.SMTPSendError) as info:
        result.raise_for_status()
    assert info.value.result is result
    assert info.value.result.by_outcome(triomail.Outcome.PERMANENT) == ["c@example.com"]
    assert isinstance(info.value, triomail.SMTPError)


def test_a_result_with_no_recipient_is_not_a_delivery() -> None:
    """Issue 12, point 1: "every recipient accepted" is true of an empty list; a result
    with no recipient (a message refused before sending) must not read as accepted."""
    result = new_send_result("a@example.com", (), None, None, "refused locally: no recipients")
    assert not result.ok
    assert result.outcome is triomail.Outcome.PERMANENT
    with pytest.raises(triomail.SMTPSendError):
        result.raise_for_status()
