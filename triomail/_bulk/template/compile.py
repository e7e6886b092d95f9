"""Mailmerge-compatible message templates, compiled once and rendered to bytes per row.

Theory of operation
-------------------
A template is a Jinja2 file holding an RFC 5322 message: header lines, a blank line,
a body (the mailmerge format). ``Content-Type: text/markdown`` turns the body into a
text/plain + text/html ``multipart/alternative``; ``ATTACHMENT:`` pseudo-headers attach
files; everything is wrapped the way mailmerge wraps it (``multipart/related`` at the
top when there is more than one part), so the same template and database give the
same messages.

Building an :class:`email.message.EmailMessage` per row costs about a millisecond, so
:func:`compile_template` does the expensive work once:

* The Jinja2 token stream is cut into *literal* pieces and *expression* pieces
  (``{{ ... }}``, :mod:`.parse`). One small Jinja2 template that renders only the
  expressions, joined by a separator, is compiled; per row it is rendered once and
  split, and the message is the literals interleaved with the values (:class:`_Values`).
  The first row is checked against a full Jinja2 render, so any difference falls back
  to rendering the whole template per row.
* The header section is parsed once into fields and planned (:mod:`.plan`): a field
  without expressions is encoded once (:mod:`.headers`). Per row only fields with
  values are encoded (:mod:`.render`). A value holding CR, LF or another control
  character is refused for that row: no header injection through a field (R15).
* A markdown body is converted to HTML once (:mod:`.markdown`) with a placeholder for
  each expression; per row the values are put into the HTML directly when they are
  plain text that markdown would pass through unchanged; otherwise that row's body
  goes through markdown like mailmerge does.
* Attachments are read and base64-encoded once per file; MIME boundaries and part
  headers are constant bytes (:mod:`.mime`).

Templates with ``{% %}`` statements, or whose header names come from expressions, are
rendered whole per row by Jinja2 and parsed per row (the same code, slower). Templates
that write their own ``multipart/*`` body are handled through the :mod:`email`
package, as mailmerge does (:func:`.render.render_with_email`).

This package's modules, in the order they are used: :mod:`.parse`, :mod:`.headers`,
:mod:`.mime`, :mod:`.markdown`, :mod:`.plan` (compile time), :mod:`.render` (per row),
:mod:`.rendered` (the result, light enough for the render process's codec).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions

from ..._core.errors import LocalProtocolError
from .headers import CONTROL_IN_VALUE, check_header_value, escape_value, unescape
from .parse import Piece, join_pieces, parse_pieces
from .plan import Plan, PlanError, build_plan
from .render import render_plan, render_with_email
from .rendered import Rendered, RowError, TemplateError

_SEP = "\x00"


_JINJA_NAMES = frozenset(
    {"true", "false", "none", "True", "False", "None", "loop", "self", "varargs", "kwargs"}
)


@dataclass(slots=True)
class _Values:
    """The values of a template's expressions for one row.

    Plain names (``{{ email }}``, by far the most common) are looked up directly; any
    other expression is rendered by one small Jinja2 template that joins the values
    with NUL. A row that lacks a name goes through Jinja2 too (for its error message).
    """

    template: jinja2.Template
    count: int
    names: tuple[str, ...] | None

    def render(self, row: Mapping[str, Any]) -> list[str] | None:
        if not self.count:
            return []
        names = self.names
        if names is not None:
            try:
                return [str(row[name]) for name in names]
            except KeyError:
                pass
        values = self.template.render(row).split(_SEP)
        return values if len(values) == self.count else None

    @classmethod
    def compile(cls, env: jinja2.Environment, exprs: Sequence[str]) -> _Values:
        source = _SEP.join("{{" + e + "}}" for e in exprs)
        stripped = [e.strip() for e in exprs]
        plain = all(e.isidentifier() and e not in _JINJA_NAMES for e in stripped)
        return cls(env.from_string(source), len(exprs), tuple(stripped) if plain else None)


@dataclass(slots=True)
class CompiledTemplate:
    """A template compiled once; :meth:`render` turns one row into message bytes."""

    path: Path
    source: str
    #: Hash of the template text and its constant attachments (the journal's content hash).
    digest: str
    _full: jinja2.Template
    _values: _Values | None
    _pieces: list[Piece]
    _plan: Plan | None
    _checked: bool = False
    mode: str = "compiled"

    def sender_domain(self) -> str | None:
        """The domain of a constant From address (for Message-IDs), if there is one."""
        if self._plan is None:
            return None
        for header in self._plan.headers:
            if header.field is self._plan.from_field and header.addresses is not None:
                addresses = header.addresses.addresses
                if addresses:
                    return addresses[0].rpartition("@")[2]
        return None

    def render(self, row: Mapping[str, Any], *, message_id: str) -> Rendered:
        """Render one row; raises :class:`RowError` for a row that cannot be sent."""
        try:
            return self._render(row, message_id)
        except jinja2.exceptions.UndefinedError as exc:
            raise RowError(f"template: {exc.message}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise RowError(f"template: {exc}") from None
        except LocalProtocolError as exc:
            raise RowError(str(exc)) from None
        except UnicodeEncodeError as exc:
            raise RowError(f"cannot encode: {exc}") from None

    def _render(self, row: Mapping[str, Any], message_id: str) -> Rendered:
        if self._plan is not None and self._values is not None:
            values = self._values.render(row)
            if values is not None:
                if not self._checked:
                    self._self_check(row, values)
                if self._plan is not None:
                    return render_plan(self._plan, values, message_id)
        raw = self._full.render(row)
        return self.render_text(raw, message_id)

    def render_text(self, raw: str, message_id: str) -> Rendered:
        """Render a fully expanded template text (the slow path).

        Values came through :func:`escape_value`, so a line break from a field is
        still marked: in a header it is refused (R15), in the body it is restored.
        """
        parsed = parse_pieces([raw])
        if parsed is None:
            raise RowError("the rendered template is not header fields, a blank line, a body")
        fields, body = parsed
        for f in fields:
            check_header_value(f.name, join_pieces(f.pieces, []))
        body = [unescape(p) if isinstance(p, str) else p for p in body]
        try:
            plan = build_plan(fields, body, self.path.parent)
        except PlanError:
            head, sep, rest = raw.partition("\n\n")
            return render_with_email(head + sep + unescape(rest), self.path.parent, message_id)
        except TemplateError as exc:
            raise RowError(str(exc)) from None
        return render_plan(plan, [], message_id)

    def _self_check(self, row: Mapping[str, Any], values: list[str]) -> None:
        """The interleaved pieces must equal Jinja2's own rendering, once."""
        if any(CONTROL_IN_VALUE.search(v) for v in values):
            return  # such values render escaped; check with a later row
        self._checked = True
        expected = self._full.render(row)
        if join_pieces(self._pieces, values) != expected:
            self._plan = None
            self.mode = "per-row"


def _tokens(env: jinja2.Environment, source: str) -> tuple[list[Piece], list[str]] | None:
    """Literal and expression pieces, or None if the template has statements."""
    pieces: list[Piece] = []
    exprs: list[str] = []
    current: list[str] | None = None
    for _, kind, value in env.lex(source):
        if current is not None:
            if kind == "variable_end":
                exprs.append("".join(current))
                pieces.append(len(exprs) - 1)
                current = None
            else:
                current.append(value)
            continue
        if kind == "data":
            if pieces and isinstance(pieces[-1], str):
                pieces[-1] += value
            else:
                pieces.append(value)
        elif kind == "variable_begin":
            current = []
        elif kind in ("comment_begin", "comment", "comment_end", "whitespace"):
            continue
        else:
            return None
    return pieces, exprs


def compile_template(path: str | os.PathLike[str]) -> CompiledTemplate:
    """Read and compile a template file; raises :class:`TemplateError`."""
    path = Path(path)
    try:
        source = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TemplateError(f"cannot read template {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"template {path} is not UTF-8: {exc}") from None
    source = source.replace("\r\n", "\n")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=escape_value,
    )
    try:
        full = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"{path}:{exc.lineno}: {exc.message}") from None
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    tokens = _tokens(env, source)
    values = None
    plan = None
    pieces: list[Piece] = []
    mode = "per-row"
    if tokens is not None:
        pieces, exprs = tokens
        parsed = parse_pieces(pieces)
        if parsed is not None:
            fields, body = parsed
            try:
                plan = build_plan(fields, body, path.parent.resolve())
                values = _Values.compile(env, exprs)
                mode = "compiled"
            except PlanError:
                plan = None
    if plan is not None and plan.constant_attachments:
        for att in plan.constant_attachments:
            digest = hashlib.sha256((digest + att.content_id[:16]).encode()).hexdigest()
    return CompiledTemplate(
        path=path.resolve(),
        source=source,
        digest=digest[:32],
        _full=full,
        _values=values,
        _pieces=pieces,
        _plan=plan,
        mode=mode,
    )
