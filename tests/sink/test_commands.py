"""The sink's SMTP state machine (``triomail._sink.commands``) driven by plain calls.

No sockets and no trio: each test feeds bytes, asks for the next event and checks the
replies the machine wants written. The end-to-end behaviour over real connections is
in ``test_sink.py``; these tests pin the contract between the machine and its I/O half.
"""

from __future__ import annotations

import base64
import dataclasses
import ssl

import pytest
from helpers.sans_io import IO_MODULES, absolute_imports, probe

from triomail._sink.commands import Captured, Event, Pause, ServerMachine, Signal
from triomail._sink.config import SinkConfig
from triomail._sink.faults import COMMANDS, Fault, FaultBook
from triomail.testing import CapturedMessage

PEER = ("192.0.2.7", 40025)
MSG = b"Subject: hi\r\n\r\nbody\r\n"
CONFIG = SinkConfig(
    hostname="sink.test",
    tls_context=None,
    implicit_tls=False,
    auth={},
    auth_mechanisms=("PLAIN", "LOGIN"),
    allow_insecure_auth=False,
    require_tls=False,
    require_auth=False,
    hide_extensions=frozenset(),
    extra_extensions=(),
    max_line_length=512,
    max_message_size=1000,
    max_recipients=2,
    max_connections=1,
    idle_timeout=300.0,
    messages_per_connection=None,
    strict=True,
    out_dir=None,
    store=True,
    max_stored=None,
    on_message=None,
)


class Conversation:
    """A machine plus the bookkeeping its I/O half would do."""

    def __init__(
        self,
        *faults: Fault,
        book: FaultBook | None = None,
        queue_ids: bool = True,
        **config: object,
    ) -> None:
        book = FaultBook(faults) if book is None else book
        self.machine = ServerMachine(dataclasses.replace(CONFIG, **config), book, PEER)
        self.messages: list[CapturedMessage] = []
        self.queue_ids = queue_ids

    def step(self, data: bytes = b"") -> tuple[bytes, Event]:
        """Feed ``data``, run to the next event that needs I/O; return replies and event.

        Captured messages are stored on the way (queue ids Q1, Q2, ...), as the sink does.
        """
        if data:
            self.machine.receive_data(data)
        while True:
            event = self.machine.next_event()
            if not isinstance(event, Captured):
                return self.machine.data_to_send(), event
            self.messages.append(event.message)
            self.machine.stored(f"Q{len(self.messages)}" if self.queue_ids else None)

    def send(self, data: bytes) -> bytes:
        """Feed ``data``; the machine must then want more input. Return its replies."""
        replies, event = self.step(data)
        assert event is Signal.NEED_DATA, (replies, event)
        return replies

    def greet_and_ehlo(self) -> bytes:
        assert self.send(b"").startswith(b"220 sink.test ESMTP")
        return self.send(b"EHLO client.example\r\n")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- the contract with the I/O half ----------------------------------------------------


def test_greeting_then_need_data_and_nothing_more_to_send() -> None:
    talk = Conversation()
    assert talk.step() == (b"220 sink.test ESMTP triomail sink\r\n", Signal.NEED_DATA)
    assert talk.step() == (b"", Signal.NEED_DATA)  # asking again without input is harmless


def test_pipelined_commands_get_their_replies_in_one_batch() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    replies = talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert replies == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    assert talk.send(MSG + b".\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"
    [message] = talk.messages
    assert (message.mail_from, message.rcpt_to, message.data) == (
        "a@example.org",
        ["b@example.net"],
        MSG,
    )
    assert (message.peer, message.helo, message.tls, message.transfer) == (
        PEER,
        "client.example",
        False,
        "DATA",
    )


def test_input_may_arrive_in_any_pieces() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    wire = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + MSG + b".\r\n"
    replies = b"".join(talk.send(wire[i : i + 1]) for i in range(len(wire)))
    assert replies.endswith(b"250 2.0.0 Ok: queued as Q1\r\n")
    assert talk.messages[0].data == MSG


def test_no_room_for_the_message_is_452() -> None:
    talk = Conversation(queue_ids=False)
    talk.greet_and_ehlo()
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert talk.send(MSG + b".\r\n") == b"452 4.3.1 Error: insufficient system storage\r\n"


def test_bdat_chunk_split_across_inputs() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    assert talk.send(b"BDAT 10 LAST\r\n0123") == b""  # the chunk is not complete yet
    assert talk.send(b"456789") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert (talk.messages[0].data, talk.messages[0].transfer) == (b"0123456789", "BDAT")


def test_quit_closes_and_the_machine_stays_closed() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    assert talk.step(b"QUIT\r\n") == (b"221 2.0.0 Bye\r\n", Signal.CLOSE)
    assert talk.step(b"NOOP\r\n") == (b"", Signal.CLOSE)


def test_idle_timeout_is_421_then_close() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    talk.machine.timed_out()
    assert talk.step() == (b"421 4.4.2 sink.test Error: timeout exceeded\r\n", Signal.CLOSE)


def test_synchronization_error_closes() -> None:
    talk = Conversation()
    talk.send(b"")
    # EHLO must end a pipelined group (RFC 2920 §3.1), so it is not even answered.
    replies, event = talk.step(b"EHLO client.example\r\nNOOP\r\n")
    assert (replies, event) == (b"554 Error: SMTP protocol synchronization\r\n", Signal.CLOSE)


def test_over_long_line_is_discarded_across_inputs() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    assert talk.send(b"NOOP " + b"x" * 600) == b""
    assert talk.send(b"y" * 600) == b""
    assert talk.send(b"z\r\nNOOP\r\n") == b"500 5.5.6 Error: line too long\r\n250 2.0.0 Ok\r\n"


def test_help_names_every_command_a_fault_can_match() -> None:
    talk = Conversation()
    talk.greet_and_ehlo()
    replies = talk.send(b"HELP\r\n").decode()
    assert replies.startswith("214 2.0.0 Commands: ")
    assert set(replies[len("214 2.0.0 Commands: ") : -2].split()) == COMMANDS - {"CONNECT", "."}


def test_oversized_data_is_read_to_the_end_but_not_kept() -> None:
    talk = Conversation()  # max_message_size=1000
    talk.greet_and_ehlo()
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    for _ in range(10):
        assert talk.send(b"x" * 998 + b"\r\n") == b""
    assert (
        talk.send(b".\r\nNOOP\r\n") == b"552 5.3.4 Error: message file too big\r\n250 2.0.0 Ok\r\n"
    )
    assert talk.messages == []


def test_messages_per_connection_ends_the_session_at_the_next_mail() -> None:
    talk = Conversation(messages_per_connection=1)
    talk.greet_and_ehlo()
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 3 LAST\r\nabc")
    assert talk.step(b"MAIL FROM:<a@example.org>\r\n") == (
        b"421 4.7.0 sink.test Error: too many messages in one session\r\n",
        Signal.CLOSE,
    )


# --- TLS ---------------------------------------------------------------------------------


def _server_context() -> ssl.SSLContext:
    return ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # never used for a handshake


def test_starttls_asks_for_the_handshake_and_forgets_the_session() -> None:
    talk = Conversation(tls_context=_server_context(), auth={"u": "p"})
    assert b"STARTTLS" in talk.greet_and_ehlo()
    assert talk.step(b"STARTTLS\r\n") == (b"220 2.0.0 Ready to start TLS\r\n", Signal.START_TLS)
    assert talk.step() == (b"", Signal.NEED_DATA)  # the handshake is done
    assert talk.send(b"MAIL FROM:<a@example.org>\r\n").startswith(b"503 ")  # EHLO again first
    ehlo = talk.send(b"EHLO client.example\r\n")
    assert b"STARTTLS" not in ehlo
    assert b"AUTH PLAIN LOGIN" in ehlo


def test_implicit_tls_comes_before_the_greeting() -> None:
    talk = Conversation(tls_context=_server_context(), implicit_tls=True)
    assert talk.step() == (b"", Signal.START_TLS)
    assert talk.send(b"").startswith(b"220 ")
    assert b"STARTTLS" not in talk.send(b"EHLO client.example\r\n")


@pytest.mark.parametrize(
    ("strict", "reply"),
    [
        (True, b"554 5.5.0 Error: SMTP protocol synchronization\r\n"),
        # Even a lenient sink: RFC 3207 §4.2, plaintext injection (CVE-2011-0411).
        (False, b"554 5.5.0 Error: pipelined data after STARTTLS\r\n"),
    ],
)
def test_data_pipelined_after_starttls_is_refused(strict: bool, reply: bytes) -> None:
    talk = Conversation(tls_context=_server_context(), strict=strict)
    talk.greet_and_ehlo()
    assert talk.step(b"STARTTLS\r\nMAIL FROM:<a@example.org>\r\n") == (reply, Signal.CLOSE)


# --- AUTH --------------------------------------------------------------------------------


def test_auth_login_asks_for_each_response() -> None:
    talk = Conversation(auth={"user": "secret"}, allow_insecure_auth=True)
    talk.greet_and_ehlo()
    assert talk.send(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert talk.send(b64(b"user") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert talk.send(b64(b"secret") + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    talk.send(MSG + b".\r\n")
    assert talk.messages[0].authenticated_as == "user"


@pytest.mark.parametrize(
    ("exchange", "last_reply"),
    [
        ([b"AUTH PLAIN " + b64(b"\0user\0secret")], b"235 2.7.0 Authentication successful"),
        ([b"AUTH PLAIN", b64(b"\0user\0wrong")], b"535 5.7.8 Error: authentication failed"),
        ([b"AUTH PLAIN", b"*"], b"501 5.7.0 Error: authentication aborted"),
        ([b"AUTH PLAIN", b"not base64!"], b"501 5.5.2 Error: malformed authentication response"),
        ([b"AUTH PLAIN " + b64(b"user")], b"501 5.5.2 Error: malformed authentication response"),
    ],
)
def test_auth_plain(exchange: list[bytes], last_reply: bytes) -> None:
    talk = Conversation(auth={"user": "secret"}, allow_insecure_auth=True)
    talk.greet_and_ehlo()
    replies = [talk.send(line + b"\r\n") for line in exchange]
    assert replies[:-1] == [b"334 \r\n"] * (len(exchange) - 1)
    assert replies[-1] == last_reply + b"\r\n"


# --- faults ------------------------------------------------------------------------------


def test_fault_delay_is_a_pause_after_the_replies_due() -> None:
    talk = Conversation(Fault("RCPT", delay=2.5))
    talk.greet_and_ehlo()
    replies, event = talk.step(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    assert (replies, event) == (b"250 2.1.0 Ok\r\n", Pause(2.5))
    assert talk.send(b"") == b"250 2.1.5 Ok\r\n"


def test_fault_drop_before_the_final_reply_still_stores() -> None:
    talk = Conversation(Fault(".", drop="before_reply"))
    talk.greet_and_ehlo()
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert talk.step(MSG + b".\r\n") == (b"", Signal.ABORT)
    assert len(talk.messages) == 1  # RFC 1047: the reply is lost, the message is not
    assert talk.step() == (b"", Signal.ABORT)


def test_fault_drop_after_reply_sends_the_reply_first() -> None:
    talk = Conversation(Fault("MAIL", drop="after_reply"))
    talk.greet_and_ehlo()
    assert talk.step(b"MAIL FROM:<a@example.org>\r\n") == (b"250 2.1.0 Ok\r\n", Signal.ABORT)


SYNC_ERROR = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


@pytest.mark.parametrize(
    ("config", "closes"),
    [
        ({}, True),  # strict: Postfix's rule
        ({"strict": False}, False),
        ({"strict": False, "forbid_unauth_pipelining": True}, True),
        ({"forbid_unauth_pipelining": False}, False),
    ],
)
def test_forbid_unauth_pipelining_is_its_own_switch(config: dict[str, bool], closes: bool) -> None:
    talk = Conversation(**config)
    talk.greet_and_ehlo()
    if closes:  # NOOP must end a group (RFC 2920 §3.1): 554 instead of its reply
        assert talk.step(b"NOOP\r\nNOOP\r\n") == (SYNC_ERROR, Signal.CLOSE)
    else:
        assert talk.send(b"NOOP\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n" * 2


def test_forbid_pipelined_fault_closes_only_when_something_follows() -> None:
    talk = Conversation(Fault("MAIL", forbid_pipelined=True))
    talk.greet_and_ehlo()
    assert talk.send(b"MAIL FROM:<a@example.org>\r\n") == b"250 2.1.0 Ok\r\n"
    assert talk.send(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert talk.step(ENVELOPE) == (SYNC_ERROR, Signal.CLOSE)


def test_forbid_pipelined_fault_on_the_end_of_data_refuses_the_message() -> None:
    """Pipelining behind an end of data, refused Postfix-style: the 554 replaces the
    end-of-data reply and the message is not kept; with nothing behind, it is."""
    talk = Conversation(Fault(".", forbid_pipelined=True))
    talk.greet_and_ehlo()
    talk.send(ENVELOPE)
    assert talk.send(MSG + b".\r\n").startswith(b"250 2.0.0 Ok: queued")
    talk.send(ENVELOPE)
    assert talk.step(MSG + b".\r\n" + ENVELOPE) == (SYNC_ERROR, Signal.CLOSE)
    assert len(talk.messages) == 1
    with pytest.raises(ValueError, match="forbid_pipelined"):
        Fault("QUIT", forbid_pipelined=True)


def test_fault_drop_during_data_counts_octets() -> None:
    talk = Conversation(Fault("DATA", drop="during_data", after_bytes=10))
    talk.greet_and_ehlo()
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert talk.send(b"123456789") == b""
    assert talk.step(b"0") == (b"", Signal.ABORT)
    assert talk.messages == []


def test_fault_on_the_greeting_refuses_the_session() -> None:
    talk = Conversation(Fault("CONNECT", code=554))
    assert talk.send(b"") == b"554 Injected fault\r\n"
    assert talk.send(b"EHLO client.example\r\n") == b"503 Error: connection refused, send QUIT\r\n"
    assert talk.step(b"QUIT\r\n") == (b"221 Bye\r\n", Signal.CLOSE)


def test_mail_numbers_are_shared_by_every_machine_of_a_sink() -> None:
    book = FaultBook((Fault("MAIL", code=451, message=2),))
    replies = []
    for _ in range(2):
        talk = Conversation(book=book)
        talk.greet_and_ehlo()
        replies.append(talk.send(b"MAIL FROM:<a@example.org>\r\n"))
    assert replies == [b"250 2.1.0 Ok\r\n", b"451 4.0.0 Injected fault\r\n"]


# --- sans-IO -----------------------------------------------------------------------------


def test_the_machine_loads_no_trio() -> None:
    assert probe(["_sink.commands"]) == ""


def test_the_machine_source_imports_no_io_module() -> None:
    assert not absolute_imports("_sink.commands") & IO_MODULES


def test_the_probe_can_see_trio() -> None:
    assert "trio" in probe(["_sink.session"]).split(",")
