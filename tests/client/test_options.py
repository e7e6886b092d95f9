"""The session options are listed once: the keyword form cannot drift from the object."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

import triomail
from triomail._client.options import OptionArgs, SessionOptions


def test_keyword_options_are_the_session_options_but_tls() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(SessionOptions)}
    keywords = typing.get_type_hints(OptionArgs)
    assert set(keywords) == set(fields) - {"tls"}


@pytest.mark.parametrize("function", [triomail.connect, triomail.open_connection])
def test_tls_defaults_by_port_and_the_rest_are_options(function: object) -> None:
    parameters = inspect.signature(function).parameters  # type: ignore[arg-type]
    assert parameters["tls"].default is None
    assert parameters["options"].kind is inspect.Parameter.VAR_KEYWORD


def test_start_session_requires_tls() -> None:
    parameters = inspect.signature(triomail.start_session).parameters
    assert parameters["tls"].default is inspect.Parameter.empty


async def test_an_unknown_option_is_refused_before_connecting() -> None:
    with pytest.raises(TypeError):
        await triomail.open_connection("127.0.0.1", 1, tls="none", colour="blue")  # type: ignore[call-arg]
