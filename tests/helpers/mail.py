"""Small readers of captured mail shared by several test folders."""

from __future__ import annotations

import re


def message_id(data: bytes) -> str:
    """The Message-ID of a raw message (the test fails if it has none)."""
    match = re.search(rb"\r\nMessage-ID: (<[^>\r\n]+>)\r\n", b"\r\n" + data)
    assert match is not None
    return match.group(1).decode()
