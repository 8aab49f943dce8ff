"""search: the AutoML side of spt-search - task data, the SPT-DARTS trainer, selection,
retraining and the ``spt`` command line.

The public names are imported on first use (PEP 562): ``spt --help`` and ``spt --version``
import ``search.cli`` through this package and must not load torch, YAML or the config.
"""

from __future__ import annotations

from spt.lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "RunConfig": "config",
    "load_config": "config",
    "LayerMask": "selection",
    "read_mask": "selection",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
