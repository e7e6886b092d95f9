"""``triomail view DIR`` and the ``--web`` options of ``triomail sink``.

This module is imported when the command line is built, so it imports nothing
heavy: Starlette, Hypercorn and dkimpy (the ``web`` extra) are imported only when a
page is served. The options are written once, here, for both commands.

A page on a non-loopback address shows captured mail to the network, so it needs
``--web-password`` (HTTP basic auth) or an explicit ``--web-insecure``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triomail.testing import CapturedMessage


__all__ = ["SinkWeb", "add_web_options", "register"]

#: The modules of the ``web`` extra that serving the page imports.
WEB_EXTRA = ("starlette", "hypercorn", "dkim")
#: Where ``triomail view`` serves when not told (Mailpit's and MailHog's web port).
VIEW_ADDRESS = "127.0.0.1:8025"


def add_web_options(parser: argparse.ArgumentParser, *, required_address: bool) -> None:
    """``--web [HOST:]PORT``, ``--web-password``, ``--web-insecure``, ``--dkim-keys``."""
    parser.add_argument(
        "--web",
        metavar="[HOST:]PORT",
        type=_address,
        default=_address(VIEW_ADDRESS) if required_address else None,
        help="serve the web view here (host 127.0.0.1 unless given; port 0 picks one)"
        + (f"; default {VIEW_ADDRESS}" if required_address else ""),
    )
    parser.add_argument(
        "--web-password",
        metavar="PASSWORD",
        help="require this password (HTTP basic auth, any user name) for the web view",
    )
    parser.add_argument(
        "--web-insecure",
        action="store_true",
        help="allow the web view on a non-loopback address without a password",
    )
    parser.add_argument(
        "--dkim-keys",
        metavar="DIR",
        type=Path,
        help="verify DKIM signatures with the public keys in DIR "
        "(files named SELECTOR._domainkey.DOMAIN.txt)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``view`` subcommand."""
    parser = subparsers.add_parser(
        "view",
        help="show a folder of .eml files in the web view",
        description="Serve the capture server's web page over a folder of .eml files "
        "(from `triomail sink --out DIR` or `triomail send --dry-run --sink DIR`). "
        "Stops on Ctrl-C.",
    )
    parser.add_argument("folder", metavar="DIR", type=Path, help="folder of .eml files")
    add_web_options(parser, required_address=True)
    parser.set_defaults(func=run_view)


def run_view(args: argparse.Namespace) -> int:
    """Serve the folder until interrupted; return the exit status."""
    import trio

    if not args.folder.is_dir():
        print(f"triomail view: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        _check(args)
        trio.run(_view, args)
    except ValueError as exc:
        print(f"triomail view: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"triomail view: {exc}", file=sys.stderr)
        return 1
    return 0


async def _view(args: argparse.Namespace) -> None:
    import signal

    import trio

    from .serve import open_web
    from .store import FolderStore

    store = FolderStore(args.folder, args.dkim_keys)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        host, port = args.web
        async with open_web(store, host, port, args.web_password) as url:
            print(f"web view on {url} ({len(store.ids())} messages in {args.folder})", flush=True)
            async for _ in signals:
                break


class SinkWeb:
    """``triomail sink --web``: a store fed by the sink, and the page over it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .store import LiveStore

        _check(args)
        self.args = args
        self.store: LiveStore = LiveStore(args.dkim_keys)

    def hook(self, then: Callable[[CapturedMessage], object]) -> Callable[[CapturedMessage], None]:
        """The sink's ``on_message``: feed the page's store, then call ``then``."""
        from .serve import chain

        return chain(self.store, then)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Serve the page while the sink runs; yield its URL."""
        from .serve import open_web

        host, port = self.args.web
        async with open_web(self.store, host, port, self.args.web_password) as url:
            yield url


def _check(args: argparse.Namespace) -> None:
    import importlib.util

    missing = [name for name in WEB_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"the web view needs {missing}: pip install 'triomail[web]'")
    from .app import is_loopback

    host, _ = args.web
    if not is_loopback(host) and args.web_password is None and not args.web_insecure:
        raise ValueError(
            f"--web on {host} (not loopback) shows captured mail to the network: "
            "give --web-password, or --web-insecure"
        )


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {number}")
    return host.strip("[]") or "127.0.0.1", number
