"""search: the AutoML side of spt-search - task data, the SPT-DARTS trainer, selection,
retraining and the ``spt`` command line.

The public names are imported on first use (PEP 562): ``spt --help`` and ``spt --version``
import ``search.cli`` through this package and must not load torch, YAML or the config.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "RunConfig": "config",
    "load_config": "config",
    "LayerMask": "selection",
    "read_mask": "selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's submodule the first time the name is asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
