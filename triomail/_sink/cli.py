"""``triomail sink``: the capture server as a development SMTP server.

Prints ``listening on HOST:PORT`` as its first line (so ``--port 0`` can be used
by scripts), then one line per message; stops cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._web.cli import SinkWeb
    from .message import CapturedMessage

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sink`` subcommand."""
    parser = subparsers.add_parser(
        "sink",
        help="run a development SMTP server that captures mail",
        description="Run an SMTP server that accepts and shows every message, "
        "optionally saving each as an .eml file. Stops on Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument(
        "--port", type=int, default=1025, help="port (%(default)s); 0 picks a free one"
    )
    parser.add_argument("--out", metavar="DIR", type=Path, help="write each message to DIR/*.eml")
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offer STARTTLS with a throwaway certificate (default: on if trustme is installed)",
    )
    parser.add_argument(
        "--implicit-tls", action="store_true", help="TLS from the first byte (as on port 465)"
    )
    parser.add_argument(
        "--auth",
        metavar="USER:PASS",
        action="append",
        type=_credentials,
        help="accept AUTH PLAIN/LOGIN with these credentials (repeatable)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PATH",
        type=Path,
        help="write the throwaway CA certificate here (default: a temporary file)",
    )
    policy = parser.add_argument_group("pipelining policies of hardened servers (issue 17)")
    policy.add_argument(
        "--refuse-pipelined-after-data",
        action="store_true",
        help="answer every command pipelined behind an end of data with 503, as Haraka does",
    )
    policy.add_argument(
        "--forbid-unauth-pipelining",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer a command with input pipelined behind it where RFC 2920 does not allow "
        "that with 554 and close, as Postfix's smtpd_forbid_unauth_pipelining does (default: on)",
    )
    _add_web_options(parser)
    parser.set_defaults(func=run)


def _add_web_options(parser: argparse.ArgumentParser) -> None:
    """``--web`` and its options: the web view, in ``triomail._web`` (no heavy imports)."""
    from .._web.cli import add_web_options

    add_web_options(parser, required_address=False)


def _web_page(args: argparse.Namespace) -> SinkWeb | None:
    """The ``--web`` page (``triomail._web``, imported only when asked for), or None."""
    if args.web is None:
        return None
    from .._web.cli import SinkWeb

    return SinkWeb(args)


def _credentials(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; return the exit status."""
    import trio

    try:
        return trio.run(_serve, args)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        return 0
    except BaseExceptionGroup as group:
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:
            return 0
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"triomail sink: {exc}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace) -> int:
    import trio

    from .server import SMTPSink

    auth = dict(args.auth or [])
    tls = args.tls if args.tls is not None else None
    if args.implicit_tls and tls is None:
        tls = True
    web = _web_page(args)
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        tempfile.TemporaryDirectory(prefix="triomail-sink-") as scratch,
    ):
        sink = SMTPSink(
            host=args.host,
            port=args.port,
            tls=tls,
            implicit_tls=args.implicit_tls,
            auth=auth,
            # A development server on the user's own machine: allow AUTH in clear
            # text when TLS is switched off rather than refusing to start.
            allow_insecure_auth=tls is False,
            refuse_pipelined_after_data=args.refuse_pipelined_after_data,
            forbid_unauth_pipelining=args.forbid_unauth_pipelining,
            out_dir=args.out,
            store=False,
            on_message=_print_message if web is None else web.hook(_print_message),
        )
        page = web.serving() if web is not None else contextlib.nullcontext()
        async with sink, page as url:
            print(f"listening on {sink.host}:{sink.port}", flush=True)
            if url is not None:
                print(f"web view on {url}", flush=True)
            if sink.ca is not None:
                ca_file = args.ca_file or Path(scratch) / "triomail-sink-ca.pem"
                sink.ca.cert_pem.write_to_path(str(ca_file))
                mode = "implicit TLS" if args.implicit_tls else "STARTTLS"
                print(f"{mode} on; CA certificate: {ca_file}", flush=True)
            if auth:
                print(f"AUTH PLAIN LOGIN for: {', '.join(sorted(auth))}", flush=True)
            if args.out is not None:
                print(f"writing messages to {args.out}", flush=True)
            async for _ in signals:
                break
            print(f"stopped after {sink.received} message(s)", file=sys.stderr, flush=True)
    return 0


def _print_message(message: CapturedMessage) -> None:
    from email.parser import BytesHeaderParser
    from email.policy import default

    headers = BytesHeaderParser(policy=default).parsebytes(message.data)
    subject = headers.get("Subject")
    recipients = ",".join(f"<{rcpt}>" for rcpt in message.rcpt_to)
    # repr() escapes control characters a client may have put in the subject.
    subject_text = repr(str(subject)) if subject is not None else "-"
    print(
        f"from=<{message.mail_from}> to={recipients} size={len(message.data)} "
        f"subject={subject_text}",
        flush=True,
    )
