"""Public names report the package they are used from, not the private module that
defines them (as trio does): ``repr``, ``help`` and tracebacks say ``triomail.Pool``."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any


def publish(namespace: MutableMapping[str, Any], names: Iterable[str]) -> None:
    """Set ``__module__`` of each class and function in ``names`` to the namespace's own."""
    module = str(namespace["__name__"])
    for name in names:
        obj = namespace[name]
        if isinstance(obj, type) or hasattr(obj, "__code__"):  # not a type alias
            obj.__module__ = module
