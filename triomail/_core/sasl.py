"""SASL mechanisms for SMTP AUTH (RFC 4954) as pure, I/O-free objects.

A mechanism gives an optional initial response and answers each decoded 334 challenge.
The client's ``_client.auth`` owns the exchange: base64, the challenge cap and the ``*``
cancel (R35). Credentials are UTF-8 (RFC 4616 §2); nothing here logs or stringifies
them (R36).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Protocol

from .errors import LocalProtocolError

__all__ = ["CramMD5", "Login", "Plain", "SASLMechanism", "XOAuth2", "choose_mechanism"]


class SASLMechanism(Protocol):
    """What the AUTH exchange needs from a mechanism."""

    name: str

    def initial_response(self) -> bytes | None:
        """Bytes for the AUTH line itself, or ``None`` to wait for a first 334."""
        ...

    def respond(self, challenge: bytes) -> bytes:
        """Answer one (base64-decoded) 334 challenge."""
        ...


class Plain:
    """RFC 4616 PLAIN: ``authzid NUL authcid NUL passwd`` in one initial response."""

    name = "PLAIN"

    def __init__(self, username: str, password: str) -> None:
        # RFC 4616 §2: UTF8SAFE excludes NUL, which would move the field boundaries.
        # The message names neither value (R36).
        if "\0" in username or "\0" in password:
            raise LocalProtocolError("PLAIN: user name or password contains NUL")
        self._response = b"\0" + username.encode() + b"\0" + password.encode()

    def initial_response(self) -> bytes | None:
        return self._response

    def respond(self, challenge: bytes) -> bytes:
        # A server that ignored the initial response asks with an empty challenge.
        return self._response

    def __repr__(self) -> str:
        return "Plain(<redacted>)"


class Login:
    """The LOGIN mechanism: user name, then password, each on its own 334."""

    name = "LOGIN"

    def __init__(self, username: str, password: str) -> None:
        self._answers = [username.encode(), password.encode()]

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        if not self._answers:
            raise ValueError("LOGIN: unexpected third challenge")
        return self._answers.pop(0)

    def __repr__(self) -> str:
        return "Login(<redacted>)"


class CramMD5:
    """RFC 2195 CRAM-MD5: ``user SP hex(HMAC-MD5(password, challenge))``."""

    name = "CRAM-MD5"

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        digest = hmac.new(self._password, challenge, "md5").hexdigest().encode()
        return self._username + b" " + digest

    def __repr__(self) -> str:
        return "CramMD5(<redacted>)"


class XOAuth2:
    """Google/Microsoft XOAUTH2 with a bearer token fetched just before AUTH."""

    name = "XOAUTH2"

    def __init__(self, username: str, token: str) -> None:
        # \x01 separates the fields: in the user name it could add its own auth= field.
        if "\x01" in username or "\x01" in token:
            raise LocalProtocolError("XOAUTH2: user name or token contains \\x01")
        self._response = b"user=" + username.encode() + b"\x01auth=Bearer " + token.encode()
        self._response += b"\x01\x01"

    def initial_response(self) -> bytes | None:
        return self._response

    def respond(self, challenge: bytes) -> bytes:
        # The 334 carries a JSON error; an empty answer makes the server send 535.
        return b""

    def __repr__(self) -> str:
        return "XOAuth2(<redacted>)"


# R35: the strongest first; PLAIN and LOGIN only ever run over TLS (R9).
_PREFERENCE = ("CRAM-MD5", "PLAIN", "LOGIN")


#: The mechanisms a user name and password can serve, by their SASL names.
PASSWORD_MECHANISMS: dict[str, type[CramMD5 | Plain | Login]] = {
    "CRAM-MD5": CramMD5,
    "PLAIN": Plain,
    "LOGIN": Login,
}


def password_mechanisms(
    advertised: frozenset[str], username: str, password: str, wanted: Sequence[str] = ()
) -> list[SASLMechanism]:
    """The mechanisms to try for a password, in order: those ``wanted`` (SASL names, in
    the caller's order) or, when none is named, every advertised one, strongest first.

    A wanted name that the server did not advertise, or that a password cannot serve,
    is a :class:`LocalProtocolError`: nothing is sent for it.
    """
    names = [name.upper() for name in wanted] or [n for n in _PREFERENCE if n in advertised]
    for name in names:
        if name not in PASSWORD_MECHANISMS:
            raise LocalProtocolError(
                f"AUTH {name}: not a password mechanism (known: {', '.join(_PREFERENCE)})"
            )
    return [PASSWORD_MECHANISMS[name](username, password) for name in names]


def choose_mechanism(
    advertised: frozenset[str], username: str, password: str
) -> SASLMechanism | None:
    """The strongest mechanism the server advertised for a password, or None."""
    found = password_mechanisms(advertised, username, password)
    return found[0] if found else None
