"""The JSON API over plain HTTP, through the ``smtp_sink_web`` fixture and ``triomail view``."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from webtools import PIXEL, http, sent

from triomail._web.app import is_loopback
from triomail._web.serve import SinkPage

pytestmark = pytest.mark.smtp_sink(tls=False)

PLAIN = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Plain one\r\n"
    b"Message-ID: <1@example.org>\r\n\r\nJust text.\r\n"
)
MIXED = (
    b"From: Carol <carol@example.org>\r\nTo: dave@example.net\r\nSubject: With parts\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: multipart/alternative; boundary=A\r\n\r\n"
    b"--A\r\nContent-Type: text/plain\r\n\r\nHello text\r\n"
    b"--A\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>html</b><script>x()</script></p>\r\n--A--\r\n"
    b"--B\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="r\xc3\xa9sum\xc3\xa9 \\"1\\".pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n"
)


async def listed(page: SinkPage, query: str = "") -> dict[str, object]:
    reply = await http("GET", f"{page.url}api/messages?q={query}")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    result: dict[str, object] = reply.json()
    return result


async def test_list_is_newest_first_with_envelope_and_markers(smtp_sink_web: SinkPage) -> None:
    await sent(smtp_sink_web.sink.port, PLAIN)
    await sent(smtp_sink_web.sink.port, MIXED, to="other@example.net")
    body = await listed(smtp_sink_web)
    assert body["total"] == 2
    first, second = body["messages"]  # type: ignore[misc]
    assert first["subject"] == "With parts"
    assert first["mail_from"] == "sender@example.org"
    assert first["rcpt_to"] == ["other@example.net"]
    assert first["sender"] == "Carol <carol@example.org>"
    assert first["attachments"] == 1
    assert "unsubscribe" in first["problems"]
    assert second["subject"] == "Plain one"
    assert second["size"] == len(PLAIN)


async def test_search_by_address_and_subject(smtp_sink_web: SinkPage) -> None:
    await sent(smtp_sink_web.sink.port, PLAIN)
    await sent(smtp_sink_web.sink.port, MIXED, to="other@example.net")
    for query, subjects in [
        ("carol", ["With parts"]),
        ("PLAIN", ["Plain one"]),
        ("other@example", ["With parts"]),  # the envelope recipient
        ("nobody", []),
    ]:
        body = await listed(smtp_sink_web, query)
        assert [m["subject"] for m in body["messages"]] == subjects  # type: ignore[attr-defined]


async def test_one_message_raw_parts_and_html_policy(smtp_sink_web: SinkPage) -> None:
    await sent(smtp_sink_web.sink.port, MIXED)
    url = f"{smtp_sink_web.url}api/messages/1"
    one = (await http("GET", url)).json()
    assert one["text"].strip() == "Hello text"
    assert one["has_html"] is True
    assert ["Subject", "With parts"] in one["headers"]
    assert one["envelope"]["tls"] is False
    assert one["envelope"]["authenticated_as"] is None
    [part] = one["parts"]
    assert part["filename"] == 'résumé "1".pdf'
    assert part["content_type"] == "application/pdf"

    raw = await http("GET", url + "/raw")
    assert raw.body == MIXED
    assert (await http("HEAD", url + "/raw")).status == 200  # the page's "still there?"
    assert raw.headers["Content-Type"].startswith("text/plain")
    assert raw.headers["X-Content-Type-Options"] == "nosniff"

    html = await http("GET", url + "/html")
    assert b"<script>" in html.body  # served as it is: the policy, not a filter, disarms it
    policy = html.headers["Content-Security-Policy"]
    assert policy.startswith("sandbox;")
    assert "default-src 'none'" in policy
    assert "img-src data:;" in policy
    remote = await http("GET", url + "/html?remote=1")
    assert "img-src data: http: https:;" in remote.headers["Content-Security-Policy"]
    assert "script" not in remote.headers["Content-Security-Policy"]

    download = await http("GET", f"{url}/parts/{part['index']}")
    assert download.body == b"%PDF-1.4\n"
    assert download.headers["Content-Type"] == "application/octet-stream"
    assert download.headers["Content-Disposition"] == (
        "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.pdf"
    )
    assert (await http("GET", f"{url}/parts/999")).status == 404


async def test_inline_images_travel_as_data_urls(smtp_sink_web: SinkPage) -> None:
    gif = base64.b64encode(PIXEL).decode()
    related = (
        "From: a@example.org\r\nTo: b@example.net\r\nSubject: Logo\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/related; boundary=R\r\n\r\n"
        '--R\r\nContent-Type: text/html\r\n\r\n<img src="cid:logo%40x"><img src="CID:other@x">\r\n'
        f"--R\r\nContent-Type: image/gif\r\nContent-ID: <logo@x>\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{gif}\r\n--R--\r\n"
    )
    await sent(smtp_sink_web.sink.port, related.encode())
    html = await http("GET", f"{smtp_sink_web.url}api/messages/1/html")
    assert html.body.decode() == (f'<img src="data:image/gif;base64,{gif}"><img src="CID:other@x">')
    assert "img-src data:;" in html.headers["Content-Security-Policy"]


async def test_page_policy_and_missing_messages(smtp_sink_web: SinkPage) -> None:
    page = await http("GET", smtp_sink_web.url)
    assert page.status == 200
    assert b'<script src="static/app.js"' in page.body
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for path in ("api/messages/7", "api/messages/7/raw", "api/messages/7/html"):
        reply = await http("GET", smtp_sink_web.url + path)
        assert reply.status == 404
        assert reply.json() == {"error": "no such message"}
    assert (await http("HEAD", smtp_sink_web.url + "api/messages/7/raw")).status == 404
    assert (await http("DELETE", smtp_sink_web.url + "api/messages/7")).status == 404


async def test_delete_one_and_all(smtp_sink_web: SinkPage) -> None:
    for _ in range(3):
        await sent(smtp_sink_web.sink.port, PLAIN)
    assert (await http("DELETE", f"{smtp_sink_web.url}api/messages/2")).json() == {"deleted": 1}
    assert [m["id"] for m in (await listed(smtp_sink_web))["messages"]] == ["3", "1"]  # type: ignore[attr-defined]
    assert (await http("DELETE", f"{smtp_sink_web.url}api/messages")).json() == {"deleted": 2}
    assert (await listed(smtp_sink_web))["total"] == 0


async def test_wait_for_messages(smtp_sink_web: SinkPage) -> None:
    async def later() -> None:
        await trio.sleep(0.2)
        await sent(smtp_sink_web.sink.port, PLAIN)
        await sent(smtp_sink_web.sink.port, PLAIN)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        reply = await http("GET", f"{smtp_sink_web.url}api/wait?count=2&timeout=10")
    assert reply.json() == {"ids": ["2", "1"]}
    short = await http("GET", f"{smtp_sink_web.url}api/wait?count=3&timeout=0.1")
    assert short.status == 408
    nonsense = await http("GET", f"{smtp_sink_web.url}api/wait?count=1&timeout=nan")
    assert nonsense.json() == {"ids": ["2", "1"]}


async def test_events_announce_each_change(smtp_sink_web: SinkPage) -> None:
    host, port = smtp_sink_web.url.removeprefix("http://").rstrip("/").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = b""

    async def until(marker: bytes) -> None:
        nonlocal received
        with trio.fail_after(10):
            while marker not in received:
                received += await stream.receive_some()

    await until(b"event: hello\ndata: 0\n\n")
    assert b"text/event-stream" in received
    await sent(smtp_sink_web.sink.port, PLAIN)
    await until(b"event: change\ndata: 1\n\n")
    await http("DELETE", f"{smtp_sink_web.url}api/messages/1")
    await until(b"event: change\ndata: 2\n\n")
    await stream.aclose()


@pytest.mark.smtp_sink(on_message=lambda message: CALLED.append(message.mail_from))
async def test_the_fixture_keeps_the_callers_on_message(smtp_sink_web: SinkPage) -> None:
    await sent(smtp_sink_web.sink.port, PLAIN)
    assert CALLED == ["sender@example.org"]
    assert smtp_sink_web.sink.received == 1


CALLED: list[str] = []


async def test_basic_auth() -> None:
    from triomail._web.serve import open_web
    from triomail._web.store import LiveStore

    async with open_web(LiveStore(), password="s3cret") as url:
        refused = await http("GET", url + "api/messages")
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"any:wrong").decode()
        assert (await http("GET", url, Authorization=f"Basic {wrong}")).status == 401
        right = base64.b64encode(b"any:s3cret").decode()
        assert (
            await http("GET", url + "api/messages", Authorization=f"Basic {right}")
        ).status == 200


async def test_other_host_names_are_refused(smtp_sink_web: SinkPage) -> None:
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 still sends that name."""
    url = smtp_sink_web.url + "api/messages"
    assert (await http("GET", url, Host="evil.example")).status == 421
    assert (await http("GET", url, Host="evil.example:80")).status == 421
    for host in ("localhost:8025", "LOCALHOST", "127.0.0.1", "[::1]:8025"):
        assert (await http("GET", url, Host=host)).status == 200


def test_loopback_names() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("[::1]") and is_loopback("127.0.0.2")
    assert (
        not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example")
    )


def view(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triomail", "view", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_view_refuses_a_network_address_without_a_password(tmp_path: Path) -> None:
    result = view(str(tmp_path), "--web", "0.0.0.0:0")
    assert result.returncode == 2
    assert "--web-password" in result.stderr and "--web-insecure" in result.stderr
    missing = view(str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_sink_refuses_a_network_address_without_a_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "triomail", "sink", "--port", "0", "--no-tls", "--web", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "--web-password" in result.stderr


async def read_line(process: trio.Process) -> str:
    assert process.stdout is not None
    line = b""
    with trio.fail_after(20):
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
    return line.decode()


async def test_sink_serves_the_page_beside_smtp(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "triomail", "sink", "--port", "0", "--no-tls", "--web", "0"]
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        process: trio.Process = await nursery.start(run)
        first, second = await read_line(process), await read_line(process)
        assert first.startswith("listening on 127.0.0.1:")  # still the first line
        assert second.startswith("web view on http://127.0.0.1:")
        url = second.split()[3]
        await sent(int(first.strip().rpartition(":")[2]), PLAIN)
        assert (await read_line(process)).startswith("from=<sender@example.org>")
        body = (await http("GET", url + "api/messages")).json()
        assert [m["subject"] for m in body["messages"]] == ["Plain one"]
        process.terminate()
    assert process.returncode == 0


async def test_view_serves_a_folder(tmp_path: Path) -> None:
    (tmp_path / "000001.eml").write_bytes(PLAIN)
    (tmp_path / "000002.eml").write_bytes(MIXED)
    (tmp_path / "notes.txt").write_text("not mail")
    command = [sys.executable, "-m", "triomail", "view", str(tmp_path), "--web", "0"]
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        process: trio.Process = await nursery.start(run)
        line = await read_line(process)
        assert line.startswith("web view on http://127.0.0.1:")
        url = line.split()[3]
        body = (await http("GET", url + "api/messages")).json()
        assert [m["id"] for m in body["messages"]] == ["000002.eml", "000001.eml"]
        assert body["messages"][0]["mail_from"] is None  # no envelope in a file
        one = (await http("GET", url + "api/messages/000002.eml")).json()
        assert one["envelope"] is None and one["text"].strip() == "Hello text"
        for bad in ("..%2Fetc%2Fpasswd", "notes.txt", ".hidden.eml"):
            assert (await http("GET", f"{url}api/messages/{bad}")).status == 404
        started = time.monotonic()
        assert (await http("DELETE", url + "api/messages/000001.eml")).status == 200
        assert not (tmp_path / "000001.eml").exists()
        (tmp_path / "000003.eml").write_bytes(PLAIN)
        waited = await http("GET", url + "api/wait?count=2&timeout=10")
        assert waited.json() == {"ids": ["000003.eml", "000002.eml"]}
        assert time.monotonic() - started < 10
        process.terminate()
    assert process.returncode == 0
