"""The ``smtp_sink`` pytest fixture from ``triomail.pytest_plugin`` (entry point
``pytest11``), used the way an application's test suite would use it."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from triomail.testing import Fault, SMTPSink


async def test_smtp_sink_fixture(smtp_sink: SMTPSink) -> None:
    context = smtp_sink.client_ssl_context()

    def send() -> None:
        with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
            client.starttls(context=context)
            client.sendmail(
                "app@example.org", ["user@example.net"], b"Subject: welcome\r\n\r\nhi\r\n"
            )

    await trio.to_thread.run_sync(send)
    with trio.fail_after(5):
        [message] = await smtp_sink.wait_for_messages(1)
    assert message.subject == "welcome"
    assert message.rcpt_to == ["user@example.net"]
    assert message.tls


@pytest.mark.smtp_sink(tls=False, faults=[Fault("MAIL", code=451, text="4.3.2 not now")])
async def test_smtp_sink_marker_configures_the_sink(smtp_sink: SMTPSink) -> None:
    def send() -> None:
        with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
            assert not client.has_extn("starttls")
            client.sendmail("app@example.org", ["user@example.net"], b"Subject: x\r\n\r\n")

    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        await trio.to_thread.run_sync(send)
    assert info.value.smtp_code == 451
    assert smtp_sink.messages == []


async def test_fixture_works_outside_trio_mode(tmp_path: Path) -> None:
    """A project without ``trio_mode`` marks its tests ``@pytest.mark.trio``."""
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (tmp_path / "test_app.py").write_text(
        textwrap.dedent(
            """
            import smtplib

            import pytest
            import trio


            @pytest.mark.trio
            async def test_sends(smtp_sink):
                def send():
                    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
                        client.sendmail("a@example.org", ["b@example.net"], b"Subject: s\\r\\n\\r\\n")

                await trio.to_thread.run_sync(send)
                assert smtp_sink.received == 1


            def test_plain_sync_test_is_untouched():
                assert True
            """
        )
    )
    result = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", str(tmp_path)],
        cwd=tmp_path,
        capture_stdout=True,
        stderr=subprocess.STDOUT,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output
    assert "2 passed" in output


async def test_wait_for_messages_times_out_naming_what_arrived(smtp_sink: SMTPSink) -> None:
    context = smtp_sink.client_ssl_context()

    def send() -> None:
        with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
            client.starttls(context=context)
            client.sendmail("app@example.org", ["one@example.net"], b"Subject: first\r\n\r\n")

    await trio.to_thread.run_sync(send)
    with trio.fail_after(5), pytest.raises(TimeoutError) as info:
        await smtp_sink.wait_for_messages(2, timeout=0.2)
    text = str(info.value)
    assert "2 message(s)" in text and "1 arrived" in text and "'first'" in text
    assert "one@example.net" in text
    assert len(await smtp_sink.wait_for_messages(1, timeout=0.2)) == 1


async def test_without_trustme_the_sink_runs_without_tls_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from triomail._sink import server

    monkeypatch.setattr(server, "_trustme_installed", lambda: False)
    async with SMTPSink() as sink:
        assert sink.ca is None

        def send() -> None:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                assert not client.has_extn("starttls")
                client.sendmail("a@example.org", ["b@example.net"], b"Subject: plain\r\n\r\n")

        await trio.to_thread.run_sync(send)
        assert len(await sink.wait_for_messages(1)) == 1
        with pytest.raises(RuntimeError, match=r"triomail\[testing\]"):
            sink.client_ssl_context()


def test_the_testing_extra_declares_what_the_fixture_needs() -> None:
    import tomllib

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("trustme") for req in extras["testing"])
    assert any(req.startswith("pytest-trio") for req in extras["testing"])
