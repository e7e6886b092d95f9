"""The fast constructors of the per-message frozen values build real, frozen instances."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

import pytest

import triomail
from triomail import Outcome, PreparedMessage, RecipientResult, SendResult
from triomail._core.data import Canonical, canonicalize, new_canonical
from triomail._core.frozen import fast_constructor
from triomail._core.prepare import _new_prepared
from triomail._core.reply import Reply
from triomail._core.results import new_recipient_result, new_send_result, transaction_result

OK = Reply.from_lines(250, ("2.0.0 queued",))
REFUSED = Reply.from_lines(550, ("5.1.1 no such user",))


def _cases() -> list[tuple[type[Any], type[Any], tuple[Any, ...], dict[str, Any]]]:
    canonical = canonicalize(b"Subject: x\r\n\r\nbody\r\n")
    rr = RecipientResult("a@example.com", Outcome.ACCEPTED, OK)
    return [
        (Canonical, new_canonical, (b"x\r\n", False), {}),
        (RecipientResult, new_recipient_result, ("a@example.com", Outcome.PERMANENT, None), {}),
        (SendResult, new_send_result, ("s@example.com", (rr,)), {}),
        (
            SendResult,
            new_send_result,
            ("s@example.com", (rr,), OK, "<id@x>", "err"),
            {"tag": ("row", 1), "attempts": 3, "mail_accepted": True, "earlier_unknown": True},
        ),
        (
            PreparedMessage,
            _new_prepared,
            ("s@example.com", ("a@example.com",), canonical, False, "<id@x>"),
            {"tag": "row 7"},
        ),
    ]


@pytest.mark.parametrize(("cls", "fast", "args", "kwargs"), _cases())
def test_fast_constructor_builds_the_frozen_class(
    cls: type[Any], fast: type[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    built = fast(*args, **kwargs)
    plain = cls(*args, **kwargs)
    assert type(built) is cls
    assert built == plain
    assert repr(built) == repr(plain)
    assert hash(built) == hash(plain)
    for f in dataclasses.fields(cls):
        assert getattr(built, f.name) == getattr(plain, f.name)
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, first, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(built, first)
    assert copy.copy(built) == plain
    assert pickle.loads(pickle.dumps(built)) == plain
    assert dataclasses.replace(built) == plain


def test_fast_constructor_checks_arguments_like_the_class() -> None:
    with pytest.raises(TypeError):
        new_send_result("s@example.com")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        new_canonical(b"x\r\n", False, extra=1)  # type: ignore[call-arg]


def test_fast_constructor_refuses_classes_it_cannot_twin() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("negative")

    @dataclasses.dataclass(frozen=True, slots=True)
    class Derived:
        a: int
        b: int = dataclasses.field(init=False, default=0)

    for cls in (NoSlots, Mutable, Checked, Derived, int):
        with pytest.raises(TypeError):
            fast_constructor(cls)


def test_transaction_result_keeps_each_refusal() -> None:
    """R41: a refused recipient keeps its own reply; the others share the final one."""
    prepared = triomail.prepare(
        b"Subject: x\r\n\r\nbody\r\n",
        sender="s@example.com",
        recipients=["a@example.com", "b@example.com", "c@example.com"],
        tag="t",
    )
    result = transaction_result(prepared, [OK, REFUSED, None], Outcome.ACCEPTED, OK, None, True)
    assert [(r.recipient, r.outcome, r.reply) for r in result.recipients] == [
        ("a@example.com", Outcome.ACCEPTED, OK),
        ("b@example.com", Outcome.PERMANENT, REFUSED),
        ("c@example.com", Outcome.ACCEPTED, OK),
    ]
    assert (result.tag, result.mail_accepted, result.attempts) == ("t", True, 1)
    assert result.message_id is None and result.reply is OK
