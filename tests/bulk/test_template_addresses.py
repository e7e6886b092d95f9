"""R15: a row's values never change the structure of an address field (issue 13, item 1).

The template decides the mailboxes; a value is a display name, an address, or one whole
mailbox. Checked on the compiled path, the per-row (Jinja2 statements) path, the
README's template, against random hostile values (hypothesis), and end to end through
``triomail send`` and the capture server.
"""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import string
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_template import MID, make, parse  # the template tests' helpers

from triomail._bulk.template.compile import CompiledTemplate, compile_template
from triomail._bulk.template.rendered import RowError, TemplateError
from triomail._cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
README_TO = "TO: {{name}} <{{email}}>\nFROM: Sender <s@example.com>\nSubject: Hi {{name}}\n\nx\n"
# The same template through the per-row path (a statement makes Jinja2 render it whole).
PER_ROW_TO = "{% if true %}" + README_TO.replace("\n\nx", "{% endif %}\n\nx", 1)
ATTACKS = [
    "attacker@evil.com, Bob",
    "attacker@evil.com",
    "Bob <attacker@evil.com>",
    "<attacker@evil.com>, x",
    '"x" <attacker@evil.com>, "y',
    "Bob; attacker@evil.com",
    "undisclosed:attacker@evil.com;",
    "(comment) attacker@evil.com",
    "=?utf-8?q?attacker@evil.com,?= Bob",
]


def header_addresses(msg: EmailMessage, name: str) -> list[str]:
    return [a.addr_spec for a in msg[name].addresses]


@pytest.mark.parametrize("text", [README_TO, PER_ROW_TO], ids=["compiled", "per-row"])
@pytest.mark.parametrize("name", ATTACKS)
def test_r15_display_name_cannot_add_recipients(tmp_path: Path, text: str, name: str) -> None:
    t = make(tmp_path, text)
    assert t.mode == ("compiled" if text == README_TO else "per-row")
    r = t.render({"name": name, "email": "bob@example.com"}, message_id=MID)
    assert r.recipients == ("bob@example.com",)
    msg = parse(r)
    assert header_addresses(msg, "To") == ["bob@example.com"]
    assert msg["To"].addresses[0].display_name == name


@pytest.mark.parametrize("text", [README_TO, PER_ROW_TO], ids=["compiled", "per-row"])
def test_r15_comma_in_a_name_is_a_quoted_phrase(tmp_path: Path, text: str) -> None:
    r = make(tmp_path, text).render(
        {"name": "Smith, John", "email": "j@example.com"}, message_id=MID
    )
    assert r.recipients == ("j@example.com",)
    assert b'\r\nTo: "Smith, John" <j@example.com>\r\n' in b"\r\n" + r.data


@pytest.mark.parametrize(
    "template",
    [
        "To: {{email}}\nFrom: s@example.com\n\nx\n",
        "To: Bob <{{email}}>\nFrom: s@example.com\n\nx\n",
        "To: {{user}}@example.com\nFrom: s@example.com\n\nx\n",
        "{% if true %}To: {{email}}{% endif %}\nFrom: s@example.com\n\nx\n",
    ],
)
@pytest.mark.parametrize(
    "value", ["a@example.com, attacker@evil.com", "a@example.com attacker@evil.com", "a@x>, <b@y"]
)
def test_r15_an_address_value_is_exactly_one_address(
    tmp_path: Path, template: str, value: str
) -> None:
    t = make(tmp_path, template)
    with pytest.raises(RowError, match="invalid"):
        t.render({"email": value, "user": value}, message_id=MID)


@pytest.mark.parametrize(
    ("value", "display", "address"),
    [
        ("a@example.com", "", "a@example.com"),
        ("Bob <b@example.com>", "Bob", "b@example.com"),
        ('"Smith, John" <j@example.com>', "Smith, John", "j@example.com"),
        ("Smith, John <j@example.com>", "Smith, John", "j@example.com"),
        ("attacker@evil.com, Bob <b@example.com>", "attacker@evil.com, Bob", "b@example.com"),
    ],
)
def test_r15_a_whole_value_is_one_mailbox(
    tmp_path: Path, value: str, display: str, address: str
) -> None:
    t = make(tmp_path, "To: {{to}}\nFrom: {{sender}}\n\nx\n")
    r = t.render({"to": value, "sender": value}, message_id=MID)
    assert r.recipients == (address,)
    assert r.sender == address
    (mailbox,) = parse(r)["To"].addresses
    assert (mailbox.display_name, mailbox.addr_spec) == (display, address)


def test_r15_an_empty_value_is_no_mailbox(tmp_path: Path) -> None:
    t = make(tmp_path, "To: {{to}}\nCc: {{cc1}}, {{cc2}}\nFrom: s@example.com\n\nx\n")
    r = t.render({"to": "a@example.com", "cc1": "", "cc2": "c@example.com"}, message_id=MID)
    assert r.recipients == ("a@example.com", "c@example.com")


def test_r15_non_ascii_display_name_is_an_encoded_word(tmp_path: Path) -> None:
    r = make(tmp_path, README_TO).render(
        {"name": "Zoë, <evil@x.com>", "email": "z@example.com"}, message_id=MID
    )
    assert r.recipients == ("z@example.com",)
    assert r.data.isascii()
    (mailbox,) = parse(r)["To"].addresses
    assert mailbox.display_name == "Zoë, <evil@x.com>"


@pytest.mark.parametrize(
    "field", ["To: {{a}} : {{b}};", "To: <{{a}}> {{b}}", 'To: "{{a}}', "To: <{{a}}"]
)
def test_r15_a_field_whose_structure_is_unclear_is_a_template_error(
    tmp_path: Path, field: str
) -> None:
    with pytest.raises(TemplateError):
        make(tmp_path, f"{field}\nFrom: s@example.com\n\nx\n")


# ------------------------------------------------------------------ property test

HOSTILE = st.text(
    alphabet=st.one_of(
        st.sampled_from([*list(',;:"<>@()\\[]\r\n\t =?.'), "é", "中", "😀"]),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(string.ascii_letters),
    ),
    max_size=40,
)
ADDRESS = st.from_regex(
    r"[a-z0-9]{1,10}(\.[a-z0-9]{1,5})?@[a-z]{1,10}\.(com|org|example)", fullmatch=True
)


def _templates() -> list[tuple[str, str]]:
    readme = (EXAMPLES / "template.txt").read_text(encoding="utf-8")
    return [
        ("examples", readme),
        ("examples per-row", readme.replace("TO:", "{% if true %}TO:", 1).replace(
            "\nSUBJECT", "{% endif %}\nSUBJECT", 1)),
        ("cc", "To: {{name}} <{{email}}>\nCc: \"{{plan}}\" <{{email2}}>\nFrom: s@example.com\n"
         "Subject: {{number}}\n\n{{name}}\n"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CompiledTemplate]:
    base = tmp_path_factory.mktemp("hostile")
    shutil.copy(EXAMPLES / "terms.txt", base / "terms.txt")
    out = {}
    for key, text in _templates():
        path = base / f"{key.replace(' ', '-')}.txt"
        path.write_text(text, encoding="utf-8")
        out[key] = compile_template(path)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from([k for k, _ in _templates()]),
    name=HOSTILE,
    plan=HOSTILE,
    number=HOSTILE,
    email=ADDRESS,
    email2=ADDRESS,
)
def test_r15_property_envelope_is_exactly_the_rows_address_fields(
    compiled: dict[str, CompiledTemplate],
    key: str,
    name: str,
    plan: str,
    number: str,
    email: str,
    email2: str,
) -> None:
    row: dict[str, Any] = {
        "name": name, "plan": plan, "number": number, "email": email, "email2": email2
    }  # fmt: skip
    expected = (email, email2) if key == "cc" else (email,)
    try:
        r = compiled[key].render(row, message_id=MID)
    except RowError as exc:
        # Only a line break (R15) or another control character may refuse the row.
        assert any(c in "".join(row.values()) for c in "\r\n\x00") or "control" in str(exc), exc
        return
    assert r.recipients == tuple(dict.fromkeys(expected))  # the envelope names each once
    msg = parse(r)
    got = header_addresses(msg, "To")
    if key == "cc":
        got += header_addresses(msg, "Cc")
    assert tuple(got) == expected


# ------------------------------------------------------------------ end to end


def test_r15_send_delivers_to_the_rows_address_only(tmp_path: Path) -> None:
    """The issue's reproduction: the README template and a hostile name, via the sink."""
    shutil.copytree(EXAMPLES, tmp_path / "ex")
    rows = tmp_path / "ex" / "rows.csv"
    rows.write_text(
        'email,name,number,plan\nbob@example.com,"attacker@evil.com, Bob",1,Pro\n'
        'john@example.com,"Smith, John",2,Pro\n',
        encoding="utf-8",
    )
    outbox = tmp_path / "outbox"
    report = tmp_path / "report.jsonl"
    template = str(tmp_path / "ex" / "template.txt")
    code = main(["send", str(rows), template, "--sink", str(outbox), "--report", str(report)])
    assert code == 0
    seen = {}
    for f in sorted(outbox.glob("*.eml")):
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        seen[header_addresses(msg, "To")[0]] = msg
    assert sorted(seen) == ["bob@example.com", "john@example.com"]
    assert seen["bob@example.com"]["To"].addresses[0].display_name == "attacker@evil.com, Bob"
    assert seen["john@example.com"]["To"].addresses[0].display_name == "Smith, John"
    lines = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    envelopes = sorted(tuple(x["recipients"]) for x in lines if x["type"] == "message")
    assert envelopes == [("bob@example.com",), ("john@example.com",)]


# ------------------------------------------------------------------ item 9


def test_json_null_renders_empty(tmp_path: Path) -> None:
    t = make(tmp_path, "To: {{email}}\nFrom: s@example.com\nSubject: [{{plan}}]\n\n<{{plan}}>\n")
    r = t.render({"email": "a@example.com", "plan": None}, message_id=MID)
    msg = parse(r)
    assert str(msg["Subject"]) == "[]"
    assert msg.get_content().strip() == "<>"
    per_row = make(
        tmp_path, "{% if true %}To: {{email}}{% endif %}\nFrom: s@example.com\n\n[{{plan}}]\n"
    )
    assert (
        parse(per_row.render({"email": "a@example.com", "plan": None}, message_id=MID))
        .get_content()
        .strip()
        == "[]"
    )


@pytest.mark.parametrize("name", ["x" * 1000, "Bob, " + "x" * 1000])
def test_a_display_name_over_998_octets_is_refused_when_rendered(tmp_path: Path, name: str) -> None:
    """Refused by rendering, so --dry-run finds it, not the server (R19)."""
    t = make(tmp_path, README_TO)
    with pytest.raises(RowError, match="998"):
        t.render({"name": name, "email": "a@example.com"}, message_id=MID)
    # A long name with spaces folds and is fine.
    r = t.render({"name": "Bob " * 400, "email": "a@example.com"}, message_id=MID)
    assert max(len(line) for line in r.data.split(b"\r\n")) <= 998


# ------------------------------------------------------------ structured fields


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("List-Unsubscribe: <https://example.com/u/{{v}}>", "x>, <mailto:evil@example.net"),
        ("List-Unsubscribe: <mailto:{{v}}?subject=stop>", "a@example.com> <https://evil"),
        ("Message-ID: <{{v}}@example.com>", "a@b> <c"),
        ("In-Reply-To: <{{v}}>", "a@b c@d"),
    ],
)
def test_r15_a_value_inside_angle_brackets_stays_inside(
    tmp_path: Path, per_row: bool, field: str, value: str
) -> None:
    if per_row:
        field = "{% if true %}" + field + "{% endif %}"
    t = make(tmp_path, f"To: a@example.com\nFrom: s@example.com\n{field}\n\nx\n")
    with pytest.raises(RowError, match=r"inside <\.\.\.>"):
        t.render({"v": value}, message_id=MID)
    ok = t.render({"v": "abc"}, message_id=MID)
    assert b"abc" in ok.data
