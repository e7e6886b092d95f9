"""Markdown bodies: converted to HTML once, inline images linked to their attachments.

The conversion is mailmerge's (python-markdown with ``nl2br``, wrapped in html/body),
imported only for a markdown template. An ``<img src="file">`` naming an attached file
is pointed at that part's ``cid:`` (RFC 2392).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .mime import Attachment

_MARKDOWN: Any = None


def markdown_to_html(text: str) -> str:
    """What mailmerge does: python-markdown with nl2br, wrapped in html/body."""
    global _MARKDOWN
    if _MARKDOWN is None:
        import markdown  # type: ignore[import-untyped]
        from markdown.extensions.nl2br import Nl2BrExtension  # type: ignore[import-untyped]

        # The extension object, not its name: a name makes markdown scan the installed
        # packages' entry points (~20 ms of start-up).
        _MARKDOWN = markdown.Markdown(extensions=[Nl2BrExtension()])
    _MARKDOWN.reset()
    html: str = _MARKDOWN.convert(text)
    return f"<html><body>{html}</body></html>"


# src="file", src='file' or src=file (unquoted, as HTML allows: mailmerge links it too).
_IMG_SRC = re.compile(r"""(<img\b[^>]*?\bsrc=)(?:(["'])([^"']*)\2|([^\s"'>]+))""", re.I)


def link_inline_images(
    html: str, base: Path, attachments: Sequence[Attachment], cids: Sequence[str]
) -> str:
    """Point <img src="file"> at the attachment of that file (mailmerge's cid: links).

    ``cids`` are the attachments' Content-IDs in this message; a file attached twice
    is linked to its last part, as mailmerge does.
    """
    if not attachments or "<img" not in html.lower():
        return html
    by_path = {str(a.path): cid for a, cid in zip(attachments, cids, strict=True)}

    def replace(match: re.Match[str]) -> str:
        quote = match.group(2) or '"'
        src = match.group(3) if match.group(2) else match.group(4)
        if ":" in src.split("/")[0]:
            return match.group(0)
        path = Path(src).expanduser()
        resolved = str((path if path.is_absolute() else base / path).resolve())
        cid = by_path.get(resolved)
        if cid is None:
            return match.group(0)
        return f"{match.group(1)}{quote}cid:{cid}{quote}"

    return _IMG_SRC.sub(replace, html)
