"""The planner's per-row decisions, by plain calls (no journal file, no template file)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from triomail._bulk.journal import Record, State
from triomail._bulk.planner import AtMostOnce, ChunkPlan, Policy, chunks, plan_chunk
from triomail._bulk.recipients import BadRow, Row
from triomail._bulk.template.rendered import Rendered, RowError

RUN = 3


def mid(key: str) -> str:
    return f"<{key}.campaign@example.com>"


def render(fields: Mapping[str, Any], *, message_id: str) -> Rendered:
    """A stand-in for CompiledTemplate.render: refuses a row without an address."""
    if "@" not in fields["email"]:
        raise RowError(f"not an address: {fields['email']}")
    return Rendered(b"x\r\n", "me@example.com", (fields["email"],), message_id, False)


def row(line: int, key: str | None = None, email: str | None = None) -> Row:
    key = key or f"k{line}"
    return Row(line, {"email": email or f"{key}@example.com"}, key)


def record(r: Row, state: State, *, run: int = RUN - 1, message_id: str | None = None) -> Record:
    return Record(r.key, r.line, "content", message_id or mid(r.key), state, 1, (), run)


def policy(known: Mapping[str, Record] | None = None, *, at_most_once: bool = False) -> Policy:
    journal = dict(known or {})

    def lookup(keys: list[str]) -> Mapping[str, Record]:
        return {k: journal[k] for k in keys if k in journal}

    return Policy(run=RUN, at_most_once=at_most_once, message_id=mid, render=render, lookup=lookup)


def sent(plan: ChunkPlan) -> list[int]:
    return [r.line for r, _, _ in plan.send]


def test_new_rows_are_rendered_with_the_default_message_id() -> None:
    plan = plan_chunk(policy(), [row(2), row(3)])
    assert sent(plan) == [2, 3]
    assert [m.message_id for _, m, _ in plan.send] == [mid("k2"), mid("k3")]
    assert [rec for _, _, rec in plan.send] == [None, None]
    assert plan.notes == [] and plan.earlier == 0


def test_bad_rows_and_refusals_are_notes_in_file_order() -> None:
    chunk = [row(2), BadRow(3, "expected 3 fields"), row(4, email="nobody"), row(5)]
    plan = plan_chunk(policy(), chunk)
    assert sent(plan) == [2, 5]
    assert plan.notes == [BadRow(3, "expected 3 fields"), BadRow(4, "not an address: nobody")]


def test_a_duplicate_in_the_chunk_names_the_first_line() -> None:
    plan = plan_chunk(policy(), [row(2, "same"), row(3, "same")])
    assert sent(plan) == [2]
    assert plan.notes == [BadRow(3, "duplicate of line 2 (same content), not sent")]


def test_a_row_claimed_earlier_in_this_run_is_a_duplicate() -> None:
    first = row(2, "same")
    known = {"same": record(first, "in-flight", run=RUN)}
    plan = plan_chunk(policy(known), [row(300, "same")])
    assert sent(plan) == []
    assert plan.notes == [BadRow(300, "duplicate of line 2 (same content), not sent")]


@pytest.mark.parametrize(("state", "refused"), [("accepted", 0), ("permanent", 1)])
def test_rows_settled_earlier_are_not_sent_again(state: State, refused: int) -> None:
    r = row(2)
    plan = plan_chunk(policy({r.key: record(r, state)}), [r, row(3)])
    assert sent(plan) == [3]
    assert (plan.earlier, plan.earlier_refused) == (1, refused)
    assert plan.notes == []


@pytest.mark.parametrize("state", ["pending", "transient", "in-flight", "unknown"])
def test_rows_not_settled_are_resent_with_their_message_id(state: State) -> None:
    r = row(2)
    known = record(r, state, message_id="<older@example.com>")
    plan = plan_chunk(policy({r.key: known}), [r])
    ((_, message, rec),) = plan.send
    assert message.message_id == "<older@example.com>"
    assert rec is known


@pytest.mark.parametrize("state", ["in-flight", "unknown"])
def test_at_most_once_skips_rows_whose_outcome_is_unknown(state: State) -> None:
    r, other = row(2), row(3)
    known = {r.key: record(r, state), other.key: record(other, "transient")}
    plan = plan_chunk(policy(known, at_most_once=True), [r, other])
    assert sent(plan) == [3]
    assert plan.notes == [AtMostOnce(r, known[r.key])]


def test_the_budget_stops_the_chunk() -> None:
    chunk = [row(2), BadRow(3, "bad"), row(4), row(5), BadRow(6, "bad too")]
    plan = plan_chunk(policy(), chunk, budget=2)
    assert sent(plan) == [2, 4]
    # Rows after the budget are not looked at (the caller stops reading).
    assert plan.notes == [BadRow(3, "bad")]


def test_a_rendered_row_from_the_render_process_is_used_as_it_is() -> None:
    r = row(2)
    made = Rendered(b"made\r\n", "me@example.com", ("a@example.com",), mid(r.key), False, False)
    plan = plan_chunk(policy(), [r], made=[made])
    assert plan.send == [(r, made, None)]


def test_a_refusal_from_the_render_process_is_a_bad_row() -> None:
    plan = plan_chunk(policy(), [row(2), BadRow(3, "short")], made=["no To:", None])
    assert plan.notes == [BadRow(2, "no To:"), BadRow(3, "short")]


def test_a_journal_message_id_wins_over_the_render_process() -> None:
    r = row(2)
    made = Rendered(b"made\r\n", "me@example.com", ("a@example.com",), mid(r.key), False)
    known = record(r, "unknown", message_id="<older@example.com>")
    plan = plan_chunk(policy({r.key: known}), [r], made=[made])
    ((_, message, _),) = plan.send
    assert message is not made and message.message_id == "<older@example.com>"


def test_the_journal_is_asked_once_per_chunk_for_the_good_rows() -> None:
    asked: list[list[str]] = []

    def lookup(keys: list[str]) -> Mapping[str, Record]:
        asked.append(keys)
        return {}

    p = Policy(run=RUN, at_most_once=False, message_id=mid, render=render, lookup=lookup)
    plan_chunk(p, [row(2), BadRow(3, "bad"), row(4)])
    assert asked == [["k2", "k4"]]


def test_chunks() -> None:
    rows = [row(i) for i in range(2, 9)]
    assert [[r.line for r in c] for c in chunks(rows, 3)] == [[2, 3, 4], [5, 6, 7], [8]]
    assert list(chunks([], 3)) == []
