"""What one EHLO reply advertised (RFC 5321 §4.1.1.1), as a value (sans-IO).

:class:`Capabilities` is replaced, never merged, after STARTTLS (R7): what was learnt in
plaintext is forgotten with the plaintext session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reply import Reply

__all__ = ["Capabilities"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The service extensions one EHLO reply advertised (RFC 5321 §4.1.1.1)."""

    extensions: dict[str, str] = field(default_factory=dict)
    auth_mechanisms: frozenset[str] = frozenset()
    esmtp: bool = True

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        """Parse an EHLO reply; the first line is the server's greeting name."""
        extensions: dict[str, str] = {}
        mechanisms: set[str] = set()
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            keyword = keyword.upper()
            if keyword.startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                mechanisms.update(m.upper() for m in keyword[5:].split() + params.split())
                extensions.setdefault("AUTH", "")
                continue
            if not keyword:
                continue
            extensions[keyword] = params.strip()
            if keyword == "AUTH":
                mechanisms.update(m.upper() for m in params.split())
        return cls(extensions, frozenset(mechanisms))

    @classmethod
    def helo_only(cls) -> Capabilities:
        """No ESMTP: the server refused EHLO and took HELO (R4)."""
        return cls(esmtp=False)

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE limit, or ``None`` for no limit (RFC 1870: absent or 0)."""
        if "SIZE" not in self.extensions:
            return None
        value = self.extensions["SIZE"]
        # RFC 1870: size-param = 1*20DIGIT; anything else (such as "-5") is no limit.
        if not (value.isascii() and value.isdigit()):
            return None
        return int(value) or None

    @property
    def rcpt_max(self) -> int | None:
        """RFC 9422 ``LIMITS RCPTMAX=``, if advertised."""
        for item in self.extensions.get("LIMITS", "").split():
            name, _, value = item.partition("=")
            if name.upper() == "RCPTMAX" and value.isdigit() and int(value) > 0:
                return int(value)
        return None

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.extensions

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.extensions

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.extensions

    @property
    def dsn(self) -> bool:
        return "DSN" in self.extensions

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.extensions

    @property
    def binarymime(self) -> bool:
        return "BINARYMIME" in self.extensions

    @property
    def enhancedstatuscodes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.extensions

    @property
    def requiretls(self) -> bool:
        return "REQUIRETLS" in self.extensions
