"""Cheap construction of the frozen dataclasses built once per message.

Theory of operation
-------------------
A frozen dataclass refuses attribute assignment, so its generated ``__init__`` has to
set each field through ``object.__setattr__``, a slow generic call. ``send_many`` builds
four frozen values per message (the canonical data, the prepared message, the
recipient result and the send result, 21 fields); measured with callgrind, that was
about 28,000 of the 257,000 instructions a message cost on loopback, more than any
other single item.

:func:`fast_constructor` returns, for a frozen ``slots=True`` dataclass, a *twin*: a
plain (mutable) slots dataclass with the same fields, defaults and ``__slots__``, whose
``__init__`` stores each field directly, and whose ``__post_init__`` then sets the
object's ``__class__`` to the frozen class. CPython allows that assignment exactly when
the two layouts are identical (same base, same slots), which the twin is built to be,
so the result *is* an instance of the frozen class: equality, hashing, ``repr``,
``dataclasses.replace``, pickling and the ``FrozenInstanceError`` on assignment are all
the class's own. The class itself is unchanged; only hot paths call the twin.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_constructor"]

T = TypeVar("T")


def fast_constructor(cls: type[T]) -> type[T]:
    """A constructor for the frozen slots dataclass ``cls``: same arguments, same result.

    Typed as ``cls`` itself so that calls are checked against its fields; use it only
    to build instances (it is not the class: ``isinstance`` checks need ``cls``).
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen slots dataclass")
    if hasattr(cls, "__post_init__") or cls.__bases__ != (object,):
        # The twin would skip the check, or could not match the layout.
        raise TypeError(f"{cls.__name__} has a __post_init__ or a base class")
    spec: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            raise TypeError(f"{cls.__name__}.{f.name} is not an __init__ field")
        extra = dataclasses.field(default=f.default, default_factory=f.default_factory)
        spec.append((f.name, f.type, extra))

    def __post_init__(self: Any) -> None:
        self.__class__ = cls

    twin = dataclasses.make_dataclass(
        f"_{cls.__name__}Builder",
        spec,
        namespace={"__post_init__": __post_init__},
        slots=True,
        repr=False,
        eq=False,
        match_args=False,
    )
    if twin.__dict__["__slots__"] != cls.__dict__["__slots__"]:
        raise TypeError(f"{cls.__name__}: the twin's slots differ")
    twin.__module__ = cls.__module__
    return twin
