"""What ``triomail send`` adds for mail that providers accept: unsubscribe, bounces, DKIM.

Theory of operation
-------------------
``--unsubscribe URL`` and ``--unsubscribe-mailto ADDR`` become RFC 2369 ``List-Unsubscribe``
and, with an https URL, the RFC 8058 §3.1 ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``
field; ``--bounce-address ADDR`` becomes a ``Return-Path`` field, which the renderer turns
into ``MAIL FROM`` and leaves out of the message (RFC 5321 §4.4). All three are template
lines (:func:`template_headers`) put in front of the template's own fields when it is
compiled, in this process and in the render process alike, so that their Jinja2
expressions (``bounces+{{id}}@example.com``: VERP) are filled per row like any field,
checked like any field (a value cannot close ``<...>`` or break a line), and count in
the template's digest that the journal keeps.

DKIM keys (``--dkim-key FILE --dkim-selector S``, repeatable; ``--dkim-domain D`` or the
From domain) are read here, where a passphrase can be asked for
(``TRIOMAIL_DKIM_PASSPHRASE`` or a prompt, never the command line). The render process
gets each key as unencrypted PEM on its stdin, a private pipe (never its command line or
environment), and signs where it renders (:func:`signed`), so that signing costs the
sending loop nothing; each signature is over the final bytes of one message (RFC 6376
§5), the ``Return-Path`` already gone.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import CannotRun, SendSettings
from .template.rendered import Rendered

if TYPE_CHECKING:
    from .._core.prepare import Signer

__all__ = ["DKIMKey", "load_keys", "read_key", "signed", "signer_of", "template_headers"]

#: The environment variable holding the passphrase of encrypted DKIM keys.
PASSPHRASE_VARIABLE = "TRIOMAIL_DKIM_PASSPHRASE"
#: RFC 8058 §3.1: the one value of List-Unsubscribe-Post.
ONE_CLICK = "List-Unsubscribe=One-Click"


def template_headers(settings: SendSettings) -> list[str]:
    """The template lines that ``--unsubscribe*`` and ``--bounce-address`` stand for."""
    lines = []
    uris = []
    url = settings.unsubscribe
    if url is not None:
        if not url.lower().startswith("https://"):
            raise CannotRun(f"--unsubscribe {url}: one-click unsubscribe needs an https:// URL")
        uris.append(f"<{url}>")
    mailto = settings.unsubscribe_mailto
    if mailto is not None:
        uris.append(f"<{mailto if mailto.lower().startswith('mailto:') else 'mailto:' + mailto}>")
    if uris:
        lines.append(f"List-Unsubscribe: {', '.join(uris)}")
    if url is not None:
        lines.append(f"List-Unsubscribe-Post: {ONE_CLICK}")
    if settings.bounce_address is not None:
        lines.append(f"Return-Path: <{settings.bounce_address.strip('<>')}>")
    return lines


@dataclass(frozen=True, slots=True)
class DKIMKey:
    """One signing key as the render process gets it: domain, selector, PEM (unencrypted)."""

    domain: str
    selector: str
    pem: bytes

    def line(self) -> str:
        """The render process's ``dkim`` command (:mod:`.render_process`)."""
        return f"dkim {self.domain} {self.selector} {base64.b64encode(self.pem).decode('ascii')}"

    @classmethod
    def from_line(cls, line: str) -> DKIMKey:
        _, domain, selector, pem = line.split()
        return cls(domain, selector, base64.b64decode(pem))


def load_keys(settings: SendSettings, from_domain: str | None) -> list[DKIMKey]:
    """The ``--dkim-key`` files, decrypted; :class:`CannotRun` for anything wrong."""
    paths = settings.dkim_key or []
    selectors = settings.dkim_selector or []
    if len(paths) != len(selectors):
        raise CannotRun(
            f"give one --dkim-selector per --dkim-key ({len(paths)} key(s), "
            f"{len(selectors)} selector(s))"
        )
    domain = settings.dkim_domain or from_domain
    if paths and not domain:
        raise CannotRun("the From address varies per row: give --dkim-domain")
    keys = []
    passphrases: list[bytes] = []  # asked once, for all the keys
    for path, selector in zip(paths, selectors, strict=True):
        pem = read_key(path, passphrases, "--dkim-key")
        assert domain is not None
        keys.append(DKIMKey(domain, selector, pem))
    return keys


def read_key(path: Path, passphrases: list[bytes], option: str) -> bytes:
    """A private key file as unencrypted PEM; an encrypted one's passphrase is asked for
    once (kept in ``passphrases`` for the next key). :class:`CannotRun` if unusable."""
    from cryptography.hazmat.primitives import serialization

    from .._core.dkim import load_private_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CannotRun(f"{option} {path}: {exc.strerror}") from None
    try:
        try:
            key = load_private_key(data)
        except TypeError:  # encrypted
            if not passphrases:
                passphrases.append(read_passphrase(f"passphrase for DKIM key {path}: "))
            key = load_private_key(data, passphrases[0])
    except (ValueError, TypeError) as exc:
        raise CannotRun(f"{option} {path}: {' '.join(str(exc).split())}") from None
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def read_passphrase(prompt: str) -> bytes:
    from .secrets import read_secret

    return read_secret(PASSPHRASE_VARIABLE, prompt, "DKIM key passphrase").encode("utf-8")


def signer_of(keys: Sequence[DKIMKey]) -> Signer | None:
    """One signer for all the keys (``None`` for none): a DKIMSigner or DKIMMultiSigner."""
    if not keys:
        return None
    from .._core.dkim import DKIMMultiSigner, DKIMSigner

    try:
        signers = [DKIMSigner(k.domain, k.selector, k.pem) for k in keys]
    except ValueError as exc:
        raise CannotRun(f"DKIM: {exc}") from None
    return signers[0] if len(signers) == 1 else DKIMMultiSigner(*signers)


def signed(render: Callable[..., Rendered], signer: Signer | None) -> Callable[..., Rendered]:
    """``render`` whose messages carry ``signer``'s DKIM-Signature fields in front."""
    if signer is None:
        return render

    def render_signed(fields: Any, *, message_id: str) -> Rendered:
        message = render(fields, message_id=message_id)
        # The fields are ASCII lines ending in CRLF: the bytes stay canonical.
        return dataclasses.replace(message, data=signer.sign(message.data) + message.data)

    return render_signed
