"""Commands, paths, xtext and EHLO capabilities, byte for byte (R13, R14, R28, R30, R32, R33,
R35, R42)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triomail._core.capabilities import Capabilities
from triomail._core.commands import check_argument, encode_command, xtext
from triomail._core.errors import LocalProtocolError
from triomail._core.parser import ReplyParser
from triomail._core.paths import MAX_DOMAIN, MAX_LOCAL_PART, MAX_PATH, Path, format_path
from triomail._core.reply import Reply

# ------------------------------------------------------------------ R13 command encoder

FORBIDDEN = [chr(c) for c in range(0x20)] + ["\x7f"]
INJECTIONS = [
    "x\r\nRCPT TO:<evil@x>",
    "x\nRCPT TO:<evil@x>",
    "x\rRCPT TO:<evil@x>",
    "x\r\n.\r\nMAIL FROM:<evil@x>",
    "x\x00y",
    "x\x7f",
]

# Every command the client builds, with each argument position that takes caller data.
COMMANDS = [
    ("EHLO", ["client.example"]),
    ("HELO", ["client.example"]),
    ("MAIL", ["FROM:<a@example.com>", "SIZE=100", "BODY=8BITMIME", "ENVID=abc", "RET=HDRS"]),
    ("RCPT", ["TO:<b@example.com>", "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@example.com"]),
    ("AUTH", ["PLAIN", "AGJvYgBwdw=="]),
    ("VRFY", ["someone"]),
]


def _positions() -> list[tuple[str, list[str], int]]:
    return [(verb, args, i) for verb, args in COMMANDS for i in range(len(args))]


@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"0x{ord(c):02x}")
@pytest.mark.parametrize(("verb", "args", "index"), _positions())
def test_r13_every_control_character_in_every_argument_raises(
    verb: str, args: list[str], index: int, char: str
) -> None:
    for where in ("start", "middle", "end"):
        bad = list(args)
        arg = args[index]
        bad[index] = {"start": char + arg, "middle": arg[:2] + char + arg[2:], "end": arg + char}[
            where
        ]
        with pytest.raises(LocalProtocolError):
            encode_command(verb, *bad)


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize(("verb", "args", "index"), _positions())
def test_r13_injection_payloads_raise_before_any_output(
    verb: str, args: list[str], index: int, payload: str
) -> None:
    bad = list(args)
    bad[index] = args[index] + payload
    with pytest.raises(LocalProtocolError) as info:
        encode_command(verb, *bad)
    assert isinstance(info.value, ValueError)


def test_r13_local_protocol_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        encode_command("EHLO", "x\r\nRCPT TO:<evil@x>")


@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"0x{ord(c):02x}")
def test_r13_check_argument_refuses_str_and_bytes(char: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_argument(f"a{char}b", "test")
    with pytest.raises(LocalProtocolError):
        check_argument(f"a{char}b".encode(), "test")


@pytest.mark.parametrize("value", ["plain", " spaces ", "~!@#$%^&*()", "é例\u0080\u00a0", ""])
def test_r13_printable_and_non_ascii_arguments_pass(value: str) -> None:
    check_argument(value, "test")
    check_argument(value.encode(), "test")


def test_r13_encoded_command_bytes() -> None:
    assert encode_command("EHLO", "client.example") == b"EHLO client.example\r\n"
    assert encode_command("MAIL", "FROM:<a@b.example>", "SIZE=10", "BODY=8BITMIME") == (
        b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\n"
    )
    assert encode_command("RCPT", "TO:<b@c.example>") == b"RCPT TO:<b@c.example>\r\n"
    assert encode_command("DATA") == b"DATA\r\n"
    assert encode_command("QUIT") == b"QUIT\r\n"


def test_r13_utf8_arguments_are_utf8_encoded() -> None:
    """RFC 6531 §3.3: SMTPUTF8 paths go as UTF-8 octets."""
    assert encode_command("MAIL", "FROM:<用户@例子.测试>", "SMTPUTF8") == (
        "MAIL FROM:<用户@例子.测试> SMTPUTF8\r\n".encode()
    )


@given(st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_r13_property_output_is_one_line_or_an_error(args: list[str]) -> None:
    try:
        line = encode_command("MAIL", *args)
    except LocalProtocolError:
        assert any(re.search(r"[\x00-\x1f\x7f]", a) for a in args)
        return
    assert line.endswith(b"\r\n")
    body = line[:-2]
    assert not re.search(rb"[\x00-\x1f\x7f]", body)
    assert body == " ".join(["MAIL", *args]).encode()


# ------------------------------------------------------------------------ R14 paths


def domain_of_length(n: int) -> str:
    """A syntactically valid ASCII domain of exactly ``n`` octets (labels up to 63)."""
    labels = []
    remaining = n
    while remaining > 0:
        size = min(63, remaining)
        if remaining - size == 1:  # never leave room for just a dot
            size -= 1
        labels.append("a" * size)
        remaining -= size + 1
    domain = ".".join(labels)
    assert len(domain) == n, (n, len(domain))
    return domain


@pytest.mark.parametrize(
    ("address", "wire", "utf8"),
    [
        ("user@example.com", "<user@example.com>", False),
        ("<user@example.com>", "<user@example.com>", False),
        ("User.Name+tag@Example.COM", "<User.Name+tag@Example.COM>", False),
        ("!#$%&'*+/=?^_`{|}~-@x.example", "<!#$%&'*+/=?^_`{|}~-@x.example>", False),
        ("a.b.c@x.example", "<a.b.c@x.example>", False),
        ("a@x-y.example", "<a@x-y.example>", False),
        ("a@123.example", "<a@123.example>", False),
        ('"john doe"@example.com', '<"john doe"@example.com>', False),
        ('"a\\"b"@example.com', '<"a\\"b"@example.com>', False),
        ('"a@b"@example.com', '<"a@b"@example.com>', False),
        ('""@example.com', '<""@example.com>', False),
        ("a@[127.0.0.1]", "<a@[127.0.0.1]>", False),
        ("a@[IPv6:2001:db8::1]", "<a@[IPv6:2001:db8::1]>", False),
        ("a" * 64 + "@x.example", "<" + "a" * 64 + "@x.example>", False),
        # R32: ASCII local part and an IDN domain travel as A-labels, without SMTPUTF8.
        ("user@例子.测试", "<user@xn--fsqu00a.xn--0zwm56d>", False),
        ("user@bücher.example", "<user@xn--bcher-kva.example>", False),
        ("user@BÜCHER.example", "<user@xn--bcher-kva.example>", False),
        # R32: a UTF-8 local part needs SMTPUTF8; the domain stays as U-labels.
        ("用户@例子.测试", "<用户@例子.测试>", True),
        ("用户@example.com", "<用户@example.com>", True),
        ("josé@example.com", "<josé@example.com>", True),
        ("é" * 32 + "@x.example", "<" + "é" * 32 + "@x.example>", True),
        # The 63-octet label limit is on the A-label, not on the UTF-8 of the U-label.
        ("用户@" + "例" * 30 + ".测试", "<用户@" + "例" * 30 + ".测试>", True),
        ("用户@straße.example", "<用户@straße.example>", True),
        # IDNA 2008 (UTS #46, non-transitional): ß and final sigma are their own letters,
        # as the domain's owner registered them; IDNA 2003 mapped them to another domain.
        ("user@straße.example", "<user@xn--strae-oqa.example>", False),
        ("user@ςigma.example", "<user@xn--igma-fod.example>", False),
        ("user@ᏸᏸ.com", "<user@xn--gcea.com>", False),
    ],
)
def test_r14_valid_paths(address: str, wire: str, utf8: bool) -> None:
    path = format_path(address)
    assert path.wire == wire
    assert path.address == wire[1:-1]
    assert path.needs_smtputf8 is utf8
    assert encode_command("RCPT", f"TO:{path.wire}") == f"RCPT TO:{wire}\r\n".encode()


@pytest.mark.parametrize(
    "address",
    [
        "",
        "<>",
        "no-at-sign",
        "@example.com",
        "user@",
        "<user@example.com",
        "user@example.com>",
        "<<user@example.com>>",
        "a b@example.com",
        " a@example.com",
        "a@example.com ",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@b@example.com",
        "a(comment)@example.com",
        "a<b@example.com",
        '"unterminated@example.com',
        '"a"b"@example.com',
        '"a\\"@example.com',
        "a@-x.example",
        "a@x-.example",
        "a@x..example",
        "a@.example",
        "a@example.",
        "a@x_y.example",
        "a@exa mple.com",
        "a@example.com> SIZE=1",
        "a@example.com> NOTIFY=NEVER <x",
        "a@[1.2.3.4",
        "a@[1.2.[3].4]",
        "a@" + "b" * 64 + ".example",  # label over 63
        "a" * 65 + "@x.example",  # local part over 64
        "é" * 32 + "a@x.example",  # 65 octets of UTF-8
        # A UTF-8 local part must not switch off the domain checks (parameter injection).
        "用户@例> SMTPUTF8 X=<",
        "用户@例 子.测试",
        "用户@-例.测试",
        "用户@例子..测试",
        "用户@例子.测试.",
        "用户@" + "例子测试用户" * 10 + ".测试",  # label over 63 octets in A-label form
        "user@" + "例子测试用户" * 10 + ".测试",
        "user@例 子.测试",
        # IDNA 2008 refuses a joiner outside its context (RFC 5892 CONTEXTJ) and symbols.
        "user@a\u200db.example",
        "user@☃.net",
        # R13 inside an address
        "a@example.com\r\nRCPT TO:<evil@x>",
        "a\x00@example.com",
        "a@example.com\x7f",
    ],
)
def test_r14_invalid_paths(address: str) -> None:
    with pytest.raises(LocalProtocolError):
        format_path(address)


def test_r14_local_part_limit_is_64_octets() -> None:
    assert MAX_LOCAL_PART == 64
    format_path("a" * 64 + "@x.example")
    with pytest.raises(LocalProtocolError, match="local part longer"):
        format_path("a" * 65 + "@x.example")


def test_r14_domain_limit_is_255_octets() -> None:
    assert MAX_DOMAIN == 255
    with pytest.raises(LocalProtocolError, match="domain longer"):
        format_path("a@" + domain_of_length(256))
    # 255 octets is a legal domain but cannot fit in a 256-octet path with "<a@...>".
    with pytest.raises(LocalProtocolError, match="path longer"):
        format_path("a@" + domain_of_length(255))


def test_r14_path_limit_is_256_octets_including_brackets() -> None:
    assert MAX_PATH == 256
    path = format_path("a@" + domain_of_length(252))
    assert len(path.wire) == 256
    with pytest.raises(LocalProtocolError, match="path longer"):
        format_path("a@" + domain_of_length(253))
    with pytest.raises(LocalProtocolError, match="path longer"):
        format_path("a" * 64 + "@" + domain_of_length(190))
    assert len(format_path("a" * 64 + "@" + domain_of_length(189)).wire) == 256


def test_r14_path_limit_counts_utf8_octets() -> None:
    local = "é" * 32  # 64 octets
    ok = format_path(local + "@" + domain_of_length(189))
    assert len(ok.wire.encode()) == 256
    with pytest.raises(LocalProtocolError, match="path longer"):
        format_path(local + "@" + domain_of_length(190))


def test_r14_null_path_only_with_allow_null() -> None:
    """``<>`` is only a reverse-path (MAIL FROM), never a recipient."""
    for null in ("", "<>"):
        path = format_path(null, allow_null=True)
        assert path == Path("", False)
        assert path.wire == "<>"
        with pytest.raises(LocalProtocolError, match="null path"):
            format_path(null)


def test_r14_allow_null_does_not_relax_other_checks() -> None:
    with pytest.raises(LocalProtocolError):
        format_path("<x\r\n>", allow_null=True)
    with pytest.raises(LocalProtocolError):
        format_path("a b@x.example", allow_null=True)
    assert format_path("a@x.example", allow_null=True).wire == "<a@x.example>"


def test_r32_idn_domain_with_ascii_local_part_needs_no_smtputf8() -> None:
    path = format_path("user@例子.测试")
    assert path.address.startswith("user@xn--")
    assert path.address.isascii()
    assert not path.needs_smtputf8


def test_r32_utf8_local_part_needs_smtputf8() -> None:
    path = format_path("用户@例子.测试")
    assert path.needs_smtputf8
    assert path.address == "用户@例子.测试"


# ------------------------------------------------------------------------- R33 xtext


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("a+b=c@x", "a+2Bb+3Dc@x"),
        ("plain@example.com", "plain@example.com"),
        ("sp ace", "sp+20ace"),
        ("é", "+C3+A9"),
        ("~!", "~!"),
        ("\x7f", "+7F"),
        ("++==", "+2B+2B+3D+3D"),
        ("", ""),
    ],
)
def test_r33_xtext(value: str, encoded: str) -> None:
    assert xtext(value) == encoded


def test_r33_orcpt_example() -> None:
    assert "ORCPT=rfc822;" + xtext("a+b=c@x") == "ORCPT=rfc822;a+2Bb+3Dc@x"


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_r33_property_xtext_is_safe_and_reversible(value: str) -> None:
    encoded = xtext(value)
    assert all(33 <= ord(c) <= 126 for c in encoded)
    assert "=" not in encoded
    # Every '+' starts a +XX escape with upper-case hex.
    assert re.fullmatch(r"(?:[^+]|\+[0-9A-F]{2})*", encoded)
    decoded = re.sub(
        rb"\+([0-9A-F]{2})", lambda m: bytes.fromhex(m.group(1).decode()), encoded.encode()
    )
    assert decoded.decode("utf-8") == value


# ------------------------------------------------------------- EHLO capabilities


def ehlo(*lines: str) -> Reply:
    """Parse an EHLO reply the way the connection does, from its wire bytes."""
    wire = b"".join(
        f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
        for i, line in enumerate(lines)
    )
    parser = ReplyParser()
    parser.feed(wire)
    reply = parser.next_reply()
    assert reply is not None
    return reply


def caps(*extensions: str) -> Capabilities:
    return Capabilities.from_ehlo(ehlo("mx.example.org Hello", *extensions))


@pytest.mark.parametrize(
    ("line", "limit"),
    [
        ("SIZE 1000", 1000),
        ("SIZE 35882577", 35882577),
        ("SIZE 0", None),  # RFC 1870: 0 means no limit (R30)
        ("SIZE", None),  # no number: no limit
        ("SIZE abc", None),
        ("SIZE -5", None),
        ("size 1000", 1000),
    ],
)
def test_r30_size(line: str, limit: int | None) -> None:
    c = caps(line)
    assert "SIZE" in c
    assert c.size_limit == limit


def test_r30_no_size_extension_means_no_limit() -> None:
    c = caps("PIPELINING")
    assert "SIZE" not in c
    assert c.size_limit is None


FLAGS = [
    ("PIPELINING", "pipelining"),
    ("STARTTLS", "starttls"),
    ("8BITMIME", "eightbitmime"),
    ("SMTPUTF8", "smtputf8"),
    ("DSN", "dsn"),
    ("CHUNKING", "chunking"),
    ("BINARYMIME", "binarymime"),
    ("ENHANCEDSTATUSCODES", "enhancedstatuscodes"),
    ("REQUIRETLS", "requiretls"),
]


@pytest.mark.parametrize(("keyword", "attribute"), FLAGS)
def test_r28_each_extension_flag_only_when_advertised(keyword: str, attribute: str) -> None:
    others = [k for k, _ in FLAGS if k != keyword]
    with_it = caps(*others[:3], keyword, *others[3:])
    without = caps(*others)
    assert getattr(with_it, attribute) is True
    assert getattr(without, attribute) is False
    assert keyword in with_it
    assert keyword not in without
    # Every other flag reads the same in both.
    for other_keyword, other_attr in FLAGS:
        if other_keyword != keyword:
            assert getattr(with_it, other_attr) is getattr(without, other_attr) is True


@pytest.mark.parametrize(("keyword", "attribute"), FLAGS)
def test_r28_extension_keywords_are_case_insensitive(keyword: str, attribute: str) -> None:
    c = caps(keyword.lower())
    assert getattr(c, attribute) is True
    assert keyword.lower() in c
    assert keyword.capitalize() in c


def test_r28_server_name_line_is_not_an_extension() -> None:
    """The first EHLO line is the server's name and greeting, never a keyword (R3)."""
    c = Capabilities.from_ehlo(ehlo("STARTTLS", "SIZE 10"))
    assert not c.starttls
    assert c.size_limit == 10
    assert not Capabilities.from_ehlo(ehlo("mx.example STARTTLS PIPELINING")).starttls


def test_r28_single_line_ehlo_has_no_extensions() -> None:
    c = Capabilities.from_ehlo(ehlo("mx.example.org"))
    assert c.extensions == {}
    assert c.auth_mechanisms == frozenset()
    assert c.esmtp


def test_r4_helo_only_advertises_nothing() -> None:
    c = Capabilities.helo_only()
    assert not c.esmtp
    assert not c.starttls
    assert c.auth_mechanisms == frozenset()
    assert c.size_limit is None


def test_r28_contains_ignores_non_strings() -> None:
    assert 250 not in caps("PIPELINING")
    assert None not in caps("PIPELINING")


def test_r35_auth_mechanisms() -> None:
    c = caps("AUTH PLAIN LOGIN CRAM-MD5")
    assert c.auth_mechanisms == frozenset({"PLAIN", "LOGIN", "CRAM-MD5"})
    assert "AUTH" in c


def test_r35_legacy_auth_equals_line() -> None:
    c = caps("AUTH=LOGIN PLAIN")
    assert c.auth_mechanisms == frozenset({"LOGIN", "PLAIN"})
    assert "AUTH" in c


def test_r35_auth_and_legacy_auth_merge() -> None:
    c = caps("AUTH=LOGIN", "AUTH PLAIN XOAUTH2")
    assert c.auth_mechanisms == frozenset({"LOGIN", "PLAIN", "XOAUTH2"})
    c = caps("AUTH PLAIN", "AUTH=LOGIN")
    assert c.auth_mechanisms == frozenset({"LOGIN", "PLAIN"})


def test_r35_auth_is_case_insensitive() -> None:
    c = caps("auth plain cram-md5")
    assert c.auth_mechanisms == frozenset({"PLAIN", "CRAM-MD5"})
    c = caps("auth=login")
    assert c.auth_mechanisms == frozenset({"LOGIN"})


def test_r35_no_auth_line_means_no_mechanisms() -> None:
    c = caps("PIPELINING", "SIZE 10")
    assert c.auth_mechanisms == frozenset()
    assert "AUTH" not in c


@pytest.mark.parametrize(
    ("line", "rcpt_max"),
    [
        ("LIMITS RCPTMAX=50", 50),
        ("LIMITS MAILMAX=10 RCPTMAX=20", 20),
        ("LIMITS RCPTMAX=20 MAILMAX=10", 20),
        ("limits rcptmax=5", 5),
        ("LIMITS MAILMAX=10", None),
        ("LIMITS RCPTMAX=0", None),
        ("LIMITS RCPTMAX=", None),
        ("LIMITS RCPTMAX=x", None),
        ("LIMITS", None),
    ],
)
def test_r42_limits_rcptmax(line: str, rcpt_max: int | None) -> None:
    assert caps(line).rcpt_max == rcpt_max


def test_r42_no_limits_line() -> None:
    assert caps("PIPELINING").rcpt_max is None


def test_r28_full_ehlo_reply() -> None:
    c = Capabilities.from_ehlo(
        ehlo(
            "mx.example.org Hello client [192.0.2.1]",
            "SIZE 52428800",
            "8BITMIME",
            "PIPELINING",
            "AUTH PLAIN LOGIN",
            "CHUNKING",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "HELP",
        )
    )
    assert c.size_limit == 52428800
    assert c.eightbitmime and c.pipelining and c.chunking and c.smtputf8
    assert c.enhancedstatuscodes and c.dsn
    assert not c.starttls and not c.requiretls and not c.binarymime
    assert c.auth_mechanisms == frozenset({"PLAIN", "LOGIN"})
    assert "HELP" in c
    assert c.extensions["AUTH"] == "PLAIN LOGIN"


def test_path_character_classes_match_the_rfc_ranges_for_every_code_point() -> None:
    """The atext/qtext classes are written as complements (they compile faster); they
    must be exactly RFC 5322 atext + RFC 6532 UTF8-non-ascii, and RFC 5321 qtextSMTP."""
    from triomail._core.paths import _ATEXT_UTF8, _QTEXT_UTF8

    listed_atext = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]")
    listed_qtext = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]")
    atext = re.compile(_ATEXT_UTF8)
    qtext = re.compile(_QTEXT_UTF8)
    every = "".join(map(chr, range(0x110000)))
    assert [m.start() for m in atext.finditer(every)] == [
        m.start() for m in listed_atext.finditer(every)
    ]
    assert [m.start() for m in qtext.finditer(every)] == [
        m.start() for m in listed_qtext.finditer(every)
    ]
