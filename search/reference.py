"""The config reference: every field of every section, its type, default and meaning,
read from the config dataclasses (their ``Attributes:`` docstrings are the one home of the
documentation). ``python -m search.reference > docs/config.md`` regenerates the page."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from .config import SECTIONS

# An entry line of an ``Attributes:`` section: ``name: text`` or ``a, b: text`` (field names only).
_ENTRY = re.compile(r"^([a-z_][a-z_0-9]*(?:, [a-z_][a-z_0-9]*)*):\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of ``cls``'s docstring
    (an entry may name several fields, ``a, b: text``).

    An entry starts at the section's own indent; deeper lines continue it, even where they
    hold a ``word:`` of their own (``{path: ..., label: ...}`` in a continued sentence)."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    body = lines[start + 1:]
    indent = next((len(line) - len(line.lstrip()) for line in body if line.strip()), 0)
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in body:
        depth = len(line) - len(line.lstrip())
        if line.strip() and depth < indent:
            break  # the section ended (a dedented paragraph)
        match = _ENTRY.match(line.strip()) if depth == indent else None
        if match:
            current = [name.strip() for name in match.group(1).split(",")]
            for name in current:
                docs[name] = match.group(2).strip()
        elif line.strip() and current:
            for name in current:
                docs[name] += " " + line.strip()
    return docs


def _type_name(annotation: Any) -> str:
    name = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return name.replace("|", "or")


def undocumented() -> list[str]:
    """``section.field`` of every field without a doc."""
    missing = []
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    return missing


def reference_markdown() -> str:
    lines = ["# Config reference", "",
             "Every field of a run config, generated from the config dataclasses (`search/config.py`, `spt/config.py`) "
             "by `python -m search.reference > docs/config.md`. A YAML file sets only what differs from these "
             "defaults; `--set section.field=value` overrides one field on the command line.", "",
             "| field | type | default | meaning |", "|---|---|---|---|",
             "| `seed` | int | `42` | fixes data subsampling and splits, D1/D2 splits, masks and initialisation |"]
    for name, cls in SECTIONS.items():
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "" if default in ({}, None) and f.name in ("space", "hf") else f"`{default}`"
            lines.append(f"| `{name}.{f.name}` | {_type_name(hints[f.name])} | {shown} | {docs.get(f.name, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
