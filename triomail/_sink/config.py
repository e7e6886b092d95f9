"""The capture server's configuration, fixed when an :class:`~triomail._sink.server.SMTPSink`
is created and shared read-only by all its connections."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    from .message import CapturedMessage

__all__ = ["SinkConfig"]


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Everything a session needs to know, fixed when the sink is created."""

    hostname: str
    tls_context: ssl.SSLContext | None
    implicit_tls: bool
    auth: Mapping[str, str]
    auth_mechanisms: tuple[str, ...]
    allow_insecure_auth: bool
    require_tls: bool
    require_auth: bool
    hide_extensions: frozenset[str]
    extra_extensions: tuple[str, ...]
    max_line_length: int
    max_message_size: int
    max_recipients: int
    max_connections: int
    idle_timeout: float
    messages_per_connection: int | None
    strict: bool
    out_dir: Path | None
    store: bool
    max_stored: int | None
    on_message: Callable[[CapturedMessage], object] | None
    refuse_pipelined_after_data: bool = False
    #: None: as ``strict``.
    forbid_unauth_pipelining: bool | None = None
