"""Typed configuration sections: every field converted and checked from its annotation.

A section is a dataclass deriving from :class:`Section` with a ``SECTION`` name. When it
is built (from YAML, from ``--set``, or in Python) each field is converted to its
annotated type, so ``lr: 1e-3`` (a string to YAML 1.1) is the float 0.001 and
``lr: abc`` is a :class:`~spt.errors.ConfigError` naming ``search.lr``, the value and the
expected type. Range checks live in each section's ``check`` method.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Union

from .errors import ConfigError, UserError

_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is list:
        item = typing.get_args(annotation)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "true/false values",
                               dict: "mappings"}.get(item, str(item))
    if origin is dict or annotation is dict:
        return "a mapping"
    if annotation is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


class _Mismatch(Exception):
    pass


def label_text(value: Any) -> str:
    """How labels and other names compare: YAML/JSON booleans are ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def convert(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (int, float, bool, str, list[...], dict, unions), or raise."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        # Prefer an option the value already is (a dict for ``str | dict``), then conversions.
        for option in options:
            base = typing.get_origin(option) or option
            if base is not type(None) and isinstance(value, base) and not (isinstance(value, bool) and base is not bool):
                return convert(value, option)
        for option in options:
            if option is not type(None):
                try:
                    return convert(value, option)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = typing.get_args(annotation)
        return [convert(v, item) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        args = typing.get_args(annotation)
        if args and args[0] is str:
            return {label_text(k): convert(v, args[1]) for k, v in value.items()}
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Mismatch
    if annotation is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        number = _number(value)
        if number is None or not number.is_integer():
            raise _Mismatch
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise _Mismatch
        number = float(value) if isinstance(value, int) else _number(value)
        if number is None or not math.isfinite(number):
            raise _Mismatch
        return number
    if annotation is str:
        if isinstance(value, (str, int, float, bool)):
            return label_text(value)
        raise _Mismatch
    return value


def typed(value: Any, annotation: Any, field: str, error: type[UserError] = ConfigError, exact: bool = False) -> Any:
    """``value`` as ``annotation`` (see :func:`convert`); otherwise ``error(field, ...)``
    saying what was expected and what was found. ``exact``: refuse a value that converting
    would change (``"3"`` or ``3.0`` for an integer, ``0`` for a label): a file spt wrote
    holds its types exactly, so another type means the file was altered."""
    try:
        converted = convert(value, annotation)
        if exact and not _unchanged(value, converted):
            raise _Mismatch
        return converted
    except _Mismatch:
        raise error(field, f"expected {_describe(annotation)}, got {value!r}") from None


def _unchanged(value: Any, converted: Any) -> bool:
    """Whether :func:`convert` left ``value`` as it was (an integer may stand for a number)."""
    if isinstance(converted, list):
        return isinstance(value, list) and len(value) == len(converted) and all(map(_unchanged, value, converted))
    if isinstance(converted, dict):
        return (isinstance(value, dict) and list(value) == list(converted)
                and all(_unchanged(value[k], converted[k]) for k in value))
    if type(converted) is float:
        return type(value) in (int, float)
    return type(value) is type(converted) and value == converted


def _number(value: Any) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            return None
    return None


class Section:
    """Base of the config dataclasses: typed fields, then the section's own checks."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, typed(getattr(self, f.name), hints[f.name], self.field(f.name)))
        self.check()

    def field(self, name: str) -> str:
        """The dotted name of field ``name`` (``search.lr``) for messages."""
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def check(self) -> None:
        """Range checks of this section's fields (override); raise :class:`ConfigError`."""

    # Small helpers for ``check``.
    def require(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(self.field(name), f"must be {what}, got {getattr(self, name)!r}")

    def positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None:
                self.require(name, value > 0, "> 0")

    def non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None:
                self.require(name, value >= 0, ">= 0")

    def one_of(self, name: str, choices: tuple[str, ...], what: str = "value") -> None:
        if getattr(self, name) not in choices:
            raise ConfigError(self.field(name), f"unknown {what} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
