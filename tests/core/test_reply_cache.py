"""The parser's table of single-line replies changes nothing but the speed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import triomail._core.parser as reply_module
from triomail import SMTPProtocolError
from triomail._core.parser import ReplyParser
from triomail._core.reply import Reply

LINES = [
    b"250 2.1.0 Ok",
    b"250 ok",
    b"250",
    b"354 End data with <CR><LF>.<CR><LF>",
    b"452 4.5.3 Too many recipients",
    b"250-first",
    b"250 last",
    b"550 5.1.1 caf\xc3\xa9 \xff",
    b"421 4.3.2 closing",
    b"251 2.1.5 forwarding",
]


def parse_all(data: bytes, cuts: list[int]) -> list[Reply | str]:
    parser = ReplyParser()
    out: list[Reply | str] = []
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    try:
        for piece in pieces:
            parser.feed(piece)
            while (reply := parser.next_reply()) is not None:
                out.append(reply)
    except SMTPProtocolError as exc:
        out.append(f"error: {exc}")
    return out


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(LINES), min_size=1, max_size=12),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_cached_and_fresh_parses_agree(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\r\n" for line in lines)
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    reply_module._CACHE.clear()
    fresh = parse_all(data, cuts)
    warm = parse_all(data, cuts)  # now every single-line reply is in the table
    assert warm == fresh
    assert parse_all(data, []) == fresh


def test_table_is_bounded_and_unique_texts_do_not_break_it() -> None:
    parser = ReplyParser()
    for i in range(3 * reply_module._CACHE_SIZE):
        parser.feed(b"250 2.0.0 Ok: queued as %08X\r\n250 2.1.5 Ok\r\n" % i)
        first, second = parser.next_reply(), parser.next_reply()
        assert first is not None and first.text == f"Ok: queued as {i:08X}"
        assert second == Reply(250, ("2.1.5 Ok",), (2, 1, 5))
        assert len(reply_module._CACHE) <= reply_module._CACHE_SIZE
    long = b"250 " + b"x" * 200
    parser.feed(long + b"\r\n")
    assert parser.next_reply() == Reply(250, ("x" * 200,))
    assert long not in reply_module._CACHE


def test_a_cached_line_inside_a_multiline_reply_is_not_taken_alone() -> None:
    parser = ReplyParser()
    parser.feed(b"250 ok\r\n")
    assert parser.next_reply() == Reply(250, ("ok",))
    parser.feed(b"250-a\r\n250 ok\r\n")
    assert parser.next_reply() == Reply(250, ("a", "ok"))
    parser.feed(b"251-a\r\n250 ok\r\n")
    try:
        parser.next_reply()
    except SMTPProtocolError as exc:
        assert "changed" in str(exc)
    else:
        raise AssertionError("a code change within a reply must be refused")
