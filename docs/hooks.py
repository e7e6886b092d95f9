"""MkDocs hook: show the docstrings' Sphinx cross-reference roles as plain code.

The docstrings mark names the Sphinx way (``:class:`SMTPError```); mkdocstrings renders
the backticks as code but leaves the role in front of it. Dropping the role (and the
``~`` that asks Sphinx for the short name) keeps the reference readable. Listed as
``hooks`` in mkdocs.yml and excluded from the pages with ``exclude_docs``.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):(<code>)~?")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
