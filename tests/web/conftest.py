"""Fixtures for the web view's tests (helpers in ``webtools``).

- ``chrome``: one headless Debian Chromium for the session, driven by Selenium through
  /usr/bin/chromedriver (never Selenium Manager, which would try the network); skipped,
  with the reason, only when the browser cannot start. ``browser`` wraps it per test;
  its screenshots go to a temporary folder, or to ``$TRIOMAIL_SCREENSHOTS``
  (``TRIOMAIL_SCREENSHOTS=docs/img`` refreshes the ones docs/web.md shows).
- ``spy``: a :class:`webtools.Spy` on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from webtools import CHROME_ARGS, CHROMEDRIVER, PAGE_BODY, PIXEL, Browser, Spy


@pytest.fixture(scope="session")
def chrome() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:  # pragma: no cover - selenium is in the test extra
        pytest.skip(f"selenium is not installed: {exc}")
    if shutil.which("chromium") is None or not Path(CHROMEDRIVER).exists():
        pytest.skip(
            f"no chromium or {CHROMEDRIVER}: .ci/run installs the Debian packages chromium and chromium-driver"
        )
    profile = tempfile.mkdtemp(prefix="triomail-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in (*CHROME_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium did not start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chrome: Any, tmp_path_factory: pytest.TempPathFactory) -> Browser:
    """The session's browser; screenshots go to $TRIOMAIL_SCREENSHOTS or a temporary folder."""
    chrome.delete_all_cookies()
    shots = os.environ.get("TRIOMAIL_SCREENSHOTS")
    return Browser(chrome, Path(shots) if shots else tmp_path_factory.getbasetemp() / "screenshots")


@pytest.fixture
def spy() -> Iterator[Spy]:
    record = Spy()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record.hits[self.path] = record.hits.get(self.path, 0) + 1
            if self.path.startswith("/page"):
                body, kind = PAGE_BODY[0].encode(), "text/html"
            else:
                body, kind = PIXEL, "image/gif"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    record.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=record.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        record.server.shutdown()
        record.server.server_close()
