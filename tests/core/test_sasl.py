"""SASL mechanisms as pure functions, byte for byte (R35, R36)."""

from __future__ import annotations

import base64

import pytest

from triomail._core.errors import LocalProtocolError
from triomail._core.sasl import CramMD5, Login, Plain, SASLMechanism, XOAuth2, choose_mechanism

USER = "alice@example.com"
SECRET = "s3cr3t-Pässwörd"
TOKEN = "ya29.SECRET-TOKEN-VALUE"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# ------------------------------------------------------------------------- PLAIN


def test_r35_plain_initial_response_exact_bytes() -> None:
    mech = Plain("tim", "tanstaaftanstaaf")
    assert mech.name == "PLAIN"
    assert mech.initial_response() == b"\x00tim\x00tanstaaftanstaaf"
    assert b64(mech.initial_response() or b"") == b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm"


def test_r35_plain_utf8_credentials() -> None:
    """RFC 4616 §2: authcid and passwd are UTF-8."""
    mech = Plain("jöhn", "pässwörd€")
    assert mech.initial_response() == b"\x00j\xc3\xb6hn\x00p\xc3\xa4ssw\xc3\xb6rd\xe2\x82\xac"


def test_r35_plain_answers_an_empty_challenge_with_the_same_response() -> None:
    """A server that ignored the initial response asks with an empty 334."""
    mech = Plain("tim", "pw")
    assert mech.respond(b"") == b"\x00tim\x00pw"


@pytest.mark.parametrize(("user", "password"), [("a\x00b", "pw"), ("tim", "p\x00w")])
def test_r35_plain_refuses_nul_in_credentials(user: str, password: str) -> None:
    """RFC 4616: UTF8SAFE excludes NUL, which would shift authzid/authcid/passwd."""
    with pytest.raises(LocalProtocolError) as info:
        Plain(user, password)
    assert "pw" not in str(info.value) and "p\\x00w" not in str(info.value)


# ------------------------------------------------------------------------- LOGIN


def test_r35_login_sequence() -> None:
    mech = Login("tim", "tanstaaftanstaaf")
    assert mech.name == "LOGIN"
    assert mech.initial_response() is None
    assert mech.respond(b"Username:") == b"tim"
    assert mech.respond(b"Password:") == b"tanstaaftanstaaf"
    # The wire form of each answer is base64 of exactly those bytes.
    assert b64(b"tim") == b"dGlt"


def test_r35_login_utf8_credentials() -> None:
    mech = Login("jöhn", "pässwörd")
    assert mech.respond(b"Username:") == "jöhn".encode()
    assert mech.respond(b"Password:") == "pässwörd".encode()


def test_r35_login_third_challenge_is_an_error_without_secrets() -> None:
    mech = Login(USER, SECRET)
    mech.respond(b"Username:")
    mech.respond(b"Password:")
    with pytest.raises(ValueError) as info:
        mech.respond(b"Again:")
    assert SECRET not in str(info.value)
    assert USER not in str(info.value)


# ---------------------------------------------------------------------- CRAM-MD5


def test_r35_cram_md5_rfc2195_example() -> None:
    mech = CramMD5("tim", "tanstaaftanstaaf")
    assert mech.name == "CRAM-MD5"
    assert mech.initial_response() is None
    challenge = base64.b64decode("PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+")
    assert challenge == b"<1896.697170952@postoffice.reston.mci.net>"
    response = mech.respond(challenge)
    assert response == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert b64(response) == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"


def test_r35_cram_md5_depends_on_the_challenge() -> None:
    mech = CramMD5("tim", "tanstaaftanstaaf")
    assert mech.respond(b"<1@x>") != mech.respond(b"<2@x>")


def test_r35_cram_md5_utf8_credentials() -> None:
    response = CramMD5("jöhn", "pässwörd").respond(b"<1@x>")
    assert response.startswith("jöhn ".encode())
    assert len(response.split(b" ")[1]) == 32


# ----------------------------------------------------------------------- XOAUTH2


def test_r35_xoauth2_format() -> None:
    """Google's documented example, byte for byte."""
    mech = XOAuth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    assert mech.name == "XOAUTH2"
    response = mech.initial_response()
    assert response == (
        b"user=someuser@example.com\x01"
        b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    )
    assert b64(response) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNS"
        b"bGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_r35_xoauth2_answers_error_challenge_with_empty_response() -> None:
    """The 334 carries a JSON error; an empty answer makes the server send its 5xx."""
    mech = XOAuth2(USER, TOKEN)
    assert mech.respond(b'{"status":"401","schemes":"bearer"}') == b""


@pytest.mark.parametrize(("user", "token"), [("a\x01auth=Bearer x", TOKEN), (USER, "t\x01x")])
def test_r35_xoauth2_refuses_field_separator_in_user_or_token(user: str, token: str) -> None:
    """A \\x01 would let the user name carry its own auth= field."""
    with pytest.raises(LocalProtocolError) as info:
        XOAuth2(user, token)
    assert TOKEN not in str(info.value)


# ---------------------------------------------------------------- R36 secrets


@pytest.mark.parametrize(
    "mech",
    [Plain(USER, SECRET), Login(USER, SECRET), CramMD5(USER, SECRET), XOAuth2(USER, TOKEN)],
    ids=lambda m: type(m).__name__,
)
def test_r36_repr_and_str_never_show_secrets(mech: SASLMechanism) -> None:
    secrets = [SECRET, TOKEN, SECRET.encode().hex()]
    for form in (repr(mech), str(mech), repr([mech]), f"{mech!r}", f"{mech}"):
        for secret in secrets:
            assert secret not in form
        assert b64(SECRET.encode()).decode() not in form
        assert "redacted" in form


def test_r36_plain_repr_hides_the_base64_initial_response() -> None:
    mech = Plain(USER, SECRET)
    encoded = b64(mech.initial_response() or b"").decode()
    assert encoded not in repr(mech)


# ------------------------------------------------------------------ choice


@pytest.mark.parametrize(
    ("advertised", "expected"),
    [
        ({"CRAM-MD5", "PLAIN", "LOGIN"}, CramMD5),
        ({"PLAIN", "LOGIN"}, Plain),
        ({"LOGIN", "PLAIN"}, Plain),
        ({"LOGIN"}, Login),
        ({"CRAM-MD5"}, CramMD5),
        ({"SCRAM-SHA-256", "PLAIN"}, Plain),
        ({"XOAUTH2", "LOGIN"}, Login),
    ],
)
def test_r35_choose_mechanism_preference(advertised: set[str], expected: type) -> None:
    mech = choose_mechanism(frozenset(advertised), "tim", "pw")
    assert type(mech) is expected


@pytest.mark.parametrize("advertised", [set(), {"XOAUTH2"}, {"GSSAPI", "NTLM"}])
def test_r35_choose_mechanism_none_usable(advertised: set[str]) -> None:
    assert choose_mechanism(frozenset(advertised), "tim", "pw") is None


def test_r35_chosen_mechanism_carries_the_credentials() -> None:
    plain = choose_mechanism(frozenset({"PLAIN"}), "tim", "pw")
    assert plain is not None
    assert plain.initial_response() == b"\x00tim\x00pw"
    login = choose_mechanism(frozenset({"LOGIN"}), "tim", "pw")
    assert login is not None
    assert login.respond(b"Username:") == b"tim"
    assert login.respond(b"Password:") == b"pw"
