"""Test helpers: a capture SMTP server, what it records, and its fault rules.

>>> from triomail.testing import SMTPSink, Fault
>>> async def test_send():
...     async with SMTPSink(faults=[Fault("RCPT", code=550, recipient="bad@example.com")]) as sink:
...         ...  # send to sink.host:sink.port (STARTTLS with sink.client_ssl_context())
...         [message] = await sink.wait_for_messages(1)

The pytest plugin (``triomail.pytest_plugin``) provides the same as an ``smtp_sink``
fixture.
"""

from ._sink import SMTPSink as SMTPSink
from ._sink_config import Drop as Drop
from ._sink_config import Fault as Fault
from ._sink_message import CapturedMessage as CapturedMessage

__all__ = ["CapturedMessage", "Drop", "Fault", "SMTPSink"]
