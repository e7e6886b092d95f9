"""The render process itself: rows read, rendered and written to the pipe in frames.

The protocol, and why the work is split this way, are described in
:mod:`.render_process` (the parent's side). This module runs in the child, started
without the package's ``__init__``: it imports neither trio nor the pool. The template
compiler (Jinja2, markdown) is imported inside :func:`child_main`, so that an import
error there, like any other error, reaches the parent as an ``error`` frame.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from .recipients import BadRow, RecipientsReader
from .records import (
    FIRST_BATCH,
    MAX_BATCH,
    WireRecord,
    encode_bad,
    encode_refused,
    encode_rendered,
)
from .render_process import PROTOCOL, default_message_id
from .template.rendered import RowError

__all__ = ["child_main"]

#: A frame holds FIRST_BATCH rows at first, up to MAX_BATCH (:mod:`.records`), or fewer
#: once it holds this many bytes of messages.
MAX_FRAME_BYTES = 512 * 1024


def _write(fd: int, kind: str, body: Any) -> None:
    payload = marshal.dumps((kind, body))
    view = memoryview(len(payload).to_bytes(4, "big") + payload)
    while view:
        view = view[os.write(fd, view) :]


class _Commands:
    """The parent's lines on our stdin: read whole lines, without waiting if asked."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.closed = False

    def line(self, *, wait: bool) -> str | None:
        while b"\n" not in self.buffer:
            if self.closed:
                return None
            if not wait and not select.select([self.fd], [], [], 0)[0]:
                return None
            data = os.read(self.fd, 4096)
            if not data:
                self.closed = True
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("ascii", "replace")


def _frames(
    rows: Iterator[Any], render: Any, campaign: str, domain: str, commands: _Commands
) -> Iterator[list[WireRecord]]:
    batch: list[WireRecord] = []
    size = 0
    limit = FIRST_BATCH
    skip = 0  # rows up to this line were read by the parent itself
    for item in rows:
        if item.line <= skip:
            continue
        if isinstance(item, BadRow):
            batch.append(encode_bad(item))
        else:
            try:
                r = render(item.fields, message_id=default_message_id(item.key, campaign, domain))
            except RowError as exc:
                batch.append(encode_refused(item, str(exc)))
            else:
                size += len(r.data)
                batch.append(encode_rendered(item, r))
        if len(batch) >= limit or size >= MAX_FRAME_BYTES:
            yield batch
            batch = []
            size = 0
            limit = min(MAX_BATCH, limit * 2)
            if not commands.closed:
                command = commands.line(wait=False)
                if command is not None and command.startswith("skip "):
                    skip = int(command[5:])
    if batch:
        yield batch


def child_main(argv: Sequence[str]) -> int:
    """The render process: ``TEMPLATE RECIPIENTS [ATTACHMENTS_DIR ENCODING [HEADER...]]``
    ("" for the default); DKIM keys and the Message-ID parts on stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.fileno()
    try:
        from .template.compile import compile_template  # Jinja2 (see the header)

        template_path, recipients_path, *options = argv
        attachments_dir, encoding, *headers = [*options, "", ""][: max(2, len(options))]
        template = compile_template(template_path, attachments_dir or None, headers)
        reader = RecipientsReader.open(recipients_path, encoding or None)
        rows = iter(reader)
        commands = _Commands(sys.stdin.fileno())
        keys = []
        while (text := commands.line(wait=True) or "").startswith("dkim "):
            keys.append(text)
        line = text.split()
        if not line:
            return 0  # the parent went away (or did not need us) before the start
        version, campaign, domain, digest = line
        if version != str(PROTOCOL):
            raise RuntimeError(f"protocol {version}, expected {PROTOCOL}")
        if digest != template.digest:
            raise RuntimeError(f"the template {template_path} changed while starting")
        render = template.render
        if keys:
            from .deliver import DKIMKey, signed, signer_of  # cryptography: only to sign

            render = signed(render, signer_of([DKIMKey.from_line(k) for k in keys]))
        count = 0
        for batch in _frames(rows, render, campaign, domain, commands):
            _write(out, "rows", batch)
            count += len(batch)
        _write(out, "end", count)
        return 0
    except BrokenPipeError:
        return 0  # the parent stopped reading: it needs no more rows
    except BaseException as exc:
        text = str(exc) or type(exc).__name__
        with contextlib.suppress(OSError):
            _write(out, "error", " ".join(f"{type(exc).__name__}: {text}".split())[:2000])
        return 1
