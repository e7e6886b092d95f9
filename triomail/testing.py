"""Test helpers: a capture SMTP server, what it records, and its fault rules.

>>> from triomail.testing import SMTPSink, Fault
>>> async def test_send():
...     async with SMTPSink(faults=[Fault("RCPT", code=550, recipient="bad@example.com")]) as sink:
...         ...  # send to sink.host:sink.port (STARTTLS with sink.client_ssl_context())
...         [message] = await sink.wait_for_messages(1)

The pytest plugin (``triomail.pytest_plugin``) provides the same as an ``smtp_sink``
fixture.
"""

from ._public import publish
from ._sink.faults import Drop as Drop
from ._sink.faults import Fault as Fault
from ._sink.message import CapturedMessage as CapturedMessage
from ._sink.server import SMTPSink as SMTPSink

__all__ = ["CapturedMessage", "Drop", "Fault", "SMTPSink"]

publish(globals(), __all__)
