"""Envelope and serialisation of email messages, and ``triomail.prepare`` (R13-R19, R32).

R15 (header injection), R18 (8-bit only when allowed) and R32 (UTF-8 only under SMTPUTF8)
are checked on the exact bytes ``flatten`` produces. The envelope rules (sender from
Sender then From, recipients from To/Cc/Bcc, the Resent-* block, Bcc stripped) are issue
2's and have no R-number of their own.
"""

from __future__ import annotations

import email
import re
from email import policy
from email.header import Header
from email.message import EmailMessage, Message

import pytest

import triomail
from triomail._core.errors import LocalProtocolError
from triomail._core.message import Envelope, envelope_of, flatten, needs_utf8_headers

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def make(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello.\n")
    return msg


def headers_of(data: bytes) -> bytes:
    head, sep, _ = data.partition(b"\r\n\r\n")
    assert sep, "no blank line after the headers"
    return head + b"\r\n"


def header_lines(data: bytes) -> list[bytes]:
    """Unfolded header lines of flattened data."""
    return re.sub(rb"\r\n[ \t]", b" ", headers_of(data)).split(b"\r\n")[:-1]


def header(data: bytes, name: bytes) -> list[bytes]:
    prefix = name.lower() + b":"
    return [line for line in header_lines(data) if line.lower().startswith(prefix)]


# ------------------------------------------------------------------ envelope (R14)


def test_envelope_sender_from_from() -> None:
    msg = make(From="Alice <alice@example.com>", To="bob@example.com")
    assert envelope_of(msg) == Envelope("alice@example.com", ("bob@example.com",))


def test_envelope_sender_prefers_sender_over_from() -> None:
    msg = make(
        From="Alice <alice@example.com>, Carol <carol@example.com>",
        Sender="secretary@example.com",
        To="bob@example.com",
    )
    assert envelope_of(msg).sender == "secretary@example.com"


def test_envelope_several_from_without_sender_is_refused() -> None:
    msg = make(From="alice@example.com, carol@example.com", To="bob@example.com")
    with pytest.raises(LocalProtocolError, match="sender"):
        envelope_of(msg)


def test_envelope_without_from_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="sender"):
        envelope_of(make(To="bob@example.com"))


def test_envelope_recipients_from_to_cc_bcc_in_order_without_duplicates() -> None:
    msg = make(
        From="alice@example.com",
        To="Bob <bob@example.com>, carol@example.com",
        Cc="dave@example.com, bob@example.com",
        Bcc="Eve <eve@example.com>",
    )
    assert envelope_of(msg).recipients == (
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
        "eve@example.com",
    )


def test_envelope_groups() -> None:
    msg = make(
        From="alice@example.com",
        To="undisclosed-recipients:;",
        Cc="team: bob@example.com, carol@example.com;",
    )
    assert envelope_of(msg).recipients == ("bob@example.com", "carol@example.com")


def test_envelope_bcc_only() -> None:
    msg = make(From="alice@example.com", To="undisclosed-recipients:;", Bcc="eve@example.com")
    assert envelope_of(msg).recipients == ("eve@example.com",)


def test_envelope_no_recipients_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="no recipients"):
        envelope_of(make(From="alice@example.com", To="undisclosed-recipients:;"))


def test_envelope_resent_block_decides() -> None:
    msg = make(
        From="alice@example.com",
        To="bob@example.com",
        Cc="carol@example.com",
        Resent_From="forwarder@example.com",
        Resent_To="new@example.com",
        Resent_Cc="other@example.com",
        Resent_Bcc="hidden@example.com",
        Resent_Date="Mon, 1 Jan 2024 00:00:00 +0000",
    )
    assert envelope_of(msg) == Envelope(
        "forwarder@example.com", ("new@example.com", "other@example.com", "hidden@example.com")
    )


def test_envelope_resent_sender_beats_resent_from() -> None:
    msg = make(
        From="alice@example.com",
        To="bob@example.com",
        Resent_From="forwarder@example.com",
        Resent_Sender="agent@example.com",
        Resent_To="new@example.com",
    )
    assert envelope_of(msg).sender == "agent@example.com"


def test_envelope_several_resent_blocks_are_refused() -> None:
    msg = make(From="alice@example.com", To="bob@example.com")
    for i in (1, 2):
        msg["Resent-Date"] = f"Mon, {i} Jan 2024 00:00:00 +0000"
        msg["Resent-From"] = f"r{i}@example.com"
        msg["Resent-To"] = f"t{i}@example.com"
    with pytest.raises(LocalProtocolError, match="Resent"):
        envelope_of(msg)


def test_envelope_of_compat32_message() -> None:
    msg = Message()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.com, Carol <carol@example.com>"
    msg["Bcc"] = "eve@example.com"
    msg.set_payload("hi\n")
    assert envelope_of(msg) == Envelope(
        "alice@example.com", ("bob@example.com", "carol@example.com", "eve@example.com")
    )


def test_envelope_of_parsed_message() -> None:
    raw = b"From: a@example.com\r\nTo: b@example.com\r\nCc: c@example.com\r\n\r\nbody\r\n"
    for pol in (policy.default, policy.compat32):
        msg = email.message_from_bytes(raw, policy=pol)
        assert envelope_of(msg) == Envelope("a@example.com", ("b@example.com", "c@example.com"))


# ----------------------------------------------------------------- flatten: Bcc, CRLF


def test_bcc_is_stripped_from_the_data_and_the_message_is_not_modified() -> None:
    msg = make(From="a@example.com", To="b@example.com", Cc="c@example.com", Bcc="e@example.com")
    data = flatten(msg, utf8=False, eight_bit=False)
    assert header(data, b"Bcc") == []
    assert b"e@example.com" not in data
    assert header(data, b"To") == [b"To: b@example.com"]
    assert header(data, b"Cc") == [b"Cc: c@example.com"]
    assert msg["Bcc"] == "e@example.com"  # the caller's object is untouched


def test_resent_bcc_is_stripped() -> None:
    msg = make(
        From="a@example.com",
        To="b@example.com",
        Resent_From="r@example.com",
        Resent_To="t@example.com",
        Resent_Bcc="hidden@example.com",
    )
    data = flatten(msg, utf8=False, eight_bit=False)
    assert b"hidden@example.com" not in data
    assert header(data, b"Resent-To") == [b"Resent-To: t@example.com"]
    assert msg["Resent-Bcc"] == "hidden@example.com"


def test_compat32_bcc_is_stripped() -> None:
    msg = Message()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.com"
    msg["Bcc"] = "e@example.com"
    msg.set_payload("hi\n")
    data = flatten(msg, utf8=False, eight_bit=False)
    assert b"e@example.com" not in data
    assert "Bcc" in msg


@pytest.mark.parametrize(("utf8", "eight_bit"), [(False, False), (False, True), (True, True)])
def test_flatten_uses_crlf_only(utf8: bool, eight_bit: bool) -> None:
    msg = make(From="a@example.com", To="b@example.com", Subject="x " * 60)
    msg.set_content("line one\nline two\r\nline three\n")
    data = flatten(msg, utf8=utf8, eight_bit=eight_bit)
    assert _BARE.search(data) is None
    assert data.endswith(b"\r\n")
    assert b"line one\r\nline two\r\nline three\r\n" in data


def test_flatten_exact_bytes_of_a_simple_message() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.com"
    msg["Subject"] = "hi"
    msg.set_content("body\n")
    assert flatten(msg, utf8=False, eight_bit=False) == (
        b"From: a@example.com\r\n"
        b"To: b@example.com\r\n"
        b"Subject: hi\r\n"
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"MIME-Version: 1.0\r\n"
        b"\r\n"
        b"body\r\n"
    )


# --------------------------------------------------------------- R15 injection


def test_r15_email_package_refuses_crlf_in_subject() -> None:
    msg = EmailMessage()
    with pytest.raises(ValueError):
        msg["Subject"] = "x\r\nBcc: evil@x"


@pytest.mark.parametrize(
    "value", ["x\r\nBcc: evil@x", "x\nBcc: evil@x", "x\rBcc: evil@x", "x\r\n\r\nbody", "x\n"]
)
def test_r15_compat32_header_value_injection_is_refused(value: str) -> None:
    msg = Message()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.com"
    msg["Subject"] = value
    msg.set_payload("hi\n")
    for utf8, eight_bit in ((False, False), (False, True), (True, True)):
        with pytest.raises(LocalProtocolError, match="Subject"):
            flatten(msg, utf8=utf8, eight_bit=eight_bit)


def test_r15_compat32_folded_header_is_allowed() -> None:
    msg = Message()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.com"
    msg["Subject"] = "long\r\n continued"
    msg.set_payload("hi\n")
    data = flatten(msg, utf8=False, eight_bit=False)
    assert header(data, b"Subject") == [b"Subject: long continued"]


@pytest.mark.parametrize("name", ["X\r\nBcc: evil@x\r\nX-Y", "X-Evil\nBcc", "Bad Name", "X:Y"])
def test_r15_header_name_injection_is_refused(name: str) -> None:
    for msg in (make(From="a@example.com", To="b@example.com"), Message()):
        msg[name] = "v"
        with pytest.raises(LocalProtocolError, match="header name"):
            flatten(msg, utf8=False, eight_bit=False)


def test_r15_injection_in_a_mime_part_is_refused() -> None:
    outer = Message()
    outer["From"] = "a@example.com"
    outer["To"] = "b@example.com"
    outer["Content-Type"] = "multipart/mixed; boundary=BOUNDARY"
    part = Message()
    part["Content-Description"] = "x\r\nBcc: evil@x"
    part.set_payload("hi\n")
    outer.attach(part)
    with pytest.raises(LocalProtocolError):
        flatten(outer, utf8=False, eight_bit=False)


def test_r15_prepare_refuses_injected_header() -> None:
    msg = Message()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.com"
    msg["Subject"] = "x\r\nBcc: evil@x"
    with pytest.raises(LocalProtocolError):
        triomail.prepare(msg)


# ------------------------------------------------------------ R18 / R32 encoding


def test_r18_non_ascii_subject_is_rfc2047_encoded_without_smtputf8() -> None:
    msg = make(From="a@example.com", To="b@example.com", Subject="héllo wörld")
    for eight_bit in (False, True):
        data = flatten(msg, utf8=False, eight_bit=eight_bit)
        assert headers_of(data).isascii()
        [subject] = header(data, b"Subject")
        assert subject.startswith(b"Subject: =?utf-8?")
        assert str(email.message_from_bytes(data, policy=policy.default)["Subject"]) == (
            "héllo wörld"
        )


def test_r32_non_ascii_subject_is_raw_utf8_under_smtputf8() -> None:
    msg = make(From="a@example.com", To="b@example.com", Subject="héllo")
    data = flatten(msg, utf8=True, eight_bit=True)
    assert header(data, b"Subject") == ["Subject: héllo".encode()]


def test_r18_eight_bit_body_is_reencoded_under_the_7bit_policy() -> None:
    msg = make(From="a@example.com", To="b@example.com")
    msg.set_content("naïve café\n", cte="8bit")
    seven = flatten(msg, utf8=False, eight_bit=False)
    assert seven.isascii()
    assert header(seven, b"Content-Transfer-Encoding") in (
        [b"Content-Transfer-Encoding: base64"],
        [b"Content-Transfer-Encoding: quoted-printable"],
    )
    eight = flatten(msg, utf8=False, eight_bit=True)
    assert "naïve café\r\n".encode() in eight
    assert header(eight, b"Content-Transfer-Encoding") == [b"Content-Transfer-Encoding: 8bit"]


def test_r32_utf8_address_headers_only_under_the_smtputf8_policy() -> None:
    msg = make(From="用户@例子.测试", To="bob@example.com")
    assert needs_utf8_headers(msg)
    data = flatten(msg, utf8=True, eight_bit=True)
    assert header(data, b"From") == ["From: 用户@例子.测试".encode()]
    # Without SMTPUTF8 the address cannot be written: RFC 2047 forbids encoded-words in
    # an addr-spec, so refuse rather than send a mangled From.
    for eight_bit in (False, True):
        with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
            flatten(msg, utf8=False, eight_bit=eight_bit)


@pytest.mark.parametrize("name", ["To", "Cc", "Reply-To", "Sender", "Resent-To"])
def test_r32_needs_utf8_headers_for_each_address_header(name: str) -> None:
    msg = make(From="a@example.com", To="b@example.com")
    if name in msg:
        del msg[name]
    msg[name] = "josé@example.com"
    assert needs_utf8_headers(msg)


def test_r32_non_ascii_display_name_needs_no_smtputf8() -> None:
    msg = make(From="Jöhn Döe <john@example.com>", To="bob@example.com")
    assert not needs_utf8_headers(msg)
    data = flatten(msg, utf8=False, eight_bit=False)
    assert headers_of(data).isascii()
    [line] = header(data, b"From")
    assert line.endswith(b"<john@example.com>")
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert parsed["From"].addresses[0].display_name == "Jöhn Döe"


def test_r32_idn_domain_in_headers_goes_as_a_labels_without_smtputf8() -> None:
    msg = make(From="Alice <alice@例子.测试>", To="user@bücher.example, bob@example.com")
    assert not needs_utf8_headers(msg)
    data = flatten(msg, utf8=False, eight_bit=False)
    assert headers_of(data).isascii()
    assert header(data, b"From") == [b"From: Alice <alice@xn--fsqu00a.xn--0zwm56d>"]
    assert header(data, b"To") == [b"To: user@xn--bcher-kva.example, bob@example.com"]
    # Header order is kept.
    names = [line.split(b":")[0] for line in header_lines(data)]
    assert names[:2] == [b"From", b"To"]
    # Under SMTPUTF8 the U-labels stay.
    utf8 = flatten(msg, utf8=True, eight_bit=True)
    assert header(utf8, b"From") == ["From: Alice <alice@例子.测试>".encode()]


def test_r32_compat32_non_ascii_headers_are_encoded_not_crashing() -> None:
    msg = Message()
    msg["From"] = "Jöhn <john@example.com>"
    msg["To"] = "user@例子.测试"
    msg["Subject"] = "héllo"
    msg["X-Tag"] = Header("wörld", "utf-8")  # type: ignore[assignment]
    msg.set_payload("hi\n")
    data = flatten(msg, utf8=False, eight_bit=False)
    assert headers_of(data).isascii()
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert parsed["Subject"] == "héllo"
    assert parsed["X-Tag"] == "wörld"
    assert parsed["From"].addresses[0].display_name == "Jöhn"
    assert parsed["To"].addresses[0].addr_spec == "user@xn--fsqu00a.xn--0zwm56d"


# ------------------------------------------------------------------- prepare()


def test_prepare_raw_bytes() -> None:
    prepared = triomail.prepare(
        b"Subject: x\n\nbody", sender="a@example.com", recipients=["b@example.com"]
    )
    assert prepared.sender == "a@example.com"
    assert prepared.recipients == ("b@example.com",)
    assert prepared.canonical.data == b"Subject: x\r\n\r\nbody\r\n"
    assert not prepared.canonical.eight_bit
    assert not prepared.needs_smtputf8
    assert prepared.message_id is None


@pytest.mark.parametrize(
    ("message", "message_id"),
    [
        (b"Message-ID: <1@x>\r\nSubject: s\r\n\r\nbody\r\n", "<1@x>"),
        (b"Subject: s\r\nmessage-id:   <2@x>  \r\n\r\nbody\r\n", "<2@x>"),
        (b"Subject: s\nMESSAGE-ID: <3@x>\n", "<3@x>"),  # no body, bare LF
        (b"X-Message-ID: <4@x>\r\nSubject: s\r\n\r\nbody\r\n", None),
        (b"Subject: s\r\n X-Message-ID: <5@x>\r\n\r\nbody\r\n", None),
        (b"Subject: s\r\n\r\nMessage-ID: <6@x>\r\n", None),  # in the body
        (b"Subject: s\r\nMessage-ID:\r\n\r\nbody\r\n", None),  # empty
        (b"X-A: Message-ID: <7@x>\r\nMessage-Id: <8@x>\r\n\r\n", "<8@x>"),
    ],
)
def test_r38_prepare_raw_finds_the_message_id_header(
    message: bytes, message_id: str | None
) -> None:
    prepared = triomail.prepare(message, sender="a@example.com", recipients=["b@example.com"])
    assert prepared.message_id == message_id


def test_r14_a_null_path_kept_for_a_sender_is_still_refused_as_a_recipient() -> None:
    triomail.prepare(b"x", sender="<>", recipients=["b@example.com"])
    with pytest.raises(LocalProtocolError, match="null path"):
        triomail.prepare(b"x", sender="a@example.com", recipients=["<>"])


def test_prepare_raw_str() -> None:
    prepared = triomail.prepare(
        "Subject: café\r\n\r\n.dot\r", sender="<a@example.com>", recipients=("b@example.com",)
    )
    assert prepared.canonical.data == "Subject: café\r\n\r\n.dot\r\n".encode()
    assert prepared.canonical.eight_bit
    assert prepared.sender == "a@example.com"


def test_r14_r32_prepare_raw_paths_are_checked_and_converted() -> None:
    prepared = triomail.prepare(
        b"x", sender="", recipients=["user@例子.测试", "用户@example.com"], tag="job-1"
    )
    assert prepared.sender == ""  # the null reverse-path
    assert prepared.recipients == ("user@xn--fsqu00a.xn--0zwm56d", "用户@example.com")
    assert prepared.needs_smtputf8
    assert prepared.tag == "job-1"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipients": ["b@example.com"]}, "sender"),
        ({"sender": "a@example.com"}, "recipients"),
        ({"sender": "a@example.com", "recipients": []}, "no recipients"),
        ({"sender": "a@example.com", "recipients": "b@example.com"}, "one string"),
        ({"sender": "a@example.com", "recipients": ["b@example.com\r\nDATA"]}, "control"),
        ({"sender": "a\r\n@example.com", "recipients": ["b@example.com"]}, "control"),
        ({"sender": "a@example.com", "recipients": ["<>"]}, "null path"),
        ({"sender": "a@example.com", "recipients": ["not-an-address"]}, "mailbox"),
    ],
)
def test_r13_r14_prepare_raw_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        triomail.prepare(b"Subject: x\r\n\r\nbody\r\n", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "match"), [(b"a\x00b", "NUL"), (b"x" * 999, "longer than 998")]
)
def test_r17_r19_prepare_raw_data_errors(message: bytes, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        triomail.prepare(message, sender="a@example.com", recipients=["b@example.com"])


def test_prepare_email_message() -> None:
    msg = make(From="a@example.com", To="b@example.com", Bcc="e@example.com", Subject="hi")
    msg["Message-ID"] = "<1@example.com>"
    prepared = triomail.prepare(msg)
    assert prepared.sender == "a@example.com"
    assert prepared.recipients == ("b@example.com", "e@example.com")
    assert prepared.message_id == "<1@example.com>"
    assert b"e@example.com" not in prepared.canonical.data
    assert _BARE.search(prepared.canonical.data) is None
    assert not prepared.needs_smtputf8


def test_prepare_email_message_explicit_envelope_overrides_headers() -> None:
    msg = make(From="a@example.com", To="b@example.com")
    prepared = triomail.prepare(msg, sender="bounce@example.com", recipients=["x@example.com"])
    assert prepared.sender == "bounce@example.com"
    assert prepared.recipients == ("x@example.com",)


def test_prepare_email_message_without_recipients() -> None:
    with pytest.raises(LocalProtocolError, match="no recipients"):
        triomail.prepare(make(From="a@example.com", To="undisclosed-recipients:;"))


def test_r32_prepare_utf8_message_for_smtputf8_server() -> None:
    msg = make(From="用户@例子.测试", To="b@example.com", Subject="héllo")
    prepared = triomail.prepare(msg, smtputf8=True)
    assert prepared.needs_smtputf8
    assert "From: 用户@例子.测试\r\n".encode() in prepared.canonical.data
    assert "Subject: héllo\r\n".encode() in prepared.canonical.data


def test_r32_prepare_non_ascii_subject_does_not_need_smtputf8() -> None:
    prepared = triomail.prepare(make(From="a@example.com", To="b@example.com", Subject="héllo"))
    assert not prepared.needs_smtputf8
    assert headers_of(prepared.canonical.data).isascii()


def test_r18_prepare_keeps_a_7bit_form_of_an_8bit_message() -> None:
    msg = make(From="a@example.com", To="b@example.com")
    msg.set_content("naïve\n", cte="8bit")
    prepared = triomail.prepare(msg, eight_bit=True)
    assert prepared.canonical.eight_bit
    assert prepared.canonical_7bit is not None
    assert not prepared.canonical_7bit.eight_bit
    seven = triomail.prepare(msg, smtputf8=False, eight_bit=False)
    assert not seven.canonical.eight_bit


def test_prepare_email_message_recipients_as_one_string() -> None:
    msg = make(From="a@example.com", To="b@example.com")
    with pytest.raises(LocalProtocolError, match="one string"):
        triomail.prepare(msg, recipients="x@example.com")


def test_prepare_email_message_explicit_envelope_without_headers() -> None:
    msg = EmailMessage()
    msg["Subject"] = "no From, no To"
    msg.set_content("hi\n")
    prepared = triomail.prepare(msg, sender="a@example.com", recipients=["b@example.com"])
    assert prepared.recipients == ("b@example.com",)


def test_r32_parsed_8bit_headers_are_reencoded_without_smtputf8() -> None:
    raw = "From: Jöhn <j@example.com>\r\nTo: b@bücher.example\r\nSubject: héllo\r\n\r\nbody\r\n"
    for pol in (policy.default, policy.compat32):
        msg = email.message_from_bytes(raw.encode(), policy=pol)
        data = flatten(msg, utf8=False, eight_bit=True)
        assert headers_of(data).isascii()
        assert header(data, b"To") == [b"To: b@xn--bcher-kva.example"]
        parsed = email.message_from_bytes(data, policy=policy.default)
        assert parsed["Subject"] == "héllo"
        # Under SMTPUTF8 the original bytes go out unchanged.
        assert flatten(msg, utf8=True, eight_bit=True) == raw.encode()


def test_r18_parsed_8bit_body_without_charset_is_a_local_error_under_7bit() -> None:
    msg = email.message_from_bytes(b"From: a@b.example\r\n\r\nbody \xc3\xa9\r\n")
    assert flatten(msg, utf8=False, eight_bit=True).endswith(b"body \xc3\xa9\r\n")
    with pytest.raises(LocalProtocolError, match="8BITMIME"):
        flatten(msg, utf8=False, eight_bit=False)
