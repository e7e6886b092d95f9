"""Tests of the scripted fake server itself, driven by raw Trio streams (and swaks)."""

from __future__ import annotations

import shutil
import socket
import ssl

import pytest
import trio
import trio.testing
from helpers.scripted import (
    ScriptError,
    Transcript,
    abort,
    close,
    dribble,
    ehlo_reply,
    expect,
    expect_data,
    expect_eof,
    expect_line,
    expect_nothing,
    never_read,
    play,
    read_bytes,
    reply,
    scripted_server,
    send,
    send_lines,
    sleep,
    starttls,
)


class LineClient:
    """Just enough of a client: write bytes, read CRLF-terminated lines."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.chunks: list[bytes] = []

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = await self.stream.receive_some()
            if not chunk:
                raise EOFError(bytes(self.buf))
            self.chunks.append(bytes(chunk))
            self.buf += chunk
        idx = self.buf.index(b"\r\n") + 2
        line = bytes(self.buf[:idx])
        del self.buf[:idx]
        return line

    async def reply(self) -> list[bytes]:
        lines = [await self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(await self.line())
        return lines

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


# -- memory streams -----------------------------------------------------------------------


async def test_play_on_memory_streams_records_transcript() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    script = [
        send_lines("220 fake ESMTP"),
        expect(b"EHLO "),
        ehlo_reply("PIPELINING", "SIZE 1000"),
        expect_line(b"MAIL FROM:<a@example.com>\r\n"),
        expect(b"RCPT TO:"),
        reply(250, "2.1.0 ok"),
        reply(250, "2.1.5 ok"),
        expect_line(b"QUIT"),
        send(b"221 bye\r\n"),
    ]
    c = LineClient(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: play(server_stream, script, transcript=transcript))
        assert await c.reply() == [b"220 fake ESMTP\r\n"]
        await c.send(b"EHLO me\r\n")
        assert await c.reply() == [
            b"250-scripted.test\r\n",
            b"250-PIPELINING\r\n",
            b"250 SIZE 1000\r\n",
        ]
        # a multi-line reply arrives in one chunk: send_lines() is a single write
        assert c.chunks[-1] == b"250-scripted.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
        await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        assert await c.reply() == [b"250 2.1.0 ok\r\n"]
        assert await c.reply() == [b"250 2.1.5 ok\r\n"]
        await c.send(b"QUIT\r\n")
        assert await c.reply() == [b"221 bye\r\n"]

    assert transcript.writes == [
        ("plain", b"EHLO me\r\n"),
        ("plain", b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"),
        ("plain", b"QUIT\r\n"),
    ]
    assert transcript.data() == b"".join(w for _, w in transcript.writes)
    assert transcript.lines() == [
        b"EHLO me",
        b"MAIL FROM:<a@example.com>",
        b"RCPT TO:<b@example.com>",
        b"QUIT",
    ]
    assert transcript.lines(keepends=True)[0] == b"EHLO me\r\n"
    assert transcript.data("tls") == b""
    assert transcript.buffered_at_starttls is None
    assert [(d, data) for d, _, data in transcript.events][:2] == [
        ("S", b"220 fake ESMTP\r\n"),
        ("C", b"EHLO me\r\n"),
    ]


async def test_expect_data_and_read_bytes() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    script = [
        expect_line(b"DATA"),
        expect_data(),
        expect_line(b"DATA"),
        expect_data(),  # empty body: ".\r\n" right after the DATA line
        expect(b"BDAT 5"),
        read_bytes(5),
        expect(b"BDAT 0 LAST"),
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: play(server_stream, script, transcript=transcript))
        # split writes: the harness must reassemble
        await client_stream.send_all(b"DATA\r\nSubject: x\r\n\r\n..dot\r\n")
        await trio.testing.wait_all_tasks_blocked()
        await client_stream.send_all(b"\r\n.\r\nDATA\r\n.\r\nBDAT 5\r\nab\r\n")
        await trio.testing.wait_all_tasks_blocked()
        await client_stream.send_all(b"cBDAT 0 LAST\r\n")
    assert transcript.bodies == [b"Subject: x\r\n\r\n..dot\r\n\r\n.\r\n", b".\r\n", b"ab\r\nc"]


async def test_expect_data_waits_for_an_empty_body_that_comes_late_and_split() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    script = [expect_line(b"DATA"), expect_data(), expect_line(b"QUIT")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: play(server_stream, script, transcript=transcript))
        await client_stream.send_all(b"DATA\r\n")
        await trio.testing.wait_all_tasks_blocked()  # expect_data() is waiting, buffer empty
        await client_stream.send_all(b".")
        await trio.testing.wait_all_tasks_blocked()
        await client_stream.send_all(b"\r\nQUIT\r\n")
    assert transcript.bodies == [b".\r\n"]


async def test_partial_line_tail_is_kept_in_lines() -> None:
    t = Transcript(writes=[("plain", b"EHLO a\r\nMAIL"), ("tls", b" FROM:<>\r\nRC")])
    assert t.lines() == [b"EHLO a", b"MAIL FROM:<>", b"RC"]
    assert t.lines("tls") == [b" FROM:<>", b"RC"]


async def test_mismatch_fails_with_expected_got_and_transcript() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    script = [send_lines("220 hi"), expect(b"EHLO"), send_lines("250 ok"), expect(b"MAIL FROM:")]
    with pytest.RaisesGroup(pytest.RaisesExc(ScriptError)) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: play(server_stream, script, transcript=transcript))
            c = LineClient(client_stream)
            await c.reply()
            await c.send(b"EHLO x\r\n")
            await c.reply()
            await c.send(b"RCPT TO:<b@example.com>\r\n")
    (err,) = info.value.exceptions
    assert isinstance(err, ScriptError)
    msg = str(err)
    assert "step 3 Expect(prefix=b'MAIL FROM:'" in msg
    assert "expected line starting with b'MAIL FROM:'" in msg
    assert "got b'RCPT TO:<b@example.com>\\r\\n'" in msg
    assert "C< b'EHLO x\\r\\n'" in msg  # the transcript is part of the message
    assert "-> 3: Expect(" in msg  # and the script, with the failing step marked
    assert err.step_index == 3
    assert err.transcript is transcript


async def test_timeout_waiting_for_client_is_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    start = trio.current_time()
    with pytest.RaisesGroup(pytest.RaisesExc(ScriptError, match=r"timed out after 600\.0s")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: play(server_stream, [expect(b"EHLO", timeout=600.0)], transcript=transcript)
            )
            await client_stream.send_all(b"EHL")  # never completes the line
    assert trio.current_time() - start == pytest.approx(600.0)


async def test_dribble_and_sleep_follow_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    script = [sleep(300), dribble(b"220 x\r\n", every=10.0)]
    start = trio.current_time()
    c = LineClient(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: play(server_stream, script, transcript=transcript))
        assert await c.line() == b"220 x\r\n"
    assert trio.current_time() - start == pytest.approx(300 + 6 * 10.0)
    assert c.chunks == [bytes([b]) for b in b"220 x\r\n"]


@pytest.mark.parametrize("client_writes", [False, True])
async def test_expect_nothing(autojump_clock: trio.testing.MockClock, client_writes: bool) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()
    script = [expect(b"STARTTLS"), expect_nothing(30), send_lines("220 go")]

    async def client() -> None:
        await client_stream.send_all(b"STARTTLS\r\n")
        if client_writes:
            await trio.sleep(29)
            await client_stream.send_all(b"EHLO too-early\r\n")
        assert await LineClient(client_stream).line() == b"220 go\r\n"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        if client_writes:
            with pytest.raises(ScriptError, match=r"expected no client bytes for 30s, got"):
                await play(server_stream, script, transcript=transcript)
            nursery.cancel_scope.cancel()
        else:
            await play(server_stream, script, transcript=transcript)


async def test_expect_nothing_fails_on_bytes_already_buffered() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"STARTTLS\r\nEHLO x\r\n")
    with pytest.raises(ScriptError, match="had already written b'EHLO x"):
        await play(server_stream, [expect(b"STARTTLS"), expect_nothing(1)], transcript=Transcript())


@pytest.mark.parametrize(
    ("client_sends", "ok"),
    [(b"", True), (b"QUIT\r\n", True), (b"NOOP\r\n", False), (b"QUIT\r\nNOOP\r\n", False)],
)
async def test_expect_eof(client_sends: bytes, ok: bool) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    transcript = Transcript()

    async def client() -> None:
        await client_stream.send_all(client_sends)
        if client_sends == b"QUIT\r\n":
            assert await LineClient(client_stream).line() == b"221 2.0.0 Bye\r\n"
        await client_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        if ok:
            await play(server_stream, [expect_eof()], transcript=transcript)
            assert transcript.eof
        else:
            with pytest.raises(ScriptError, match="expected the client to close the connection"):
                await play(server_stream, [expect_eof()], transcript=transcript)


async def test_expect_eof_times_out(autojump_clock: trio.testing.MockClock) -> None:
    _client_stream, server_stream = trio.testing.memory_stream_pair()
    with pytest.raises(ScriptError, match="close the connection within 60s"):
        await play(server_stream, [expect_eof(timeout=60)], transcript=Transcript())


# -- TCP + TLS ----------------------------------------------------------------------------


async def test_tcp_starttls_conversation(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    script = [
        send_lines("220 fake ESMTP"),
        expect(b"EHLO "),
        ehlo_reply("STARTTLS", "PIPELINING"),
        expect_line(b"STARTTLS\r\n"),
        send_lines("220 2.0.0 go ahead"),
        starttls(),
        expect(b"EHLO "),
        ehlo_reply("PIPELINING"),
        expect_line(b"QUIT\r\n"),
        send_lines("221 bye"),
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        tcp = await trio.open_tcp_stream(srv.host, srv.port)
        c = LineClient(tcp)
        await c.reply()
        await c.send(b"EHLO me\r\n")
        assert b"250-STARTTLS\r\n" in await c.reply()
        await c.send(b"STARTTLS\r\n")
        assert await c.reply() == [b"220 2.0.0 go ahead\r\n"]
        tls = trio.SSLStream(tcp, client_ssl_ctx, server_hostname="localhost")
        await tls.do_handshake()
        c = LineClient(tls)
        await c.send(b"EHLO me\r\n")
        assert await c.reply() == [b"250-scripted.test\r\n", b"250 PIPELINING\r\n"]
        await c.send(b"QUIT\r\n")
        assert await c.reply() == [b"221 bye\r\n"]
        await tls.aclose()

    t = srv.transcript
    assert srv.connections == 1
    assert t.data("plain") == b"EHLO me\r\nSTARTTLS\r\n"
    assert t.data("tls") == b"EHLO me\r\nQUIT\r\n"
    assert t.buffered_at_starttls == b""
    assert t.wire_after_starttls.startswith(b"\x16\x03")  # a TLS handshake record
    assert b"EHLO" not in t.wire_after_starttls
    assert t.wire.startswith(b"EHLO me\r\nSTARTTLS\r\n\x16\x03")


async def test_bytes_buffered_at_starttls_are_recorded(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    script = [expect_line(b"STARTTLS"), send_lines("220 go"), starttls(), expect(b"EHLO")]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        tcp = await trio.open_tcp_stream(srv.host, srv.port)
        await tcp.send_all(b"STARTTLS\r\nEHLO pipelined\r\n")
        assert await LineClient(tcp).line() == b"220 go\r\n"
        tls = trio.SSLStream(tcp, client_ssl_ctx, server_hostname="127.0.0.1")
        await tls.do_handshake()
        await tls.send_all(b"EHLO again\r\n")
        with trio.fail_after(5):
            await srv.finished.wait()
        await tls.aclose()
    assert srv.transcript.buffered_at_starttls == b"EHLO pipelined\r\n"
    assert srv.transcript.wire_after_starttls.startswith(b"EHLO pipelined\r\n\x16\x03")
    assert srv.transcript.data("tls") == b"EHLO again\r\n"


async def test_implicit_tls(server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext) -> None:
    script = [send_lines("220 tls from the start"), expect_line(b"QUIT"), send_lines("221 bye")]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx, implicit_tls=True) as srv:
        tls = await trio.open_ssl_over_tcp_stream(srv.host, srv.port, ssl_context=client_ssl_ctx)
        c = LineClient(tls)
        assert await c.line() == b"220 tls from the start\r\n"
        await c.send(b"QUIT\r\n")
        assert await c.line() == b"221 bye\r\n"
        await tls.aclose()
    assert srv.transcript.writes == [("tls", b"QUIT\r\n")]
    assert srv.transcript.wire.startswith(b"\x16\x03")
    assert srv.transcript.buffered_at_starttls == b""
    assert srv.transcript.wire_after_starttls == bytes(srv.transcript.wire)


async def test_expected_handshake_failure(server_ssl_ctx: ssl.SSLContext) -> None:
    untrusting = ssl.create_default_context()  # does not know the test CA
    script = [starttls(expect_failure=True), expect_eof()]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        tls = await trio.open_ssl_over_tcp_stream(srv.host, srv.port, ssl_context=untrusting)
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        await trio.aclose_forcefully(tls)
    assert srv.transcript.tls_error is not None
    assert srv.transcript.wire_after_starttls.startswith(b"\x16\x03")  # the ClientHello
    assert srv.transcript.data() == b""  # no plaintext ever


async def test_unexpected_handshake_failure_is_a_script_error(
    server_ssl_ctx: ssl.SSLContext,
) -> None:
    untrusting = ssl.create_default_context()
    with pytest.raises(ScriptError, match="TLS handshake failed"):
        async with scripted_server([], server_ssl_context=server_ssl_ctx, implicit_tls=True) as srv:
            tls = await trio.open_ssl_over_tcp_stream(srv.host, srv.port, ssl_context=untrusting)
            with pytest.raises(trio.BrokenResourceError):
                await tls.do_handshake()
            await trio.aclose_forcefully(tls)


async def test_server_mismatch_raises_at_block_exit_and_disconnects_client() -> None:
    script = [send_lines("220 hi"), expect(b"EHLO"), send_lines("250 ok")]
    with pytest.raises(ScriptError) as info:
        async with scripted_server(script) as srv:
            tcp = await trio.open_tcp_stream(srv.host, srv.port)
            c = LineClient(tcp)
            await c.line()
            await c.send(b"HELO old-school\r\n")
            # the server aborts the connection, so the client is not left waiting
            with pytest.raises((trio.BrokenResourceError, EOFError)):
                await c.line()
            await tcp.aclose()
    assert "expected line starting with b'EHLO'" in str(info.value)
    assert "got b'HELO old-school\\r\\n'" in str(info.value)


async def test_body_exception_is_chained_to_script_failure() -> None:
    class ClientGaveUp(Exception):
        pass

    with pytest.raises(ScriptError) as info:
        async with scripted_server([send_lines("220 hi"), expect(b"EHLO")]) as srv:
            tcp = await trio.open_tcp_stream(srv.host, srv.port)
            await LineClient(tcp).line()
            await tcp.send_all(b"NOOP\r\n")
            with trio.fail_after(5):
                await srv.finished.wait()  # set on failure too
            assert srv.failure is not None
            await tcp.aclose()
            raise ClientGaveUp
    assert isinstance(info.value.__cause__, ClientGaveUp)


async def test_body_exception_propagates_when_script_is_fine() -> None:
    with pytest.raises(KeyError):
        async with scripted_server([expect(b"EHLO")]):
            raise KeyError("boom")


async def test_incomplete_script_is_reported() -> None:
    script = [send_lines("220 hi"), expect(b"EHLO")]
    tcp: trio.SocketStream | None = None
    with pytest.raises(ScriptError, match=r"did not complete .*still at step 1 Expect"):
        async with scripted_server(script, finish_timeout=0.2) as srv:
            tcp = await trio.open_tcp_stream(srv.host, srv.port)
            await LineClient(tcp).line()  # ... and then keeps the connection open
    assert tcp is not None
    await tcp.aclose()
    with pytest.raises(ScriptError, match="no client connected"):
        async with scripted_server(script, finish_timeout=0.0):
            pass


async def test_close_and_abort() -> None:
    async with scripted_server([send_lines("220 hi"), close()]) as srv:
        tcp = await trio.open_tcp_stream(srv.host, srv.port)
        c = LineClient(tcp)
        assert await c.line() == b"220 hi\r\n"
        assert await tcp.receive_some() == b""  # FIN
        await tcp.aclose()

    async with scripted_server([send_lines("220 hi"), abort()]) as srv:
        tcp = await trio.open_tcp_stream(srv.host, srv.port)
        c = LineClient(tcp)
        assert await c.line() == b"220 hi\r\n"
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
            while True:
                await tcp.receive_some()  # RST
        assert isinstance(info.value.__cause__, ConnectionResetError)
        await tcp.aclose()


async def test_never_read_backs_up_the_client() -> None:
    async with scripted_server([send_lines("220 hi"), never_read()], recv_buffer_size=4096) as srv:
        tcp = await trio.open_tcp_stream(srv.host, srv.port)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await LineClient(tcp).line()
        with trio.move_on_after(1.0) as scope:
            await tcp.send_all(b"x" * (64 << 20))
        assert scope.cancelled_caught
        await trio.aclose_forcefully(tcp)
    assert srv.transcript.writes == []


async def test_further_connections_are_counted() -> None:
    async with scripted_server([send_lines("220 hi"), expect_eof()]) as srv:
        first = await trio.open_tcp_stream(srv.host, srv.port)
        await LineClient(first).line()
        second = await trio.open_tcp_stream(srv.host, srv.port)
        assert await second.receive_some() == b""
        await second.aclose()
        await first.aclose()
    assert srv.connections == 2


# -- cross-check with a reference client --------------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
async def test_swaks_follows_a_starttls_script(server_ssl_ctx: ssl.SSLContext) -> None:
    script = [
        send_lines("220 fake ESMTP"),
        expect_line(b"EHLO client.example\r\n"),
        ehlo_reply("PIPELINING", "8BITMIME", "STARTTLS"),
        expect_line(b"STARTTLS\r\n"),
        send_lines("220 2.0.0 Ready to start TLS"),
        starttls(),
        expect_line(b"EHLO client.example\r\n"),
        ehlo_reply("PIPELINING", "8BITMIME"),
        expect_line(b"MAIL FROM:<a@example.com>\r\n"),
        send_lines("250 2.1.0 Ok"),
        expect_line(b"RCPT TO:<b@example.com>\r\n"),
        send_lines("250 2.1.5 Ok"),
        expect_line(b"DATA\r\n"),
        send_lines("354 go"),
        expect_data(),
        send_lines("250 2.0.0 queued"),
        expect_line(b"QUIT\r\n"),
        send_lines("221 2.0.0 Bye"),
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        with trio.fail_after(30):
            proc = await trio.run_process(
                [
                    "swaks",
                    "--server",
                    srv.host,
                    "--port",
                    str(srv.port),
                    "--ehlo",
                    "client.example",
                    "--from",
                    "a@example.com",
                    "--to",
                    "b@example.com",
                    "--tls",
                    "--data",
                    "Subject: from swaks\n\nhello\n.leading dot",  # swaks adds CRLF.CRLF
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=b"",
            )
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    (body,) = srv.transcript.bodies
    assert body == b"Subject: from swaks\r\n\r\nhello\r\n..leading dot\r\n.\r\n"
    assert srv.transcript.buffered_at_starttls == b""
