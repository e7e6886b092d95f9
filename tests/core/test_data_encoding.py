"""Canonical DATA encoding, the SMTP smuggling defence, byte for byte (R16, R17, R18, R19).

The wire is ``dot_stuff(canonicalize(message))``: what the client writes after the 354.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triomail._core import data as _protocol
from triomail._core.data import MAX_DATA_LINE, Canonical, canonicalize, dot_stuff, unstuff
from triomail._core.errors import LocalProtocolError

# hannob/smtpsmug endings, plus \r\r\n (Postfix before the 3.9 prerelease fix).
SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\r\n",
]
NUL_ENDING = b"\r\n\x00.\r\n"
SMUGGLED = (
    b"MAIL FROM:<x>\r\nRCPT TO:<y>\r\nDATA\r\n"
    b"From: ceo@bank.example\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n"
)
BODY = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nfirst line"

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def normalise(data: bytes) -> bytes:
    """Reference normalisation: every CR, LF or CRLF becomes CRLF; a final CRLF is added."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def receive(wire: bytes) -> bytes:
    """Reference receiver (RFC 5321 §4.5.2): read lines up to '.', drop one leading dot."""
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"", "wire does not end in CRLF"
    out = []
    for i, line in enumerate(lines[:-1]):
        if line == b".":
            assert i == len(lines) - 2, "end of data before the end of the wire"
            return b"".join(out)
        out.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    pytest.fail("no end-of-data line")


def count_end_markers(wire: bytes) -> int:
    """Occurrences of CRLF.CRLF, overlapping ones included."""
    return len(re.findall(rb"(?=\r\n\.\r\n)", wire))


def assert_wire_is_safe(wire: bytes, message: bytes) -> None:
    """The three R16 wire properties, against the reference normalisation of ``message``."""
    # (1) CR and LF only as CRLF pairs.
    assert _BARE.search(wire) is None, wire
    # (2) exactly one end-of-data marker, as the last five bytes (or only ".\r\n" when the
    # message is empty: the CRLF ending the DATA command is the marker's first CRLF).
    expected = normalise(message)
    if expected:
        assert count_end_markers(wire) == 1, wire
        assert wire.endswith(b"\r\n.\r\n")
    else:
        assert wire == b".\r\n"
    # (3) a receiver recovers the normalised message.
    assert receive(wire) == expected
    assert unstuff(wire) == expected


def as_input(data: bytes, kind: str) -> str | bytes | bytearray | memoryview:
    if kind == "str":
        return data.decode("utf-8")
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    return data


KINDS = ["str", "bytes", "bytearray", "memoryview"]


# ------------------------------------------------------------------- R16 smuggling


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_r16_smuggling_ending_mid_body_is_neutralised(ending: bytes, kind: str) -> None:
    message = BODY + ending + SMUGGLED + b"trailer"
    canonical = canonicalize(as_input(message, kind))
    assert canonical.data == normalise(message)
    wire = dot_stuff(canonical)
    assert_wire_is_safe(wire, message)
    # The smuggled commands stay inside the message, before the only terminator.
    assert wire.index(b"MAIL FROM:<x>") < len(wire) - 5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS[:8], ids=repr)
def test_r16_dot_endings_give_exact_bytes(ending: bytes, kind: str) -> None:
    """Each <x>.<y> ending becomes CRLF, a stuffed "..", CRLF."""
    wire = dot_stuff(canonicalize(as_input(b"a" + ending + b"MAIL FROM:<x>\r\n", kind)))
    assert wire == b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n"


@pytest.mark.parametrize("kind", KINDS)
def test_r16_cr_cr_lf_becomes_two_line_endings(kind: str) -> None:
    wire = dot_stuff(canonicalize(as_input(b"a\r\r\nb", kind)))
    assert wire == b"a\r\n\r\nb\r\n.\r\n"


@pytest.mark.parametrize("kind", KINDS)
def test_r16_smuggling_at_the_very_end_of_the_message(kind: str) -> None:
    for ending in SMUGGLING_ENDINGS:
        message = BODY + ending
        wire = dot_stuff(canonicalize(as_input(message, kind)))
        assert_wire_is_safe(wire, message)


@pytest.mark.parametrize("kind", KINDS)
def test_r17_nul_smuggling_ending_is_refused(kind: str) -> None:
    message = BODY + NUL_ENDING + SMUGGLED
    with pytest.raises(LocalProtocolError, match="NUL"):
        canonicalize(as_input(message, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("message", [b"\x00", b"a\x00b", b"body\r\n\x00\r\n", b"x" * 50 + b"\x00"])
def test_r17_nul_anywhere_is_refused(message: bytes, kind: str) -> None:
    with pytest.raises(LocalProtocolError):
        canonicalize(as_input(message, kind))


def test_r16_local_protocol_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        canonicalize(b"a\x00")


# --------------------------------------------------------------- R16 dot-stuffing


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b".hidden\r\nline\r\n", b"..hidden\r\nline\r\n.\r\n"),
        (b".\r\nrest\r\n", b"..\r\nrest\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"..", b"...\r\n.\r\n"),
        (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
        (b"a\r\n.\r\n", b"a\r\n..\r\n.\r\n"),
        (b"a\n.\n", b"a\r\n..\r\n.\r\n"),
        (b"a.b\r\n", b"a.b\r\n.\r\n"),  # a dot inside a line is left alone
        (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    ],
)
def test_r16_dot_stuffing(message: bytes, wire: bytes) -> None:
    assert dot_stuff(canonicalize(message)) == wire
    assert_wire_is_safe(wire, message)


def test_r16_body_starting_with_dot_str_and_bytes() -> None:
    for message in (".start\nnext", b".start\nnext"):
        assert dot_stuff(canonicalize(message)) == b"..start\r\nnext\r\n.\r\n"


# ------------------------------------------------------------- R16 line endings


@pytest.mark.parametrize(
    ("message", "canonical"),
    [
        (b"abc", b"abc\r\n"),  # no trailing CRLF: one is added
        (b"abc\r\n", b"abc\r\n"),  # already there: not doubled
        (b"abc\n", b"abc\r\n"),
        (b"abc\r", b"abc\r\n"),
        (b"abc\r\n\r\n", b"abc\r\n\r\n"),
        (b"a\nb\rc\r\nd", b"a\r\nb\r\nc\r\nd\r\n"),
        (b"\n", b"\r\n"),
        (b"\r", b"\r\n"),
        (b"\n\r", b"\r\n\r\n"),  # LF CR is two line endings, never one CRLF
        (b"\r\n", b"\r\n"),
    ],
)
def test_r16_line_endings_become_crlf(message: bytes, canonical: bytes) -> None:
    for kind in KINDS:
        result = canonicalize(as_input(message, kind))
        assert result.data == canonical
        assert len(result) == len(canonical)


def test_r16_empty_message() -> None:
    """An empty message has no lines: nothing to terminate, so the wire is just '.'."""
    for message in (b"", ""):
        canonical = canonicalize(message)
        assert canonical == Canonical(b"", False)
        assert len(canonical) == 0
        assert dot_stuff(canonical) == b".\r\n"
        assert unstuff(b".\r\n") == b""


def test_r16_str_is_utf8_encoded() -> None:
    canonical = canonicalize("Subject: café\n\nnaïve 例子")
    assert canonical.data == "Subject: café\r\n\r\nnaïve 例子\r\n".encode()


def test_r16_unstuff_rejects_wire_without_marker() -> None:
    with pytest.raises(ValueError):
        unstuff(b"abc\r\n")


# ------------------------------------------------------------------- R18 8-bit


@pytest.mark.parametrize(
    ("message", "eight_bit"),
    [
        (b"plain ascii\r\n", False),
        (b"\x7f del is 7-bit\r\n", False),
        (b"caf\xc3\xa9\r\n", True),
        (b"\x80", True),
        (b"\xff\r\n", True),
        ("café", True),
        ("plain", False),
    ],
)
def test_r18_eight_bit_flag(message: str | bytes, eight_bit: bool) -> None:
    assert canonicalize(message).eight_bit is eight_bit


# ------------------------------------------------------------ R19 line length


def test_r19_line_limit_is_998_octets_plus_crlf() -> None:
    assert MAX_DATA_LINE == 998
    ok = canonicalize(b"x" * 998 + b"\r\nshort\r\n")
    assert ok.data.startswith(b"x" * 998 + b"\r\n")
    with pytest.raises(LocalProtocolError, match="longer than 998"):
        canonicalize(b"x" * 999 + b"\r\nshort\r\n")


@pytest.mark.parametrize("kind", KINDS)
def test_r19_5000_character_line_is_refused(kind: str) -> None:
    with pytest.raises(LocalProtocolError):
        canonicalize(as_input(b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n", kind))


def test_r19_last_line_without_crlf_counts_too() -> None:
    canonicalize(b"a\r\n" + b"x" * 998)
    with pytest.raises(LocalProtocolError):
        canonicalize(b"a\r\n" + b"x" * 999)


def test_r19_limit_counts_octets_not_characters() -> None:
    canonicalize("é" * 499)  # 998 octets
    with pytest.raises(LocalProtocolError):
        canonicalize("é" * 499 + "a")  # 999 octets, 500 characters


def test_r19_bare_cr_and_lf_split_lines_before_the_limit_applies() -> None:
    for sep in (b"\r", b"\n", b"\r\n"):
        canonicalize(b"x" * 998 + sep + b"x" * 998)


def test_r19_dot_stuffing_may_make_a_998_octet_line_999_on_the_wire() -> None:
    """RFC 5321 §4.5.2: the stuffed dot is not part of the message's line length."""
    wire = dot_stuff(canonicalize(b"." + b"x" * 997))
    assert wire == b".." + b"x" * 997 + b"\r\n.\r\n"


# ------------------------------------------------------------ Hypothesis properties

_pieces = st.one_of(
    st.binary(max_size=20),
    st.sampled_from(
        [
            b"\r",
            b"\n",
            b"\r\n",
            b".",
            b"\r\n.",
            b"\n.\n",
            b".\r\n",
            b"\r\n.\r\n",
            b"..",
            b"\xff",
            *SMUGGLING_ENDINGS,
        ]
    ),
)
# Without NUL, and short enough that no line can reach 999 octets.
_short_messages = st.lists(_pieces, max_size=40).map(lambda p: b"".join(p).replace(b"\x00", b""))


@settings(max_examples=500)
@given(_short_messages)
def test_r16_property_random_bytes_give_a_safe_wire(message: bytes) -> None:
    assert len(message) < MAX_DATA_LINE
    canonical = canonicalize(message)
    assert canonical.data == normalise(message)
    assert canonical.eight_bit is any(b >= 0x80 for b in message)
    assert_wire_is_safe(dot_stuff(canonical), message)


@settings(max_examples=300)
@given(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)
)
def test_r16_property_random_text_gives_a_safe_wire(message: str) -> None:
    raw = message.encode("utf-8")
    assert_wire_is_safe(dot_stuff(canonicalize(message)), raw)


_long_pieces = st.one_of(_pieces, st.integers(0, 1200).map(lambda n: b"y" * n), st.just(b"\x00"))


@settings(max_examples=300)
@given(st.lists(_long_pieces, max_size=12).map(b"".join))
def test_r16_r17_r19_property_any_bytes_are_safe_or_refused(message: bytes) -> None:
    expected = normalise(message)
    too_long = any(len(line) > MAX_DATA_LINE for line in expected.split(b"\r\n"))
    if b"\x00" in message or too_long:
        with pytest.raises(LocalProtocolError):
            canonicalize(message)
        return
    assert_wire_is_safe(dot_stuff(canonicalize(message)), message)


@settings(max_examples=300)
@given(_short_messages)
def test_r16_property_the_large_message_path_gives_the_same_result(message: bytes) -> None:
    """Over ``_SPLIT_LIMIT`` octets the line endings are counted instead of split."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_protocol, "_SPLIT_LIMIT", -1)
        counted = canonicalize(message)
    assert counted == canonicalize(message)
    assert counted.data == normalise(message)


@settings(max_examples=300)
@given(st.lists(_long_pieces, max_size=12).map(b"".join))
def test_r16_r17_r19_property_the_large_message_path_refuses_the_same(message: bytes) -> None:
    def outcome() -> Canonical | str:
        try:
            return canonicalize(message)
        except LocalProtocolError as exc:
            return str(exc)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_protocol, "_SPLIT_LIMIT", -1)
        counted = outcome()
    assert counted == outcome()


@pytest.mark.parametrize("size", [2_000, _protocol._SPLIT_LIMIT + 1_000])
def test_r16_both_paths_of_a_large_and_small_message(size: int) -> None:
    line = b"x" * 60 + b"\r\n"
    canonical = b"Subject: s\r\n\r\n" + line * (size // len(line))
    assert len(canonical) > _protocol._SPLIT_LIMIT or size < _protocol._SPLIT_LIMIT
    # Already canonical: the caller's bytes are used as they are, not copied.
    assert canonicalize(canonical).data is canonical
    bare = canonical.replace(b"\r\n", b"\n")[:-1] + b"\ry"
    assert canonicalize(bare).data == normalise(bare) == canonical[:-2] + b"\r\ny\r\n"


def test_r19_long_line_search_matches_a_split_at_every_boundary() -> None:
    """``_has_long_line`` jumps from window to window: check it against splitting."""
    checked = 0
    for before in (0, 1, 2, 500, 996, 997, 998, 999, 1000, 1001, 1997):
        for length in (0, 1, 997, 998, 999, 1000, 2500):
            for after in (0, 3, 998, 999):
                lines = [b"b" * before] if before else []
                lines += [b"x" * length, b"a" * after]
                data = b"\r\n".join(lines) + b"\r\n"
                expected = any(len(line) > MAX_DATA_LINE for line in data.split(b"\r\n"))
                assert _protocol._has_long_line(data) is expected, (before, length, after)
                checked += 1
    assert checked == 11 * 7 * 4
