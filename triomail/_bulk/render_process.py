"""``triomail send``'s render process: rows rendered on another CPU, streamed over a pipe.

Theory of operation
-------------------
On a machine with more than one CPU, ``triomail send`` starts this module in a
second Python process as early as it can (:meth:`RenderProcess.start`), so that the
child's start-up (Jinja2, markdown, the template) overlaps the parent's own. The
child reads the recipients file, renders every row to its canonical bytes and
envelope (:meth:`CompiledTemplate.render`) and writes the results to its stdout, a
pipe, in length-prefixed :mod:`marshal` frames of up to a few hundred rows. The
parent reads the pipe with trio (``wait_readable`` on a non-blocking fd) and only plans
(journal, ``--resume``, duplicates, ``--limit``), sends and settles. The pipe is the
backpressure: when the parent is behind, the child blocks in ``write``, so memory
stays bounded whatever the size of the file.

The child does not know the journal. It renders every row with the default
Message-ID (``<key.campaign@domain>``: the parent sends the campaign and the domain
on the child's stdin once its journal is open) and sends each row's key, line and
fields with the result, so the parent decides per row as it does without a child,
and renders a row itself in the rare case where the journal holds another
Message-ID for it.

The child (:mod:`.render_child`) is started without the package's ``__init__`` (it
needs neither trio nor the pool), ignores SIGINT (the parent decides when it ends),
and ends by itself when the parent goes away (EOF on stdin before it starts, a broken
pipe after). Its stderr is the parent's, but it writes nothing there: an error becomes
an ``error`` frame. A child that dies, or writes something that is not a frame, is a
:class:`RenderProcessError` in the parent with a one-line message.

Frames: a 4-byte big-endian length, then ``marshal.dumps((kind, body))`` with kind

* ``"rows"``: a list of records, in file order (their layouts: :mod:`.records`);
* ``"end"``: the number of records sent (the file was read to its end);
* ``"error"``: a one-line message (the child stops).

Commands on the child's stdin, one per line: first ``dkim DOMAIN SELECTOR PEM`` for each
DKIM key (``PEM`` in base64: the key travels on this private pipe, never on a command
line; :mod:`.deliver`), then ``PROTOCOL CAMPAIGN DOMAIN DIGEST`` (start;
the digest is the template's as the parent compiled it),
then, if the parent renders the first rows itself (``--render auto``), ``skip LINE``:
rows up to that line need not be rendered (checked between frames; records of such
rows already sent are dropped by the parent).

trio is imported inside the parent's methods only: the child imports this module too
(for ``PROTOCOL`` and :func:`default_message_id`) and never needs trio, whose import
would add to the child's start-up, which the parent waits for.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from .records import WireRecord, valid

__all__ = [
    "NOT_READY",
    "PROTOCOL",
    "RenderProcess",
    "RenderProcessError",
    "default_message_id",
]

#: Bumped whenever the frame format changes (the parent and the child are one version).
PROTOCOL = 5
#: A frame larger than this is garbage, not a batch of rows.
MAX_FRAME = 64 * 1024 * 1024
#: The pipe's capacity (Linux may cap it lower: /proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1024 * 1024

# The child imports the package's modules without running its __init__ (trio, the
# pool): an empty package object whose __path__ is the package directory.
_BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('triomail')\n"
    "package.__path__ = [sys.argv[1]]\n"
    "sys.modules.setdefault('triomail', package)\n"
    "from triomail._bulk.render_child import child_main\n"
    "raise SystemExit(child_main(sys.argv[2:]))\n"
)


class RenderProcessError(Exception):
    """The render process failed, died, or wrote something that is not a frame."""


class _EndOfPipe(Exception):
    """The render process closed its end of the pipe."""


def default_message_id(key: str, campaign: str, domain: str) -> str:
    """The Message-ID of a row the journal does not know yet (stable across runs)."""
    return f"<{key}.{campaign}@{domain}>"


# ------------------------------------------------------------------------ the parent


class _NotReady:
    def __repr__(self) -> str:
        return "NOT_READY"


#: :meth:`RenderProcess.poll`: no complete batch has arrived yet.
NOT_READY: Final = _NotReady()


class RenderProcess:
    """The parent's handle on a render process: start, :meth:`begin`, receive, close."""

    def __init__(self, proc: subprocess.Popen[bytes], read_fd: int) -> None:
        self.proc = proc
        self._fd: int | None = read_fd
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins in _buffer
        self._records = 0
        self.finished = False

    @classmethod
    def start(
        cls,
        template: Path,
        recipients: Path,
        attachments_dir: Path | None = None,
        encoding: str | None = None,
        headers: Sequence[str] = (),
    ) -> RenderProcess:
        """Start the child; it compiles the template and opens the file meanwhile.

        ``headers``: template lines added in front of the template's (``compile_template``).
        """
        package = str(Path(__file__).resolve().parents[1])  # triomail/, not triomail/_bulk/
        argv = [sys.executable, "-P", "-c", _BOOTSTRAP, package, str(template), str(recipients)]
        argv += [str(attachments_dir or ""), encoding or "", *headers]
        return cls.spawn(argv)

    @classmethod
    def spawn(cls, argv: Sequence[str]) -> RenderProcess:
        """Start ``argv`` with its stdout on a pipe to us (tests give other commands)."""
        read_fd, write_fd = os.pipe()
        try:
            with contextlib.suppress(OSError, AttributeError):
                import fcntl

                fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            os.set_blocking(read_fd, False)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=write_fd, close_fds=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(proc, read_fd)

    def begin(
        self,
        campaign: str,
        domain: str,
        digest: str,
        *,
        more: bool = False,
        keys: Sequence[str] = (),
    ) -> None:
        """Tell the child the Message-ID parts; it starts rendering.

        ``digest``: the template's, as compiled here (the child refuses to render
        another version of it). ``more``: keep its stdin open for a
        :meth:`skip_through` later. ``keys``: the ``dkim`` lines to sign with.
        """
        for line in keys:
            self._command(line, close=False)
        self._command(f"{PROTOCOL} {campaign} {domain} {digest}", close=not more)

    def skip_through(self, line: int) -> None:
        """Rows up to ``line`` were read here: the child need not render them."""
        self._command(f"skip {line}", close=True)

    def _command(self, text: str, *, close: bool) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return
        with contextlib.suppress(OSError):  # a child that died already: seen on receive
            stdin.write(text.encode("ascii") + b"\n")
            stdin.flush()
            if close:
                stdin.close()

    def poll(self) -> list[WireRecord] | _NotReady | None:
        """:meth:`receive` without waiting: :data:`NOT_READY` if no batch is complete."""
        while True:
            if self.finished:
                return None
            got = self._frame()
            if got is not NOT_READY:
                return got
            try:
                if not self._read():
                    return NOT_READY
            except _EndOfPipe:
                raise RenderProcessError(self._died()) from None

    async def receive(self) -> list[WireRecord] | None:
        """The next batch of records, or ``None`` at the end of the file."""
        import trio

        while True:
            if self.finished:
                return None
            got = self._frame()
            if got is not NOT_READY:
                assert not isinstance(got, _NotReady)
                return got
            try:
                more = self._read()
            except _EndOfPipe:
                # The child is gone, or going: give it a moment to say how it ended.
                with trio.move_on_after(2.0):
                    while self.proc.poll() is None:  # noqa: ASYNC110 - no event for a child's exit here
                        await trio.sleep(0.01)
                raise RenderProcessError(self._died()) from None
            if not more:
                assert self._fd is not None
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise RenderProcessError(f"the render process's pipe failed: {exc}") from None
                if self._fd is None:
                    raise RenderProcessError("the render process was closed")

    def _read(self) -> bool:
        """Read what the pipe holds; False if nothing is there yet."""
        if self._fd is None:
            raise RenderProcessError("the render process was closed")
        try:
            data = os.read(self._fd, PIPE_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise RenderProcessError(f"the render process's pipe failed: {exc}") from None
        if not data:
            raise _EndOfPipe
        self._buffer += data
        return True

    def _frame(self) -> list[WireRecord] | _NotReady | None:
        buffer = self._buffer
        start = self._start
        if len(buffer) - start < 4:
            return NOT_READY
        size = int.from_bytes(buffer[start : start + 4], "big")
        if size > MAX_FRAME:
            raise RenderProcessError(self._garbage("a frame length out of range"))
        end = start + 4 + size
        if len(buffer) < end:
            return NOT_READY
        with memoryview(buffer) as view, view[start + 4 : end] as payload:
            records = self._decode(payload)
        # Consumed frames are dropped from the front now and then, not one by one.
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        elif end >= PIPE_SIZE:
            del buffer[:end]
            self._start = 0
        else:
            self._start = end
        return records

    def _decode(self, payload: bytes | memoryview) -> list[WireRecord] | None:
        try:
            kind, body = marshal.loads(payload)
        except (ValueError, EOFError, TypeError):
            raise RenderProcessError(self._garbage("a frame that does not decode")) from None
        if kind == "rows" and type(body) is list and all(valid(r) for r in body):
            self._records += len(body)
            return body
        if kind == "end" and body == self._records:
            self.finished = True
            return None
        if kind == "error" and type(body) is str:
            raise RenderProcessError(" ".join(body.split()) or "an unnamed error")
        raise RenderProcessError(self._garbage(f"an unexpected frame ({str(kind)[:20]!r})"))

    def _garbage(self, what: str) -> str:
        return f"the render process wrote {what}"

    def _died(self) -> str:
        """Why the pipe closed without an "end" frame."""
        status = self.proc.poll()
        if status is None:
            return "the render process closed its pipe without finishing"
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            return f"the render process was killed ({name}) before the end of the file"
        return f"the render process exited (status {status}) before the end of the file"

    def close_pipe(self) -> None:
        """Stop reading: the child gets a broken pipe (call it in the trio run that read)."""
        fd, self._fd = self._fd, None
        self.finished = True
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # not in a trio run: nobody waits on it
                import trio

                trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def close(self) -> None:
        """End the child (if it still runs) and release the pipe; never blocks long."""
        self.close_pipe()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
