"""The sans-IO reply parser, byte for byte (R21, R22, R23, R31; R6/R24 via ``unprocessed``)."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triomail._core.errors import SMTPProtocolError
from triomail._core.parser import MAX_LINE_LENGTH, MAX_REPLY_LENGTH, MAX_REPLY_LINES, ReplyParser
from triomail._core.reply import Reply


def parse_all(data: bytes) -> list[Reply]:
    """Feed ``data`` in one go and collect every complete reply."""
    parser = ReplyParser()
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


def parse_bytewise(data: bytes) -> tuple[list[Reply], bytes]:
    """Feed ``data`` one byte at a time, asking for replies after each byte."""
    parser = ReplyParser()
    replies = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    return replies, parser.unprocessed


def one(data: bytes) -> Reply:
    replies = parse_all(data)
    assert len(replies) == 1, replies
    return replies[0]


# ------------------------------------------------------------------------ R21 grammar


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"2a0 ok\r\n", id="letter-in-code"),
        pytest.param(b"250ok\r\n", id="no-separator"),
        pytest.param(b"099 x\r\n", id="first-digit-0"),
        pytest.param(b"199 x\r\n", id="first-digit-1"),
        pytest.param(b"650 x\r\n", id="first-digit-6"),
        pytest.param(b"250-a\r\n550 b\r\n", id="code-changes-in-multiline"),
        pytest.param(b"250-a\r\n251 b\r\n", id="code-changes-last-digit"),
        pytest.param(b"\r\n", id="empty-line"),
        pytest.param(b"25\r\n", id="two-digits"),
        pytest.param(b" 250 ok\r\n", id="leading-space"),
        pytest.param(b"250\tok\r\n", id="tab-separator"),
        pytest.param(b"250_ok\r\n", id="underscore-separator"),
        pytest.param(b"\xff\xfe\xfd x\r\n", id="8bit-code"),
        pytest.param(b"250-a\nb\r\n", id="bare-lf-inside-line"),
        pytest.param(b"250 a\rb\r\n", id="bare-cr-inside-line"),
        pytest.param(b"250 ok\r\r\n", id="cr-cr-lf"),
        pytest.param(b"250 ok\n250 ok\r\n", id="lf-terminated-line"),
    ],
)
def test_r21_malformed_reply_is_protocol_error(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(SMTPProtocolError):
        parser.next_reply()


@pytest.mark.parametrize(
    "data",
    [b"2a0 ok\r\n", b"250ok\r\n", b"099 x\r\n", b"650 x\r\n", b"250-a\r\n550 b\r\n", b"\r\n"],
)
def test_r21_malformed_reply_fails_byte_at_a_time_too(data: bytes) -> None:
    with pytest.raises(SMTPProtocolError):
        parse_bytewise(data)


def test_r21_bare_code_without_text_is_accepted() -> None:
    reply = one(b"250\r\n")
    assert reply.code == 250
    assert reply.lines == ("",)
    assert reply.text == ""
    assert reply.enhanced is None


def test_r21_bare_code_ends_a_multiline_reply() -> None:
    reply = one(b"250-mx.example\r\n250-PIPELINING\r\n250\r\n")
    assert reply.code == 250
    assert reply.lines == ("mx.example", "PIPELINING", "")


@pytest.mark.parametrize("code", [200, 220, 250, 354, 421, 450, 500, 554, 599])
def test_r21_every_valid_class_parses(code: int) -> None:
    reply = one(f"{code} text\r\n".encode())
    assert reply.code == code
    assert reply.lines == ("text",)


def test_r21_multiline_reply() -> None:
    reply = one(b"250-mx.example.org Hello\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250 HELP\r\n")
    assert reply.code == 250
    assert reply.lines == ("mx.example.org Hello", "SIZE 1000", "PIPELINING", "HELP")
    assert reply.text == "mx.example.org Hello\nSIZE 1000\nPIPELINING\nHELP"


def test_r21_continuation_with_empty_text() -> None:
    reply = one(b"250-\r\n250 done\r\n")
    assert reply.lines == ("", "done")


def test_r21_text_keeps_inner_and_trailing_spaces() -> None:
    reply = one(b"250  two  spaces \r\n")
    assert reply.lines == (" two  spaces ",)


def test_r21_several_replies_in_one_buffer_come_out_in_order() -> None:
    replies = parse_all(b"250 a\r\n251 b\r\n354 go ahead\r\n")
    assert [(r.code, r.lines) for r in replies] == [
        (250, ("a",)),
        (251, ("b",)),
        (354, ("go ahead",)),
    ]


def test_r21_incomplete_line_waits_for_more_bytes() -> None:
    parser = ReplyParser()
    parser.feed(b"250 o")
    assert parser.next_reply() is None
    parser.feed(b"k\r")
    assert parser.next_reply() is None
    parser.feed(b"\n")
    reply = parser.next_reply()
    assert reply is not None
    assert (reply.code, reply.lines) == (250, ("ok",))
    assert parser.next_reply() is None


def test_r21_incomplete_multiline_reply_waits() -> None:
    parser = ReplyParser()
    parser.feed(b"250-a\r\n250-b\r\n")
    assert parser.next_reply() is None
    parser.feed(b"250 c\r\n")
    reply = parser.next_reply()
    assert reply is not None
    assert reply.lines == ("a", "b", "c")


TRANSCRIPTS = [
    b"220 mx.example ESMTP\r\n",
    b"250-mx.example\r\n250-SIZE 0\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
    b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n354 go\r\n250\r\n",
    b"250 caf\xc3\xa9 \xff\xfe\r\n421-4.7.0 slow\r\n421 4.7.0 down\r\n",
    b"250 a\r\n250 b",  # trailing incomplete reply
    b"250 a\r\n250-b\r\n250-",  # trailing incomplete multiline reply
    b"250 a\r\n\r",  # trailing CR
]


@pytest.mark.parametrize("data", TRANSCRIPTS)
def test_r21_one_byte_at_a_time_gives_the_same_replies(data: bytes) -> None:
    at_once = ReplyParser()
    at_once.feed(data)
    expected = []
    while (reply := at_once.next_reply()) is not None:
        expected.append(reply)
    replies, rest = parse_bytewise(data)
    assert replies == expected
    assert rest == at_once.unprocessed
    assert replies  # every transcript holds at least one complete reply


def test_r21_feed_accepts_bytearray_and_memoryview_slices() -> None:
    parser = ReplyParser()
    parser.feed(bytearray(b"250 o"))
    parser.feed(bytes(memoryview(b"k\r\n")))
    reply = parser.next_reply()
    assert reply is not None
    assert reply.lines == ("ok",)


# ------------------------------------------------------------------- unprocessed (R6, R24)


def test_r24_unprocessed_exposes_bytes_past_the_last_complete_reply() -> None:
    parser = ReplyParser()
    parser.feed(b"250 a\r\n250 b\r\n354 part")
    assert parser.next_reply() == Reply(250, ("a",))
    assert parser.unprocessed == b"250 b\r\n354 part"
    assert parser.has_unprocessed
    assert parser.next_reply() == Reply(250, ("b",))
    assert parser.unprocessed == b"354 part"
    assert parser.next_reply() is None
    assert parser.unprocessed == b"354 part"
    assert parser.has_unprocessed


def test_r24_unprocessed_is_empty_after_exactly_one_reply() -> None:
    parser = ReplyParser()
    parser.feed(b"250 ok\r\n")
    assert parser.next_reply() is not None
    assert parser.unprocessed == b""
    assert not parser.has_unprocessed


def test_r24_fresh_parser_has_nothing_unprocessed() -> None:
    parser = ReplyParser()
    assert parser.unprocessed == b""
    assert not parser.has_unprocessed
    assert parser.next_reply() is None


def test_r6_unprocessed_includes_lines_of_an_incomplete_reply() -> None:
    """The injected ``250-inj\\r\\n`` after a STARTTLS 220 must be visible, not swallowed."""
    parser = ReplyParser()
    parser.feed(b"220 Ready\r\n250-evil\r\n")
    assert parser.next_reply() == Reply(220, ("Ready",))
    assert parser.unprocessed == b"250-evil\r\n"
    # Asking again parses the line but must not hide it: it is still not a complete reply.
    assert parser.next_reply() is None
    assert parser.unprocessed == b"250-evil\r\n"
    assert parser.has_unprocessed
    parser.feed(b"250 AUTH LOGIN\r\nrest")
    assert parser.next_reply() == Reply(250, ("evil", "AUTH LOGIN"))
    assert parser.unprocessed == b"rest"


def test_r6_half_line_without_crlf_is_unprocessed() -> None:
    parser = ReplyParser()
    parser.feed(b"220 Ready\r\n250-inj")
    assert parser.next_reply() == Reply(220, ("Ready",))
    assert parser.unprocessed == b"250-inj"
    assert parser.has_unprocessed


# ------------------------------------------------------------------------ R22 limits


def _feed_until_error(parser: ReplyParser, chunk: bytes, total: int) -> int:
    """Feed ``chunk`` repeatedly (up to ``total`` bytes); return the bytes fed at the error."""
    fed = 0
    while fed < total:
        parser.feed(chunk)
        fed += len(chunk)
        try:
            while parser.next_reply() is not None:
                pass
        except SMTPProtocolError:
            return fed
    pytest.fail(f"no SMTPProtocolError after {fed} bytes")


def test_r22_one_megabyte_without_crlf_fails_early_with_bounded_memory() -> None:
    chunk = b"x" * 4096
    parser = ReplyParser()
    tracemalloc.start()
    try:
        fed = _feed_until_error(parser, chunk, 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fed <= MAX_LINE_LENGTH + len(chunk)
    assert peak < 4 * MAX_LINE_LENGTH, f"parser peaked at {peak} bytes"


def test_r22_one_megabyte_line_with_valid_prefix_fails_early() -> None:
    parser = ReplyParser()
    parser.feed(b"250 ")
    assert parser.next_reply() is None
    fed = _feed_until_error(parser, b"y" * 1000, 1024 * 1024)
    assert fed <= MAX_LINE_LENGTH + 1000


def test_r22_one_megabyte_in_one_feed_fails_at_once() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (1024 * 1024))
    with pytest.raises(SMTPProtocolError, match="line longer"):
        parser.next_reply()


def test_r22_hundred_thousand_continuation_lines_fail_with_bounded_memory() -> None:
    lines = b"250-x\r\n" * 100
    parser = ReplyParser()
    tracemalloc.start()
    try:
        fed = _feed_until_error(parser, lines, 100_000 * 7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fed <= (MAX_REPLY_LINES + 1) * 7 + len(lines)
    assert peak < 256 * 1024, f"parser peaked at {peak} bytes"


def test_r22_hundred_thousand_continuation_lines_in_one_feed_fail() -> None:
    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * 100_000)
    with pytest.raises(SMTPProtocolError, match="lines"):
        parser.next_reply()


def test_r22_line_count_limit_boundary() -> None:
    ok = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n"
    assert len(one(ok).lines) == MAX_REPLY_LINES
    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n")
    with pytest.raises(SMTPProtocolError):
        parser.next_reply()


def _line(length: int, *, last: bool = True) -> bytes:
    """A reply line of exactly ``length`` octets before its CRLF."""
    head = b"250 " if last else b"250-"
    return head + b"a" * (length - 4) + b"\r\n"


def test_r22_line_length_limit_boundary_at_once() -> None:
    assert one(_line(MAX_LINE_LENGTH)).code == 250
    parser = ReplyParser()
    parser.feed(_line(MAX_LINE_LENGTH + 1))
    with pytest.raises(SMTPProtocolError, match="line longer"):
        parser.next_reply()


def test_r22_line_length_limit_boundary_byte_at_a_time() -> None:
    """A maximal line must not fail just because its CR and LF arrive separately."""
    replies, rest = parse_bytewise(_line(MAX_LINE_LENGTH))
    assert [r.code for r in replies] == [250]
    assert rest == b""
    with pytest.raises(SMTPProtocolError):
        parse_bytewise(_line(MAX_LINE_LENGTH + 1))


def test_r22_reply_length_limit() -> None:
    line = _line(8000, last=False)
    count = MAX_REPLY_LENGTH // len(line) + 1
    parser = ReplyParser()
    parser.feed(line * count + _line(10))
    with pytest.raises(SMTPProtocolError, match="reply longer"):
        parser.next_reply()
    # Just under the limit is fine.
    fits = MAX_REPLY_LENGTH // len(line) - 1
    assert len(one(line * fits + _line(10)).lines) == fits + 1


def test_r22_reply_length_limit_counts_per_reply_not_per_connection() -> None:
    """Many small replies in a row are fine: the limit is for one reply."""
    many = b"250 ok\r\n" * (2 * MAX_REPLY_LENGTH // 8)
    assert len(parse_all(many)) == 2 * MAX_REPLY_LENGTH // 8


def test_r22_reply_length_limit_fails_before_the_crlf() -> None:
    parser = ReplyParser()
    parser.feed(_line(8000, last=False) * 4)
    assert parser.next_reply() is None
    parser.feed(b"250-" + b"b" * 2000)  # no CRLF yet; the reply is already over 32 KiB
    with pytest.raises(SMTPProtocolError, match="reply longer"):
        parser.next_reply()


# ------------------------------------------------------------------- R23 decoding


def test_r23_8bit_reply_text_decodes_without_crashing() -> None:
    reply = one(b"250 caf\xe9 \xff\xfe ok\r\n")
    assert reply.code == 250
    assert reply.lines == ("caf\ufffd \ufffd\ufffd ok",)
    assert str(reply) == "250 caf\ufffd \ufffd\ufffd ok"


def test_r23_utf8_reply_text_decodes_as_utf8() -> None:
    reply = one("250 héllo wörld 例子\r\n".encode())
    assert reply.lines == ("héllo wörld 例子",)


# ------------------------------------------------------------- R31 enhanced status codes


@pytest.mark.parametrize(
    ("data", "enhanced", "text"),
    [
        (b"550 5.1.1 x\r\n", (5, 1, 1), "x"),
        (b"550 5.1.1 User unknown\r\n", (5, 1, 1), "User unknown"),
        (b"452 4.5.3 Too many recipients\r\n", (4, 5, 3), "Too many recipients"),
        (b"421 4.7.0 Try again later\r\n", (4, 7, 0), "Try again later"),
        (b"250 2.0.0 Ok: queued as 1234\r\n", (2, 0, 0), "Ok: queued as 1234"),
        (b"550 5.123.456 big\r\n", (5, 123, 456), "big"),
        (b"550 5.1.1\r\n", (5, 1, 1), ""),
    ],
)
def test_r31_enhanced_code_parsed_and_stripped_from_text(
    data: bytes, enhanced: tuple[int, int, int], text: str
) -> None:
    reply = one(data)
    assert reply.enhanced == enhanced
    assert reply.enhanced_code == "{}.{}.{}".format(*enhanced)
    assert reply.text == text


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"250 5.1.1 x\r\n", id="class-mismatch-2xx"),
        pytest.param(b"550 4.1.1 x\r\n", id="class-mismatch-5xx"),
        pytest.param(b"354 3.0.0 go\r\n", id="class-3"),
        pytest.param(b"550 5.1.1x\r\n", id="no-space-after"),
        pytest.param(b"550 5.1234.1 x\r\n", id="subject-4-digits"),
        pytest.param(b"550 5.1.1234 x\r\n", id="detail-4-digits"),
        pytest.param(b"550 5.1 x\r\n", id="two-parts"),
        pytest.param(b"550 x 5.1.1\r\n", id="not-first"),
        pytest.param(b"220 mx.example ESMTP\r\n", id="greeting"),
        pytest.param("550 5.\u0661.1 x\r\n".encode(), id="arabic-indic-digit"),
        pytest.param("550 \uff15.1.1 x\r\n".encode(), id="fullwidth-digit"),
    ],
)
def test_r31_no_enhanced_code(data: bytes) -> None:
    reply = one(data)
    assert reply.enhanced is None
    assert reply.enhanced_code is None
    assert reply.text == data[4:-2].decode()


def test_r31_class_mismatch_keeps_basic_code_deciding() -> None:
    reply = one(b"250 5.1.1 x\r\n")
    assert reply.is_positive
    assert not reply.is_permanent
    assert str(reply) == "250 5.1.1 x"


def test_r31_outcome_classes_follow_basic_code() -> None:
    assert one(b"550 5.1.1 x\r\n").is_permanent
    assert one(b"452 4.5.3 x\r\n").is_transient
    assert one(b"421 4.7.0 x\r\n").is_transient
    assert one(b"250 2.0.0 x\r\n").is_positive
    assert one(b"354 go\r\n").is_positive


def test_r31_multiline_enhanced_code_stripped_from_every_line() -> None:
    reply = one(b"550-5.1.1 first\r\n550 5.1.1 second\r\n")
    assert reply.enhanced == (5, 1, 1)
    assert reply.text == "first\nsecond"
    assert str(reply) == "550 5.1.1 first / second"


def test_r31_leading_zeros_stripped_with_the_code_they_spell() -> None:
    reply = one(b"550 5.01.001 x\r\n")
    assert reply.enhanced == (5, 1, 1)
    assert reply.text == "x"


def test_r31_str_of_reply() -> None:
    assert str(one(b"550 5.1.1 User unknown\r\n")) == "550 5.1.1 User unknown"
    assert str(one(b"220 hi\r\n")) == "220 hi"


# ----------------------------------------------------------------- Hypothesis properties

_codes = st.integers(2, 5).flatmap(lambda c: st.integers(c * 100, c * 100 + 99))
_texts = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40
)
_replies = st.tuples(_codes, st.lists(_texts, min_size=1, max_size=6))


def _serialise(code: int, lines: list[str], *, bare_last: bool) -> bytes:
    out = b""
    for i, text in enumerate(lines):
        last = i == len(lines) - 1
        if last and bare_last and text == "":
            out += b"%d\r\n" % code
        else:
            out += f"{code}{' ' if last else '-'}{text}\r\n".encode()
    return out


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(replies=st.lists(_replies, max_size=8), bare=st.booleans(), data=st.data())
def test_r21_property_chunked_well_formed_replies_round_trip(
    replies: list[tuple[int, list[str]]], bare: bool, data: st.DataObject
) -> None:
    wire = b"".join(_serialise(c, lines, bare_last=bare) for c, lines in replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts"))
    parser = ReplyParser()
    got = []
    previous = 0
    for cut in [*cuts, len(wire)]:
        parser.feed(wire[previous:cut])
        previous = cut
        while (reply := parser.next_reply()) is not None:
            got.append(reply)
    assert [(r.code, r.lines) for r in got] == [(c, tuple(lines)) for c, lines in replies]
    assert parser.unprocessed == b""
    assert not parser.has_unprocessed


_vocabulary = st.sampled_from(
    [b"250", b"550", b"2", b"-", b" ", b"\r\n", b"\r", b"\n", b"5.1.1 ", b"x", b"\xff", b"\x00"]
)
_noise = st.lists(st.one_of(_vocabulary, st.binary(max_size=6)), max_size=40).map(b"".join)


@settings(max_examples=500)
@given(blob=st.one_of(st.binary(max_size=200), _noise), data=st.data())
def test_r21_property_arbitrary_bytes_give_replies_or_protocol_error(
    blob: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=10), label="cuts"))
    parser = ReplyParser()
    previous = 0
    try:
        for cut in [*cuts, len(blob)]:
            parser.feed(blob[previous:cut])
            previous = cut
            while (reply := parser.next_reply()) is not None:
                assert isinstance(reply, Reply)
                assert 200 <= reply.code <= 599
                assert all("\r" not in line and "\n" not in line for line in reply.lines)
    except SMTPProtocolError:
        pass
