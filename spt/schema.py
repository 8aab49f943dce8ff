"""Schemas of the files spt reads back: each field's type and what else it must be, checked on load.

A schema maps field names to :class:`Field` s. :func:`validate` checks a mapping read from a
file (JSON, YAML, safetensors metadata) against one and names the first field that is
missing, of another type or out of range: ``UserError(where, "<field>: <problem><fix>")``,
which the CLI prints as ``error: <file>: <field>: <problem>``. Types are checked with
:func:`spt.typed.typed`, exactly (a file spt wrote holds its types exactly: ``"3"`` for an
integer means it was altered); nested mappings have schemas of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .typed import typed


@dataclass(frozen=True)
class Field:
    """One field: its type (an annotation :func:`~spt.typed.typed` knows, or ``dict`` for a
    nested mapping), whether it may be absent, a ``check`` of the typed value and what that
    check requires in words (``must``). ``fields``: the schema of a nested mapping; ``each``:
    the schema of every item of a list of mappings, or of every value of a mapping whose keys
    are names (one entry per optimizer)."""

    kind: Any = Any
    required: bool = True
    check: Callable[[Any], bool] | None = None
    must: str = ""
    fields: Mapping[str, Field] | None = None
    each: Mapping[str, Field] | None = None


Schema = Mapping[str, Field]


def validate(data: Any, schema: Schema, where: str, fix: str = "", prefix: str = "") -> dict[str, Any]:
    """``data`` with every field of ``schema`` checked (fields it does not name are kept as
    they are); otherwise a :class:`UserError` for ``where`` naming the field (``prefix`` +
    its name) and ending in ``fix``, what to do about it."""
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "contents"
        raise UserError(where, f"{name}: expected a mapping of fields, got {_short(data)}{fix}")
    out = dict(data)
    for name, field in schema.items():
        dotted = prefix + name
        if name not in data:
            if field.required:
                raise UserError(where, f"{dotted}: missing{fix}")
            continue
        out[name] = check_value(data[name], field, where, dotted, fix)
    return out


def check_value(value: Any, field: Field, where: str, dotted: str, fix: str = "") -> Any:
    """``value`` of the field named ``dotted``, checked as ``field`` says."""
    try:
        value = typed(value, field.kind, dotted, UserError, exact=True)
    except UserError as exc:
        raise UserError(where, f"{dotted}: {exc.problem}{fix}") from None
    if field.check is not None and value is not None and not field.check(value):
        raise UserError(where, f"{dotted}: must be {field.must}, got {_short(value)}{fix}")
    if field.fields is not None and value is not None:
        value = validate(value, field.fields, where, fix, dotted + ".")
    if field.each is not None and value is not None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        checked = {key: validate(item, field.each, where, fix, f"{dotted}.{key}.") for key, item in items}
        value = checked if isinstance(value, dict) else list(checked.values())
    return value


def conforms(data: Any, schema: Schema) -> bool:
    """Whether ``data`` passes :func:`validate` (for readers that show what they can of a damaged file)."""
    try:
        validate(data, schema, "")
    except UserError:
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Checks shared by many schemas.
def at_least(low: float) -> Callable[[Any], bool]:
    return lambda value: value >= low


def all_at_least(low: float) -> Callable[[Any], bool]:
    return lambda values: all(v >= low for v in values)


def distinct(values: list[Any]) -> bool:
    return len(set(values)) == len(values)


def is_number(value: Any) -> bool:
    """A JSON number, NaN included (a score not measured yet is NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
