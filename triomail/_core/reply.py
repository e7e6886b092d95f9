"""One SMTP reply as a value (RFC 5321 §4.2, RFC 3463 enhanced codes).

A :class:`Reply` is a leaf: it imports nothing from the rest of triomail, so errors,
results and the parser can all name it without a cycle. Bytes become replies in
:mod:`.parser`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Reply"]

# RFC 3463 §2: class.subject.detail, ASCII digits only (``\d`` would take any Unicode digit).
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |\Z)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: the basic code, the text of each line, the enhanced code if any."""

    code: int
    lines: tuple[str, ...] = ("",)
    enhanced: tuple[int, int, int] | None = None

    @classmethod
    def from_lines(cls, code: int, lines: tuple[str, ...]) -> Reply:
        """Build a reply, parsing an RFC 3463 enhanced code whose class matches the code."""
        enhanced = None
        m = _ENHANCED.match(lines[0]) if lines else None
        if m is not None and int(m.group(1)) == code // 100:  # R31: class must match
            enhanced = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        return cls(code, lines, enhanced)

    @property
    def text(self) -> str:
        """The reply text, lines joined by newlines, without the enhanced code."""
        if self.enhanced is None:
            return "\n".join(self.lines)
        return "\n".join(self._strip_enhanced(line) for line in self.lines)

    def _strip_enhanced(self, line: str) -> str:
        # Strip the code as the server spelled it (``5.01.1`` is the code 5.1.1).
        m = _ENHANCED.match(line)
        if m is None or tuple(int(g) for g in m.groups()) != self.enhanced:
            return line
        return line[m.end() :].lstrip(" ")

    @property
    def enhanced_code(self) -> str | None:
        """The enhanced status code as text, such as ``"5.1.1"``."""
        return None if self.enhanced is None else "{}.{}.{}".format(*self.enhanced)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced_code} " if self.enhanced else f"{self.code} "
        return head + self.text.replace("\n", " / ")
