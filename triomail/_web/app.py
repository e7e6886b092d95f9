"""The web view as an ASGI app (Starlette): the page, its JSON API and its event stream.

Theory of operation
===================

Captured mail is hostile input, and the page must show it as a mail client would
without letting it act. Three walls:

1. The page itself never puts message text into HTML: ``static/app.js`` builds the
   DOM with ``textContent`` only, and the page is served with a Content-Security-
   Policy that allows scripts, styles and connections from this server alone.
2. A message's HTML part is served by its own URL (``/api/messages/{id}/html``) with
   ``Content-Security-Policy: sandbox`` (CSP3 §6.3.2.1; no ``allow-scripts``, so no
   script or event handler runs even when the URL is opened directly) and
   ``default-src 'none'``: no remote load at all, images only from ``data:``. The
   page shows it in an ``<iframe sandbox>`` (HTML §4.8.5), which makes it a unique
   opaque origin that cannot reach the page. ``?remote=1`` (the "show remote images"
   button) widens ``img-src`` to http and https, and nothing else.
3. Everything else is served as JSON, as ``text/plain`` (raw source) or as an
   ``application/octet-stream`` download (attachments), all with ``nosniff`` so a
   browser never guesses HTML.

The API under ``/api/`` is the same one the page uses (documented in docs/web.md):
``GET/DELETE /api/messages``, ``GET/DELETE /api/messages/{id}``, ``.../raw``,
``.../html``, ``.../parts/{index}``, ``GET /api/wait?count=N&timeout=S`` and the
server-sent events of ``GET /api/events`` (one ``change`` event per change; the page
then asks for the list again, which keeps search and paging in one place).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import math
import secrets
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .mail import decoded, html_with_inline_images, parse, part_bytes
from .store import Loaded, Store, summarize

__all__ = ["PAGE_POLICY", "build_app", "html_policy", "is_loopback"]

#: The page's own policy: scripts, styles, frames and fetches from this server only.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
#: Page size of the message list when the client does not say, and the most it may ask.
PAGE_SIZE = 50
MAX_PAGE = 500
#: Longest wait /api/wait accepts, and the keep-alive interval of /api/events.
MAX_WAIT = 300.0
KEEP_ALIVE = 15.0
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}


def html_policy(remote_images: bool) -> str:
    """The CSP for a message's HTML part: sandboxed, no scripts, no remote loads."""
    images = "data: http: https:" if remote_images else "data:"
    return (
        f"sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src {images}; "
        "font-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    )


def build_app(store: Store, password: str | None = None, loopback: bool = True) -> ASGIApp:
    """The ASGI app over ``store``; with ``password``, behind HTTP basic auth.

    ``loopback``: the server listens on a loopback address, so requests must name a
    loopback host too (see :class:`_LoopbackHost`).
    """
    api = _Api(store)
    routes = [Route(path, _static, methods=["GET"]) for path in _STATIC]
    routes += [
        Route("/api/messages", api.listing, methods=["GET"]),
        Route("/api/messages", api.delete_all, methods=["DELETE"]),
        Route("/api/messages/{id}", api.one, methods=["GET"]),
        Route("/api/messages/{id}", api.delete, methods=["DELETE"]),
        Route("/api/messages/{id}/raw", api.raw, methods=["GET"]),
        Route("/api/messages/{id}/html", api.html, methods=["GET"]),
        Route("/api/messages/{id}/parts/{index:int}", api.part, methods=["GET"]),
        Route("/api/wait", api.wait, methods=["GET"]),
        Route("/api/events", api.events, methods=["GET"]),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if password is not None:
        middleware.insert(0, Middleware(_BasicAuth, password=password))
    if loopback:
        middleware.insert(0, Middleware(_LoopbackHost))
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={_NotFound: _not_found}
    )


async def _static(request: Request) -> Response:
    name, media_type = _STATIC[request.url.path]
    body = files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


class _Api:
    """The handlers; each looks the message up in the store by the id in the URL."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _load(self, request: Request) -> Loaded:
        loaded = self.store.load(request.path_params["id"])
        if loaded is None:
            raise _NotFound
        return loaded

    async def listing(self, request: Request) -> Response:
        query = request.query_params.get("q", "").strip()
        start = _int(request, "start", 0)
        limit = min(_int(request, "limit", PAGE_SIZE), MAX_PAGE)
        total, rows = self.store.page(query, start, limit)
        return JSONResponse(
            {
                "total": total,
                "start": start,
                "version": self.store.version,
                "messages": [dataclasses.asdict(row) for row in rows],
            }
        )

    async def one(self, request: Request) -> Response:
        loaded = self._load(request)
        parsed = parse(loaded.data)
        summary = summarize(loaded, self.store.dkim_keys, parsed)
        envelope = loaded.envelope
        body: dict[str, Any] = dataclasses.asdict(summary)
        body |= {
            "headers": [[name, decoded(name, value)] for name, value in parsed.message.raw_items()],
            "envelope": None if envelope is None else dataclasses.asdict(envelope),
            "text": parsed.text,
            "has_html": parsed.html is not None,
            "parts": [dataclasses.asdict(a) for a in parsed.attachments],
        }
        return JSONResponse(body)

    async def raw(self, request: Request) -> Response:
        return Response(self._load(request).data, media_type="text/plain; charset=utf-8")

    async def html(self, request: Request) -> Response:
        parsed = parse(self._load(request).data)
        policy = html_policy(request.query_params.get("remote") == "1")
        return Response(
            html_with_inline_images(parsed),
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": policy},
        )

    async def part(self, request: Request) -> Response:
        found = part_bytes(self._load(request).data, request.path_params["index"])
        if found is None:
            raise _NotFound
        content, filename = found
        disposition = f"attachment; filename*=UTF-8''{quote(filename, safe='')}"
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Content-Disposition": disposition},
        )

    async def delete(self, request: Request) -> Response:
        if not self.store.delete(request.path_params["id"]):
            raise _NotFound
        return JSONResponse({"deleted": 1})

    async def delete_all(self, request: Request) -> Response:
        count = len(self.store.ids())
        self.store.delete_all()
        return JSONResponse({"deleted": count})

    async def wait(self, request: Request) -> Response:
        count = _int(request, "count", 1)
        timeout = min(_number(request, "timeout", 10.0), MAX_WAIT)
        with trio.move_on_after(timeout):
            ids = await self.store.wait_for(count)
            return JSONResponse({"ids": ids})
        return JSONResponse({"error": f"fewer than {count} messages"}, status_code=408)

    async def events(self, request: Request) -> Response:
        return StreamingResponse(
            self._event_stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _event_stream(self) -> AsyncIterator[str]:
        seen = self.store.version
        yield f"event: hello\ndata: {seen}\n\n"
        while True:
            with trio.move_on_after(KEEP_ALIVE) as waited:
                seen = await self.store.wait_changed(seen)
            yield (
                ": keep-alive\n\n"
                if waited.cancelled_caught
                else f"event: change\ndata: {seen}\n\n"
            )


class _NotFound(Exception):
    """No message (or part) with the id in the URL: answered with 404."""


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "no such message"}, status_code=404)


def _int(request: Request, name: str, default: int) -> int:
    return int(_number(request, name, default))


def _number(request: Request, name: str, default: float) -> float:
    """A non-negative number from the query string; ``default`` if absent or not one."""
    try:
        value = float(request.query_params.get(name, default))
    except ValueError:
        return default
    return max(0.0, value) if math.isfinite(value) else default


class _SecurityHeaders:
    """Headers on every response: no sniffing, no referrer, the page's policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", PAGE_POLICY.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _LoopbackHost:
    """Refuse requests for other host names (``421``): a defence against DNS rebinding.

    A page the user visits could make its own name resolve to 127.0.0.1 and then read
    this API as "same origin"; its requests still carry that name in ``Host``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
        name = host.partition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        if scope["type"] == "http" and not is_loopback(name):
            response = Response("this server answers only to a loopback host name\n", 421)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BasicAuth:
    """HTTP basic auth (RFC 7617) with one password; any user name is accepted."""

    def __init__(self, app: ASGIApp, password: str) -> None:
        self.app = app
        self.password = password.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(dict(scope["headers"])):
            challenge = {"WWW-Authenticate": 'Basic realm="triomail", charset="UTF-8"'}
            response = Response("authentication required\n", 401, headers=challenge)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            _, _, password = base64.b64decode(value, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(password, self.password)
