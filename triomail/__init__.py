"""triomail: a Trio-native SMTP client, connection pool and bulk mailer."""

from typing import TYPE_CHECKING

from ._client.open import connect as connect
from ._client.open import open_connection as open_connection
from ._client.open import start_session as start_session
from ._client.options import TLSMode as TLSMode
from ._client.options import default_ssl_context as default_ssl_context
from ._client.session import SMTPConnection as SMTPConnection
from ._core.capabilities import Capabilities as Capabilities
from ._core.errors import LocalProtocolError as LocalProtocolError
from ._core.errors import SMTPAuthenticationError as SMTPAuthenticationError
from ._core.errors import SMTPCertificateError as SMTPCertificateError
from ._core.errors import SMTPConnectError as SMTPConnectError
from ._core.errors import SMTPDisconnected as SMTPDisconnected
from ._core.errors import SMTPError as SMTPError
from ._core.errors import SMTPProtocolError as SMTPProtocolError
from ._core.errors import SMTPResponseError as SMTPResponseError
from ._core.errors import SMTPSecurityError as SMTPSecurityError
from ._core.errors import SMTPTimeoutError as SMTPTimeoutError
from ._core.parser import ReplyParser as ReplyParser
from ._core.prepare import DSN as DSN
from ._core.prepare import PreparedMessage as PreparedMessage
from ._core.prepare import prepare as prepare
from ._core.reply import Reply as Reply
from ._core.results import Outcome as Outcome
from ._core.results import RecipientResult as RecipientResult
from ._core.results import SendResult as SendResult
from ._core.results import SMTPSendError as SMTPSendError
from ._core.timeouts import Timeouts as Timeouts
from ._pool.pool import Pool as Pool
from ._pool.pool import PoolStatistics as PoolStatistics
from ._pool.pool import ResultChannel as ResultChannel
from ._pool.pool import RetryPolicy as RetryPolicy
from ._pool.pool import Server as Server
from ._pool.pool import connect_pool as connect_pool
from ._pool.pool import open_pool as open_pool
from ._pool.pool import start_pool as start_pool
from ._public import publish

if TYPE_CHECKING:
    from ._core.dkim import DKIMMultiSigner as DKIMMultiSigner
    from ._core.dkim import DKIMSigner as DKIMSigner

__version__ = "0.1.0"

__all__ = [
    "DKIMMultiSigner",
    "DKIMSigner",
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
    "start_pool",
    "start_session",
]

#: Public names whose module needs an optional extra (``triomail[dkim]``: cryptography),
#: imported on first use so that ``import triomail`` never needs it.
_LAZY = {"DKIMSigner": "._core.dkim", "DKIMMultiSigner": "._core.dkim"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value: object = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        publish(globals(), [name])
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


publish(globals(), [name for name in __all__ if name not in _LAZY])
