"""search: the AutoML side of spt-search - task data, the SPT-DARTS trainer, selection,
retraining and the ``spt`` command line."""

from .config import RunConfig, load_config
from .selection import LayerMask, read_mask

__all__ = ["LayerMask", "RunConfig", "load_config", "read_mask"]
