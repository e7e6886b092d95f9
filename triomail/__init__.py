"""triomail: a Trio-native SMTP client, connection pool and bulk mailer."""

from ._connection import DSN as DSN
from ._connection import PreparedMessage as PreparedMessage
from ._connection import SMTPConnection as SMTPConnection
from ._connection import TLSMode as TLSMode
from ._connection import connect as connect
from ._connection import default_ssl_context as default_ssl_context
from ._connection import open_connection as open_connection
from ._connection import prepare as prepare
from ._connection import start_session as start_session
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import SMTPAuthenticationError as SMTPAuthenticationError
from ._errors import SMTPCertificateError as SMTPCertificateError
from ._errors import SMTPConnectError as SMTPConnectError
from ._errors import SMTPDisconnected as SMTPDisconnected
from ._errors import SMTPError as SMTPError
from ._errors import SMTPProtocolError as SMTPProtocolError
from ._errors import SMTPResponseError as SMTPResponseError
from ._errors import SMTPSecurityError as SMTPSecurityError
from ._errors import SMTPSendError as SMTPSendError
from ._errors import SMTPTimeoutError as SMTPTimeoutError
from ._pool import Pool as Pool
from ._pool import PoolStatistics as PoolStatistics
from ._pool import ResultChannel as ResultChannel
from ._pool import RetryPolicy as RetryPolicy
from ._pool import Server as Server
from ._pool import connect_pool as connect_pool
from ._pool import open_pool as open_pool
from ._protocol import Capabilities as Capabilities
from ._reply import Reply as Reply
from ._reply import ReplyParser as ReplyParser
from ._result import Outcome as Outcome
from ._result import RecipientResult as RecipientResult
from ._result import SendResult as SendResult
from ._timeouts import Timeouts as Timeouts

__version__ = "0.1.0"

__all__ = [
    "DSN",
    "Capabilities",
    "LocalProtocolError",
    "Outcome",
    "Pool",
    "PoolStatistics",
    "PreparedMessage",
    "RecipientResult",
    "ResultChannel",
    "Reply",
    "RetryPolicy",
    "ReplyParser",
    "SMTPAuthenticationError",
    "SMTPCertificateError",
    "SMTPConnectError",
    "SMTPConnection",
    "SMTPDisconnected",
    "SMTPError",
    "SMTPProtocolError",
    "SMTPResponseError",
    "SMTPSecurityError",
    "SMTPSendError",
    "SMTPTimeoutError",
    "SendResult",
    "Server",
    "TLSMode",
    "Timeouts",
    "connect",
    "connect_pool",
    "default_ssl_context",
    "open_connection",
    "open_pool",
    "prepare",
    "start_session",
]
