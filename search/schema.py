"""The schemas of the files spt reads back from a run directory (see :mod:`spt.schema`).

``status.json``, ``metrics.json``, the sections of ``config.yaml`` and the JSON metadata
of a checkpoint (training state, optimizers, loss scalers, callbacks,
identity). Each reader validates what it loads against its schema here, so a damaged or
hand-edited file ends in one ``error: <file>: <field>: <problem>`` line, never a traceback
or a run that silently does something else. (The manifest's schema is beside its format in
:mod:`search.manifest`; the layer mask, the histories and a saved model's ``prompt_config.json``
are checked by their readers: :func:`search.selection.read_mask`, :mod:`search.resume`,
:func:`spt.serialization.read_model_config`.)
"""

from __future__ import annotations

from typing import Any

from spt.schema import Field, all_at_least, at_least, distinct, is_number

from .config import SECTIONS

NON_NEGATIVE = {"check": at_least(0), "must": "at least 0"}


def _count(required: bool = True) -> Field:
    """An integer of at least 0 (a step, an epoch, a parameter count)."""
    return Field(int, required, **NON_NEGATIVE)


def _seconds(required: bool = True) -> Field:
    return Field(float, required, **NON_NEGATIVE)


def _numbers(values: Any) -> bool:
    return all(is_number(v) for v in values)


# status.json: stage -> how it ended (RunDir.mark); what later jobs read of it.
STAGE_STATUS = {
    "done": Field(bool),
    "finished_at": Field(str, required=False),
    "steps": _count(required=False),
    "seconds": _seconds(required=False),
    "alphas": Field(list[float], required=False, check=lambda a: all(0 <= x <= 1 for x in a), must="gates in [0, 1]"),
    "strategies": Field(list[str], required=False),
    "seeds": Field(list[int], required=False),
    "ks": Field(list[int], required=False, check=all_at_least(1), must="values of K of at least 1"),
}

# metrics.json (search.pipeline.write_metrics), read by `spt runs`, which shows what a file
# holds: a field may be absent (an older or partial file), but one present has its type.
SCORES = Field(dict[str, Any] | None, False, check=lambda d: _numbers(d.values()), must="a mapping of metric names to numbers")
METRICS = {
    "task": Field(str, False),
    "metric": Field(str, False),
    "dev": SCORES,
    "test": SCORES,
    "trainable_params": _count(required=False),
    "selected_layers": Field(list[int], False, check=lambda v: distinct(v) and all(x >= 0 for x in v), must="distinct layers"),
    "search_seconds": Field(float | None, False, check=at_least(0), must="at least 0"),
    "retrain_seconds": _seconds(required=False),
    "retrain_steps": _count(required=False),
    "best_dev_step": _count(required=False),
}

# config.yaml: its structure (each section's fields are typed by the config dataclasses).
CONFIG = {"seed": Field(int, required=False), **{name: Field(dict | None, required=False) for name in SECTIONS}}

# A checkpoint's metadata (search.checkpoint.save_checkpoint), each entry JSON.
TRAIN_STATE = {
    "step": _count(),
    "epoch": _count(),
    "batch_in_epoch": _count(),
    "seconds": _seconds(),
    "stop": Field(bool),
}
PARAM_GROUP = {"params": Field(list[int], check=all_at_least(0), must="parameter indexes of at least 0"),
               "lr": Field(float, **NON_NEGATIVE)}
OPTIMIZER = {
    "param_groups": Field(list[dict], check=bool, must="at least one parameter group", each=PARAM_GROUP),
    "scalars": Field(dict[str, dict], check=lambda d: all(k.isdigit() for k in d), must="keyed by parameter index"),
}
SCALER = {"scale": Field(float, required=False, check=at_least(0), must="at least 0"),
          "growth_interval": Field(int, required=False), "_growth_tracker": Field(int, required=False)}
DEV_STATE = {
    "best": Field(dict, fields={"score": Field(float | None), "step": _count(), "dev": Field(dict[str, Any] | None)}),
    "last_score": Field(check=is_number, must="a number"),
    "scores": Field(dict[str, Any], check=lambda d: all(k.isdigit() for k in d) and _numbers(d.values()),
                    must="a mapping of steps to numbers"),
    "stale": _count(),
}
CALLBACKS = {
    "dev": Field(dict, required=False, fields=DEV_STATE),
    "metrics": Field(dict, required=False, fields={"counts": Field(dict[str, int])}),
    "steps": Field(dict, required=False),
}
IDENTITY = {"stage": Field(str, required=False), "layers": Field(list[int] | None, required=False)}
CHECKPOINT = {
    "state": Field(dict, fields=TRAIN_STATE),
    "optimizers": Field(dict, each=OPTIMIZER),
    "scalers": Field(dict, required=False, each=SCALER),
    "callbacks": Field(dict, required=False, fields=CALLBACKS),
    "identity": Field(dict, required=False, fields=IDENTITY),
}
