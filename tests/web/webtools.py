"""Helpers for the web view's tests: the browser wrapper, plain HTTP, SMTP, a spy server.

- :class:`Browser`: a Selenium driver whose calls block; the page's server runs in the
  test's own trio run, so every call goes through ``await browser.run(...)`` (a worker
  thread).
- :func:`http`: plain HTTP from the standard library, also in a worker thread.
- :func:`sent`: hand a message to a sink with smtplib.
- :class:`Spy`: a loopback HTTP server that counts the requests it gets (remote images,
  beacons a script or handler would send), and serves :data:`PAGE_BODY` at ``/page``.
"""

from __future__ import annotations

import json
import smtplib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


class Browser:
    """A Selenium driver whose blocking calls run in a worker thread."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(function, *args)

    async def wait(self, condition: Callable[[Any], T], timeout: float = 10.0) -> T:
        """Poll ``condition(driver)`` until it returns something true."""
        from selenium.webdriver.support.ui import WebDriverWait

        return await self.run(lambda: WebDriverWait(self.driver, timeout).until(condition))

    async def shot(self, name: str) -> Path:
        """Save a screenshot as NAME.png in :attr:`shots`."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        await self.run(self.driver.save_screenshot, str(path))
        return path


@dataclass
class Reply:
    status: int
    headers: Message  # case-insensitive, as HTTP header names are
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _request(method: str, url: str, headers: dict[str, str]) -> Reply:
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


async def http(method: str, url: str, **headers: str) -> Reply:
    """One plain HTTP request (urllib, in a worker thread)."""
    return await trio.to_thread.run_sync(_request, method, url, headers)


async def sent(port: int, data: bytes, to: str = "rcpt@example.net") -> None:
    """Send ``data`` to a sink on 127.0.0.1:``port`` without TLS."""

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("sender@example.org", [to], data, mail_options=["BODY=8BITMIME"])

    await trio.to_thread.run_sync(send)


@dataclass
class Spy:
    """A loopback HTTP server that counts requests per path."""

    hits: dict[str, int] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, prefix: str) -> int:
        return sum(n for path, n in self.hits.items() if path.startswith(prefix))


#: A 1x1 transparent GIF.
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


#: What the spy serves at /page (a test puts hostile HTML here to open it unsandboxed).
PAGE_BODY = [""]
