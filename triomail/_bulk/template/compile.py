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
from .addresses import (
    BRACKETED_FIELDS,
    CONTROL_IN_VALUE,
    address_template,
    bracketed_values,
    check_bracketed,
    escape_value,
    split_marked,
    strip_marks,
    unescape,
    value_text,
)
from .headers import ADDRESS_FIELDS, check_header_value
from .mime import confine_attachment
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
                values = [row[name] for name in names]
                if not all(type(v) is str for v in values):
                    values = [value_text(v) for v in values]  # JSON: numbers, null
                return values
            except KeyError:
                pass
        values = strip_marks(self.template.render(row)).split(_SEP)
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
    #: Where attachment paths from row data must stay (the template's directory).
    attachments_root: Path
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

        Values came through :func:`.addresses.escape_value`, so each is marked: in an
        address field it fills the slot the template gave it (:mod:`.addresses`), a
        line break from it is refused in a header (R15) and restored in the body.
        """
        parsed = parse_pieces([raw])
        if parsed is None:
            raise RowError("the rendered template is not header fields, a blank line, a body")
        fields, body_pieces = parsed
        for f in fields:
            text = join_pieces(f.pieces, [])
            if f.key == "attachment" and "\x00" in text:
                confine_attachment(self.attachments_root, self.path.parent, unescape(text))
            if f.key in ADDRESS_FIELDS and "\x00" in text:
                check_header_value(f.name, strip_marks(text))
                pieces, values = split_marked(text)
                text = ", ".join(address_template(pieces, f.name).fill(values).tokens)
            else:
                if f.key in BRACKETED_FIELDS and "\x00" in text:
                    pieces, values = split_marked(text)
                    check_bracketed(f.name, bracketed_values(pieces), values)
                text = strip_marks(text)
            check_header_value(f.name, text)
            f.pieces = [text] if text else []
        body = [unescape(p) if isinstance(p, str) else p for p in body_pieces]
        try:
            plan = build_plan(fields, body, self.path.parent, self.attachments_root)
        except PlanError:
            head = "".join(f"{f.name}: {join_pieces(f.pieces, [])}\n" for f in fields)
            raw = head + "\n" + join_pieces(body, [])
            return render_with_email(raw, self.path.parent, message_id)
        except TemplateError as exc:
            raise RowError(str(exc)) from None
        return render_plan(plan, [], message_id)

    def _self_check(self, row: Mapping[str, Any], values: list[str]) -> None:
        """The interleaved pieces must equal Jinja2's own rendering, once."""
        if any(CONTROL_IN_VALUE.search(v) for v in values):
            return  # such values render escaped; check with a later row
        self._checked = True
        expected = strip_marks(self._full.render(row))
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


def _with_headers(source: str, headers: Sequence[str]) -> str:
    """``headers`` in front of the template's, unless it writes one of them itself."""
    own = {
        line.partition(":")[0].strip().lower()
        for line in source.split("\n\n", 1)[0].split("\n")
        if ":" in line and line[:1] not in (" ", "\t")
    }
    for line in headers:
        name = line.partition(":")[0]
        if name.lower() in own:
            raise TemplateError(
                f"the template writes {name} itself, and the command line adds one: keep one"
            )
    return "".join(f"{line}\n" for line in headers) + source


def compile_template(
    path: str | os.PathLike[str],
    attachments_dir: str | os.PathLike[str] | None = None,
    headers: Sequence[str] = (),
) -> CompiledTemplate:
    """Read and compile a template file; raises :class:`TemplateError`.

    ``attachments_dir``: where an attachment path built from a row's values must lead
    (default: the template's directory). ``headers``: template lines (``Name: value``,
    Jinja2 allowed) put in front of the template's own header fields, as if it had
    them (``--unsubscribe``, ``--bounce-address``); a field the template writes itself
    as well is a :class:`TemplateError`.
    """
    path = Path(path)
    root = path.parent.resolve() if attachments_dir is None else Path(attachments_dir).resolve()
    try:
        source = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TemplateError(f"cannot read template {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"template {path} is not UTF-8: {exc}") from None
    source = source.replace("\r\n", "\n")
    if headers:
        source = _with_headers(source, headers)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=escape_value,
    )
    try:
        full = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        lineno = max(1, (exc.lineno or 1) - len(headers))
        raise TemplateError(f"{path}:{lineno}: {exc.message}") from None
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
                plan = build_plan(fields, body, path.parent.resolve(), root)
                values = _Values.compile(env, exprs)
                mode = "compiled"
            except PlanError:
                plan = None
    if plan is not None and plan.constant_attachments:
        for att in plan.constant_attachments:
            digest = hashlib.sha256((digest + att.digest).encode()).hexdigest()
    return CompiledTemplate(
        path=path.resolve(),
        source=source,
        digest=digest[:32],
        _full=full,
        _values=values,
        _pieces=pieces,
        _plan=plan,
        attachments_root=root,
        mode=mode,
    )
